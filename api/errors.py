"""Every error the API answers is JSON that says what was wrong.

The body is ``{"error": kind, "detail": sentence}``.

``error`` is a stable machine-readable kind (``not_found``, ``retrain_running``...), ``detail``
the sentence a person reads. Domain errors raised by the code the flows share are mapped to
their HTTP status here, once, so routers never translate exceptions themselves.
"""

from __future__ import annotations

import logging
import uuid
from http import HTTPStatus
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.exc import DisconnectionError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout
from starlette.exceptions import HTTPException as StarletteHTTPException

from labeling.preview import PreviewUnavailable
from labeling.provision import LabelStudioError
from labeling.review_actions import QueueItemNotFound, ReviewConflict
from labeling.sync import InvalidAnnotation
from monitoring.flow_runs import FlowRunFinished, FlowRunNotFound
from serving.predictor import NoChampionError
from training.model_catalog import UnknownModelVersion
from training.retrain_guard import RetrainBusy
from training.snapshot_export import UnknownSnapshot
from training.snapshots import ManifestRejected
from visionloop.images import ImageRejected
from visionloop.registry import RegistryError, WeightsChecksumError
from visionloop.storage import StorageError

log = logging.getLogger(__name__)


class ErrorBody(BaseModel):
    model_config = ConfigDict(extra="allow")

    error: str = Field(
        description="Machine-readable kind of error, e.g. not_found, retrain_running."
    )
    detail: str = Field(description="What was wrong, in a sentence.")


