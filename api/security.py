"""The API's bearer tokens: which token opens what, and one strict way to read them.

Three secrets, three reaches:

* ``VISIONLOOP_API_TOKEN`` opens everything: mutating operations and data-bearing reads;
* ``VISIONLOOP_API_READ_TOKEN`` opens the data-bearing reads (empty: the API token does);
* ``VISIONLOOP_WEBHOOK_SECRET`` opens the Label Studio webhook and nothing else, because
  Label Studio users can read it.

The ASGI gate (``api/gate.py``) checks them before a request's body is read; the route
dependencies here check them again, so a route moved out from under the gate stays guarded.
"""

from __future__ import annotations

import hmac
import re
from collections.abc import Iterable

from fastapi import Request, Security, status
from fastapi.exceptions import HTTPException
from fastapi.security import HTTPBearer

from visionloop.settings import Settings, get_settings

# Visible ASCII only, one space after the scheme: anything else is a malformed header (401),
# never something to decode or strip.
_BEARER = re.compile(rb"(?i:bearer) ([\x21-\x7e]+)")

API_TOKEN_MISSING = "VISIONLOOP_API_TOKEN is not set on the API server"
UNAUTHORIZED = "missing or wrong bearer token (VISIONLOOP_API_TOKEN)"
READ_UNAUTHORIZED = (
    "missing or wrong bearer token (VISIONLOOP_API_READ_TOKEN or VISIONLOOP_API_TOKEN)"
)
WEBHOOK_UNAUTHORIZED = (
    "missing or wrong bearer token (VISIONLOOP_WEBHOOK_SECRET or VISIONLOOP_API_TOKEN)"
)
CHALLENGE = {"WWW-Authenticate": "Bearer"}


def bearer(values: list[bytes]) -> bytes | None:
    """The token of the one ``Authorization: Bearer <token>`` header, or None."""
    if len(values) != 1:
        return None  # none, or several: ambiguous, so neither counts
    match = _BEARER.fullmatch(values[0])
    return match.group(1) if match else None


def _secret(value: object) -> bytes:
    return value.get_secret_value().encode()  # type: ignore[attr-defined]


def api_tokens(settings: Settings) -> list[bytes]:
    return [t for t in (_secret(settings.api_token),) if t]


def read_tokens(settings: Settings) -> list[bytes]:
    return [t for t in (_secret(settings.api_read_token), *api_tokens(settings)) if t]


def webhook_tokens(settings: Settings) -> list[bytes]:
    return [t for t in (_secret(settings.webhook_secret), *api_tokens(settings)) if t]


def accepted(token: bytes | None, expected: Iterable[bytes]) -> bool:
    """Whether ``token`` is one of ``expected``, compared in constant time on bytes."""
    if token is None:
        return False
    # Every candidate is compared, so the time does not say which one was close.
    return any([hmac.compare_digest(token, want) for want in expected])


Refusal = tuple[int, str, dict[str, str] | None]
"""Status, the sentence a person reads, and the response headers."""


def refusal(
    headers: Iterable[tuple[bytes, bytes]], expected: list[bytes], refused: str
) -> Refusal | None:
    """Why raw ASGI ``headers`` do not open what ``expected`` guards, or None when they do.

    The one check behind the gate and the route dependencies."""
    if not expected:
        return status.HTTP_503_SERVICE_UNAVAILABLE, API_TOKEN_MISSING, None
    if accepted(bearer([v for k, v in headers if k == b"authorization"]), expected):
        return None
    return status.HTTP_401_UNAUTHORIZED, refused, CHALLENGE


def _check(request: Request, expected: list[bytes], refused: str) -> None:
    denied = refusal(request.scope["headers"], expected, refused)
    if denied is not None:
        code, detail, headers = denied
        raise HTTPException(code, detail, headers=headers)


# auto_error=False: the check below answers every refusal in the API's JSON; these only put
# the bearer schemes into the OpenAPI document.
_api_scheme = HTTPBearer(
    scheme_name="apiToken", description="VISIONLOOP_API_TOKEN", auto_error=False
)
_read_scheme = HTTPBearer(
    scheme_name="readToken",
    description="VISIONLOOP_API_READ_TOKEN (or VISIONLOOP_API_TOKEN)",
    auto_error=False,
)
_webhook_scheme = HTTPBearer(
    scheme_name="webhookSecret",
    description="VISIONLOOP_WEBHOOK_SECRET (or VISIONLOOP_API_TOKEN)",
    auto_error=False,
)


def require_api_token(request: Request, _: object = Security(_api_scheme)) -> None:
    """Refuse the request unless it carries ``Authorization: Bearer <VISIONLOOP_API_TOKEN>``."""
    _check(request, api_tokens(get_settings()), UNAUTHORIZED)


def require_read_token(request: Request, _: object = Security(_read_scheme)) -> None:
    """Refuse a data-bearing read without the read token (or the API token)."""
    _check(request, read_tokens(get_settings()), READ_UNAUTHORIZED)


def require_webhook_token(request: Request, _: object = Security(_webhook_scheme)) -> None:
    """Refuse a webhook call without the webhook secret (or the API token)."""
    _check(request, webhook_tokens(get_settings()), WEBHOOK_UNAUTHORIZED)
