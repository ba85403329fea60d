"""The ERP sink against the real broker, registry and PostgreSQL.

Orders are run through the real stage functions in memory (tests/unit/conftest.Pipeline) and every
event the sink reads is produced to the real topics. Each test uses its own order ids and its own
consumer group, which starts at the end offsets captured before producing.

The shared stack may also carry other processes' events for these orders, for example a pipeline
worker of another test re-emitting them. So the expected database state is computed from what is
actually on the topics: the records of these orders are read back from the captured offsets and
replayed through the sink's pure mapping under the sequence rule. An exactly-once effect means
that every row's ``applied`` counter, and every ledger entry, equals that replay. Nothing may be
missing, nothing may be doubled, and there may be no extra rows.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from psycopg import sql

from connectors.erp.localdb import LocalPostgres
from connectors.erp.rows import TOPICS, change_for
from connectors.erp.sink import ErpSink
from connectors.shopfront import Line
from streams.catalog import Catalog, load_catalog_yaml
from streams.codec import AvroRegistry, DecodeError
from streams.settings import Settings
from streams.topics import ensure_topics
from streams.topology import (
    ORDERS_DECISIONS,
    ORDERS_DISPATCHED,
    ORDERS_LEADTIME,
    ORDERS_OPERATIONS,
    ORDERS_STATUS,
    ORDERS_WORKITEMS,
    STATIONS_QUEUE,
)
from streams.topology import TOPICS as ALL_TOPICS
from tests.conftest import wait_until
from tests.unit.conftest import CATALOGS, T0, Pipeline, _order

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
S = timedelta(seconds=1)
SINK_SPECS = (
    ORDERS_DECISIONS, ORDERS_WORKITEMS, STATIONS_QUEUE, ORDERS_OPERATIONS, ORDERS_STATUS, ORDERS_DISPATCHED,
    ORDERS_LEADTIME,
)  # fmt: skip
TOPIC_OF = {record: spec.name for spec in SINK_SPECS for record in spec.values}
ROW_KEYS = {
    "orders": "order_id",
    "order_rejections": "event_id",
    "work_items": "work_item_id",
    "operations": "op_id",
    "dispatches": "order_id",
    "lead_times": "order_id",
}
NORTH = {"method": "DELIVERY", "address": {"neighbourhood": "north", "postcode": None, "line1": None, "city": None}}
CONVERGE_S = 120.0


# ---- pipeline-shaped events ---------------------------------------------------------------------


@dataclass(frozen=True)
class Out:
    topic: str
    key: str
    record: str
    value: dict[str, Any]


@dataclass
class Scenario:
    order_ids: list[str]
    events: dict[str, list[Out]] = field(default_factory=dict)  # per order, in the order written

    def all(self) -> list[Out]:
        return [e for oid in self.order_ids for e in self.events[oid]]

    def split(self, share: float) -> tuple[list[Out], list[Out]]:
        """The first ``share`` of every order's events, then the rest: each stream keeps its order."""
        head: list[Out] = []
        tail: list[Out] = []
        for oid in self.order_ids:
            cut = int(len(self.events[oid]) * share)
            head += self.events[oid][:cut]
            tail += self.events[oid][cut:]
        return head, tail


def scenario(catalog: Catalog, orders: int, *, rejected: int = 0, fail_first: bool = True) -> Scenario:
    """``orders`` orders worked to dispatch (the first one with a failed operation that is redone),
    plus ``rejected`` placements refused for an unknown sku. Station events go to the order-keyed
    operations topic the way the reroute agent writes them."""
    tag = uuid.uuid4().hex[:10]
    pipe = Pipeline(catalog)
    t = T0
    order_ids: list[str] = []
    for i in range(orders + rejected):
        lines: list[Line] = (
            [("kung-pao-chicken", 1, []), ("egg-fried-rice", 2, [])] if i < orders else [("no-such-dish", 1, [])]
        )
        order = _order(catalog, lines, external_id=f"erp-{tag}-{i}", delivery=NORTH, at=t)
        order_ids.append(order["order_id"])
        pipe.send("OrderPlaced", order, t)
        done: set[str] = set()
        failed = not (fail_first and i == 0)
        while True:
            assigned = [
                e.value for e in pipe.log if e.type == "OperationAssigned" and e.value["order_id"] == order["order_id"]
            ]
            todo = list(dict.fromkeys(a["op_id"] for a in assigned if a["op_id"] not in done))
            if not todo:
                break
            for op in todo:
                t += S
                pipe.mes("OperationStarted", op, t)
                if not failed:
                    failed = True
                    pipe.mes("OperationFailed", op, t, t + S)
                else:
                    pipe.mes("OperationCompleted", op, t, t + 2 * S)
                    done.add(op)
                t += 2 * S
    result = Scenario(order_ids, {oid: [] for oid in order_ids})
    produced = [(e.type, e.value) for e in pipe.log] + list(pipe.inputs)
    for record, value in produced:
        if record in TOPIC_OF:
            topic = TOPIC_OF[record]
            key = value["station_id"] if topic == STATIONS_QUEUE.name else value["order_id"]
            result.events[value["order_id"]].append(Out(topic, key, record, value))
    return result


