"""Active-learning efficiency: how many labels each selection strategy saves over random picks.

    .venv/bin/python -m bench.active_learning [--seeds 0,1,2] [--strategies hybrid,margin]
        [--cycles 4] [--initial 24] [--per-cycle 16] [--scenes 100] [--frames 5]
        [--test-scenes 100] [--epochs 5] [--initial-epochs 60] [--imgsz 160]
        [--control-rate R] [--policy KEY=VALUE ...] [--json PATH] [--workdir DIR] [--quick]

No servers needed: everything runs in one process on the CPU, in a temporary work dir that
is removed at the end (unless ``--workdir`` names one to keep). ``--quick`` is a smoke run
of every strategy over three seeds with tiny settings (the numbers mean nothing; it checks
the code paths). The default run with ``--strategies hybrid`` took 13 minutes wall on 2
idle cores (per seed about 90 s for the initial model, 70 s for random's cycles, 95 s for
hybrid's); every further strategy adds about hybrid's share, so all five registered
strategies take about 32 minutes.

The task: a line camera's stream (``visionloop.synthetic.generate_frame``). Each *scene* is
one part seen ``--frames`` times (small shift, exposure and sensor-noise jitter between
frames: near-duplicates, one question asked several times), with several small defects of
four classes, one of them rare. A scene is shot under one condition: clean, or one of five
acquisition drifts (``conditions``). Three of them (very dark, washed-out low contrast,
strong blur) leave a champion trained on clean images *blind*: it shows no box at all. The
champion predates the drift: its ``--initial`` labels are clean pool frames.

- the pool: ``--scenes`` scenes x ``--frames`` frames, ``--hard-fraction`` of the scenes
  drifted (cycling through the drifts), the rest clean;
- the test set: ``--test-scenes`` *other* scenes (scene indices after the pool's, so no
  frame of a pool scene), one frame each, the same condition mixture; fixed for every
  strategy and cycle of a seed; only ever used to score (``training.evaluation``);
- per seed (``--seeds``): its own pool, test set, initial labels and training seed; the
  initial yolov8n is trained from ``yolov8n.yaml`` once and shared by all strategies.

Then for each strategy, starting from that model, ``--cycles`` times: pick ``--per-cycle``
unlabelled pool frames, add their ground truth, fine-tune the previous cycle's weights on
all labels so far (``--epochs``), evaluate mAP50-95 and mAP50 on the test set.

- **random** (the baseline, unchanged): ``random_pick``, a seeded uniform draw.
- **every registered strategy** (``labeling.selection.STRATEGIES``): the platform's own
  selection path. The current model predicts the whole pool once at the candidate
  threshold (``visionloop.settings.CANDIDATE_CONF``) with the embeddings of the same forward
  pass (``serving.embedding.predict_with_features``); boxes at or above the display threshold
  (``serving.predictor.PREDICT_CONF``) are shown, the rest are ``below``; the context has
  class weights from the current model's per-class AP on its *labelled* images (never the
  test set), the labelled images' embeddings as reference, and a flip check that runs the
  mirrored forward pass on the shortlist. ``labeling.selection.select`` decides (policy:
  the strategy, the production control share unless ``--control-rate``, no audit share,
  ``--policy`` tunables); if it returns fewer than the budget, a seeded random draw of the
  rest fills the places.

Reported: per seed and strategy the curve (labels -> mAP50-95, mAP50), the median and spread
(max - min) over seeds per cycle, the labels each strategy needs to reach random's final
mAP50-95 of the same seed (linear interpolation on its curve; the initial labels count for
both), their median and spread and the median as a share of random's labels, the share of
drifted (hard) and of blind frames each strategy picked (blind: a frame with defects on which
the initial champion shows no box), repeated picks of an already labelled scene, and wall/CPU
time. The target check: median labels <= 60% of random's, and at no cycle is the strategy's
median mAP50-95 below random's by more than the seeds' spread (the larger of the two ranges).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from labeling.selection import STRATEGIES, Candidate, SelectionContext, SelectionPolicy, select
from visionloop.synthetic import DriftParams, FrameJitter, SceneParams

RANDOM = "random"
METRICS: tuple[str, ...] = ("mAP50-95", "mAP50")
PRIMARY = "mAP50-95"
EASY = "clean"
TARGET_SHARE = 0.60
"""The goal: a strategy reaches random's final mAP50-95 with at most this share of its labels."""
CLASS_NAMES: tuple[str, ...] = ("scratch", "dent", "stain", "ring")
CLASS_PROBS: tuple[float, ...] = (0.34, 0.30, 0.28, 0.08)
"""Per defect: "ring" is rare, and mAP is a class mean, so the rare class counts as much."""
MAX_BELOW = 32


def conditions(size: int) -> dict[str, DriftParams]:
    """The acquisition drifts a scene may be shot under; blur scales with the image side.
    The first three are meant to blind a champion trained on clean frames (measured, not
    assumed: see ``blind``)."""
    return {
        "dark": DriftParams(brightness=-0.52, noise=0.03),
        "low_contrast": DriftParams(contrast=0.22, brightness=0.18),
        "blur": DriftParams(blur=3.2 * size / 160),
        "noise": DriftParams(noise=0.25),
        "cast": DriftParams(color_cast=(1.6, 1.0, 0.45)),
    }


# --- pure logic: scenes, the pool, the picks ------------------------------------------------


