"""Dispatch (order progress): work items and shop-floor events in; next operations, status and,
on the last completion, the dispatch out.

State is keyed by order id. This stage owns the flow of work inside an order, because it is the
one place that sees an order's plan and its completions together:

- WorkItemPlanned: remember the item; request its ready operations (no dependencies) at once,
  with ``release_at = now + fire offset``.
- OperationCompleted: request the operations it unblocks. When every item of the revision is
  planned and complete, emit OrderDispatched, OrderLeadTime and OrderStatus(DISPATCHED) in the
  same call: no batch, no timer. Later duplicates find the order DISPATCHED and emit nothing.
- OperationFailed: request the operation again (attempt + 1) up to MAX_ATTEMPTS, then fail the
  order and revoke its queued operations.
- A higher revision (accepted amendment) replaces the plan and revokes the old queued operations;
  OrderCancellationAccepted cancels and revokes likewise.
- OperationAssigned is optional input: it only records the station.

Every change emits an OrderStatus (compacted topic). A change of state, or of the revision being
produced, also emits an OrderPhaseChanged: validation needs only those (is production under way, is
the order closed) and would otherwise read an OrderStatus for every operation started and completed.
Output seq comes from one per-order counter shared by all of this stage's topics, so it strictly
increases per order on each (with gaps).

Lead time of a dispatched order is measured along its critical work item (the one that completed
last): ``lead_time = intake + queue + work + dispatch`` exactly, where intake is placement to the
item's first request, work the measured time of its operations' successful attempts, queue the
rest until ready (waiting, fire-offset hold, failed attempts), and dispatch ready to handover.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from streams.catalog import Catalog
from streams.events import Event, derived_event_id, envelope, epoch_ms, from_epoch_ms

MAX_ATTEMPTS = 3

PLANNED, REQUESTED, STARTED, DONE = "PLANNED", "REQUESTED", "STARTED", "DONE"
OPEN_OP = (REQUESTED, STARTED)
TERMINAL = ("DISPATCHED", "CANCELLED", "FAILED")
HANDOVER = {"DELIVERY": "COURIER", "SHIP": "CARRIER", "PICKUP": "PICKUP"}


@dataclass
class OpProgress:
    op_id: str
    op_code: str
    capability: str
    lane: str
    est_duration_ms: int
    depends_on: list[str]
    fire_offset_ms: int
    status: str = PLANNED
    attempt: int = 0
    station_id: str | None = None
    requested_at_ms: int | None = None
    started_at_ms: int | None = None
    completed_at_ms: int | None = None


@dataclass
class ItemProgress:
    work_item_id: str
    est_path_ms: int
    ops: list[OpProgress]
    first_requested_at_ms: int | None = None
    done_at_ms: int | None = None

    def work_ms(self) -> int:
        return sum((o.completed_at_ms or 0) - (o.started_at_ms or 0) for o in self.ops if o.status == DONE)


@dataclass
class OrderProgress:
    """Per-order production state (key: order id)."""

    order_id: str = ""
    seq: int = 0
    state: str = "NEW"
    revision: int = 0
    item_count: int = 0
    placed_at_ms: int = 0
    priority: str = "STANDARD"
    delivery: dict[str, Any] | None = None
    promised_by_ms: int | None = None
    items: dict[str, ItemProgress] = field(default_factory=dict)
    detail: str | None = None
    dispatched_at_ms: int | None = None
    carrier_id: str | None = None
    # The (state, revision) last announced by OrderPhaseChanged.
    announced_state: str | None = None
    announced_revision: int = 0

    def to_dict(self) -> dict[str, Any]:
        # By hand: dataclasses.asdict deep-copies recursively, which is slow on the hot path.
        return {
            **vars(self),
            "delivery": dict(self.delivery) if self.delivery is not None else None,
            "items": {
                k: {**vars(i), "ops": [{**vars(o), "depends_on": list(o.depends_on)} for o in i.ops]}
                for k, i in self.items.items()
            },
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> OrderProgress:
        if not raw:
            return cls()
        items = {
            k: ItemProgress(**{**i, "ops": [OpProgress(**o) for o in i["ops"]]})
            for k, i in raw["items"].items()
        }
        return cls(**{**raw, "items": items})

    def find_op(self, work_item_id: str, op_id: str) -> OpProgress | None:
        item = self.items.get(work_item_id)
        return next((o for o in item.ops if o.op_id == op_id), None) if item else None


def handle(
    state: OrderProgress, event_type: str, value: Mapping[str, Any], catalog: Catalog, now: datetime
) -> list[Event]:
    """Apply one order-keyed input. Emits OperationRequested / OperationRevoked (key: lane),
    OrderStatus, OrderPhaseChanged, OrderDispatched, OrderLeadTime (key: order id)."""
    state.order_id = value["order_id"]
    if state.state in TERMINAL:
        return []
    step = _Step(state, value["event_id"], now)
    if event_type == "WorkItemPlanned":
        _on_planned(step, value)
    elif event_type == "OperationAssigned":
        op = state.find_op(value["work_item_id"], value["op_id"])
        if op is not None and op.status == REQUESTED:
            op.station_id = value["station_id"]
    elif event_type == "OperationStarted":
        _on_started(step, value)
    elif event_type == "OperationCompleted":
        _on_completed(step, value, catalog)
    elif event_type == "OperationFailed":
        _on_failed(step, value)
    elif event_type == "OrderCancellationAccepted":
        state.state, state.detail = "CANCELLED", value["reason"] or "cancelled"
        step.revoke_open("CANCELLATION")
        step.status()
    else:
        raise ValueError(f"dispatch does not handle {event_type}")
    return step.events


class _Step:
    """The outputs of handling one input, numbered from the order's counter."""

    def __init__(self, state: OrderProgress, cause_id: str, now: datetime) -> None:
        self.state = state
        self.cause_id = cause_id
        self.now = now
        self.now_ms = epoch_ms(now)
        self.events: list[Event] = []

    def emit(self, type_: str, key: str, body: dict[str, Any], *discriminator: str) -> None:
        self.state.seq += 1
        head = envelope(
            self.state.order_id,
            self.state.seq,
            self.now,
            event_id=derived_event_id(self.cause_id, type_, *discriminator),
            causation_id=self.cause_id,
        )
        self.events.append(Event(type_, key, {**head, **body}))

    def request_ready(self, item: ItemProgress) -> None:
        done = {o.op_id for o in item.ops if o.status == DONE}
        for op in item.ops:
            if op.status == PLANNED and all(d in done for d in op.depends_on):
                self.request(item, op)

    def request(self, item: ItemProgress, op: OpProgress) -> None:
        op.status, op.attempt, op.requested_at_ms = REQUESTED, op.attempt + 1, self.now_ms
        op.started_at_ms = op.completed_at_ms = None
        if item.first_requested_at_ms is None:
            item.first_requested_at_ms = self.now_ms
        body = {
            "op_id": op.op_id,
            "work_item_id": item.work_item_id,
            "op_code": op.op_code,
            "capability": op.capability,
            "lane": op.lane,
            "est_duration_ms": op.est_duration_ms,
            "rush": self.state.priority == "RUSH",
            "placed_at": from_epoch_ms(self.state.placed_at_ms),
            "release_at": from_epoch_ms(self.now_ms + op.fire_offset_ms),
            "attempt": op.attempt,
        }
        self.emit("OperationRequested", op.lane, body, op.op_id, str(op.attempt))

    def revoke_open(self, reason: str) -> None:
        """Revoke requested operations that have not started; started ones cannot be pulled back."""
        for item in self.state.items.values():
            for op in item.ops:
                if op.status == REQUESTED:
                    op.status = PLANNED
                    body = {
                        "op_id": op.op_id,
                        "work_item_id": item.work_item_id,
                        "capability": op.capability,
                        "lane": op.lane,
                        "reason": reason,
                    }
                    self.emit("OperationRevoked", op.lane, body, op.op_id)

    def status(self) -> None:
        s = self.state
        ops = [o for i in s.items.values() for o in i.ops]
        body = {
            "state": s.state,
            "revision": s.revision,
            "items_total": s.item_count,
            "items_done": sum(1 for i in s.items.values() if i.done_at_ms is not None),
            "ops_total": len(ops),
            "ops_started": sum(1 for o in ops if o.status in (STARTED, DONE)),
            "ops_done": sum(1 for o in ops if o.status == DONE),
            "dispatched_at": from_epoch_ms(s.dispatched_at_ms) if s.dispatched_at_ms else None,
            "carrier_id": s.carrier_id,
            "detail": s.detail,
        }
        self.emit("OrderStatus", s.order_id, body)
        if (s.state, s.revision) != (s.announced_state, s.announced_revision):
            s.announced_state, s.announced_revision = s.state, s.revision
            self.emit("OrderPhaseChanged", s.order_id, {"state": s.state, "revision": s.revision, "detail": s.detail})


