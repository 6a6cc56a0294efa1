"""Retrain benchmark: the retrain flow's wall time against plain ultralytics train + val.

    .venv/bin/python -m bench.retrain [--images 96] [--epochs 20] [--batch 16] [--rounds 1]

Self-contained: starts the whole stack on free ports in a temporary data dir (as the tests
do, schedules paused), stores synthetic reviewed labels, and stops everything at the end.
``--reuse-stack`` runs against the stack the environment points at instead.

Each round compares, on the same snapshot, epochs, image size, batch and starting weights:

- the retrain flow as a whole: export (new labels arrive before every round, so a new
  snapshot is written), snapshot download, training with MLflow tracking and events,
  registration, champion and challenger evaluation on the held-out set, promotion, notify;
- plain ultralytics: ``YOLO(<the champion it started from>).train(...)`` on that snapshot,
  then ``val`` of the result on the same held-out set.

The target is a wall-time ratio of 1.15 or less: the platform's bookkeeping must stay small
next to the training it orchestrates. CPU time is printed beside it because on a shared
machine wall time also measures the neighbours. Stack start-up and the untimed warm-up (a
1-epoch champion, which also loads torch) are not counted.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from visionloop.events import EventKind

if TYPE_CHECKING:
    from visionloop.settings import Settings

TARGET_RATIO = 1.15


def _start_stack(data_dir: Path):
    from cli.stack import Stack, free_port
    from visionloop.settings import get_settings, load_settings

    for key in list(os.environ):
        if key.startswith("VISIONLOOP_"):
            del os.environ[key]
    os.environ.update(
        {
            "VISIONLOOP_DATA_DIR": str(data_dir),
            # Nothing scheduled (ingest, drift, check-and-retrain) may run during the timing.
            "VISIONLOOP_SCHEDULES_ENABLED": "false",
            **{
                f"VISIONLOOP_{name}_PORT": str(free_port())
                for name in ("S3", "PREFECT", "MLFLOW", "LABEL_STUDIO", "API")
            },
        }
    )
    stack = Stack(load_settings())
    stack.up()
    get_settings.cache_clear()
    os.environ.update(stack.platform_env())
    return stack


class _Clock:
    """Wall and CPU seconds of a block; CPU time (all threads of this process) is much less
    sensitive than wall time to other work on a shared machine."""

    def __enter__(self) -> _Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


def _plain(
    data_yaml: Path,
    holdout_yaml: Path,
    weights: Path,
    *,
    epochs: int,
    imgsz: int,
    batch: int,
    seed: int,
    work: Path,
) -> tuple[_Clock, _Clock]:
    """Plain ultralytics with the arguments training.trainer.train_yolo uses."""
    from ultralytics import YOLO

    with _Clock() as train:
        model = YOLO(str(weights))
        model.train(
            data=str(data_yaml),
            epochs=epochs,
            imgsz=imgsz,
            batch=batch,
            device="cpu",
            workers=0,
            seed=seed,
            deterministic=True,
            project=str(work),
            name="plain",
            exist_ok=True,
            plots=False,
            verbose=False,
            amp=False,
        )
    with _Clock() as val:
        YOLO(str(Path(model.trainer.save_dir) / "weights" / "best.pt")).val(
            data=str(holdout_yaml),
            split="val",
            imgsz=imgsz,
            batch=batch,
            device="cpu",
            workers=0,
            plots=False,
            verbose=False,
            project=str(work),
            name="plain-val",
            exist_ok=True,
        )
    return train, val


def _stage_times(run_id: int, started: float, finished: float) -> dict[str, float]:
    """Seconds spent in each retrain stage, from the flow's own stage events."""
    from sqlmodel import select

    from visionloop.db import session_scope
    from visionloop.models import ActivityEvent

    with session_scope() as session:
        events = [
            e
            for e in session.exec(
                select(ActivityEvent)
                .where(ActivityEvent.kind == EventKind.RETRAIN_STAGE.value)
                .order_by(ActivityEvent.id)
            )
            if e.payload.get("retraining_run_id") == run_id
        ]
    marks = [(e.payload["stage"], e.created_at.timestamp()) for e in events] + [("end", finished)]
    times = {"start": round(marks[0][1] - started, 1)}
    times |= {stage: round(nxt - at, 1) for (stage, at), (_, nxt) in zip(marks, marks[1:])}
    return times