def mixture(n: int, hard_fraction: float, kinds: Sequence[str], seed: int) -> list[str]:
    """The condition of each of ``n`` items: ``round(n * hard_fraction)`` of them hard,
    cycling through ``kinds``, the rest ``EASY``, shuffled by ``seed``."""
    if not 0.0 <= hard_fraction <= 1.0:
        raise ValueError(f"hard_fraction must be within [0, 1], got {hard_fraction}")
    if hard_fraction > 0 and not kinds:
        raise ValueError("hard images need at least one drift kind")
    hard = round(n * hard_fraction)
    labels = [kinds[i % len(kinds)] for i in range(hard)] + [EASY] * (n - hard)
    order = np.random.default_rng(seed).permutation(n)
    return [labels[i] for i in order]


@dataclass(frozen=True)
class Frame:
    """One image of the benchmark: frame ``frame`` of scene ``scene`` under ``condition``."""

    scene: int
    frame: int
    condition: str


def build_frames(
    scenes: int,
    frames: int,
    test_scenes: int,
    hard_fraction: float,
    kinds: Sequence[str],
    seed: int,
) -> tuple[list[Frame], list[Frame]]:
    """The pool (``scenes`` x ``frames``, scene by scene) and the test set (one frame of each
    of ``test_scenes`` further scenes). Scenes are indices of one generator stream: the test
    scenes come after the pool's, so no test image shows a pool scene. A scene's condition is
    shared by its frames; both sets draw from the same mixture."""
    if scenes < 1 or frames < 1 or test_scenes < 0:
        raise ValueError(f"need scenes, frames >= 1 and test_scenes >= 0: {scenes, frames}")
    pool_conditions = mixture(scenes, hard_fraction, kinds, seed)
    test_conditions = mixture(test_scenes, hard_fraction, kinds, seed + 1)
    pool = [Frame(s, f, pool_conditions[s]) for s in range(scenes) for f in range(frames)]
    test = [Frame(scenes + t, 0, test_conditions[t]) for t in range(test_scenes)]
    return pool, test


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


def initial_pick(pool: Sequence[Frame], k: int, seed: int, clean_only: bool = True) -> list[int]:
    """The champion's own labels: ``k`` pool frames drawn at random (``random_pick``), from
    the clean scenes only when ``clean_only`` (the champion was trained before the drift)."""
    ids = [i for i, f in enumerate(pool) if f.condition == EASY or not clean_only]
    if len(ids) < k:
        raise ValueError(f"{k} initial labels asked, {len(ids)} eligible pool frames")
    return random_pick(ids, k, seed)


def pick_uncertain(
    candidates: Sequence[Candidate],
    policy: SelectionPolicy,
    k: int,
    seed: int,
    context: SelectionContext | None = None,
) -> list[int]:
    """The ``k`` candidates the platform's selection picks.

    ``labeling.selection.select`` (``policy`` with budget ``k`` and no audit share) decides
    and orders. Images it does not pick (confident ones, or outside the band) fill any
    remaining places at random (seeded).
    """
    k = min(max(k, 0), len(candidates))
    policy = policy.model_copy(update={"budget": k, "audit_rate": 0.0})
    chosen = [s.image_id for s in select(candidates, policy, context)][:k]
    taken = set(chosen)
    rest = [c.image_id for c in candidates if c.image_id not in taken]
    return chosen + random_pick(rest, k - len(chosen), seed)


def split_boxes(
    classes: Sequence[int],
    confs: Sequence[float],
    xyxyn: Sequence[Sequence[float]],
    display_conf: float,
    max_below: int = MAX_BELOW,
) -> tuple[list[tuple[int, float, float, float, float, float]], list[tuple[int, float]]]:
    """A prediction at the candidate threshold split as production stores it: the shown
    boxes ``(cls, conf, x1, y1, x2, y2)`` (conf >= ``display_conf``) and ``below``,
    ``(cls, conf)`` of the rest, most confident first, at most ``max_below``."""
    shown, below = [], []
    for cls, conf, box in zip(classes, confs, xyxyn):
        if conf >= display_conf:
            shown.append((int(cls), float(conf), *(float(v) for v in box)))
        else:
            below.append((int(cls), float(conf)))
    below.sort(key=lambda b: -b[1])
    return shown, below[:max_below]


# --- pure logic: savings and aggregation over seeds ---------------------------------------


@dataclass(frozen=True)
class Savings:
    """Labels a strategy needs for random selection's final value of ``metric``."""

    metric: str
    target: float
    """Random selection's final value of ``metric``."""
    random_labels: int
    """Random selection's final label count."""
    strategy_labels: float | None
    """Interpolated labels where the strategy's curve first reaches ``target``; None: never."""
    baseline: float | None = None
    """Both curves' first value (the shared initial model), when they share one."""

    @property
    def random_improved(self) -> bool:
        """Random selection ended above the shared start: without that, "reaching" its final
        value is free and the saving says nothing."""
        return self.baseline is None or self.target > self.baseline

    @property
    def reached(self) -> bool:
        return self.strategy_labels is not None

    @property
    def saved(self) -> float | None:
        if self.strategy_labels is None:
            return None
        return self.random_labels - self.strategy_labels

    @property
    def saved_pct(self) -> float | None:
        if self.saved is None or self.random_labels <= 0:
            return None
        return 100.0 * self.saved / self.random_labels

    @property
    def share(self) -> float:
        """The strategy's labels over random's; infinite when it never got there."""
        if self.strategy_labels is None:
            return math.inf
        return self.strategy_labels / self.random_labels if self.random_labels else math.inf

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {
            "reached": self.reached,
            "random_improved": self.random_improved,
            "saved": self.saved,
            "saved_pct": self.saved_pct,
            "share": None if math.isinf(self.share) else self.share,
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
    strategy: Sequence[tuple[float, float]], random: Sequence[tuple[float, float]], metric: str
) -> Savings:
    """How many fewer labels ``strategy``'s curve needs for random's final ``metric``."""
    if not random:
        raise ValueError("the random curve is empty")
    random_labels, target = random[-1]
    shared = bool(strategy) and strategy[0] == random[0]
    return Savings(
        metric,
        target,
        int(random_labels),
        labels_to_reach(strategy, target),
        baseline=random[0][1] if shared else None,
    )


