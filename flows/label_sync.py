"""Label sync flow: pull reviewers' annotations from Label Studio into reviewed labels.

The API's webhook syncs single tasks as reviewers submit them; this flow reconciles every
queued task, so a missed or failed webhook delays a label but never loses it.
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger

from labeling.sync import announce, sync_labels
from visionloop.db import session_scope
from visionloop.settings import get_settings


@flow(name="label-sync", log_prints=True)
def label_sync_flow() -> dict[str, Any]:
    with session_scope() as session:
        report = sync_labels(session, get_settings())
    get_run_logger().info("label sync: %s", report.summary())
    announce(report, via="flow")
    return report.summary()
