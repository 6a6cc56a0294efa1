"""The ingest flow fanned out over Dask gives exactly what the default thread runner gives.

How "the same results" is proven (``test_dask_fan_out_ingests_exactly_like_threads``):
images are unique by content hash, so ingesting the same bytes twice into one state would
compare a real ingest with a run that skips everything. Instead the *same* files (the same
names in one incoming bucket: good JPEGs, awkward but valid images, every kind of corrupt
file, and byte-duplicates of a good and of a corrupt file under other names) are ingested
twice, each time into fresh state of its own: a new migrated platform database, its own
images and quarantine buckets and its own Label Studio review project. The champion, batch
size, confidence floor and selection policy are the same. Run 1 uses the default runner
(``threads``); run 2 ``VISIONLOOP_TASK_RUNNER=dask`` with a local cluster of two worker
processes that the runner starts itself. Then everything each run left behind is compared
by content, never by database id (ids follow commit order, which concurrent batches change):

- the summary (counts, quarantine reasons, champion version);
- every source file's outcome: ingested / quarantined with its reason / duplicate of which
  name (which name of two identical files wins must not depend on the runner);
- every image row (size, format, dimensions, object key, features, status);
- the objects written to the images and quarantine buckets (keys and bytes' ETags);
- every prediction: model version, and per box class, confidence and corners (within 1e-4;
  in practice they are bit-identical);
- the selection: each run's queue is exactly what the policy picks from that run's own
  predictions, and the two queues are the same images with the same reasons. ``select``
  breaks exact ties by content hash, not by image id (ids follow commit order, which
  differs between the runners), and a barely trained champion scores many images the same,
  so this is a real check of that. The Label Studio tasks are the queued images.

The summary's ``workers`` prove where the batches ran: the test's own process with threads,
only other processes with Dask.

The other tests need no servers: how batches are planned, which runner the settings pick,
and that two batches racing to insert identical bytes end with one image and a duplicate,
on SQLite and on PostgreSQL.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from samples import awkward_files, good_jpegs, malformed_files
from sqlmodel import select

from cli.stack import Stack
from ingestion import pipeline as ingest_module
from ingestion.pipeline import SourceFile, ingest_batch, plan_batches
from labeling.selection import Candidate, SelectionPolicy
from labeling.selection import select as select_for_review
from labeling.tasks import IMAGE_ID_KEY
from labeling.wiring import review_project
from visionloop.db import migrate, session_scope
from visionloop.models import Image, LabelingQueueItem, Prediction
from visionloop.settings import Settings, get_settings
from visionloop.storage import ObjectStore, sha256_hex

BATCH = 6
CONF = 0.001
POLICY = SelectionPolicy(strategy="least_confidence", budget=6, audit_rate=0.0, control_rate=0.0)
TOLERANCE = 1e-4


# --- planning batches (no servers) ----------------------------------------------------------


def _files(*sizes: int) -> list[SourceFile]:
    return [SourceFile(f"s3://incoming/f{i:02d}", size) for i, size in enumerate(sizes)]


def _check_plan(files: list[SourceFile], batch_size: int) -> list[list[SourceFile]]:
    batches = plan_batches(files, batch_size)
    assert len(batches) == math.ceil(len(files) / batch_size)  # as many tasks as before
    assert all(batches)
    assert sorted(f.uri for b in batches for f in b) == sorted(f.uri for f in files)
    return batches


def test_distinct_sizes_keep_listing_order_and_batch_size() -> None:
    files = _files(*range(100, 117))
    batches = _check_plan(files, 5)
    assert [f for b in batches for f in b] == files
    assert [len(b) for b in batches] == [5, 5, 5, 2]


def test_equal_sizes_share_a_batch_when_a_cut_can_avoid_splitting_them() -> None:
    # f01 and f08 (size 3) lie far apart; grouped, f03 and f04 (size 7) straddle the cut
    # after 5 files.
    files = _files(1, 3, 4, 7, 7, 8, 9, 10, 3, 11, 12, 13)
    batches = _check_plan(files, 5)
    for size in (3, 7):
        holders = {i for i, b in enumerate(batches) for f in b if f.size == size}
        assert len(holders) == 1, (size, batches)
    # Within a size, listing order: the first name is the one ingested.
    flat = [f.uri for b in batches for f in b]
    assert flat.index("s3://incoming/f01") < flat.index("s3://incoming/f08")
    assert flat.index("s3://incoming/f03") < flat.index("s3://incoming/f04")


def test_a_run_of_equal_sizes_longer_than_a_batch_is_split_but_no_batch_is_empty() -> None:
    batches = _check_plan(_files(*([50] * 9), 1, 2), 3)
    assert len(batches) == 4
    assert plan_batches([], 8) == []
    assert _check_plan(_files(5, 5), 1) == [[_files(5, 5)[0]], [_files(5, 5)[1]]]


# --- two batches racing for the same bytes (no servers) ---------------------------------------


class _NoStore:
    """Sources are local files and uploads go nowhere: only the database is under test."""

    def put_bytes(self, *args: Any, **kwargs: Any) -> None:
        pass


@pytest.fixture(params=["sqlite", "postgresql"])
def fresh_db(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    if request.param == "sqlite":
        url = f"sqlite:///{request.getfixturevalue('tmp_path') / 'race.db'}"
    else:
        url = request.getfixturevalue("postgres_url")
    migrate(url)
    monkeypatch.setenv("VISIONLOOP_DATABASE_URL", url)
    get_settings.cache_clear()
    yield url
    get_settings.cache_clear()


def test_concurrent_batches_with_identical_bytes_make_one_image(
    fresh_db: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Both batches look before either writes (a barrier holds them there), so both believe
    the shared content is new; the database's unique content hash lets one insert win and
    the other batch turns its file into a duplicate and still writes the rest."""
    jpegs = list(good_jpegs(3, seed=301).values())
    paths = {}
    for name, data in {
        "a/shared.jpg": jpegs[0],
        "b/shared.jpg": jpegs[0],
        "a/own.jpg": jpegs[1],
        "b/own.jpg": jpegs[2],
    }.items():
        path = tmp_path / name
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(data)
        paths[name] = SourceFile(path.as_uri(), len(data))

    barrier = threading.Barrier(2, timeout=30)
    looked = threading.local()
    real_known = ingest_module._known_hashes

    def known_then_wait(session, hashes):
        found = real_known(session, hashes)
        if not getattr(looked, "once", False):  # the batch's look before writing, not a recheck
            looked.once = True
            barrier.wait()
        return found

    # Not a mock: the real lookup runs against the real database; the wrapper only holds both
    # batches at the point between looking and writing, an interleaving that two real batches
    # reach only by chance and that no input can cause on demand.
    monkeypatch.setattr(ingest_module, "_known_hashes", known_then_wait)
    settings = get_settings()
    reports: dict[str, Any] = {}

    def run(side: str) -> None:
        # One settle chunk per batch: both files are looked up at once, before any write.
        sources = [paths[f"{side}/shared.jpg"], paths[f"{side}/own.jpg"]]
        with session_scope() as session:  # each batch its own, as on two workers
            reports[side] = ingest_batch(session, settings, _NoStore(), sources, predictor=None)  # type: ignore[arg-type]

    threads = [threading.Thread(target=run, args=(side,)) for side in "ab"]
    with caplog.at_level(logging.INFO, logger="ingestion.pipeline"):
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
    assert set(reports) == {"a", "b"}
    # The loser really met the unique constraint (not a lucky order of the two looks).
    assert "1 images were committed concurrently" in caplog.text

    with session_scope() as session:
        rows = list(session.exec(select(Image)))
    by_hash = {r.content_hash: r for r in rows}
    assert len(rows) == 3 and set(by_hash) == {sha256_hex(j) for j in jpegs}
    shared = by_hash[sha256_hex(jpegs[0])]
    outcomes = {o.uri: o for r in reports.values() for o in r.files}
    statuses = sorted(outcomes[paths[f"{s}/shared.jpg"].uri].status for s in "ab")
    assert statuses == ["duplicate", "ingested"]
    assert {outcomes[paths[f"{s}/shared.jpg"].uri].image_id for s in "ab"} == {shared.id}
    assert shared.source_key in {paths["a/shared.jpg"].uri, paths["b/shared.jpg"].uri}
    for side in "ab":
        own = outcomes[paths[f"{side}/own.jpg"].uri]
        assert own.status == "ingested" and own.image_id is not None


