"""The MES side without a factory: a station simulator that works each station's FIFO queue.

It reads ``stations.queue.v1`` (OperationAssigned / OperationUnassigned, keyed by station), works
each operation for its estimated duration times a time scale, and reports OperationStarted and
OperationCompleted (or OperationFailed) on ``stations.events.v1``. On request it injects failures
and station outages, so the whole loop runs on one machine.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from confluent_kafka import Consumer, Producer

from streams import metrics
from streams.catalog import Catalog
from streams.codec import AvroRegistry, DecodeError
from streams.events import epoch_ms, new_event_id, utc_now
from streams.producer_config import PRODUCER_DEFAULTS
from streams.settings import Settings

log = logging.getLogger(__name__)

QUEUE_TOPIC = "stations.queue.v1"
EVENTS_TOPIC = "stations.events.v1"


@dataclass
class Job:
    value: dict[str, Any]
    not_before: float  # monotonic time the fire offset releases it
    started_at: datetime | None = None
    done_at: float = 0.0


@dataclass
class SimStation:
    station_id: str
    capabilities: list[str]
    capacity: int
    queue: list[Job] = field(default_factory=list)
    running: list[Job] = field(default_factory=list)
    up: bool = True
    down_until: float = 0.0
    seq: int = 0
    busy_seconds: float = 0.0


@dataclass(frozen=True)
class Faults:
    """Failures and outages to inject; all off by default."""

    fail_rate: float = 0.0
    outage_every: float = 0.0  # seconds between outages of a random station (0: never)
    outage_for: float = 5.0
    seed: int | None = None


class StationSimulator:
    def __init__(
        self,
        settings: Settings,
        catalog: Catalog,
        time_scale: float = 1.0,
        stations: Iterable[str] | None = None,
        faults: Faults = Faults(),
        registry: AvroRegistry | None = None,
        group_id: str = "pieceflow-stations",
    ) -> None:
        chosen = set(stations) if stations else None
        self.stations = {
            s.station_id: SimStation(s.station_id, list(s.capabilities), max(1, s.capacity))
            for s in catalog.stations.values()
            if s.kind == "WORK" and (chosen is None or s.station_id in chosen)
        }
        self.time_scale = time_scale
        self.faults = faults
        self.random = random.Random(faults.seed)
        self.registry = registry or AvroRegistry.from_url(settings.schema_registry_url)
        self.consumer = Consumer(
            {
                **settings.kafka_config(),
                "group.id": group_id,
                "auto.offset.reset": "earliest",
                "enable.auto.commit": True,
            }
        )
        self.producer = Producer({**settings.kafka_config(), **PRODUCER_DEFAULTS})
        self.completed = 0
        self.failed = 0
        self.next_outage = time.monotonic() + faults.outage_every if faults.outage_every else float("inf")
        # Station seq must keep rising across restarts of the simulator: start from the clock.
        self._seq_base = time.time_ns() // 1000

    # ---- queue ----------------------------------------------------------------------------------

    def on_queue_event(self, kind: str, value: dict[str, Any]) -> None:
        if kind not in ("OperationAssigned", "OperationUnassigned"):
            log.warning("ignoring a %s on the station queue topic", kind)
            return
        station = self.stations.get(value["station_id"])
        if station is None:
            return
        if kind == "OperationUnassigned":
            station.queue = [j for j in station.queue if j.value["op_id"] != value["op_id"]]
            return
        if any(j.value["op_id"] == value["op_id"] for j in station.queue + station.running):
            return  # a replayed assignment
        offset_ms = max(0, epoch_ms(value["release_at"]) - epoch_ms(value["occurred_at"]))
        job = Job(value, time.monotonic() + offset_ms / 1000 * self.time_scale)
        # Mirror the assignment stage's queue: a rush op goes ahead of the ops it overtook.
        overtaken = set(value["overtaken_op_ids"])
        position = next((i for i, j in enumerate(station.queue) if j.value["op_id"] in overtaken), None)
        if position is None:
            station.queue.append(job)
        else:
            station.queue.insert(position, job)

    # ---- emitting -------------------------------------------------------------------------------

    def _emit(self, kind: str, station: SimStation, body: dict[str, Any]) -> None:
        station.seq += 1
        now = utc_now()
        value = {
            "event_id": new_event_id(),
            "seq": self._seq_base + station.seq,
            "occurred_at": now,
            "recorded_at": now,
            "causation_id": None,
            "station_id": station.station_id,
            **body,
        }
        self.producer.produce(
            EVENTS_TOPIC, key=station.station_id.encode(), value=self.registry.encode(EVENTS_TOPIC, kind, value)
        )

    def _op_body(self, job: Job) -> dict[str, Any]:
        v = job.value
        return {
            "order_id": v["order_id"],
            "op_id": v["op_id"],
            "work_item_id": v["work_item_id"],
            "capability": v["capability"],
        }

    def _status(self, station: SimStation, status: str, reason: str) -> None:
        station.up = status == "UP"
        self._emit(
            "StationStatusChanged",
            station,
            {
                "order_id": "",
                "status": status,
                "capabilities": station.capabilities,
                "capacity": station.capacity,
                "reason": reason,
            },
        )

    # ---- the clock ------------------------------------------------------------------------------

    def tick(self, now: float) -> None:
        for station in self.stations.values():
            for job in [j for j in station.running if j.done_at <= now]:
                station.running.remove(job)
                body = {**self._op_body(job), "started_at": job.started_at}
                if self.faults.fail_rate and self.random.random() < self.faults.fail_rate:
                    self.failed += 1
                    self._emit("OperationFailed", station, {**body, "failed_at": utc_now(), "reason": "simulated"})
                else:
                    self.completed += 1
                    self._emit("OperationCompleted", station, {**body, "completed_at": utc_now()})
            if not station.up:
                if station.down_until and now >= station.down_until:
                    station.down_until = 0.0
                    self._status(station, "UP", "simulated outage over")
                continue
            while len(station.running) < station.capacity:
                # FIFO among released operations: one held back by its fire offset does not block
                # the station, but nothing overtakes an operation that is free to start.
                ready = next((j for j in station.queue if j.not_before <= now), None)
                if ready is None:
                    break
                station.queue.remove(ready)
                ready.started_at = utc_now()
                ready.done_at = now + ready.value["est_duration_ms"] / 1000 * self.time_scale
                station.running.append(ready)
                station.busy_seconds += ready.done_at - now
                metrics.STATION_BUSY.labels(station=station.station_id).inc(ready.done_at - now)
                self._emit("OperationStarted", station, {**self._op_body(ready), "started_at": ready.started_at,
                                                         "operator_ref": None})
        if now >= self.next_outage:
            self.next_outage = now + self.faults.outage_every
            candidates = [s for s in self.stations.values() if s.up]
            if candidates:
                station = self.random.choice(candidates)
                station.down_until = now + self.faults.outage_for
                self._status(station, "DOWN", "simulated outage")

    def next_due(self, now: float) -> float:
        times = [j.done_at for s in self.stations.values() for j in s.running]
        times += [j.not_before for s in self.stations.values() for j in s.queue if j.not_before > now]
        return min(times, default=now + 0.05)

    def run(self, stop: threading.Event, poll: float = 0.05) -> None:
        self.consumer.subscribe([QUEUE_TOPIC])
        try:
            while not stop.is_set():
                now = time.monotonic()
                wait = min(poll, max(0.0, self.next_due(now) - now))
                msg = self.consumer.poll(wait)
                while msg is not None:
                    raw = msg.value()
                    if msg.error() is None and raw is not None:
                        try:
                            decoded = self.registry.decode(raw)
                            self.on_queue_event(decoded.type, decoded.value)
                        except DecodeError as exc:
                            log.warning("skipping an unreadable station-queue record: %s", exc)
                    msg = self.consumer.poll(0)
                self.tick(time.monotonic())
                self.producer.poll(0)
        finally:
            self.producer.flush(10)
            self.consumer.close()

