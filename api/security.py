"""Bearer-token check for the API's mutating endpoints (``VISIONLOOP_API_TOKEN``)."""

from __future__ import annotations

import secrets

from fastapi import Header, HTTPException, status

from visionloop.settings import get_settings


def require_api_token(authorization: str | None = Header(default=None)) -> None:
    """Refuse the request unless it carries ``Authorization: Bearer <VISIONLOOP_API_TOKEN>``."""
    expected = get_settings().api_token.get_secret_value()
    if not expected:
        raise HTTPException(
            status.HTTP_503_SERVICE_UNAVAILABLE, "VISIONLOOP_API_TOKEN is not set on the API server"
        )
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip(), expected):
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            "missing or wrong bearer token (VISIONLOOP_API_TOKEN)",
            headers={"WWW-Authenticate": "Bearer"},
        )
