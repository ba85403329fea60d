"""The ERP sink's pure parts: event → rows, the upsert SQL, the migrations list, error triage."""

from __future__ import annotations

import re
from collections import Counter
from datetime import timedelta
from decimal import Decimal
from typing import Any

import pytest

from connectors.erp import rows
from connectors.erp.rows import Change, Unmapped, Upsert, change_for, jsonable
from connectors.erp.schema import MIGRATIONS_DIR, discover
from connectors.erp.store import upsert_statement
from streams.catalog import Catalog
from tests.unit.conftest import T0

S = timedelta(seconds=1)
NORTH = {"method": "DELIVERY", "address": {"neighbourhood": "north", "postcode": None, "line1": None, "city": None}}
TOPIC_OF = {
    "OrderAccepted": rows.DECISIONS,
    "OrderRejected": rows.DECISIONS,
    "OrderCancellationAccepted": rows.DECISIONS,
    "WorkItemPlanned": rows.WORKITEMS,
    "OperationAssigned": rows.STATION_QUEUE,
    "OperationUnassigned": rows.STATION_QUEUE,
    "OperationStarted": rows.OPERATIONS,
    "OperationCompleted": rows.OPERATIONS,
    "OperationFailed": rows.OPERATIONS,
    "OrderStatus": rows.STATUS,
    "OrderDispatched": rows.DISPATCHED,
    "OrderLeadTime": rows.LEADTIME,
}


def run_order(pipe: Any, order: dict[str, Any], fail_first: bool = False) -> list[tuple[str, dict[str, Any]]]:
    """Place ``order`` and work every operation to completion (failing the first one once when
    asked); returns every event the sink reads, as (record name, value)."""
    pipe.send("OrderPlaced", order, T0)
    t, done, failed = T0, set(), False
    while True:
        assigned = [e.value["op_id"] for e in pipe.log if e.type == "OperationAssigned"]
        todo = list(dict.fromkeys(op for op in assigned if op not in done))
        if not todo:
            break
        for op in todo:
            t += S
            pipe.mes("OperationStarted", op, t)
            if fail_first and not failed:
                failed = True
                pipe.mes("OperationFailed", op, t, t + S)
            else:
                pipe.mes("OperationCompleted", op, t, t + 2 * S)
                done.add(op)
            t += 2 * S
    produced = [(e.type, e.value) for e in pipe.log if e.type in TOPIC_OF]
    return produced + [(kind, value) for kind, value in pipe.inputs if kind in TOPIC_OF]


def changes(events: list[tuple[str, dict[str, Any]]]) -> list[Change]:
    return [change_for(TOPIC_OF[kind], kind, value) for kind, value in events]


def upserts(found: list[Change], table: str) -> list[Upsert]:
    return [u for c in found for u in c.upserts if u.table == table]


def table_columns() -> dict[str, tuple[set[str], set[str]]]:
    """Per table in the migrations: (all columns, NOT NULL columns without a default)."""
    text = "\n".join(m.sql for m in discover())
    tables: dict[str, tuple[set[str], set[str]]] = {}
    for name, body in re.findall(r"CREATE TABLE (\w+) \((.*?)\n\);", text, flags=re.S):
        columns, required = set(), set()
        for line in body.splitlines():
            line = line.split("--")[0].strip().rstrip(",")
            match = re.match(r"([a-z_]+)\s+(.*)$", line)
            if not match or match.group(1) == "PRIMARY":
                continue
            columns.add(match.group(1))
            if ("NOT NULL" in match.group(2) or "PRIMARY KEY" in match.group(2)) and "DEFAULT" not in match.group(2):
                required.add(match.group(1))
        tables[name] = (columns, required)
    return tables


@pytest.fixture
def order_events(restaurant: Catalog, make_order: Any, pipeline: Any) -> list[tuple[str, dict[str, Any]]]:
    order = make_order(restaurant, [("kung-pao-chicken", 1, []), ("egg-fried-rice", 2, [])], delivery=NORTH)
    return run_order(pipeline(restaurant), order, fail_first=True)