def _round(settings: Settings, epochs: int, batch: int) -> dict[str, Any]:
    """One retrain, then plain ultralytics on the snapshot and starting weights it used."""
    from flows.retrain import retrain_flow
    from training.retrain_launcher import RetrainParams
    from training.snapshots import download_snapshot, get_snapshot
    from visionloop.db import session_scope
    from visionloop.registry import CHAMPION, download_weights, get_alias

    base = get_alias(settings, CHAMPION)
    started = time.time()
    with _Clock() as retrain:
        summary = retrain_flow(
            RetrainParams(trigger="manual", reason="benchmark", epochs=epochs, batch=batch)
        )
    stages = _stage_times(summary.retraining_run_id, started, time.time())

    with session_scope() as session:
        snapshot = get_snapshot(session, summary.snapshot_id)
        holdout = get_snapshot(session, summary.metrics.holdout_snapshot_id)
    data_yaml = download_snapshot(settings, snapshot)
    holdout_yaml = download_snapshot(settings, holdout)
    for cache in [*data_yaml.parent.rglob("*.cache"), *holdout_yaml.parent.rglob("*.cache")]:
        cache.unlink()  # the retrain's label-scan caches would give plain a head start
    weights = download_weights(settings, base, settings.data_dir / "models")
    work = Path(tempfile.mkdtemp(prefix="plain-", dir=settings.data_dir))
    try:
        train, val = _plain(
            data_yaml,
            holdout_yaml,
            weights,
            epochs=epochs,
            imgsz=settings.image_size,
            batch=batch,
            seed=settings.seed,
            work=work,
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "images": {"train": snapshot.num_train, "val": snapshot.num_val, "test": snapshot.num_test},
        "retrain": retrain,
        "stages": stages,
        "plain_train": train,
        "plain_val": val,
        "wall_ratio": retrain.wall / (train.wall + val.wall),
        "cpu_ratio": retrain.cpu / (train.cpu + val.cpu),
    }


def run(images: int, epochs: int, batch: int | None, rounds: int) -> list[dict[str, Any]]:
    from flows.export import export_flow
    from flows.train import train_flow
    from training.promotion import promote
    from training.trainer import configure_ultralytics
    from visionloop.db import session_scope
    from visionloop.settings import get_settings
    from visionloop.synthetic_labels import add_reviewed_samples

    settings = get_settings()
    batch = batch or settings.train_batch
    configure_ultralytics(settings.data_dir / "training" / ".ultralytics")

    # Untimed warm-up (torch, ultralytics): a 1-epoch champion on the first half of the labels.
    with session_scope() as session:
        add_reviewed_samples(session, settings, images // 2, seed=101)
    first = export_flow()
    champion = train_flow(snapshot_id=first.snapshot_id, epochs=1, batch=batch, from_scratch=True)
    promote(settings, champion.version, reason="benchmark baseline")

    results = []
    added = images // 2
    for index in range(rounds):
        # New labels before every retrain, so each one exports (and uploads) a new snapshot.
        more = images - images // 2 if index == 0 else max(1, images // 8)
        with session_scope() as session:
            add_reviewed_samples(session, settings, more, seed=101, start=added)
        added += more
        results.append(_round(settings, epochs, batch) | {"epochs": epochs, "batch": batch})
    return results


def _print(results: list[dict[str, Any]], imgsz: int) -> None:
    for index, result in enumerate(results, start=1):
        split, retrain = result["images"], result["retrain"]
        train, val = result["plain_train"], result["plain_val"]
        print(
            f"round {index}: {sum(split.values())} reviewed images ({split['train']} train / "
            f"{split['val']} val / {split['test']} held out), {result['epochs']} epochs, "
            f"imgsz {imgsz}, batch {result['batch']}"
        )
        print(
            f"  retrain flow (export, train, evaluate, promote, notify): {retrain.wall:7.1f} s wall"
            f" {retrain.cpu:7.1f} s CPU"
        )
        print(
            "      "
            + " | ".join(f"{stage} {secs:.1f} s" for stage, secs in result["stages"].items())
        )
        print(
            f"  plain ultralytics train + val:                           "
            f"{train.wall + val.wall:7.1f} s wall {train.cpu + val.cpu:7.1f} s CPU "
            f"(train {train.wall:.1f} s, val {val.wall:.1f} s wall)"
        )
        print(f"  ratio: {result['wall_ratio']:.3f}x wall, {result['cpu_ratio']:.3f}x CPU")
    wall = statistics.median(r["wall_ratio"] for r in results)
    cpu = statistics.median(r["cpu_ratio"] for r in results)
    verdict = "within" if wall <= TARGET_RATIO else "OVER"
    print(
        f"retrain / plain, median of {len(results)}: {wall:.3f}x wall ({verdict} the "
        f"{TARGET_RATIO:.2f}x target), {cpu:.3f}x CPU"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=96, help="reviewed images in the snapshot")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--batch", type=int, default=None, help="default: VISIONLOOP_TRAIN_BATCH")
    parser.add_argument("--rounds", type=int, default=1, help="retrain + plain pairs (median)")
    parser.add_argument(
        "--reuse-stack", action="store_true", help="use the running stack the env points at"
    )
    args = parser.parse_args()

    data_dir = None if args.reuse_stack else Path(tempfile.mkdtemp(prefix="visionloop-bench-"))
    stack = _start_stack(data_dir) if data_dir else None
    try:
        results = run(args.images, args.epochs, args.batch, args.rounds)
        from visionloop.settings import get_settings

        _print(results, get_settings().image_size)
    finally:
        if stack is not None:
            stack.down()
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
