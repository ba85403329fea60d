"""The order pipeline end to end, on the real broker and registry, with real Faust workers.

A worker runs as a child process (``pieceflow worker``); the station simulator works the station
queues in this process. Orders go in through ``OrderProducer`` (confluent-kafka, murmur2, Confluent
wire format) and the outputs are read back with plain consumers.
"""

from __future__ import annotations

import io
import json
import os
import signal
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path

import fastavro
import pytest
from confluent_kafka import Producer
from confluent_kafka.schema_registry import Schema

from connectors.shopfront import build_order, cancellation
from connectors.storefront import OrderProducer
from streams.catalog import Catalog
from streams.codec import AvroRegistry
from streams.events import Event
from streams.reference import publish_catalog
from streams.schemas import load_schema
from streams.settings import Settings
from streams.stack import LocalStack
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
from tests.integration.live import SimulatorThread, metric, wait_live
from tests.integration.support import Collector, WorkerProcess, seq_violations

OUTPUTS = [ORDERS_DECISIONS, ORDERS_WORKITEMS, STATIONS_QUEUE, ORDERS_STATUS, ORDERS_DISPATCHED, ORDERS_LEADTIME,
           DEAD_LETTERS]
BOUND = 90.0
# A fresh consumer group per run, started at the topics' ends: earlier runs' history stays behind.
APP_ID = f"pieceflow-test-{uuid.uuid4().hex[:6]}"
PIPELINE_TOPICS = [t.name for t in TOPICS if not t.name.startswith("catalog.")]
WORKER_PORT = 6166


@pytest.fixture(scope="module")
def worker(
    pipeline_settings: Settings, catalog: Catalog, registry: AvroRegistry, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[WorkerProcess]:
    ensure_topics(TOPICS, pipeline_settings)
    publish_catalog(catalog, pipeline_settings, registry)
    start_group_at_end(APP_ID, PIPELINE_TOPICS, pipeline_settings)
    proc = WorkerProcess(
        pipeline_settings, tmp_path_factory.mktemp("workers"), "worker-1",
        {"PIECEFLOW_APP_ID": APP_ID, "PIECEFLOW_WEB_PORT": str(WORKER_PORT)},
    )
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def simulator(pipeline_settings: Settings, catalog: Catalog, registry: AvroRegistry) -> Iterator[SimulatorThread]:
    sim = SimulatorThread(pipeline_settings, catalog, registry, f"{APP_ID}-stations", time_scale=0.0005)
    yield sim
    sim.stop()


@pytest.fixture
def collector(pipeline_settings: Settings, registry: AvroRegistry) -> Iterator[Collector]:
    c = Collector(pipeline_settings, registry, [t.name for t in OUTPUTS])
    yield c
    c.close()


@pytest.fixture(scope="module")
def producer(pipeline_settings: Settings, registry: AvroRegistry) -> OrderProducer:
    return OrderProducer(pipeline_settings, ORDERS_INBOUND.name, registry=registry)


def place(producer: OrderProducer, value: dict[str, object], kind: str = "OrderPlaced") -> None:
    producer.send_confirmed(Event(kind, str(value["order_id"]), dict(value)), str(value["order_id"]))


def wait_for(worker: WorkerProcess, what: str, condition: object, bound: float = BOUND) -> None:
    wait_live(what, condition, bound, [worker])


def unique(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:10]}"


def test_walking_skeleton_order_placed_becomes_order_accepted(
    worker: WorkerProcess, producer: OrderProducer, collector: Collector, catalog: Catalog
) -> None:
    order = build_order(catalog, [("kung-pao-chicken", 1, [("SUBSTITUTE", "vegetable", "asparagus")])],
                        external_id=unique("skeleton"))
    place(producer, order)
    oid = order["order_id"]
    wait_for(worker, "OrderAccepted", lambda: collector.for_orders({oid}, "OrderAccepted"))
    accepted = collector.for_orders({oid}, "OrderAccepted")[0]
    assert accepted.topic == ORDERS_DECISIONS.name
    assert accepted.key == oid
    assert accepted.raw[0] == 0  # Confluent wire format: magic byte, then the registry id
    assert accepted.value["causation_id"] == order["event_id"]
    assert accepted.value["lines"][0]["customizations"][0]["value"] == "asparagus"


