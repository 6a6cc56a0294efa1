"""Running totals behind the review-queue statistics, kept in step with the rows they count.

The dashboard's statistics used to count every queue row and match every reviewed label's
boxes on each call, a cost that grew with the history. Here each write says what it changes,
in the transaction that makes it, so reading the statistics is a few dozen rows at any size.

The counters (``StatsCounter``: kind, key, part -> n)
-----------------------------------------------------
- ``queue`` flagged reason, status: queue items;  ``sync_error``: items whose last annotation
  was rejected;  ``verdict`` verdict: reviewed labels.
- ``compared``: reviewed labels whose judged prediction is known (the prediction of the image
  for the label's ``prediction_model_version``); ``predicted`` / ``reviewed`` / ``matched``
  class name: their boxes, matched one to one per class (``visionloop.boxes.matched_by_class``).
- ``class_map`` <the class list as JSON>: the one list the box counts are kept under (a box
  named only by ``cls`` gets its class from it).

How they stay exact
-------------------
- The ORM unit of work (``before_flush``): a changed or deleted row's counted columns are read
  from the database, locked (``FOR UPDATE``), so the change subtracts what the row counted and
  adds what it will count, whatever the session had loaded or another writer had changed.
- A reviewed label's box counts are matched once, when its boxes or judged prediction change,
  and stored on it (``ReviewedLabel.stats_parts``): removing it subtracts exactly what it
  added. A prediction written, changed or deleted under a label's (image, model version)
  matches that label again, so a prediction that arrives after its label is counted too.
- ORM-enabled bulk statements (``session.execute(delete(ReviewedLabel).where(...))``) lock the
  rows they would touch, count them out, run restricted to those rows and count the result
  in. Core statements on a bare connection are invisible here: their callers report what they
  changed (``count_queue_inserts``); bulk inserts through the ORM and bulk updates by primary
  key of a counted column are refused rather than silently missed.
- Deltas are summed per transaction and applied when it commits, as one upsert with its keys in
  order: ``n = n + delta`` is atomic, so parallel writers never lose an update, counter rows
  are locked only for the commit, and taking them in one order cannot deadlock on them. A
  savepoint's release applies them too (SQLAlchemy calls it a commit); rolling one back
  forgets the deltas counted since it began.
- Writers of labels and predictions hold the ``class_map`` row ``FOR SHARE``; ``use_class_map``
  takes it exclusively to count the boxes under another list, so no writer counts under the
  list being replaced. On PostgreSQL they also lock the image row (``FOR NO KEY UPDATE``)
  before reading a label's prediction or a prediction's label: a label and its prediction
  written at once see each other. (SQLite runs one writer at a time, but pysqlite reads
  before its transaction begins: two processes writing a label and its prediction at the same
  instant could still miss each other there; ``rebuild`` puts that right.)

``rebuild`` recomputes everything from the rows: the migration's backfill, the benchmark after
its SQL fill, and the tests' reference.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from sqlalchemy import Connection, Table, and_, bindparam, delete, event, func, select, text, update
from sqlalchemy import inspect as inspect_state
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.orm import ORMExecuteState, Session, SessionTransaction
from sqlalchemy.orm.attributes import flag_modified, set_committed_value
from sqlalchemy.sql import Delete, Update

from visionloop.boxes import matched_by_class
from visionloop.models import Image, LabelingQueueItem, Prediction, ReviewedLabel, StatsCounter

Key = tuple[str, str, str]
"""A counter: kind, key, part."""
Counts = dict[Key, int]
Parts = list[list[Any]]
"""A label's box counts: ``[name, predicted, reviewed, matched]`` per class, names in order."""
Boxes = list[dict[str, Any]]
PredictionKey = tuple[int, str]
"""(image id, model version): the prediction a label was judged against."""
Row = dict[str, Any]

IMAGES: Table = Image.__table__  # type: ignore[attr-defined]
QUEUE: Table = LabelingQueueItem.__table__  # type: ignore[attr-defined]
LABELS: Table = ReviewedLabel.__table__  # type: ignore[attr-defined]
PREDICTIONS: Table = Prediction.__table__  # type: ignore[attr-defined]
COUNTERS: Table = StatsCounter.__table__  # type: ignore[attr-defined]

