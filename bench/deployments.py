"""Deployment runs: created to completed on the stack's worker, against a no-op deployment.

A deployment run of a light flow (label-sync, check-and-retrain) should cost little more than
a run that does nothing: the worker's poll, a fresh Python process and Prefect's own start-up
are paid by every run, the rest is the flow's imports and its work. This benchmark registers a
no-op deployment on the same work pool and runs it interleaved with the light deployments,
``--runs`` times each, and prints each one's p50 from the run's creation to its completion,
split into pickup (created to pending: the worker's poll), start (pending to running: the
process, Prefect and the flow module's imports) and work (running to completed).

Before vs after in one run: each light deployment is also run as a copy whose flow-run
processes first import what its module imported eagerly before the imports were made lazy
(a ``sitecustomize`` on ``PYTHONPATH``, set through the deployment's job variables).

Target: each light deployment's p50 at most 3x the no-op's. Without ``--reuse`` it starts its
own stack on free ports in a temporary data dir (a few minutes); with ``--reuse`` it uses the
running stack of the settings. ``--drift`` adds the drift deployment (it needs a champion and
production images to do real work; without them it only measures its start).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prefect.client.orchestration import SyncPrefectClient

    from visionloop.settings import Settings

TARGET_RATIO = 3.0
NOOP = "bench-noop/bench-noop"
LIGHT: dict[str, dict[str, Any]] = {
    "label-sync/label-sync": {},
    "check-and-retrain/check-and-retrain": {"dry_run": True},
}
DRIFT = "drift/drift"
EAGER = {
    # What each flow module imported at module level before its imports were made lazy
    # (the MLflow import check-and-retrain still pays, in its task, is not listed).
    "label-sync/label-sync": ("label_studio_sdk.client", "alembic.command"),
    "check-and-retrain/check-and-retrain": ("alembic.command",),
}
EAGER_SUFFIX = "-eager-imports"
SITECUSTOMIZE = """\
import importlib, os

for name in filter(None, os.environ.get("VISIONLOOP_BENCH_EAGER", "").split(",")):
    importlib.import_module(name)
"""


def _noop() -> None:
    """Nothing: what a run costs the worker, a fresh process and Prefect alone."""


def __getattr__(name: str) -> Any:
    # The flow object is built on first access, not at import: Prefect fixes its settings
    # (the API URL) when first imported, and this benchmark's process points itself at the
    # stack only after it started. Prefect's entrypoint loader gets it through getattr.
    if name == "noop_flow":
        from prefect import flow

        return flow(name="bench-noop")(_noop)
    raise AttributeError(name)


@dataclass(frozen=True)
class Timing:
    total: float
    pickup: float
    start: float
    work: float


def _register(client: SyncPrefectClient, settings: Settings, eager_dir: Path) -> dict[str, str]:
    """The no-op deployment and the eager-import copies (upserts); returns label -> name."""
    template = client.read_deployment_by_name("label-sync/label-sync")
    flow_id = client.create_flow_from_name("bench-noop")
    client.create_deployment(
        flow_id=flow_id,
        name="bench-noop",
        entrypoint="bench/deployments.py:noop_flow",
        work_pool_name=settings.prefect_work_pool,
        pull_steps=template.pull_steps,
        path=template.path,
        paused=True,
    )
    names = {NOOP: NOOP}
    for name, modules in EAGER.items():
        original = client.read_deployment_by_name(name)
        copy = original.name + EAGER_SUFFIX
        env = {"PYTHONPATH": str(eager_dir), "VISIONLOOP_BENCH_EAGER": ",".join(modules)}
        client.create_deployment(
            flow_id=original.flow_id,
            name=copy,
            entrypoint=original.entrypoint,
            work_pool_name=original.work_pool_name,
            pull_steps=original.pull_steps,
            path=original.path,
            paused=True,
            job_variables={**(original.job_variables or {}), "env": env},
        )
        names[name] = name
        names[f"{name} (eager imports, as before)"] = f"{name.split('/')[0]}/{copy}"
    return names


def _timed(client: SyncPrefectClient, name: str, parameters: dict[str, Any]) -> Timing:
    from prefect.deployments import run_deployment

    run = run_deployment(name, parameters=parameters, timeout=900, poll_interval=0.5)
    if run.state is None or not run.state.is_completed():
        raise RuntimeError(f"{name} ended {run.state}")
    states = {s.type.value: s.timestamp for s in client.read_flow_run_states(run.id)}
    created = run.created
    assert created is not None
    pending, running, done = states["PENDING"], states["RUNNING"], states["COMPLETED"]
    return Timing(
        total=(done - created).total_seconds(),
        pickup=(pending - created).total_seconds(),
        start=(running - pending).total_seconds(),
        work=(done - running).total_seconds(),
    )


def _p50(timings: list[Timing], field: str) -> float:
    return statistics.median(getattr(t, field) for t in timings)


def run(settings: Settings, runs: int, drift: bool) -> None:
    from prefect.client.orchestration import get_client

    params = {NOOP: {}, **LIGHT, **({DRIFT: {}} if drift else {})}
    with (
        tempfile.TemporaryDirectory(prefix="visionloop-eager-") as eager,
        get_client(sync_client=True) as client,
    ):
        (Path(eager) / "sitecustomize.py").write_text(SITECUSTOMIZE)
        names = _register(client, settings, Path(eager))
        if drift:
            names[DRIFT] = DRIFT
        labels = list(names)
        timings: dict[str, list[Timing]] = {label: [] for label in labels}
        _timed(client, NOOP, {})  # warm the worker and the disk cache; not counted
        for round_ in range(runs):
            for label in labels:  # interleaved, so load on the machine hits all alike
                deployment = names[label]
                base = label.split(" ")[0]
                timings[label].append(_timed(client, deployment, params[base]))
            print(f"round {round_ + 1}/{runs} done")
    report(timings, runs)


def report(timings: dict[str, list[Timing]], runs: int) -> None:
    noop = _p50(timings[NOOP], "total")
    print(
        f"\ndeployment runs, p50 of {runs} (created -> completed = pickup + start + work), "
        "same worker, interleaved"
    )
    width = max(map(len, timings))
    for label, rows in timings.items():
        total = _p50(rows, "total")
        parts = ", ".join(f"{f} {_p50(rows, f):5.2f} s" for f in ("pickup", "start", "work"))
        print(f"  {label:{width}} {total:6.2f} s  {total / noop:5.2f}x no-op  ({parts})")
    print()
    for label in LIGHT:
        ratio = _p50(timings[label], "total") / noop
        verdict = "meets" if ratio <= TARGET_RATIO else "not met"
        print(f"target {label} <= {TARGET_RATIO:g}x no-op: {ratio:.2f}x, {verdict}")
    for label in LIGHT:
        eager = f"{label} (eager imports, as before)"
        before, after = _p50(timings[eager], "total"), _p50(timings[label], "total")
        print(f"before vs after {label}: {before:.2f} s -> {after:.2f} s ({before / after:.2f}x)")


def main() -> None:
    from bench.ingest import private_stack, use_stack
    from cli.stack import Stack
    from visionloop.settings import load_settings

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs of each deployment")
    parser.add_argument("--drift", action="store_true", help="also time the drift deployment")
    parser.add_argument(
        "--reuse", action="store_true", help="use the running stack of the settings"
    )
    args = parser.parse_args()
    if args.reuse:
        run(use_stack(Stack(load_settings())), args.runs, args.drift)
        return
    with private_stack() as settings:
        run(settings, args.runs, args.drift)


if __name__ == "__main__":
    main()
