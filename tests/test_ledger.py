"""The label-savings ledger: selected against control, from reviewers' answers.

The computation is tested on crafted rows in a migrated SQLite database; the integration test
runs the real ingest flow on the stack and proves the control arm is a uniform draw from the
whole cycle, recorded apart from the selected arm.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import pytest
from samples import good_jpegs
from sqlmodel import Session, col, select

from cli.stack import Stack
from labeling import selection
from labeling.ledger import MIN_REVIEWED_CONTROLS, bootstrap, ledger, recent_cycles
from labeling.review_queue import image_errors
from labeling.selection import Candidate, SelectionContext, SelectionPolicy
from visionloop.db import make_engine, migrate, session_scope
from visionloop.models import Image, LabelingQueueItem, Prediction, ReviewedLabel, Verdict
from visionloop.settings import get_settings
from visionloop.storage import ObjectStore

CLASSES = ["scratch", "dent"]


def _pred(name: str, x1: float, y1: float, x2: float, y2: float) -> dict[str, Any]:
    return {
        "cls": CLASSES.index(name),
        "name": name,
        "conf": 0.5,
        "x1": x1,
        "y1": y1,
        "x2": x2,
        "y2": y2,
    }


def _rev(name: str, cx: float, cy: float, w: float, h: float) -> dict[str, Any]:
    return {"cls": CLASSES.index(name), "name": name, "cx": cx, "cy": cy, "w": w, "h": h}


# One scene: a scratch and a dent, as the reviewer draws them and as a right champion shows them.
TRUTH = [_rev("scratch", 0.2, 0.2, 0.2, 0.2), _rev("dent", 0.7, 0.7, 0.2, 0.2)]
RIGHT = [_pred("scratch", 0.1, 0.1, 0.3, 0.3), _pred("dent", 0.6, 0.6, 0.8, 0.8)]


def test_image_errors_count_each_fix_once() -> None:
    assert image_errors(RIGHT, TRUTH, CLASSES).errors == 0
    missed = image_errors(RIGHT[:1], TRUTH, CLASSES)
    assert (missed.corrected, missed.missed, missed.errors) == (0, 1, 1)
    false_box = image_errors([*RIGHT, _pred("dent", 0.4, 0.0, 0.5, 0.1)], TRUTH, CLASSES)
    assert (false_box.corrected, false_box.missed) == (1, 0)
    # The dent shown as a scratch: one box corrected (its class), nothing missed.
    relabelled = image_errors([RIGHT[0], _pred("scratch", 0.6, 0.6, 0.8, 0.8)], TRUTH, CLASSES)
    assert (relabelled.corrected, relabelled.missed, relabelled.errors) == (1, 0, 1)
    blind = image_errors([], TRUTH, CLASSES)
    assert (blind.corrected, blind.missed) == (0, 2)


@pytest.fixture
def session(sqlite_url: str) -> Iterator[Session]:
    migrate(sqlite_url)
    with Session(make_engine(sqlite_url)) as session:
        yield session


def add_item(
    session: Session,
    cycle: str,
    arm: str,
    shown: Sequence[dict[str, Any]] | None,
    reviewed: Sequence[dict[str, Any]] | None = TRUTH,
) -> None:
    """One queued image of ``cycle``: the champion showed ``shown`` (None: no prediction), the
    reviewer answered ``reviewed`` (None: not reviewed yet)."""
    key = uuid.uuid4().hex
    image = Image(content_hash=key, object_key=f"{key}.jpg")
    session.add(image)
    session.flush()
    assert image.id is not None
    prediction = None
    if shown is not None:
        prediction = Prediction(image_id=image.id, model_version="1", boxes=list(shown))
        session.add(prediction)
        session.flush()
    session.add(
        LabelingQueueItem(
            image_id=image.id,
            prediction_id=prediction.id if prediction else None,
            image_path=f"s3://images/{key}.jpg",
            flagged_reason={"selected": "margin"}.get(arm, arm),
            arm=arm,
            cycle=cycle,
        )
    )
    if reviewed is not None:
        session.add(
            ReviewedLabel(
                image_id=image.id,
                image_path=f"s3://images/{key}.jpg",
                boxes=list(reviewed),
                verdict=Verdict.corrected,
            )
        )
    session.commit()


def add_arm(session: Session, cycle: str, arm: str, shown: Sequence[list[dict[str, Any]]]) -> None:
    for boxes in shown:
        add_item(session, cycle, arm, boxes)


def test_selection_that_finds_more_errors_shows_a_positive_difference(session: Session) -> None:
    # Selected: the champion missed both boxes on every image; control: 4 of 10 miss one.
    add_arm(session, "c1", "selected", [[]] * 10)
    add_arm(session, "c1", "control", [RIGHT] * 6 + [RIGHT[:1]] * 4)
    result = ledger(session, CLASSES)
    [row] = result.cycles
    assert row.cycle == "c1" and row.enough
    assert (row.selected.reviewed, row.control.reviewed) == (10, 10)
    assert (row.selected.errors_per_image, row.control.errors_per_image) == (2.0, 0.4)
    assert (row.selected.error_rate, row.control.error_rate) == (1.0, 0.4)
    assert row.selected.missed_per_image == 2.0 and row.selected.corrected_per_image == 0.0
    assert row.difference == pytest.approx(1.6) and row.ratio == pytest.approx(5.0)
    assert row.rate_difference == pytest.approx(0.6)
    assert row.difference_interval is not None and row.difference_interval.low > 0
    assert row.ratio_interval is not None and row.ratio_interval.low > 1
    assert row.summary.startswith("selection finds 5.0x more champion errors per image")
    assert "90% interval" in row.summary and "not distinguishable" not in row.summary
    assert result.cumulative.difference == row.difference


def test_the_interval_covers_the_truth_about_as_often_as_it_says() -> None:
    # Poisson errors per image, 2 per selected and 1 per control image: the truth is +1.
    hits = 0
    trials = 100
    for seed in range(trials):
        rng = np.random.default_rng(1000 + seed)
        selected = rng.poisson(2.0, 60).astype(np.float64)
        control = rng.poisson(1.0, 40).astype(np.float64)
        difference, ratio = bootstrap(selected, control)
        assert difference.low < difference.high and ratio is not None
        hits += difference.low <= 1.0 <= difference.high
    assert 0.8 <= hits / trials <= 0.97, hits
    # The same rows give the same interval on every request.
    data = np.array([0, 1, 2, 3, 1, 0, 2], np.float64)
    assert bootstrap(data, data[::-1]) == bootstrap(data, data[::-1])


def test_audit_items_are_in_neither_arm(session: Session) -> None:
    add_arm(session, "c1", "selected", [RIGHT[:1]] * 4)
    add_arm(session, "c1", "control", [RIGHT] * 4)
    before = ledger(session, CLASSES).cycles[0]
    add_arm(session, "c1", "audit", [[]] * 6)  # many errors, in no arm
    after = ledger(session, CLASSES).cycles[0]
    assert after == before
    assert (after.selected.queued, after.control.queued) == (4, 4)


def test_cycles_are_compared_apart_and_together(session: Session) -> None:
    add_arm(session, "old", "selected", [[]] * 5)  # 2 errors each
    add_arm(session, "old", "control", [RIGHT[:1]] * 5)  # 1 error each
    add_arm(session, "new", "selected", [RIGHT[:1]] * 5)
    add_arm(session, "new", "control", [RIGHT] * 5)
    result = ledger(session, CLASSES)
    old, new = result.cycles
    assert (old.cycle, new.cycle) == ("old", "new")  # oldest first
    assert (old.selected.errors_per_image, old.control.errors_per_image) == (2.0, 1.0)
    assert (new.selected.errors_per_image, new.control.errors_per_image) == (1.0, 0.0)
    assert new.ratio is None and new.difference == 1.0  # no control error: no ratio
    assert new.summary.startswith("selection finds 1.00 champion errors per image, random picks")
    total = result.cumulative
    assert total.cycle is None and (total.selected.reviewed, total.control.reviewed) == (10, 10)
    assert (total.selected.errors_per_image, total.control.errors_per_image) == (1.5, 0.5)
    assert total.ratio == pytest.approx(3.0)
    assert recent_cycles(session, 1) == ["new"]
    assert [c.cycle for c in ledger(session, CLASSES, limit=1).cycles] == ["new"]
    assert [c.cycle for c in ledger(session, CLASSES, ["old"]).cycles] == ["old"]


def test_too_few_reviewed_controls_say_so(session: Session) -> None:
    add_arm(session, "c1", "selected", [[]] * 5)
    add_arm(session, "c1", "control", [[]] * (MIN_REVIEWED_CONTROLS - 1))
    add_item(session, "c1", "control", [], reviewed=None)  # queued, not answered yet
    add_item(session, "c1", "control", None)  # no prediction shown: says nothing of the champion
    [row] = ledger(session, CLASSES).cycles
    assert not row.enough and row.difference is None and row.difference_interval is None
    assert (row.control.queued, row.control.reviewed) == (MIN_REVIEWED_CONTROLS + 1, 2)
    assert row.summary.startswith(
        f"not enough reviewed controls yet (2 of {MIN_REVIEWED_CONTROLS} needed"
    )
    empty = ledger(session, CLASSES, ["no-such-cycle"])
    assert not empty.cumulative.enough and empty.cumulative.selected.reviewed == 0


def test_selection_no_better_than_random_is_said_plainly(session: Session) -> None:
    pattern = [[], RIGHT, RIGHT[:1], RIGHT]
    add_arm(session, "c1", "selected", pattern * 2)
    add_arm(session, "c1", "control", pattern)
    [row] = ledger(session, CLASSES).cycles
    assert row.difference == 0.0 and row.ratio == 1.0
    assert row.summary.endswith("not distinguishable from random yet")


# --- against the real stack: the control arm as the ingest flow records it -----------------

STACK_BATCH = 8
BUDGET = 8
STRATEGY = "entropy"


def run_cycle(prefix: str, images: dict[str, bytes], control_rate: float) -> tuple[str, set[int]]:
    """One selection cycle: ``images`` uploaded under ``prefix`` and ingested by the real flow
    (``STRATEGY``, no audit); the cycle's name (the flow run) and its predicted images."""
    from flows.ingest import ingest_flow

    settings = get_settings()
    store = ObjectStore(settings)
    for name, data in images.items():
        store.put_bytes(settings.bucket_incoming, prefix + name, data)
    policy = SelectionPolicy(
        strategy=STRATEGY, budget=BUDGET, audit_rate=0.0, control_rate=control_rate
    )
    state = ingest_flow(
        prefix=prefix, batch_size=STACK_BATCH, conf=0.001, selection=policy, return_state=True
    )
    summary = state.result()
    assert summary["ingested"] == len(images), summary
    source = f"s3://{settings.bucket_incoming}/{prefix}"
    with session_scope() as session:
        pool = set(
            session.exec(
                select(Prediction.image_id)
                .join(Image, col(Image.id) == col(Prediction.image_id))
                .where(col(Image.source_key).startswith(source))
            )
        )
    return str(state.state_details.flow_run_id), pool


