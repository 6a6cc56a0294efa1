"""The scale benchmark's quick mode runs: its fill writes the history it says and counts it in
the running totals, and one timing pass through the app answers every database endpoint (no
timing is asserted)."""

from __future__ import annotations

from conftest import POSTGRES_ADMIN_URL

from bench import scale
from visionloop.db import make_engine
from visionloop.stats_counters import read_counters


def test_quick_fill_and_one_timing_pass() -> None:
    small = 2_000  # the quick run's small size
    with scale.scratch_database(POSTGRES_ADMIN_URL) as url:
        scale.fill(url, small)
        counts = scale.filled_counts(url)
        assert counts == scale.expected_counts(small)
        assert counts.reviewed / counts.images > 0.14  # ~14% reviewed, as in production
        engine = make_engine(url)
        with engine.connect() as conn:
            counters = read_counters(conn)
        engine.dispose()
        assert sum(n for (kind, _, _), n in counters.items() if kind == "queue") == counts.queue
        assert (
            sum(n for (kind, _, _), n in counters.items() if kind == "verdict") == counts.reviewed
        )
        assert 0 < counters[("compared", "", "")] < counts.reviewed  # some judged no prediction
        timings = scale.time_endpoints(url, calls=1)
    measured = {path for path, t in timings.items() if t.p50_ms is not None}
    assert measured == set(scale.ENDPOINTS) - set(scale.NEEDS_SERVICES), timings
