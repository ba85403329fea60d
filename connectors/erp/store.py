"""Writing a ``Change`` into PostgreSQL, idempotently, inside the caller's transaction.

The ledger row in ``event_positions`` is advanced first with a conditional upsert: it only moves
forward when the event's seq is above the last one applied for its (order, stream). When it does
not move, the event was applied before (a replay after a crash or a PostgreSQL restart) and its
rows are not touched again, so every table sees each event exactly once. The ledger row's lock
also serialises two consumers that briefly both own a partition during a rebalance.

Row merges: an event sets only the columns it carries; ``MERGE_RULES`` refines that where events
of different topics, which arrive in no particular order relative to each other, update the same
column.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import Any, Final

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from connectors.erp.rows import Change, Upsert

# SQL over the old row (``{t}``) and the incoming one (``excluded``), per table and column.
_AT_LEAST_AS_NEW: Final = "(excluded.status_at, excluded.status_rank) >= ({t}.status_at, {t}.status_rank)"
_NEWER_ASSIGNMENT: Final = "{t}.assigned_at IS NULL OR excluded.assigned_at >= {t}.assigned_at"
# A refused duplicate placement must not overwrite an accepted or cancelled order's decision.
_DECIDED: Final = "excluded.decision = 'REJECTED' AND {t}.decision IN ('ACCEPTED', 'CANCELLED')"


_ASSIGNMENT_COLUMNS: Final = (
    "assigned_station_id", "assigned_at", "attempt", "assign_reason", "rush",
    "queue_position", "predicted_start", "predicted_end",
)  # fmt: skip


def _when(condition: str, column: str) -> str:
    return f"CASE WHEN {condition} THEN excluded.{column} ELSE {{t}}.{column} END"


def _unless(condition: str, column: str) -> str:
    return f"CASE WHEN {condition} THEN {{t}}.{column} ELSE excluded.{column} END"


MERGE_RULES: Final[dict[str, dict[str, str]]] = {
    "orders": {
        "decision": _unless(_DECIDED, "decision"),
        "decided_at": _unless(_DECIDED, "decided_at"),
        "decision_seq": _unless(_DECIDED, "decision_seq"),
    },
    "operations": {
        # The status follows the latest event in event time, whichever topic it came from.
        **{c: _when(_AT_LEAST_AS_NEW, c) for c in ("status", "status_rank", "status_at")},
        # A reassignment (after a failure or a station outage) replaces the older assignment,
        # never the other way round: the two can sit on different station-keyed partitions.
        **{c: _when(_NEWER_ASSIGNMENT, c) for c in _ASSIGNMENT_COLUMNS},
        "failures": "{t}.failures + excluded.failures",
    },
}

_ADVANCE: Final = sql.SQL(
    "INSERT INTO event_positions"
    " (order_id, stream, last_seq, last_event_id, topic, kafka_partition, kafka_offset)"
    " VALUES (%s, %s, %s, %s, %s, %s, %s)"
    " ON CONFLICT (order_id, stream) DO UPDATE SET"
    " last_seq = excluded.last_seq, last_event_id = excluded.last_event_id, topic = excluded.topic,"
    " kafka_partition = excluded.kafka_partition, kafka_offset = excluded.kafka_offset,"
    " applied = event_positions.applied + 1, updated_at = now()"
    " WHERE excluded.last_seq > event_positions.last_seq"
    " RETURNING last_seq"
)

_cache: dict[tuple[str, tuple[str, ...], tuple[str, ...]], sql.Composed] = {}


def upsert_statement(table: str, key: tuple[str, ...], columns: tuple[str, ...]) -> sql.Composed:
    """``INSERT ... ON CONFLICT (key) DO UPDATE`` for ``columns``, with the table's merge rules."""
    cache_key = (table, key, columns)
    found = _cache.get(cache_key)
    if found is not None:
        return found
    rules = MERGE_RULES.get(table, {})
    t = sql.Identifier(table)
    sets: list[sql.Composable] = [
        sql.SQL("{} = {}").format(
            sql.Identifier(c),
            sql.SQL(rules[c]).format(t=t) if c in rules else sql.SQL("excluded.{}").format(sql.Identifier(c)),
        )
        for c in columns
        if c not in key
    ]
    sets += [sql.SQL("applied = {}.applied + 1").format(t), sql.SQL("updated_at = now()")]
    statement = sql.SQL("INSERT INTO {t} ({cols}) VALUES ({vals}) ON CONFLICT ({key}) DO UPDATE SET {sets}").format(
        t=t,
        cols=sql.SQL(", ").join(map(sql.Identifier, columns)),
        vals=sql.SQL(", ").join(sql.Placeholder() * len(columns)),
        key=sql.SQL(", ").join(map(sql.Identifier, key)),
        sets=sql.SQL(", ").join(sets),
    )
    _cache[cache_key] = statement
    return statement


def _adapt(value: Any) -> Any:
    # Mappings and lists only come from rows.jsonable, for jsonb columns.
    return Jsonb(value) if isinstance(value, Mapping | list) else value


def write_upsert(cur: psycopg.Cursor[Any], upsert: Upsert) -> None:
    columns = tuple(upsert.values)
    cur.execute(upsert_statement(upsert.table, upsert.key, columns), [_adapt(upsert.values[c]) for c in columns])


def apply_change(
    cur: psycopg.Cursor[Any], change: Change, topic: str, partition: int, offset: int
) -> Counter[str] | None:
    """Apply ``change`` unless its seq was already applied; returns rows written per table, or None."""
    cur.execute(
        _ADVANCE,
        (change.order_id, change.stream, change.seq, change.event_id, topic, partition, offset),
    )
    if cur.fetchone() is None:
        return None
    written: Counter[str] = Counter()
    for upsert in change.upserts:
        write_upsert(cur, upsert)
        written[upsert.table] += 1
    return written
