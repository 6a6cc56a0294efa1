"""Which predicted images deserve a human's time: uncertainty sampling under a budget.

An image is *confident* when every box is at or above ``high`` (or it has no box: the model
is sure there is nothing). Every other image is judged by the policy's strategy from its
box confidences: a ``Flag`` (a score, higher = more worth reviewing, and the deciding box's
confidence) or ``None`` when the strategy does not want it. Strategies are plain functions
registered by name in ``STRATEGIES``; ``SelectionPolicy.strategy`` picks one.

Besides the uncertain images, a small random share of the confident ones is audited: an
image the model is sure about is where a silent failure hides. Whether an image is audited
depends only on its content hash and the policy's seed, so the choice is reproducible and
independent of what else was in the batch.

``select`` returns at most ``budget`` items per cycle: the audit sample takes at most its
own share (``ceil(budget * audit_rate)``), the uncertain images, most uncertain first, the
rest. Each item says why it was chosen (``reason``, stored as the queue's ``flagged_reason``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from visionloop.settings import (
    AUDIT_RATE,
    LABELING_BUDGET,
    UNCERTAINTY_HIGH,
    UNCERTAINTY_LOW,
    Settings,
)

StrategyName = Literal["confidence_band", "least_confidence", "margin", "entropy"]

AUDIT_REASON = "random_audit"
DEFAULT_STRATEGY: StrategyName = "confidence_band"


class SelectionPolicy(BaseModel):
    """How one cycle chooses images for review (a Prefect flow parameter, hence pydantic)."""

    strategy: StrategyName = DEFAULT_STRATEGY
    low: float = Field(default=UNCERTAINTY_LOW, ge=0.0, le=1.0)
    high: float = Field(default=UNCERTAINTY_HIGH, ge=0.0, le=1.0)
    budget: int = Field(default=LABELING_BUDGET, ge=0)
    audit_rate: float = Field(default=AUDIT_RATE, ge=0.0, le=1.0)
    seed: int = 0

    @model_validator(mode="after")
    def _band(self) -> SelectionPolicy:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must not exceed high ({self.high})")
        return self

    @classmethod
    def from_settings(
        cls, settings: Settings, *, drift_level: str | None = None, **overrides: object
    ) -> SelectionPolicy:
        """The settings' policy; while drift is yellow or red, confident images are audited at
        ``drift_audit_rate``: under drift the model misses defects with confidence (it finds
        no box), so uncertainty alone would starve the queue of the new conditions."""
        values: dict[str, object] = {
            "low": settings.uncertainty_low,
            "high": settings.uncertainty_high,
            "budget": settings.labeling_budget,
            "seed": settings.seed,
        }
        if drift_level in ("yellow", "red"):
            values["audit_rate"] = max(AUDIT_RATE, settings.drift_audit_rate)
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class Candidate:
    image_id: int
    content_hash: str
    confidences: Sequence[float]


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


Strategy = Callable[[Sequence[float], SelectionPolicy], Flag | None]
STRATEGIES: dict[str, Strategy] = {}


def strategy(name: str) -> Callable[[Strategy], Strategy]:
    def register(fn: Strategy) -> Strategy:
        STRATEGIES[name] = fn
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


def is_confident(confs: Sequence[float], policy: SelectionPolicy) -> bool:
    """Every box at or above ``high``; true for an image without boxes."""
    return all(c >= policy.high for c in confs)


def audit_draw(content_hash: str, seed: int) -> float:
    """A uniform number in [0, 1) fixed by the image's content and the seed."""
    digest = hashlib.sha256(f"{seed}:{content_hash}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def select(candidates: Sequence[Candidate], policy: SelectionPolicy) -> list[Selected]:
    """The images to queue this cycle, audited ones first, then the most uncertain."""
    score = STRATEGIES[policy.strategy]
    uncertain: list[Selected] = []
    audit: list[Selected] = []
    for candidate in candidates:
        if is_confident(candidate.confidences, policy):
            draw = audit_draw(candidate.content_hash, policy.seed)
            if draw < policy.audit_rate:
                top = max(candidate.confidences, default=None)
                # Scored by the draw so the cut below keeps a random subset.
                audit.append(Selected(candidate.image_id, AUDIT_REASON, 1.0 - draw, top))
            continue
        flag = score(candidate.confidences, policy)
        if flag is not None:
            uncertain.append(
                Selected(candidate.image_id, policy.strategy, flag.score, flag.confidence)
            )
    audit_share = min(policy.budget, math.ceil(policy.budget * policy.audit_rate))
    # Exact ties go by content hash, not by id: ids follow commit order, which differs
    # between runs (batches fanned out over Dask commit in any order), content does not.
    content = {c.image_id: c.content_hash for c in candidates}
    audit.sort(key=lambda s: (-s.score, content[s.image_id]))
    uncertain.sort(key=lambda s: (-s.score, content[s.image_id]))
    audit = audit[:audit_share]
    return audit + uncertain[: policy.budget - len(audit)]
