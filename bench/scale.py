"""Dashboard endpoints at two history sizes: does their cost stay flat as the images pile up?

    .venv/bin/python -m bench.scale [--small 10000] [--large 1000000] [--calls 30] [--quick]

For each size a scratch PostgreSQL database on ``--admin-url`` (the local one by default) is
created, migrated with the project's migrations, filled in SQL (``generate_series``: seconds,
not minutes) with ``N`` images and what a loop that has run that long leaves behind (see
``fill``), and dropped at the end. Each dashboard endpoint is then called ``--calls`` times
on each database, the two taking turns call by call, through the real FastAPI app (``httpx``
over the ASGI transport, one app per database with its settings pointing there) and its p50
taken. The table prints, per endpoint, the p50 at both sizes, their
ratio and whether it meets the target: at most ``TARGET`` times slower for ``large / small``
times the data.

Endpoints that need MLflow, Label Studio or Prefect answer from those services, not from the
history in the database: they are out of the scale question and listed as excluded (their
first answer's status says why). ``--quick`` is a smoke run (2,000 against 20,000 images).
"""

from __future__ import annotations

import argparse
import asyncio
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import httpx
import psycopg

from api.telemetry import percentile
from visionloop.settings import DEFAULT_CLASS_NAMES, load_settings
from visionloop.stats_counters import rebuild

ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
TARGET = 1.5
"""p50 at the large size over p50 at the small one: the most a flat endpoint may show."""

ENDPOINTS: tuple[str, ...] = (
    "/api/retraining/status",
    "/api/retraining/conditions",
    "/api/retraining/history",
    "/api/events?kind=training.&limit=300",
    "/api/events?limit=1",
    "/api/metrics/drift/history?limit=200",
    "/api/metrics/drift",
    "/api/labeling/stats",
    "/api/labeling/queue",
    "/api/labeling/queue?status=pending",
    "/api/labeling/ledger?cycles=20",
    "/api/models?limit=10",
    "/api/system/health",
    "/api/system/resources",
    "/api/system/info",
)
NEEDS_SERVICES = {
    "/api/retraining/status": "MLflow (the champion alias)",
    "/api/retraining/conditions": "MLflow (the champion's age)",
    "/api/models?limit=10": "MLflow (the registry)",
    "/api/system/health": "every service's health check",
}
"""Endpoints whose answer comes from another service: out of the database scale question."""

CYCLE_IMAGES = 100
"""Images per selection cycle (one ingest run's worth): the cycle count grows with history, and
even the quick run's small size has the 20 cycles the dashboard's ledger shows."""


@dataclass(frozen=True)
class Counts:
    images: int
    predictions: int
    queue: int
    reviewed: int
    drift_results: int
    events: int
    retraining_runs: int


