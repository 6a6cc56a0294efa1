"""Exporting a champion to ONNX and OpenVINO, verified against PyTorch before anyone serves it.

An export is one graph with two outputs: the Detect head's decoded output and the image
embedding (``serving.embedding.pooled_statistics`` of block ``EARLY_LAYER``, traced into the
graph), at a dynamic batch and the champion's fixed square training size. ONNX is traced with
ultralytics' ``torch2onnx``; the OpenVINO IR is converted from that ONNX file, so both run
the same graph.

The parity gate runs PyTorch (ultralytics' predict, as ``ChampionPredictor`` does) and each
exported runtime on the same held-out images (the champion's training snapshot's test split,
else its val split), scores each against the labels with one function (ultralytics'
``box_iou``, its validator's matching and ``ap_per_class``) and compares embeddings. An
export is verified when ``|mAP50-95 diff| <= MAX_MAP_DIFF`` and the median cosine of the
embeddings is at least ``MIN_EMBEDDING_COSINE``; otherwise it is refused with its reason and
serving keeps PyTorch. The runtime runs at the precision serving will use
(``VISIONLOOP_INFERENCE_PRECISION``), and the record names it: an export serves only at the
precision it was verified at. Verified exports are logged beside the weights in the version's run
with their checksums, and every verdict as a parity record (``visionloop.registry``).

Mind the gate on a barely trained champion: with mAP near 0 on both sides the mAP test says
little, and the embedding test carries the verdict.
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import TYPE_CHECKING, Any

import cv2
import numpy as np

from serving.embedding import EARLY_LAYER, pooled_statistics, predict_with_features
from serving.runtime import (
    DETECTIONS_OUTPUT,
    EMBEDDING_OUTPUT,
    EXPORTED_BACKENDS,
    F32,
    INPUT_NAME,
    MAX_DET,
    NMS_IOU,
    ONNX,
    OPENVINO,
    THROUGHPUT,
    Detections,
    ExportedRuntime,
)
from training.trainer import configure_ultralytics
from visionloop.registry import ModelRef, download_weights, log_exports
from visionloop.settings import Settings

if TYPE_CHECKING:
    from sqlmodel import Session

MAX_MAP_DIFF = 0.005
"""Largest |mAP50-95 (exported) - mAP50-95 (PyTorch)| an export may show on the held-out set."""
MIN_EMBEDDING_COSINE = 0.99
"""Smallest median cosine between an image's exported and PyTorch embeddings: the stored
embeddings of one champion must stay comparable whichever backend computed them."""
PARITY_IMAGES = 64
"""Held-out images the gate predicts at most: enough for a stable mAP, seconds on a CPU."""
MAP_CONF = 0.001
"""ultralytics' validation confidence: mAP needs the whole precision-recall curve."""
ONNX_FILE = "best.onnx"
OPENVINO_DIR = "best_openvino_model"
"""ultralytics recognises an OpenVINO model by this folder suffix (``YOLO(folder)`` works)."""
OPENVINO_FILE = "best.xml"

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Sample:
    """A held-out image and its labels."""

    rgb: np.ndarray
    labels: np.ndarray
    """``(m, 5)``: class, then x1, y1, x2, y2 normalised to the image."""


@dataclass
class BackendParity:
    backend: str
    verified: bool
    reason: str
    map50_95: float | None = None
    map_diff: float | None = None
    embedding_cosine_median: float | None = None
    embedding_cosine_min: float | None = None
    precision: str | None = None
    """What the runtime computed in while it was compared (``f32``, ``bf16``...): the only
    precision it is verified at."""


@dataclass
class ParityRecord:
    """What the gate found, logged as ``parity.json`` beside the exports."""

    version: str
    imgsz: int
    images: int
    split: str
    torch_map50_95: float | None
    backends: dict[str, BackendParity] = field(default_factory=dict)
    max_map_diff: float = MAX_MAP_DIFF
    min_embedding_cosine: float = MIN_EMBEDDING_COSINE

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def verified(self) -> list[str]:
        return [name for name, parity in self.backends.items() if parity.verified]