QUEUE_COUNTED = ("flagged_reason", "status", "sync_error")
LABEL_COUNTED = ("image_id", "boxes", "verdict", "prediction_model_version", "stats_parts")
PREDICTION_COUNTED = ("image_id", "model_version", "boxes")
BOX_KINDS = ("compared", "predicted", "reviewed", "matched")
CLASS_MAP = "class_map"
SYNC_ERRORS: Key = ("sync_error", "", "")
COMPARED: Key = ("compared", "", "")

_DELTAS = "visionloop.stats_counters.deltas"
_CLASS_MAP = "visionloop.stats_counters.class_map"
_SAVEPOINTS = "visionloop.stats_counters.savepoints"
_REBUILD_BATCH = 2000
"""Labels matched per round trip by a rebuild (keeps its memory flat at any history size)."""


class UncountedWrite(RuntimeError):
    """A statement would change counted rows in a way the counters cannot follow."""


# --- what one row counts -------------------------------------------------------------------


def _text(value: Any) -> str:
    return str(value.value if isinstance(value, enum.Enum) else value)


def _add(counts: Counts, key: Key, n: int) -> None:
    counts[key] = counts.get(key, 0) + n


def queue_counts(flagged_reason: str, status: Any, sync_error: str | None) -> Counts:
    counts: Counts = {("queue", str(flagged_reason), _text(status)): 1}
    if sync_error is not None:
        counts[SYNC_ERRORS] = 1
    return counts


def box_counts(parts: Parts | None) -> Counts:
    if parts is None:
        return {}
    counts: Counts = {COMPARED: 1}
    for name, predicted, reviewed, matched in parts:
        for kind, n in (("predicted", predicted), ("reviewed", reviewed), ("matched", matched)):
            if n:
                _add(counts, (kind, str(name), ""), int(n))
    return counts


def label_counts(verdict: Any, parts: Parts | None) -> Counts:
    return {("verdict", _text(verdict), ""): 1, **box_counts(parts)}


def label_parts(
    predicted: Boxes | None, reviewed: Boxes | None, class_names: Sequence[str]
) -> Parts | None:
    """A label's box counts against its prediction's boxes; None without a prediction."""
    if predicted is None:
        return None
    return [list(row) for row in matched_by_class(predicted, reviewed or [], class_names)]


# --- reading and writing the counters ------------------------------------------------------


def read_counters(conn: Connection) -> Counts:
    rows = conn.execute(select(COUNTERS.c.kind, COUNTERS.c.key, COUNTERS.c.part, COUNTERS.c.n))
    return {(kind, key, part): int(n) for kind, key, part, n in rows if kind != CLASS_MAP}


def apply_deltas(conn: Connection, deltas: Mapping[Key, int]) -> None:
    """Add ``deltas`` to the counters in one atomic upsert, keys in order."""
    rows = [
        {"kind": kind, "key": key, "part": part, "n": n}
        for (kind, key, part), n in sorted(deltas.items())
        if n
    ]
    if not rows:
        return
    insert = postgresql_insert if conn.dialect.name == "postgresql" else sqlite_insert
    statement = insert(COUNTERS).values(rows)
    conn.execute(
        statement.on_conflict_do_update(
            index_elements=["kind", "key", "part"],
            set_={"n": COUNTERS.c.n + statement.excluded.n},
        )
    )


def _replace_counters(conn: Connection, kinds: Sequence[str] | None, counts: Counts) -> None:
    """Set the counters of ``kinds`` (every kind but the class map if None) to ``counts``."""
    gone = COUNTERS.c.kind != CLASS_MAP if kinds is None else COUNTERS.c.kind.in_(kinds)
    conn.execute(delete(COUNTERS).where(gone))
    rows = [{"kind": k, "key": key, "part": p, "n": n} for (k, key, p), n in counts.items() if n]
    for start in range(0, len(rows), 500):
        conn.execute(COUNTERS.insert().values(rows[start : start + 500]))


