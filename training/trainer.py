"""Training a YOLO detector with ultralytics: one call, progress through a callback.

MLflow logging is ours (see ``visionloop.registry``), so ultralytics' own MLflow and analytics
integrations are switched off: they would open a second, unrelated run.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

EpochCallback = Callable[[dict[str, Any]], None]


def resolve_device(device: str) -> str:
    """The torch device for ``VISIONLOOP_DEVICE`` (``auto``, ``cpu`` or ``cuda:N``).

    ``auto`` is ``cuda:0`` when torch sees a GPU, else ``cpu``. Resolved here, when a stage
    is about to run a model, because asking torch means importing it: the settings stay
    import-light for the flows that never touch a model. A GPU that is asked for by name but
    absent is refused, so a misconfigured worker fails at once, naming the setting.
    """
    device = device.strip().lower()
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu"
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    index = device.removeprefix("cuda:")
    if not (device.startswith("cuda:") and index.isdigit() and int(index) < count):
        raise ValueError(
            f"VISIONLOOP_DEVICE={device} but torch sees {count} CUDA device(s) here: "
            "set VISIONLOOP_DEVICE=auto or cpu, or run on a machine with that GPU"
        )
    return device


def settings_device() -> str:
    """``VISIONLOOP_DEVICE`` of this process's settings, resolved."""
    from visionloop.settings import get_settings

    return resolve_device(get_settings().device)


def configure_ultralytics(config_dir: Path) -> None:
    """Keep ultralytics offline and its settings file inside the platform's data dir."""
    os.environ.setdefault("YOLO_CONFIG_DIR", str(config_dir))
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_VERBOSE", "False")  # our progress bars and logs say it instead
    config_dir.mkdir(parents=True, exist_ok=True)
    from ultralytics import settings as yolo_settings

    wanted = {"mlflow": False, "sync": False, "tensorboard": False, "wandb": False}
    if any(yolo_settings.get(k) != v for k, v in wanted.items()):
        yolo_settings.update(wanted)


@dataclass
class TrainResult:
    best_weights: Path
    last_weights: Path
    run_dir: Path
    metrics: dict[str, float]
    epochs: list[dict[str, Any]] = field(default_factory=list)


def _clean(metrics: dict[str, Any]) -> dict[str, float]:
    # "metrics/mAP50(B)" -> "mAP50": names MLflow accepts and people read.
    out = {}
    for key, value in metrics.items():
        name = key.split("/")[-1].replace("(B)", "")
        try:
            out[name] = float(value)
        except (TypeError, ValueError):
            continue
    return out


def train_yolo(
    data_yaml: Path,
    *,
    model_source: str,
    run_dir: Path,
    epochs: int,
    imgsz: int,
    batch: int,
    seed: int = 0,
    on_epoch: EpochCallback | None = None,
    extra_args: dict[str, Any] | None = None,
    device: str | None = None,
) -> TrainResult:
    """Train from ``model_source`` (a .pt to fine-tune or a model YAML) on ``data_yaml``, on
    ``device`` (a torch device; default ``VISIONLOOP_DEVICE`` resolved)."""
    configure_ultralytics(run_dir.parent / ".ultralytics")  # before the import reads the env
    from ultralytics import YOLO

    model = YOLO(model_source)
    epoch_log: list[dict[str, Any]] = []
    model.add_callback("on_fit_epoch_end", _epoch_recorder(epoch_log, on_epoch))
    args = dict(
        data=str(data_yaml),
        epochs=epochs,
        imgsz=imgsz,
        batch=batch,
        device=device or settings_device(),
        workers=0,
        seed=seed,
        deterministic=True,
        project=str(run_dir.parent),
        name=run_dir.name,
        exist_ok=True,
        plots=False,
        verbose=False,
        amp=False,
    )
    args.update(extra_args or {})
    model.train(**args)
    return _result(model.trainer, epoch_log)


def _epoch_recorder(
    epoch_log: list[dict[str, Any]], on_epoch: EpochCallback | None
) -> Callable[[Any], None]:
    """ultralytics' end-of-epoch hook: the epoch's losses and metrics appended to
    ``epoch_log`` and passed to ``on_epoch``."""

    def epoch_end(trainer: Any) -> None:
        if trainer.epoch + 1 > trainer.epochs:
            return  # the final validation of best.pt fires this hook once more
        losses = (
            trainer.label_loss_items(trainer.tloss, prefix="train")
            if trainer.tloss is not None
            else {}
        )
        record = {
            "epoch": trainer.epoch + 1,
            "epochs": trainer.epochs,
            **_clean(losses),
            **_clean(trainer.metrics or {}),
        }
        epoch_log.append(record)
        if on_epoch:
            on_epoch(record)

    return epoch_end


def _result(trainer: Any, epoch_log: list[dict[str, Any]]) -> TrainResult:
    save_dir = Path(trainer.save_dir)
    best = save_dir / "weights" / "best.pt"
    last = save_dir / "weights" / "last.pt"
    final = _clean(trainer.metrics or {})
    return TrainResult(best if best.exists() else last, last, save_dir, final, epoch_log)
