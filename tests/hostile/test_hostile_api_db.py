"""The API over its database when things go wrong: an outage, reads that must not write,
streams that must not pile up, and an export that must not be rebuilt per request."""

from __future__ import annotations

import hashlib
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack

import httpx
import psycopg
import pytest
from fastapi.testclient import TestClient
from live_api import served_api
from samples import good_jpegs
from sqlmodel import col, delete

from api import deps
from api.main import create_app
from cli.stack import Stack
from training.retrain_guard import LOCK, create_run, update_run
from training.snapshots import Source, materialise
from visionloop.db import migrate, session_scope
from visionloop.formats import LabeledImage
from visionloop.models import DatasetSnapshot, RetrainingRun, RetrainStatus
from visionloop.registry import CHAMPION, get_alias
from visionloop.settings import get_settings, load_settings

POSTGRES_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
LEAKS = ("SELECT", "INSERT", "psycopg", "sqlalchemy", "127.0.0.1", "postgres")


def test_a_database_outage_is_a_503_that_names_no_sql(postgres_url: str) -> None:
    migrate(postgres_url)
    settings = load_settings(database_url=postgres_url)
    app = create_app()
    app.dependency_overrides[deps.settings] = lambda: settings
    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/api/retraining/history").status_code == 200
        name = postgres_url.rsplit("/", 1)[1]
        with psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')  # the outage, for real
        for path in ("/api/retraining/history", "/api/labeling/queue", "/api/events"):
            response = client.get(path)
            assert response.status_code == 503, f"{path}: {response.text}"
            body = response.json()
            assert body["error"] == "database_unavailable"
            assert "platform database is unavailable" in body["detail"]
            for leak in LEAKS:
                assert leak.lower() not in response.text.lower(), f"{path} names {leak}"


# --- reads that must not write -------------------------------------------------------------


@pytest.mark.stack
def test_the_status_never_reconciles_or_moves_the_champion(stack: Stack) -> None:
    settings = get_settings()
    champion = get_alias(settings, CHAMPION)
    tag = f"hostile-{uuid.uuid4().hex[:6]}"
    with session_scope() as session:
        # Flow runs Prefect never heard of: a reconcile would fail both rows at once.
        holder = create_run(session, tag, "holds the guard")
        update_run(
            session,
            holder.id,
            active_lock=LOCK,
            status=RetrainStatus.running,
            prefect_flow_run_id=str(uuid.uuid4()),
            model_version=champion.version if champion else None,
        )
        queued = create_run(session, tag, "queued")
        update_run(session, queued.id, prefect_flow_run_id=str(uuid.uuid4()))
    ids = [holder.id, queued.id]
    try:
        with TestClient(create_app(), raise_server_exceptions=False) as client:
            status = client.get("/api/retraining/status")
        assert status.status_code == 200, status.text
        assert status.json()["state"] == "running" and status.json()["state_note"]
        with session_scope() as session:
            rows = {i: session.get(RetrainingRun, i, populate_existing=True) for i in ids}
        assert rows[holder.id].status == RetrainStatus.running
        assert rows[holder.id].active_lock == LOCK and rows[holder.id].error is None
        assert rows[queued.id].status == RetrainStatus.pending
        after = get_alias(settings, CHAMPION)
        assert (after.version if after else None) == (champion.version if champion else None)
    finally:
        with session_scope() as session:
            session.exec(delete(RetrainingRun).where(col(RetrainingRun.id).in_(ids)))


# --- live streams ----------------------------------------------------------------------------


@pytest.fixture
def small_api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The API on a free port, over a fresh SQLite database, with room for two streams."""
    data_dir = tmp_path_factory.mktemp("streams")
    url = f"sqlite:///{data_dir / 'visionloop.db'}"
    migrate(url)
    env = {
        "VISIONLOOP_DATA_DIR": str(data_dir),
        "VISIONLOOP_DATABASE_URL": url,
        "VISIONLOOP_MAX_EVENT_STREAMS": "2",
    }
    with served_api(env) as port:
        yield f"http://127.0.0.1:{port}"


def _open_stream(exits: ExitStack, base: str) -> httpx.Response:
    client = exits.enter_context(httpx.Client(base_url=base, timeout=10))
    response = exits.enter_context(client.stream("GET", "/api/events/stream?replay=0"))
    if response.status_code == 200:
        # Kept open with the stack: dropping a half-read line iterator closes the connection.
        lines = response.iter_lines()
        exits.callback(lines.close)
        assert next(lines).startswith("retry:")
    return response


def test_event_streams_are_capped_and_a_closed_one_frees_its_slot(small_api: str) -> None:
    with ExitStack() as first, ExitStack() as second:
        assert _open_stream(first, small_api).status_code == 200
        assert _open_stream(second, small_api).status_code == 200
        refused = httpx.get(f"{small_api}/api/events/stream", timeout=10)
        assert refused.status_code == 503, refused.text
        assert "max_event_streams" in refused.json()["detail"]
        first.close()  # a browser tab closed
        deadline = time.monotonic() + 10
        while True:
            with ExitStack() as third:
                if _open_stream(third, small_api).status_code == 200:
                    break
            assert time.monotonic() < deadline, "the closed stream's slot was never freed"
            time.sleep(0.2)


# --- the dataset export ------------------------------------------------------------------------


def _snapshot(seed: int, count: int) -> DatasetSnapshot:
    images = good_jpegs(count, seed=seed).values()
    sources = [
        Source(
            LabeledImage(hashlib.sha256(data).hexdigest(), ".jpg", 160, 160, (), split),
            read=lambda data=data: data,
        )
        for data, split in zip(images, ["train", "val", "test"] * count, strict=False)
    ]
    with session_scope() as session:
        row, _, _ = materialise(session, get_settings(), sources, kind="training")
        return row


@pytest.mark.stack
def test_the_export_needs_the_read_token_and_is_built_once_per_snapshot(stack: Stack) -> None:
    auth = {"Authorization": f"Bearer {get_settings().api_token.get_secret_value()}"}
    created = [_snapshot(seed=int(time.time()) % 100000, count=3)]
    try:
        with TestClient(create_app(), raise_server_exceptions=False) as client:
            assert client.get("/api/labeling/export").status_code == 401
            first = client.get("/api/labeling/export", headers=auth)
            second = client.get("/api/labeling/export", headers=auth)
            assert first.status_code == second.status_code == 200, first.text
            assert first.headers["x-snapshot-id"] == str(created[0].id)
            assert first.headers["x-export-cache"] == "miss"
            assert second.headers["x-export-cache"] == "hit"
            assert first.headers["etag"] == second.headers["etag"]
            assert first.content == second.content
            unchanged = client.get(
                "/api/labeling/export", headers={**auth, "If-None-Match": first.headers["etag"]}
            )
            assert unchanged.status_code == 304 and not unchanged.content

            # One more reviewed image: a new snapshot, so a new export.
            created.append(_snapshot(seed=int(time.time()) % 100000 + 7, count=4))
            third = client.get("/api/labeling/export", headers=auth)
            assert third.status_code == 200 and third.headers["x-export-cache"] == "miss"
            assert third.headers["etag"] != first.headers["etag"]
    finally:
        with session_scope() as session:
            session.exec(
                delete(DatasetSnapshot).where(col(DatasetSnapshot.id).in_([c.id for c in created]))
            )