def class_map(conn: Connection, *, lock: bool = False) -> list[str] | None:
    """The class list the box counts are kept under (held ``FOR SHARE`` with ``lock``)."""
    query = select(COUNTERS.c.key).where(COUNTERS.c.kind == CLASS_MAP)
    found = conn.execute(query.with_for_update(read=True) if lock else query).scalar()
    return None if found is None else list(json.loads(found))


def _claim_class_map(conn: Connection, class_names: Sequence[str]) -> None:
    """Make ``class_names`` the class map, holding its row exclusively until commit: writers
    still counting under the old list finish first, and the next ones wait for this one."""
    names = json.dumps(list(class_names))
    claimed = conn.execute(
        update(COUNTERS).where(COUNTERS.c.kind == CLASS_MAP).values(key=names)
    ).rowcount
    if not claimed:
        conn.execute(COUNTERS.insert().values(kind=CLASS_MAP, key=names, part="", n=0))


# --- recomputing from the rows -------------------------------------------------------------


def _rebuild_boxes(conn: Connection, class_names: Sequence[str]) -> Counts:
    """Match every label against its prediction again, storing each label's parts where they
    changed; the box counters they add up to."""
    counts: Counts = {}
    joined = LABELS.outerjoin(
        PREDICTIONS,
        and_(
            PREDICTIONS.c.image_id == LABELS.c.image_id,
            PREDICTIONS.c.model_version == LABELS.c.prediction_model_version,
        ),
    )
    query = (
        select(
            LABELS.c.id,
            LABELS.c.boxes,
            LABELS.c.stats_parts,
            PREDICTIONS.c.id.label("prediction_id"),
            PREDICTIONS.c.boxes.label("predicted"),
        )
        .select_from(joined)
        .order_by(LABELS.c.id)
        .limit(_REBUILD_BATCH)
    )
    store = (
        update(LABELS)
        .where(LABELS.c.id == bindparam("label_id"))
        .values(stats_parts=bindparam("parts"))
    )
    last = 0
    while rows := conn.execute(query.where(LABELS.c.id > last)).all():
        changed = []
        for row in rows:
            predicted = None if row.prediction_id is None else (row.predicted or [])
            parts = label_parts(predicted, row.boxes, class_names)
            for key, n in box_counts(parts).items():
                _add(counts, key, n)
            if parts != row.stats_parts:
                changed.append({"label_id": row.id, "parts": parts})
        if changed:
            conn.execute(store, changed)
        last = rows[-1].id
    return counts


def rebuild(conn: Connection, class_names: Sequence[str]) -> Counts:
    """Recompute every counter from the rows, under ``class_names``; the counters it wrote.

    Writers wait until the caller commits (the class map's row, and on PostgreSQL the queue
    table in SHARE mode), so no write falls between the counting and the replacing."""
    _claim_class_map(conn, class_names)  # first: on SQLite the write lock comes with it
    if conn.dialect.name == "postgresql":
        conn.execute(text("LOCK TABLE labeling_queue IN SHARE MODE"))
    counts: Counts = {}
    reason_status = select(QUEUE.c.flagged_reason, QUEUE.c.status, func.count()).group_by(
        QUEUE.c.flagged_reason, QUEUE.c.status
    )
    for reason, status, n in conn.execute(reason_status):
        counts[("queue", reason, status)] = n
    counts[SYNC_ERRORS] = conn.execute(
        select(func.count()).select_from(QUEUE).where(QUEUE.c.sync_error.is_not(None))
    ).scalar_one()
    for verdict, n in conn.execute(
        select(LABELS.c.verdict, func.count()).group_by(LABELS.c.verdict)
    ):
        counts[("verdict", verdict, "")] = n
    counts.update(_rebuild_boxes(conn, class_names))
    _replace_counters(conn, None, counts)
    return {key: n for key, n in counts.items() if n}


def use_class_map(session: Session, class_names: Sequence[str]) -> None:
    """Keep the box counts under ``class_names`` from now on: when the counters are under
    another list, every label is matched again (once; then its writes keep it) and committed.

    A deployment has one class list (``VISIONLOOP_CLASS_NAMES``); a change of it costs one
    pass over the reviewed labels, and readers asking for two lists in turn would pay it on
    every switch."""
    conn = session.connection()
    if class_map(conn) == list(class_names):
        return
    _claim_class_map(conn, class_names)
    _replace_counters(conn, BOX_KINDS, _rebuild_boxes(conn, class_names))
    session.commit()


