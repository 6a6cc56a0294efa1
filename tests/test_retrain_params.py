"""The retrain deployment's one parameter: what the launcher sends is what the flow accepts."""

from __future__ import annotations

import pytest

from training.retrain_launcher import RetrainParams, deployment_parameters

# Prefect is imported inside the tests, never at module level: pytest imports every test module
# before the session's stack exists, and Prefect imported then keeps settings without its API.


@pytest.fixture(scope="module")
def schema() -> dict:
    from prefect.utilities.callables import parameter_schema

    from flows.retrain import retrain_flow

    return parameter_schema(retrain_flow).model_dump(mode="json")


def test_the_launchers_parameters_fit_the_deployment_schema(schema: dict) -> None:
    from prefect.utilities.schema_tools.validation import validate

    from flows.retrain import retrain_flow

    sent = deployment_parameters(
        RetrainParams(trigger="drift", reason="drift red", retraining_run_id=7)
    )
    assert sent == {"params": {"trigger": "drift", "reason": "drift red", "retraining_run_id": 7}}
    validate(sent, schema, raise_on_error=True)
    bound = retrain_flow.validate_parameters(sent)["params"]
    assert bound == RetrainParams(trigger="drift", reason="drift red", retraining_run_id=7)
    assert bound.test_percent == RetrainParams().test_percent  # unset: the flow's default


def test_no_parameters_mean_the_defaults(schema: dict) -> None:
    from prefect.utilities.schema_tools.validation import validate

    from flows.retrain import retrain_flow

    validate({}, schema, raise_on_error=True)
    assert retrain_flow.validate_parameters({})["params"] == RetrainParams()


@pytest.mark.parametrize(
    "params", [{"params": {"epoch": 3}}, {"params": {"epochs": "many"}}], ids=["typo", "type"]
)
def test_a_wrong_parameter_is_refused_before_a_run_is_queued(schema: dict, params: dict) -> None:
    from prefect.utilities.schema_tools.validation import ValidationError, validate

    with pytest.raises(ValidationError):
        validate(params, schema, raise_on_error=True)
