"""Scoring a weights file on a held-out set with ultralytics' own validator."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from training.interval import ImageStats
from training.trainer import configure_ultralytics, settings_device

METRICS = ("mAP50", "mAP50-95", "precision", "recall")
SHOWN_CONFIDENCE = 0.25
"""Boxes below this confidence count for mAP but are not drawn (ultralytics' predict default)."""


@dataclass
class EvalResult:
    """Overall metrics plus AP per class (only classes with ground truth in the set)."""

    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    instances: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class ImageResult:
    """One held-out image as the validator scored it: its statistics for mAP and the boxes a
    person would see (normalised ``x1 y1 x2 y2``, confidence at least ``SHOWN_CONFIDENCE``)."""

    image_hash: str  # the file's stem: snapshots name every image by its sha256
    stats: ImageStats
    boxes: list[dict[str, Any]]


def _recording_validator(records: list[ImageResult]) -> type:
    """ultralytics' detection validator, also keeping each image's statistics as it goes.

    The statistics are the very ones the validator appends for its own mAP, read back after
    it appended them, so a per-image computation cannot drift from the figure ``val`` prints.
    """
    from ultralytics.models.yolo.detect import DetectionValidator
    from ultralytics.utils import ops

    class RecordingValidator(DetectionValidator):  # type: ignore[misc]
        def update_metrics(self, preds: list[dict[str, Any]], batch: dict[str, Any]) -> None:
            super().update_metrics(preds, batch)
            stats = self.metrics.stats
            first = len(stats["tp"]) - len(preds)
            for si, pred in enumerate(preds):
                pbatch = self._prepare_batch(si, batch)
                height, width = (float(v) for v in pbatch["ori_shape"])
                keep = pred["conf"] >= SHOWN_CONFIDENCE
                scaled = ops.scale_boxes(
                    pbatch["imgsz"],
                    pred["bboxes"][keep].clone(),
                    pbatch["ori_shape"],
                    ratio_pad=pbatch["ratio_pad"],
                )
                boxes = [
                    {
                        "cls": int(c),
                        "name": self.names[int(c)],
                        "conf": round(float(p), 4),
                        "x1": float(b[0]) / width,
                        "y1": float(b[1]) / height,
                        "x2": float(b[2]) / width,
                        "y2": float(b[3]) / height,
                    }
                    for b, p, c in zip(
                        scaled.tolist(), pred["conf"][keep].tolist(), pred["cls"][keep].tolist()
                    )
                ]
                i = first + si
                records.append(
                    ImageResult(
                        Path(pbatch["im_file"]).stem,
                        ImageStats(
                            np.asarray(stats["tp"][i], dtype=bool).reshape(-1, self.niou),
                            np.asarray(stats["conf"][i], dtype=float),
                            np.asarray(stats["pred_cls"][i], dtype=float),
                            np.asarray(stats["target_cls"][i], dtype=float),
                        ),
                        boxes,
                    )
                )

    return RecordingValidator


def evaluate_weights(
    weights: Path,
    data_yaml: Path,
    *,
    imgsz: int,
    batch: int,
    run_dir: Path,
    device: str | None = None,
) -> EvalResult:
    """Validate ``weights`` on the ``val`` split of ``data_yaml`` (a holdout snapshot's yaml)
    on ``device`` (a torch device; default ``VISIONLOOP_DEVICE`` resolved)."""
    return evaluate_images(
        weights, data_yaml, imgsz=imgsz, batch=batch, run_dir=run_dir, device=device
    )[0]


def evaluate_images(
    weights: Path,
    data_yaml: Path,
    *,
    imgsz: int,
    batch: int,
    run_dir: Path,
    device: str | None = None,
) -> tuple[EvalResult, list[ImageResult]]:
    """``evaluate_weights``, and every image's own result in the validator's order.

    Uses ultralytics' defaults for mAP (confidence 0.001, NMS IoU 0.7) so numbers compare with
    any other ultralytics validation of the same data.
    """
    configure_ultralytics(run_dir.parent / ".ultralytics")
    from ultralytics import YOLO

    model = YOLO(str(weights))
    records: list[ImageResult] = []
    result = model.val(
        validator=_recording_validator(records),
        data=str(data_yaml),
        split="val",
        imgsz=imgsz,
        batch=batch,
        device=device or settings_device(),
        workers=0,
        plots=False,
        verbose=False,
        save_json=False,
        project=str(run_dir.parent),
        name=run_dir.name,
        exist_ok=True,
    )
    box = result.box
    names = result.names
    per_class: dict[str, dict[str, float]] = {}
    for i, cls in enumerate(box.ap_class_index):
        per_class[names[int(cls)]] = {
            "AP50": float(box.ap50[i]),
            "AP50-95": float(box.ap[i]),
            "instances": int(result.nt_per_class[int(cls)]),
        }
    overall = EvalResult(
        metrics={
            "mAP50": float(box.map50),
            "mAP50-95": float(box.map),
            "precision": float(box.mp),
            "recall": float(box.mr),
        },
        per_class=per_class,
        instances=int(result.nt_per_class.sum()) if result.nt_per_class is not None else 0,
    )
    return overall, records