# --- the session's pending deltas ----------------------------------------------------------


def _record(session: Session, counts: Counts, sign: int) -> None:
    pending: Counts = session.info.setdefault(_DELTAS, {})
    for key, n in counts.items():
        _add(pending, key, sign * n)


def count_queue_inserts(session: Session, rows: Iterable[tuple[str, Any, str | None]]) -> None:
    """Count queue rows a Core ``INSERT`` on ``session``'s connection added, as (flagged
    reason, status, sync error) each: the unit of work does not see those."""
    for reason, status, sync_error in rows:
        _record(session, queue_counts(reason, status, sync_error), +1)


def _session_class_map(session: Session, conn: Connection) -> list[str]:
    """The class map, read once per transaction and held ``FOR SHARE`` until it ends."""
    if _CLASS_MAP not in session.info:
        session.info[_CLASS_MAP] = class_map(conn, lock=True) or []
    names: list[str] = session.info[_CLASS_MAP]
    return names


def _locked(
    conn: Connection, table: Table, ids: Iterable[int], columns: Sequence[str]
) -> dict[int, Row]:
    """The database's current ``columns`` of rows ``ids``, locked until the transaction ends."""
    wanted = sorted(set(ids))
    if not wanted:
        return {}
    query = (
        select(table.c.id, *(table.c[name] for name in columns))
        .where(table.c.id.in_(wanted))
        .order_by(table.c.id)
        .with_for_update()
    )
    return {row.id: {name: row._mapping[name] for name in columns} for row in conn.execute(query)}


def _identity(obj: Any) -> int:
    identity = inspect_state(obj).identity
    assert identity is not None, "a persistent row has an identity"
    return int(identity[0])


def _changes(obj: Any, columns: Sequence[str]) -> Row:
    """The counted attributes this flush writes, with the values it writes."""
    attrs = inspect_state(obj).attrs
    return {name: attrs[name].history.added[0] for name in columns if attrs[name].history.added}


def _changed(session: Session, model: type, columns: Sequence[str]) -> dict[int, tuple[Any, Row]]:
    found = {}
    for obj in session.dirty:
        if isinstance(obj, model) and obj not in session.deleted:
            changes = _changes(obj, columns)
            if changes:
                found[_identity(obj)] = (obj, changes)
    return found


def _deleted(session: Session, model: type) -> list[int]:
    return [_identity(obj) for obj in session.deleted if isinstance(obj, model)]


def _predicted_boxes(
    conn: Connection, keys: Iterable[PredictionKey], pending: Mapping[PredictionKey, Boxes | None]
) -> dict[PredictionKey, Boxes | None]:
    """Each key's prediction boxes as they will be after this write: ``pending`` (None where
    the prediction goes away), else the database's; None where there is no prediction."""
    keys = set(keys)
    found = {key: pending[key] for key in keys if key in pending}
    wanted = keys - set(found)
    image_ids = sorted({image_id for image_id, _ in wanted})
    for start in range(0, len(image_ids), 1000):
        rows = conn.execute(
            select(PREDICTIONS.c.image_id, PREDICTIONS.c.model_version, PREDICTIONS.c.boxes).where(
                PREDICTIONS.c.image_id.in_(image_ids[start : start + 1000])
            )
        )
        for image_id, version, boxes in rows:
            if (image_id, version) in wanted:
                found[(image_id, version)] = boxes or []
    return found


def _judged(row: Mapping[str, Any]) -> PredictionKey | None:
    version = row.get("prediction_model_version")
    return None if version is None else (int(row["image_id"]), str(version))


def _parts_of(
    row: Mapping[str, Any],
    predictions: Mapping[PredictionKey, Boxes | None],
    class_names: Sequence[str],
) -> Parts | None:
    key = _judged(row)
    predicted = None if key is None else predictions.get(key)
    return label_parts(predicted, row.get("boxes"), class_names)