def test_the_sink_reads_the_topology_topics_and_maps_every_type_on_them() -> None:
    from streams import topology

    specs = {spec.name: spec for spec in topology.TOPICS}
    assert set(rows.TOPICS) <= set(specs)
    on_topics = {record for name in rows.TOPICS for record in specs[name].values}
    assert on_topics == set(rows.MAPPERS)
    for record, topic in TOPIC_OF.items():
        assert record in specs[topic].values


def test_a_full_order_maps_to_orders_work_items_operations_dispatch_and_lead_time(
    order_events: list[tuple[str, dict[str, Any]]],
) -> None:
    found = changes(order_events)
    order_id = found[0].order_id
    assert {c.order_id for c in found} == {order_id}

    [accepted] = [u for u in upserts(found, "orders") if u.values.get("decision") == "ACCEPTED"]
    placed = next(v for k, v in order_events if k == "OrderAccepted")
    assert accepted.values["total"] == placed["total"] and isinstance(accepted.values["total"], Decimal)
    assert accepted.values["delivery_method"] == "DELIVERY"
    assert accepted.values["delivery_address"] == NORTH["address"]
    assert accepted.values["lines"][0]["unit_price"] == str(placed["lines"][0]["unit_price"])  # jsonb-ready

    items = upserts(found, "work_items")
    assert len(items) == 3 and {u.values["item_count"] for u in items} == {3}
    planned_ops = [u for u in upserts(found, "operations") if u.values["status"] == "PLANNED"]
    assert len(planned_ops) == sum(len(v["operations"]) for k, v in order_events if k == "WorkItemPlanned")

    per_op = Counter(u.values["status"] for u in upserts(found, "operations"))
    assert per_op["COMPLETED"] == len(planned_ops)
    assert per_op["FAILED"] == 1 and per_op["ASSIGNED"] == len(planned_ops) + 1  # the retry is assigned again
    [failed] = [u for u in upserts(found, "operations") if u.values["status"] == "FAILED"]
    assert failed.values["failures"] == 1 and failed.values["failure_reason"] == "needle broke"

    [dispatch] = upserts(found, "dispatches")
    [lead] = upserts(found, "lead_times")
    sent = next(v for k, v in order_events if k == "OrderDispatched")
    assert dispatch.values["lead_time_ms"] == sent["lead_time_ms"] == lead.values["lead_time_ms"]
    assert dispatch.values["carrier_id"] == "bike-north"
    statuses = [u.values["state"] for u in upserts(found, "orders") if "state" in u.values]
    assert statuses[-1] == "DISPATCHED"


def test_sequence_streams_are_per_order_topic_and_per_station_on_the_station_feed(
    order_events: list[tuple[str, dict[str, Any]]],
) -> None:
    found = changes(order_events)
    by_stream: dict[str, list[int]] = {}
    for change in found:
        by_stream.setdefault(change.stream, []).append(change.seq)
    station_streams = [s for s in by_stream if "@" in s]
    assert station_streams and all(s.split("@")[0] in (rows.STATION_QUEUE, rows.OPERATIONS) for s in station_streams)
    assert {rows.DECISIONS, rows.WORKITEMS, rows.STATUS, rows.DISPATCHED, rows.LEADTIME} <= set(by_stream)
    # The guard drops a seq that is not above the last one of its stream: along each stream the
    # pipeline's seqs must therefore strictly increase, or the sink would lose events.
    for stream, seqs in by_stream.items():
        assert seqs == sorted(set(seqs)), stream