def _on_planned(step: _Step, value: Mapping[str, Any]) -> None:
    state = step.state
    revision = value["revision"]
    if revision < state.revision or value["work_item_id"] in state.items:
        return
    if revision > state.revision:
        step.revoke_open("AMENDMENT")
        state.items = {}
        state.revision = revision
        state.item_count = value["item_count"]
        state.state = "PLANNED"
        state.placed_at_ms = epoch_ms(value["placed_at"])
        state.priority = value["priority"]
        state.delivery = value["delivery"]
        state.promised_by_ms = epoch_ms(value["promised_by"]) if value["promised_by"] else None
    ops = [
        OpProgress(
            op_id=o["op_id"],
            op_code=o["op_code"],
            capability=o["capability"],
            lane=o["lane"],
            est_duration_ms=o["est_duration_ms"],
            depends_on=list(o["depends_on"]),
            fire_offset_ms=o["fire_offset_ms"],
        )
        for o in value["operations"]
    ]
    item = ItemProgress(value["work_item_id"], value["est_path_ms"], ops)
    state.items[item.work_item_id] = item
    step.request_ready(item)
    step.status()


def _on_started(step: _Step, value: Mapping[str, Any]) -> None:
    op = step.state.find_op(value["work_item_id"], value["op_id"])
    if op is None or op.status != REQUESTED:
        return
    op.status, op.station_id = STARTED, value["station_id"]
    op.started_at_ms = epoch_ms(value["started_at"])
    step.state.state = "IN_PROGRESS"
    step.status()