def _store_parts(session: Session, conn: Connection, label_id: int, parts: Parts | None) -> None:
    conn.execute(update(LABELS).where(LABELS.c.id == label_id).values(stats_parts=parts))
    loaded = session.identity_map.get(
        inspect_state(ReviewedLabel).identity_key_from_primary_key((label_id,))
    )
    if loaded is not None:  # what the session holds is what the row has
        set_committed_value(loaded, "stats_parts", parts)


def _lock_images(conn: Connection, image_ids: Iterable[int]) -> None:
    """Serialise the writers of one image's label and predictions (PostgreSQL): a label
    written while its prediction arrives would otherwise miss it, each transaction reading
    before the other commits. ``FOR NO KEY UPDATE`` leaves foreign-key checks free."""
    wanted = sorted(set(image_ids))
    if wanted and conn.dialect.name == "postgresql":
        conn.execute(
            select(IMAGES.c.id)
            .where(IMAGES.c.id.in_(wanted))
            .order_by(IMAGES.c.id)
            .with_for_update(key_share=True)
        )


def _rematch_labels_under(
    session: Session,
    conn: Connection,
    affected: set[PredictionKey],
    pending: Mapping[PredictionKey, Boxes | None],
    handled: set[int],
) -> None:
    """Labels judged against a prediction of ``affected`` (as ``pending`` has it, else as the
    database does), other than ``handled``: matched again, counted again where that changes."""
    if not affected:
        return
    class_names = _session_class_map(session, conn)
    image_ids = sorted({image_id for image_id, _ in affected})
    _lock_images(conn, image_ids)
    query = (
        select(LABELS.c.id, *(LABELS.c[name] for name in LABEL_COUNTED))
        .where(LABELS.c.image_id.in_(image_ids))
        .order_by(LABELS.c.id)
        .with_for_update()
    )
    rows = [dict(row._mapping) for row in conn.execute(query)]
    rows = [row for row in rows if row["id"] not in handled and _judged(row) in affected]
    predictions = _predicted_boxes(conn, [k for r in rows if (k := _judged(r))], pending)
    for row in rows:
        parts = _parts_of(row, predictions, class_names)
        if parts != row["stats_parts"]:
            _record(session, box_counts(row["stats_parts"]), -1)
            _record(session, box_counts(parts), +1)
            _store_parts(session, conn, row["id"], parts)


# --- the unit of work ----------------------------------------------------------------------


def _flush_queue(session: Session, conn: Connection) -> None:
    for obj in session.new:
        if isinstance(obj, LabelingQueueItem):
            _record(session, queue_counts(obj.flagged_reason, obj.status, obj.sync_error), +1)
    changed = _changed(session, LabelingQueueItem, QUEUE_COUNTED)
    for row_id, old in _locked(
        conn, QUEUE, [*changed, *_deleted(session, LabelingQueueItem)], QUEUE_COUNTED
    ).items():
        _record(session, queue_counts(**old), -1)
        if row_id in changed:
            _record(session, queue_counts(**{**old, **changed[row_id][1]}), +1)


def _flush_predictions(session: Session, conn: Connection) -> dict[PredictionKey, Boxes | None]:
    """What this flush does to predictions, by (image, model version): the boxes a key will
    have, or None where its prediction goes away."""
    changed = _changed(session, Prediction, PREDICTION_COUNTED)
    old = _locked(conn, PREDICTIONS, [*changed, *_deleted(session, Prediction)], PREDICTION_COUNTED)
    pending: dict[PredictionKey, Boxes | None] = {
        (int(row["image_id"]), str(row["model_version"])): None for row in old.values()
    }
    for row_id, (_, changes) in changed.items():
        row = {**old[row_id], **changes} if row_id in old else None
        if row is not None:
            pending[(int(row["image_id"]), str(row["model_version"]))] = row["boxes"] or []
    for obj in session.new:
        if isinstance(obj, Prediction):
            pending[(int(obj.image_id), str(obj.model_version))] = obj.boxes or []
    return pending


