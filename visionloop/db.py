"""Engine, sessions and migrations for the platform database (SQLite or PostgreSQL)."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import event
from sqlalchemy.engine import Dialect, Engine
from sqlalchemy.exc import OperationalError
from sqlmodel import Session, create_engine

if TYPE_CHECKING:
    from alembic.config import Config

# Alembic is imported where migrations run, not here: every flow run opens a session, and
# only `visionloop migrate` and the stack's start migrate (seconds of start-up saved per run).

MIGRATIONS_DIR = Path(__file__).parent / "migrations"


class DatabaseUnavailable(OperationalError):
    """The platform database refused or did not answer a connection within the timeout.

    An ``OperationalError`` still, so whoever treats those as an outage keeps doing so."""

    def __init__(self, where: str, timeout_s: float, cause: Exception) -> None:
        super().__init__(None, None, cause)
        self.where = where
        self.timeout_s = timeout_s

    def __str__(self) -> str:
        return (
            f"the database at {self.where} is unavailable (no connection within "
            f"{self.timeout_s:g} s: {self.orig}); check VISIONLOOP_DATABASE_URL"
        )


def _named_connect(where: str, timeout_s: float) -> Callable[..., Any]:
    def connect(dialect: Dialect, _record: Any, cargs: Any, cparams: Any) -> Any:
        try:
            return dialect.connect(*cargs, **cparams)
        except dialect.loaded_dbapi.OperationalError as exc:
            raise DatabaseUnavailable(where, timeout_s, exc) from exc

    return connect


def _sqlite_pragmas(busy_timeout_ms: int) -> Callable[..., None]:
    def enable(dbapi_connection, _record) -> None:
        # WAL lets the API read while a flow writes; foreign keys are off by default in SQLite.
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute(f"PRAGMA busy_timeout={busy_timeout_ms}")
        cursor.close()

    return enable


def make_engine(url: str, timeout_s: float | None = None) -> Engine:
    """An engine whose waits are bounded by ``timeout_s`` (default
    ``VISIONLOOP_SERVICE_TIMEOUT_S``): connecting to PostgreSQL, waiting for a pooled
    connection, and SQLite waiting for another writer's lock."""
    if timeout_s is None:
        from visionloop.settings import get_settings

        timeout_s = get_settings().service_timeout_s
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": timeout_s})
        event.listen(engine, "connect", _sqlite_pragmas(int(timeout_s * 1000)))
        return engine
    if url.startswith("postgresql://"):
        # psycopg 3 is the driver this project installs; the bare scheme would ask for psycopg2.
        url = "postgresql+psycopg://" + url.removeprefix("postgresql://")
    engine = create_engine(
        url,
        pool_pre_ping=True,
        pool_timeout=timeout_s,
        # libpq counts whole seconds and takes anything under 2 as 2.
        connect_args={"connect_timeout": max(2, math.ceil(timeout_s))},
    )
    where = engine.url.render_as_string(hide_password=True).split("@")[-1]
    event.listen(engine, "do_connect", _named_connect(where, timeout_s))
    return engine


@lru_cache(maxsize=8)
def _engine(url: str, timeout_s: float) -> Engine:
    return make_engine(url, timeout_s)


def engine_for(url: str) -> Engine:
    """One engine per URL and timeout setting in this process."""
    from visionloop.settings import get_settings

    return _engine(url, get_settings().service_timeout_s)


def get_engine() -> Engine:
    from visionloop.settings import get_settings

    return engine_for(get_settings().db_url)


@contextmanager
def session_scope(engine: Engine | None = None) -> Iterator[Session]:
    """A session that commits on success and rolls back on error."""
    with Session(engine or get_engine(), expire_on_commit=False) as session:
        try:
            yield session
            session.commit()
        except BaseException:
            session.rollback()
            raise


def alembic_config(url: str) -> Config:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str, revision: str = "head") -> None:
    """Bring the schema at ``url`` up to ``revision``."""
    if url.startswith("sqlite"):
        path = url.split("///", 1)[-1]
        if path and path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
    from alembic import command

    command.upgrade(alembic_config(url), revision)


def downgrade(url: str, revision: str = "base") -> None:
    from alembic import command

    command.downgrade(alembic_config(url), revision)


def current_revision(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with make_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()
