"""Which predicted images deserve a human's time: uncertainty sampling under a budget.

An image is *confident* when every box is at or above ``high`` (or it has no box: the model
is sure there is nothing). Every other image is judged by the policy's strategy from its
box confidences: a ``Flag`` (a score, higher = more worth reviewing, and the deciding box's
confidence) or ``None`` when the strategy does not want it. Strategies are plain functions
registered by name in ``STRATEGIES``; ``SelectionPolicy.strategy`` picks one.

A second kind of strategy (``BatchStrategy``, registered with ``batch_strategy``) sees the
whole batch and the ``SelectionContext`` at once: "hybrid" scores every image from the
parts in ``labeling.scoring`` (uncertainty over all candidate boxes, class weights, novelty
against the champion's training images, flip disagreement on a shortlist) and picks a
diverse batch by the images' embeddings (``labeling.diversity``). It judges confident and
empty images too: a drifted champion that finds nothing under new conditions is exactly
what it is meant to catch.

Three arms share the budget, in this order:

- **control**: ``ceil(budget * control_rate)`` images drawn uniformly at random from *all*
  candidates, reproducibly from the policy's seed and the cycle (``context.cycle``). The
  label-savings ledger compares what reviewers find in them with the selected arm. Only a
  selection cycle has a control arm: without ``context.cycle`` (a single uploaded image,
  a benchmark) none is drawn.
- **audit**: a small random share of the confident images among the rest, at most
  ``ceil(budget * audit_rate)``: an image the model is sure about is where a silent failure
  hides. Whether an image is audited depends only on its content hash and the policy's
  seed, so the choice is reproducible and independent of what else was in the batch.
- **selected**: the strategy's picks from what is left, most worth reviewing first.

Each item says why it was chosen (``reason``, stored as the queue's ``flagged_reason``, its
``arm`` and the score ``parts`` that decided, stored as ``score_parts``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import chain
from typing import Literal

import numpy as np
from pydantic import BaseModel, Field, model_validator

from labeling import diversity, scoring
from visionloop.settings import (
    AUDIT_RATE,
    CONTROL_RATE,
    LABELING_BUDGET,
    UNCERTAINTY_HIGH,
    UNCERTAINTY_LOW,
    Settings,
)

StrategyName = Literal["confidence_band", "least_confidence", "margin", "entropy", "hybrid"]

AUDIT_REASON = "random_audit"
CONTROL_REASON = "control"
# bench.active_learning decides. Over three seeds (median of the paired gaps to random,
# mAP50-95, cycles 1 - 4): hybrid +0.079 +0.056 +0.049 -0.020, confidence_band -0.009
# +0.011 +0.044 -0.022; hybrid picked blind frames as often as random (41%), the band 22%.
DEFAULT_STRATEGY: StrategyName = "hybrid"


class SelectionPolicy(BaseModel):
    """How one cycle chooses images for review (a Prefect flow parameter, hence pydantic)."""

    strategy: StrategyName = DEFAULT_STRATEGY
    low: float = Field(default=UNCERTAINTY_LOW, ge=0.0, le=1.0)
    high: float = Field(default=UNCERTAINTY_HIGH, ge=0.0, le=1.0)
    budget: int = Field(default=LABELING_BUDGET, ge=0)
    audit_rate: float = Field(default=AUDIT_RATE, ge=0.0, le=1.0)
    control_rate: float = Field(default=CONTROL_RATE, ge=0.0, le=1.0)
    """Share of the budget drawn uniformly at random as the ledger's control arm."""
    seed: int = 0

    # The hybrid strategy's tunables (ignored by the per-image strategies).
    shortlist_factor: float = Field(default=4.0, ge=1.0)
    """The diverse batch is picked from the ``shortlist_factor * k`` best-scored images."""
    duplicate_ratio: float = Field(default=0.1, ge=0.0)
    """Images closer to a better-scored one (or to a training image) than this share of the
    novelty scale (``scoring.novelty_scale``: how far the most isolated training images lie
    from their nearest neighbour) are the same question. A high quantile rather than the
    median: a training set holds many frames of one scene, whose median neighbour distance
    is itself a duplicate's. On the benchmark's scenes 0.1 of it collapses about 95% of the frame
    pairs of one scene."""
    duplicate_distance: float | None = Field(default=None, ge=0.0, le=2.0)
    """An absolute cosine distance instead of ``duplicate_ratio`` (None: relative, since the
    features' scale differs between models). Without either (no reference) only identical
    embeddings collapse; the diverse pick still spreads the batch."""
    min_score: float = Field(default=0.25, ge=0.0)
    """Below this score an image is not asked about even when the budget has room: 0.25 is the
    uncertainty of a box at 0.04 or 0.96, clear-cut either way (a single uploaded image is
    judged against this bar alone)."""
    uncertainty_weight: float = Field(default=1.0, ge=0.0)
    novelty_weight: float = Field(default=scoring.MAX_CLASS_WEIGHT, ge=0.0)
    """As heavy as the heaviest class weight: a frame unlike anything the champion was trained
    on (where a blind champion finds no box, so uncertainty is 0) must outrank the most
    doubtful box of a familiar kind, which a young champion has on nearly every frame."""
    flip_weight: float = Field(default=1.0, ge=0.0)
    diversity: float = Field(default=1.0, ge=0.0)
    """Exponent of the distance in ``score * distance ** diversity``; 0 is plain score order."""
    spread_from_reference: bool = True
    """The diverse pick also keeps away from the training images (core-set style: each
    image's distance to its nearest training image starts its k-center distance), so a batch
    does not spend its labels on more frames of scenes already labelled."""
    reference_cap: int = Field(default=1024, ge=2)
    """Novelty is measured against at most this many training images (an even subsample)."""

    @model_validator(mode="after")
    def _band(self) -> SelectionPolicy:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self

    @classmethod
    def from_settings(
        cls, settings: Settings, *, drift_level: str | None = None, **overrides: object
    ) -> SelectionPolicy:
        """The settings' policy; while drift is yellow or red, a per-image strategy's confident
        images are audited at ``drift_audit_rate``: under drift the model misses defects with
        confidence (it finds no box), so uncertainty alone would starve the queue of the new
        conditions. A batch strategy judges those images itself (by novelty): its
        budget is not handed to random audits."""
        values: dict[str, object] = {
            "low": settings.uncertainty_low,
            "high": settings.uncertainty_high,
            "budget": settings.labeling_budget,
            "control_rate": settings.control_rate,
            "seed": settings.seed,
        }
        values.update(overrides)
        strategy = str(values.get("strategy", DEFAULT_STRATEGY))
        if drift_level in ("yellow", "red") and not uses_context(strategy):
            values.setdefault("audit_rate", max(AUDIT_RATE, settings.drift_audit_rate))
        return cls(**values)


