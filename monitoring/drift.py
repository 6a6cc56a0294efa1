"""Drift between the champion's training reference and the current production window.

Evidently runs the statistical test (selectable) per feature. On top of its per-feature
verdicts this module derives one number a person can act on, the drift score in [0, 1]:

* each feature's *evidence ratio* r says how far past its test's threshold it is:
  for p-value tests ``r = log(p) / log(alpha / m)`` (Bonferroni over the m features, so twelve
  features do not raise twelve false alarms), for distance tests ``r = statistic / threshold``;
  r = 1 is exactly the test's drift threshold;
* its severity is ``1 - 0.7 ** r``: 0.3 at the threshold, 0.7 at about 3.4 times the evidence;
* the drift score is the worst feature's severity, and the level is green / yellow / red by the
  configured thresholds (0.3 and 0.7 by default).

So one strongly shifted feature (a darker line camera, a blurred lens) turns the level red
on its own, while a window from the reference distribution stays green.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import pandas as pd

from visionloop.models import DriftLevel

if TYPE_CHECKING:
    from evidently.core.report import Snapshot

# Evidently's numeric stat tests by what they return.
P_VALUE_TESTS = frozenset(
    {"ks", "t_test", "mannw", "anderson", "cramer_von_mises", "empirical_mmd"}
)
DISTANCE_TESTS = frozenset({"psi", "wasserstein", "jensenshannon", "kl_div", "hellinger"})
STAT_TESTS = P_VALUE_TESTS | DISTANCE_TESTS

_SEVERITY_BASE = 0.7
_P_FLOOR = 1e-300  # log(0) guard: a p-value of exactly 0 is "overwhelming", not infinite


class DriftError(ValueError):
    """The drift inputs cannot give a verdict (unknown test, no shared features, ...)."""


@dataclass(frozen=True)
class FeatureDrift:
    name: str
    statistic: float  # p-value for p-value tests, distance otherwise
    p_value: float | None
    threshold: float
    drifted: bool
    severity: float


@dataclass(frozen=True)
class DriftOutcome:
    stat_test: str
    drift_score: float
    drift_share: float
    p_value: float | None  # Bonferroni-adjusted smallest p-value (p-value tests only)
    dataset_drift: bool
    level: DriftLevel
    reference_size: int
    current_size: int
    features: dict[str, FeatureDrift] = field(default_factory=dict)
    html: str = ""

    @property
    def drifted_features(self) -> list[str]:
        """Drifted features, most severe first."""
        ranked = sorted(self.features.values(), key=lambda f: -f.severity)
        return [f.name for f in ranked if f.drifted]

    def features_dict(self) -> dict[str, dict[str, Any]]:
        return {name: asdict(f) for name, f in self.features.items()}


def level_for(score: float, yellow: float, red: float) -> DriftLevel:
    if score >= red:
        return DriftLevel.red
    if score >= yellow:
        return DriftLevel.yellow
    return DriftLevel.green


def _severity(ratio: float) -> float:
    return 1.0 - _SEVERITY_BASE ** max(ratio, 0.0)


def _comparable_columns(reference: pd.DataFrame, current: pd.DataFrame) -> list[str]:
    shared = [c for c in reference.columns if c in current.columns]
    numeric = [c for c in shared if pd.api.types.is_numeric_dtype(reference[c])]
    # A column constant in both windows carries no signal and breaks several tests.
    return [c for c in numeric if pd.concat([reference[c], current[c]]).dropna().nunique() > 1]


def _check_inputs(reference: pd.DataFrame, current: pd.DataFrame, stat_test: str) -> list[str]:
    """The columns to compare; ``DriftError`` when the inputs cannot give a verdict."""
    if stat_test not in STAT_TESTS:
        raise DriftError(
            f"unknown drift test {stat_test!r}; choose one of {', '.join(sorted(STAT_TESTS))} "
            "(VISIONLOOP_DRIFT_STAT_TEST)"
        )
    columns = _comparable_columns(reference, current)
    if not columns:
        raise DriftError("reference and current windows share no varying numeric feature")
    if len(reference) < 2 or len(current) < 2:
        raise DriftError(
            f"need at least 2 rows on each side, got {len(reference)} and {len(current)}"
        )
    return columns


def _run_report(
    reference: pd.DataFrame, current: pd.DataFrame, columns: list[str], stat_test: str
) -> Snapshot:
    """Evidently's snapshot of its per-column drift tests."""
    from evidently import Report
    from evidently.presets import DataDriftPreset

    report = Report([DataDriftPreset(columns=columns, method=stat_test)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's small-sample warnings say nothing new here
        return report.run(current[columns], reference[columns])


def _per_column(snapshot: Snapshot, columns: list[str]) -> dict[str, tuple[float, float]]:
    """Each compared column's test statistic and Evidently's threshold for it."""
    return {
        m["config"]["column"]: (float(m["value"]), float(m["config"]["threshold"]))
        for m in snapshot.dict()["metrics"]
        if m["config"].get("column") in columns
    }


def _feature_drift(
    name: str, value: float, threshold: float, is_p_value: bool, n_features: int
) -> FeatureDrift:
    if math.isnan(value):
        value = 1.0 if is_p_value else 0.0
    if is_p_value:
        corrected = threshold / n_features
        ratio = math.log(max(value, _P_FLOOR)) / math.log(corrected)
        drifted = value < corrected
    else:
        ratio = value / threshold
        drifted = value >= threshold
    return FeatureDrift(
        name=name,
        statistic=value,
        p_value=value if is_p_value else None,
        threshold=threshold,
        drifted=drifted,
        severity=round(_severity(ratio), 4),
    )


def _adjusted_p_value(features: dict[str, FeatureDrift]) -> float:
    """The smallest p-value, Bonferroni-adjusted over the features."""
    return min(1.0, min(f.statistic for f in features.values()) * len(features))


def compute_drift(
    reference: pd.DataFrame,
    current: pd.DataFrame,
    *,
    stat_test: str = "ks",
    yellow: float = 0.3,
    red: float = 0.7,
    with_html: bool = False,
) -> DriftOutcome:
    columns = _check_inputs(reference, current, stat_test)
    snapshot = _run_report(reference, current, columns, stat_test)
    per_column = _per_column(snapshot, columns)
    is_p_value = stat_test in P_VALUE_TESTS
    features = {
        name: _feature_drift(name, *per_column[name], is_p_value, len(columns)) for name in columns
    }
    score = max(f.severity for f in features.values())
    share = sum(f.drifted for f in features.values()) / len(features)
    return DriftOutcome(
        stat_test=stat_test,
        drift_score=round(score, 4),
        drift_share=round(share, 4),
        p_value=_adjusted_p_value(features) if is_p_value else None,
        dataset_drift=share >= 0.5,
        level=level_for(score, yellow, red),
        reference_size=len(reference),
        current_size=len(current),
        features=features,
        html=snapshot.get_html_str(as_iframe=False) if with_html else "",
    )