def expected_counts(n: int) -> Counts:
    """What ``fill`` writes for ``n`` images (the rules below, counted in Python)."""
    queued = sum(1 for i in range(1, n + 1) if i % 7 == 0 or i % 9 == 1)
    return Counts(
        images=n,
        predictions=n,
        queue=queued,
        reviewed=n // 7,
        drift_results=n // 50 + 250,
        events=max(n // 2, 1),
        retraining_runs=n // 2000 + 12,
    )


# The fill, in SQL. Every image has a prediction (three model versions, oldest first); one in
# seven was queued and reviewed (~14%: 143k of 1M), one in nine more is queued and pending,
# skipped or cancelled. Reviews: 3 of 5 accept the boxes as shown, 1 corrects (moves a box off),
# 1 rejects (draws one box of its own); one in 35 reviews names a model version with
# no prediction (not comparable), one in 70 none at all. Drift results: one per 50 images, plus
# 250 so the dashboard's 200-point timeline is full at every size; events: one per 2 images.
# Coordinates carry the image's id in their last digits: no two images' boxes are the same
# (in production none are), so nothing can answer for one image from another's. Then the
# running totals the app keeps as it writes are counted from these rows (``rebuild``, as
# migration 0006 does for an existing history). VACUUM last: the tables as autovacuum keeps
# them, and no autovacuum running during the timings.
_FILL = """
INSERT INTO images (id, content_hash, object_key, size_bytes, width, height, format, features,
                    status, created_at)
SELECT i, md5(i::text) || md5((i + 1)::text), 'bench/' || i || '.jpg', 50000, 640, 480, 'jpeg',
       json_build_object('blur', (i %% 100) / 10.0, 'brightness', i %% 255),
       CASE WHEN i %% 7 = 0 THEN 'labeled' WHEN i %% 9 = 1 THEN 'queued' ELSE 'predicted' END,
       %(t0)s::timestamptz + i * interval '1 second'
FROM generate_series(1, %(n)s) AS i;

INSERT INTO predictions (id, image_id, model_version, boxes, num_boxes, mean_confidence,
                         max_confidence, min_confidence, uncertainty, source, created_at)
SELECT i, i,
       CASE WHEN i * 3 <= %(n)s THEN '1' WHEN i * 3 <= 2 * %(n)s THEN '2' ELSE '3' END,
       (SELECT json_agg(json_build_object(
                'cls', (i + k) %% 4,
                'name', (ARRAY[%(names)s, 'ghost'])[(i + k) %% 4 + 1],
                'conf', 0.3 + ((i * 7 + k) %% 70) / 100.0,
                'x1', ((i * 13 + k * 29) %% 60) / 100.0 + i / 1e9,
                'y1', ((i * 17 + k * 31) %% 60) / 100.0,
                'x2', ((i * 13 + k * 29) %% 60) / 100.0 + 0.1 + ((i + k) %% 30) / 100.0,
                'y2', ((i * 17 + k * 31) %% 60) / 100.0 + 0.1 + ((i + 2 * k) %% 30) / 100.0))
        FROM generate_series(0, i %% 3) AS k),
       1 + i %% 3, 0.5, 0.9, 0.3, (i %% 100) / 100.0, 'ingest',
       %(t0)s::timestamptz + i * interval '1 second'
FROM generate_series(1, %(n)s) AS i;

INSERT INTO labeling_queue (image_id, prediction_id, image_path, confidence_score, status,
                            flagged_reason, arm, cycle, score_parts, label_studio_task_id,
                            sync_error, created_at, labeled_at)
SELECT i, i, 's3://images/bench/' || i || '.jpg', (i %% 100) / 100.0,
       CASE WHEN i %% 7 = 0 THEN (CASE WHEN i %% 11 = 0 THEN 'approved' ELSE 'labeled' END)
            ELSE (ARRAY['pending', 'pending', 'skipped', 'cancelled'])[i %% 4 + 1] END,
       (ARRAY['uncertainty', 'diversity', 'low_confidence', 'drift'])[(i / 7) %% 4 + 1],
       CASE WHEN i %% 10 = 0 THEN 'control' WHEN i %% 10 = 1 THEN 'audit' ELSE 'selected' END,
       'cycle-' || lpad((i / %(cycle)s)::text, 6, '0'),
       json_build_object('uncertainty', (i %% 100) / 100.0),
       i,
       CASE WHEN i %% 97 = 1 THEN 'box outside the image' END,
       %(t0)s::timestamptz + i * interval '1 second' + interval '1 second',
       CASE WHEN i %% 7 = 0
            THEN %(t0)s::timestamptz + i * interval '1 second' + interval '1 hour' END
FROM generate_series(1, %(n)s) AS i
WHERE i %% 7 = 0 OR i %% 9 = 1;

INSERT INTO reviewed_labels (image_id, image_path, label, boxes, confidence, reviewer, verdict,
                             label_studio_task_id, label_studio_annotation_id,
                             prediction_model_version, used_for_training, created_at)
SELECT p.image_id, 's3://images/bench/' || p.image_id || '.jpg', %(first)s,
       CASE v.verdict
         WHEN 'rejected' THEN json_build_array(json_build_object(
             'cls', 0, 'name', %(first)s, 'cx', 0.5, 'cy', 0.5, 'w', 0.2, 'h', 0.2))
         ELSE (SELECT json_agg(json_build_object(
                  'cls', b.value -> 'cls', 'name', b.value -> 'name',
                  'cx', ((b.value ->> 'x1')::float + (b.value ->> 'x2')::float) / 2
                        + CASE WHEN v.verdict = 'corrected' AND b.ordinality = 1
                               THEN 0.3 ELSE 0 END,
                  'cy', ((b.value ->> 'y1')::float + (b.value ->> 'y2')::float) / 2,
                  'w', (b.value ->> 'x2')::float - (b.value ->> 'x1')::float,
                  'h', (b.value ->> 'y2')::float - (b.value ->> 'y1')::float))
               FROM json_array_elements(p.boxes) WITH ORDINALITY AS b)
       END,
       0.5, 'reviewer-' || p.image_id %% 5, v.verdict, p.image_id, p.image_id,
       CASE WHEN p.image_id %% 70 = 0 THEN NULL WHEN p.image_id %% 35 = 0 THEN '0'
            ELSE p.model_version END,
       p.image_id %% 2 = 0,
       %(t0)s::timestamptz + p.image_id * interval '1 second' + interval '1 hour'
FROM predictions AS p,
     LATERAL (SELECT (ARRAY['accepted', 'accepted', 'accepted', 'corrected', 'rejected'])
                     [(p.image_id / 7) %% 5 + 1] AS verdict) AS v
WHERE p.image_id %% 7 = 0;

INSERT INTO drift_results (created_at, model_version, stat_test, drift_score, drift_share,
                           dataset_drift, level, window_size, reference_size, features,
                           report_key)
SELECT %(t0)s::timestamptz + j * interval '50 seconds', '3', 'ks', (j %% 10) / 10.0,
       (j %% 5) / 5.0, j %% 5 = 0,
       (ARRAY['green', 'green', 'yellow', 'red'])[j %% 4 + 1], 500, 5000,
       json_build_object(
           'blur', json_build_object('name', 'blur', 'statistic', 0.01, 'p_value', 0.01,
                                     'threshold', 0.05, 'drifted', true, 'severity', 0.8),
           'brightness', json_build_object('name', 'brightness', 'statistic', 0.4,
                                           'p_value', 0.4, 'threshold', 0.05,
                                           'drifted', false, 'severity', 0.1),
           '_p_value', 0.02),
       NULL
FROM generate_series(1, %(n)s / 50 + 250) AS j;

INSERT INTO activity_events (created_at, kind, level, message, payload)
SELECT %(t0)s::timestamptz + j * interval '2 seconds',
       (ARRAY['ingest.progress', 'queue.added', 'labels.synced', 'training.epoch',
              'ingest.completed', 'training.started', 'drift.skipped',
              'training.finished'])[j %% 8 + 1],
       'info', 'event ' || j, json_build_object('step', j)
FROM generate_series(1, greatest(%(n)s / 2, 1)) AS j;

INSERT INTO retraining_runs (trigger, reason, status, created_at, started_at, finished_at,
                             model_version, metrics, promoted, decision_reasons)
SELECT (ARRAY['drift', 'labels', 'manual', 'schedule'])[j %% 4 + 1], 'bench',
       (ARRAY['succeeded', 'failed', 'succeeded', 'cancelled'])[j %% 4 + 1],
       %(t0)s::timestamptz + j * interval '1 hour', %(t0)s::timestamptz + j * interval '1 hour',
       %(t0)s::timestamptz + j * interval '1 hour' + interval '20 minutes',
       j::text, json_build_object('map50', 0.5), j %% 2 = 0, '[]'::json
FROM generate_series(1, %(n)s / 2000 + 12) AS j;

SELECT setval(pg_get_serial_sequence('images', 'id'), %(n)s);
SELECT setval(pg_get_serial_sequence('predictions', 'id'), %(n)s);
"""


def fill(url: str, n: int) -> float:
    """Fill the migrated database at ``url`` with ``n`` images' history; seconds it took."""
    names = ", ".join(f"'{name}'" for name in DEFAULT_CLASS_NAMES)
    sql = _FILL.replace("%(names)s", names).replace("%(first)s", f"'{DEFAULT_CLASS_NAMES[0]}'")
    params = {"n": n, "t0": "2026-01-01T00:00:00+00:00", "cycle": CYCLE_IMAGES}
    started = time.perf_counter()
    with psycopg.connect(url, autocommit=True) as conn:
        for statement in sql.split(";\n"):
            if statement.strip():
                conn.execute(statement, params)  # type: ignore[arg-type]
    count_history(url)
    with psycopg.connect(url, autocommit=True) as conn:
        conn.execute("VACUUM ANALYZE")
    return time.perf_counter() - started


def count_history(url: str) -> None:
    """The running totals of what the SQL fill wrote past the app (``rebuild``)."""
    from visionloop.db import make_engine

    engine = make_engine(url, timeout_s=30.0)
    try:
        with engine.begin() as conn:
            rebuild(conn, DEFAULT_CLASS_NAMES)
    finally:
        engine.dispose()


def filled_counts(url: str) -> Counts:
    tables = (
        "images",
        "predictions",
        "labeling_queue",
        "reviewed_labels",
        "drift_results",
        "activity_events",
        "retraining_runs",
    )
    with psycopg.connect(url) as conn:
        found = [conn.execute(f"SELECT count(*) FROM {t}").fetchone()[0] for t in tables]  # type: ignore[index]
    return Counts(*found)


@contextmanager
def scratch_database(admin_url: str) -> Iterator[str]:
    """A fresh database beside ``admin_url``'s, migrated to head; dropped afterwards."""
    from visionloop.db import migrate

    name = f"visionloop_scale_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin_url, autocommit=True) as admin:
        admin.execute(f'CREATE DATABASE "{name}"')
    url = f"{admin_url.rsplit('/', 1)[0]}/{name}"
    try:
        migrate(url)
        yield url
    finally:
        from visionloop.db import _engine

        _engine.cache_clear()  # the app's pooled connections would keep the database open
        with psycopg.connect(admin_url, autocommit=True) as admin:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class Timing:
    status: int
    p50_ms: float | None
    error: str = ""


def _client(url: str) -> httpx.AsyncClient:
    """A client of a fresh app whose settings point at the database at ``url``."""
    from api import deps
    from api.main import create_app

    settings = load_settings(database_url=url, service_timeout_s=5.0)
    app = create_app()
    app.dependency_overrides[deps.settings] = lambda: settings
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://bench")


async def _time_endpoints(urls: list[str], calls: int) -> list[dict[str, Timing]]:
    """p50 per endpoint per database. The databases take turns call by call, so a change in
    the machine's load during the run weighs on every size alike instead of on the ratios."""
    clients = [_client(url) for url in urls]
    found: list[dict[str, Timing]] = [{} for _ in urls]
    try:
        for path in ENDPOINTS:
            if path in NEEDS_SERVICES:
                for timings in found:
                    timings[path] = Timing(0, None, f"needs {NEEDS_SERVICES[path]}")
                continue
            # The first call warms caches and the pool; not counted.
            firsts = [await client.get(path) for client in clients]
            if any(first.status_code != 200 for first in firsts):
                for timings, first in zip(found, firsts, strict=True):
                    timings[path] = Timing(first.status_code, None, first.text[:120])
                continue
            samples: list[list[float]] = [[] for _ in urls]
            for _ in range(calls):
                for client, taken in zip(clients, samples, strict=True):
                    started = time.perf_counter()
                    response = await client.get(path)
                    taken.append((time.perf_counter() - started) * 1000)
                    assert response.status_code == 200, (path, response.status_code)
            for timings, taken in zip(found, samples, strict=True):
                timings[path] = Timing(200, percentile(taken, 50))
    finally:
        for client in clients:
            await client.aclose()
    return found


def time_endpoints(url: str, calls: int) -> dict[str, Timing]:
    """p50 of each endpoint over ``calls`` calls through the app, on the database at ``url``."""
    return asyncio.run(_time_endpoints([url], calls))[0]


def _filled(url: str, n: int) -> Counts:
    seconds = fill(url, n)
    counts = filled_counts(url)
    print(f"filled {n:,} images in {seconds:.1f} s: {counts}", flush=True)
    return counts


def report(
    small: int, large: int, at_small: dict[str, Timing], at_large: dict[str, Timing]
) -> None:
    print(
        f"\n{'endpoint':<40} {'p50 @' + format(small, ','):>14} {'p50 @' + format(large, ','):>16}"
        f" {'ratio':>7}  target <= {TARGET}"
    )
    for path in ENDPOINTS:
        a, b = at_small[path], at_large[path]
        if a.p50_ms is None or b.p50_ms is None:
            why = a.error or b.error or f"status {a.status}/{b.status}"
            print(f"{path:<40} {'excluded':>14} {'':>16} {'':>7}  ({why})")
            continue
        ratio = b.p50_ms / a.p50_ms
        verdict = "meets" if ratio <= TARGET else "not met"
        print(
            f"{path:<40} {a.p50_ms:>11.2f} ms {b.p50_ms:>13.2f} ms {ratio:>7.2f}  {verdict}",
            flush=True,
        )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--large", type=int, default=1_000_000)
    parser.add_argument("--calls", type=int, default=30)
    parser.add_argument("--quick", action="store_true", help="2,000 against 20,000 images")
    parser.add_argument("--admin-url", default=ADMIN_URL)
    args = parser.parse_args(argv)
    small, large = (2_000, 20_000) if args.quick else (args.small, args.large)
    with (
        scratch_database(args.admin_url) as small_url,
        scratch_database(args.admin_url) as large_url,
    ):
        _filled(small_url, small)
        _filled(large_url, large)
        at_small, at_large = asyncio.run(_time_endpoints([small_url, large_url], args.calls))
    report(small, large, at_small, at_large)


if __name__ == "__main__":
    main()