class FieldError(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationErrorBody(ErrorBody):
    errors: list[FieldError] = Field(description="Each invalid part of the request.")


class BusyErrorBody(ErrorBody):
    retraining_run_id: int | None = Field(description="The retraining run that is still running.")
    flow_run_id: str | None = Field(description="Its Prefect flow run.")


class ImageErrorBody(ErrorBody):
    code: str = Field(
        description="Why the file is unusable: empty, not_an_image, truncated, corrupt..."
    )


class NotFound(LookupError):
    """The resource a request names does not exist (→ 404)."""


class Conflict(RuntimeError):
    """The request is valid but the platform's state does not allow it now (→ 409)."""


class PayloadTooLarge(ValueError):
    """The upload is larger than the API accepts (→ 413)."""


class ServiceUnavailable(RuntimeError):
    """A service the request needs (Prefect, MLflow, the object store) failed (→ 503)."""


_DESCRIPTIONS = {
    400: "The body could not be parsed (not JSON, not UTF-8, or a broken multipart form).",
    401: "Missing, malformed or wrong bearer token.",
    404: "What the request names does not exist.",
    409: "The platform's state does not allow this now.",
    413: "The request body is larger than the API accepts (max_body_bytes).",
    422: "The request is invalid; `errors` says where.",
    503: (
        "A service this needs (the database, MLflow, Prefect, the object store) is "
        "unavailable, or there is no champion."
    ),
}
_MODELS: dict[int, type[ErrorBody]] = {422: ValidationErrorBody}


def responses(*codes: int, **models: type[ErrorBody]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` for the error statuses an operation can answer.

    ``models`` overrides the body model of a status, keyed ``s409=BusyErrorBody``.
    """
    out: dict[int | str, dict[str, Any]] = {}
    for code in codes:
        model = models.get(f"s{code}") or _MODELS.get(code, ErrorBody)
        out[code] = {
            "model": model,
            "description": _DESCRIPTIONS.get(code, HTTPStatus(code).phrase),
        }
    return out


AUTH = responses(401, 503)
"""What a token-guarded operation can add: 401, and 503 when the server has no token set."""
BODY = responses(400, 413, 422)
"""What an operation with a request body can add (413: over max_body_bytes)."""
DATABASE_UNAVAILABLE = (
    "the platform database is unavailable; check that it is running and that "
    "VISIONLOOP_DATABASE_URL points at it, then try again"
)
"""Says which service and which setting, never the statement, driver or host: those are for
the server's log."""
_KINDS = {413: "payload_too_large"}


def content(media_type: str | tuple[str, ...], description: str) -> dict[int | str, dict[str, Any]]:
    """A 200 that is not JSON (HTML, a zip, an event stream), or that is one of several media
    types, documented so that the error responses beside it stay documented as JSON."""
    types = (media_type,) if isinstance(media_type, str) else media_type
    return {
        200: {
            "description": description,
            # JSON beside another media type is a document of its own: any JSON value.
            "content": {
                t: {"schema": {} if t == "application/json" else {"type": "string"}} for t in types
            },
        }
    }


def _kind(status: int) -> str:
    if status in _KINDS:
        return _KINDS[status]
    try:
        return HTTPStatus(status).phrase.lower().replace(" ", "_").replace("-", "_")
    except ValueError:
        return "http_error"


def error_response(
    status: int, kind: str, detail: str, headers: dict[str, str] | None = None, **extra: Any
) -> JSONResponse:
    return JSONResponse(
        jsonable_encoder({"error": kind, "detail": detail, **extra}),
        status_code=status,
        headers=headers,
    )


def _location(loc: Any) -> str:
    return ".".join(str(part) for part in loc)


async def _http_error(_request: Request, exc: StarletteHTTPException) -> JSONResponse:
    detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
    return error_response(
        exc.status_code, _kind(exc.status_code), detail, getattr(exc, "headers", None)
    )


async def _validation_error(_request: Request, exc: RequestValidationError) -> JSONResponse:
    errors = [
        {
            "loc": [str(p) if not isinstance(p, int) else p for p in e.get("loc", ())],
            "msg": e.get("msg", ""),
            "type": e.get("type", ""),
        }
        for e in exc.errors()
    ]
    detail = "; ".join(f"{_location(e['loc'])}: {e['msg']}" for e in errors) or "invalid request"
    return error_response(422, "validation_error", detail, errors=errors)


async def _invalid_annotation(_request: Request, exc: InvalidAnnotation) -> JSONResponse:
    errors = [{"loc": ["body", "boxes"], "msg": p, "type": "invalid_label"} for p in exc.problems]
    return error_response(422, "invalid_label", f"the label cannot be used: {exc}", errors=errors)


async def _retrain_busy(_request: Request, exc: RetrainBusy) -> JSONResponse:
    return error_response(
        409,
        "retrain_running",
        str(exc),
        retraining_run_id=exc.holder.id,
        flow_run_id=exc.holder.prefect_flow_run_id,
    )


async def _image_rejected(_request: Request, exc: ImageRejected) -> JSONResponse:
    return error_response(
        422, "invalid_image", f"the upload is not a usable image: {exc.detail}", code=exc.code
    )


async def _no_champion(_request: Request, exc: NoChampionError) -> JSONResponse:
    return error_response(503, "no_champion", str(exc))


async def _not_found(_request: Request, exc: LookupError) -> JSONResponse:
    return error_response(404, "not_found", str(exc))


async def _conflict(_request: Request, exc: RuntimeError) -> JSONResponse:
    return error_response(409, "conflict", str(exc))


async def _snapshot_rejected(_request: Request, exc: ManifestRejected) -> JSONResponse:
    # The stored snapshot fails its own hashes or paths: nothing to retry, a person must look.
    return error_response(409, "snapshot_rejected", str(exc))


async def _weights_untrusted(_request: Request, exc: WeightsChecksumError) -> JSONResponse:
    # Not an outage: the registry answered, and what it holds must not be loaded.
    return error_response(409, "weights_untrusted", str(exc))


async def _too_large(_request: Request, exc: PayloadTooLarge) -> JSONResponse:
    return error_response(413, "payload_too_large", str(exc))


async def _unavailable(_request: Request, exc: Exception) -> JSONResponse:
    log.warning("service unavailable: %s: %s", type(exc).__name__, exc)
    return error_response(503, "service_unavailable", f"{type(exc).__name__}: {exc}")


async def _database_unavailable(request: Request, exc: Exception) -> JSONResponse:
    # The statement, its parameters and the host stay in the log: they tell an intruder the
    # schema and the network, and a person reading the answer nothing they can act on.
    log.warning("database unavailable on %s %s: %s", request.method, request.url.path, exc)
    return error_response(503, "database_unavailable", DATABASE_UNAVAILABLE)


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    request_id = uuid.uuid4().hex
    log.error(
        "unhandled error %s on %s %s", request_id, request.method, request.url.path, exc_info=exc
    )
    return error_response(
        500,
        "internal_error",
        f"the API failed to answer this request; the server log has the cause under "
        f"request id {request_id}",
        headers={"X-Request-ID": request_id},
        request_id=request_id,
    )


def install(app: FastAPI) -> None:
    """Register the JSON error handlers on ``app``."""
    app.add_exception_handler(StarletteHTTPException, _http_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(RetrainBusy, _retrain_busy)  # type: ignore[arg-type]
    app.add_exception_handler(ImageRejected, _image_rejected)  # type: ignore[arg-type]
    app.add_exception_handler(InvalidAnnotation, _invalid_annotation)  # type: ignore[arg-type]
    app.add_exception_handler(NoChampionError, _no_champion)  # type: ignore[arg-type]
    for missing in (
        NotFound,
        UnknownModelVersion,
        UnknownSnapshot,
        FlowRunNotFound,
        PreviewUnavailable,
        QueueItemNotFound,
    ):
        app.add_exception_handler(missing, _not_found)  # type: ignore[arg-type]
    for conflict in (Conflict, FlowRunFinished, ReviewConflict):
        app.add_exception_handler(conflict, _conflict)  # type: ignore[arg-type]
    app.add_exception_handler(PayloadTooLarge, _too_large)  # type: ignore[arg-type]
    app.add_exception_handler(ManifestRejected, _snapshot_rejected)  # type: ignore[arg-type]
    app.add_exception_handler(WeightsChecksumError, _weights_untrusted)  # type: ignore[arg-type]
    # The services the API stands on: their failures are theirs to report, as 503 with the cause.
    for unavailable in (
        ServiceUnavailable,
        LabelStudioError,
        StorageError,
        RegistryError,
        MlflowException,
        httpx.HTTPError,
        ConnectionError,
    ):
        app.add_exception_handler(unavailable, _unavailable)
    # Connection refused, dropped, timed out or the database gone: an outage, not a bug.
    for outage in (OperationalError, InterfaceError, DisconnectionError, PoolTimeout):
        app.add_exception_handler(outage, _database_unavailable)
    app.add_exception_handler(Exception, _internal)
