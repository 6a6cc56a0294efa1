"""Every operation of the API against missing, malformed and misplaced tokens.

The matrix is built from the app's own OpenAPI document, so an operation added later is in
it without anyone remembering to add it here; the gate's classification of GETs is checked
against the same document.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastapi.routing import APIRoute, iter_route_contexts
from fastapi.testclient import TestClient

from api.gate import DATA_GETS, PUBLIC_GETS, WEBHOOK_PATH, is_data_get
from api.main import create_app
from cli.stack import Stack
from training.retrain_guard import LOCK, create_run, fail_run, update_run
from visionloop.db import session_scope
from visionloop.models import RetrainStatus
from visionloop.registry import CHAMPION, PREVIOUS, get_alias, set_alias
from visionloop.registry import client as mlflow_client
from visionloop.settings import get_settings

pytestmark = [pytest.mark.stack]

WEBHOOK_SECRET = "hostile-auth-webhook-secret"
READ_TOKEN = "hostile-auth-read-token"
NEVER_ENDS = {"/api/events/stream"}  # a public stream: covered in test_hostile_api_db.py


@pytest.fixture(scope="module")
def held_guard(stack: Stack) -> Iterator[None]:
    """A retrain that really holds the guard, behind a real Prefect flow run that no worker
    will start (it belongs to no deployment): the trigger is in the matrix too, and a token
    let through by mistake (a parse that strips "Bearer  <token>" does) must answer 409, not
    start a training on the stack's worker."""
    from prefect import flow
    from prefect.client.orchestration import get_client
    from prefect.states import Scheduled

    @flow(name="hostile-auth-held-retrain")
    def held() -> None: ...

    settings = get_settings()
    with get_client(sync_client=True) as prefect:
        flow_run = prefect.create_flow_run(
            held, state=Scheduled(scheduled_time=datetime.now(UTC) + timedelta(days=1))
        )
    with session_scope() as session:
        holder = create_run(session, "manual", "holds the guard for the auth matrix")
        update_run(
            session,
            holder.id,
            status=RetrainStatus.running,
            active_lock=LOCK,
            prefect_flow_run_id=str(flow_run.id),
        )
    try:
        yield
    finally:
        with session_scope() as session:
            fail_run(session, settings, holder.id, "the auth matrix is over")
        with get_client(sync_client=True) as prefect:
            prefect.delete_flow_run(flow_run.id)


@pytest.fixture(scope="module")
def client(held_guard: None) -> Iterator[TestClient]:
    patch = pytest.MonkeyPatch()
    patch.setenv("VISIONLOOP_WEBHOOK_SECRET", WEBHOOK_SECRET)
    patch.setenv("VISIONLOOP_API_READ_TOKEN", READ_TOKEN)
    get_settings.cache_clear()
    app = create_app()
    try:
        with TestClient(app, raise_server_exceptions=False) as test_client:
            yield test_client
    finally:
        patch.undo()
        get_settings.cache_clear()


def _operations(client: TestClient) -> list[tuple[str, str]]:
    spec = client.app.openapi()  # type: ignore[attr-defined]
    return [
        (method.upper(), re.sub(r"\{[^}]+\}", "1", path))
        for path, ops in spec["paths"].items()
        for method in ops
    ]


def _guarded(client: TestClient) -> list[tuple[str, str]]:
    return [(m, p) for m, p in _operations(client) if m != "GET" or is_data_get(p)]


def _malformed(api_token: str) -> list[dict[str, Any]]:
    return [
        {},
        {"Authorization": "Bearer"},
        {"Authorization": "Bearer "},
        {"Authorization": "Basic abc"},
        {"Authorization": "Bearer  x"},
        {"Authorization": "Bearer wrong"},
        {"Authorization": api_token},  # no scheme
        {"Authorization": f"Basic {api_token}"},  # wrong scheme
        {"Authorization": f"Bearer  {api_token}"},  # two spaces
        {"Authorization": f"Bearer\t{api_token}"},
        {"Authorization": "Bearer tökén".encode()},  # raw UTF-8 bytes
        {"Authorization": "Bearer tökén".encode("latin-1")},  # raw latin-1 bytes
        {"Authorization": f"Bearer {api_token}é".encode()},
    ]


