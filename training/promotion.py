"""Moving the `champion` alias: promotion keeps the old champion as `previous`, rollback undoes it.

MLflow owns which version is the champion; these are the only two ways the platform moves it
(the retrain flow after its gate, and the API by hand), so each leaves an activity event and
notifies the webhook.
"""

from __future__ import annotations

from dataclasses import dataclass

from visionloop.events import EventKind
from visionloop.notify import notify
from visionloop.registry import (
    CHAMPION,
    PREVIOUS,
    SHA256_TAG,
    RegistryError,
    WeightsChecksumError,
    get_alias,
    get_version,
    set_alias,
)
from visionloop.settings import Settings


@dataclass(frozen=True)
class AliasChange:
    champion: str  # the version that is champion now
    previous: str | None  # the version now under `previous`
    changed: bool  # False: it already was the champion


def _loadable(settings: Settings, version: str) -> None:
    """A clear error for a version that does not exist or that serving would refuse to load:
    an alias must never point at weights nobody can verify."""
    if not get_version(settings, version).sha256:
        raise WeightsChecksumError(
            f"model version {version} has no {SHA256_TAG} tag, so serving would refuse it; "
            "vet its weights and run `visionloop trust-weights` first"
        )


def promote(settings: Settings, version: str, reason: str = "") -> AliasChange:
    """Make ``version`` the champion; the one it replaces becomes `previous`."""
    _loadable(settings, version)
    current = get_alias(settings, CHAMPION)
    if current is not None and current.version == version:
        previous = get_alias(settings, PREVIOUS)
        return AliasChange(version, previous.version if previous else None, False)
    if current is not None:
        set_alias(settings, PREVIOUS, current.version)
    set_alias(settings, CHAMPION, version)
    old = current.version if current else None
    notify(
        EventKind.MODEL_PROMOTED,
        f"model version {version} is the champion"
        + (f" (was {old})" if old else "")
        + (f": {reason}" if reason else ""),
        {"version": version, "previous": old, "reason": reason},
    )
    return AliasChange(version, old, True)


def rollback(settings: Settings, to_version: str | None = None, reason: str = "") -> AliasChange:
    """Make `previous` (or ``to_version``) the champion again.

    The demoted champion becomes `previous`, so a rollback can itself be rolled back.
    """
    current = get_alias(settings, CHAMPION)
    if to_version is None:
        previous = get_alias(settings, PREVIOUS)
        if previous is None:
            raise RegistryError("no `previous` model version to roll back to")
        to_version = previous.version
    _loadable(settings, to_version)
    if current is not None and current.version == to_version:
        return AliasChange(to_version, None, False)
    set_alias(settings, CHAMPION, to_version)
    if current is not None:
        set_alias(settings, PREVIOUS, current.version)
    old = current.version if current else None
    notify(
        EventKind.MODEL_ROLLED_BACK,
        f"champion rolled back to model version {to_version}"
        + (f" from {old}" if old else "")
        + (f": {reason}" if reason else ""),
        {"version": to_version, "previous": old, "reason": reason},
    )
    return AliasChange(to_version, old, True)