@dataclass(frozen=True)
class Candidate:
    image_id: int
    content_hash: str
    confidences: Sequence[float]
    """The shown boxes' confidences (at or above the display threshold)."""
    classes: Sequence[int] = ()
    """The shown boxes' class ids, in the order of ``confidences``."""
    below: Sequence[tuple[int, float]] = ()
    """Candidate boxes under the display threshold, ``(cls, conf)``, most confident first."""
    embedding: np.ndarray | None = None
    """Pooled backbone features (float32, L2-normalised) from the same forward pass."""
    boxes: Sequence[Sequence[float]] = ()
    """The shown boxes as ``(cls, conf, x1, y1, x2, y2)``, normalised: for flip consistency."""


@dataclass(frozen=True)
class Flag:
    """A strategy's verdict on an uncertain image."""

    score: float
    """Higher means more worth reviewing; ranks images within the budget."""
    confidence: float
    """The confidence of the box that decided."""


@dataclass(frozen=True)
class Selected:
    image_id: int
    reason: str
    score: float
    confidence: float | None
    """The deciding box's confidence; for audited images the highest one, None without boxes."""
    arm: str = "selected"
    """selected | control | audit."""
    parts: Mapping[str, float] = field(default_factory=dict)
    """The score's parts: why it was chosen."""


@dataclass(frozen=True)
class SelectionContext:
    """What selection knows besides the candidates."""

    class_weights: Mapping[int, float] = field(default_factory=dict)
    """Class id -> weight >= 1: weak or rare classes (by the champion's per-class AP) weigh more."""
    reference: np.ndarray | None = None
    """Embeddings of the champion's training images, ``(m, d)`` float32, L2-normalised."""
    flip: Callable[[Sequence[Candidate]], Mapping[int, float]] | None = None
    """Runs the mirrored forward pass on a shortlist: image id -> flip disagreement in [0, 1]."""
    cycle: str | None = None
    """The selection cycle (the ingest flow run)."""


Strategy = Callable[[Sequence[float], SelectionPolicy], Flag | None]
"""A per-image strategy: one image's shown confidences -> its flag (or not wanted)."""


BatchPick = Callable[[Sequence[Candidate], SelectionPolicy, SelectionContext, int], list[Selected]]
"""A batch strategy's body: ``(candidates, policy, context, k)`` -> at most ``k`` items, best
first. The candidates exclude the control and audit picks."""


