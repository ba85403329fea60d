"""Assignment: operations in, each to one capable station's FIFO queue.

State is keyed by *lane* (``Catalog.lane_of``): every station serving a capability, with its
queue, lives in one lane, and a station lives in exactly one lane, so one partition owns each
station and no station is double-booked. Inputs, all re-keyed by lane: OperationRequested,
OperationRevoked, OperationStarted/Completed/Failed, StationStatusChanged.

Rules:
- Choose the UP station with the capability whose predicted finish of this operation is least
  (queue, capacity slots, running work and the operation's release time considered); ties go to
  the shorter queue, then the station id.
- Queues are FIFO. A rush operation goes behind earlier rush operations but ahead of every
  non-rush one; the overtaken op ids are recorded on the OperationAssigned (reason RUSH). Hence a
  queue is always rush operations first, then non-rush ones, each group in arrival order.
- A station going DOWN hands its unstarted queue, in order, to the best other stations (reason
  STATION_DOWN, previous_station_id set) and emits OperationUnassigned for the old queue.
  Moved operations join the end of their new queue: FIFO is per station, by arrival there.
- With no capable station UP, operations wait in the lane and are assigned, in order, when a
  station comes UP (reason STATION_UP). PAUSED stations keep their queue but take no new work.
- Started / completed operations update queues and expected free times; they emit nothing.

Outputs go to the station-queue topic keyed by station id, and their seq counts per station.
"""

from __future__ import annotations

import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from streams.catalog import Catalog
from streams.events import Event, derived_event_id, envelope, epoch_ms, from_epoch_ms

# Recently finished op ids remembered to drop requests replayed after a crash. A replay covers at
# most the events since the last offset commit (0.5 s), and the whole lane state is written to
# the table's changelog on every event, so this is kept small.
FINISHED_MEMORY = 256
# Attempt recorded for a revoked op: no later request of it is valid.
REVOKED = 1 << 30


@dataclass
class QueuedOp:
    op_id: str
    work_item_id: str
    order_id: str
    op_code: str
    capability: str
    est_duration_ms: int
    rush: bool
    release_at_ms: int
    attempt: int


@dataclass
class RunningOp:
    op_id: str
    started_at_ms: int
    est_duration_ms: int
    attempt: int


@dataclass
class StationQueue:
    station_id: str
    capabilities: list[str]
    capacity: int = 1
    status: str = "UP"
    seq: int = 0
    queue: list[QueuedOp] = field(default_factory=list)
    running: list[RunningOp] = field(default_factory=list)


@dataclass
class LaneState:
    """Per-lane assignment state (key: lane)."""

    lane: str = ""
    stations: dict[str, StationQueue] = field(default_factory=dict)
    waiting: list[QueuedOp] = field(default_factory=list)
    finished: dict[str, int] = field(default_factory=dict)

    @classmethod
    def for_lane(cls, catalog: Catalog, lane: str) -> LaneState:
        """A fresh lane with the catalog's stations, for a lane key not yet in the table."""
        return cls(
            lane=lane,
            stations={
                s.station_id: StationQueue(s.station_id, list(s.capabilities), s.capacity, s.status)
                for s in catalog.stations_in_lane(lane)
            },
        )

    def to_dict(self) -> dict[str, Any]:
        # By hand: dataclasses.asdict deep-copies recursively and dominated the worker's CPU.
        return {
            "lane": self.lane,
            "stations": {
                k: {
                    **vars(s),
                    "capabilities": list(s.capabilities),
                    "queue": [dict(vars(q)) for q in s.queue],
                    "running": [dict(vars(r)) for r in s.running],
                }
                for k, s in self.stations.items()
            },
            "waiting": [dict(vars(q)) for q in self.waiting],
            "finished": dict(self.finished),
        }

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> LaneState:
        return cls(
            lane=raw["lane"],
            stations={
                k: StationQueue(
                    **{
                        **s,
                        "queue": [QueuedOp(**q) for q in s["queue"]],
                        "running": [RunningOp(**r) for r in s["running"]],
                    }
                )
                for k, s in raw["stations"].items()
            },
            waiting=[QueuedOp(**q) for q in raw["waiting"]],
            finished=dict(raw["finished"]),
        )


