"""`visionloop`: run the local stack and the platform's jobs from a terminal."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from cli.recipes import deployments_app
from visionloop.settings import Settings, get_settings

app = typer.Typer(help="visionloop: continuous training for YOLO detectors.", no_args_is_help=True)
app.add_typer(deployments_app, name="deployments")
console = Console()


def _settings() -> Settings:
    try:
        return get_settings()
    except ValidationError as exc:
        # pydantic names the field; the user sets the environment variable.
        for error in exc.errors():
            field = str(error["loc"][0]) if error["loc"] else ""
            console.print(f"[red]bad setting VISIONLOOP_{field.upper()}: {error['msg']}[/red]")
        raise typer.Exit(2) from None


def _use_stack_env(settings: Settings) -> None:
    """Point Prefect, MLflow and ultralytics in this process at the platform's services."""
    from cli.stack import Stack

    for key, value in Stack(settings).platform_env().items():
        os.environ.setdefault(key, value)


def _fail(exc: Exception) -> None:
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(1)


def _print_states(states, title: str) -> None:
    table = Table(title=title)
    for column in ("service", "state", "healthy", "latency", "url / detail"):
        table.add_column(column)
    for state in states:
        health = state.health
        table.add_row(
            state.name,
            state.action or "-",
            "-" if health is None else ("[green]yes[/green]" if health.ok else "[red]no[/red]"),
            "-" if health is None else f"{health.latency_ms:.0f} ms",
            ""
            if health is None
            else (health.url if health.ok else f"{health.url}: {health.detail}"),
        )
    console.print(table)


def _print_urls(settings: Settings) -> None:
    from cli.stack import Stack

    for name, url in Stack(settings).urls().items():
        console.print(f"  {name:<13} {url}")


@app.command()
def up(
    only: Annotated[list[str] | None, typer.Option(help="Start only these services.")] = None,
) -> None:
    """Start the local stack (or reuse what runs) and wait until every service is healthy."""
    from cli.stack import Stack, StackError

    settings = _settings()
    stack = Stack(settings, echo=lambda m: console.print(f"[dim]{m}[/dim]"))
    try:
        with console.status("starting the stack (Label Studio takes ~30 s on first start)"):
            states = stack.up(only=only)
    except StackError as exc:
        _fail(exc)
    get_settings.cache_clear()  # `up` may have generated secrets this process must now see
    _print_states(states, f"visionloop stack ({settings.data_dir})")
    _print_urls(stack.settings)


@app.command()
def down() -> None:
    """Stop the processes `up` started (and nothing else)."""
    from cli.stack import Stack

    states = Stack(_settings()).down()
    for state in states:
        console.print(f"  {state.name:<13} {state.action}")


@app.command()
def status() -> None:
    """Health and latency of every service."""
    from cli.stack import Stack

    stack = Stack(_settings())
    states = stack.status()
    _print_states(states, "visionloop status")
    if not all(s.health and s.health.ok for s in states):
        raise typer.Exit(1)


@app.command()
def migrate(revision: str = "head") -> None:
    """Upgrade the platform database to ``revision``."""
    from visionloop.db import migrate as run_migrate

    settings = _settings()
    run_migrate(settings.db_url, revision)
    console.print(f"database at {settings.db_url.split('@')[-1]} is at {revision}")


@app.command("trust-weights")
def trust_weights(
    version: Annotated[str, typer.Argument(help="Registered model version.")],
    sha256: Annotated[str, typer.Argument(help="sha256 of the best.pt you vetted.")],
) -> None:
    """Let a version registered without a checksum be loaded, once you vetted its weights."""
    from visionloop.registry import RegistryError
    from visionloop.registry import trust_weights as record_trust

    settings = _settings()
    _use_stack_env(settings)
    try:
        ref = record_trust(settings, version, sha256)
    except RegistryError as exc:
        _fail(exc)
    console.print(f"model version {ref.version} may be loaded: sha256 {ref.sha256}")


@app.command()
def generate(
    out: Annotated[Path, typer.Argument(help="Folder for the YOLO dataset.")],
    train: int = 48,
    val: int = 16,
    seed: int = 0,
    size: Annotated[int | None, typer.Option(help="Image size in px (default: settings).")] = None,
    brightness: float = 0.0,
    blur: float = 0.0,
    noise: float = 0.0,
) -> None:
    """Write a synthetic defect-inspection dataset (YOLO format), optionally drifted."""
    from visionloop.synthetic import DriftParams, write_yolo_dataset

    settings = _settings()
    drift = DriftParams(brightness=brightness, blur=blur, noise=noise)
    with _bar("generating images", train + val) as advance:
        data_yaml = write_yolo_dataset(
            out,
            n_train=train,
            n_val=val,
            seed=seed,
            size=size or settings.image_size,
            class_names=settings.class_names,
            drift=drift,
            progress=advance,
        )
    console.print(f"dataset written: {data_yaml}")