def queue_rows(image_ids: set[int]) -> list[LabelingQueueItem]:
    with session_scope() as session:
        return list(
            session.exec(
                select(LabelingQueueItem).where(col(LabelingQueueItem.image_id).in_(image_ids))
            )
        )


def stored_candidates(image_ids: set[int]) -> list[Candidate]:
    """The cycle's candidates rebuilt from the stored predictions (what ``STRATEGY`` reads:
    the shown boxes)."""
    with session_scope() as session:
        rows = session.exec(
            select(Prediction, Image.content_hash)
            .join(Image, col(Image.id) == col(Prediction.image_id))
            .where(col(Prediction.image_id).in_(image_ids))
        ).all()
    return [
        Candidate(
            p.image_id,
            content_hash,
            [b["conf"] for b in p.boxes],
            classes=[int(b["cls"]) for b in p.boxes],
        )
        for p, content_hash in rows
    ]


@pytest.fixture(scope="module")
def champion(stack: Stack) -> str:
    from flows.bootstrap import bootstrap_flow

    return bootstrap_flow(epochs=2, images=16)["version"]


@pytest.mark.stack
@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_the_control_arm_is_a_uniform_draw_recorded_apart(champion: str) -> None:
    run = uuid.uuid4().hex[:8]
    rate = 0.5
    cycle, pool = run_cycle(f"ledger-test/{run}/a/", good_jpegs(24, seed=151), rate)
    rows = queue_rows(pool)
    control = {r.image_id for r in rows if r.arm == "control"}
    selected = {r.image_id for r in rows if r.arm == "selected"}

    # Recorded apart: every row of the cycle names it; the control arm is its own, of
    # ceil(budget * control_rate) images, and no image is in two arms.
    assert {r.cycle for r in rows} == {cycle}
    assert len(control) == math.ceil(BUDGET * rate) == 4
    assert {r.flagged_reason for r in rows if r.arm == "control"} == {"control"}
    assert {r.flagged_reason for r in rows if r.arm == "selected"} == {STRATEGY}
    assert selected and not control & selected and len(rows) == len(control | selected)
    assert {r.arm for r in rows} == {"control", "selected"}  # no audit asked for

    # The recorded draw is the documented one: reproducible from the seed and the cycle.
    candidates = stored_candidates(pool)
    policy = SelectionPolicy(strategy=STRATEGY, budget=BUDGET, audit_rate=0.0, control_rate=rate)
    again = selection.select(candidates, policy, SelectionContext(cycle=cycle))
    assert {s.image_id for s in again if s.arm == "control"} == control
    assert {s.image_id for s in again if s.arm == "selected"} == selected

    # Uniform over all of the cycle's images, whatever the champion thinks of them. The
    # session's champion is barely trained and about equally unsure of every image, so the
    # same images (their content and the cycle decide the draw) are also given opinions from
    # coin flip to sure, most of them sure enough that the strategy never picks them. Over
    # many cycles the control draw is the same under both opinions (it does not look at
    # them), every image is drawn, the sure ones at their share of the pool, and the
    # controls' mean uncertainty is the pool's, while the selected arm's is higher.
    ordered = sorted(candidates, key=lambda c: c.content_hash)
    opinion = {c.image_id: 0.5 + 0.49 * k / (len(ordered) - 1) for k, c in enumerate(ordered)}
    varied = [Candidate(c.image_id, c.content_hash, [opinion[c.image_id]]) for c in candidates]
    uncertainty = {i: selection.binary_entropy(conf) for i, conf in opinion.items()}
    sure = {i for i, conf in opinion.items() if conf >= policy.high}
    assert 0 < len(sure) < len(pool) - BUDGET
    drawn: list[int] = []
    picked: list[int] = []
    for k in range(200):
        context = SelectionContext(cycle=f"{cycle}-{k}")
        chosen = selection.select(varied, policy, context)
        controls = [s.image_id for s in chosen if s.arm == "control"]
        as_stored = selection.select(candidates, policy, context)
        assert controls == [s.image_id for s in as_stored if s.arm == "control"]
        drawn += controls
        picked += [s.image_id for s in chosen if s.arm == "selected"]
    assert set(drawn) == pool and not sure & set(picked)
    share = sum(i in sure for i in drawn) / len(drawn)
    assert share == pytest.approx(len(sure) / len(pool), rel=0.15), share
    values = np.array(list(uncertainty.values()))
    pool_mean, spread = float(values.mean()), float(values.std())
    control_mean = float(np.mean([uncertainty[i] for i in drawn]))
    selected_mean = float(np.mean([uncertainty[i] for i in picked]))
    assert abs(control_mean - pool_mean) < 0.25 * spread, (control_mean, pool_mean, spread)
    assert selected_mean > pool_mean + 0.5 * spread, (selected_mean, pool_mean, spread)

    # A second cycle at another rate is its own cycle, and the ledger keeps them apart.
    second, second_pool = run_cycle(f"ledger-test/{run}/b/", good_jpegs(16, seed=152), 0.25)
    assert second != cycle
    second_rows = queue_rows(second_pool)
    assert {r.cycle for r in second_rows} == {second}
    assert sum(r.arm == "control" for r in second_rows) == math.ceil(BUDGET * 0.25) == 2
    with session_scope() as session:
        result = ledger(session, get_settings().class_names, [cycle, second])
    first_row, second_row = result.cycles
    assert (first_row.control.queued, second_row.control.queued) == (4, 2)
    assert first_row.selected.queued == len(selected)
    assert (first_row.control.reviewed, second_row.control.reviewed) == (0, 0)  # none answered
    assert second_row.summary.startswith("not enough reviewed controls yet (0 of 3 needed")
    assert result.cumulative.control.queued == 6