def test_every_mapped_column_exists_and_every_insert_has_the_required_columns(
    order_events: list[tuple[str, dict[str, Any]]],
) -> None:
    tables = table_columns()
    found = changes(order_events)
    rejected = {
        "event_id": "e1", "order_id": "shopify:9", "seq": 1, "occurred_at": T0, "recorded_at": T0,
        "causation_id": None, "request": "PLACE", "rejected_event_id": "e0", "reason": "UNKNOWN_SKU",
        "detail": "no sku x", "source_platform": "shopify", "external_order_id": "9",
    }  # fmt: skip
    found.append(change_for(rows.DECISIONS, "OrderRejected", rejected))
    seen_tables = set()
    for upsert in (u for c in found for u in c.upserts):
        columns, required = tables[upsert.table]
        seen_tables.add(upsert.table)
        assert set(upsert.values) <= columns, (upsert.table, set(upsert.values) - columns)
        assert set(upsert.key) <= set(upsert.values)
        if upsert.table != "orders":  # an orders row may start from any of its events
            assert required <= set(upsert.values), (upsert.table, required - set(upsert.values))
    assert seen_tables == {"orders", "order_rejections", "work_items", "operations", "dispatches", "lead_times"}


def test_a_refused_placement_marks_the_order_but_a_refused_amendment_does_not() -> None:
    base = {
        "event_id": "e1", "order_id": "shopify:9", "seq": 4, "occurred_at": T0, "recorded_at": T0,
        "causation_id": None, "rejected_event_id": "e0", "reason": "ORDER_IN_PRODUCTION",
        "detail": "too late", "source_platform": "shopify", "external_order_id": "9",
    }  # fmt: skip
    place = change_for(rows.DECISIONS, "OrderRejected", {**base, "request": "PLACE"})
    amend = change_for(rows.DECISIONS, "OrderRejected", {**base, "request": "AMEND"})
    assert [u.table for u in place.upserts] == ["order_rejections", "orders"]
    assert place.upserts[1].values["decision"] == "REJECTED"
    assert [u.table for u in amend.upserts] == ["order_rejections"]
    assert (place.stream, place.seq) == (rows.DECISIONS, 4)


def test_a_cancellation_sets_the_decision_and_keeps_the_reason() -> None:
    value = {
        "event_id": "e2", "order_id": "shopify:9", "seq": 5, "occurred_at": T0, "recorded_at": T0,
        "causation_id": None, "source_platform": "shopify", "external_order_id": "9",
        "reason": "changed my mind", "in_production": True,
    }  # fmt: skip
    [row] = change_for(rows.DECISIONS, "OrderCancellationAccepted", value).upserts
    assert row.values["decision"] == "CANCELLED" and row.values["cancelled_in_production"] is True
    assert row.values["cancel_reason"] == "changed my mind" and row.values["cancelled_at"] == T0


def test_types_without_a_table_are_unmapped() -> None:
    with pytest.raises(Unmapped):
        change_for("stations.events.v1", "StationStatusChanged", {"order_id": "", "seq": 1, "event_id": "x"})


def test_jsonable_turns_times_and_decimals_into_strings() -> None:
    value = {"at": T0, "price": Decimal("12.50"), "list": [{"n": 1}], "none": None}
    assert jsonable(value) == {"at": T0.isoformat(), "price": "12.50", "list": [{"n": 1}], "none": None}


def test_the_upsert_merges_only_what_the_event_carries_and_counts_applications() -> None:
    text = upsert_statement("operations", ("op_id",), ("op_id", "order_id", "status", "failures")).as_string(None)
    assert text.startswith('INSERT INTO "operations" ("op_id", "order_id", "status", "failures")')
    assert 'ON CONFLICT ("op_id") DO UPDATE SET' in text
    assert '"op_id" =' not in text.split("DO UPDATE SET")[1]  # the key is never rewritten
    assert "THEN excluded.status ELSE" in text  # status follows the newest event in event time
    assert '"failures" = "operations".failures + excluded.failures' in text
    assert 'applied = "operations".applied + 1' in text
    orders = upsert_statement("orders", ("order_id",), ("order_id", "decision")).as_string(None)
    assert "excluded.decision = 'REJECTED'" in orders  # a refused duplicate keeps the accepted order


def test_migrations_are_numbered_from_one_without_gaps() -> None:
    found = discover()
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert all(path.name[:3].isdigit() for path in MIGRATIONS_DIR.glob("*.sql"))
    assert "event_positions" in table_columns()
