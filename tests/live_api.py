"""The API as tests run it beside the session stack: served for real on a free port."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
import uvicorn

from api.main import create_app
from cli.stack import free_port
from visionloop.settings import get_settings


@contextmanager
def served_api(env: dict[str, str], start_timeout_s: float = 30.0) -> Iterator[int]:
    """Uvicorn serving ``create_app()`` under ``env`` (on top of the test process's own) in a
    thread; yields its port. Raw sockets and streaming clients need a real server, not
    ``TestClient``."""
    patch = pytest.MonkeyPatch()
    for key, value in env.items():
        patch.setenv(key, value)
    get_settings.cache_clear()
    port = free_port()
    server = uvicorn.Server(
        uvicorn.Config(create_app(), host="127.0.0.1", port=port, log_level="warning")
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        yield port
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        patch.undo()
        get_settings.cache_clear()
