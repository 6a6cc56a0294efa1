"""Shared fixtures: one real local stack per test session, on free ports, in a temporary data dir.

The stack is started by the same code as `visionloop up` the first time a test asks for it,
and stopped at the end by `down`, which touches only the processes it started.
"""

from __future__ import annotations

import os
import signal
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest
from sqlalchemy.engine import Engine

from cli.stack import Stack, free_port
from visionloop.db import make_engine, migrate
from visionloop.settings import Settings, get_settings, load_settings

# PostgreSQL proves the production database path; this kind of machine runs one on 5432.
POSTGRES_ADMIN_URL = os.environ.get(
    "VISIONLOOP_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres"
)

# Everything the suite starts is confined to this data dir and these ports, so a user's own
# stack (default ports, ./.visionloop) keeps running untouched beside the tests.
_STACK_ENV_KEYS = (
    "VISIONLOOP_DATA_DIR",
    "VISIONLOOP_S3_PORT",
    "VISIONLOOP_PREFECT_PORT",
    "VISIONLOOP_MLFLOW_PORT",
    "VISIONLOOP_LABEL_STUDIO_PORT",
    "VISIONLOOP_API_PORT",
    "VISIONLOOP_SCHEDULES_ENABLED",
    "VISIONLOOP_INFERENCE_PRECISION",
)


@pytest.fixture(scope="session")
def stack_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    data_dir = tmp_path_factory.mktemp("visionloop-data")
    env = {
        "VISIONLOOP_DATA_DIR": str(data_dir),
        "VISIONLOOP_S3_PORT": str(free_port()),
        "VISIONLOOP_PREFECT_PORT": str(free_port()),
        "VISIONLOOP_MLFLOW_PORT": str(free_port()),
        "VISIONLOOP_LABEL_STUDIO_PORT": str(free_port()),
        "VISIONLOOP_API_PORT": str(free_port()),
        # Deployments are registered, but nothing runs on a timer behind the tests' backs.
        "VISIONLOOP_SCHEDULES_ENABLED": "false",
        # Tests hold exports to PyTorch's confidences within 0.002, which bf16 (what OpenVINO
        # picks on CPUs with bfloat16 units) does not keep; `auto` has tests of its own.
        "VISIONLOOP_INFERENCE_PRECISION": "f32",
    }
    # Settings a user may have exported must not point the tests at their servers.
    for key in list(os.environ):
        if (
            key.startswith("VISIONLOOP_")
            and key not in _STACK_ENV_KEYS
            and key != "VISIONLOOP_TEST_POSTGRES_URL"
        ):
            del os.environ[key]
    os.environ.update(env)
    get_settings.cache_clear()
    return env


@pytest.fixture(scope="session")
def stack(stack_env: dict[str, str]) -> Iterator[Stack]:
    """The whole local stack, up and healthy, for the test session."""
    running = Stack(load_settings())
    # A CI runner that times out sends SIGTERM: turn it into the interrupt pytest tears down on,
    # so the servers never outlive the run.
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        running.up()
        get_settings.cache_clear()
        # Flows and clients in this process find the stack the way the worker's runs do.
        os.environ.update(running.platform_env())
        yield running
    finally:
        running.down()
        get_settings.cache_clear()
        signal.signal(signal.SIGTERM, previous)


def _raise_interrupt(signum: int, _frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@pytest.fixture
def settings(stack: Stack) -> Settings:
    return get_settings()


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A fresh, empty PostgreSQL database, dropped afterwards."""
    name = f"visionloop_test_{uuid.uuid4().hex[:10]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        pytest.fail(
            f"PostgreSQL at {POSTGRES_ADMIN_URL} is not reachable ({exc}); start it or set "
            "VISIONLOOP_TEST_POSTGRES_URL"
        )
    with admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    base = POSTGRES_ADMIN_URL.rsplit("/", 1)[0]
    try:
        yield f"{base}/{name}"
    finally:
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'visionloop.db'}"


@pytest.fixture(params=["sqlite_url", "postgres_url"])
def engine(request: pytest.FixtureRequest) -> Iterator[Engine]:
    """A migrated database of its own, once on SQLite (the default) and once on PostgreSQL
    (production); a test module may define its own ``engine`` instead."""
    url = request.getfixturevalue(request.param)
    migrate(url)
    made = make_engine(url)
    yield made
    made.dispose()