def produce(
    settings: Settings, registry: AvroRegistry, events: list[Out], raw: Sequence[tuple[str, bytes]] = ()
) -> None:
    """Write ``events`` (and ``raw`` undecodable values) with the pipeline's partitioner; wait for every ack."""
    producer = Producer(
        {
            "bootstrap.servers": settings.kafka_bootstrap,
            "partitioner": "murmur2_random",
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 5,
        }
    )
    errors: list[Any] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            errors.append(err)

    for e in events:
        value = registry.encode(e.topic, e.record, e.value)
        producer.produce(e.topic, key=e.key.encode(), value=value, on_delivery=delivered)
        producer.poll(0)
    for topic, value in raw:
        producer.produce(topic, key=b"garbage", value=value, on_delivery=delivered)
    assert producer.flush(30) == 0 and errors == []


# ---- consumer groups, read-back and the expected state ------------------------------------------


def end_offsets(settings: Settings) -> list[TopicPartition]:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"erp-probe-{uuid.uuid4().hex}"})
    try:
        ends = []
        for topic in TOPICS:
            for p in consumer.list_topics(topic, timeout=10).topics[topic].partitions:
                ends.append(TopicPartition(topic, p, consumer.get_watermark_offsets(TopicPartition(topic, p), 10)[1]))
        return ends
    finally:
        consumer.close()


def start_group_at(settings: Settings, group: str, offsets: list[TopicPartition]) -> None:
    consumer = Consumer({"bootstrap.servers": settings.kafka_bootstrap, "group.id": group, "enable.auto.commit": False})

    def commit() -> bool:
        try:
            consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException:
            return False
        return True

    try:
        wait_until(commit, 60, f"consumer group {group} to start at the captured offsets", interval=1.0)
    finally:
        consumer.close()


class Readback:
    """The records of some orders on the sink's topics, from given offsets, read incrementally."""

    def __init__(self, settings: Settings, registry: AvroRegistry, starts: list[TopicPartition], orders: set[str]):
        self.registry = registry
        self.orders = orders
        self.consumer = Consumer(
            {"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"erp-readback-{uuid.uuid4().hex}",
             "enable.auto.commit": False, "isolation.level": "read_committed"}
        )  # fmt: skip
        self.consumer.assign(starts)
        self.position = {(tp.topic, tp.partition): tp.offset for tp in starts}
        self.records: list[tuple[str, int, int, str, dict[str, Any]]] = []

    def refresh(self) -> None:
        """Read up to the high watermarks of now."""
        targets = {tp: self.consumer.get_watermark_offsets(TopicPartition(*tp), timeout=10)[1] for tp in self.position}
        deadline = time.monotonic() + 30
        while any(self.position[tp] < high for tp, high in targets.items()):
            if time.monotonic() > deadline:
                pytest.fail("read-back of the sink topics did not reach the end offsets in 30s")
            for m in self.consumer.consume(500, 0.5):
                if m.error() is not None:
                    continue
                topic, partition, offset = m.topic() or "", m.partition() or 0, m.offset() or 0
                self.position[(topic, partition)] = max(self.position[(topic, partition)], offset + 1)
                try:
                    decoded = self.registry.decode(m.value() or b"")
                except DecodeError:
                    continue
                if decoded.value.get("order_id") in self.orders:
                    self.records.append((topic, partition, offset, decoded.type, decoded.value))

    def event_ids(self) -> set[str]:
        return {r[4]["event_id"] for r in self.records}

    def close(self) -> None:
        self.consumer.close()


@dataclass
class State:
    rows: Counter[tuple[str, str]]
    ledger: Counter[tuple[str, str]]

    def diff(self, other: State) -> str:
        lines = []
        for name, mine, theirs in (("rows", self.rows, other.rows), ("ledger", self.ledger, other.ledger)):
            for key in sorted(set(mine) | set(theirs)):
                if mine[key] != theirs[key]:
                    lines.append(f"{name} {key}: database {mine[key]}, expected {theirs[key]}")
        return "\n".join(lines[:20]) + (f"\n... {len(lines) - 20} more" if len(lines) > 20 else "")