class _bar:
    """A rich progress bar whose callback takes "how many done so far"."""

    def __init__(self, label: str, total: int) -> None:
        self.progress = Progress(
            TextColumn("{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            console=console,
        )
        self.task = self.progress.add_task(label, total=total)

    def __enter__(self):
        self.progress.start()
        return lambda done: self.progress.update(self.task, completed=done)

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()


@app.command()
def bootstrap(
    epochs: Annotated[int | None, typer.Option(help="Training epochs (default: settings).")] = None,
    images: Annotated[int | None, typer.Option(help="Seed images (default: settings).")] = None,
    force: Annotated[bool, typer.Option(help="Train a new champion even if one exists.")] = False,
) -> None:
    """Train the first model on a generated seed set and register it as `champion`."""
    settings = _settings()
    _use_stack_env(settings)
    from flows.bootstrap import bootstrap_flow
    from visionloop.events import EventKind, subscribe

    total = epochs or settings.train_epochs
    with _bar("training the first champion (epochs)", total) as advance:
        unsubscribe = subscribe(
            lambda event: (
                advance(event.payload.get("epoch", 0))
                if event.kind == EventKind.TRAINING_EPOCH
                else None
            )
        )
        try:
            result = bootstrap_flow(epochs=epochs, images=images, force=force)
        except Exception as exc:
            _fail(exc)
        finally:
            unsubscribe()
    if result["created"]:
        console.print(
            f"model version {result['version']} registered as champion "
            f"(mAP50 {result['metrics'].get('mAP50', 0):.3f}, MLflow run {result['run_id']})"
        )
    else:
        console.print(
            f"champion exists already: version {result['version']} (use --force to retrain)"
        )


class _RichStoryUI:
    def say(self, message: str) -> None:
        console.print(f"[cyan]demo[/cyan] {message}")

    def bar(self, label: str, total: int) -> _bar:
        return _bar(label, total)


def _print_report(report: dict) -> None:
    _print_images(report["images"], report["run_tag"])
    _print_rounds(report["rounds"])
    _print_retrains(report["retrains"])
    _print_comparison(report["comparison"])
    console.print(f"report: {report['paths']['markdown']} (and .json)")


def _print_images(images: dict, run_tag: str) -> None:
    counts = ("files", "ingested", "quarantined", "queued", "labelled")
    table = Table(title=f"demo report ({run_tag})")
    for column in counts:
        table.add_column(column, justify="right")
    table.add_row(*(str(images[k]) for k in counts))
    console.print(table)
    for name, reason in images["quarantine_reasons"].items():
        console.print(f"  quarantined {name}: {reason}")


def _print_rounds(rounds: list[dict]) -> None:
    table = Table(title="rounds")
    for column in ("round", "lighting", "queued", "labelled", "drift", "decision"):
        table.add_column(column)
    for r in rounds:
        drift = "-" if r["drift_level"] is None else f"{r['drift_level']} ({r['drift_score']:.2f})"
        table.add_row(
            str(r["round"]),
            "changed" if r["drifted"] else "normal",
            str(r["queued"]),
            str(r["labelled"]),
            drift,
            r["decision"],
        )
    console.print(table)


def _print_retrains(retrains: list[dict]) -> None:
    from cli.loop_report import retrain_verdict

    for run in retrains:
        console.print(
            f"[bold]retraining run {run['id']}[/bold] ({run['trigger']}): {retrain_verdict(run)}"
        )
        for reason in run["reasons"]:
            console.print(f"  - {reason}")
        if run["error"]:
            console.print(f"  [red]{run['error']}[/red]")


def _print_comparison(comparison: dict | None) -> None:
    if not comparison:
        console.print(
            "[yellow]no retrain finished, so there is no before/after comparison[/yellow]"
        )
        return
    table = Table(
        title=f"champion before and after, same held-out set "
        f"({comparison['holdout_images']} images, {comparison['holdout_hash'][:12]})"
    )
    for column in ("", "version", "mAP50", "mAP50-95"):
        table.add_column(column)
    for role in ("before", "after"):
        m = comparison[role]
        table.add_row(
            role,
            m["version"],
            f"{m['metrics']['mAP50']:.3f}",
            f"{m['metrics']['mAP50-95']:.3f}",
        )
    console.print(table)


@app.command()
def demo(
    rounds: Annotated[int, typer.Option(help="Rounds of camera images.")] = 6,
    images_per_round: Annotated[int, typer.Option(help="Camera images per round.")] = 40,
    shift_round: Annotated[int, typer.Option(help="First round under the changed lighting.")] = 2,
    story: Annotated[
        bool, typer.Option(help="Tell the story; --no-story stops after bootstrap.")
    ] = True,
) -> None:
    """The main job on embedded defaults: the stack, a first champion, then one turn of the loop
    (camera images, a lighting change, review queue, drift, retrain, promotion) and its report."""
    from cli.demo import DemoError, run_story
    from cli.production_stream import StreamPlan

    try:
        plan = StreamPlan(rounds=rounds, images_per_round=images_per_round, shift_round=shift_round)
    except ValueError as exc:
        _fail(exc)
    up(only=None)
    bootstrap(epochs=None, images=None, force=False)
    if story:
        settings = _settings()
        _use_stack_env(settings)
        try:
            report = run_story(settings, plan, _RichStoryUI())
        except DemoError as exc:
            _fail(exc)
        _print_report(report)
    status()


if __name__ == "__main__":
    app()