@dataclass(frozen=True)
class Spread:
    """The median of per-seed values and their range; ``spread`` is max - min."""

    median: float
    low: float
    high: float
    n: int

    @property
    def spread(self) -> float:
        return self.high - self.low

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"spread": self.spread}


def over_seeds(values: Sequence[float]) -> Spread:
    """Median and range of one figure over seeds (``inf`` allowed: "never reached")."""
    if not values:
        raise ValueError("no values to aggregate")
    return Spread(float(statistics.median(values)), min(values), max(values), len(values))


def curve_over_seeds(curves: Sequence[Sequence[tuple[float, float]]]) -> list[Spread]:
    """Per cycle, the median and range of the value over seeds' curves; curves may differ in
    length (a pool labelled out early): a cycle counts the seeds that reached it."""
    longest = max((len(c) for c in curves), default=0)
    return [over_seeds([c[i][1] for c in curves if len(c) > i]) for i in range(longest)]


def paired_gaps(
    strategy_curves: Sequence[Sequence[tuple[float, float]]],
    random_curves: Sequence[Sequence[tuple[float, float]]],
) -> list[Spread]:
    """Per cycle, the strategy's value minus random's *of the same seed* (same initial model,
    same test set), aggregated over seeds: the paired view, free of the spread between
    seeds' starting points."""
    diffs = [
        [(a[0], a[1] - b[1]) for a, b in zip(mine, theirs)]
        for mine, theirs in zip(strategy_curves, random_curves)
    ]
    return curve_over_seeds(diffs)


@dataclass(frozen=True)
class Verdict:
    """The target check of one strategy against random, over seeds."""

    strategy: str
    labels: Spread
    """Labels to reach random's final mAP50-95, per seed (inf: never)."""
    share: Spread
    """The same as a share of random's final label count."""
    worst_gap: float
    """The most the strategy's median fell below random's (minus the spread), any cycle;
    <= 0 means it never fell behind by more than the spread."""
    worst_cycle: int | None
    random_gain: float = 1.0
    """Random's median gain over the shared start: without one, "reaching" its final value
    is free and the comparison says nothing."""

    @property
    def saves_enough(self) -> bool:
        return self.share.median <= TARGET_SHARE

    @property
    def never_behind(self) -> bool:
        return self.worst_gap <= 0.0

    @property
    def comparable(self) -> bool:
        return self.random_gain > 0.0

    @property
    def met(self) -> bool:
        return self.comparable and self.saves_enough and self.never_behind

    def as_dict(self) -> dict[str, Any]:
        def finite(s: Spread) -> dict[str, Any]:
            return {
                k: (None if isinstance(v, float) and math.isinf(v) else v)
                for k, v in s.as_dict().items()
            }

        return {
            "strategy": self.strategy,
            "labels": finite(self.labels),
            "share": finite(self.share),
            "worst_gap": self.worst_gap,
            "worst_cycle": self.worst_cycle,
            "saves_enough": self.saves_enough,
            "never_behind": self.never_behind,
            "random_gain": self.random_gain,
            "comparable": self.comparable,
            "met": self.met,
        }


def verdict(
    strategy: str,
    strategy_curves: Sequence[Sequence[tuple[float, float]]],
    random_curves: Sequence[Sequence[tuple[float, float]]],
) -> Verdict:
    """Savings per seed (each seed's strategy curve against that seed's random curve) and
    the never-behind check on the median curves with the seeds' spread as tolerance."""
    if len(strategy_curves) != len(random_curves) or not strategy_curves:
        raise ValueError("need one strategy curve per random curve, at least one")
    savings = [labels_saved(s, r, PRIMARY) for s, r in zip(strategy_curves, random_curves)]
    labels = over_seeds(
        [math.inf if s.strategy_labels is None else s.strategy_labels for s in savings]
    )
    share = over_seeds([s.share for s in savings])
    mine, theirs = curve_over_seeds(strategy_curves), curve_over_seeds(random_curves)
    worst_gap, worst_cycle = -math.inf, None
    for cycle, (a, b) in enumerate(zip(mine, theirs)):
        gap = (b.median - a.median) - max(a.spread, b.spread)
        if gap > worst_gap:
            worst_gap, worst_cycle = gap, cycle
    gain = over_seeds([r[-1][1] - r[0][1] for r in random_curves]).median
    return Verdict(strategy, labels, share, worst_gap, worst_cycle, gain)


# --- the experiment ---------------------------------------------------------------------


@dataclass
class Point:
    labels: int
    metrics: dict[str, float]
    hard_picked: int = 0
    """Of the frames picked so far (after the initial set), how many are drifted."""
    blind_picked: int = 0
    """... and how many the initial champion was blind on (defects, no box shown)."""
    repeat_picked: int = 0
    """... and how many show a scene that already had a labelled frame when picked."""
    picked: int = 0
    per_class: dict[str, float] = field(default_factory=dict)
    """Test AP50-95 per class."""
    train_s: float = 0.0
    select_s: float = 0.0
    eval_s: float = 0.0


