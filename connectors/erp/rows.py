"""Pure mapping from a decoded pipeline event to the rows the ERP tables receive.

Nothing here touches a database: ``change_for`` returns a ``Change`` (which sequence stream the
event advances, and the upserts it implies), and ``connectors.erp.store`` applies it. Each event
type only carries the columns it knows; ``store`` leaves every other column of an existing row
alone, so events of different topics (decisions, status, work items, station feed) can arrive in
any relative order and still land in the same row.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal
from typing import Any, Final

# The topics the sink reads, as streams/topology.py declares them. Listed here rather than
# imported because importing the topology builds a Faust app; tests/unit/test_erp_rows.py keeps the
# two lists in step.
DECISIONS: Final = "orders.decisions.v1"
WORKITEMS: Final = "orders.workitems.v1"
STATION_QUEUE: Final = "stations.queue.v1"
OPERATIONS: Final = "orders.operations.v1"
STATUS: Final = "orders.status.v1"
DISPATCHED: Final = "orders.dispatched.v1"
LEADTIME: Final = "orders.leadtime.v1"
TOPICS: Final = (DECISIONS, WORKITEMS, STATION_QUEUE, OPERATIONS, STATUS, DISPATCHED, LEADTIME)

# Station-feed events carry a per-*station* seq (see their schemas), so on these the sequence
# stream is (order, topic, station): two stations may both report seq 7 about one order.
STATION_SEQUENCED: Final = frozenset(
    {"OperationAssigned", "OperationUnassigned", "OperationStarted", "OperationCompleted", "OperationFailed"}
)

# How far an operation has got; with equal event times the further status wins, so a Started and
# a Completed stamped in the same millisecond never leave the row STARTED.
STATUS_RANK: Final = {
    "PLANNED": 0,
    "ASSIGNED": 1,
    "UNASSIGNED": 1,
    "STARTED": 2,
    "FAILED": 3,
    "COMPLETED": 4,
}


@dataclass(frozen=True)
class Upsert:
    """One row to insert, or to merge into the row with the same ``key`` columns."""

    table: str
    key: tuple[str, ...]
    values: Mapping[str, Any]


@dataclass(frozen=True)
class Change:
    """What one event does: advance (order_id, stream) to seq, and write ``upserts``."""

    order_id: str
    stream: str
    seq: int
    event_id: str
    upserts: tuple[Upsert, ...] = field(default_factory=tuple)


class Unmapped(ValueError):
    """A record type this sink has no table for (a newer pipeline, or a wrong topic)."""


def jsonable(value: Any) -> Any:
    """``value`` with datetimes and decimals as strings, for a jsonb column."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime | date):
        return value.isoformat()
    if isinstance(value, Decimal):
        return str(value)
    return value


def stream_of(topic: str, record: str, value: Mapping[str, Any]) -> str:
    """The sequence stream an event belongs to: its seq strictly increases along it."""
    if record in STATION_SEQUENCED:
        return f"{topic}@{value['station_id']}"
    return topic


# ---- per event type -----------------------------------------------------------------------------


def _order_accepted(v: Mapping[str, Any]) -> list[Upsert]:
    delivery = v["delivery"]
    return [
        Upsert(
            "orders",
            ("order_id",),
            {
                "order_id": v["order_id"],
                "source_platform": v["source_platform"],
                "external_order_id": v["external_order_id"],
                "decision": "ACCEPTED",
                "decided_at": v["occurred_at"],
                "decision_seq": v["seq"],
                "revision": v["revision"],
                "priority": v["priority"],
                "currency": v["currency"],
                "total": v["total"],
                "placed_at": v["placed_at"],
                "promised_by": v["promised_by"],
                "delivery_method": delivery["method"],
                "delivery_address": jsonable(delivery["address"]),
                "lines": jsonable(v["lines"]),
            },
        )
    ]