def _flush_labels(
    session: Session, conn: Connection, pending: Mapping[PredictionKey, Boxes | None]
) -> None:
    new = [obj for obj in session.new if isinstance(obj, ReviewedLabel)]
    changed = _changed(session, ReviewedLabel, LABEL_COUNTED[:-1])
    deleted = _deleted(session, ReviewedLabel)
    if not (new or changed or deleted or pending):
        return
    class_names = _session_class_map(session, conn)
    old = _locked(conn, LABELS, [*changed, *deleted], LABEL_COUNTED)
    after = {
        row_id: {**old[row_id], **changes}
        for row_id, (_, changes) in changed.items()
        if row_id in old
    }
    states = [*(obj.model_dump() for obj in new), *after.values()]
    keys = [k for s in states if (k := _judged(s))]
    _lock_images(conn, [image_id for image_id, _ in (*keys, *pending)])
    predictions = _predicted_boxes(conn, keys, pending)
    for obj in new:
        obj.stats_parts = _parts_of(obj.model_dump(), predictions, class_names)
        _record(session, label_counts(obj.verdict, obj.stats_parts), +1)
    for row_id, row in old.items():
        _record(session, label_counts(row["verdict"], row["stats_parts"]), -1)
        if row_id in after:
            parts = _parts_of(after[row_id], predictions, class_names)
            label = changed[row_id][0]
            label.stats_parts = parts
            # Written even when it equals what the session loaded: the row may hold another.
            flag_modified(label, "stats_parts")
            _record(session, label_counts(after[row_id]["verdict"], parts), +1)
    handled = set(old) | {obj.id for obj in new if obj.id is not None}
    _rematch_labels_under(session, conn, set(pending), pending, handled)


def _before_flush(session: Session, _flush_context: Any, _instances: Any) -> None:
    counted = (LabelingQueueItem, ReviewedLabel, Prediction)
    if not any(
        isinstance(obj, counted) for obj in (*session.new, *session.dirty, *session.deleted)
    ):
        return
    conn = session.connection()
    _flush_queue(session, conn)
    _flush_labels(session, conn, _flush_predictions(session, conn))


def _before_commit(session: Session) -> None:
    session.flush()  # the last changes' deltas, before they are applied
    deltas = session.info.pop(_DELTAS, None)
    if deltas:
        apply_deltas(session.connection(), deltas)


def _after_transaction_create(session: Session, transaction: SessionTransaction) -> None:
    if transaction.nested:  # what to go back to if the savepoint is rolled back
        saved = session.info.setdefault(_SAVEPOINTS, {})
        saved[transaction] = dict(session.info.get(_DELTAS, {}))


def _after_soft_rollback(session: Session, previous_transaction: SessionTransaction) -> None:
    if previous_transaction.nested:
        saved = session.info.get(_SAVEPOINTS, {})
        session.info[_DELTAS] = saved.pop(previous_transaction, {})
        # A lock taken inside the savepoint went with it: take it again when next needed.
        session.info.pop(_CLASS_MAP, None)


def _after_transaction_end(session: Session, transaction: SessionTransaction) -> None:
    if transaction.nested:
        session.info.get(_SAVEPOINTS, {}).pop(transaction, None)
    elif transaction.parent is None:  # committed (applied already) or rolled back: start over
        session.info.pop(_DELTAS, None)
        session.info.pop(_CLASS_MAP, None)
        session.info.pop(_SAVEPOINTS, None)


# --- ORM-enabled bulk statements -----------------------------------------------------------


def _touched(state: ORMExecuteState) -> set[str]:
    """The columns an ORM ``update`` sets."""
    statement = state.statement
    values = getattr(statement, "_values", None) or {}
    ordered = getattr(statement, "_ordered_values", None) or ()
    names = {getattr(k, "key", None) or getattr(k, "name", None) or str(k) for k in values}
    names |= {getattr(k, "key", None) or str(k) for k, _ in ordered}
    if isinstance(state.parameters, Mapping):
        names |= set(state.parameters)
    return names


def _locked_where(
    conn: Connection, table: Table, where: Any, columns: Sequence[str]
) -> dict[int, Row]:
    query = select(table.c.id, *(table.c[name] for name in columns)).order_by(table.c.id)
    if where is not None:
        query = query.where(where)
    rows = conn.execute(query.with_for_update())
    return {row.id: {name: row._mapping[name] for name in columns} for row in rows}


