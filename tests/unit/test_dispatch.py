from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from streams.catalog import Catalog
from streams.events import Event, new_event_id
from streams.stages import dispatch
from streams.stages.dispatch import MAX_ATTEMPTS, OrderProgress
from streams.stages.expansion import ExpansionState, expand
from streams.stages.validation import ValidationState, validate

T0 = datetime(2025, 3, 14, 18, 0, tzinfo=UTC)
S = timedelta(seconds=1)
NORTH = {
    "method": "DELIVERY",
    "address": {"neighbourhood": "north", "postcode": None, "line1": None, "city": None},
}
ORDER_KEYED = ("OrderStatus", "OrderPhaseChanged", "OrderDispatched", "OrderLeadTime")


def of_type(events: list[Event], type_: str) -> list[dict[str, Any]]:
    return [e.value for e in events if e.type == type_]


def items_of(pipe: Any, order_id: str) -> list[dict[str, Any]]:
    return [e.value for e in pipe.log if e.type == "WorkItemPlanned" and e.value["order_id"] == order_id]


def run_item(
    pipe: Any, item: dict[str, Any], start: datetime, gaps: list[int], durations: list[int]
) -> datetime:
    """Start each op ``gap`` s after it was requested, complete it after ``duration`` s; returns
    the completion time of the last op (processed 0 s after it happened)."""
    t = start
    for op, gap, took in zip(item["operations"], gaps, durations, strict=True):
        requested = [r for r in pipe.requested() if r["op_id"] == op["op_id"]]
        assert requested, f"{op['op_id']} was not requested before its predecessor completed"
        begin = t + gap * S
        pipe.mes("OperationStarted", op["op_id"], begin)
        t = begin + took * S
        pipe.mes("OperationCompleted", op["op_id"], begin, t)
    return t


def test_dispatch_fires_once_on_last_completion_with_exact_breakdown(
    restaurant: Catalog, make_order: Any, pipeline: Any
) -> None:
    pipe = pipeline(restaurant)
    order = make_order(restaurant, [("kung-pao-chicken", 1, []), ("egg-fried-rice", 1, [])], delivery=NORTH)
    accepted_at = T0 + 1 * S
    pipe.send("OrderPlaced", order, accepted_at)
    kung_pao, rice = items_of(pipe, order["order_id"])
    assert len(of_type(pipe.log, "OperationRequested")) == 2  # only the first op of each item

    rice_done = run_item(pipe, rice, accepted_at, gaps=[5, 1], durations=[140, 25])
    assert of_type(pipe.log, "OrderDispatched") == []
    kp_gaps, kp_took = [3, 7, 0, 20], [80, 65, 250, 30]
    ops = kung_pao["operations"]
    t = run_item(pipe, {**kung_pao, "operations": ops[:-1]}, accepted_at, kp_gaps[:-1], kp_took[:-1])
    assert of_type(pipe.log, "OrderDispatched") == []
    begin = t + kp_gaps[-1] * S
    ready = begin + kp_took[-1] * S
    pipe.mes("OperationStarted", ops[-1]["op_id"], begin)
    out = pipe.mes("OperationCompleted", ops[-1]["op_id"], begin, ready, now=ready + 2 * S)

    [sent] = of_type(out, "OrderDispatched")
    [lead] = of_type(out, "OrderLeadTime")
    assert (sent["handover"], sent["carrier_id"]) == ("COURIER", "bike-north")
    assert sent["ready_at"] == ready and sent["dispatched_at"] == ready + 2 * S
    assert sent["critical_work_item_id"] == kung_pao["work_item_id"]
    assert sent["intake_ms"] == 1000
    assert sent["work_ms"] == sum(kp_took) * 1000
    assert sent["queue_ms"] == sum(kp_gaps) * 1000
    assert sent["dispatch_ms"] == 2000
    assert sent["lead_time_ms"] == (ready + 2 * S - T0) // timedelta(milliseconds=1)
    assert (
        sent["lead_time_ms"] == sent["intake_ms"] + sent["queue_ms"] + sent["work_ms"] + sent["dispatch_ms"]
    )
    assert sent["sibling_wait_ms"] == (ready - rice_done) // timedelta(milliseconds=1)
    assert sent["critical_path_work_ms"] == sum(kp_took) * 1000
    assert abs(sent["lead_to_work_ratio"] - sent["lead_time_ms"] / (sum(kp_took) * 1000)) < 1e-9
    assert lead["lead_time_ms"] == sent["lead_time_ms"]
    assert lead["planned_critical_path_ms"] == kung_pao["est_path_ms"]
    status = of_type(out, "OrderStatus")[-1]
    assert (status["state"], status["items_done"], status["ops_done"]) == ("DISPATCHED", 2, 6)

    again = pipe.mes("OperationCompleted", ops[-1]["op_id"], begin, ready, now=ready + 3 * S)
    assert again == []
    assert len(of_type(pipe.log, "OrderDispatched")) == 1

    for type_ in ORDER_KEYED:
        seqs = [e.value["seq"] for e in pipe.log if e.type == type_]
        assert seqs == sorted(set(seqs)), type_
    requested_seqs = [r["seq"] for r in pipe.requested()]
    assert requested_seqs == sorted(set(requested_seqs))

    # An OrderStatus on every change (each item planned, each start and completion, dispatch), but an
    # OrderPhaseChanged only when the state changes: all that validation reads back.
    ours = [e for e in pipe.log if e.value.get("order_id") == order["order_id"]]
    assert len([e for e in ours if e.type == "OrderStatus"]) > 10
    phases = [(e.value["state"], e.value["revision"]) for e in ours if e.type == "OrderPhaseChanged"]
    assert phases == [("PLANNED", 1), ("IN_PROGRESS", 1), ("DISPATCHED", 1)]