def _assert_refused(response: Any, what: str) -> None:
    assert response.status_code == 401, f"{what}: {response.status_code} {response.text}"
    body = response.json()
    assert body["error"] == "unauthorized" and body["detail"], what
    assert response.headers["www-authenticate"] == "Bearer", what


def test_every_get_operation_is_classified_once(client: TestClient) -> None:
    # app.routes holds included routers, not their routes: walk through them to every route,
    # the dashboard's (left out of the OpenAPI document) included.
    routes = {
        route.path
        for route in iter_route_contexts(client.app.routes)  # type: ignore[attr-defined]
        if isinstance(route.original_route, APIRoute) and "GET" in (route.methods or ())
    }
    assert routes == set(DATA_GETS) | set(PUBLIC_GETS)
    assert not set(DATA_GETS) & set(PUBLIC_GETS)


def test_guarded_operations_refuse_missing_and_malformed_tokens(client: TestClient) -> None:
    api_token = get_settings().api_token.get_secret_value()
    guarded = _guarded(client)
    assert len(guarded) >= 9 and ("GET", "/api/labeling/export") in guarded
    for method, path in guarded:
        for headers in _malformed(api_token):
            response = client.request(method, path, headers=headers)
            _assert_refused(response, f"{method} {path} with {headers}")


def test_the_webhook_secret_opens_the_webhook_only(client: TestClient) -> None:
    secret = {"Authorization": f"Bearer {WEBHOOK_SECRET}"}
    for method, path in _guarded(client):
        if path == WEBHOOK_PATH:
            continue
        _assert_refused(client.request(method, path, headers=secret), f"{method} {path}")
    opened = client.post(WEBHOOK_PATH, headers=secret, json={"action": "PROJECT_UPDATED"})
    assert opened.status_code == 202, opened.text


def test_the_read_token_opens_data_reads_only(client: TestClient) -> None:
    read = {"Authorization": f"Bearer {READ_TOKEN}"}
    for method, path in _guarded(client):
        response = client.request(method, path, headers=read)
        if method == "GET":
            assert response.status_code not in (401, 403), f"{path}: {response.text}"
            assert response.status_code < 500, f"{path}: {response.text}"
        else:
            _assert_refused(response, f"{method} {path} with the read token")


@pytest.fixture
def aliases_kept(stack: Stack) -> Iterator[None]:
    """Promoting version 1 or rolling back moves the shared stack's aliases: put them back."""
    settings = get_settings()
    kept = {alias: get_alias(settings, alias) for alias in (CHAMPION, PREVIOUS)}
    try:
        yield
    finally:
        for alias, version in kept.items():
            if version is not None:
                set_alias(settings, alias, version.version)
            elif get_alias(settings, alias) is not None:
                mlflow_client(settings).delete_registered_model_alias(settings.model_name, alias)


def test_the_api_token_opens_everything_and_nothing_answers_500(
    client: TestClient, aliases_kept: None
) -> None:
    api = {"Authorization": f"Bearer {get_settings().api_token.get_secret_value()}"}
    for method, path in _guarded(client):
        response = client.request(method, path, headers=api)
        assert response.status_code not in (401, 403), f"{method} {path}: {response.text}"
        assert response.status_code < 500, f"{method} {path}: {response.text}"


def test_public_reads_need_no_token(client: TestClient) -> None:
    for method, path in _operations(client):
        if method != "GET" or is_data_get(path) or path in NEVER_ENDS:
            continue
        for headers in ({}, {"Authorization": "Bearer tökén".encode()}):
            response = client.get(path, headers=headers)
            assert response.status_code != 401, f"{path}: {response.text}"
            assert response.status_code < 500, f"{path}: {response.text}"
