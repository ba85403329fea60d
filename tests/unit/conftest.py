"""Shared fixtures for the stage tests: the seed catalogs and builders of storefront events."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from connectors.shopfront import Line, build_order
from streams.catalog import Catalog, load_catalog_yaml
from streams.events import new_event_id

CATALOGS = Path(__file__).resolve().parents[2] / "deploy" / "catalogs"
T0 = datetime(2025, 3, 14, 18, 0, 0, tzinfo=UTC)

OrderFactory = Callable[..., dict[str, Any]]


@pytest.fixture(scope="session")
def restaurant() -> Catalog:
    return load_catalog_yaml(CATALOGS / "restaurant.yaml")


@pytest.fixture(scope="session")
def footwear() -> Catalog:
    return load_catalog_yaml(CATALOGS / "footwear.yaml")


def _order(
    catalog: Catalog,
    lines: list[Line],
    *,
    external_id: str = "1001",
    source: str = "shopify",
    priority: str = "STANDARD",
    delivery: dict[str, Any] | None = None,
    seq: int = 1,
    at: datetime = T0,
) -> dict[str, Any]:
    """A consistent OrderPlaced value at a fixed time: prices and total taken from the catalog."""
    return build_order(
        catalog, lines, external_id=external_id, source=source, priority=priority, delivery=delivery, at=at, seq=seq
    )


@pytest.fixture(scope="session")
def make_order() -> OrderFactory:
    """``make_order(catalog, [(sku, qty, [(kind, option, value), ...]), ...], **overrides)``."""
    return _order


class Pipeline:
    """The four stages wired in memory the way the Faust topology wires them, plus a fake MES.

    Every emitted Event is kept in ``log``; stage states live in dicts keyed as the tables are.
    """

    def __init__(self, catalog: Catalog) -> None:
        from streams.stages import assignment, dispatch, expansion, validation

        self.catalog = catalog
        self.assignment, self.dispatch, self.expansion, self.validation = (
            assignment,
            dispatch,
            expansion,
            validation,
        )
        self.validation_states: dict[str, Any] = {}
        self.expansion_states: dict[str, Any] = {}
        self.progress: dict[str, Any] = {}
        self.lanes: dict[str, Any] = {}
        self.log: list[Any] = []
        self.inputs: list[tuple[str, dict[str, Any]]] = []
        self.station_seq: dict[str, int] = {}

    def lane(self, lane: str) -> Any:
        return self.lanes.setdefault(lane, self.assignment.LaneState.for_lane(self.catalog, lane))

    def order(self, order_id: str) -> Any:
        return self.progress.setdefault(order_id, self.dispatch.OrderProgress())

    def send(self, event_type: str, value: dict[str, Any], now: datetime) -> list[Any]:
        """Feed one event in and run everything it causes; returns all events emitted."""
        self.inputs.append((event_type, value))
        emitted: list[Any] = []
        pending = [(event_type, value)]
        while pending:
            kind, val = pending.pop(0)
            out = self._route(kind, val, now)
            emitted.extend(out)
            pending.extend((e.type, e.value) for e in out)
        self.log.extend(emitted)
        return emitted

    def _route(self, kind: str, val: dict[str, Any], now: datetime) -> list[Any]:
        oid = val["order_id"]
        if kind in ("OrderPlaced", "OrderAmended", "OrderCancelled"):
            state = self.validation_states.setdefault(oid, self.validation.ValidationState())
            return list(self.validation.validate(state, kind, val, self.catalog, now))
        if kind == "OrderAccepted":
            state = self.expansion_states.setdefault(oid, self.expansion.ExpansionState())
            return list(self.expansion.expand(state, val, self.catalog, now))
        if kind in ("WorkItemPlanned", "OrderCancellationAccepted", "OperationAssigned"):
            return list(self.dispatch.handle(self.order(oid), kind, val, self.catalog, now))
        if kind in ("OperationRequested", "OperationRevoked"):
            return list(self.assignment.handle(self.lane(val["lane"]), kind, val, now))
        if kind in ("OperationStarted", "OperationCompleted", "OperationFailed"):
            lane = self.lane(self.catalog.lane_of(val["capability"]))
            out = list(self.assignment.handle(lane, kind, val, now))
            return out + list(self.dispatch.handle(self.order(oid), kind, val, self.catalog, now))
        if kind == "StationStatusChanged":
            lane = self.lane(self.catalog.lane_of_station(val["station_id"]))
            return list(self.assignment.handle(lane, kind, val, now))
        if kind == "OrderPhaseChanged" and oid in self.validation_states:
            self.validation.observe_phase(self.validation_states[oid], val)
        return []

    def assigned(self, op_id: str) -> dict[str, Any]:
        """The latest OperationAssigned of an op."""
        return [e.value for e in self.log if e.type == "OperationAssigned" and e.value["op_id"] == op_id][-1]

    def requested(self) -> list[dict[str, Any]]:
        return [e.value for e in self.log if e.type == "OperationRequested"]

    def station_event(self, kind: str, station_id: str, body: dict[str, Any], now: datetime) -> list[Any]:
        """An event from the station feed, with the station's own seq."""
        seq = self.station_seq[station_id] = self.station_seq.get(station_id, 0) + 1
        value = {
            "event_id": new_event_id(),
            "seq": seq,
            "occurred_at": now,
            "recorded_at": now,
            "causation_id": None,
            "station_id": station_id,
            **body,
        }
        return self.send(kind, value, now)

    def mes(
        self,
        kind: str,
        op_id: str,
        started: datetime,
        ended: datetime | None = None,
        now: datetime | None = None,
    ) -> list[Any]:
        """OperationStarted / OperationCompleted / OperationFailed of an assigned op, processed at
        ``now`` (default: when it happened)."""
        a = self.assigned(op_id)
        body: dict[str, Any] = {
            "order_id": a["order_id"],
            "op_id": op_id,
            "work_item_id": a["work_item_id"],
            "capability": a["capability"],
            "started_at": started,
        }
        if kind == "OperationStarted":
            body["operator_ref"] = None
        elif kind == "OperationCompleted":
            body["completed_at"] = ended
        else:
            body |= {"failed_at": ended, "reason": "needle broke"}
        return self.station_event(kind, a["station_id"], body, now or ended or started)

    def station_status(self, station_id: str, status: str, now: datetime) -> list[Any]:
        s = self.catalog.stations[station_id]
        body = {
            "order_id": "",
            "status": status,
            "capabilities": list(s.capabilities),
            "capacity": s.capacity,
            "reason": "test",
        }
        return self.station_event("StationStatusChanged", station_id, body, now)


@pytest.fixture(scope="session")
def pipeline() -> Callable[[Catalog], Pipeline]:
    return Pipeline