@dataclass(frozen=True)
class BatchStrategy:
    """A registered strategy that sees the whole batch and the context at once."""

    pick: BatchPick


STRATEGIES: dict[str, Strategy | BatchStrategy] = {}


def uses_context(name: str) -> bool:
    """Whether the strategy ``name`` reads a ``SelectionContext`` (a batch strategy does)."""
    return isinstance(STRATEGIES.get(name), BatchStrategy)


def strategy(name: str) -> Callable[[Strategy], Strategy]:
    def register(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
        return fn

    return register


def batch_strategy(name: str) -> Callable[[BatchPick], BatchPick]:
    def register(fn: BatchPick) -> BatchPick:
        STRATEGIES[name] = BatchStrategy(fn)
        return fn

    return register


@strategy("confidence_band")
def confidence_band(confs: Sequence[float], policy: SelectionPolicy) -> Flag | None:
    """Seed 004's rule: some box lies in ``[low, high]``; nearest the band's middle first."""
    inside = [c for c in confs if policy.low <= c <= policy.high]
    if not inside:
        return None
    middle = (policy.low + policy.high) / 2
    half = max((policy.high - policy.low) / 2, 1e-9)
    nearest = min(inside, key=lambda c: abs(c - middle))
    return Flag(1.0 - abs(nearest - middle) / half, nearest)


@strategy("least_confidence")
def least_confidence(confs: Sequence[float], policy: SelectionPolicy) -> Flag | None:
    """The image's weakest box decides: ``1 - min(conf)``."""
    weakest = min(confs)
    return Flag(1.0 - weakest, weakest)


def uncertainty(confs: Sequence[float]) -> float:
    """``1 - min |2 conf - 1|``: 1 when some box is a coin flip, 0 when every call is
    clear-cut or there is no box (stored as ``predictions.uncertainty``)."""
    return 1.0 - min((abs(2.0 * c - 1.0) for c in confs), default=1.0)


@strategy("margin")
def margin(confs: Sequence[float], policy: SelectionPolicy) -> Flag | None:
    """The box nearest a coin flip decides: ``uncertainty(confs)``."""
    nearest = min(confs, key=lambda c: abs(2.0 * c - 1.0))
    return Flag(uncertainty(confs), nearest)


def binary_entropy(p: float) -> float:
    if p <= 0.0 or p >= 1.0:
        return 0.0
    return -(p * math.log2(p) + (1.0 - p) * math.log2(1.0 - p))


@strategy("entropy")
def entropy(confs: Sequence[float], policy: SelectionPolicy) -> Flag | None:
    """Total binary entropy of the boxes: several doubtful boxes outrank one."""
    nearest = min(confs, key=lambda c: abs(2.0 * c - 1.0))
    return Flag(sum(binary_entropy(c) for c in confs), nearest)


# --- hybrid: score parts, shortlist, flip, de-duplicate, diverse batch ------------------------


def _flat_boxes(candidates: Sequence[Candidate]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every candidate box of the batch, shown ones then those below the threshold, as flat
    arrays (conf, cls, owner = index of the image): one numpy pass scores 100k images."""
    flat = chain.from_iterable
    shown = np.fromiter((len(c.confidences) for c in candidates), np.int64, len(candidates))
    below = np.fromiter((len(c.below) for c in candidates), np.int64, len(candidates))
    index = np.arange(len(candidates))
    conf = np.concatenate(
        [
            np.fromiter(flat(c.confidences for c in candidates), np.float64),
            np.fromiter((p for c in candidates for _, p in c.below), np.float64),
        ]
    )
    # Callers that know no classes (rows stored before classes were) pass none: -1 weighs 1.
    classes = (
        c.classes if len(c.classes) == len(c.confidences) else [-1] * len(c.confidences)
        for c in candidates
    )
    cls = np.concatenate(
        [
            np.fromiter(flat(classes), np.int64),
            np.fromiter((k for c in candidates for k, _ in c.below), np.int64),
        ]
    )
    return conf, cls, np.concatenate([np.repeat(index, shown), np.repeat(index, below)])


def _embeddings(candidates: Sequence[Candidate]) -> tuple[np.ndarray, np.ndarray] | None:
    """The batch's embeddings as rows, and which rows are real; a zero row for an image
    without one, or with one of another length than the first (another model's): it is then
    unlike every other image, never a duplicate, never novel. None when no image has one."""
    dim = next((len(c.embedding) for c in candidates if c.embedding is not None), None)
    if dim is None:
        return None
    real = np.fromiter(
        (c.embedding is not None and len(c.embedding) == dim for c in candidates),
        bool,
        len(candidates),
    )
    zero = np.zeros(dim, np.float32)
    rows = [c.embedding if ok else zero for c, ok in zip(candidates, real.tolist())]
    # One concatenate of flat rows: a third of np.stack's time over 100k small arrays.
    matrix = np.concatenate(rows).astype(np.float32, copy=False).reshape(len(candidates), dim)
    return matrix, real


def _capped(reference: np.ndarray, cap: int) -> np.ndarray:
    """At most ``cap`` reference rows, evenly spaced: novelty costs ``n x cap`` products.

    The subsample is both what candidates are compared with and what calibrates the
    distance (``scoring.novelty_scale``), so an ordinary image stays ordinary."""
    ref = np.asarray(reference, np.float32)
    if len(ref) <= cap:
        return ref
    return ref[np.linspace(0, len(ref) - 1, cap).round().astype(np.int64)]


@batch_strategy("hybrid")
def hybrid(
    candidates: Sequence[Candidate], policy: SelectionPolicy, context: SelectionContext, k: int
) -> list[Selected]:
    """Uncertainty picks a shortlist, the flip pass refines it, a diverse batch is taken.

    1. Every image's score: ``uncertainty_weight * u + novelty_weight * v``, ``u`` the
       class-weighted uncertainty of its most doubtful candidate box (shown or not), ``v``
       its novelty against ``context.reference``. Images under ``min_score`` (every box
       clear-cut, or none, and nothing new) are not wanted, nor those within the duplicate
       distance of a training image (its label already answers them).
    2. The ``shortlist_factor * k`` best, near-duplicates collapsed onto the best-scored
       frame of each (by embedding).
    3. ``context.flip`` on the shortlist (if given) adds ``flip_weight * disagreement``.
    4. ``k`` picked by score-weighted k-center greedy over the embeddings, seeded by the
       best score. Without embeddings: the ``k`` best scores.
    """
    if k <= 0 or not candidates:
        return []
    n = len(candidates)
    conf, cls, owner = _flat_boxes(candidates)
    unc = scoring.batch_uncertainty(conf, cls, owner, n, context.class_weights)
    found = _embeddings(candidates)
    emb, real = found if found is not None else (None, np.zeros(n, bool))
    reference = context.reference
    novel = np.zeros(n)
    nearest_training = np.ones(n)  # unknown: as far as unrelated images
    scale = 0.0  # how far isolated training images lie from their nearest neighbour
    # A reference of another length (another model's features) cannot be compared with.
    if (
        emb is not None
        and reference is not None
        and len(reference)
        and reference.shape[1:] == emb.shape[1:]
    ):
        has = slice(None) if real.all() else np.flatnonzero(real)  # no 180 MB copy
        ref = _capped(reference, policy.reference_cap)
        distance = scoring.novelty(emb[has], ref)
        assert distance is not None
        scale = scoring.novelty_scale(ref)
        novel[has] = scoring.novelty_part(distance, scale)
        nearest_training[has] = distance
    score = policy.uncertainty_weight * unc.score + policy.novelty_weight * novel
    duplicate = policy.duplicate_distance
    if duplicate is None:
        duplicate = policy.duplicate_ratio * scale

    # A frame of a scene the champion was trained on asks what its label already answered.
    answered = nearest_training <= duplicate
    wanted = np.flatnonzero((score > 0.0) & (score >= policy.min_score) & ~answered)
    if not len(wanted):
        return []
    # Best first; exact ties by content hash (ids follow commit order, content does not).
    hashes = np.array([candidates[i].content_hash for i in wanted])
    wanted = wanted[np.lexsort((hashes, -score[wanted]))]
    size = max(k, math.ceil(policy.shortlist_factor * k))
    if emb is None:
        shortlist = wanted[:size]
    else:
        keep = diversity.collapse_near_duplicates(emb[wanted], duplicate, limit=size)
        shortlist = wanted[keep]

    flip = np.zeros(len(shortlist))
    if context.flip is not None:
        found = context.flip([candidates[i] for i in shortlist])
        flip = np.array([float(found.get(candidates[i].image_id, 0.0)) for i in shortlist])
    final = score[shortlist] + policy.flip_weight * flip

    if emb is None:
        order = np.lexsort((np.arange(len(shortlist)), -final))[:k]
        spread = np.full(len(order), np.nan)
    else:
        order, spread = diversity.k_center_greedy(
            emb[shortlist],
            final,
            k,
            diversity=policy.diversity,
            initial=nearest_training[shortlist] if policy.spread_from_reference else None,
        )
    chosen: list[Selected] = []
    for j, d in zip(order.tolist(), spread.tolist()):
        i = int(shortlist[j])
        parts = {
            "uncertainty": float(unc.score[i]),
            "class_weight": float(unc.class_weight[i]),
            "novelty": float(novel[i]),
            "score": float(final[j]),
        }
        if context.flip is not None:
            parts["flip"] = float(flip[j])
        if not math.isnan(d):
            parts["distance"] = float(d)
        decided = float(unc.confidence[i])
        chosen.append(
            Selected(
                candidates[i].image_id,
                "hybrid",
                float(final[j]),
                None if math.isnan(decided) else decided,
                parts=parts,
            )
        )
    return chosen


# --- the arms ---------------------------------------------------------------------------------


def is_confident(confs: Sequence[float], policy: SelectionPolicy) -> bool:
    """Every box at or above ``high``; true for an image without boxes."""
    return not len(confs) or min(confs) >= policy.high


def audit_draw(content_hash: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the image's content and the seed."""
    digest = hashlib.sha256(f"{seed}:{content_hash}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def control_size(policy: SelectionPolicy) -> int:
    """The control arm's share of the budget: ``ceil(budget * control_rate)``."""
    return min(policy.budget, math.ceil(policy.budget * policy.control_rate))


def draw_control(
    candidates: Sequence[Candidate], policy: SelectionPolicy, cycle: str | None
) -> list[Selected]:
    """The control arm: uniformly at random from all candidates, without replacement,
    reproducible from the policy's seed and the cycle; none outside a cycle.

    Each image, in content-hash order (the order ids come in differs between runs), gets a
    uniform draw from a generator seeded by ``(seed, cycle)``; the ``size`` smallest draws
    are a uniform sample. One generator instead of a hash per image: 100k images in ~0.1 s.
    """
    size = min(control_size(policy), len(candidates))
    if cycle is None or size == 0:
        return []
    ordered = sorted(candidates, key=lambda c: (c.content_hash, c.image_id))
    digest = hashlib.sha256(f"control:{policy.seed}:{cycle}".encode()).digest()
    draws = np.random.default_rng(int.from_bytes(digest[:8], "big")).random(len(ordered))
    smallest = np.argpartition(draws, size - 1)[:size]
    return [
        Selected(
            ordered[i].image_id,
            CONTROL_REASON,
            1.0 - float(draws[i]),
            max(ordered[i].confidences, default=None),
            arm="control",
            parts={"draw": float(draws[i])},
        )
        for i in smallest[np.argsort(draws[smallest], kind="stable")].tolist()
    ]


def select(
    candidates: Sequence[Candidate],
    policy: SelectionPolicy,
    context: SelectionContext | None = None,
) -> list[Selected]:
    """The images to queue this cycle: the control arm, audited ones, then the strategy's."""
    context = context or SelectionContext()
    control = draw_control(candidates, policy, context.cycle)
    if control:
        drawn = {s.image_id for s in control}
        candidates = [c for c in candidates if c.image_id not in drawn]
    budget = policy.budget - len(control)
    chosen = STRATEGIES[policy.strategy]
    uncertain: list[Selected] = []
    audit: list[Selected] = []
    for candidate in candidates:
        if is_confident(candidate.confidences, policy):
            draw = audit_draw(candidate.content_hash, policy.seed)
            if draw < policy.audit_rate:
                top = max(candidate.confidences, default=None)
                # Scored by the draw so the cut below keeps a random subset.
                audit.append(
                    Selected(
                        candidate.image_id,
                        AUDIT_REASON,
                        1.0 - draw,
                        top,
                        arm="audit",
                        parts={"draw": draw},
                    )
                )
            continue
        if isinstance(chosen, BatchStrategy):
            continue
        flag = chosen(candidate.confidences, policy)
        if flag is not None:
            uncertain.append(
                Selected(
                    candidate.image_id,
                    policy.strategy,
                    flag.score,
                    flag.confidence,
                    parts={policy.strategy: flag.score},
                )
            )
    audit_share = min(budget, math.ceil(policy.budget * policy.audit_rate))
    # Exact ties go by content hash, not by id: ids follow commit order, which differs
    # between runs (batches fanned out over Dask commit in any order), content does not.
    content = {c.image_id: c.content_hash for c in candidates}
    audit.sort(key=lambda s: (-s.score, content[s.image_id]))
    audit = audit[:audit_share]
    if isinstance(chosen, BatchStrategy):
        audited = {s.image_id for s in audit}
        rest = [c for c in candidates if c.image_id not in audited]
        return control + audit + chosen.pick(rest, policy, context, budget - len(audit))
    uncertain.sort(key=lambda s: (-s.score, content[s.image_id]))
    return control + audit + uncertain[: budget - len(audit)]
