"""Two workers share N partitions; the second joins while orders flow (a rebalance under load).

Both are ``pieceflow worker`` processes of one app (a fresh ``pieceflow-test-2w-<hex>`` per run, web
ports 6366 and 6367).
Orders go in three waves: before the second worker starts, while the group rebalances to take it in,
and after both hold partitions. Then:

- every order is dispatched exactly once (distinct event ids; raw repeats of one event id are
  at-least-once and allowed, and reported);
- on every order-keyed topic, each order's seq strictly increases once same-event-id repeats are
  dropped;
- no station is double-booked: each station's OperationAssigned records sit in one partition, its
  assignment seq strictly increases (repeats dropped), and each operation is assigned once.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from connectors.shopfront import build_order
from connectors.storefront import OrderProducer
from streams.catalog import Catalog
from streams.codec import AvroRegistry
from streams.events import Event
from streams.reference import publish_catalog
from streams.settings import Settings
from streams.topics import ensure_topics, start_group_at_end
from streams.topology import (
    DEAD_LETTERS,
    ORDERS_DECISIONS,
    ORDERS_DISPATCHED,
    ORDERS_INBOUND,
    ORDERS_LEADTIME,
    ORDERS_STATUS,
    ORDERS_WORKITEMS,
    STATIONS_QUEUE,
    TOPICS,
)
from tests.integration.live import (
    WORKER_INPUTS,
    SimulatorThread,
    foreign_processing,
    metric,
    unhandled_errors,
    unique,
    wait_live,
    without_repeats,
)
from tests.integration.support import Collector, WorkerProcess, seq_violations

pytestmark = pytest.mark.timeout(900)

# Fresh groups per run, started at the topics' ends: earlier runs' history stays behind.
APP_ID = f"pieceflow-test-2w-{uuid.uuid4().hex[:6]}"
SIM_GROUP = f"{APP_ID}-sim"
PORTS = (6366, 6367)
ORDER_KEYED = [ORDERS_DECISIONS, ORDERS_WORKITEMS, ORDERS_STATUS, ORDERS_DISPATCHED, ORDERS_LEADTIME]
WAVE = 20
BOUND = 240.0


@pytest.fixture(scope="module")
def log_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("two-workers")


@pytest.fixture(scope="module")
def workers(pipeline_settings: Settings, catalog: Catalog, registry: AvroRegistry) -> Iterator[list[WorkerProcess]]:
    """Started by the scenario (the second one mid-stream); all stopped at the end."""
    ensure_topics(TOPICS, pipeline_settings)
    assert pipeline_settings.partitions >= 4, "the pipeline topics need several partitions to share"
    publish_catalog(catalog, pipeline_settings, registry)
    start_group_at_end(APP_ID, WORKER_INPUTS, pipeline_settings)
    procs: list[WorkerProcess] = []
    yield procs
    for proc in procs:
        proc.stop()


@pytest.fixture(scope="module")
def simulator(pipeline_settings: Settings, catalog: Catalog, registry: AvroRegistry) -> Iterator[SimulatorThread]:
    sim = SimulatorThread(pipeline_settings, catalog, registry, SIM_GROUP, time_scale=0.002)
    yield sim
    sim.stop()


@pytest.fixture(scope="module")
def collector(pipeline_settings: Settings, registry: AvroRegistry) -> Iterator[Collector]:
    c = Collector(pipeline_settings, registry, [t.name for t in [*ORDER_KEYED, STATIONS_QUEUE, DEAD_LETTERS]])
    yield c
    c.close()


def group_members(admin: AdminClient) -> tuple[str, list[int]]:
    """The app group's state and, per member, how many partitions it holds."""
    description = admin.describe_consumer_groups([APP_ID])[APP_ID].result(timeout=10)
    return str(description.state), [len(m.assignment.topic_partitions) for m in description.members]


class Run:
    def __init__(self) -> None:
        self.orders: set[str] = set()
        self.seconds: dict[str, float] = {}
        self.group_during_wave_2 = ""


