"""Model versions from the MLflow registry, and moving the `champion` alias by hand."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Body, Path, Query

from api.deps import SettingsDep, Token
from api.errors import AUTH, BODY, Conflict, responses
from api.schemas import VERSION_PATTERN, AliasChangeOut, ModelsOut, PromoteIn, RollbackIn
from monitoring.champion_cache import invalidate as forget_champion
from training.model_catalog import catalog, require_version
from training.promotion import promote, rollback
from visionloop.registry import RegistryError, RegistryUnavailable

router = APIRouter(prefix="/api/models", tags=["models"])

Version = Annotated[str, Path(pattern=VERSION_PATTERN, description="Registry version number.")]


@router.get("", response_model=ModelsOut, responses=responses(422, 503))
def models(settings: SettingsDep, limit: Annotated[int, Query(ge=1, le=200)] = 20) -> ModelsOut:
    """The newest versions with their aliases, training metrics and training snapshot's hash."""
    return ModelsOut.model_validate(catalog(settings, limit))


@router.post(
    "/{version}/promote",
    response_model=AliasChangeOut,
    dependencies=[Token],
    responses={**AUTH, **BODY, **responses(404, 409)},
)
def promote_version(
    settings: SettingsDep, version: Version, body: Annotated[PromoteIn | None, Body()] = None
) -> AliasChangeOut:
    """Make ``version`` the champion; the one it replaces becomes `previous`. Serving follows
    within the predictor's recheck interval, without a restart.

    409 when the version's weights carry no checksum (see `visionloop trust-weights`)."""
    require_version(settings, version)
    change = promote(
        settings, version, reason=(body.reason if body else "") or "promoted through the API"
    )
    forget_champion(settings)  # the conditions show the new champion from the next call on
    return AliasChangeOut.model_validate(change)


@router.post(
    "/rollback",
    response_model=AliasChangeOut,
    dependencies=[Token],
    responses={**AUTH, **BODY, **responses(404, 409)},
)
def rollback_champion(
    settings: SettingsDep, body: Annotated[RollbackIn | None, Body()] = None
) -> AliasChangeOut:
    """Make `previous` (or ``to_version``) the champion again.

    409 when there is nothing to go back to."""
    body = body or RollbackIn()
    if body.to_version is not None:
        require_version(settings, body.to_version)
    try:
        change = rollback(
            settings, body.to_version, reason=body.reason or "rolled back through the API"
        )
    except RegistryUnavailable:
        raise  # an outage stays a 503
    except RegistryError as exc:  # no `previous` alias, or untrusted weights: a state
        raise Conflict(str(exc)) from exc
    forget_champion(settings)  # the conditions show the new champion from the next call on
    return AliasChangeOut.model_validate(change)
