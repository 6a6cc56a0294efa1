"""Active-learning efficiency: how many labels uncertainty selection saves over random picks.

    .venv/bin/python -m bench.active_learning [--cycles 4] [--initial 32] [--per-cycle 32]
        [--pool 400] [--test 150] [--epochs 15] [--initial-epochs 60] [--imgsz 160]
        [--strategy margin] [--seed 0] [--json PATH] [--workdir DIR] [--quick]

No servers needed: everything runs in one process on the CPU, in a temporary work dir that
is removed at the end (unless ``--workdir`` names one to keep).

The set-up is the loop the platform runs, with the generator standing in for the reviewer:

- a pool of ``--pool`` synthetic defect images (``visionloop.synthetic``) with exact ground
  truth, a mixture of easy (undrifted) images and hard ones (``--hard-fraction`` of them,
  under one of four acquisition drifts: dark and grainy, blurred, noisy, colour cast);
- a fixed held-out test set of ``--test`` images from another seed, same mixture, used for
  every evaluation (``training.evaluation.evaluate_weights``: ultralytics' validator);
- an initial labelled set of ``--initial`` pool images (seeded, the same for both
  strategies) on which a yolov8n is trained from ``yolov8n.yaml`` (``--initial-epochs``,
  ``training.trainer.train_yolo`` with ``nbs=batch`` so tiny sets take real steps).

Then, for each strategy in the same run, starting from that same model, ``--cycles`` times:
pick ``--per-cycle`` unlabelled pool images, add their ground truth, fine-tune the previous
cycle's weights on all labels so far (``--epochs``), and evaluate mAP50 and mAP50-95.

- **uncertainty**: the current model predicts the unlabelled pool (boxes from ``--conf``,
  the ingest flow's threshold by default) and ``labeling.selection.select`` ranks the images
  with the platform's own strategy (``--strategy``, no audit share); if the strategy flags
  fewer images than the budget (confident images are never flagged), the rest is filled
  with a seeded random draw of the others.
- **random**: a seeded uniform draw from the unlabelled pool.

Reported: both learning curves (labels -> mAP50-95 and mAP50), wall and CPU time per
strategy, and "labels saved": the labels uncertainty needs to reach random's final mAP
(linear interpolation on the uncertainty curve) against random's final label count, also
as a percentage. When the uncertainty curve never reaches that mAP, it says so.

Both strategies fine-tune with the same epochs, seed and hyper-parameters, so the only
difference between the curves is which images got labelled. With a handful of tiny
trainings the curves are noisy: read a small difference as no difference.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from labeling.selection import STRATEGIES, Candidate, SelectionPolicy, select
from visionloop.synthetic import DriftParams

STRATEGY_NAMES: tuple[str, ...] = ("uncertainty", "random")
METRICS: tuple[str, ...] = ("mAP50-95", "mAP50")
EASY = "clean"


def hard_drifts(size: int) -> dict[str, DriftParams]:
    """The acquisition shifts that make an image hard; blur scales with the image side."""
    return {
        "dark": DriftParams(brightness=-0.35, noise=0.04),
        "blur": DriftParams(blur=3.0 * size / 160),
        "noise": DriftParams(noise=0.25),
        "cast": DriftParams(color_cast=(1.6, 1.0, 0.45)),
    }


# --- pure logic: the pool, the picks, the savings ------------------------------------------


def mixture(n: int, hard_fraction: float, kinds: Sequence[str], seed: int) -> list[str]:
    """The condition of each of ``n`` images: ``round(n * hard_fraction)`` of them hard,
    cycling through ``kinds``, the rest ``EASY``, shuffled by ``seed``."""
    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError(f"hard_fraction must be within [0, 1], got {hard_fraction}")
    if hard_fraction > 0 and not kinds:
        raise ValueError("hard images need at least one drift kind")
    hard = round(n * hard_fraction)
    labels = [kinds[i % len(kinds)] for i in range(hard)] + [EASY] * (n - hard)
    order = np.random.default_rng(seed).permutation(n)
    return [labels[i] for i in order]


class LabelPool:
    """Which pool images are labelled, in the order they got their labels."""

    def __init__(self, size: int, labelled: Iterable[int] = ()) -> None:
        if size < 0:
            raise ValueError(f"pool size must be >= 0, got {size}")
        self.size = size
        self._order: list[int] = []
        self._set: set[int] = set()
        self.add(labelled)

    @property
    def labelled(self) -> list[int]:
        return list(self._order)

    def unlabelled(self) -> list[int]:
        return [i for i in range(self.size) if i not in self._set]

    def __len__(self) -> int:
        return len(self._order)

    def add(self, ids: Iterable[int]) -> None:
        """Label ``ids``; an unknown, repeated or already labelled id is an error."""
        ids = list(ids)
        if len(set(ids)) != len(ids):
            raise ValueError(f"duplicate ids in {ids}")
        for i in ids:
            if not 0 <= i < self.size:
                raise ValueError(f"id {i} is not in a pool of {self.size}")
            if i in self._set:
                raise ValueError(f"id {i} is already labelled")
        self._order.extend(ids)
        self._set.update(ids)

    def copy(self) -> LabelPool:
        return LabelPool(self.size, self._order)


def random_pick(ids: Sequence[int], k: int, seed: int) -> list[int]:
    """``k`` of ``ids`` drawn uniformly without replacement, fixed by ``seed`` (all of them
    when there are fewer). The result does not depend on the order ``ids`` come in."""
    pool = sorted(ids)
    k = min(max(k, 0), len(pool))
    picked = np.random.default_rng(seed).choice(len(pool), size=k, replace=False)
    return [pool[int(i)] for i in picked]


def pick_uncertain(
    candidates: Sequence[Candidate], policy: SelectionPolicy, k: int, seed: int
) -> list[int]:
    """The ``k`` candidates the platform's selection ranks most uncertain.

    ``labeling.selection.select`` (``policy``'s strategy and band, no audit share, budget
    ``k``) decides and orders, most uncertain first, ties by content hash. Images it does not
    flag (confident ones, or outside the band) fill any remaining places at random (seeded).
    """
    k = min(max(k, 0), len(candidates))
    policy = policy.model_copy(update={"budget": k, "audit_rate": 0.0})
    chosen = [s.image_id for s in select(candidates, policy)]
    taken = set(chosen)
    rest = [c.image_id for c in candidates if c.image_id not in taken]
    return chosen + random_pick(rest, k - len(chosen), seed)


@dataclass(frozen=True)
class Savings:
    """Labels uncertainty selection needs for random selection's final mAP."""

    metric: str
    target: float
    """Random selection's final value of ``metric``."""
    random_labels: int
    """Random selection's final label count."""
    uncertainty_labels: float | None
    """Interpolated labels where the uncertainty curve first reaches ``target``; None: never."""
    baseline: float | None = None
    """Both curves' first value (the shared initial model), when they share one."""

    @property
    def random_improved(self) -> bool:
        """Random selection ended above the shared start: without that, "reaching" its final
        value is free and the saving says nothing."""
        return self.baseline is None or self.target > self.baseline

    @property
    def reached(self) -> bool:
        return self.uncertainty_labels is not None

    @property
    def saved(self) -> float | None:
        if self.uncertainty_labels is None:
            return None
        return self.random_labels - self.uncertainty_labels

    @property
    def saved_pct(self) -> float | None:
        if self.saved is None or self.random_labels <= 0:
            return None
        return 100.0 * self.saved / self.random_labels

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "reached": self.reached,
            "random_improved": self.random_improved,
            "saved": self.saved,
            "saved_pct": self.saved_pct,
        }