# --- building the graphs ----------------------------------------------------------------------


def _export_module(weights: Path) -> Any:
    """The champion's fused network returning ``(detections, pooled statistics)``."""
    import torch
    from ultralytics import YOLO
    from ultralytics.nn.modules.head import Detect

    network = copy.deepcopy(YOLO(str(weights), task="detect").model).float().fuse().eval()
    for parameter in network.parameters():
        parameter.requires_grad = False
    for module in network.modules():
        if isinstance(module, Detect):
            module.export, module.format = True, "onnx"  # the decoded output alone

    class DetectionsAndEmbedding(torch.nn.Module):
        """The network, plus block ``EARLY_LAYER``'s output pooled as ``serving.embedding``
        pools it: captured by a forward hook (as the PyTorch path does), so no layer loop of
        ultralytics' is copied here."""

        def __init__(self, network: Any) -> None:
            super().__init__()
            self.network = network
            self._early: list[Any] = []
            network.model[EARLY_LAYER].register_forward_hook(
                lambda _m, _a, output: self._early.append(output)
            )

        def forward(self, images: Any) -> tuple[Any, Any]:
            self._early.clear()
            detections = self.network(images)
            return detections, pooled_statistics(self._early[-1])

    return DetectionsAndEmbedding(network)


def _metadata(weights: Path) -> dict[str, Any]:
    from ultralytics import YOLO

    model = YOLO(str(weights), task="detect")
    return {
        "description": "visionloop champion export (detections, embedding)",
        "stride": int(max(model.model.stride)),
        "task": "detect",
        "batch": 1,
        "imgsz": [champion_imgsz(weights)] * 2,
        "names": dict(model.names),
        "channels": 3,
    }


def champion_imgsz(weights: Path) -> int:
    """The square size the champion was trained at (what ``ChampionPredictor`` predicts at)."""
    from ultralytics import YOLO

    return int(YOLO(str(weights), task="detect").overrides.get("imgsz") or 640)


def export_onnx(weights: Path, folder: Path) -> Path:
    """``weights`` as an ONNX graph with a dynamic batch, ultralytics' metadata included."""
    import onnx
    import torch
    from ultralytics.utils.export.engine import best_onnx_opset, torch2onnx

    imgsz = champion_imgsz(weights)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / ONNX_FILE
    module = _export_module(weights)
    example = torch.zeros(1, 3, imgsz, imgsz)
    with torch.no_grad():
        module(example)  # settles the head's anchors before tracing
        torch2onnx(
            module,
            example,
            path,
            opset=best_onnx_opset(onnx),
            input_names=[INPUT_NAME],
            output_names=[DETECTIONS_OUTPUT, EMBEDDING_OUTPUT],
            dynamic={
                INPUT_NAME: {0: "batch"},
                DETECTIONS_OUTPUT: {0: "batch"},
                EMBEDDING_OUTPUT: {0: "batch"},
            },
        )
    graph = onnx.load(str(path))
    for key, value in _metadata(weights).items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, str(value)
    onnx.checker.check_model(graph)
    onnx.save(graph, str(path))
    return path


def export_openvino(onnx_path: Path, folder: Path, metadata: dict[str, Any]) -> Path:
    """The ONNX graph as OpenVINO IR (full precision), with ultralytics' ``metadata.yaml``."""
    import openvino as ov
    import yaml

    target = folder / OPENVINO_DIR
    target.mkdir(parents=True, exist_ok=True)
    model = ov.convert_model(str(onnx_path))
    ov.save_model(model, str(target / OPENVINO_FILE), compress_to_fp16=False)
    (target / "metadata.yaml").write_text(yaml.safe_dump(metadata, sort_keys=False))
    return target / OPENVINO_FILE


