"""Exported champions (ONNX Runtime, OpenVINO) behind a parity gate, served by the predictor.

Everything runs on the session's stack with a real bootstrapped champion: the bootstrap flow
exports it, the predictor loads the export MLflow records as verified, a deliberately broken
export is refused by the same gate, and the backend follows the champion alias.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from serving.predictor import ChampionPredictor, PredictionResult
from visionloop.boxes import greedy_pairs, iou_matrix
from visionloop.registry import CHAMPION, export_record, get_alias
from visionloop.synthetic import generate_sample

CONF = 0.001
"""Where the session's barely trained champion shows boxes at all."""
SURE = 0.002
"""Boxes this far over ``CONF`` must be found by every backend (nearer it, a rounding
difference may drop one)."""

pytestmark = [pytest.mark.stack, pytest.mark.slow]


@pytest.fixture(scope="module")
def champion(stack: Any) -> str:
    from flows.bootstrap import bootstrap_flow

    return bootstrap_flow(epochs=2, images=16)["version"]


@pytest.fixture(scope="module")
def exported(stack: Any, champion: str) -> str:
    """The champion, exported: by the bootstrap flow when this module trained it, here when
    another module did before exports existed."""
    from serving.export import export_champion
    from visionloop.db import session_scope
    from visionloop.settings import get_settings

    settings = get_settings()
    ref = get_alias(settings, CHAMPION)
    assert ref is not None and ref.version == champion
    if not export_record(ref):
        with session_scope() as session:
            export_champion(settings, ref, session=session)
    return champion


def rgb_images(count: int, seed: int, size: int) -> list[np.ndarray]:
    return [generate_sample(i, seed=seed, size=size).image for i in range(count)]


def with_backend(settings: Any, backend: str) -> Any:
    return settings.model_copy(update={"inference_backend": backend})


def assert_same_predictions(
    got: list[PredictionResult], expected: list[PredictionResult], *, embedded: bool = True
) -> None:
    """Every sure box of ``expected`` found in ``got`` (same class, IoU >= 0.95, confidence
    within 0.002), and the embeddings pointing the same way."""
    assert sum(len([b for b in e.boxes if b["conf"] >= SURE]) for e in expected) > 0
    for g, e in zip(got, expected, strict=True):
        assert g.model_version == e.model_version
        sure = [b for b in e.boxes if b["conf"] >= SURE]
        ious = iou_matrix(
            [[b[k] for k in ("x1", "y1", "x2", "y2")] for b in sure],
            [[b[k] for k in ("x1", "y1", "x2", "y2")] for b in g.boxes],
        )
        for i, box in enumerate(sure):
            same_class = [j for j, other in enumerate(g.boxes) if other["cls"] == box["cls"]]
            ious[i, [j for j in range(len(g.boxes)) if j not in same_class]] = -1
        pairs = greedy_pairs(ious, min_iou=0.95)
        assert len(pairs) == len(sure), (sure, g.boxes)
        for i, j, _ in pairs:
            assert g.boxes[j]["conf"] == pytest.approx(sure[i]["conf"], abs=2e-3)
        if embedded:
            assert g.embedding is not None and e.embedding is not None
            assert float(np.dot(g.embedding, e.embedding)) >= 0.999
        else:
            assert g.embedding is None and e.embedding is None


def test_a_verified_export_predicts_like_pytorch_and_serves_under_auto(
    settings: Any, exported: str
) -> None:
    ref = get_alias(settings, CHAMPION)
    assert ref is not None
    record = export_record(ref)
    for backend in ("onnx", "openvino"):
        entry = record["backends"][backend]
        assert entry["verified"], entry
        assert entry["files"] and entry["entry"] in entry["files"]

    auto = ChampionPredictor(settings)
    assert settings.inference_backend == "auto"
    assert auto.backend == "openvino", auto.backend_reason
    pytorch = ChampionPredictor(with_backend(settings, "torch"))
    onnx = ChampionPredictor(with_backend(settings, "onnx"))
    assert onnx.backend == "onnx", onnx.backend_reason

    images = rgb_images(6, seed=31, size=settings.image_size)
    expected = pytorch.predict_batch(images, conf=CONF)
    for predictor in (auto, onnx):
        assert_same_predictions(predictor.predict_batch(images, conf=CONF), expected)
        # The flip pass runs on the export too, and maps its boxes back alike.
        mirrored = [np.ascontiguousarray(i[:, ::-1]) for i in images]
        assert_same_predictions(
            predictor.predict_batch(mirrored, conf=CONF, flip=True),
            pytorch.predict_batch(mirrored, conf=CONF, flip=True),
            embedded=False,
        )
    # Shown and below keep their meaning on the export.
    [result] = auto.predict_batch(images[:1], conf=0.004)
    assert all(b["conf"] >= 0.004 for b in result.boxes)
    assert all(c < 0.004 for _, c in result.below)
    assert input_size_is_the_export_size(auto)


def input_size_is_the_export_size(predictor: ChampionPredictor) -> bool:
    loaded, _ = predictor._current()
    return loaded.runtime is not None and predictor.input_size() == loaded.runtime.imgsz