def labels_to_reach(curve: Sequence[tuple[float, float]], target: float) -> float | None:
    """The label count at which ``curve`` (``(labels, value)`` points, labels ascending)
    first reaches ``target``, linearly interpolated between points; None if it never does."""
    if not curve:
        return None
    labels = [p[0] for p in curve]
    if any(b < a for a, b in zip(labels, labels[1:])):
        raise ValueError(f"labels must ascend, got {labels}")
    (l0, v0) = curve[0]
    if v0 >= target:
        return float(l0)
    for (l_a, v_a), (l_b, v_b) in zip(curve, curve[1:]):
        if v_a < target <= v_b:
            return l_a + (target - v_a) / (v_b - v_a) * (l_b - l_a)
    return None


def labels_saved(
    uncertainty: Sequence[tuple[float, float]], random: Sequence[tuple[float, float]], metric: str
) -> Savings:
    """How many fewer labels uncertainty selection needs for random's final ``metric``."""
    if not random:
        raise ValueError("the random curve is empty")
    random_labels, target = random[-1]
    shared = uncertainty and uncertainty[0] == random[0]
    return Savings(
        metric,
        target,
        int(random_labels),
        labels_to_reach(uncertainty, target),
        baseline=random[0][1] if shared else None,
    )


# --- the experiment ---------------------------------------------------------------------