def handle(state: LaneState, event_type: str, value: Mapping[str, Any], now: datetime) -> list[Event]:
    """Apply one lane-keyed input; returns OperationAssigned / OperationUnassigned events."""
    now_ms = epoch_ms(now)
    if event_type == "OperationRequested":
        return _on_requested(state, value, now_ms)
    if event_type == "OperationRevoked":
        return _on_revoked(state, value, now_ms)
    if event_type == "OperationStarted":
        _on_started(state, value)
        return []
    if event_type in ("OperationCompleted", "OperationFailed"):
        _finish(state, value["op_id"])
        return []
    if event_type == "StationStatusChanged":
        return _on_station_status(state, value, now_ms)
    raise ValueError(f"assignment does not handle {event_type}")


def predicted_schedule(station: StationQueue, queue: list[QueuedOp], now_ms: int) -> list[tuple[int, int]]:
    """Predicted (start, end) in epoch ms of each op of ``queue`` run in order at ``station``.

    Each op takes the earliest free capacity slot, never before its release time, and never
    starts before the op ahead of it (FIFO).
    """
    busy = [max(now_ms, r.started_at_ms + r.est_duration_ms) for r in station.running]
    capacity = max(station.capacity, 1)
    # The latest `capacity` of (free slots, running ends): with more running than capacity,
    # the first new start waits until enough of them finish.
    slots = sorted([now_ms] * capacity + busy)[-capacity:]
    heapq.heapify(slots)
    schedule = []
    previous_start = now_ms
    for op in queue:
        start = max(heapq.heappop(slots), op.release_at_ms, previous_start)
        heapq.heappush(slots, start + op.est_duration_ms)
        schedule.append((start, start + op.est_duration_ms))
        previous_start = start
    return schedule


def _insert_position(station: StationQueue, op: QueuedOp) -> int:
    if not op.rush:
        return len(station.queue)
    return next((i for i, q in enumerate(station.queue) if not q.rush), len(station.queue))


def _best_station(state: LaneState, op: QueuedOp, now_ms: int) -> tuple[StationQueue, int, int, int] | None:
    """(station, position, predicted start, predicted end) with the least predicted end."""
    best: tuple[tuple[int, int, str], tuple[StationQueue, int, int, int]] | None = None
    for station in state.stations.values():
        if station.status != "UP" or op.capability not in station.capabilities:
            continue
        position = _insert_position(station, op)
        trial = [*station.queue[:position], op, *station.queue[position:]]
        start, end = predicted_schedule(station, trial, now_ms)[position]
        rank = (end, len(station.queue), station.station_id)
        if best is None or rank < best[0]:
            best = (rank, (station, position, start, end))
    return best[1] if best else None


def _place(
    state: LaneState,
    op: QueuedOp,
    reason: str,
    now_ms: int,
    cause_id: str,
    previous_station_id: str | None = None,
) -> Event | None:
    """Queue ``op`` at the best station; None (and the op waits) if no station can take it."""
    choice = _best_station(state, op, now_ms)
    if choice is None:
        state.waiting.append(op)
        return None
    station, position, start, end = choice
    overtaken = [q.op_id for q in station.queue[position:]]
    depth = len(station.queue)
    queued_work = sum(q.est_duration_ms for q in station.queue)
    station.queue.insert(position, op)
    station.seq += 1
    now = from_epoch_ms(now_ms)
    return Event(
        "OperationAssigned",
        station.station_id,
        {
            **envelope(
                op.order_id,
                station.seq,
                now,
                event_id=derived_event_id(cause_id, "OperationAssigned", op.op_id, str(op.attempt)),
                causation_id=cause_id,
            ),
            "op_id": op.op_id,
            "work_item_id": op.work_item_id,
            "op_code": op.op_code,
            "capability": op.capability,
            "lane": state.lane,
            "station_id": station.station_id,
            "reason": "RUSH" if overtaken and reason == "INITIAL" else reason,
            "rush": op.rush,
            "attempt": op.attempt,
            "queue_depth_at_assign": depth,
            "queue_position": position,
            "overtaken_op_ids": overtaken,
            "queued_work_ms_at_assign": queued_work,
            "est_duration_ms": op.est_duration_ms,
            "release_at": from_epoch_ms(op.release_at_ms),
            "predicted_start": from_epoch_ms(start),
            "predicted_end": from_epoch_ms(end),
            "previous_station_id": previous_station_id,
        },
    )