def onnx_metadata(onnx_path: Path) -> dict[str, Any]:
    """The metadata ``export_onnx`` wrote (names and imgsz as values, not strings)."""
    import ast

    import onnx

    graph = onnx.load(str(onnx_path), load_external_data=False)
    values: dict[str, Any] = {}
    for entry in graph.metadata_props:
        try:
            values[entry.key] = ast.literal_eval(entry.value)
        except (ValueError, SyntaxError):
            values[entry.key] = entry.value
    return values


def build_exports(weights: Path, folder: Path) -> dict[str, Path]:
    """Both exports of ``weights`` under ``folder``: backend -> the file a runtime loads."""
    onnx_path = export_onnx(weights, folder / ONNX)
    xml = export_openvino(onnx_path, folder / OPENVINO, onnx_metadata(onnx_path))
    return {ONNX: onnx_path, OPENVINO: xml}


def load_runtime(
    backend: str, path: Path, precision: str = F32, mode: str = THROUGHPUT
) -> ExportedRuntime:
    """A runtime over an export ``build_exports`` made (its ONNX metadata or ``metadata.yaml``
    gives size and names), computing at ``precision`` (``f32`` or ``auto``) in ``mode``."""
    import yaml

    if backend == OPENVINO:
        metadata = yaml.safe_load((path.parent / "metadata.yaml").read_text())
    else:
        metadata = onnx_metadata(path)
    names = {int(k): str(v) for k, v in metadata["names"].items()}
    return ExportedRuntime(
        backend,
        path,
        imgsz=int(metadata["imgsz"][0]),
        names=names,
        precision=precision,
        mode=mode,
    )


# --- the parity gate --------------------------------------------------------------------------


def held_out_samples(
    session: Session, settings: Settings, ref: ModelRef, limit: int = PARITY_IMAGES
) -> tuple[str, list[Sample]]:
    """The champion's held-out images with labels: its training snapshot's test split, else
    its val split (a bootstrap snapshot has none held out for testing)."""
    from training.snapshots import fetch_files, read_manifest, training_snapshot_of
    from visionloop.images import decode_image
    from visionloop.storage import ObjectStore

    store = ObjectStore(settings)
    snapshot = training_snapshot_of(session, settings, ref)
    if snapshot is None:
        return "none", []
    manifest = read_manifest(settings, snapshot, store)
    items = sorted(manifest["images"], key=lambda item: item["image_hash"])
    split = "test" if any(item["split"] == "test" for item in items) else "val"
    chosen = [item for item in items if item["split"] == split][:limit]
    samples = []
    for item in chosen:
        image, label = fetch_files(settings, store, snapshot, item)
        samples.append(Sample(decode_image(image).rgb, _yolo_labels(label)))
    return split, samples


