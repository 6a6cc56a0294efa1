"""Migrations up and down on SQLite (the default) and PostgreSQL (production)."""

from __future__ import annotations

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import inspect
from sqlmodel import SQLModel

import visionloop.models  # noqa: F401
from visionloop.db import current_revision, downgrade, make_engine, migrate, session_scope
from visionloop.models import Image, ImageStatus, RetrainingRun, RetrainStatus

TABLES = {
    "images",
    "predictions",
    "labeling_queue",
    "reviewed_labels",
    "dataset_snapshots",
    "retraining_runs",
    "drift_results",
    "activity_events",
    "ingest_attempts",
}


def _round_trip(url: str) -> None:
    migrate(url)
    engine = make_engine(url)
    tables = set(inspect(engine).get_table_names())
    assert tables >= TABLES
    assert current_revision(url) is not None

    # The schema the migrations build is exactly the one the models describe.
    with engine.connect() as conn:
        diff = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": False}), SQLModel.metadata
        )
    assert diff == [], f"models and migrations disagree: {diff}"

    # The indexes the API's "by status since a time" queries need.
    image_indexes = {ix["name"] for ix in inspect(engine).get_indexes("images")}
    assert {"ix_images_status_created", "ix_images_created_at", "ix_images_status"} <= image_indexes
    queue_indexes = {ix["name"] for ix in inspect(engine).get_indexes("labeling_queue")}
    assert "ix_labeling_queue_status_created" in queue_indexes

    with session_scope(engine) as session:
        session.add(
            Image(
                content_hash="a" * 64, object_key="aa/a.jpg", size_bytes=3, features={"blur": 1.5}
            )
        )
        session.add(
            RetrainingRun(
                trigger="manual", reason="test", status=RetrainStatus.running, active_lock="retrain"
            )
        )
    with session_scope(engine) as session:
        image = session.query(Image).one()
        assert image.status == ImageStatus.ingested and image.features == {"blur": 1.5}
        assert image.created_at.tzinfo is not None or url.startswith("sqlite")

    # The single-retrain guard is enforced by the database itself.
    with pytest.raises(Exception, match="(?i)unique"), session_scope(engine) as session:
        session.add(RetrainingRun(trigger="drift", active_lock="retrain"))

    engine.dispose()
    downgrade(url, "base")
    engine = make_engine(url)
    assert not (TABLES & set(inspect(engine).get_table_names()))
    assert current_revision(url) is None
    engine.dispose()
    migrate(url)  # and up again on the emptied database
    assert current_revision(url) is not None


def test_migrations_sqlite(sqlite_url: str) -> None:
    _round_trip(sqlite_url)


def test_migrations_postgresql(postgres_url: str) -> None:
    _round_trip(postgres_url)