def test_orders_flow_to_dispatch_in_order_with_nothing_lost(
    worker: WorkerProcess, simulator: SimulatorThread, producer: OrderProducer, collector: Collector,
    catalog: Catalog,
) -> None:
    orders = []
    for i in range(12):
        lines = [("kung-pao-chicken", 1 + i % 2, [("SELECT", "spice", "extra-spicy")]), ("spring-rolls", 1, [])]
        delivery = {"method": "DELIVERY", "address": {"neighbourhood": ["north", "south", "centre"][i % 3],
                                                      "postcode": None, "line1": "1 Main St", "city": None}}
        orders.append(build_order(catalog, lines, external_id=unique("flow"), delivery=delivery,
                                  priority="RUSH" if i % 5 == 0 else "STANDARD"))
    for order in orders:
        place(producer, order)
    ids = {o["order_id"] for o in orders}
    # OrderDispatched and OrderLeadTime leave together but on two topics: wait until both are read back.
    wait_for(worker, "every order dispatched, with its lead time",
             lambda: all({r.key for r in collector.for_orders(ids, kind)} == ids
                         for kind in ("OrderDispatched", "OrderLeadTime")), bound=120)

    dispatched = collector.for_orders(ids, "OrderDispatched")
    assert len(dispatched) == len(ids), "an order was dispatched twice"
    for order in orders:
        oid = order["order_id"]
        units = sum(line["quantity"] for line in order["lines"])
        planned = collector.for_orders({oid}, "WorkItemPlanned")
        assert len(planned) == units
        lead = collector.for_orders({oid}, "OrderLeadTime")
        assert len(lead) == 1
        parts = lead[0].value
        assert parts["lead_time_ms"] == parts["intake_ms"] + parts["queue_ms"] + parts["work_ms"] + parts["dispatch_ms"]
        courier = collector.for_orders({oid}, "OrderDispatched")[0].value
        assert courier["carrier_id"].startswith("bike-")
    # Per-order ordering on every order-keyed output topic.
    order_keyed = [r for r in collector.for_orders(ids) if r.topic != STATIONS_QUEUE.name]
    assert seq_violations(order_keyed) == []
    # Per-station ordering on the station queues.
    assert seq_violations([r for r in collector.for_orders(ids) if r.topic == STATIONS_QUEUE.name]) == []
    assert not collector.where(topic=DEAD_LETTERS.name, key=next(iter(ids)))


def test_invalid_orders_are_rejected_with_typed_reasons(
    worker: WorkerProcess, producer: OrderProducer, collector: Collector, catalog: Catalog
) -> None:
    unknown = build_order(catalog, [("no-such-dish", 1, [])], external_id=unique("bad-sku"))
    too_many = build_order(catalog, [("spring-rolls", 99, [])], external_id=unique("too-many"))
    no_address = build_order(catalog, [("mapo-tofu", 1, [])], external_id=unique("no-address"),
                             delivery={"method": "DELIVERY", "address": None})
    wrong_price = build_order(catalog, [("mapo-tofu", 1, [])], external_id=unique("price"))
    wrong_price["total"] = wrong_price["total"] + 5
    wrong_price["lines"][0]["unit_price"] = wrong_price["lines"][0]["unit_price"] + 5
    bad_option = build_order(catalog, [("mapo-tofu", 1, [("SELECT", "sauce", "ketchup")])], external_id=unique("opt"))
    expected = {
        unknown["order_id"]: "UNKNOWN_SKU",
        too_many["order_id"]: "QUANTITY_OUT_OF_RANGE",
        no_address["order_id"]: "MISSING_ADDRESS",
        wrong_price["order_id"]: "PRICE_MISMATCH",
        bad_option["order_id"]: "OPTION_NOT_ALLOWED",
    }
    for order in (unknown, too_many, no_address, wrong_price, bad_option):
        place(producer, order)
    good = build_order(catalog, [("egg-fried-rice", 1, [])], external_id=unique("dup"))
    place(producer, good)
    place(producer, good)  # the same event again: a duplicate event id
    expected_dup = good["order_id"]
    wait_for(worker, "all rejections",
             lambda: len(collector.for_orders(set(expected) | {expected_dup}, "OrderRejected")) == len(expected) + 1)
    reasons = {r.key: r.value["reason"] for r in collector.for_orders(set(expected), "OrderRejected")}
    assert reasons == expected
    dup = collector.for_orders({expected_dup}, "OrderRejected")
    assert [r.value["reason"] for r in dup] == ["DUPLICATE_EVENT"]
    assert len(collector.for_orders({expected_dup}, "OrderAccepted")) == 1


def test_undecodable_bytes_go_to_the_dead_letter_topic_and_the_worker_goes_on(
    worker: WorkerProcess, producer: OrderProducer, collector: Collector, catalog: Catalog,
    pipeline_settings: Settings,
) -> None:
    key = unique("garbage")
    raw = Producer({"bootstrap.servers": pipeline_settings.kafka_bootstrap, "partitioner": "murmur2_random"})
    raw.produce(ORDERS_INBOUND.name, key=key.encode(), value=b"\x07not avro at all")
    assert raw.flush(10) == 0
    after = build_order(catalog, [("spring-rolls", 1, [])], external_id=unique("after-garbage"))
    place(producer, after)
    wait_for(worker, "the dead letter", lambda: collector.where(topic=DEAD_LETTERS.name, key=key))
    letter = collector.where(topic=DEAD_LETTERS.name, key=key)[0]
    assert letter.raw == b"\x07not avro at all"
    assert letter.headers["dlq.reason"] == b"undecodable"
    assert letter.headers["dlq.stage"] == b"validation"
    assert letter.headers["dlq.original.topic"] == ORDERS_INBOUND.name.encode()
    assert letter.headers["dlq.original.key"] == key.encode()
    assert int(letter.headers["dlq.original.offset"]) >= 0
    assert b"magic byte" in letter.headers["dlq.error"]
    wait_for(worker, "the next order accepted",
             lambda: collector.for_orders({after["order_id"]}, "OrderAccepted"))


