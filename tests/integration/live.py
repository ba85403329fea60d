"""Helpers for tests that run their own pipeline workers on the shared stack.

Every such test module uses its own Faust app id (so its own consumer group, tables and changelogs)
and its own station-simulator group, and starts both groups at the current end of their input
topics: a worker never re-plays what other engineers' tests left on the shared topics, and never
floods the shared station queues with assignments for their orders.
"""

from __future__ import annotations

import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from itertools import pairwise

import pytest

from connectors.stations import StationSimulator
from connectors.storefront import OrderProducer
from streams.catalog import Catalog
from streams.codec import AvroRegistry
from streams.events import Event, new_event_id, utc_now
from streams.settings import Settings
from streams.topics import start_group_at_end
from streams.topology import STATIONS_EVENTS, STATIONS_QUEUE, input_topics
from tests.conftest import wait_until
from tests.integration.support import Record, WorkerProcess

# Every topic an agent of the topology reads.
WORKER_INPUTS = input_topics()
def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def metric(port: int, name: str, labels: dict[str, str], host: str = "127.0.0.1") -> float | None:
    """One sample of a worker's Prometheus /metrics, or None when absent or the worker is not serving yet."""
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    wanted = name + "{" + ",".join(f'{k}="{v}"' for k, v in sorted(labels.items())) + "}"
    for line in text.splitlines():
        if line.startswith(wanted + " "):
            return float(line.split()[-1])
    return None


class StationControl:
    """Sends StationStatusChanged events to ``stations.events.v1`` like an MES would, keyed by station id."""

    def __init__(self, settings: Settings, registry: AvroRegistry) -> None:
        self.producer = OrderProducer(settings, STATIONS_EVENTS.name, registry=registry)

    def send(self, station_id: str, status: str, capabilities: list[str], capacity: int, reason: str) -> Record:
        now = utc_now()
        value = {
            "event_id": new_event_id(),
            "order_id": "",
            # Above any seq a simulator started earlier has used for this station (its base is the clock in µs).
            "seq": time.time_ns() // 1000 + 1_000_000,
            "occurred_at": now,
            "recorded_at": now,
            "causation_id": None,
            "station_id": station_id,
            "status": status,
            "capabilities": capabilities,
            "capacity": capacity,
            "reason": reason,
        }
        msg = self.producer.send_confirmed(Event("StationStatusChanged", station_id, value), station_id)
        return Record(STATIONS_EVENTS.name, station_id, "StationStatusChanged", value, {}, b"",
                      msg.partition() or 0, msg.offset() or 0)


def without_repeats(records: list[Record]) -> tuple[list[Record], int]:
    """Records in (topic, partition, offset) order with same-event-id repeats dropped; and how many were dropped.

    At-least-once: a stage that re-processes an input after a rebalance or crash re-emits the same
    outputs with the same (derived) event ids. Consumers dedupe on the event id.
    """
    seen: set[tuple[str, str]] = set()
    kept: list[Record] = []
    for r in sorted(records, key=lambda r: (r.topic, r.partition, r.offset)):
        ident = (r.topic, r.value["event_id"])
        if ident not in seen:
            seen.add(ident)
            kept.append(r)
    return kept, len(records) - len(kept)


def foreign_processing(assigned: Iterable[Record]) -> list[str]:
    """Assignments of one op that share an event id but differ in station or station seq.

    One app re-emitting after a rebalance repeats the same (event id, station, seq); a different
    station or seq under one event id means a second pipeline app (another test's worker on the
    shared topics) processed the same orders, which the shared stack cannot prevent.
    """
    variants: dict[str, set[tuple[str, int]]] = defaultdict(set)
    for r in assigned:
        variants[r.value["event_id"]].add((r.value["station_id"], r.value["seq"]))
    return [f"{event_id}: {sorted(v)}" for event_id, v in variants.items() if len(v) > 1]


class SimulatorThread:
    """A simulator working the station queues in a thread of the test process, from the queue's current end."""

    def __init__(self, settings: Settings, catalog: Catalog, registry: AvroRegistry, group_id: str,
                 time_scale: float) -> None:
        start_group_at_end(group_id, [STATIONS_QUEUE.name], settings)
        self.sim = StationSimulator(settings, catalog, time_scale=time_scale, registry=registry, group_id=group_id)
        self.stop_event = threading.Event()
        self.thread = threading.Thread(target=self.sim.run, args=(self.stop_event,), daemon=True)
        self.thread.start()

    def alive(self) -> bool:
        return self.thread.is_alive()

    def foreign(self, station_events: Iterable[Record]) -> list[Record]:
        """Station events for these records that another simulator emitted (another test's, or a bench's).

        A simulator numbers its events from the clock in µs at its start (``StationSimulator._seq_base``):
        a seq outside this one's window came from another simulator working the shared station queue.
        """
        base = self.sim._seq_base
        return [r for r in station_events if r.type != "StationStatusChanged"
                and not base < r.value["seq"] <= base + 10_000_000]

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(15)


def unhandled_errors(log_text: str) -> list[str]:
    """Tracebacks in a worker log other than those of stage errors the runner caught and dead-lettered.

    ``StageRunner`` logs a caught stage error with ``log.exception("<stage> failed on <type>")`` and
    dead-letters the event; foreign records on the shared topics cause those. Anything else is a
    traceback nobody handled.
    """
    chained = ("During handling of the above exception", "The above exception was the direct cause")
    blocks = log_text.split("Traceback (most recent call last):")
    problems, handled = [], False
    for before, after in pairwise(blocks):
        lines = [line for line in before.splitlines() if line.strip()]
        last = lines[-1] if lines else ""
        if not last.startswith(chained):  # a chained traceback belongs to the one before it
            handled = " failed on " in last
        if not handled:
            problems.append(f"...{before[-300:]}Traceback{after[:600]}")
    return problems


def wait_live(
    what: str,
    condition: object,
    bound: float,
    workers: Sequence[WorkerProcess],
    simulator: SimulatorThread | None = None,
    detail: Callable[[], str] | None = None,
) -> object:
    """Poll ``condition`` until it holds, failing at once if a worker or the simulator dies on the way.

    A timeout names ``what``, adds ``detail()`` (where things stood) and the end of every worker log;
    a death is reported as a death, not as the timeout it would otherwise become.
    """
    died: list[str] = []

    def check() -> object:
        for w in workers:
            if not w.alive():
                died.append(f"{w.log.name} died while waiting for {what}:\n{w.tail()}")
        if simulator is not None and not simulator.alive():
            died.append(f"the station simulator thread died while waiting for {what} (see the warnings)")
        if died:
            return True
        return condition() if callable(condition) else condition

    try:
        result = wait_until(check, bound, what, interval=0.1)
    except pytest.fail.Exception:
        tails = "\n".join(f"--- {w.log.name}\n{w.tail()}" for w in workers)
        extra = f"{detail()}\n" if detail is not None else ""
        pytest.fail(f"timed out after {bound:.0f}s waiting for {what}; {extra}worker logs end:\n{tails}")
    if died:
        pytest.fail(died[0])
    return result
