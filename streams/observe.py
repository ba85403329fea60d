"""Business metrics read off what the stages emit: agents stay thin, stages stay pure."""

from __future__ import annotations

from collections.abc import Iterable

from streams import metrics
from streams.events import Event, epoch_ms
from streams.stages.assignment import LaneState
from streams.stages.dispatch import TERMINAL, OrderProgress

_MS = 1000.0


def validation(outputs: Iterable[Event]) -> None:
    for out in outputs:
        value = out.value
        if out.type == "OrderAccepted":
            if value["change"] == "AMENDED":
                metrics.AMENDMENTS.labels(result="accepted").inc()
            else:
                metrics.ORDERS_ACCEPTED.inc()
                metrics.ORDERS_OPEN.inc()
        elif out.type == "OrderRejected":
            metrics.ORDERS_REJECTED.labels(reason=value["reason"]).inc()
            if value["request"] == "AMEND":
                metrics.AMENDMENTS.labels(result="rejected").inc()
        elif out.type == "OrderCancellationAccepted":
            metrics.ORDERS_OPEN.dec()
        overhead = (epoch_ms(value["recorded_at"]) - epoch_ms(value["occurred_at"])) / _MS
        metrics.PIPELINE_OVERHEAD.labels(hop="validation").observe(max(overhead, 0.0))


def dispatch(outputs: Iterable[Event]) -> None:
    for out in outputs:
        if out.type != "OrderLeadTime":
            continue
        lead = out.value
        metrics.ORDERS_DISPATCHED.inc()
        metrics.ORDERS_OPEN.dec()
        metrics.ORDER_LEAD_TIME.observe(lead["lead_time_ms"] / _MS)
        metrics.ORDER_WORK.observe(lead["critical_path_work_ms"] / _MS)
        metrics.ORDER_LEAD_TIME_RATIO.observe(lead["lead_to_work_ratio"])
        for part in ("queue", "work", "sibling_wait", "dispatch"):
            metrics.ORDER_STAGE.labels(part=part).observe(lead[f"{part}_ms"] / _MS)


# Promised dispatch time (epoch ms) of the open orders this worker tracks, for the overdue gauge.
_promises: dict[str, int] = {}


def promise(state: OrderProgress) -> None:
    if state.promised_by_ms and state.state not in TERMINAL:
        _promises[state.order_id] = state.promised_by_ms
    else:
        _promises.pop(state.order_id, None)


def overdue(now_ms: int) -> None:
    metrics.ORDERS_OVERDUE.set(sum(1 for promised in _promises.values() if promised < now_ms))


def lane(state: LaneState) -> None:
    # A down station hands its queue on at once; work with nowhere to go waits in the lane.
    metrics.LANE_WAITING.labels(lane=state.lane).set(len(state.waiting))
    for station in state.stations.values():
        metrics.STATION_QUEUE_DEPTH.labels(station=station.station_id).set(len(station.queue))
        metrics.STATION_WIP.labels(station=station.station_id).set(len(station.running))
        metrics.STATION_UP.labels(station=station.station_id).set(1 if station.status == "UP" else 0)