# --- the flow on both runners against the real stack ------------------------------------------


@pytest.fixture(scope="module")
def champion(stack: Stack) -> str:
    """The registered champion, or a barely trained one when this module runs alone."""
    from flows.bootstrap import bootstrap_flow

    return bootstrap_flow(epochs=2, images=16)["version"]


def _incoming() -> dict[str, bytes]:
    files = dict(good_jpegs(12, seed=201))
    files.update({f"awkward/{n}": a.data for n, a in awkward_files(202).items()})
    files.update({f"bad/{n}": data for n, (data, _) in malformed_files(203).items()})
    # Byte-duplicates under other names, of a good image and of a corrupt file.
    files["copy/img_000.jpg"] = files["img_000.jpg"]
    files["zz/img_005.jpg"] = files["img_005.jpg"]
    files["copy/notes.txt"] = files["bad/notes.txt"]
    return files


def _run_env(tag: str, runner: str, db_url: str) -> dict[str, str]:
    return {
        "VISIONLOOP_DATABASE_URL": db_url,
        "VISIONLOOP_BUCKET_INCOMING": f"dask-eq-incoming-{tag}",
        "VISIONLOOP_BUCKET_IMAGES": f"dask-eq-images-{runner}-{tag}",
        "VISIONLOOP_BUCKET_QUARANTINE": f"dask-eq-quarantine-{runner}-{tag}",
        "VISIONLOOP_LABEL_STUDIO_PROJECT": f"dask equivalence {runner} {tag}",
        "VISIONLOOP_TASK_RUNNER": runner,
        "VISIONLOOP_DASK_ADDRESS": "",
        "VISIONLOOP_DASK_WORKERS": "2",
    }