def expected_state(records: list[tuple[str, int, int, str, dict[str, Any]]]) -> State:
    """Replay the read-back records through the sink's mapping under the sequence rule."""
    last: dict[tuple[str, str], int] = {}
    state = State(Counter(), Counter())
    for topic, _p, _o, record, value in sorted(records, key=lambda r: (r[0], r[1], r[2])):
        change = change_for(topic, record, value)
        stream = (change.order_id, change.stream)
        if stream in last and change.seq <= last[stream]:
            continue
        last[stream] = change.seq
        state.ledger[stream] += 1
        for upsert in change.upserts:
            state.rows[(upsert.table, str(upsert.values[upsert.key[0]]))] += 1
    return state


def database_state(url: str, orders: set[str]) -> State:
    state = State(Counter(), Counter())
    with psycopg.connect(url, connect_timeout=5) as conn:
        for table, key in ROW_KEYS.items():
            query = sql.SQL("SELECT {}, applied FROM {} WHERE order_id = ANY(%s)").format(
                sql.Identifier(key), sql.Identifier(table)
            )
            for k, applied in conn.execute(query, (list(orders),)):
                state.rows[(table, str(k))] = applied
        for order_id, stream, applied in conn.execute(
            "SELECT order_id, stream, applied FROM event_positions WHERE order_id = ANY(%s)", (list(orders),)
        ):
            state.ledger[(order_id, stream)] = applied
    return state


def applied_so_far(url: str, orders: set[str]) -> int:
    try:
        with psycopg.connect(url, connect_timeout=2) as conn:
            row = conn.execute(
                "SELECT coalesce(sum(applied), 0) FROM event_positions WHERE order_id = ANY(%s)", (list(orders),)
            ).fetchone()
    except psycopg.OperationalError:
        return 0
    return int(row[0]) if row else 0


def converge(url: str, readback: Readback, produced: list[Out], timeout: float = CONVERGE_S) -> State:
    """Wait until the tables equal the replay of what is on the topics, and return that state."""
    orders = readback.orders
    last: dict[str, State] = {}

    def settled() -> bool:
        readback.refresh()
        if not {e.value["event_id"] for e in produced} <= readback.event_ids():
            return False
        expected = expected_state(readback.records)
        try:
            actual = database_state(url, orders)
        except psycopg.OperationalError:
            return False
        last["expected"], last["actual"] = expected, actual
        return actual == expected

    try:
        wait_until(settled, timeout, "the ERP tables to equal the events on the topics", interval=0.25)
    except pytest.fail.Exception:
        if "actual" in last:
            pytest.fail(f"the ERP tables differ from the topics:\n{last['actual'].diff(last['expected'])}")
        raise
    return last["expected"]


# ---- running the sink ---------------------------------------------------------------------------


class SinkThread:
    def __init__(self, sink: ErpSink) -> None:
        self.sink = sink
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.sink.run(self.stop)
        except BaseException as exc:
            self.error = exc

    def join(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


class SinkProcess:
    """``python -m streams sink erp`` as a child process, its output in a file."""

    def __init__(self, tmp_path: Path, name: str, group: str, port: int) -> None:
        self.log = tmp_path / f"{name}.log"
        self.port = port
        env = {**os.environ, "PIECEFLOW_SINK_METRICS_PORT": str(port), "PYTHONUNBUFFERED": "1"}
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "streams", "sink", "erp", "--group", group, "--instance-id", f"{group}-0"],
                stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO,
            )  # fmt: skip

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self) -> int:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
            try:
                return self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode


def metric(port: int, sample: str) -> float | None:
    """One sample of the sink's /metrics, e.g. ``pieceflow_sink_events_total{outcome="applied"}``."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
            text = response.read().decode()
    except OSError:
        return None
    found = [line.split()[-1] for line in text.splitlines() if line.startswith(sample + " ")]
    return float(found[0]) if found else None


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def restaurant() -> Catalog:
    return load_catalog_yaml(CATALOGS / "restaurant.yaml")


@pytest.fixture(scope="module")
def registry(registry_url: str) -> AvroRegistry:
    return AvroRegistry.from_url(registry_url)


@dataclass
class Run:
    settings: Settings
    registry: AvroRegistry
    group: str
    starts: list[TopicPartition]
    url: str

    def readback(self, order_ids: list[str]) -> Readback:
        return Readback(self.settings, self.registry, self.starts, set(order_ids))


@pytest.fixture
def run(settings: Settings, registry: AvroRegistry, bootstrap: str, postgres: LocalPostgres) -> Iterator[Run]:
    """A fresh consumer group that starts at the current end of the sink's topics."""
    ensure_topics(ALL_TOPICS, settings)
    group = f"erp-test-{uuid.uuid4().hex[:10]}"
    starts = end_offsets(settings)
    start_group_at(settings, group, starts)
    yield Run(settings, registry, group, starts, settings.database_url)