def _order_rejected(v: Mapping[str, Any]) -> list[Upsert]:
    rows = [
        Upsert(
            "order_rejections",
            ("event_id",),
            {
                "event_id": v["event_id"],
                "order_id": v["order_id"],
                "request": v["request"],
                "rejected_event_id": v["rejected_event_id"],
                "reason": v["reason"],
                "detail": v["detail"],
                "rejected_at": v["occurred_at"],
                "seq": v["seq"],
            },
        )
    ]
    # Only a refused placement says anything about the order row; store keeps an accepted or
    # cancelled decision when a duplicate placement is refused ("a rejection never changes an
    # already accepted order", OrderRejected.avsc).
    if v["request"] == "PLACE":
        rows.append(
            Upsert(
                "orders",
                ("order_id",),
                {
                    "order_id": v["order_id"],
                    "source_platform": v["source_platform"],
                    "external_order_id": v["external_order_id"],
                    "decision": "REJECTED",
                    "decided_at": v["occurred_at"],
                    "decision_seq": v["seq"],
                },
            )
        )
    return rows


def _order_cancelled(v: Mapping[str, Any]) -> list[Upsert]:
    return [
        Upsert(
            "orders",
            ("order_id",),
            {
                "order_id": v["order_id"],
                "source_platform": v["source_platform"],
                "external_order_id": v["external_order_id"],
                "decision": "CANCELLED",
                "decided_at": v["occurred_at"],
                "decision_seq": v["seq"],
                "cancelled_at": v["occurred_at"],
                "cancel_reason": v["reason"],
                "cancelled_in_production": v["in_production"],
            },
        )
    ]


def _order_status(v: Mapping[str, Any]) -> list[Upsert]:
    return [
        Upsert(
            "orders",
            ("order_id",),
            {
                "order_id": v["order_id"],
                "state": v["state"],
                "state_at": v["occurred_at"],
                "status_seq": v["seq"],
                "items_total": v["items_total"],
                "items_done": v["items_done"],
                "ops_total": v["ops_total"],
                "ops_started": v["ops_started"],
                "ops_done": v["ops_done"],
                "dispatched_at": v["dispatched_at"],
                "carrier_id": v["carrier_id"],
                "state_detail": v["detail"],
            },
        )
    ]


def _work_item_planned(v: Mapping[str, Any]) -> list[Upsert]:
    item = Upsert(
        "work_items",
        ("work_item_id",),
        {
            "work_item_id": v["work_item_id"],
            "order_id": v["order_id"],
            "revision": v["revision"],
            "line_index": v["line_index"],
            "line_id": v["line_id"],
            "sku": v["sku"],
            "unit_index": v["unit_index"],
            "item_count": v["item_count"],
            "priority": v["priority"],
            "placed_at": v["placed_at"],
            "promised_by": v["promised_by"],
            "est_path_ms": v["est_path_ms"],
            "fire_offset_ms": v["fire_offset_ms"],
            "customizations": jsonable(v["customizations"]),
            "bom": jsonable(v["bom"]),
            "planned_at": v["occurred_at"],
            "seq": v["seq"],
        },
    )
    ops = [
        Upsert(
            "operations",
            ("op_id",),
            {
                "op_id": op["op_id"],
                "order_id": v["order_id"],
                "work_item_id": v["work_item_id"],
                "revision": v["revision"],
                "op_code": op["op_code"],
                "capability": op["capability"],
                "lane": op["lane"],
                "sequence": op["sequence"],
                "depends_on": jsonable(op["depends_on"]),
                "est_duration_ms": op["est_duration_ms"],
                "fire_offset_ms": op["fire_offset_ms"],
                **_status("PLANNED", v["occurred_at"]),
            },
        )
        for op in v["operations"]
    ]
    return [item, *ops]


def _status(status: str, at: datetime) -> dict[str, Any]:
    return {"status": status, "status_rank": STATUS_RANK[status], "status_at": at}


def _operation_base(v: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "op_id": v["op_id"],
        "order_id": v["order_id"],
        "work_item_id": v["work_item_id"],
        "capability": v["capability"],
    }