@dataclass
class StrategyRun:
    name: str
    seed: int
    points: list[Point] = field(default_factory=list)
    wall_s: float = 0.0
    cpu_s: float = 0.0

    def curve(self, metric: str = PRIMARY) -> list[tuple[float, float]]:
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
    seeds: list[int]
    strategies: list[str]
    cycles: int
    initial: int
    per_cycle: int
    scenes: int
    frames: int
    test_scenes: int
    epochs: int
    initial_epochs: int
    imgsz: int
    batch: int
    hard_fraction: float
    object_scale: float
    objects: tuple[int, int]
    control_rate: float | None
    policy: dict[str, Any]
    initial_clean: bool = True


def _write_frames(root: Path, frames: Sequence[Frame], seed: int, c: Config) -> list[Path]:
    """Images and YOLO labels ``root/images/i_*.jpg``, ``root/labels/i_*.txt``."""
    from visionloop.synthetic import encode_jpeg, format_yolo_labels, generate_frame

    drifts = conditions(c.imgsz)
    scene = SceneParams(object_scale=c.object_scale, objects=c.objects, class_probs=CLASS_PROBS)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "labels").mkdir(parents=True, exist_ok=True)
    paths = []
    for index, f in enumerate(frames):
        sample = generate_frame(
            f.scene,
            f.frame,
            seed=seed,
            size=c.imgsz,
            class_names=CLASS_NAMES,
            drift=drifts.get(f.condition),
            scene=scene,
            jitter=FrameJitter(),
        )
        image = root / "images" / f"i_{index:05d}.jpg"
        image.write_bytes(encode_jpeg(sample.image))
        (root / "labels" / f"i_{index:05d}.txt").write_text(format_yolo_labels(sample.boxes))
        paths.append(image)
    return paths


def _data_yaml(run_dir: Path, train: Sequence[Path], val: Sequence[Path]) -> Path:
    """A data.yaml over image lists (labels next door, as ultralytics expects)."""
    import yaml

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "train.txt").write_text("".join(f"{p}\n" for p in train))
    (run_dir / "val.txt").write_text("".join(f"{p}\n" for p in val))
    spec = {
        "path": str(run_dir),
        "train": str(run_dir / "train.txt"),
        "val": str(run_dir / "val.txt"),
        "names": dict(enumerate(CLASS_NAMES)),
    }
    data = run_dir / "data.yaml"
    data.write_text(yaml.safe_dump(spec, sort_keys=False))
    return data


class _Predictions:
    """One forward pass of the current model over the whole pool, as production does it at
    ingest: boxes at the candidate threshold and the embedding of the same pass."""

    def __init__(self, model: Any, paths: Sequence[Path], imgsz: int) -> None:
        import cv2

        from serving.embedding import predict_with_features
        from visionloop.settings import CANDIDATE_CONF

        self.shown: list[list[tuple[int, float, float, float, float, float]]] = []
        self.below: list[list[tuple[int, float]]] = []
        rows = []
        for start in range(0, len(paths), 64):
            # ultralytics reads arrays as OpenCV's BGR: what cv2.imread gives.
            images = [cv2.imread(str(p)) for p in paths[start : start + 64]]
            results, embeddings = predict_with_features(
                model, images, imgsz=imgsz, conf=CANDIDATE_CONF, device="cpu", verbose=False
            )
            rows.append(embeddings)
            for result in results:
                shown, below = _split(result)
                self.shown.append(shown)
                self.below.append(below)
        self.embeddings = np.concatenate(rows) if rows else np.zeros((0, 0), np.float32)


def _split(result: Any) -> tuple[list[Any], list[tuple[int, float]]]:
    from serving.predictor import PREDICT_CONF

    if result.boxes is None or not len(result.boxes):
        return [], []
    return split_boxes(
        result.boxes.cls.cpu().numpy().astype(int).tolist(),
        result.boxes.conf.cpu().numpy().astype(float).tolist(),
        result.boxes.xyxyn.cpu().numpy().astype(float).tolist(),
        PREDICT_CONF,
    )