def _unassigned(
    state: LaneState,
    station: StationQueue,
    op: QueuedOp,
    reason: str,
    next_station_id: str | None,
    now_ms: int,
    cause_id: str,
) -> Event:
    station.seq += 1
    return Event(
        "OperationUnassigned",
        station.station_id,
        {
            **envelope(
                op.order_id,
                station.seq,
                from_epoch_ms(now_ms),
                event_id=derived_event_id(cause_id, "OperationUnassigned", op.op_id, station.station_id),
                causation_id=cause_id,
            ),
            "op_id": op.op_id,
            "work_item_id": op.work_item_id,
            "capability": op.capability,
            "lane": state.lane,
            "station_id": station.station_id,
            "reason": reason,
            "next_station_id": next_station_id,
        },
    )


def _known(state: LaneState, op_id: str) -> bool:
    return any(q.op_id == op_id for q in state.waiting) or any(
        op_id in {q.op_id for q in s.queue} | {r.op_id for r in s.running} for s in state.stations.values()
    )


def _on_requested(state: LaneState, value: Mapping[str, Any], now_ms: int) -> list[Event]:
    if value["attempt"] <= state.finished.get(value["op_id"], 0) or _known(state, value["op_id"]):
        return []  # replayed or stale request
    op = QueuedOp(
        op_id=value["op_id"],
        work_item_id=value["work_item_id"],
        order_id=value["order_id"],
        op_code=value["op_code"],
        capability=value["capability"],
        est_duration_ms=value["est_duration_ms"],
        rush=value["rush"],
        release_at_ms=epoch_ms(value["release_at"]),
        attempt=value["attempt"],
    )
    event = _place(state, op, "INITIAL", now_ms, value["event_id"])
    return [event] if event else []


def _on_revoked(state: LaneState, value: Mapping[str, Any], now_ms: int) -> list[Event]:
    op_id = value["op_id"]
    _remember(state, op_id, REVOKED)
    state.waiting = [q for q in state.waiting if q.op_id != op_id]
    events = []
    for station in state.stations.values():
        for op in [q for q in station.queue if q.op_id == op_id]:
            station.queue.remove(op)
            events.append(_unassigned(state, station, op, "REVOKED", None, now_ms, value["event_id"]))
    return events


def _on_started(state: LaneState, value: Mapping[str, Any]) -> None:
    op_id = value["op_id"]
    queued = [q for q in state.waiting if q.op_id == op_id]
    state.waiting = [q for q in state.waiting if q.op_id != op_id]
    for station in state.stations.values():
        queued += [q for q in station.queue if q.op_id == op_id]
        station.queue = [q for q in station.queue if q.op_id != op_id]
    runner = state.stations.get(value["station_id"])
    if runner is None or any(r.op_id == op_id for r in runner.running):
        return
    est = queued[0].est_duration_ms if queued else 0
    attempt = queued[0].attempt if queued else 1
    runner.running.append(RunningOp(op_id, epoch_ms(value["started_at"]), est, attempt))


def _finish(state: LaneState, op_id: str) -> None:
    attempt = 1
    for station in state.stations.values():
        for r in station.running:
            if r.op_id == op_id:
                attempt = r.attempt
        station.running = [r for r in station.running if r.op_id != op_id]
        station.queue = [q for q in station.queue if q.op_id != op_id]
    state.waiting = [q for q in state.waiting if q.op_id != op_id]
    _remember(state, op_id, attempt)


def _remember(state: LaneState, op_id: str, attempt: int) -> None:
    # Re-inserting keeps the dict in recency order, so trimming drops the oldest.
    previous = state.finished.pop(op_id, 0)
    state.finished[op_id] = max(attempt, previous)
    while len(state.finished) > FINISHED_MEMORY:
        del state.finished[next(iter(state.finished))]


def _on_station_status(state: LaneState, value: Mapping[str, Any], now_ms: int) -> list[Event]:
    station_id = value["station_id"]
    station = state.stations.setdefault(
        station_id, StationQueue(station_id, list(value["capabilities"]), status="DOWN")
    )
    was_up = station.status == "UP"
    station.status = value["status"]
    station.capabilities = list(value["capabilities"])
    station.capacity = value["capacity"]
    cause = value["event_id"]
    events: list[Event] = []
    if station.status == "DOWN":
        moved, station.queue = station.queue, []
        for op in moved:
            assigned = _place(state, op, "STATION_DOWN", now_ms, cause, previous_station_id=station_id)
            next_id = assigned.key if assigned else None
            events.append(_unassigned(state, station, op, "STATION_DOWN", next_id, now_ms, cause))
            if assigned:
                events.append(assigned)
    elif station.status == "UP" and not was_up:
        waiting, state.waiting = state.waiting, []
        for op in waiting:
            assigned = _place(state, op, "STATION_UP", now_ms, cause)
            if assigned:
                events.append(assigned)
    return events