def _restricted(state: ORMExecuteState, table: Table, ids: Iterable[int]) -> Any:
    """The statement, run on the rows counted out (locked) only: a row another writer added
    since is left as if it came after the statement."""
    statement: Update | Delete = state.statement  # type: ignore[assignment]
    return state.invoke_statement(statement=statement.where(table.c.id.in_(sorted(ids))))


def _bulk_queue(state: ORMExecuteState, session: Session, conn: Connection) -> Any:
    old = _locked_where(conn, QUEUE, state.statement.whereclause, QUEUE_COUNTED)  # type: ignore[attr-defined]
    for row in old.values():
        _record(session, queue_counts(**row), -1)
    result = _restricted(state, QUEUE, old)
    if state.is_update:
        for row in _locked(conn, QUEUE, old, QUEUE_COUNTED).values():
            _record(session, queue_counts(**row), +1)
    return result


def _bulk_labels(state: ORMExecuteState, session: Session, conn: Connection) -> Any:
    class_names = _session_class_map(session, conn)
    old = _locked_where(conn, LABELS, state.statement.whereclause, LABEL_COUNTED)  # type: ignore[attr-defined]
    for row in old.values():
        _record(session, label_counts(row["verdict"], row["stats_parts"]), -1)
    result = _restricted(state, LABELS, old)
    if state.is_update:
        after = _locked(conn, LABELS, old, LABEL_COUNTED)
        keys = [k for r in after.values() if (k := _judged(r))]
        _lock_images(conn, [image_id for image_id, _ in keys])
        predictions = _predicted_boxes(conn, keys, {})
        for row_id, row in after.items():
            parts = _parts_of(row, predictions, class_names)
            if parts != row["stats_parts"]:
                _store_parts(session, conn, row_id, parts)
            _record(session, label_counts(row["verdict"], parts), +1)
    return result


def _bulk_predictions(state: ORMExecuteState, session: Session, conn: Connection) -> Any:
    _session_class_map(session, conn)
    columns = ("image_id", "model_version")
    old = _locked_where(conn, PREDICTIONS, state.statement.whereclause, columns)  # type: ignore[attr-defined]
    result = _restricted(state, PREDICTIONS, old)
    rows = [
        *old.values(),
        *(_locked(conn, PREDICTIONS, old, columns).values() if state.is_update else ()),
    ]
    affected = {(int(r["image_id"]), str(r["model_version"])) for r in rows}
    _rematch_labels_under(session, conn, affected, {}, set())
    return result


def _on_orm_execute(state: ORMExecuteState) -> Any:
    mapper = state.bind_mapper
    model = mapper.class_ if mapper is not None else None
    counted = {
        LabelingQueueItem: QUEUE_COUNTED,
        ReviewedLabel: LABEL_COUNTED,
        Prediction: PREDICTION_COUNTED,
    }
    if model not in counted or not (state.is_insert or state.is_update or state.is_delete):
        return None
    table = model.__tablename__  # type: ignore[union-attr]
    if state.is_insert:
        raise UncountedWrite(
            f"a bulk insert into {table} would not be counted: add the rows to the session"
        )
    if state.is_update and not _touched(state) & set(counted[model]):  # type: ignore[index]
        return None
    if isinstance(state.parameters, list):
        raise UncountedWrite(
            f"a bulk update by primary key of {table}'s counted columns would not be counted: "
            "change the rows in the session"
        )
    handler = {
        LabelingQueueItem: _bulk_queue,
        ReviewedLabel: _bulk_labels,
        Prediction: _bulk_predictions,
    }[model]  # type: ignore[index]
    session = state.session
    if session.autoflush:  # the flush the statement would start, before its rows are read
        session.flush()
    return handler(state, session, session.connection())


event.listen(Session, "before_flush", _before_flush)
event.listen(Session, "before_commit", _before_commit)
event.listen(Session, "after_transaction_create", _after_transaction_create)
event.listen(Session, "after_soft_rollback", _after_soft_rollback)
event.listen(Session, "after_transaction_end", _after_transaction_end)
event.listen(Session, "do_orm_execute", _on_orm_execute)