def _ingest_into_fresh_state(
    tag: str, runner: str, files: dict[str, bytes], tmp_path: Path
) -> dict[str, Any]:
    """Ingest ``files`` with ``runner`` into state of its own; returns what it left behind."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.ingest import ingest_flow

    db_url = f"sqlite:///{tmp_path / f'{runner}.db'}"
    migrate(db_url)
    env = _run_env(tag, runner, db_url)
    saved = {key: os.environ.get(key) for key in env}
    os.environ.update(env)  # the Dask workers the run starts inherit this environment
    get_settings.cache_clear()
    try:
        settings = get_settings()
        store = ObjectStore(settings)
        store.ensure_buckets(
            [settings.bucket_incoming, settings.bucket_images, settings.bucket_quarantine]
        )
        for name, data in files.items():
            if not store.exists(settings.bucket_incoming, name):
                store.put_bytes(settings.bucket_incoming, name, data)
        # Prefect fixes its settings when first imported: make sure the flow reports to the
        # stack's server even if something imported Prefect before the stack started.
        with temporary_settings({PREFECT_API_URL: settings.prefect_api}):
            state = ingest_flow(batch_size=BATCH, conf=CONF, selection=POLICY, return_state=True)
        return {"summary": state.result(), **_left_behind(settings, files)}
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        get_settings.cache_clear()


def _left_behind(settings: Settings, files: dict[str, bytes]) -> dict[str, Any]:
    """A run's rows, objects and Label Studio tasks, keyed by content and source name."""
    with session_scope() as session:
        images = list(session.exec(select(Image)))
        predictions = list(session.exec(select(Prediction)))
        queue = list(session.exec(select(LabelingQueueItem)))
    hash_of = {i.id: i.content_hash for i in images}
    by_hash = {i.content_hash: i for i in images}
    source = f"s3://{settings.bucket_incoming}/"

    outcomes = {}
    for name, data in files.items():
        row = by_hash[sha256_hex(data)]
        if row.source_key == source + name:
            outcomes[name] = (_ingested(row.status), row.quarantine_reason)
        else:
            outcomes[name] = ("duplicate of", row.source_key.removeprefix(source))

    store = ObjectStore(settings)
    project = review_project(settings)
    tasks = list(project.ls.tasks.list(project=project.id, fields="all", page_size=500))
    # What the policy picks from this run's own predictions.
    candidates = [
        Candidate(p.image_id, hash_of[p.image_id], [b["conf"] for b in p.boxes])
        for p in predictions
    ]
    result = {
        "outcomes": outcomes,
        "images": {
            i.content_hash: dict(
                status=_ingested(i.status),
                object_key=i.object_key,
                size_bytes=i.size_bytes,
                width=i.width,
                height=i.height,
                format=i.format,
                features=i.features,
                quarantine_reason=i.quarantine_reason,
            )
            for i in images
        },
        "objects": [
            {o.key: (o.size, o.etag) for o in store.list_objects(bucket)}
            for bucket in (settings.bucket_images, settings.bucket_quarantine)
        ],
        "predictions": {hash_of[p.image_id]: (p.model_version, p.boxes) for p in predictions},
        "queue": {
            hash_of[q.image_id]: (q.flagged_reason, q.confidence_score, q.status) for q in queue
        },
        "queued_status": {i.content_hash for i in images if _value(i.status) == "queued"},
        "policy_picks": {hash_of[s.image_id] for s in select_for_review(candidates, POLICY)},
        "tasks": sorted(hash_of[t.data[IMAGE_ID_KEY]] for t in tasks),
        "linked": sorted(hash_of[q.image_id] for q in queue if q.label_studio_task_id),
    }
    # Tidy up: the project goes (its webhook first, so deleting it tells the API nothing).
    for hook in project.ls.webhooks.list(project=str(project.id)):
        project.ls.webhooks.delete(id=hook.id)
    project.ls.projects.delete(id=project.id)
    return result