class Seeded:
    """One seed's pool, test set and initial model, shared by every strategy."""

    def __init__(self, config: Config, seed: int, workdir: Path) -> None:
        from training.trainer import configure_ultralytics

        self.c = config
        self.seed = seed
        self.work = workdir / f"seed{seed}"
        configure_ultralytics(workdir / ".ultralytics")  # before ultralytics loads
        kinds = list(conditions(config.imgsz))
        self.pool, self.test = build_frames(
            config.scenes, config.frames, config.test_scenes, config.hard_fraction, kinds, seed
        )
        self.pool_images = _write_frames(self.work / "pool", self.pool, seed, config)
        self.has_boxes = [
            bool((p.parent.parent / "labels" / f"{p.stem}.txt").read_text().strip())
            for p in self.pool_images
        ]
        test_images = _write_frames(self.work / "test", self.test, seed, config)
        self.test_yaml = _data_yaml(self.work / "test", test_images, test_images)
        self.blind: list[bool] = []
        self._initial: tuple[Path, Any, _Predictions] | None = None

    # -- training, evaluation, prediction

    def train(
        self, name: str, labelled: Sequence[int], source: str, epochs: int
    ) -> tuple[Path, float]:
        from training.trainer import train_yolo

        run_dir = self.work / "runs" / name
        train = [self.pool_images[i] for i in labelled]
        # Checkpoint choice is not the test set's business: no validation while training,
        # last.pt is kept.
        data = _data_yaml(run_dir / "data", train, train[:16])
        with _Clock() as clock:
            result = train_yolo(
                data,
                model_source=source,
                run_dir=run_dir,
                epochs=epochs,
                imgsz=self.c.imgsz,
                batch=self.c.batch,
                seed=self.seed,
                extra_args={"nbs": self.c.batch, "val": False},
            )
        return result.last_weights, clock.wall

    def evaluate(self, name: str, weights: Path, data: Path | None = None) -> tuple[Any, float]:
        from training.evaluation import evaluate_weights

        with _Clock() as clock:
            result = evaluate_weights(
                weights,
                data or self.test_yaml,
                imgsz=self.c.imgsz,
                batch=self.c.batch,
                run_dir=self.work / "runs" / f"{name}-eval",
            )
        return result, clock.wall

    def predict_pool(self, weights: Path) -> tuple[Any, _Predictions]:
        """The model and its predictions over the pool; the initial model's are kept, as
        every strategy's first cycle starts from it."""
        from ultralytics import YOLO

        if self._initial is not None and self._initial[0] == weights:
            return self._initial[1], self._initial[2]
        model = YOLO(str(weights), task="detect")
        predictions = _Predictions(model, self.pool_images, self.c.imgsz)
        if self._initial is None:
            self._initial = (weights, model, predictions)
        return model, predictions

    def initial(self, log: Callable[[str], None]) -> tuple[LabelPool, Path, Point, float, float]:
        ids = initial_pick(self.pool, self.c.initial, self.seed, self.c.initial_clean)
        pool = LabelPool(len(self.pool), ids)
        with _Clock() as clock:
            weights, train_s = self.train(
                "initial", pool.labelled, "yolov8n.yaml", self.c.initial_epochs
            )
            result, eval_s = self.evaluate("initial", weights)
            _, predictions = self.predict_pool(weights)
        # Blind: a frame with defects on which the champion shows no box at all.
        self.blind = [has and not shown for has, shown in zip(self.has_boxes, predictions.shown)]
        point = Point(
            len(pool),
            {m: result.metrics[m] for m in METRICS},
            per_class={k: v["AP50-95"] for k, v in result.per_class.items()},
            train_s=train_s,
            eval_s=eval_s,
        )
        by_condition: dict[str, list[bool]] = {}
        for f, b, has in zip(self.pool, self.blind, self.has_boxes):
            if has:
                by_condition.setdefault(f.condition, []).append(b)
        log(
            f"seed {self.seed}: initial model on {len(pool)} clean labels, "
            f"mAP50-95 {point.metrics['mAP50-95']:.3f}, mAP50 {point.metrics['mAP50']:.3f}; "
            "blind share by condition: "
            + ", ".join(f"{k} {np.mean(v):.0%}" for k, v in sorted(by_condition.items()))
            + f" ({clock.wall:.0f} s)"
        )
        return pool, weights, point, clock.wall, clock.cpu

    # -- selection

    def _context(
        self, name: str, model: Any, weights: Path, predictions: _Predictions, pool: LabelPool
    ) -> SelectionContext:
        from labeling.scoring import class_weights_from_ap

        labelled = pool.labelled
        # The current model's weak classes, judged on its own labelled frames (no test set).
        data = _data_yaml(
            self.work / "runs" / f"{name}-labelled",
            [self.pool_images[i] for i in labelled],
            [self.pool_images[i] for i in labelled],
        )
        result, _ = self.evaluate(f"{name}-labelled", weights, data)
        weights_by_class = class_weights_from_ap(result.per_class, list(CLASS_NAMES))
        reference = predictions.embeddings[labelled]
        return SelectionContext(
            class_weights=weights_by_class,
            reference=reference,
            flip=self._flip_check(model),
            cycle=f"{name}-{self.seed}-{len(pool)}",
        )

    def _flip_check(self, model: Any) -> Callable[[Sequence[Candidate]], Mapping[int, float]]:
        def flip(shortlist: Sequence[Candidate]) -> Mapping[int, float]:
            import cv2

            from labeling.scoring import flip_disagreement
            from serving.embedding import mirror, unmirror_boxes
            from visionloop.settings import CANDIDATE_CONF

            out: dict[int, float] = {}
            ids = [c.image_id for c in shortlist]
            for start in range(0, len(ids), 64):
                chunk = shortlist[start : start + 64]
                images = mirror([cv2.imread(str(self.pool_images[c.image_id])) for c in chunk])
                results = model.predict(
                    images, imgsz=self.c.imgsz, conf=CANDIDATE_CONF, device="cpu", verbose=False
                )
                for candidate, result in zip(chunk, results):
                    shown, _ = _split(result)
                    if shown:
                        back = unmirror_boxes(np.array([b[2:] for b in shown]))
                        shown = [(b[0], b[1], *map(float, xy)) for b, xy in zip(shown, back)]
                    out[candidate.image_id] = float(flip_disagreement(list(candidate.boxes), shown))
            return out

        return flip

    def policy(self, name: str) -> SelectionPolicy:
        values: dict[str, Any] = {
            "strategy": name,
            "budget": self.c.per_cycle,
            "seed": self.seed,
            "audit_rate": 0.0,
        }
        if self.c.control_rate is not None:
            values["control_rate"] = self.c.control_rate
        values.update(self.c.policy)
        unknown = set(values) - set(SelectionPolicy.model_fields)
        if unknown:
            raise SystemExit(f"SelectionPolicy has no field(s) {sorted(unknown)}")
        return SelectionPolicy(**values)

    def run_strategy(
        self,
        name: str,
        start_pool: LabelPool,
        weights: Path,
        start: Point,
        log: Callable[[str], None],
    ) -> StrategyRun:
        run = StrategyRun(name, self.seed, [start])
        pool = start_pool.copy()
        picked_all: list[int] = []
        with _Clock() as clock:
            for cycle in range(1, self.c.cycles + 1):
                unlabelled = pool.unlabelled()
                if not unlabelled:
                    log(f"  {name}: the pool is all labelled after cycle {cycle - 1}")
                    break
                started = time.perf_counter()
                labelled_scenes = {self.pool[i].scene for i in pool.labelled}
                if name == RANDOM:
                    picked = random_pick(unlabelled, self.c.per_cycle, self.seed + cycle)
                else:
                    model, predictions = self.predict_pool(weights)
                    context = self._context(f"{name}-{cycle}", model, weights, predictions, pool)
                    candidates = [
                        Candidate(
                            image_id=i,
                            content_hash=f"{self.seed}:{self.pool_images[i].name}",
                            confidences=[b[1] for b in predictions.shown[i]],
                            classes=[b[0] for b in predictions.shown[i]],
                            below=predictions.below[i],
                            embedding=predictions.embeddings[i],
                            boxes=predictions.shown[i],
                        )
                        for i in unlabelled
                    ]
                    picked = pick_uncertain(
                        candidates, self.policy(name), self.c.per_cycle, self.seed + cycle, context
                    )
                select_s = time.perf_counter() - started
                pool.add(picked)
                picked_all.extend(picked)
                repeats = sum(self.pool[i].scene in labelled_scenes for i in picked)
                # Frames of one scene picked together: all but the first are repeats too.
                repeats += len(picked) - len({self.pool[i].scene for i in picked})
                weights, train_s = self.train(
                    f"{name}-{cycle}", pool.labelled, str(weights), self.c.epochs
                )
                result, eval_s = self.evaluate(f"{name}-{cycle}", weights)
                previous = run.points[-1]
                point = Point(
                    len(pool),
                    {m: result.metrics[m] for m in METRICS},
                    hard_picked=sum(self.pool[i].condition != EASY for i in picked_all),
                    blind_picked=sum(self.blind[i] for i in picked_all),
                    repeat_picked=previous.repeat_picked + repeats,
                    picked=len(picked_all),
                    per_class={k: v["AP50-95"] for k, v in result.per_class.items()},
                    train_s=train_s,
                    select_s=select_s,
                    eval_s=eval_s,
                )
                run.points.append(point)
                log(
                    f"  seed {self.seed} {name} cycle {cycle}: {point.labels} labels, picked "
                    f"{point.hard_picked}/{point.picked} hard, {point.blind_picked} blind, "
                    f"{point.repeat_picked} repeats; mAP50-95 {point.metrics['mAP50-95']:.3f}, "
                    f"mAP50 {point.metrics['mAP50']:.3f} (select {select_s:.0f} s, "
                    f"train {train_s:.0f} s, eval {eval_s:.0f} s)"
                )
        run.wall_s, run.cpu_s = clock.wall, clock.cpu
        return run