def _on_completed(step: _Step, value: Mapping[str, Any], catalog: Catalog) -> None:
    state = step.state
    op = state.find_op(value["work_item_id"], value["op_id"])
    if op is None or op.status not in OPEN_OP:
        return
    op.status, op.station_id = DONE, value["station_id"]
    op.started_at_ms = epoch_ms(value["started_at"])
    op.completed_at_ms = epoch_ms(value["completed_at"])
    state.state = "IN_PROGRESS"
    item = state.items[value["work_item_id"]]
    if all(o.status == DONE for o in item.ops):
        item.done_at_ms = max(o.completed_at_ms or 0 for o in item.ops)
    else:
        step.request_ready(item)
    if len(state.items) == state.item_count and all(i.done_at_ms is not None for i in state.items.values()):
        _dispatch(step, catalog)
    else:
        step.status()


def _on_failed(step: _Step, value: Mapping[str, Any]) -> None:
    state = step.state
    op = state.find_op(value["work_item_id"], value["op_id"])
    if op is None or op.status not in OPEN_OP:
        return
    if op.attempt < MAX_ATTEMPTS:
        step.request(state.items[value["work_item_id"]], op)
        step.status()
        return
    op.status = PLANNED
    state.state = "FAILED"
    state.detail = f"{op.op_id} failed {op.attempt} times at {value['station_id']}: {value['reason']}"
    step.revoke_open("ORDER_FAILED")
    step.status()


def _handover(state: OrderProgress, catalog: Catalog) -> tuple[str, str]:
    delivery = state.delivery or {}
    method = delivery.get("method", "PICKUP")
    if method not in ("DELIVERY", "SHIP"):
        return "PICKUP", "pickup"
    neighbourhood = (delivery.get("address") or {}).get("neighbourhood")
    # Validation checked serviceability; if every courier has since gone, hand over unassigned
    # rather than hold a finished order back.
    return HANDOVER[method], catalog.choose_handover(method, neighbourhood, state.order_id) or "unassigned"


def lead_time_breakdown(state: OrderProgress, dispatched_at_ms: int) -> dict[str, Any]:
    """The lead-time fields shared by OrderDispatched and OrderLeadTime."""
    items = list(state.items.values())
    critical = max(items, key=lambda i: (i.done_at_ms or 0, i.work_ms()))
    ready = critical.done_at_ms or 0
    first_request = critical.first_requested_at_ms or state.placed_at_ms
    work = critical.work_ms()
    critical_path = max(i.work_ms() for i in items)
    lead = dispatched_at_ms - state.placed_at_ms
    return {
        "placed_at": from_epoch_ms(state.placed_at_ms),
        "ready_at": from_epoch_ms(ready),
        "dispatched_at": from_epoch_ms(dispatched_at_ms),
        "lead_time_ms": lead,
        "intake_ms": first_request - state.placed_at_ms,
        "queue_ms": ready - first_request - work,
        "work_ms": work,
        "sibling_wait_ms": ready - min(i.done_at_ms or 0 for i in items),
        "dispatch_ms": dispatched_at_ms - ready,
        "critical_path_work_ms": critical_path,
        "critical_work_item_id": critical.work_item_id,
        "lead_to_work_ratio": lead / critical_path if critical_path > 0 else 0.0,
    }


def _dispatch(step: _Step, catalog: Catalog) -> None:
    state = step.state
    ready = max(i.done_at_ms or 0 for i in state.items.values())
    dispatched_at = max(step.now_ms, ready)  # a skewed clock must not make dispatch precede ready
    handover, carrier_id = _handover(state, catalog)
    state.state, state.dispatched_at_ms, state.carrier_id = "DISPATCHED", dispatched_at, carrier_id
    breakdown = lead_time_breakdown(state, dispatched_at)
    key = state.order_id
    step.emit(
        "OrderDispatched",
        key,
        {
            "handover": handover,
            "carrier_id": carrier_id,
            "delivery": state.delivery,
            "items": len(state.items),
            **breakdown,
        },
    )
    promised = state.promised_by_ms
    step.emit(
        "OrderLeadTime",
        key,
        {
            "priority": state.priority,
            "items": len(state.items),
            "planned_critical_path_ms": max(i.est_path_ms for i in state.items.values()),
            "promised_by": from_epoch_ms(promised) if promised else None,
            "promise_met": dispatched_at <= promised if promised else None,
            **breakdown,
        },
    )
    step.status()
