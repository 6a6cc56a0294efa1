"""Scoring a weights file on a held-out set with ultralytics' own validator."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from training.trainer import configure_ultralytics, settings_device

METRICS = ("mAP50", "mAP50-95", "precision", "recall")


@dataclass
class EvalResult:
    """Overall metrics plus AP per class (only classes with ground truth in the set)."""

    metrics: dict[str, float]
    per_class: dict[str, dict[str, float]] = field(default_factory=dict)
    instances: int = 0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


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
    on ``device`` (a torch device; default ``VISIONLOOP_DEVICE`` resolved).

    Uses ultralytics' defaults for mAP (confidence 0.001, NMS IoU 0.7) so numbers compare with
    any other ultralytics validation of the same data.
    """
    configure_ultralytics(run_dir.parent / ".ultralytics")
    from ultralytics import YOLO

    model = YOLO(str(weights))
    result = model.val(
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
    return EvalResult(
        metrics={
            "mAP50": float(box.map50),
            "mAP50-95": float(box.map),
            "precision": float(box.mp),
            "recall": float(box.mr),
        },
        per_class=per_class,
        instances=int(result.nt_per_class.sum()) if result.nt_per_class is not None else 0,
    )