def run(config: Config, workdir: Path, log: Callable[[str], None] = print) -> dict[str, Any]:
    started = time.perf_counter()
    names = [RANDOM, *config.strategies]
    runs: dict[str, list[StrategyRun]] = {name: [] for name in names}
    initial_s: list[dict[str, float]] = []
    pool_shares: list[dict[str, float]] = []
    for seed in config.seeds:
        seeded = Seeded(config, seed, workdir)
        pool, weights, start, wall, cpu = seeded.initial(log)
        initial_s.append({"wall": wall, "cpu": cpu})
        unlabelled = pool.unlabelled()
        pool_shares.append(
            {
                "hard": float(np.mean([seeded.pool[i].condition != EASY for i in unlabelled])),
                "blind": float(np.mean([seeded.blind[i] for i in unlabelled])),
            }
        )
        for name in names:
            runs[name].append(seeded.run_strategy(name, pool, weights, start, log))
    verdicts = {
        name: verdict(name, [r.curve() for r in runs[name]], [r.curve() for r in runs[RANDOM]])
        for name in config.strategies
    }
    return {
        "config": asdict(config),
        "initial_s": initial_s,
        "pool_shares": pool_shares,
        "runs": {
            name: [
                {
                    "seed": r.seed,
                    "wall_s": r.wall_s,
                    "cpu_s": r.cpu_s,
                    "points": [asdict(p) for p in r.points],
                }
                for r in rs
            ]
            for name, rs in runs.items()
        },
        "median_curves": {
            name: {
                m: [s.as_dict() for s in curve_over_seeds([r.curve(m) for r in rs])]
                for m in METRICS
            }
            for name, rs in runs.items()
        },
        "savings": {
            name: [
                labels_saved(r.curve(), rr.curve(), PRIMARY).as_dict()
                for r, rr in zip(runs[name], runs[RANDOM])
            ]
            for name in config.strategies
        },
        "paired_gaps": {
            name: [
                g.as_dict()
                for g in paired_gaps(
                    [r.curve() for r in runs[name]], [r.curve() for r in runs[RANDOM]]
                )
            ]
            for name in config.strategies
        },
        "verdicts": {name: v.as_dict() for name, v in verdicts.items()},
        "total_s": time.perf_counter() - started,
        "_runs": runs,
        "_verdicts": verdicts,
    }