def _break_first_convolution(onnx_path: Path) -> None:
    """Negate the stem convolution's weights in the ONNX graph: a silently wrong export."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path))
    weights = [
        init for init in graph.graph.initializer if len(init.dims) == 4 and init.dims[1] == 3
    ]
    assert weights, "no stem convolution in the graph"
    stem = weights[0]
    stem.CopyFrom(numpy_helper.from_array(-numpy_helper.to_array(stem), stem.name))
    onnx.save(graph, str(onnx_path))


def test_a_broken_export_is_refused_and_serving_stays_on_pytorch(
    settings: Any, exported: str, tmp_path: Path
) -> None:
    from serving.export import (
        build_exports,
        check_parity,
        export_openvino,
        held_out_samples,
        onnx_metadata,
        publish,
    )
    from visionloop.db import session_scope
    from visionloop.registry import download_weights, register_weights, set_alias

    ref = get_alias(settings, CHAMPION)
    assert ref is not None and ref.run_id
    weights = download_weights(settings, ref, tmp_path / "weights")
    exports = build_exports(weights, tmp_path / "exports")
    _break_first_convolution(exports["onnx"])
    # OpenVINO converted from the broken graph: both exports are wrong the same way.
    exports["openvino"] = export_openvino(
        exports["onnx"], tmp_path / "exports" / "openvino-broken", onnx_metadata(exports["onnx"])
    )
    # Another version of the same weights carries the broken export, under an alias of this
    # test's own: the session's champion keeps its good one.
    broken = register_weights(settings, ref.run_id)
    with session_scope() as session:
        split, samples = held_out_samples(session, settings, broken)
    assert split == "val" and samples  # a bootstrap snapshot holds no test split
    record = check_parity(weights, exports, samples, version=broken.version, split=split)
    for backend in ("onnx", "openvino"):
        parity = record.backends[backend]
        assert not parity.verified, parity
        assert parity.embedding_cosine_median is not None
        assert parity.embedding_cosine_median < 0.99 and "cosine" in parity.reason
    published = publish(settings, broken, exports, record)
    tag = export_record(published)["backends"]
    assert not tag["onnx"]["verified"] and "files" not in tag["onnx"]  # nothing logged to load

    set_alias(settings, "broken-export", broken.version)
    for wanted in ("auto", "onnx", "openvino"):
        predictor = ChampionPredictor(with_backend(settings, wanted), alias="broken-export")
        assert predictor.backend == "torch"
        assert "refused by its parity check" in predictor.backend_reason
        assert "cosine" in predictor.backend_reason
        [result] = predictor.predict_batch(rgb_images(1, seed=32, size=settings.image_size))
        assert result.model_version == broken.version and result.embedding is not None


def test_explicit_torch_runs_pytorch_even_with_a_verified_export(
    settings: Any, exported: str
) -> None:
    predictor = ChampionPredictor(with_backend(settings, "torch"))
    assert predictor.backend == "torch"
    assert "VISIONLOOP_INFERENCE_BACKEND=torch" in predictor.backend_reason
    loaded, _ = predictor._current()
    assert loaded.runtime is None
    [result] = predictor.predict_batch(rgb_images(1, seed=33, size=settings.image_size))
    assert result.model_version == exported


def _as_results(runtime: Any, bgr: list[np.ndarray]) -> list[PredictionResult]:
    """The runtime's predictions shaped as the predictor shapes them (``serving.predictor``)."""
    from serving.predictor import _result

    found, embeddings = runtime.predict(bgr, conf=CONF)
    return [
        _result(d, runtime.names, "-", CONF, flip=False, embedding=e)
        for d, e in zip(found, embeddings)
    ]


def test_throughput_mode_runs_a_batch_in_parts_as_one_pass_would(
    settings: Any, exported: str
) -> None:
    """Under ``VISIONLOOP_INFERENCE_MODE=throughput`` (the default) a batch is cut into a part
    per stream, run side by side; each image gets the boxes and embedding one pass over the
    whole batch gives, and a lone image runs whole."""
    from serving.runtime import ExportedRuntime

    assert settings.inference_mode == "throughput"
    bgr = [np.ascontiguousarray(i[..., ::-1]) for i in rgb_images(5, 36, settings.image_size)]
    for backend in ("onnx", "openvino"):
        loaded, _ = ChampionPredictor(with_backend(settings, backend))._current()
        assert loaded.runtime is not None and loaded.runtime.backend == backend
        # The serving default: one part per stream the runtime opened.
        assert loaded.runtime.streams >= 1
        runtimes = {
            mode: ExportedRuntime(
                backend,
                loaded.runtime.path,
                imgsz=loaded.runtime.imgsz,
                names=loaded.runtime.names,
                mode=mode,
                threads=2,
            )
            for mode in ("latency", "throughput")
        }
        assert runtimes["latency"].streams == 1
        if backend == "onnx":  # one stream per thread; OpenVINO decides by the cores it sees
            assert runtimes["throughput"].streams == 2
        one_pass = _as_results(runtimes["latency"], bgr)
        in_parts = _as_results(runtimes["throughput"], bgr)
        assert_same_predictions(in_parts, one_pass)
        alone = [result for image in bgr for result in _as_results(runtimes["throughput"], [image])]
        assert_same_predictions(alone, one_pass)