@dataclass
class Point:
    labels: int
    metrics: dict[str, float]
    hard_labelled: int
    """How many of the labelled images are hard (drifted): what selection went for."""
    train_s: float = 0.0
    select_s: float = 0.0
    eval_s: float = 0.0


@dataclass
class StrategyRun:
    name: str
    points: list[Point] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0

    def curve(self, metric: str) -> list[tuple[float, float]]:
        return [(p.labels, p.metrics[metric]) for p in self.points]


class _Clock:
    """Wall and CPU seconds (all threads of this process) of a block."""

    def __enter__(self) -> _Clock:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc: object) -> None:
        self.wall = time.perf_counter() - self.wall
        self.cpu = time.process_time() - self.cpu


@dataclass
class Config:
    cycles: int
    initial: int
    per_cycle: int
    pool: int
    test: int
    epochs: int
    initial_epochs: int
    imgsz: int
    batch: int
    seed: int
    hard_fraction: float
    strategy: str
    conf: float


def _write_images(
    root: Path, n: int, seed: int, conditions: Sequence[str], size: int
) -> list[Path]:
    """Images and YOLO labels ``root/images/i_*.jpg``, ``root/labels/i_*.txt``."""
    from visionloop.synthetic import encode_jpeg, format_yolo_labels, generate_sample

    drifts = hard_drifts(size)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    paths = []
    for index in range(n):
        condition = conditions[index]
        sample = generate_sample(
            index, seed=seed, size=size, drift=None if condition == EASY else drifts[condition]
        )
        image = root / "images" / f"i_{index:05d}.jpg"
        image.write_bytes(encode_jpeg(sample.image))
        (root / "labels" / f"i_{index:05d}.txt").write_text(format_yolo_labels(sample.boxes))
        paths.append(image)
    return paths


def _data_yaml(run_dir: Path, train: Sequence[Path], val: Sequence[Path]) -> Path:
    """A data.yaml over image lists (labels next door, as ultralytics expects)."""
    import yaml

    from visionloop.synthetic import DEFAULT_CLASS_NAMES

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train.txt").write_text("".join(f"{p}\n" for p in train))
    (run_dir / "val.txt").write_text("".join(f"{p}\n" for p in val))
    spec = {
        "path": str(run_dir),
        "train": str(run_dir / "train.txt"),
        "val": str(run_dir / "val.txt"),
        "names": dict(enumerate(DEFAULT_CLASS_NAMES)),
    }
    data = run_dir / "data.yaml"
    data.write_text(yaml.safe_dump(spec, sort_keys=False))
    return data