def _operation_assigned(v: Mapping[str, Any]) -> list[Upsert]:
    row = {
        **_operation_base(v),
        "op_code": v["op_code"],
        "lane": v["lane"],
        "est_duration_ms": v["est_duration_ms"],
        **_status("ASSIGNED", v["occurred_at"]),
        "assigned_station_id": v["station_id"],
        "assigned_at": v["occurred_at"],
        "attempt": v["attempt"],
        "assign_reason": v["reason"],
        "rush": v["rush"],
        "queue_position": v["queue_position"],
        "predicted_start": v["predicted_start"],
        "predicted_end": v["predicted_end"],
    }
    return [Upsert("operations", ("op_id",), row)]


def _operation_unassigned(v: Mapping[str, Any]) -> list[Upsert]:
    row = {**_operation_base(v), "lane": v["lane"], **_status("UNASSIGNED", v["occurred_at"])}
    return [Upsert("operations", ("op_id",), row)]


def _operation_started(v: Mapping[str, Any]) -> list[Upsert]:
    row = {
        **_operation_base(v),
        **_status("STARTED", v["occurred_at"]),
        "station_id": v["station_id"],
        "started_at": v["started_at"],
        "operator_ref": v["operator_ref"],
    }
    return [Upsert("operations", ("op_id",), row)]


def _operation_completed(v: Mapping[str, Any]) -> list[Upsert]:
    row = {
        **_operation_base(v),
        **_status("COMPLETED", v["occurred_at"]),
        "station_id": v["station_id"],
        "started_at": v["started_at"],
        "completed_at": v["completed_at"],
    }
    return [Upsert("operations", ("op_id",), row)]


def _operation_failed(v: Mapping[str, Any]) -> list[Upsert]:
    row = {
        **_operation_base(v),
        **_status("FAILED", v["occurred_at"]),
        "station_id": v["station_id"],
        "failed_at": v["failed_at"],
        "failure_reason": v["reason"],
        "failures": 1,  # store adds it to the row's count
    }
    return [Upsert("operations", ("op_id",), row)]


_TIMING = (
    "placed_at", "ready_at", "dispatched_at", "lead_time_ms", "intake_ms", "queue_ms", "work_ms",
    "sibling_wait_ms", "dispatch_ms", "critical_path_work_ms", "critical_work_item_id", "lead_to_work_ratio",
)  # fmt: skip


def _order_dispatched(v: Mapping[str, Any]) -> list[Upsert]:
    delivery = v["delivery"]
    row = {
        "order_id": v["order_id"],
        "handover": v["handover"],
        "carrier_id": v["carrier_id"],
        "delivery_method": delivery["method"],
        "delivery_address": jsonable(delivery["address"]),
        "items": v["items"],
        **{name: v[name] for name in _TIMING},
        "seq": v["seq"],
    }
    return [Upsert("dispatches", ("order_id",), row)]


def _order_lead_time(v: Mapping[str, Any]) -> list[Upsert]:
    row = {
        "order_id": v["order_id"],
        "priority": v["priority"],
        "items": v["items"],
        "planned_critical_path_ms": v["planned_critical_path_ms"],
        "promised_by": v["promised_by"],
        "promise_met": v["promise_met"],
        **{name: v[name] for name in _TIMING},
        "seq": v["seq"],
    }
    return [Upsert("lead_times", ("order_id",), row)]


MAPPERS: Final = {
    "OrderAccepted": _order_accepted,
    "OrderRejected": _order_rejected,
    "OrderCancellationAccepted": _order_cancelled,
    "OrderStatus": _order_status,
    "WorkItemPlanned": _work_item_planned,
    "OperationAssigned": _operation_assigned,
    "OperationUnassigned": _operation_unassigned,
    "OperationStarted": _operation_started,
    "OperationCompleted": _operation_completed,
    "OperationFailed": _operation_failed,
    "OrderDispatched": _order_dispatched,
    "OrderLeadTime": _order_lead_time,
}


def change_for(topic: str, record: str, value: Mapping[str, Any]) -> Change:
    """The rows one decoded event writes; raises ``Unmapped`` for record types without a table."""
    mapper = MAPPERS.get(record)
    if mapper is None:
        raise Unmapped(f"no ERP table for {record} (topic {topic})")
    return Change(
        order_id=value["order_id"],
        stream=stream_of(topic, record, value),
        seq=value["seq"],
        event_id=value["event_id"],
        upserts=tuple(mapper(value)),
    )