def exported_copy(settings: Any, ref: Any, folder: Path) -> tuple[Any, Path, Any, str, Any]:
    """A new registry version of ``ref``'s weights, exported afresh under ``folder`` and not
    yet checked: the version, its weights, the exports, and its held-out split and samples."""
    from serving.export import build_exports, held_out_samples
    from visionloop.db import session_scope
    from visionloop.registry import download_weights, register_weights

    other = register_weights(settings, ref.run_id)
    weights = download_weights(settings, other, folder)
    exports = build_exports(weights, folder / "exports")
    with session_scope() as session:
        split, samples = held_out_samples(session, settings, other)
    return other, weights, exports, split, samples


def openvino_native_precision() -> str:
    """What OpenVINO computes in on this CPU when not told: bf16 where it has bfloat16 units."""
    import openvino as ov

    return ov.Core().get_property("CPU", "INFERENCE_PRECISION_HINT").get_type_name()


def with_precision(settings: Any, precision: str) -> Any:
    return settings.model_copy(update={"inference_precision": precision})


def test_an_export_serves_only_at_the_precision_it_was_verified_at(
    settings: Any, exported: str, tmp_path: Path
) -> None:
    from serving.export import check_parity, publish
    from visionloop.registry import set_alias

    native = openvino_native_precision()
    ref = get_alias(settings, CHAMPION)
    assert ref is not None and ref.run_id
    # The session's champion was verified in f32 (the suite pins VISIONLOOP_INFERENCE_PRECISION).
    assert settings.inference_precision == "f32"
    verified_in = {b: e["precision"] for b, e in export_record(ref)["backends"].items()}
    assert verified_in == {"onnx": "f32", "openvino": "f32"}
    auto = ChampionPredictor(with_precision(settings, "auto"))
    if native == "f32":
        assert auto.backend == "openvino", auto.backend_reason
    else:
        # OpenVINO in bf16 would serve a model nobody compared with PyTorch: ONNX Runtime,
        # verified in f32 and computing in f32, serves instead.
        assert auto.backend == "onnx", auto.backend_reason
        assert f"openvino: verified in f32, would compute in {native}" in auto.backend_reason

    # Compared at `auto`, OpenVINO runs in the CPU's own precision, and the record says so.
    other, weights, exports, split, samples = exported_copy(settings, ref, tmp_path)
    record = check_parity(
        weights, exports, samples, version=other.version, split=split, precision="auto"
    )
    assert record.backends["openvino"].precision == native
    assert record.backends["onnx"].precision == "f32"
    assert record.backends["openvino"].verified, record.backends["openvino"]
    publish(settings, other, exports, record)
    set_alias(settings, "auto-precision", other.version)
    served = ChampionPredictor(with_precision(settings, "auto"), alias="auto-precision")
    assert served.backend == "openvino", served.backend_reason
    assert f"verified export in {native}" in served.backend_reason
    loaded, _ = served._current()
    assert loaded.runtime is not None and loaded.runtime.precision == native
    [result] = served.predict_batch(rgb_images(1, seed=35, size=settings.image_size))
    assert result.model_version == other.version and result.embedding is not None
    if native != "f32":
        pinned = ChampionPredictor(settings, alias="auto-precision")
        assert pinned.backend == "onnx", pinned.backend_reason
        assert f"openvino: verified in {native}, would compute in f32" in pinned.backend_reason


def test_the_backend_follows_the_champion_alias_without_a_restart(
    settings: Any, exported: str, tmp_path: Path
) -> None:
    from serving.export import check_parity, publish
    from training.promotion import promote, rollback

    ref = get_alias(settings, CHAMPION)
    assert ref is not None and ref.run_id
    predictor = ChampionPredictor(settings, recheck_s=0.0)
    images = rgb_images(2, seed=34, size=settings.image_size)
    assert predictor.predict_batch(images)[0].model_version == exported
    assert predictor.backend == "openvino"

    # A new version whose only verified export is ONNX: promoted, it runs on ONNX Runtime.
    other, weights, exports, split, samples = exported_copy(settings, ref, tmp_path)
    record = check_parity(
        weights, {"onnx": exports["onnx"]}, samples, version=other.version, split=split
    )
    assert record.verified() == ["onnx"], record
    publish(settings, other, {"onnx": exports["onnx"]}, record)
    promote(settings, other.version, reason="test: the backend follows the alias")
    try:
        results = predictor.predict_batch(images)
        assert [r.model_version for r in results] == [other.version] * 2
        assert predictor.backend == "onnx", predictor.backend_reason
        assert "openvino: model version" in predictor.backend_reason  # none recorded for it
    finally:
        rollback(settings, to_version=exported, reason="test over")
    assert predictor.predict_batch(images)[0].model_version == exported
    assert predictor.backend == "openvino"