class Experiment:
    def __init__(self, config: Config, workdir: Path) -> None:
        from training.trainer import configure_ultralytics

        self.c = config
        self.work = workdir
        configure_ultralytics(workdir / "runs" / ".ultralytics")  # before ultralytics loads
        kinds = list(hard_drifts(config.imgsz))
        self.pool_conditions = mixture(config.pool, config.hard_fraction, kinds, config.seed)
        test_seed = config.seed + 1000  # another stream: no test image is a pool image
        test_conditions = mixture(config.test, config.hard_fraction, kinds, test_seed)
        self.pool_images = _write_images(
            workdir / "pool", config.pool, config.seed, self.pool_conditions, config.imgsz
        )
        test_images = _write_images(
            workdir / "test", config.test, test_seed, test_conditions, config.imgsz
        )
        self.test_yaml = _data_yaml(workdir / "test", test_images, test_images)
        self.policy = SelectionPolicy(
            strategy=config.strategy, budget=config.per_cycle, seed=config.seed
        )

    def _train(
        self, name: str, labelled: Sequence[int], source: str, epochs: int
    ) -> tuple[Path, float]:
        from training.trainer import train_yolo

        run_dir = self.work / "runs" / name
        train = [self.pool_images[i] for i in labelled]
        # Checkpoint choice is not the test set's business: ultralytics' own (final-epoch
        # only) validation runs on a slice of the labelled images, and last.pt is kept.
        data = _data_yaml(run_dir / "data", train, train[:16])
        with _Clock() as clock:
            result = train_yolo(
                data,
                model_source=source,
                run_dir=run_dir,
                epochs=epochs,
                imgsz=self.c.imgsz,
                batch=self.c.batch,
                seed=self.c.seed,
                extra_args={"nbs": self.c.batch, "val": False},
            )
        return result.last_weights, clock.wall

    def _evaluate(self, name: str, weights: Path) -> tuple[dict[str, float], float]:
        from training.evaluation import evaluate_weights

        with _Clock() as clock:
            result = evaluate_weights(
                weights,
                self.test_yaml,
                imgsz=self.c.imgsz,
                batch=self.c.batch,
                run_dir=self.work / "runs" / f"{name}-eval",
            )
        return {m: result.metrics[m] for m in METRICS}, clock.wall

    def _candidates(self, weights: Path, ids: Sequence[int]) -> list[Candidate]:
        """The current model's box confidences on the unlabelled images ``ids``."""
        from ultralytics import YOLO

        model = YOLO(str(weights), task="detect")
        candidates = []
        for start in range(0, len(ids), 32):
            chunk = ids[start : start + 32]
            results = model.predict(
                [str(self.pool_images[i]) for i in chunk],
                imgsz=self.c.imgsz,
                conf=self.c.conf,
                device="cpu",
                verbose=False,
            )
            for i, result in zip(chunk, results):
                confs = [] if result.boxes is None else result.boxes.conf.cpu().numpy().tolist()
                candidates.append(Candidate(i, self.pool_images[i].name, [float(c) for c in confs]))
        return candidates

    def _hard(self, pool: LabelPool) -> int:
        return sum(self.pool_conditions[i] != EASY for i in pool.labelled)

    def initial(self) -> tuple[LabelPool, Path, Point]:
        pool = LabelPool(self.c.pool, random_pick(range(self.c.pool), self.c.initial, self.c.seed))
        weights, train_s = self._train(
            "initial", pool.labelled, "yolov8n.yaml", self.c.initial_epochs
        )
        metrics, eval_s = self._evaluate("initial", weights)
        return pool, weights, Point(len(pool), metrics, self._hard(pool), train_s, 0.0, eval_s)

    def run_strategy(
        self, name: str, pool: LabelPool, weights: Path, start: Point, log: Callable[[str], None]
    ) -> StrategyRun:
        run = StrategyRun(name, [start])
        pool = pool.copy()
        with _Clock() as clock:
            for cycle in range(1, self.c.cycles + 1):
                unlabelled = pool.unlabelled()
                if not unlabelled:
                    log(f"  {name}: the pool is all labelled after cycle {cycle - 1}")
                    break
                started = time.perf_counter()
                if name == "uncertainty":
                    candidates = self._candidates(weights, unlabelled)
                    picked = pick_uncertain(
                        candidates, self.policy, self.c.per_cycle, self.c.seed + cycle
                    )
                else:
                    picked = random_pick(unlabelled, self.c.per_cycle, self.c.seed + cycle)
                select_s = time.perf_counter() - started
                pool.add(picked)
                weights, train_s = self._train(
                    f"{name}-{cycle}", pool.labelled, str(weights), self.c.epochs
                )
                metrics, eval_s = self._evaluate(f"{name}-{cycle}", weights)
                point = Point(len(pool), metrics, self._hard(pool), train_s, select_s, eval_s)
                run.points.append(point)
                log(
                    f"  {name} cycle {cycle}: {point.labels} labels ({point.hard_labelled} hard), "
                    f"mAP50-95 {metrics['mAP50-95']:.3f}, mAP50 {metrics['mAP50']:.3f} "
                    f"(select {select_s:.1f} s, train {train_s:.1f} s, eval {eval_s:.1f} s)"
                )
        run.wall_s, run.cpu_s = clock.wall, clock.cpu
        return run


