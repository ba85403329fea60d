"""Station status takes effect live, and every station serves its queue first in, first out.

A worker of its own (a fresh app ``pieceflow-test-station-status-<hex>`` per run, web port 6266) and a station simulator
(slow enough that queues build up) run the pipeline. The test plays the MES: it sends
``StationStatusChanged`` DOWN for a busy wok to ``stations.events.v1`` and checks that the queued,
unstarted operations there move to other woks (OperationUnassigned + OperationAssigned, reason
STATION_DOWN), that nothing new goes to the wok while it is down, and that it takes work again once
it is UP (always restored). FIFO is checked on every station the orders touched.

The simulator keeps its own ``up`` flag: an external DOWN does not stop it working what it already
queued at that station until the pipeline's OperationUnassigned arrives, which it honours.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import pytest

from connectors.shopfront import build_order
from connectors.storefront import OrderProducer
from streams.catalog import Catalog
from streams.codec import AvroRegistry
from streams.events import Event, epoch_ms
from streams.reference import publish_catalog
from streams.settings import Settings
from streams.topics import ensure_topics, start_group_at_end
from streams.topology import DEAD_LETTERS, ORDERS_DISPATCHED, ORDERS_INBOUND, STATIONS_EVENTS, STATIONS_QUEUE, TOPICS
from tests.conftest import wait_until
from tests.integration.live import (
    WORKER_INPUTS,
    SimulatorThread,
    StationControl,
    foreign_processing,
    metric,
    unhandled_errors,
    unique,
    wait_live,
)
from tests.integration.support import Collector, Record, WorkerProcess

# Fresh groups per run, started at the topics' ends: earlier runs' history stays behind.
APP_ID = f"pieceflow-test-station-status-{uuid.uuid4().hex[:6]}"
SIM_GROUP = f"{APP_ID}-sim"
WEB_PORT = 6266
TIME_SCALE = 0.01  # a 150 s wok dish takes 1.5 s: enough for queues to build up
BOUND = 120.0
T_FAKE = datetime(2025, 3, 14, 18, 0, tzinfo=UTC)


@pytest.fixture(scope="module")
def worker(
    pipeline_settings: Settings, catalog: Catalog, registry: AvroRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    ensure_topics(TOPICS, pipeline_settings)
    publish_catalog(catalog, pipeline_settings, registry)
    start_group_at_end(APP_ID, WORKER_INPUTS, pipeline_settings)
    proc = WorkerProcess(
        pipeline_settings, tmp_path_factory.mktemp("station-workers"), "worker-1",
        {"PIECEFLOW_APP_ID": APP_ID, "PIECEFLOW_WEB_PORT": str(WEB_PORT)},
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def simulator(pipeline_settings: Settings, catalog: Catalog, registry: AvroRegistry) -> Iterator[SimulatorThread]:
    sim = SimulatorThread(pipeline_settings, catalog, registry, SIM_GROUP, TIME_SCALE)
    yield sim
    sim.stop()


@pytest.fixture(scope="module")
def collector(pipeline_settings: Settings, registry: AvroRegistry) -> Iterator[Collector]:
    c = Collector(pipeline_settings, registry,
                  [STATIONS_QUEUE.name, STATIONS_EVENTS.name, ORDERS_DISPATCHED.name, DEAD_LETTERS.name])
    yield c
    c.close()


# ---- reading the records --------------------------------------------------------------------------


@dataclass
class Scenario:
    station: str  # the wok put DOWN
    down: Record
    up: Record | None = None
    boundary: int = -1  # offset in the station's queue partition of the first record the DOWN caused
    pending_at_down: set[str] = field(default_factory=set)  # its queued, unstarted ops (ours) at the DOWN
    assigned_while_down: list[Record] = field(default_factory=list)
    while_down_orders: set[str] = field(default_factory=set)
    after_up_orders: set[str] = field(default_factory=set)
    orders: set[str] = field(default_factory=set)
    seconds: dict[str, float] = field(default_factory=dict)
    moved: int = 0


def ours(collector: Collector, ids: set[str], kind: str, **match: object) -> list[Record]:
    return sorted(
        (r for r in collector.for_orders(ids, kind) if all(r.value.get(k) == v for k, v in match.items())),
        key=lambda r: (r.topic, r.partition, r.offset),
    )


def pending_at(collector: Collector, ids: set[str], station: str) -> set[str]:
    """Our ops assigned to ``station``, neither unassigned from it nor started there (so far)."""
    assigned = {r.value["op_id"] for r in ours(collector, ids, "OperationAssigned", station_id=station)}
    gone = {r.value["op_id"] for r in ours(collector, ids, "OperationUnassigned", station_id=station)}
    started = {r.value["op_id"] for r in ours(collector, ids, "OperationStarted", station_id=station)}
    return assigned - gone - started


def place(producer: OrderProducer, order: dict[str, object]) -> None:
    producer.send_confirmed(Event("OrderPlaced", str(order["order_id"]), dict(order)), str(order["order_id"]))


def dishes(catalog: Catalog, count: int, prefix: str, rush_every: int = 0) -> list[dict[str, object]]:
    """Single-plate orders (no fire offsets): egg fried rice goes to a wok at once, Kung Pao after prep."""
    orders = []
    for i in range(count):
        sku = "kung-pao-chicken" if i % 5 == 4 else "egg-fried-rice"
        rush = bool(rush_every) and i % rush_every == rush_every - 1
        orders.append(build_order(catalog, [(sku, 1, [])], external_id=unique(prefix),
                                  priority="RUSH" if rush else "STANDARD"))
    return orders


# ---- the scenario: run once for the module, checked by the tests below ---------------------------


@pytest.fixture(scope="module")
def scenario(
    worker: WorkerProcess, simulator: SimulatorThread, collector: Collector, catalog: Catalog,
    pipeline_settings: Settings, registry: AvroRegistry,
) -> Scenario:
    producer = OrderProducer(pipeline_settings, ORDERS_INBOUND.name, registry=registry)
    control = StationControl(pipeline_settings, registry)
    woks = sorted(s.station_id for s in catalog.stations_in_lane(catalog.lane_of("wok")))
    assert len(woks) >= 2, "the restaurant needs several woks for a re-assignment"

    def foreign_starts() -> str:
        foreign = simulator.foreign(ours(collector, ids, "OperationStarted"))
        return f"{len(foreign)} operation starts of ours came from another station simulator on the shared topics"

    def wait(what: str, condition: object, bound: float = BOUND) -> object:
        return wait_live(what, condition, bound, [worker], simulator, foreign_starts)

    t0 = time.monotonic()
    first = dishes(catalog, 24, "st-busy", rush_every=6)
    ids = {str(o["order_id"]) for o in first}
    for order in first:
        place(producer, order)

    def busiest() -> tuple[int, str] | None:
        depth, station = max((len(pending_at(collector, ids, w)), w) for w in woks)
        return (depth, station) if depth >= 3 else None

    found = wait("a wok with at least 3 queued, unstarted operations of ours", busiest)
    assert isinstance(found, tuple)
    station: str = found[1]
    spec = catalog.stations[station]
    down = control.send(station, "DOWN", list(spec.capabilities), spec.capacity, "test: station status live")
    run = Scenario(station=station, down=down, orders=set(ids), seconds={"queues built": time.monotonic() - t0})
    try:
        run_down_and_up(run, collector, catalog, producer, control, woks, wait)
    finally:
        if run.up is None:  # always hand the shared station back
            run.up = control.send(station, "UP", list(spec.capabilities), spec.capacity, "test: restore")
            with contextlib.suppress(pytest.fail.Exception):
                wait_until(lambda: metric(WEB_PORT, "pieceflow_station_up", {"station": station}) == 1.0, 30,
                           f"{station} UP in the worker")
    run.seconds["total"] = time.monotonic() - t0
    return run


def run_down_and_up(
    run: Scenario, collector: Collector, catalog: Catalog, producer: OrderProducer, control: StationControl,
    woks: list[str], wait: object,
) -> None:
    assert callable(wait)
    station, down_id = run.station, run.down.value["event_id"]
    spec = catalog.stations[station]
    t = time.monotonic()
    wait(f"{station} DOWN in the worker's metrics",
         lambda: metric(WEB_PORT, "pieceflow_station_up", {"station": station}) == 0.0)
    caused = wait("the re-assignments the DOWN caused",
                  lambda: [r for r in collector.where(topic=STATIONS_QUEUE.name, key=station)
                           if r.value.get("causation_id") == down_id])
    run.boundary = min(r.offset for r in caused)

    def pending_when_down() -> set[str]:
        before = [r for r in ours(collector, run.orders, "OperationAssigned", station_id=station)
                  if r.topic == STATIONS_QUEUE.name and r.offset < run.boundary]
        dropped = {r.value["op_id"] for r in ours(collector, run.orders, "OperationUnassigned", station_id=station)
                   if r.offset < run.boundary}
        # The lane reads this station's events in their log order: what started before the DOWN stays.
        started = {r.value["op_id"] for r in ours(collector, run.orders, "OperationStarted", station_id=station)
                   if r.partition == run.down.partition and r.offset < run.down.offset}
        return {r.value["op_id"] for r in before} - dropped - started

    def unassigned_by_down() -> set[str]:
        return {r.value["op_id"] for r in ours(collector, run.orders, "OperationUnassigned", station_id=station)
                if r.value["causation_id"] == down_id}

    wait("an OperationUnassigned for each queued, unstarted op of the down station",
         lambda: pending_when_down() and pending_when_down() <= unassigned_by_down())
    run.pending_at_down = pending_when_down()
    wait("the re-assignment of each of them",
         lambda: {r.value["op_id"] for r in ours(collector, run.orders, "OperationAssigned", causation_id=down_id)}
         >= run.pending_at_down)
    run.seconds["down took effect"] = time.monotonic() - t
    run.moved = len(run.pending_at_down)

    # While it is down, more orders: none of their operations may go to it.
    more = dishes(catalog, 9, "st-while-down")
    run.while_down_orders = {str(o["order_id"]) for o in more}
    run.orders |= run.while_down_orders
    for order in more:
        place(producer, order)
    wait("a wok assigned to every order placed while it is down",
         lambda: {r.value["order_id"] for r in ours(collector, run.while_down_orders, "OperationAssigned",
                                                    capability="wok")} == run.while_down_orders)
    run.assigned_while_down = [r for r in ours(collector, run.orders, "OperationAssigned", station_id=station)
                               if r.offset > run.boundary]

    # UP again: it takes work again.
    run.up = control.send(station, "UP", list(spec.capabilities), spec.capacity, "test: back up")
    t = time.monotonic()
    wait(f"{station} UP in the worker's metrics",
         lambda: metric(WEB_PORT, "pieceflow_station_up", {"station": station}) == 1.0)
    later = dishes(catalog, 6, "st-after-up")
    run.after_up_orders = {str(o["order_id"]) for o in later}
    run.orders |= run.after_up_orders
    for order in later:
        place(producer, order)
    wait(f"{station} taking new work once up",
         lambda: ours(collector, run.after_up_orders, "OperationAssigned", station_id=station))
    run.seconds["up took effect"] = time.monotonic() - t

    t = time.monotonic()
    wait("every order dispatched",
         lambda: {r.key for r in ours(collector, run.orders, "OrderDispatched")} == run.orders, bound=240)
    run.seconds["all dispatched"] = time.monotonic() - t


# ---- the checks ---------------------------------------------------------------------------------


def test_no_other_pipeline_app_processed_these_orders(
    scenario: Scenario, collector: Collector, simulator: SimulatorThread
) -> None:
    """Precondition of the checks below: only this module's worker assigned these orders' operations,
    and only its simulator worked them (every app and simulator reads the same shared topics)."""
    assert foreign_processing(ours(collector, scenario.orders, "OperationAssigned")) == []
    assert simulator.foreign(ours(collector, scenario.orders, "OperationStarted")) == []


def test_a_down_station_hands_its_queued_unstarted_operations_to_other_stations(
    scenario: Scenario, collector: Collector, catalog: Catalog
) -> None:
    station, down_id = scenario.station, scenario.down.value["event_id"]
    unassigned = {r.value["op_id"]: r for r in ours(collector, scenario.orders, "OperationUnassigned",
                                                    causation_id=down_id)}
    moved = {r.value["op_id"]: r for r in ours(collector, scenario.orders, "OperationAssigned",
                                               causation_id=down_id)}
    assert scenario.pending_at_down, "the station had no queued work when it went down: nothing was tested"
    # Exactly its queued, unstarted operations: nothing that had started, nothing missed.
    assert set(unassigned) == scenario.pending_at_down
    assert set(moved) == scenario.pending_at_down
    other_woks = {s.station_id for s in catalog.stations_in_lane(catalog.lane_of("wok"))} - {station}
    for op_id, gone in unassigned.items():
        again = moved[op_id]
        assert gone.value["station_id"] == station and gone.key == station
        assert gone.value["reason"] == "STATION_DOWN"
        assert again.value["reason"] == "STATION_DOWN"
        assert again.value["previous_station_id"] == station
        assert again.value["station_id"] in other_woks and again.key == again.value["station_id"]
        assert gone.value["next_station_id"] == again.value["station_id"]
        assert again.value["attempt"] == gone_attempt(collector, scenario, op_id)


def gone_attempt(collector: Collector, scenario: Scenario, op_id: str) -> int:
    first = [r for r in ours(collector, scenario.orders, "OperationAssigned", station_id=scenario.station,
                             op_id=op_id) if r.offset < scenario.boundary]
    return int(first[-1].value["attempt"])


def test_no_assignment_goes_to_a_station_while_it_is_down(scenario: Scenario, collector: Collector) -> None:
    assert scenario.assigned_while_down == []
    while_down = ours(collector, scenario.while_down_orders, "OperationAssigned", capability="wok")
    assert {r.value["order_id"] for r in while_down} == scenario.while_down_orders
    assert all(r.value["station_id"] != scenario.station for r in while_down)


def test_a_station_back_up_takes_work_again(scenario: Scenario, collector: Collector) -> None:
    assert scenario.up is not None and scenario.up.value["status"] == "UP"
    back = ours(collector, scenario.after_up_orders, "OperationAssigned", station_id=scenario.station)
    assert back and all(r.offset > scenario.boundary for r in back)


def test_every_station_serves_its_queue_in_fifo_order_rush_aside(scenario: Scenario, collector: Collector) -> None:
    assigned = ours(collector, scenario.orders, "OperationAssigned")
    started = ours(collector, scenario.orders, "OperationStarted")
    rush_overtakes = sum(1 for r in assigned if r.value["overtaken_op_ids"])
    problems = fifo_violations(assigned, started)
    assert problems == [], "\n".join(problems)
    stations = {r.value["station_id"] for r in started}
    assert len(stations) >= 4, f"too few stations worked to say much about FIFO: {sorted(stations)}"
    assert rush_overtakes >= 1, "no rush order overtook anything: the exception was not exercised"


def fifo_violations(assigned: list[Record], started: list[Record]) -> list[str]:
    """At each station, X assigned before Y must start before Y, unless Y (rush) recorded overtaking X.

    Assignment order is the offset order in the station's queue partition; start order the offset
    order of OperationStarted in the station's event partition. Operations held back by a fire offset
    may be overtaken by design, so they are left out.
    """
    problems = []
    for station in sorted({r.value["station_id"] for r in started}):
        first_start: dict[str, int] = {}
        for r in started:
            if r.value["station_id"] == station:
                first_start.setdefault(r.value["op_id"], r.offset)
        last_assign: dict[str, Record] = {}
        for r in assigned:
            if r.value["station_id"] == station and r.value["op_id"] in first_start:
                last_assign[r.value["op_id"]] = r
        ops = sorted((a for a in last_assign.values()
                      if epoch_ms(a.value["release_at"]) <= epoch_ms(a.value["occurred_at"])),
                     key=lambda a: a.offset)
        for i, x in enumerate(ops):
            for y in ops[i + 1:]:
                x_op, y_op = x.value["op_id"], y.value["op_id"]
                if first_start[y_op] < first_start[x_op]:
                    if x_op in y.value["overtaken_op_ids"]:
                        assert y.value["rush"], f"{y_op} overtook {x_op} at {station} without being rush"
                        continue
                    problems.append(f"{station}: {y_op} (assigned @{y.offset}) started before {x_op} "
                                    f"(assigned @{x.offset}) without a recorded rush overtake")
    return problems


def fake(
    kind: str, station: str, op_id: str, offset: int, overtaken: tuple[str, ...] = (), rush: bool = False
) -> Record:
    at = T_FAKE
    value = {"event_id": f"{kind}-{op_id}", "op_id": op_id, "station_id": station, "overtaken_op_ids": list(overtaken),
             "rush": rush, "occurred_at": at, "release_at": at}
    topic = STATIONS_QUEUE.name if kind == "OperationAssigned" else STATIONS_EVENTS.name
    return Record(topic, station, kind, value, {}, b"", 0, offset)


def test_the_fifo_check_itself() -> None:
    """Self-test of ``fifo_violations`` on made-up records: in order passes, a recorded rush overtake
    passes, an unrecorded overtake fails."""
    assigned = [fake("OperationAssigned", "s", "a", 1), fake("OperationAssigned", "s", "b", 2),
                fake("OperationAssigned", "s", "r", 3, overtaken=("b",), rush=True)]
    started = [fake("OperationStarted", "s", op, i) for i, op in enumerate(["a", "r", "b"])]
    assert fifo_violations(assigned, started) == []
    swapped = [fake("OperationStarted", "s", op, i) for i, op in enumerate(["b", "a", "r"])]
    assert fifo_violations(assigned, swapped) == ["s: b (assigned @2) started before a (assigned @1) "
                                                  "without a recorded rush overtake"]
    unrecorded = [*assigned[:2], fake("OperationAssigned", "s", "r", 3, rush=True)]
    assert fifo_violations(unrecorded, started) == ["s: r (assigned @3) started before b (assigned @2) "
                                                    "without a recorded rush overtake"]


def test_every_order_is_dispatched_exactly_once(scenario: Scenario, collector: Collector) -> None:
    dispatched = ours(collector, scenario.orders, "OrderDispatched")
    assert sorted(r.key for r in dispatched) == sorted(scenario.orders), "an order was dispatched twice"


def test_timings_are_reported(scenario: Scenario, capsys: pytest.CaptureFixture[str]) -> None:
    with capsys.disabled():
        print(f"\nstation status live ({scenario.station} down, {scenario.moved} ops moved):",
              ", ".join(f"{k} {v:.1f}s" for k, v in scenario.seconds.items()))


def test_no_unhandled_errors_and_none_of_these_orders_dead_lettered(
    scenario: Scenario, worker: WorkerProcess, collector: Collector
) -> None:
    assert unhandled_errors(Path(worker.log).read_text(errors="replace")) == []
    assert collector.for_orders(scenario.orders) and not [
        r for r in collector.for_orders(scenario.orders) if r.topic == DEAD_LETTERS.name
    ]