# --- output -----------------------------------------------------------------------------


def _labels(value: float) -> str:
    return "never" if math.isinf(value) else f"{value:.0f}"


def print_results(results: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    runs: dict[str, list[StrategyRun]] = results["_runs"]
    verdicts: dict[str, Verdict] = results["_verdicts"]
    names = list(runs)
    console = Console(width=160)
    for index, seed in enumerate(results["config"]["seeds"]):
        table = Table(title=f"seed {seed}: labels -> test mAP50-95 / mAP50")
        table.add_column("cycle", justify="right")
        table.add_column("labels", justify="right")
        for name in names:
            table.add_column(name, justify="right")
        base = runs[RANDOM][index].points
        for cycle, point in enumerate(base):
            cells = []
            for name in names:
                points = runs[name][index].points
                p = points[cycle] if cycle < len(points) else None
                cells.append(
                    "" if p is None else f"{p.metrics['mAP50-95']:.3f} / {p.metrics['mAP50']:.3f}"
                )
            table.add_row(str(cycle), str(point.labels), *cells)
        console.print(table)
    for metric in METRICS:
        table = Table(title=f"{metric} over seeds per cycle: median [min - max]")
        table.add_column("cycle", justify="right")
        table.add_column("labels", justify="right")
        for name in names:
            table.add_column(name, justify="right")
        curves = {n: curve_over_seeds([r.curve(metric) for r in runs[n]]) for n in names}
        for cycle, point in enumerate(runs[RANDOM][0].points):
            table.add_row(
                str(cycle),
                str(point.labels),
                *[
                    f"{s.median:.3f} [{s.low:.3f} - {s.high:.3f}]" if cycle < len(c) else ""
                    for c in curves.values()
                    for s in [c[min(cycle, len(c) - 1)]]
                ],
            )
        console.print(table)
    table = Table(title=f"{PRIMARY}: strategy minus random, same seed: median [min - max]")
    table.add_column("cycle", justify="right")
    table.add_column("labels", justify="right")
    for name in verdicts:
        table.add_column(name, justify="right")
    gaps = {
        n: paired_gaps([r.curve() for r in runs[n]], [r.curve() for r in runs[RANDOM]])
        for n in verdicts
    }
    for cycle, point in enumerate(runs[RANDOM][0].points):
        table.add_row(
            str(cycle),
            str(point.labels),
            *[
                f"{g[cycle].median:+.3f} [{g[cycle].low:+.3f} - {g[cycle].high:+.3f}]"
                if cycle < len(g)
                else ""
                for g in gaps.values()
            ],
        )
    console.print(table)
    table = Table(
        title=f"labels to reach random's final {PRIMARY} (same seed; initial labels count)"
    )
    table.add_column("strategy")
    for seed in results["config"]["seeds"]:
        table.add_column(f"seed {seed}", justify="right")
    for column in ("median", "spread", "% of random's", "never behind", "target"):
        table.add_column(column, justify="right")
    for name, v in verdicts.items():
        per_seed = []
        for r, rr in zip(runs[name], runs[RANDOM]):
            s = labels_saved(r.curve(), rr.curve(), PRIMARY)
            per_seed.append(f"{_labels(s.strategy_labels or math.inf)} / {s.random_labels}")
        spread = v.labels.spread
        table.add_row(
            name,
            *per_seed,
            _labels(v.labels.median),
            "inf" if math.isinf(spread) or math.isnan(spread) else f"{spread:.0f}",
            "never" if math.isinf(v.share.median) else f"{100 * v.share.median:.0f}%",
            "yes" if v.never_behind else f"no (cycle {v.worst_cycle}, {v.worst_gap:+.3f})",
            "MET" if v.met else "not met" if v.comparable else "random never improved",
        )
    console.print(table)
    console.print(
        f"target: median <= {TARGET_SHARE:.0%} of random's labels and never behind "
        "random's median by more than the seeds' spread (max - min) at any cycle"
    )
    table = Table(title="what each strategy picked (all seeds, after the initial labels)")
    for column in (
        "strategy",
        "picked",
        "hard",
        "blind",
        "repeat scene",
        "wall s",
        "CPU s",
        "select s",
        "train s",
        "eval s",
    ):
        table.add_column(column, justify="left" if column == "strategy" else "right")
    for name in names:
        last = [r.points[-1] for r in runs[name]]
        picked = sum(p.picked for p in last) or 1
        cycles = [p for r in runs[name] for p in r.points[1:]]
        table.add_row(
            name,
            str(sum(p.picked for p in last)),
            f"{sum(p.hard_picked for p in last) / picked:.0%}",
            f"{sum(p.blind_picked for p in last) / picked:.0%}",
            f"{sum(p.repeat_picked for p in last) / picked:.0%}",
            f"{sum(r.wall_s for r in runs[name]):.0f}",
            f"{sum(r.cpu_s for r in runs[name]):.0f}",
            f"{sum(p.select_s for p in cycles):.0f}",
            f"{sum(p.train_s for p in cycles):.0f}",
            f"{sum(p.eval_s for p in cycles):.0f}",
        )
    console.print(table)
    shares = results["pool_shares"]
    console.print(
        "unlabelled pool at the start: "
        f"{np.mean([s['hard'] for s in shares]):.0%} hard, "
        f"{np.mean([s['blind'] for s in shares]):.0%} blind (what random picks on average); "
        f"initial models {sum(s['wall'] for s in results['initial_s']):.0f} s wall; "
        f"whole benchmark {results['total_s']:.0f} s wall"
    )


# --- command line -----------------------------------------------------------------------

QUICK = {
    # A smoke run of every strategy over three seeds: the numbers mean little.
    "cycles": 2,
    "initial": 8,
    "per_cycle": 6,
    "scenes": 10,
    "frames": 3,
    "test_scenes": 8,
    "epochs": 1,
    "initial_epochs": 8,
    "imgsz": 64,
    "batch": 8,
}


def _strategies(text: str | None) -> list[str]:
    registered = sorted(STRATEGIES)
    if text is None:
        return registered
    names = [n.strip() for n in text.split(",") if n.strip() and n.strip() != RANDOM]
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown strategies {unknown}; registered: {registered}")
    return names


def _policy_value(text: str) -> tuple[str, Any]:
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--policy wants KEY=VALUE, got {text!r}")
    try:
        value: Any = json.loads(raw)
    except json.JSONDecodeError:
        value = raw
    return key.strip(), value


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds (>= 3 advised)")
    parser.add_argument(
        "--strategies",
        default=None,
        help="comma-separated registered strategies to run against random (default: all)",
    )
    parser.add_argument("--cycles", type=int, default=4, help="selection + retrain rounds")
    parser.add_argument("--initial", type=int, default=24, help="clean labels of the champion")
    parser.add_argument("--per-cycle", type=int, default=16, help="labels added per cycle")
    parser.add_argument("--scenes", type=int, default=100, help="scenes in the pool")
    parser.add_argument("--frames", type=int, default=5, help="near-duplicate frames per scene")
    parser.add_argument("--test-scenes", type=int, default=100, help="held-out scenes (1 frame)")
    parser.add_argument("--epochs", type=int, default=5, help="fine-tuning epochs per cycle")
    parser.add_argument(
        "--initial-epochs", type=int, default=60, help="epochs of the initial model"
    )
    parser.add_argument("--imgsz", type=int, default=160, help="image side (generated and trained)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--hard-fraction", type=float, default=0.6, help="share of drifted scenes")
    parser.add_argument("--object-scale", type=float, default=0.6, help="defect size vs default")
    parser.add_argument("--objects", default="2,4", help="defects per image: MIN,MAX")
    parser.add_argument(
        "--control-rate",
        type=float,
        default=None,
        help="share of each budget drawn at random as control (default: the platform's)",
    )
    parser.add_argument(
        "--policy",
        type=_policy_value,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a SelectionPolicy field for the strategies (JSON value), e.g. a hybrid tunable",
    )
    parser.add_argument(
        "--initial-any",
        action="store_true",
        help="draw the champion's labels from all pool scenes, not only clean ones",
    )
    parser.add_argument(
        "--workdir", type=Path, default=None, help="keep everything here (default: temp, removed)"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--quick", action="store_true", help="a tiny smoke run (< 10 minutes)")
    args = parser.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            if getattr(args, key) == parser.get_default(key):
                setattr(args, key, value)
    try:
        args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
        args.strategies = _strategies(args.strategies)
        low, high = (int(v) for v in args.objects.split(","))
        args.objects = (low, high)
    except (ValueError, argparse.ArgumentTypeError) as exc:
        parser.error(str(exc))
    if not args.seeds or any(s < 0 for s in args.seeds):
        parser.error("--seeds needs at least one seed >= 0")
    if args.initial < 1 or args.per_cycle < 1 or args.cycles < 1:
        parser.error("--initial, --per-cycle and --cycles must be >= 1")
    if args.initial >= args.scenes * args.frames:
        parser.error("--initial must be smaller than the pool (--scenes x --frames)")
    args.policy = dict(args.policy)
    return args


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    config = Config(
        seeds=args.seeds,
        strategies=args.strategies,
        cycles=args.cycles,
        initial=args.initial,
        per_cycle=args.per_cycle,
        scenes=args.scenes,
        frames=args.frames,
        test_scenes=args.test_scenes,
        epochs=args.epochs,
        initial_epochs=args.initial_epochs,
        imgsz=args.imgsz,
        batch=args.batch,
        hard_fraction=args.hard_fraction,
        object_scale=args.object_scale,
        objects=args.objects,
        control_rate=args.control_rate,
        policy=args.policy,
        initial_clean=not args.initial_any,
    )
    keep = args.workdir is not None
    workdir = args.workdir.resolve() if keep else Path(tempfile.mkdtemp(prefix="visionloop-al-"))
    workdir.mkdir(parents=True, exist_ok=True)
    print(
        f"active learning: {', '.join(config.strategies)} vs random, seeds {config.seeds}; "
        f"{config.cycles} cycles x {config.per_cycle} labels from {config.initial} clean; pool "
        f"{config.scenes} scenes x {config.frames} frames, test {config.test_scenes} scenes "
        f"({config.hard_fraction:.0%} drifted); imgsz {config.imgsz}, epochs "
        f"{config.initial_epochs} + {config.epochs}/cycle"
    )
    try:
        results = run(config, workdir)
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print_results(results)
    if args.json:
        public = {k: v for k, v in results.items() if not k.startswith("_")}
        args.json.write_text(json.dumps(public, indent=2, default=_json_default))
        print(f"results written to {args.json}")


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and math.isinf(value):
        return None
    return str(value)


if __name__ == "__main__":
    main()