def run(config: Config, workdir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    started = time.perf_counter()
    experiment = Experiment(config, workdir)
    log(
        f"pool {config.pool} images, test {config.test} ({config.hard_fraction:.0%} hard in both), "
        f"written in {time.perf_counter() - started:.1f} s"
    )
    with _Clock() as clock:
        pool, weights, start = experiment.initial()
    log(
        f"initial model: {start.labels} labels ({start.hard_labelled} hard), "
        f"{config.initial_epochs} epochs from yolov8n.yaml, "
        f"mAP50-95 {start.metrics['mAP50-95']:.3f}, mAP50 {start.metrics['mAP50']:.3f} "
        f"({clock.wall:.1f} s)"
    )
    runs = {
        name: experiment.run_strategy(name, pool, weights, start, log) for name in STRATEGY_NAMES
    }
    savings = {
        metric: labels_saved(
            runs["uncertainty"].curve(metric), runs["random"].curve(metric), metric
        )
        for metric in METRICS
    }
    return {
        "config": asdict(config),
        "initial_s": {"wall": clock.wall, "cpu": clock.cpu},
        "strategies": {
            name: {"wall_s": r.wall_s, "cpu_s": r.cpu_s, "points": [asdict(p) for p in r.points]}
            for name, r in runs.items()
        },
        "savings": {metric: s.as_dict() for metric, s in savings.items()},
        "total_s": time.perf_counter() - started,
        "_runs": runs,
        "_savings": savings,
    }


# --- output -----------------------------------------------------------------------------


def _describe(s: Savings) -> str:
    if not s.random_improved:
        return (
            f"{s.metric}: random selection ended at {s.target:.3f}, no better than the shared "
            f"initial model ({s.baseline:.3f}): nothing to save, no comparison (train longer)"
        )
    if not s.reached:
        return (
            f"{s.metric}: uncertainty never reaches random's final {s.target:.3f} "
            f"(at {s.random_labels} labels): no labels saved"
        )
    assert s.uncertainty_labels is not None and s.saved is not None and s.saved_pct is not None
    verb = "saves" if s.saved >= 0 else "costs"
    return (
        f"{s.metric}: uncertainty reaches random's final {s.target:.3f} at "
        f"{s.uncertainty_labels:.1f} labels vs random's {s.random_labels}: {verb} "
        f"{abs(s.saved):.1f} labels ({abs(s.saved_pct):.1f}% of random's)"
    )


def print_results(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    runs: dict[str, StrategyRun] = results["_runs"]
    uncertainty, rand = runs["uncertainty"], runs["random"]
    table = Table(title="labels -> held-out mAP (same initial model, same test set)")
    table.add_column("cycle", justify="right")
    table.add_column("labels", justify="right")
    for name in STRATEGY_NAMES:
        table.add_column(f"{name}\nmAP50-95", justify="right")
        table.add_column(f"{name}\nmAP50", justify="right")
        table.add_column(f"{name}\nhard", justify="right")
    for cycle, (u, r) in enumerate(zip(uncertainty.points, rand.points)):
        labels = str(u.labels) if u.labels == r.labels else f"{u.labels}/{r.labels}"
        cells = []
        for p in (u, r):
            cells += [f"{p.metrics[m]:.3f}" for m in METRICS] + [str(p.hard_labelled)]
        table.add_row(str(cycle), labels, *cells)
    console = Console(width=120)
    console.print(table)
    console.print("(hard: labelled images that are drifted; cycle 0 is the shared initial model)")
    times = Table(title="time per strategy (selection + fine-tuning + evaluation, all cycles)")
    for column in ("strategy", "wall s", "CPU s", "select s", "train s", "eval s"):
        times.add_column(column, justify="right" if column != "strategy" else "left")
    for name, r in runs.items():
        cycles = r.points[1:]
        times.add_row(
            name,
            f"{r.wall_s:.1f}",
            f"{r.cpu_s:.1f}",
            f"{sum(p.select_s for p in cycles):.1f}",
            f"{sum(p.train_s for p in cycles):.1f}",
            f"{sum(p.eval_s for p in cycles):.1f}",
        )
    console.print(times)
    initial = results["initial_s"]
    console.print(
        f"initial model (shared): {initial['wall']:.1f} s wall, {initial['cpu']:.1f} s CPU; "
        f"whole benchmark {results['total_s']:.1f} s wall"
    )
    print("labels saved by uncertainty selection (linear interpolation on its curve):")
    for savings in results["_savings"].values():
        print(f"  {_describe(savings)}")


# --- command line -----------------------------------------------------------------------

QUICK = {
    # Batch 8 gives the 16 initial labels two optimizer steps an epoch: a yolov8n from scratch
    # needs about a hundred steps before it finds anything at all.
    "cycles": 2,
    "initial": 16,
    "per_cycle": 8,
    "pool": 64,
    "test": 32,
    "epochs": 8,
    "initial_epochs": 50,
    "batch": 8,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cycles", type=int, default=4, help="selection + retrain rounds")
    parser.add_argument("--initial", type=int, default=32, help="labels of the initial model")
    parser.add_argument("--per-cycle", type=int, default=32, help="labels added per cycle")
    parser.add_argument("--pool", type=int, default=400, help="images in the labelled pool")
    parser.add_argument("--test", type=int, default=150, help="images in the held-out test set")
    parser.add_argument("--epochs", type=int, default=15, help="fine-tuning epochs per cycle")
    parser.add_argument(
        "--initial-epochs", type=int, default=60, help="epochs of the initial model"
    )
    parser.add_argument("--imgsz", type=int, default=160, help="image side (generated and trained)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--hard-fraction", type=float, default=0.3, help="share of drifted images")
    parser.add_argument(
        "--strategy",
        default="margin",
        choices=sorted(STRATEGIES),
        help="labeling.selection strategy that ranks the pool",
    )
    parser.add_argument(
        "--conf", type=float, default=None, help="box threshold for scoring (default: ingest's)"
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep everything here (default: temp, removed)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (about 2 minutes)")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    if args.conf is None:
        from serving.predictor import PREDICT_CONF

        args.conf = PREDICT_CONF
    if args.initial < 1 or args.per_cycle < 1 or args.cycles < 1:
        parser.error("--initial, --per-cycle and --cycles must be >= 1")
    if args.initial >= args.pool:
        parser.error("--initial must be smaller than --pool")
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    config = Config(
        cycles=args.cycles,
        initial=args.initial,
        per_cycle=args.per_cycle,
        pool=args.pool,
        test=args.test,
        epochs=args.epochs,
        initial_epochs=args.initial_epochs,
        imgsz=args.imgsz,
        batch=args.batch,
        seed=args.seed,
        hard_fraction=args.hard_fraction,
        strategy=args.strategy,
        conf=args.conf,
    )
    keep = args.workdir is not None
    workdir = args.workdir.resolve() if keep else Path(tempfile.mkdtemp(prefix="visionloop-al-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"active learning: {config.cycles} cycles x {config.per_cycle} labels "
        f"from {config.initial}, "
        f"strategy {config.strategy} (conf {config.conf}) vs random, imgsz {config.imgsz}, "
        f"epochs {config.initial_epochs} + {config.epochs}/cycle, seed {config.seed}"
    )
    try:
        results = run(config, workdir)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print_results(results)
    if args.json:
        public = {k: v for k, v in results.items() if not k.startswith("_")}
        args.json.write_text(json.dumps(public, indent=2))
        print(f"results written to {args.json}")


if __name__ == "__main__":
    main()
