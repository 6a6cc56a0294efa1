"""The scale benchmark's quick mode runs: its fill writes the history it says, and one timing
pass through the app answers every database endpoint (no timing is asserted)."""

from __future__ import annotations

from conftest import POSTGRES_ADMIN_URL

from bench import scale


def test_quick_fill_and_one_timing_pass() -> None:
    small = 2_000  # the quick run's small size
    with scale.scratch_database(POSTGRES_ADMIN_URL) as url:
        scale.fill(url, small)
        counts = scale.filled_counts(url)
        assert counts == scale.expected_counts(small)
        assert counts.reviewed / counts.images > 0.14  # ~14% reviewed, as in production
        timings = scale.time_endpoints(url, calls=1)
    measured = {path for path, t in timings.items() if t.p50_ms is not None}
    assert measured == set(scale.ENDPOINTS) - set(scale.NEEDS_SERVICES), timings