def test_next_operation_is_requested_only_when_its_predecessor_completes(
    restaurant: Catalog, make_order: Any, pipeline: Any
) -> None:
    pipe = pipeline(restaurant)
    order = make_order(restaurant, [("spring-rolls", 1, [])], priority="RUSH")
    pipe.send("OrderPlaced", order, T0)
    [item] = items_of(pipe, order["order_id"])
    first, second, _ = item["operations"]
    assert [r["op_id"] for r in pipe.requested()] == [first["op_id"]]
    assert pipe.requested()[0]["rush"] is True
    pipe.mes("OperationStarted", first["op_id"], T0 + 5 * S)
    assert len(pipe.requested()) == 1
    out = pipe.mes("OperationCompleted", first["op_id"], T0 + 5 * S, T0 + 50 * S)
    [nxt] = of_type(out, "OperationRequested")
    assert (nxt["op_id"], nxt["attempt"], nxt["release_at"]) == (second["op_id"], 1, T0 + 50 * S)
    assert of_type(out, "OperationAssigned")  # and assignment queued it at once


def test_first_operations_are_released_after_the_fire_offset(
    restaurant: Catalog, make_order: Any, pipeline: Any
) -> None:
    pipe = pipeline(restaurant)
    order = make_order(restaurant, [("mapo-tofu", 1, []), ("egg-fried-rice", 1, [])])
    pipe.send("OrderPlaced", order, T0)
    for item in items_of(pipe, order["order_id"]):
        [req] = [r for r in pipe.requested() if r["work_item_id"] == item["work_item_id"]]
        assert req["release_at"] == T0 + timedelta(milliseconds=item["fire_offset_ms"])
        assert pipe.assigned(req["op_id"])["predicted_start"] >= req["release_at"]
    assert {i["fire_offset_ms"] > 0 for i in items_of(pipe, order["order_id"])} == {True, False}


def planned_events(catalog: Catalog, order: dict[str, Any]) -> list[dict[str, Any]]:
    [accepted] = validate(ValidationState(), "OrderPlaced", order, catalog, T0)
    return [e.value for e in expand(ExpansionState(), accepted.value, catalog, T0)]


def mes_value(item: dict[str, Any], op: dict[str, Any], **times: datetime) -> dict[str, Any]:
    return {
        "event_id": new_event_id(),
        "order_id": item["order_id"],
        "op_id": op["op_id"],
        "work_item_id": item["work_item_id"],
        "station_id": "somewhere",
        "reason": "broken",
        **times,
    }


def complete_item(state: OrderProgress, catalog: Catalog, item: dict[str, Any], t: datetime) -> list[Event]:
    out: list[Event] = []
    for op in item["operations"]:
        out += dispatch.handle(
            state, "OperationCompleted", mes_value(item, op, started_at=t, completed_at=t + S), catalog, t + S
        )
        t += S
    return out


def test_no_dispatch_until_every_planned_item_has_arrived(restaurant: Catalog, make_order: Any) -> None:
    first, second = planned_events(restaurant, make_order(restaurant, [("spring-rolls", 2, [])]))
    state = OrderProgress()
    dispatch.handle(state, "WorkItemPlanned", first, restaurant, T0)
    state = OrderProgress.from_dict(json.loads(json.dumps(state.to_dict())))
    assert of_type(complete_item(state, restaurant, first, T0), "OrderDispatched") == []
    dispatch.handle(state, "WorkItemPlanned", second, restaurant, T0 + 10 * S)
    assert dispatch.handle(state, "WorkItemPlanned", second, restaurant, T0 + 10 * S) == []  # replay
    out = complete_item(state, restaurant, second, T0 + 10 * S)
    assert len(of_type(out, "OrderDispatched")) == 1
    assert of_type(out, "OrderDispatched")[0]["handover"] == "PICKUP"