@pytest.fixture(scope="module")
def run(
    workers: list[WorkerProcess], simulator: SimulatorThread, collector: Collector, catalog: Catalog,
    pipeline_settings: Settings, registry: AvroRegistry, log_dir: Path,
) -> Run:
    producer = OrderProducer(pipeline_settings, ORDERS_INBOUND.name, registry=registry)
    admin = AdminClient({"bootstrap.servers": pipeline_settings.kafka_bootstrap})
    result = Run()

    def stuck() -> str:
        """Where the orders not yet dispatched stopped: the event types seen for each, and assigned vs planned ops."""
        done = {r.key for r in collector.for_orders(result.orders, "OrderDispatched")}
        lines = []
        for oid in sorted(result.orders - done):
            records = collector.for_orders({oid})
            planned = {o["op_id"] for r in records if r.type == "WorkItemPlanned" for o in r.value["operations"]}
            assigned = {r.value["op_id"] for r in records if r.type == "OperationAssigned"}
            statuses = [(r.value["state"], r.value["ops_done"], r.value["ops_total"]) for r in records
                        if r.type == "OrderStatus"]
            lines.append(f"{oid}: {sorted(Counter(r.type for r in records).items())}, "
                         f"ops assigned {len(assigned & planned)}/{len(planned)}, statuses {statuses}")
        return "\n".join(lines)

    def wait(what: str, condition: object, bound: float = BOUND) -> object:
        return wait_live(what, condition, bound, workers, simulator, lambda: f"orders not dispatched:\n{stuck()}")

    def wave(n: int) -> set[str]:
        ids = set()
        for i in range(WAVE):
            neighbourhood = ["north", "south", "centre"][i % 3]
            lines = [("kung-pao-chicken", 1, [("SELECT", "spice", "extra-spicy")])] if i % 2 else []
            lines.append(("spring-rolls" if i % 3 else "egg-fried-rice", 1, []))
            order = build_order(
                catalog, lines, external_id=unique(f"2w-{n}"), priority="RUSH" if i % 7 == 0 else "STANDARD",
                delivery={"method": "DELIVERY", "address": {"neighbourhood": neighbourhood, "postcode": None,
                                                            "line1": "1 Main St", "city": None}},
            )
            oid = str(order["order_id"])
            producer.send_confirmed(Event("OrderPlaced", oid, dict(order)), oid)
            ids.add(oid)
        result.orders |= ids
        return ids

    def accepted(ids: set[str]) -> set[str]:
        return {r.key for r in collector.for_orders(ids, "OrderAccepted")}

    t0 = time.monotonic()
    workers.append(WorkerProcess(pipeline_settings, log_dir, "worker-1",
                                 {"PIECEFLOW_APP_ID": APP_ID, "PIECEFLOW_WEB_PORT": str(PORTS[0])}))
    first = wave(1)
    wait("worker 1 accepting the first wave", lambda: len(accepted(first)) >= WAVE // 2)
    result.seconds["worker 1 up"] = time.monotonic() - t0

    t = time.monotonic()
    workers.append(WorkerProcess(pipeline_settings, log_dir, "worker-2",
                                 {"PIECEFLOW_APP_ID": APP_ID, "PIECEFLOW_WEB_PORT": str(PORTS[1])}))
    wait("worker 2 joining the group", lambda: len(group_members(admin)[1]) >= 2)
    result.group_during_wave_2 = group_members(admin)[0]
    second = wave(2)  # while the group rebalances to take worker 2 in
    wait("both workers holding partitions",
         lambda: (lambda s: s[0].endswith("STABLE") and len(s[1]) == 2 and min(s[1]) > 0)(group_members(admin)))
    result.seconds["rebalance"] = time.monotonic() - t
    third = wave(3)

    t = time.monotonic()
    wait("every order dispatched",
         lambda: {r.key for r in collector.for_orders(result.orders, "OrderDispatched")} == result.orders)
    result.seconds["drain after the last wave"] = time.monotonic() - t
    result.seconds["total"] = time.monotonic() - t0
    assert first | second | third == result.orders and len(result.orders) == 3 * WAVE
    return result


# ---- the checks ---------------------------------------------------------------------------------


def test_no_other_pipeline_app_processed_these_orders(run: Run, collector: Collector) -> None:
    """Precondition: only this module's workers assigned these orders' operations (shared topics)."""
    assert foreign_processing(collector.for_orders(run.orders, "OperationAssigned")) == []


def test_both_workers_did_work(run: Run, workers: list[WorkerProcess]) -> None:
    handled = [metric(port, "pieceflow_stage_events_in_total", {"stage": "validation"}) for port in PORTS]
    assert all(h and h > 0 for h in handled), f"events validated per worker: {handled}"


def report(capsys: pytest.CaptureFixture[str], text: str) -> None:
    with capsys.disabled():
        print(f"\n{text}")


def test_every_order_is_dispatched_exactly_once(
    run: Run, collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    dispatched = collector.for_orders(run.orders, "OrderDispatched")
    distinct = {(r.key, r.value["event_id"]) for r in dispatched}
    per_order = Counter(key for key, _ in distinct)
    assert set(per_order) == run.orders
    assert [o for o, n in per_order.items() if n != 1] == [], "an order was dispatched twice (distinct event ids)"
    accepted = {(r.key, r.value["event_id"]) for r in collector.for_orders(run.orders, "OrderAccepted")}
    assert sorted(key for key, _ in accepted) == sorted(run.orders), "an order was not accepted exactly once"
    # A placement re-read after the rebalance (its offset not yet committed, its event id already in the
    # validation table) is answered with an informational DUPLICATE_EVENT rejection, as validation.py
    # documents; it never changes the order. Any other rejection of these valid orders is a failure.
    placements = {r.value["causation_id"] for r in collector.for_orders(run.orders, "OrderAccepted")}
    rejected = {r.value["event_id"]: r for r in collector.for_orders(run.orders, "OrderRejected")}
    real = [r.value for r in rejected.values()
            if r.value["reason"] != "DUPLICATE_EVENT" or r.value["rejected_event_id"] not in placements]
    assert real == [], "a valid order was rejected"
    raw_repeats = len(dispatched) - len(distinct)
    report(capsys, f"OrderDispatched: {len(dispatched)} records, {len(distinct)} distinct, {raw_repeats} raw repeats; "
                   f"informational DUPLICATE_EVENT rejections after the rebalance: {len(rejected)}")


def test_per_order_seq_strictly_increases_on_every_order_keyed_topic(
    run: Run, collector: Collector, capsys: pytest.CaptureFixture[str]
) -> None:
    order_keyed = {t.name for t in ORDER_KEYED}
    records = [r for r in collector.for_orders(run.orders) if r.topic in order_keyed]
    kept, repeats = without_repeats(records)
    report(capsys, f"order-keyed records: {len(records)}, same-event-id repeats dropped: {repeats}")
    assert seq_violations(kept) == []
    assert all(r.key == r.value["order_id"] for r in kept)


def test_no_station_is_double_booked(run: Run, collector: Collector, capsys: pytest.CaptureFixture[str]) -> None:
    assigned = [r for r in collector.for_orders(run.orders) if r.topic == STATIONS_QUEUE.name]
    kept, repeats = without_repeats(assigned)
    report(capsys, f"station-queue records: {len(assigned)}, same-event-id repeats dropped: {repeats}")
    partitions: dict[str, set[int]] = defaultdict(set)
    for r in kept:
        assert r.key == r.value["station_id"]
        partitions[r.key].add(r.partition)
    assert {s: p for s, p in partitions.items() if len(p) > 1} == {}, "a station's queue spans partitions"
    assert seq_violations(kept) == []  # per station: one owner numbering its assignments
    ops = Counter(r.value["op_id"] for r in kept if r.type == "OperationAssigned")
    assert [op for op, n in ops.items() if n > 1] == [], "an operation was assigned more than once"
    assert len(partitions) >= 5


def test_every_operation_planned_was_assigned(run: Run, collector: Collector) -> None:
    planned = {o["op_id"] for r in collector.for_orders(run.orders, "WorkItemPlanned") for o in r.value["operations"]}
    assigned = {r.value["op_id"] for r in collector.for_orders(run.orders, "OperationAssigned")}
    assert planned and planned == assigned


def test_timings_are_reported(run: Run, capsys: pytest.CaptureFixture[str]) -> None:
    report(capsys, f"two workers (group {run.group_during_wave_2} during wave 2): "
           + ", ".join(f"{k} {v:.1f}s" for k, v in run.seconds.items()))


def test_no_unhandled_errors_and_none_of_these_orders_dead_lettered(
    run: Run, workers: list[WorkerProcess], collector: Collector
) -> None:
    for w in workers:
        assert unhandled_errors(Path(w.log).read_text(errors="replace")) == [], w.log.name
    assert not [r for r in collector.for_orders(run.orders) if r.topic == DEAD_LETTERS.name]