# ---- tests --------------------------------------------------------------------------------------


def test_pipeline_events_become_erp_rows_and_a_full_replay_changes_nothing(run: Run, restaurant: Catalog) -> None:
    plan = scenario(restaurant, orders=3, rejected=1)
    produce(run.settings, run.registry, plan.all(), raw=[(ORDERS_DECISIONS.name, b"\x00\x00\x00\xff\xffnot avro")])
    readback = run.readback(plan.order_ids)
    first = SinkThread(ErpSink(run.settings, group_id=run.group, registry=run.registry, batch_size=50))
    try:
        converge(run.url, readback, plan.all())
    finally:
        first.join()
    assert first.error is None
    assert first.sink.totals.outcomes["undecodable"] >= 1  # counted, skipped, and the sink went on

    redone, other, rejected = plan.order_ids[0], plan.order_ids[1], plan.order_ids[3]
    sent = {e.record: e.value for e in plan.events[redone] if e.record in ("OrderAccepted", "OrderDispatched")}
    with psycopg.connect(run.url) as conn:
        decision, state, total, items_done = conn.execute(
            "SELECT decision, state, total, items_done FROM orders WHERE order_id = %s", (redone,)
        ).fetchone() or (None, None, None, None)
        assert (decision, state, total, items_done) == ("ACCEPTED", "DISPATCHED", sent["OrderAccepted"]["total"], 3)
        statuses: dict[str, int] = dict(conn.execute(
            "SELECT status, count(*) FROM operations WHERE order_id = %s GROUP BY status", (redone,)
        ).fetchall())  # fmt: skip
        planned = sum(len(e.value["operations"]) for e in plan.events[redone] if e.record == "WorkItemPlanned")
        assert statuses == {"COMPLETED": planned}
        lead, carrier = conn.execute(
            "SELECT d.lead_time_ms, d.carrier_id FROM dispatches d JOIN lead_times l USING (order_id)"
            " WHERE order_id = %s AND l.lead_time_ms = d.lead_time_ms", (redone,)
        ).fetchone() or (None, None)  # fmt: skip
        assert (lead, carrier) == (sent["OrderDispatched"]["lead_time_ms"], "bike-north")
        retried = conn.execute(
            "SELECT failures, attempt, status FROM operations WHERE order_id = %s AND failures > 0", (redone,)
        ).fetchall()
        assert retried == [(1, 2, "COMPLETED")]
        assert conn.execute("SELECT count(*) FROM work_items WHERE order_id = %s", (other,)).fetchone() == (3,)
        assert conn.execute(
            "SELECT o.decision, r.reason FROM orders o JOIN order_rejections r USING (order_id) WHERE order_id = %s",
            (rejected,),
        ).fetchall() == [("REJECTED", "UNKNOWN_SKU")]
    before = database_state(run.url, set(plan.order_ids))

    # The same records again, from the start: every one is a duplicate for the ledger.
    replay_group = f"{run.group}-replay"
    start_group_at(run.settings, replay_group, run.starts)
    again = SinkThread(ErpSink(run.settings, group_id=replay_group, registry=run.registry))
    try:
        wait_until(
            lambda: again.sink.totals.outcomes["duplicate"] >= len(plan.all()), CONVERGE_S, "the replay to be read"
        )
    finally:
        again.join()
    assert again.error is None
    assert database_state(run.url, set(plan.order_ids)) == before


def test_a_registry_outage_rewinds_and_replays_instead_of_skipping(run: Run, restaurant: Catalog) -> None:
    plan = scenario(restaurant, orders=2, fail_first=False)
    produce(run.settings, run.registry, plan.all())
    readback = run.readback(plan.order_ids)
    # Nothing listens on port 1: every schema lookup fails the way an unreachable registry does.
    sink = ErpSink(run.settings, group_id=run.group, registry=AvroRegistry.from_url("http://127.0.0.1:1"))
    running = SinkThread(sink)
    try:
        wait_until(lambda: sink.consecutive_failures >= 1, 60, "the sink to roll back a batch it could not decode")
        assert sink.totals.outcomes["undecodable"] == 0 and sink.totals.outcomes["applied"] == 0
        sink.registry = run.registry  # the registry is back
        converge(run.url, readback, plan.all())
    finally:
        running.join()
    assert running.error is None
    assert sink.totals.outcomes["undecodable"] == 0