def _value(status: Any) -> str:
    return str(getattr(status, "value", status))


def _ingested(status: Any) -> str:
    """``queued`` is ``predicted`` plus the selection, which is compared on its own."""
    return "predicted" if _value(status) == "queued" else _value(status)


NEAR_FLOOR = 0.01
"""Boxes this close above ``CONF`` may be kept by one run and not the other: their presence is
decided by the last float bits, which differ between processes with other thread counts."""


def _unpaired(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The boxes of ``a`` clear of the floor that find no box of ``b`` of their class within
    ``TOLERANCE``, each box of ``b`` paired at most once.

    Paired, not zipped: boxes are listed by confidence, and two whose confidences differ by
    less than the runtimes' rounding (OpenVINO's threads sum in their own order) may swap."""
    free = list(b)
    missing = []
    for x in a:
        twin = next(
            (
                y
                for y in free
                if y["name"] == x["name"]
                and all(abs(x[k] - y[k]) <= TOLERANCE for k in ("conf", "x1", "y1", "x2", "y2"))
            ),
            None,
        )
        if twin is not None:
            free.remove(twin)
        elif x["conf"] >= CONF + NEAR_FLOOR:
            missing.append(x)
    return missing


def _same_boxes(a: list[dict[str, Any]], b: list[dict[str, Any]]) -> bool:
    return not _unpaired(a, b) and not _unpaired(b, a)


@pytest.mark.stack
@pytest.mark.slow
def test_dask_fan_out_ingests_exactly_like_threads(
    stack: Stack, champion: str, tmp_path: Path
) -> None:
    files = _incoming()
    tag = uuid.uuid4().hex[:8]
    threads = _ingest_into_fresh_state(tag, "threads", files, tmp_path)
    dask = _ingest_into_fresh_state(tag, "dask", files, tmp_path)

    # The comparison means something: every kind of outcome occurred.
    summary = threads["summary"]
    malformed = len(malformed_files(203))
    assert summary["files"] == len(files)
    assert (summary["ingested"], summary["quarantined"], summary["duplicates"]) == (
        len(files) - malformed - 3,
        malformed,
        3,
    )
    assert summary["model_version"] == champion
    assert summary["queued"] == POLICY.budget
    assert math.ceil(len(files) / BATCH) >= 5  # several batches to spread over the workers

    # Where the batches ran: here with threads; only in other processes with Dask.
    here = os.getpid()
    assert [w.rsplit(":", 1)[1] for w in summary["workers"]] == [str(here)]
    assert dask["summary"]["workers"]
    assert all(w.rsplit(":", 1)[1] != str(here) for w in dask["summary"]["workers"])

    ignore = {"seconds", "images_per_second", "queued_images", "workers"}
    assert {k: v for k, v in dask["summary"].items() if k not in ignore} == {
        k: v for k, v in summary.items() if k not in ignore
    }
    assert dask["outcomes"] == threads["outcomes"]
    assert dask["outcomes"]["copy/img_000.jpg"][0] != "duplicate of"  # listed first: it wins
    assert dask["outcomes"]["img_000.jpg"] == ("duplicate of", "copy/img_000.jpg")
    assert dask["outcomes"]["zz/img_005.jpg"] == ("duplicate of", "img_005.jpg")
    assert dask["outcomes"]["copy/notes.txt"] == ("duplicate of", "bad/notes.txt")
    assert dask["outcomes"]["bad/notes.txt"][0] == "quarantined"

    assert dask["images"].keys() == threads["images"].keys()
    for content_hash, row in threads["images"].items():
        other = dask["images"][content_hash]
        assert {k: v for k, v in other.items() if k != "features"} == {
            k: v for k, v in row.items() if k != "features"
        }, content_hash
        if row["features"] is None:
            assert other["features"] is None
        else:
            assert other["features"] == pytest.approx(row["features"], rel=1e-9, abs=1e-12)
    assert dask["objects"] == threads["objects"]

    assert dask["predictions"].keys() == threads["predictions"].keys()
    assert len(threads["predictions"]) == summary["ingested"]
    for content_hash, (version, boxes) in threads["predictions"].items():
        other_version, other_boxes = dask["predictions"][content_hash]
        assert version == other_version == champion
        assert _same_boxes(boxes, other_boxes), (
            content_hash,
            _unpaired(boxes, other_boxes),
            _unpaired(other_boxes, boxes),
        )

    # The selection: each run queued what the policy picks from its own predictions...
    for run in (threads, dask):
        assert set(run["queue"]) == run["policy_picks"] == run["queued_status"]
        assert sorted(run["queue"]) == run["tasks"] == run["linked"]  # one task each
        assert len(run["queue"]) == POLICY.budget
    # ...and both queued the same images for the same reasons (ties go by content).
    assert set(threads["queue"]) == set(dask["queue"])
    for content_hash in threads["queue"]:
        reason, confidence, status = threads["queue"][content_hash]
        other_reason, other_confidence, other_status = dask["queue"][content_hash]
        assert (other_reason, other_status) == (reason, status)
        assert other_confidence == pytest.approx(confidence, abs=TOLERANCE)


# --- choosing the task runner (no servers) ----------------------------------------------------
# Last in the file: importing Prefect fixes its settings for the process, and the stack test
# above must start the servers first (it also pins Prefect to the stack's API itself).


def test_the_settings_choose_the_task_runner(monkeypatch: pytest.MonkeyPatch) -> None:
    from prefect.task_runners import ThreadPoolTaskRunner
    from prefect_dask import DaskTaskRunner

    from flows.ingest import SettingsTaskRunner, ingest_flow, ingest_task_runner

    threads = ingest_task_runner(Settings())
    assert isinstance(threads, ThreadPoolTaskRunner) and threads._max_workers == 1
    local = ingest_task_runner(Settings(task_runner="dask", dask_workers=3))
    assert isinstance(local, DaskTaskRunner) and local.address is None
    assert local.cluster_kwargs["n_workers"] == 3
    assert local.cluster_kwargs["threads_per_worker"] == 1
    remote = ingest_task_runner(Settings(task_runner="dask", dask_address="tcp://dask:8786"))
    assert isinstance(remote, DaskTaskRunner) and remote.address == "tcp://dask:8786"
    assert not remote.cluster_kwargs

    # The flow's runner reads the settings when a run starts it, not at import.
    assert isinstance(ingest_flow.task_runner, SettingsTaskRunner)
    monkeypatch.setenv("VISIONLOOP_TASK_RUNNER", "dask")
    monkeypatch.setenv("VISIONLOOP_DASK_ADDRESS", "tcp://dask:8786")
    get_settings.cache_clear()
    try:
        with ingest_flow.task_runner.duplicate() as runner:
            # Entering a DaskTaskRunner connects nothing until the first task is submitted.
            assert isinstance(runner._runner, DaskTaskRunner)
            assert runner._runner.address == "tcp://dask:8786"
        assert runner._runner is None
    finally:
        get_settings.cache_clear()