def test_cancelled_order_is_never_dispatched(
    worker: WorkerProcess, producer: OrderProducer, collector: Collector, catalog: Catalog
) -> None:
    order = build_order(catalog, [("mapo-tofu", 1, [])], external_id=unique("cancel"))
    place(producer, order)
    place(producer, cancellation(order), kind="OrderCancelled")
    oid = order["order_id"]
    wait_for(worker, "the cancellation",
             lambda: collector.for_orders({oid}, "OrderCancellationAccepted"))
    wait_for(worker, "a CANCELLED status",
             lambda: any(r.value["state"] == "CANCELLED" for r in collector.for_orders({oid}, "OrderStatus")))
    assert not collector.for_orders({oid}, "OrderDispatched")


def test_worker_log_shows_no_unhandled_errors(worker: WorkerProcess) -> None:
    text = Path(worker.log).read_text(errors="replace")
    assert "Traceback" not in text.replace("dead-lettering", ""), worker.tail()


def test_a_hung_registry_delays_an_order_but_never_dead_letters_it(
    worker: WorkerProcess, collector: Collector, catalog: Catalog, pipeline_settings: Settings,
    registry: AvroRegistry, stack: LocalStack, producer: OrderProducer,
) -> None:
    """The registry is frozen (SIGSTOP, like a hung JVM) while the worker meets a schema id it has not
    read before: the worker waits and retries, then accepts the order once the registry answers."""
    # First a worker that is up and has read today's schemas: one ordinary order all the way to accepted.
    warm = build_order(catalog, [("spring-rolls", 1, [])], external_id=unique("warm"))
    place(producer, warm)
    wait_for(worker, "an ordinary order accepted before the outage",
             lambda: collector.for_orders({str(warm["order_id"])}, "OrderAccepted"))
    # A writer schema the worker has never fetched: today's OrderPlaced plus one optional field.
    probe = load_schema("OrderPlaced")
    probe["fields"] = [*probe["fields"], {"name": "outage_probe", "type": ["null", "string"], "default": None,
                                          "doc": "Test-only field that gives this writer schema its own id."}]
    schema_id = registry.client.register_schema(f"pieceflow-test-outage-{uuid.uuid4().hex[:8]}",
                                                Schema(json.dumps(probe), "AVRO"))
    order = build_order(catalog, [("spring-rolls", 1, [])], external_id=unique("outage"))
    body = io.BytesIO()
    body.write(struct.pack(">bI", 0, schema_id))
    fastavro.schemaless_writer(body, fastavro.parse_schema(probe), {**order, "outage_probe": "hello"})
    oid = str(order["order_id"])
    retries = {"stage": "validation"}
    before = metric(WORKER_PORT, "pieceflow_registry_retries_total", retries) or 0.0
    received = metric(WORKER_PORT, "pieceflow_stage_events_in_total", retries) or 0.0
    pid = stack.pid("registry")
    assert pid is not None, "the registry of the local stack is not running"
    os.kill(pid, signal.SIGSTOP)
    try:
        raw = Producer({"bootstrap.servers": pipeline_settings.kafka_bootstrap, "partitioner": "murmur2_random"})
        raw.produce(ORDERS_INBOUND.name, key=oid.encode(), value=body.getvalue())
        assert raw.flush(10) == 0
        # The record reaches the agent at once: Faust's decoding on the event loop does not wait for the
        # registry (that would stall every partition of the worker), the agent's lookup in a thread does.
        wait_for(worker, "the record reaching the validation agent while the registry is frozen",
                 lambda: (metric(WORKER_PORT, "pieceflow_stage_events_in_total", retries) or 0.0) > received,
                 bound=20)
        # One lookup against the frozen registry takes about 46 s (the client's own 4 attempts of 10 s).
        wait_for(worker, "the worker retrying against the frozen registry",
                 lambda: (metric(WORKER_PORT, "pieceflow_registry_retries_total", retries) or 0.0) > before,
                 bound=150)
        assert not collector.for_orders({oid}, "OrderAccepted")
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_for(worker, "the order accepted once the registry answers",
             lambda: collector.for_orders({oid}, "OrderAccepted"))
    assert not collector.where(topic=DEAD_LETTERS.name, key=oid)
