"""After `up`, the Prefect API lists every deployment of prefect.yaml with its schedule."""

from __future__ import annotations

import pytest
import yaml

from cli.stack import Stack, prefect_call

pytestmark = pytest.mark.stack


def test_every_deployment_is_registered_with_its_schedule(stack: Stack) -> None:
    recipe = yaml.safe_load((stack.settings.project_dir / "prefect.yaml").read_text())
    registered = prefect_call(stack.settings, "POST", "deployments/filter", body={}).json()
    flows = {
        f["id"]: f["name"]
        for f in prefect_call(stack.settings, "POST", "flows/filter", body={}).json()
    }
    by_name = {d["name"]: d for d in registered}

    assert set(by_name) == {d["name"] for d in recipe["deployments"]}
    for wanted in recipe["deployments"]:
        got = by_name[wanted["name"]]
        assert got["work_pool_name"] == stack.settings.prefect_work_pool
        assert got["entrypoint"] == wanted["entrypoint"]
        schedules = got["schedules"]
        assert len(schedules) == len(wanted.get("schedules", [])), wanted["name"]
        for want, have in zip(wanted.get("schedules", []), schedules):
            if "interval" in want:
                assert have["schedule"]["interval"] == want["interval"]
            else:
                assert have["schedule"]["cron"] == want["cron"]
        # The test stack registers schedules paused (VISIONLOOP_SCHEDULES_ENABLED=false).
        assert got["paused"] is True
        assert flows[got["flow_id"]]  # the flow it runs is known to the server

    scheduled = {name for name, d in by_name.items() if d["schedules"]}
    assert {"ingest", "label-sync", "drift", "check-and-retrain"} <= scheduled
    assert by_name["drift"]["schedules"][0]["schedule"]["cron"] == "0 * * * *"


def test_a_deployment_runs_on_the_worker(stack: Stack) -> None:
    """The worker `up` started picks up a deployment run and finishes it."""
    from prefect.deployments import run_deployment

    flow_run = run_deployment(
        "check-and-retrain/check-and-retrain", parameters={"dry_run": True}, timeout=240
    )
    assert flow_run.state is not None and flow_run.state.is_completed(), flow_run.state