def test_failed_operation_is_retried_then_fails_the_order(restaurant: Catalog, make_order: Any) -> None:
    first, second = planned_events(restaurant, make_order(restaurant, [("spring-rolls", 2, [])]))
    state = OrderProgress()
    dispatch.handle(state, "WorkItemPlanned", first, restaurant, T0)
    dispatch.handle(state, "WorkItemPlanned", second, restaurant, T0)
    op = first["operations"][0]
    for attempt in range(2, MAX_ATTEMPTS + 1):
        out = dispatch.handle(
            state, "OperationFailed", mes_value(first, op, failed_at=T0, started_at=T0), restaurant, T0
        )
        [retry] = of_type(out, "OperationRequested")
        assert (retry["op_id"], retry["attempt"]) == (op["op_id"], attempt)
    out = dispatch.handle(
        state, "OperationFailed", mes_value(first, op, failed_at=T0, started_at=T0), restaurant, T0
    )
    assert of_type(out, "OrderStatus")[-1]["state"] == "FAILED"
    revoked = of_type(out, "OperationRevoked")
    assert [r["op_id"] for r in revoked] == [second["operations"][0]["op_id"]]
    assert {e.key for e in out if e.type == "OperationRevoked"} == {restaurant.lane_of("prep")}


def test_cancellation_revokes_queued_work_and_prevents_dispatch(
    restaurant: Catalog, make_order: Any, pipeline: Any
) -> None:
    pipe = pipeline(restaurant)
    order = make_order(restaurant, [("spring-rolls", 2, [])])
    pipe.send("OrderPlaced", order, T0)
    a, b = items_of(pipe, order["order_id"])
    pipe.mes("OperationStarted", a["operations"][0]["op_id"], T0 + S)
    cancel = {k: order[k] for k in ("order_id", "seq", "occurred_at", "recorded_at", "causation_id")}
    cancel |= {
        "event_id": new_event_id(),
        "source_platform": "shopify",
        "external_order_id": "1001",
        "reason": None,
    }
    out = pipe.send("OrderCancelled", cancel, T0 + 2 * S)
    assert [r["op_id"] for r in of_type(out, "OperationRevoked")] == [b["operations"][0]["op_id"]]
    assert [u["reason"] for u in of_type(out, "OperationUnassigned")] == ["REVOKED"]
    assert of_type(out, "OrderStatus")[-1]["state"] == "CANCELLED"
    done = pipe.mes("OperationCompleted", a["operations"][0]["op_id"], T0 + S, T0 + 9 * S)
    assert of_type(done, "OperationRequested") == [] and of_type(pipe.log, "OrderDispatched") == []


def test_amendment_replaces_the_plan_and_revokes_old_queued_work(
    restaurant: Catalog, make_order: Any, pipeline: Any
) -> None:
    pipe = pipeline(restaurant)
    order = make_order(restaurant, [("spring-rolls", 1, [])])
    pipe.send("OrderPlaced", order, T0)
    [old] = items_of(pipe, order["order_id"])
    bigger = make_order(restaurant, [("egg-fried-rice", 2, [])])
    amended = {
        **order,
        "event_id": new_event_id(),
        "amendment_id": "A1",
        "lines": bigger["lines"],
        "total": bigger["total"],
    }
    out = pipe.send("OrderAmended", amended, T0 + S)
    assert [r["op_id"] for r in of_type(out, "OperationRevoked")] == [old["operations"][0]["op_id"]]
    new_items = [i for i in items_of(pipe, order["order_id"]) if i["revision"] == 2]
    assert len(new_items) == 2
    late = pipe.mes("OperationStarted", old["operations"][0]["op_id"], T0 + 2 * S)  # too late: ignored
    assert of_type(late, "OrderStatus") == []
    t = T0 + 5 * S
    for item in new_items:
        t = run_item(pipe, item, t, gaps=[0, 0], durations=[10, 10])
    [sent] = of_type(pipe.log, "OrderDispatched")
    assert sent["items"] == 2


def test_ship_orders_go_to_a_carrier(footwear: Catalog, make_order: Any) -> None:
    ship = {
        "method": "SHIP",
        "address": {"neighbourhood": None, "postcode": "10115", "line1": "Main St 1", "city": "Berlin"},
    }
    [item] = planned_events(footwear, make_order(footwear, [("shoe-care-kit", 1, [])], delivery=ship))
    state = OrderProgress()
    dispatch.handle(state, "WorkItemPlanned", item, footwear, T0)
    [sent] = of_type(complete_item(state, footwear, item, T0), "OrderDispatched")
    assert sent["handover"] == "CARRIER"
    assert footwear.stations[sent["carrier_id"]].kind == "CARRIER"