def _yolo_labels(data: bytes) -> np.ndarray:
    """YOLO label lines (class cx cy w h, normalised) as ``(m, 5)`` class, x1, y1, x2, y2."""
    rows = [line.split() for line in data.decode().splitlines() if line.strip()]
    if not rows:
        return np.zeros((0, 5))
    values = np.array(rows, dtype=float)[:, :5]
    cx, cy, w, h = values[:, 1], values[:, 2], values[:, 3], values[:, 4]
    return np.stack([values[:, 0], cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=1)


def map50_95(samples: Sequence[Sample], predictions: Sequence[Detections]) -> float:
    """mAP50-95 of ``predictions`` against the samples' labels, as ultralytics' validator
    computes it (its matching, ``ap_per_class``), in pixel coordinates."""
    import torch
    from ultralytics.engine.validator import BaseValidator
    from ultralytics.utils.metrics import ap_per_class, box_iou

    iouv = torch.linspace(0.5, 0.95, 10)
    # The validator's matching only reads ``self.iouv``: called with just that, not copied.
    matcher = SimpleNamespace(iouv=iouv)
    tps, confs, classes, targets = [], [], [], []
    for sample, found in zip(samples, predictions):
        height, width = sample.rgb.shape[:2]
        scale = np.array([width, height, width, height], dtype=float)
        order = np.argsort(-found.conf, kind="stable")
        boxes, conf, cls = found.xyxyn[order] * scale, found.conf[order], found.cls[order]
        truth = sample.labels
        targets.append(truth[:, 0])
        confs.append(conf)
        classes.append(cls)
        if not len(cls):
            continue
        if not len(truth):
            tps.append(np.zeros((len(cls), len(iouv)), dtype=bool))
            continue
        iou = box_iou(
            torch.tensor(truth[:, 1:] * scale, dtype=torch.float32),
            torch.tensor(boxes, dtype=torch.float32),
        )
        correct = BaseValidator.match_predictions(
            matcher,  # type: ignore[arg-type]
            torch.tensor(cls),
            torch.tensor(truth[:, 0].astype(int)),
            iou,
        )
        tps.append(correct.numpy())
    target_cls = np.concatenate(targets) if targets else np.zeros(0)
    if not tps or not len(target_cls):
        return 0.0
    ap = ap_per_class(
        np.concatenate(tps), np.concatenate(confs), np.concatenate(classes), target_cls
    )[5]
    return float(ap.mean()) if len(ap) else 0.0


def torch_predictions(
    weights: Path, samples: Sequence[Sample], imgsz: int
) -> tuple[list[Detections], np.ndarray]:
    """PyTorch's detections and embeddings of the samples, as ``ChampionPredictor`` gets them."""
    from ultralytics import YOLO

    model = YOLO(str(weights), task="detect")
    found: list[Detections] = []
    embeddings = []
    for start in range(0, len(samples), 16):
        bgr = [cv2.cvtColor(s.rgb, cv2.COLOR_RGB2BGR) for s in samples[start : start + 16]]
        results, vectors = predict_with_features(
            model, bgr, imgsz=imgsz, conf=MAP_CONF, iou=NMS_IOU, max_det=MAX_DET, verbose=False
        )
        found += [Detections.from_result(r) for r in results]
        embeddings.append(vectors)
    return found, np.concatenate(embeddings) if embeddings else np.zeros((0, 0))


def runtime_predictions(
    runtime: ExportedRuntime, samples: Sequence[Sample]
) -> tuple[list[Detections], np.ndarray]:
    found: list[Detections] = []
    embeddings = []
    for start in range(0, len(samples), 16):
        bgr = [cv2.cvtColor(s.rgb, cv2.COLOR_RGB2BGR) for s in samples[start : start + 16]]
        detections, vectors = runtime.predict(bgr, conf=MAP_CONF)
        found += detections
        embeddings.append(vectors)
    return found, np.concatenate(embeddings) if embeddings else np.zeros((0, 0))


def check_parity(
    weights: Path,
    exports: dict[str, Path],
    samples: Sequence[Sample],
    *,
    version: str,
    split: str,
    precision: str = F32,
    mode: str = THROUGHPUT,
) -> ParityRecord:
    """Each export against PyTorch on ``samples``, run at ``precision`` in ``mode`` as serving
    will run it: verified or refused, with the figures and the precision it computed in."""
    imgsz = champion_imgsz(weights)
    if not samples:
        record = ParityRecord(version, imgsz, 0, split, None)
        for backend in exports:
            record.backends[backend] = BackendParity(
                backend, False, "no held-out images to compare the backends on"
            )
        return record
    reference, reference_embeddings = torch_predictions(weights, samples, imgsz)
    torch_map = map50_95(samples, reference)
    record = ParityRecord(version, imgsz, len(samples), split, round(torch_map, 6))
    for backend, path in exports.items():
        try:
            runtime = load_runtime(backend, path, precision, mode)
            found, embeddings = runtime_predictions(runtime, samples)
        except Exception as exc:  # a graph the runtime cannot load or run is refused, not fatal
            record.backends[backend] = BackendParity(
                backend, False, f"the {backend} runtime failed: {type(exc).__name__}: {exc}"
            )
            continue
        exported_map = map50_95(samples, found)
        cosines = np.sum(embeddings * reference_embeddings, axis=1)
        diff = exported_map - torch_map
        median = float(np.median(cosines))
        problems = []
        if abs(diff) > MAX_MAP_DIFF:
            problems.append(
                f"mAP50-95 {exported_map:.4f} against PyTorch's {torch_map:.4f} "
                f"(|diff| {abs(diff):.4f} > {MAX_MAP_DIFF})"
            )
        if median < MIN_EMBEDDING_COSINE:
            problems.append(
                f"median embedding cosine {median:.4f} < {MIN_EMBEDDING_COSINE} against PyTorch's"
            )
        record.backends[backend] = BackendParity(
            backend,
            verified=not problems,
            reason="; ".join(problems) or "matches PyTorch",
            map50_95=round(exported_map, 6),
            map_diff=round(diff, 6),
            embedding_cosine_median=round(median, 6),
            embedding_cosine_min=round(float(np.min(cosines)), 6),
            precision=runtime.precision,
        )
    return record


def publish(
    settings: Settings, ref: ModelRef, exports: dict[str, Path], record: ParityRecord
) -> ModelRef:
    """Log the verified exports (with checksums) and the parity record beside the weights."""
    folders = {
        backend: path.parent for backend, path in exports.items() if backend in record.verified()
    }
    entry_files = {backend: exports[backend].name for backend in folders}
    return log_exports(settings, ref, folders, entry_files, record.as_dict())


def export_champion(
    settings: Settings, ref: ModelRef, *, session: Session | None = None
) -> ParityRecord:
    """Export ``ref``, gate each export on parity with PyTorch, log what passed and why.

    Raises on failures of the registry or the store (the caller decides whether a flow goes
    on); an export that cannot be built or fails parity is a refused entry of the record.
    """
    from visionloop.db import session_scope

    configure_ultralytics(settings.data_dir / ".ultralytics")
    weights = download_weights(settings, ref, settings.data_dir / "models")
    if session is None:
        with session_scope() as own:
            split, samples = held_out_samples(own, settings, ref)
    else:
        split, samples = held_out_samples(session, settings, ref)
    scratch = Path(tempfile.mkdtemp(prefix=f".export-{ref.version}-", dir=settings.data_dir))
    try:
        try:
            exports = build_exports(weights, scratch)
        except Exception as exc:  # an exporter bug must not cost the flow its champion
            log.exception("exporting model version %s failed", ref.version)
            record = ParityRecord(ref.version, champion_imgsz(weights), 0, split, None)
            for backend in EXPORTED_BACKENDS:
                record.backends[backend] = BackendParity(
                    backend, False, f"export failed: {type(exc).__name__}: {exc}"
                )
            publish(settings, ref, {}, record)
            return record
        record = check_parity(
            weights,
            exports,
            samples,
            version=ref.version,
            split=split,
            precision=settings.inference_precision,
            mode=settings.inference_mode,
        )
        publish(settings, ref, exports, record)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    log.info("model version %s exports: %s", ref.version, json.dumps(record.as_dict()))
    return record


@dataclass(frozen=True)
class ExportOutcome:
    """What a flow's export step reports: never an exception (serving keeps PyTorch)."""

    version: str
    verified: list[str]
    error: str | None = None


def export_version(settings: Settings, version: str) -> ExportOutcome:
    """``export_champion`` for a flow: a failure is logged and reported, never raised, since a
    champion without exports still serves (on PyTorch)."""
    from visionloop.registry import get_version

    try:
        record = export_champion(settings, get_version(settings, version))
    except Exception as exc:
        log.exception("model version %s was not exported; it serves on PyTorch", version)
        return ExportOutcome(version, [], f"{type(exc).__name__}: {exc}")
    return ExportOutcome(version, record.verified())
