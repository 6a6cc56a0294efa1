"""Hostile files at ingest: memory bounded by bytes, poison pills, changed content, outages."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from samples import deep_png, good_jpegs
from sqlmodel import col, select
from stack_faults import service_down

from cli.stack import Stack, prefect_call
from ingestion.pipeline import (
    BatchTimedOut,
    ByteBudget,
    Deadline,
    PrepareOptions,
    SourceFile,
    list_bucket,
    list_folder,
    prepared_chunks,
)
from ingestion.upload import store_incoming
from labeling.selection import SelectionPolicy
from monitoring.drift_data import _reference_rows
from monitoring.features import extract_features
from visionloop.db import session_scope
from visionloop.images import DecodeLimits, ImageRejected, decode_cost, decode_image
from visionloop.models import Image, ImageStatus, IngestAttempt
from visionloop.settings import Settings, get_settings
from visionloop.storage import ObjectStore


def _drain(folder: Path, budget: ByteBudget) -> list[str]:
    """Every file of ``folder`` prepared as a batch does, each released once settled."""
    seen = []
    options = PrepareOptions(None, DecodeLimits(40_000_000, 2**30))
    with ThreadPoolExecutor(2) as pool:
        for chunk in prepared_chunks(pool, None, list_folder(folder), options, budget):  # type: ignore[arg-type]
            assert budget.in_flight <= max(budget.limit, max(p.weight for p in chunk))
            seen += [p.source_key for p in chunk if p.decoded is not None]
            for prepared in chunk:
                budget.release(prepared.weight)
    return seen


def test_decoded_bytes_in_flight_stay_within_the_budget(tmp_path: Path) -> None:
    for name, data in good_jpegs(12, seed=7, size=320).items():
        (tmp_path / name).write_bytes(data)
    one = len(good_jpegs(1, seed=7, size=320)["img_000.jpg"]) + decode_cost(
        good_jpegs(1, seed=7, size=320)["img_000.jpg"]
    )
    budget = ByteBudget(int(one * 2.5))  # room for two files at a time, not three
    seen = _drain(tmp_path, budget)
    assert len(seen) == 12
    assert one * 2 <= budget.peak <= budget.limit
    assert budget.in_flight == 0


def test_a_file_larger_than_the_whole_budget_passes_alone(tmp_path: Path) -> None:
    (tmp_path / "a_deep.png").write_bytes(deep_png(1000, 1000))
    for name, data in good_jpegs(3, seed=8).items():
        (tmp_path / name).write_bytes(data)
    budget = ByteBudget(1024 * 1024)  # the 16-bit frame alone needs about 9 MB
    seen = _drain(tmp_path, budget)
    assert len(seen) == 4
    assert budget.peak == len(deep_png(1000, 1000)) + decode_cost(deep_png(1000, 1000))


def test_a_batch_stops_at_its_deadline_while_a_file_is_still_decoding(tmp_path: Path) -> None:
    slow = deep_png(5000, 5000)  # about 50 kB, a good part of a second to decode
    started = time.monotonic()
    decode_image(slow)
    one_decode = time.monotonic() - started
    assert one_decode > 0.1  # well over the deadline below
    for i in range(3):
        (tmp_path / f"slow_{i}.png").write_bytes(slow)
    options = PrepareOptions(None, DecodeLimits(40_000_000, 2**30))
    yielded = []
    pool = ThreadPoolExecutor(2)
    started = time.monotonic()
    try:
        with pytest.raises(BatchTimedOut, match=r"^timed out after 0\.05 s$"):
            chunks = prepared_chunks(
                pool, None, list_folder(tmp_path), options, ByteBudget(2**30), Deadline.after(0.05)
            )  # type: ignore[arg-type]
            for chunk in chunks:
                yielded.append(chunk)
        waited = time.monotonic() - started
    finally:
        pool.shutdown(wait=True)
    assert yielded == []
    assert waited < one_decode  # it gave up on the first file before its decode ended


def test_uploads_and_drift_references_decode_under_the_settings_limits() -> None:
    data = good_jpegs(1, seed=9, size=320)["img_000.jpg"]
    settings = Settings(max_image_pixels=320 * 320 - 1)
    with pytest.raises(ImageRejected) as refused:
        store_incoming(settings, data, store=None)  # type: ignore[arg-type]  # refused before
    assert refused.value.code == "decompression_bomb"

    limits = DecodeLimits.from_settings(settings)
    with pytest.raises(ImageRejected, match="decompression_bomb"):
        _reference_rows([data], ["images/train/a.jpg"], None, [], limits)  # type: ignore[arg-type]
    with pytest.raises(ImageRejected, match="decompression_bomb"):
        _reference_rows([data], ["images/val/a.jpg"], None, [], limits)  # type: ignore[arg-type]
    wide = DecodeLimits(320 * 320, 2**30)
    assert decode_image(data, limits=wide) and extract_features(data, limits=wide)


# --- against the stack ---------------------------------------------------------------------

POLICY = SelectionPolicy(budget=0)


def _ingest(prefix: str) -> dict[str, Any]:
    from flows.ingest import ingest_flow

    return ingest_flow(prefix=prefix, batch_size=8, selection=POLICY)


def _rows(settings: Settings, prefix: str) -> list[Image]:
    start = f"s3://{settings.bucket_incoming}/{prefix}"
    with session_scope() as session:
        found = session.exec(select(Image).where(col(Image.source_key).startswith(start)))
        return sorted(found, key=lambda r: r.id or 0)


def _attempts(uri: str) -> int:
    with session_scope() as session:
        row = session.exec(select(IngestAttempt).where(IngestAttempt.source_key == uri)).first()
        return row.attempts if row else 0


@pytest.mark.stack
def test_a_key_whose_content_changed_is_read_again(settings: Settings) -> None:
    store, prefix = ObjectStore(settings), f"changed-{uuid.uuid4().hex[:8]}/"
    key = prefix + "frame.jpg"
    store.put_bytes(settings.bucket_incoming, key, b"<html>camera offline</html>")
    first = _ingest(prefix)
    assert (first["files"], first["quarantined"]) == (1, 1)

    store.put_bytes(settings.bucket_incoming, key, good_jpegs(1, seed=31)["img_000.jpg"])
    second = _ingest(prefix)
    assert (second["files"], second["ingested"], second["quarantined"]) == (1, 1, 0)
    old, new = _rows(settings, prefix)
    assert old.status == ImageStatus.quarantined and old.quarantine_reason.startswith(
        "not_an_image: "
    )
    # Predicted too when an earlier test of the session has made a champion.
    assert new.status in (ImageStatus.ingested, ImageStatus.predicted)
    assert new.source_key == old.source_key and new.source_version != old.source_version

    assert _ingest(prefix)["files"] == 0  # unchanged since: not read again
    assert len(_rows(settings, prefix)) == 2


_ONE_BATCH = """
import sys
from ingestion.pipeline import SourceFile, ingest_sources
ingest_sources([SourceFile(sys.argv[1], int(sys.argv[2]), sys.argv[3])])
"""


def _kill_mid_batch(source: SourceFile, attempt: int) -> None:
    """Run ``source``'s batch in a process of its own and SIGKILL it as soon as its attempt
    is committed, that is while it works on the file."""
    args = [sys.executable, "-c", _ONE_BATCH, source.uri, str(source.size), source.version]
    process = subprocess.Popen(args, cwd=Path(__file__).parents[2])
    try:
        deadline = time.monotonic() + 120
        while _attempts(source.uri) < attempt:
            assert process.poll() is None, "the batch ended before it was killed"
            assert time.monotonic() < deadline, "the batch never recorded its attempt"
            time.sleep(0.005)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait()


@pytest.mark.stack
def test_a_file_whose_batch_keeps_dying_is_quarantined_as_poison(settings: Settings) -> None:
    store, prefix = ObjectStore(settings), f"poison-{uuid.uuid4().hex[:8]}/"
    poison = good_jpegs(1, seed=32, size=2048)["img_000.jpg"]
    store.put_bytes(settings.bucket_incoming, prefix + "poison.jpg", poison)
    for name, data in good_jpegs(2, seed=33).items():
        store.put_bytes(settings.bucket_incoming, prefix + name, data)
    listed = list_bucket(store, settings.bucket_incoming, prefix)
    [source] = [s for s in listed if s.uri.endswith("/poison.jpg")]

    for attempt in range(1, settings.ingest_max_attempts + 1):
        _kill_mid_batch(source, attempt)
        assert _rows(settings, prefix) == []  # killed mid-batch: nothing recorded for it

    summary = _ingest(prefix)
    assert (summary["ingested"], summary["quarantined"]) == (2, 1)
    reason = summary["quarantine"][source.uri]
    assert reason == (
        f"poison: its ingest batch crashed or timed out {settings.ingest_max_attempts} times; "
        "last: the process running it ended without a result"
    )
    [row] = [r for r in _rows(settings, prefix) if r.source_key == source.uri]
    assert row.status == ImageStatus.quarantined and row.quarantine_reason == reason
    assert store.get_bytes(settings.bucket_quarantine, row.object_key) == poison
    assert _attempts(source.uri) == 0


@pytest.mark.stack
def test_an_object_store_outage_fails_the_run_by_name_and_a_rerun_completes(
    stack: Stack, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("VISIONLOOP_TASK_RETRY_DELAY_S", "0")
    get_settings.cache_clear()
    store, prefix = ObjectStore(settings), f"outage-{uuid.uuid4().hex[:8]}/"
    for name, data in good_jpegs(3, seed=34).items():
        store.put_bytes(settings.bucket_incoming, prefix + name, data)
    try:
        with service_down(stack, "s3"), pytest.raises(Exception, match="object store") as failed:
            _ingest(prefix)
        assert settings.s3_host in str(failed.value)
    finally:
        get_settings.cache_clear()
    assert _rows(settings, prefix) == []  # nothing half-recorded

    summary = _ingest(prefix)
    assert (summary["files"], summary["ingested"]) == (3, 3)
    assert len(_rows(settings, prefix)) == 3
    assert _ingest(prefix)["files"] == 0


def _timed_out_run(settings: Settings, prefix: str) -> tuple[BaseException, float]:
    """A run whose batch fails: its error and how long its batch task ran."""
    from flows.ingest import ingest_flow

    state = ingest_flow(prefix=prefix, batch_size=8, selection=POLICY, return_state=True)
    assert state.is_failed()
    error = state.result(raise_on_failure=False)
    assert isinstance(error, BaseException)
    flow_run = str(state.state_details.flow_run_id)
    body = {"flow_runs": {"id": {"any_": [flow_run]}}}
    task_runs = prefect_call(settings, "POST", "task_runs/filter", body=body).json()
    [batch] = [t for t in task_runs if t["name"].startswith("ingest_files")]
    ran = datetime.fromisoformat(batch["end_time"]) - datetime.fromisoformat(batch["start_time"])
    return error, ran.total_seconds()


@pytest.mark.stack
def test_a_file_whose_batch_keeps_timing_out_is_quarantined_as_poison(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    store, prefix = ObjectStore(settings), f"timeout-{uuid.uuid4().hex[:8]}/"
    slow = deep_png(8000, 5000)  # a PNG has no reduced decode, champion or not
    started = time.monotonic()
    decode_image(slow, max_side=640)
    extract_features(slow)
    one_file = time.monotonic() - started
    timeout = 0.1
    assert one_file > 5 * timeout  # the file alone takes far longer
    store.put_bytes(settings.bucket_incoming, prefix + "slow.png", slow)
    [source] = list_bucket(store, settings.bucket_incoming, prefix)

    monkeypatch.setenv("VISIONLOOP_TASK_RETRIES", "0")  # one attempt per run
    monkeypatch.setenv("VISIONLOOP_INGEST_BATCH_TIMEOUT_S", str(timeout))
    get_settings.cache_clear()
    try:
        for attempt in range(1, settings.ingest_max_attempts + 1):
            error, ran = _timed_out_run(settings, prefix)
            assert isinstance(error, TimeoutError) and str(error) == "timed out after 0.1 s"
            # Stopped at the deadline, not once the file in hand was done.
            assert ran < one_file / 2
            assert _attempts(source.uri) == attempt
            assert _rows(settings, prefix) == []
    finally:
        monkeypatch.undo()  # the settings of the session again, for this test and the next
        get_settings.cache_clear()
    # The batch keeps its own deadline: Prefect has no task timeout to warn about.
    assert not [r for r in caplog.records if "worker thread" in r.getMessage()]

    summary = _ingest(prefix)
    assert (summary["files"], summary["quarantined"]) == (1, 1)
    reason = summary["quarantine"][source.uri]
    assert reason == (
        f"poison: its ingest batch crashed or timed out {settings.ingest_max_attempts} times; "
        "last: timed out after 0.1 s"
    )
    [row] = _rows(settings, prefix)
    assert row.status == ImageStatus.quarantined and row.quarantine_reason == reason
    assert store.get_bytes(settings.bucket_quarantine, row.object_key) == slow
    assert _attempts(source.uri) == 0
