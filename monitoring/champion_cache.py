"""The champion's version and registration time, as MLflow last said, kept for a few seconds.

The retraining conditions need the champion's age on every call, and asking MLflow each time
made ``/api/retraining/conditions`` ten times slower than the database part of it. MLflow
still owns the fact (ARCHITECTURE.md, "Where each fact lives"); this process keeps its last
answer per (MLflow URI, model name, alias) and asks again once it is ``champion_recheck_s``
old, as the predictor does for the weights. A move of the alias this process makes (promotion,
rollback, bootstrap: each emits its activity event; the API also calls ``invalidate``) drops
the entry at once, so this process never shows a champion it has itself replaced.

While MLflow is unreachable the last answer keeps serving, marked with its age so the
conditions can say it is stale; only one thread at a time waits for MLflow, the others answer
from the entry meanwhile. An entry past half its interval is asked again behind the answer
(in a thread of its own), so under steady traffic no caller waits for MLflow at all: a call
every few seconds used to put one MLflow round trip into one request in every interval, the
whole of ``/api/retraining/conditions``' p99. Only an entry left to expire (no call for a
whole interval) is asked again while its caller waits.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from mlflow.exceptions import MlflowException, RestException

from visionloop.events import EventKind, subscribe
from visionloop.models import ActivityEvent
from visionloop.registry import CHAMPION, RegistryError, client, reaching_mlflow
from visionloop.settings import Settings

Key = tuple[str, str, str]


@dataclass(frozen=True)
class ChampionBirth:
    """Which version is the champion and when it was registered (both None: no champion)."""

    created: datetime | None
    version: str | None
    stale_s: float | None = None
    """Seconds since MLflow last confirmed this, when that is longer than the recheck interval
    (MLflow did not answer since); None while the answer is fresh."""


def champion_birth(settings: Settings, alias: str = CHAMPION) -> ChampionBirth:
    """When the current champion was registered: asked of MLflow, which owns that fact."""
    try:
        with reaching_mlflow(settings):
            version = client(settings).get_model_version_by_alias(settings.model_name, alias)
    except RestException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return ChampionBirth(None, None)  # no registered model or no alias yet
        raise
    created = datetime.fromtimestamp(version.creation_timestamp / 1000, tz=UTC)
    return ChampionBirth(created, str(version.version))


@dataclass
class _Entry:
    answer: tuple[ChampionBirth, float]
    """MLflow's answer and the monotonic time it came, replaced as one (readers do not lock)."""
    asked_at: float  # monotonic time of the last question to MLflow, answered or not
    refreshing: threading.Lock = field(default_factory=threading.Lock)


_entries: dict[Key, _Entry] = {}
_entries_lock = threading.Lock()
_generation = 0
"""Counts invalidations: an answer asked for before one is not kept after it."""


def _key(settings: Settings, alias: str) -> Key:
    return (settings.mlflow_uri, settings.model_name, alias)


def cached_champion_birth(settings: Settings, alias: str = CHAMPION) -> ChampionBirth:
    """``champion_birth``, from this process's entry while it is younger than the recheck
    interval; past half of it one caller has MLflow asked again behind its answer, past all of
    it one caller asks and waits; the entry stays if MLflow fails.

    Raises what ``champion_birth`` raises only while there is no entry to fall back on.
    """
    key = _key(settings, alias)
    ttl = settings.champion_recheck_s
    with _entries_lock:
        entry, generation = _entries.get(key), _generation
    if entry is None:
        birth = champion_birth(settings, alias)
        answered = time.monotonic()
        with _entries_lock:
            if generation == _generation:
                _entries[key] = _Entry((birth, answered), answered)
        return birth
    since_asked = time.monotonic() - entry.asked_at
    if since_asked >= ttl / 2 and entry.refreshing.acquire(blocking=False):
        if since_asked >= ttl:
            _refresh_and_release(settings, alias, entry)
        else:
            threading.Thread(
                target=_refresh_and_release,
                args=(settings, alias, entry),
                name="champion-recheck",
                daemon=True,
            ).start()
    birth, answered = entry.answer
    age = time.monotonic() - answered
    if age <= ttl:
        return birth
    return ChampionBirth(birth.created, birth.version, stale_s=round(age, 1))


def _refresh_and_release(settings: Settings, alias: str, entry: _Entry) -> None:
    try:
        _refresh(settings, alias, entry)
    finally:
        entry.refreshing.release()


def _refresh(settings: Settings, alias: str, entry: _Entry) -> None:
    """Ask MLflow again for ``entry`` (an invalidation meanwhile has dropped it already)."""
    try:
        birth = champion_birth(settings, alias)
    except (RegistryError, MlflowException):
        # An outage (or MLflow failing inside): the last answer stands, asked again a recheck
        # interval from now, so callers do not queue up behind a server that is down.
        entry.asked_at = time.monotonic()
        return
    answered = time.monotonic()
    entry.answer, entry.asked_at = (birth, answered), answered


def invalidate(settings: Settings | None = None, alias: str = CHAMPION) -> None:
    """Forget the entry of ``settings``' model (every entry without settings): the next call
    asks MLflow. For whoever moves an alias in this process."""
    global _generation
    with _entries_lock:
        _generation += 1
        if settings is None:
            _entries.clear()
        else:
            _entries.pop(_key(settings, alias), None)


_ALIAS_MOVES = {EventKind.MODEL_PROMOTED.value, EventKind.MODEL_ROLLED_BACK.value}


def _on_event(event: ActivityEvent) -> None:
    # The event does not say which MLflow or model name it was about: forget every entry,
    # which costs one MLflow call per entry, once per promotion.
    if event.kind in _ALIAS_MOVES:
        invalidate()


subscribe(_on_event)