class Crash(Exception):
    pass


class CrashBeforeOffsetCommit(ErpSink):
    """Dies on its third offset commit: the database has the batch, Kafka never hears of it."""

    commits = 0

    def _commit(self, consumer: Any, records: Any) -> None:
        self.commits += 1
        if self.commits == 3:
            raise Crash("killed between the database commit and the offset commit")
        super()._commit(consumer, records)


def test_a_crash_between_database_commit_and_offset_commit_replays_as_duplicates(run: Run, restaurant: Catalog) -> None:
    plan = scenario(restaurant, orders=3, fail_first=False)
    produce(run.settings, run.registry, plan.all())
    readback = run.readback(plan.order_ids)
    crashing = SinkThread(
        CrashBeforeOffsetCommit(run.settings, group_id=run.group, registry=run.registry, batch_size=20)
    )
    crashing.thread.join(CONVERGE_S)
    assert isinstance(crashing.error, Crash)

    restarted = SinkThread(ErpSink(run.settings, group_id=run.group, registry=run.registry, batch_size=20))
    try:
        converge(run.url, readback, plan.all())
    finally:
        restarted.join()
    assert restarted.error is None
    assert restarted.sink.totals.outcomes["duplicate"] >= 1  # the uncommitted batch came back and was skipped


def test_exactly_once_through_a_sigkill_of_the_sink(run: Run, restaurant: Catalog, tmp_path: Path) -> None:
    plan = scenario(restaurant, orders=12)
    before_kill, after_kill = plan.split(0.6)
    orders = set(plan.order_ids)
    readback = run.readback(plan.order_ids)

    first = SinkProcess(tmp_path, "sink-1", run.group, free_port())
    try:
        produce(run.settings, run.registry, before_kill)
        wait_until(lambda: applied_so_far(run.url, orders) >= len(before_kill) // 4, 90, "the sink to apply events")
        first.kill()  # mid-stream: no chance to finish the batch, commit offsets or leave the group
    finally:
        first.terminate()
    assert first.proc.returncode == -signal.SIGKILL, first.text()

    produce(run.settings, run.registry, after_kill)
    second = SinkProcess(tmp_path, "sink-2", run.group, free_port())
    try:
        converge(run.url, readback, plan.all())
        applied = wait_until(
            lambda: metric(second.port, 'pieceflow_sink_events_total{outcome="applied"}'), 30, "sink metrics"
        )
        assert applied > 0
    finally:
        code = second.terminate()
    assert code == 0, second.text()
    assert "ERP sink stopped" in second.text()


def test_exactly_once_through_a_postgres_stop_and_restart(
    run: Run, restaurant: Catalog, postgres: LocalPostgres, tmp_path: Path
) -> None:
    plan = scenario(restaurant, orders=12)
    first_part, rest = plan.split(0.4)
    while_down, during_restart = rest[: len(rest) // 2], rest[len(rest) // 2 :]
    orders = set(plan.order_ids)
    readback = run.readback(plan.order_ids)

    sink = SinkProcess(tmp_path, "sink", run.group, free_port())
    try:
        produce(run.settings, run.registry, first_part)
        wait_until(lambda: applied_so_far(run.url, orders) >= len(first_part) // 4, 90, "the sink to apply events")

        postgres.stop()
        try:
            produce(run.settings, run.registry, while_down)
            wait_until(lambda: "database unavailable" in sink.text(), 60, "the sink to retry the connection")
            assert sink.alive(), sink.text()
        finally:
            postgres.start()
        wait_until(lambda: "database connection re-established" in sink.text(), 60, "the sink to reconnect")

        # A fast restart while records are flowing in.
        producer = threading.Thread(target=produce, args=(run.settings, run.registry, during_restart))
        producer.start()
        postgres.restart()
        producer.join(60)

        converge(run.url, readback, plan.all())
        assert sink.alive(), sink.text()
    finally:
        postgres.start()  # whatever happened, later tests need it
        code = sink.terminate()
    assert code == 0, sink.text()
    assert "rolled back" in sink.text()
