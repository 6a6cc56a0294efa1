"""schemathesis against the API's own OpenAPI spec, in process: no generated request may get a 5xx.

Every operation is fuzzed with the bearer token, so the guarded ones get past the 401 to their
validation and their work. Two things are kept from touching the shared test stack for real:
the retrain launcher is replaced by one that records and cancels the request at once (a
real launch would train for minutes), and the model aliases fuzzed promotions and rollbacks
move are put back afterwards. The live event stream is left out: it never ends by design, and
tests/test_web_live.py covers it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import positive_data_acceptance
from sqlmodel import Session

from api import deps
from api.main import create_app
from cli.stack import Stack
from training.retrain_guard import update_run
from training.retrain_launcher import LaunchedRetrain
from visionloop.models import RetrainStatus
from visionloop.registry import CHAMPION, PREVIOUS, get_alias, set_alias
from visionloop.registry import client as mlflow_client
from visionloop.settings import Settings, get_settings

pytestmark = [pytest.mark.stack]

MAX_EXAMPLES = 15
"""Per operation: enough for every parameter's edges, small enough for a 2-core machine."""


def _launch_nothing(
    session: Session,
    _settings: Settings,
    *,
    trigger: str,
    reason: str,
    retraining_run_id: int | None = None,
) -> LaunchedRetrain:
    assert retraining_run_id is not None
    update_run(
        session,
        retraining_run_id,
        status=RetrainStatus.cancelled,
        error="not started: schemathesis run",
    )
    return LaunchedRetrain(retraining_run_id, str(uuid.uuid4()))


# Built at import: schemathesis makes one test per operation from the spec at collection time.
# Nothing here touches a server until a request runs, after the stack is up.
app = create_app()
app.dependency_overrides[deps.retrain_launcher] = lambda: _launch_nothing
schema = schemathesis.openapi.from_asgi("/openapi.json", app).exclude(path="/api/events/stream")


@pytest.fixture(scope="module")
def fuzzing(stack: Stack) -> Iterator[None]:
    """A champion for /api/predict; the aliases as they were afterwards."""
    from flows.bootstrap import bootstrap_flow

    bootstrap_flow(epochs=1, images=8)
    settings = get_settings()
    champion, previous = get_alias(settings, CHAMPION), get_alias(settings, PREVIOUS)
    assert champion is not None
    try:
        yield
    finally:
        set_alias(settings, CHAMPION, champion.version)
        if previous is not None:
            set_alias(settings, PREVIOUS, previous.version)
        elif get_alias(settings, PREVIOUS) is not None:
            mlflow_client(settings).delete_registered_model_alias(settings.model_name, PREVIOUS)


UPLOADS = {"/api/predict", "/api/images"}
"""Any bytes fit the spec's ``format: binary``; only an image is accepted (422 otherwise)."""

STORED_PREDICTIONS = {"/api/labeling/queue/{item_id}/label"}
"""A box names the champion's prediction it judges by index; whether that prediction exists
is in the database, not the spec (422 ``invalid_label`` otherwise)."""


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_no_generated_request_gets_a_server_error(fuzzing: None, case: Any) -> None:
    token = get_settings().api_token.get_secret_value()
    data_dependent = UPLOADS | STORED_PREDICTIONS
    excluded = [positive_data_acceptance] if case.operation.path in data_dependent else []
    # Cases that negate the security scheme go out without the token and must get 401; every
    # other case carries it, and a 401 there would mean the gate kept the fuzzer out of the
    # operation, which would then pass here without ever being fuzzed.
    negated = case.operation.schema.is_security_param_negated(case)
    headers = {} if negated else {"Authorization": f"Bearer {token}"}
    response = case.call_and_validate(headers=headers, excluded_checks=excluded)
    if negated:
        assert response.status_code == 401, f"{case.operation.label}: {response.text}"
    else:
        assert response.status_code != 401, f"{case.operation.label}: {response.text}"
