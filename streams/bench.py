"""``pieceflow bench``: open-loop, fixed-rate load through the real pipeline, with latency from intended times.

How a run goes (see ``run_bench``):

1. The local stack is started if needed, the topics exist, the restaurant catalog is (re)published.
2. Workers start as child processes (``python -m streams worker``, or ``python -m streams.null_topology``
   for ``--null``) under a fresh ``PIECEFLOW_APP_ID``; its consumer group is given committed offsets
   at the topics' current ends first, so the workers never replay the topics' history. An instant
   station simulator (``time_scale=0``) runs as a child process too, with its own fresh group.
3. Warm-up check: the group is stable with every worker in it, and probe orders come out dispatched.
4. Orders are built and Avro-encoded before the clock starts (``random_order`` with a fixed seed).
   The generator sends order *i* at its intended time ``t0 + i / rate`` on ``time.perf_counter_ns``
   (sleep until just before, then spin), and records how late each send was in a histogram of its own.
   The first ``warmup * rate`` orders are sent but not measured.
5. A receiver thread reads ``stations.queue.v1`` and the order-keyed outputs with a plain consumer,
   assigned at end offsets captured before the run, and stamps each record at receipt with the same
   clock: latency = receipt - intended send time, into HdrHistograms (µs, 3 significant digits).
6. After the last send the run drains (bounded), then reports counts, latencies, throughput and CPU.

By default the bench runs on a private one-node stack of its own (the shared stack's jars, its own
data, ports + 2000), started for the run and purged after it. The topic names are fixed, so on the
shared stack (``--shared-stack``) every other pipeline app would also process the bench's orders (and
its workers theirs), skewing both, and every app id that starts later would replay the bench's
thousands of orders. ``--shared-stack`` is still there for a quick look; the report then names other
consumer groups that were live on the pipeline topics (``foreign_consumers``) and counts records on
``orders.inbound.v1`` that the bench did not send (``foreign_inbound``). ``--null`` always runs
private: its pass-through records would be dead-lettered by any real agent that read them.
``--null --workers 0`` is the floor: no hop at all, the orders go straight to ``stations.queue.v1``,
so it measures one Kafka leg (producer, broker, consumer) with the same clients and clock.

Everything the bench started is stopped and its Faust-internal topics and groups are deleted; the
shared stack is left running.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import platform
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewPartitions
from hdrh.histogram import HdrHistogram  # type: ignore[import-untyped]

from connectors.shopfront import random_order
from connectors.storefront import cloudevent_headers
from streams.catalog import Catalog, load_catalog_yaml
from streams.codec import AvroRegistry
from streams.events import Event
from streams.producer_config import PRODUCER_DEFAULTS
from streams.readback import assign_at_end
from streams.resources import resource_dir
from streams.settings import Settings
from streams.stack import LocalStack
from streams.topics import TopicSpec, ensure_internal_topics, ensure_topics, start_group_at_end

INBOUND = "orders.inbound.v1"
DECISIONS = "orders.decisions.v1"
WORKITEMS = "orders.workitems.v1"
QUEUE = "stations.queue.v1"
DISPATCHED = "orders.dispatched.v1"
LEADTIME = "orders.leadtime.v1"
ORDER_KEYED = (DECISIONS, WORKITEMS, DISPATCHED, LEADTIME)
CATALOG_TOPICS = ("catalog.products.v1", "catalog.stations.v1")

HIST_MAX_US = 600_000_000  # 10 minutes, in µs
SWEEP_RATES = (250, 500, 1000, 1500, 2000, 2500, 3000, 4000)
SPIN_NS = 120_000  # sleep until this close to the intended time, then spin (GIL held at most this long)
SOURCE = "bench"

Echo = Callable[[str], None]


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class BenchOptions:
    rate: float = 200.0
    duration: float = 10.0
    warmup: float = 3.0
    workers: int = 1
    partitions: int | None = None
    grow_partitions: bool = False
    null: bool = False
    sweep: bool = False
    sweep_rates: tuple[float, ...] = SWEEP_RATES
    slo_ms: float = 25.0
    drain_timeout: float = 30.0
    seed: int = 7
    catalog: str = "restaurant"
    ready_timeout: float = 120.0
    private_stack: bool = True


# ---- histograms -----------------------------------------------------------------------------------


def new_histogram() -> HdrHistogram:
    return HdrHistogram(1, HIST_MAX_US, 3)


def record_us(hist: HdrHistogram, nanoseconds: int) -> None:
    hist.record_value(min(HIST_MAX_US, max(1, nanoseconds // 1000)))


def summarize(hist: HdrHistogram) -> dict[str, Any]:
    """p50/p90/p99/p99.9/max in milliseconds, plus the encoded histogram (µs) for merging later."""
    count = hist.get_total_count()
    if count == 0:
        return {"count": 0, "p50": None, "p90": None, "p99": None, "p99_9": None, "max": None, "mean": None}
    ms = {q: round(hist.get_value_at_percentile(p) / 1000, 3) for q, p in
          (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99_9", 99.9))}
    encoded = hist.encode()
    return {
        "count": count,
        **ms,
        "max": round(hist.get_max_value() / 1000, 3),
        "mean": round(hist.get_mean_value() / 1000, 3),
        "hdr_us": encoded.decode() if isinstance(encoded, bytes) else encoded,
    }


# ---- reading outputs ------------------------------------------------------------------------------


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    """An Avro long (zig-zag varint) at ``pos``: (value, next position)."""
    byte = data[pos]
    raw, shift, pos = byte & 0x7F, 7, pos + 1
    while byte & 0x80:
        byte = data[pos]
        raw |= (byte & 0x7F) << shift
        shift, pos = shift + 7, pos + 1
    return (raw >> 1) ^ -(raw & 1), pos


def envelope_prefix(data: bytes) -> tuple[int, str, int] | None:
    """(schema id, order id, seq) from a Confluent-framed record that starts event_id, order_id, seq.

    Every pipeline record starts with that envelope, so the receiver reads three fields instead of
    decoding whole records: it must stay cheap next to the pipeline it measures.
    """
    if len(data) < 6 or data[0] != 0:
        return None
    schema_id = int.from_bytes(data[1:5], "big")
    try:
        length, pos = _varint(data, 5)
        length, pos = _varint(data, pos + length)
        order_id = data[pos : pos + length].decode()
        seq, _ = _varint(data, pos + length)
    except (IndexError, UnicodeDecodeError):
        return None
    return schema_id, order_id, seq


@dataclass
class Tracked:
    """What the receiver knows about one order the bench sent."""

    intended_ns: int
    measured: bool


@dataclass
class Observations:
    """Everything the receiver saw for one step; written by the receiver thread only."""

    null: bool
    assigned_at: dict[str, int] = field(default_factory=dict)
    dispatched: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    last_dispatch_ns: int = 0
    last_assign_ns: int = 0
    rejected: set[str] = field(default_factory=set)
    to_assigned: HdrHistogram = field(default_factory=new_histogram)
    to_dispatched: HdrHistogram = field(default_factory=new_histogram)
    last_seq: dict[tuple[str, str], int] = field(default_factory=dict)
    out_of_order: int = 0
    repeated_seq: int = 0
    records: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    examples: list[str] = field(default_factory=list)


class Receiver:
    """A plain consumer (no group) from end offsets captured at construction, stamping records at receipt."""

    def __init__(self, settings: Settings, registry: AvroRegistry, orders: dict[str, Tracked], null: bool) -> None:
        self.registry = registry
        self.orders = orders
        self.seen = Observations(null)
        self._names: dict[int, str | None] = {}
        self.consumer = Consumer(
            {
                **settings.kafka_config(),
                "group.id": f"pieceflow-bench-receiver-{uuid.uuid4().hex[:8]}",
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 100,
            }
        )
        assign_at_end(self.consumer, (QUEUE,) if null else (QUEUE, *ORDER_KEYED))
        self.stop = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="bench-receiver", daemon=True)

    def start(self) -> Receiver:
        self.thread.start()
        return self

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.consumer.close()

    def _name(self, schema_id: int) -> str | None:
        if schema_id not in self._names:
            try:
                reader = self.registry.reader(schema_id)
                fields = [f["name"] for f in reader.writer.get("fields", [])[:3]]
                self._names[schema_id] = reader.name if fields == ["event_id", "order_id", "seq"] else None
            except Exception:
                self._names[schema_id] = None
        return self._names[schema_id]

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                msg = self.consumer.poll(0.05)
                while msg is not None:
                    now = time.perf_counter_ns()
                    error = msg.error()
                    if error is None:
                        self._on_record(now, msg.topic() or "", (msg.key() or b"").decode(errors="replace"),
                                        msg.value() or b"")
                    elif error.code() != KafkaError._PARTITION_EOF:
                        raise KafkaException(error)
                    msg = self.consumer.poll(0)
        except BaseException as exc:  # surfaced by the step, which fails loudly
            self.error = exc

    def _on_record(self, now: int, topic: str, key: str, raw: bytes) -> None:
        prefix = envelope_prefix(raw)
        if prefix is None:
            return
        schema_id, order_id, seq = prefix
        order = self.orders.get(order_id)
        if order is None:
            return  # a probe, or somebody else's order
        seen = self.seen
        name = self._name(schema_id)
        seen.records[topic] += 1
        last = seen.last_seq.get((topic, key))
        if last is not None and seq <= last:
            if seq < last:
                seen.out_of_order += 1
                if len(seen.examples) < 10:
                    seen.examples.append(f"{topic} key {key}: seq {seq} after {last}")
            else:
                seen.repeated_seq += 1
        if last is None or seq > last:
            seen.last_seq[(topic, key)] = seq
        if topic == QUEUE:
            if (seen.null or name == "OperationAssigned") and order_id not in seen.assigned_at:
                seen.assigned_at[order_id] = now
                seen.last_assign_ns = now
                if order.measured:
                    record_us(seen.to_assigned, now - order.intended_ns)
        elif topic == DISPATCHED and name == "OrderDispatched":
            seen.dispatched[order_id] += 1
            if seen.dispatched[order_id] == 1:
                seen.last_dispatch_ns = now
                if order.measured:
                    record_us(seen.to_dispatched, now - order.intended_ns)
        elif topic == DECISIONS and name == "OrderRejected":
            seen.rejected.add(order_id)


# ---- processes ------------------------------------------------------------------------------------

CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a process so far, from /proc/<pid>/stat."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK


def machine_busy_seconds() -> float:
    """CPU seconds all CPUs have spent busy since boot (everything but idle and iowait), from /proc/stat."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / CLOCK_TICK


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


class Child:
    """A child process with its own log file, stopped with SIGTERM (then SIGKILL)."""

    def __init__(self, name: str, cmd: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.log = log
        self._checked = -1
        self._crashed = False
        with log.open("wb") as out:
            self.proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def crashed_agent(self) -> bool:
        """True once the log shows a crashed Faust agent."""
        with contextlib.suppress(OSError):
            size = self.log.stat().st_size
            if size != self._checked:
                self._checked = size
                self._crashed = "Crashed reason=" in self.log.read_text(errors="replace")
        return self._crashed

    def tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def stop(self, timeout: float = 30.0) -> None:
        if not self.alive():
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


class BenchError(RuntimeError):
    pass


def simulator_main() -> None:
    """Child-process entry: an instant station simulator (time_scale=0) in its own consumer group."""
    from connectors.stations import StationSimulator
    from streams.reference import ReferenceData
    from streams.settings import get_settings

    settings = get_settings()
    registry = AvroRegistry.from_url(settings.schema_registry_url)
    catalog = ReferenceData(settings, registry).load()
    simulator = StationSimulator(settings, catalog, time_scale=0.0, registry=registry,
                                 group_id=os.environ["PIECEFLOW_BENCH_SIM_GROUP"])
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"simulating {len(simulator.stations)} stations instantly", flush=True)
    simulator.run(stop, poll=0.05)
    print(f"completed {simulator.completed} operations", flush=True)


# ---- the bench ------------------------------------------------------------------------------------


@dataclass
class Prepared:
    order_id: str
    key: bytes
    value: bytes
    headers: list[tuple[str, str | bytes | None]]


class Bench:
    def __init__(self, options: BenchOptions, settings: Settings, echo: Echo = _stderr) -> None:
        self.options = options
        self.echo = echo
        self.base_settings = settings
        self.run_id = f"{datetime.now(UTC):%Y%m%d%H%M%S}-{uuid.uuid4().hex[:6]}"
        self.app_id = f"pieceflow-bench-{self.run_id}"
        self.sim_group = f"{self.app_id}-stations"
        self.children: list[Child] = []
        self.settings = settings
        self.stack: LocalStack | None = None
        self.log_dir = settings.home.resolve() / "bench" / self.run_id
        self.partitions = 0
        self.private: LocalStack | None = None

    # -- setup ---------------------------------------------------------------------------------

    def prepare_stack(self) -> Catalog:
        from streams.reference import publish_catalog
        from streams.topology import TOPICS

        if self.options.private_stack:
            self.stack = self._private_stack()
        else:
            self.stack = LocalStack(self.base_settings, echo=self.echo)
            self.stack.up(cluster=self.stack.configured_nodes())
        self.settings = self.stack.client_settings()
        self.registry = AvroRegistry.from_url(self.settings.schema_registry_url)
        self.admin = AdminClient(self.settings.kafka_config())
        ensure_topics(TOPICS, self.settings)
        self.partitions = self._partitions(TOPICS)
        catalog = load_catalog_yaml(resource_dir("deploy/catalogs") / f"{self.options.catalog}.yaml")
        publish_catalog(catalog, self.settings, self.registry)
        return catalog

    def _private_stack(self) -> LocalStack:
        """A one-node stack of the bench's own (own data, ports + 2000), so nothing else shares its topics.

        It reuses the shared stack's assembled jars and is stopped and purged when the bench ends.
        """
        base = self.base_settings
        shared = LocalStack(base, echo=self.echo)
        shared.assemble()
        home = base.home.resolve() / "bench-stack"
        if home.exists() and any(c.running for c in LocalStack(base.model_copy(update={"home": home})).status()):
            raise BenchError(f"another bench's private stack is running in {home}: one bench at a time")
        shutil.rmtree(home, ignore_errors=True)
        home.mkdir(parents=True)
        (home / "dist").symlink_to(shared.dist)
        private = base.model_copy(update={
            "home": home,
            "kafka_port": base.kafka_port + 2000,
            "registry_port": base.registry_port + 2000,
            "registry_management_port": base.registry_management_port + 2000,
            "bootstrap_servers": None,
            "registry_url": None,
        })
        stack = LocalStack(private, echo=self.echo)
        self.private = stack
        self.base_settings = private
        self.log_dir = base.home.resolve() / "bench" / self.run_id
        stack.up()
        return stack

    def _wait_for_topics(self, names: set[str], timeout: float = 30.0) -> dict[str, Any]:
        """Cluster metadata once every topic named shows partitions (a fresh broker lags topic creation)."""
        deadline = time.monotonic() + timeout
        while True:
            meta = self.admin.list_topics(timeout=10).topics
            if all(n in meta and len(meta[n].partitions) > 0 for n in names):
                return dict(meta)
            if time.monotonic() > deadline:
                missing = sorted(n for n in names if n not in meta or not meta[n].partitions)
                raise BenchError(f"topics missing from the cluster metadata after {timeout:.0f}s: {missing}")
            time.sleep(0.2)

    def _partitions(self, topics: list[TopicSpec]) -> int:
        meta = self._wait_for_topics({spec.name for spec in topics})
        counts = {spec.name: len(meta[spec.name].partitions) for spec in topics}
        existing = counts[INBOUND]
        wanted = self.options.partitions
        if wanted is None or wanted == existing:
            return existing
        if wanted < existing:
            raise BenchError(f"the topics have {existing} partitions; Kafka cannot shrink them to {wanted}")
        if not self.options.grow_partitions:
            raise BenchError(
                f"--partitions {wanted} would grow the shared pipeline topics from {existing} partitions for good: "
                "Faust apps whose table changelogs have the old count (e.g. app id 'pieceflow') then refuse to "
                "start until PIECEFLOW_PARTITIONS matches and their changelogs are recreated. "
                "Pass --grow-partitions to do it anyway."
            )
        grow = [NewPartitions(name, wanted) for name, count in counts.items()
                if count < wanted and name not in CATALOG_TOPICS]
        self.echo(f"Growing {len(grow)} topic(s) from {existing} to {wanted} partitions...")
        for name, future in self.admin.create_partitions(grow, request_timeout=30).items():
            try:
                future.result(timeout=30)
            except KafkaException as exc:
                raise BenchError(f"could not grow {name} to {wanted} partitions: {exc}") from exc
        return wanted

    def child_env(self, **extra: str) -> dict[str, str]:
        return {
            **os.environ,
            **self.settings.cluster_env(),
            "PIECEFLOW_APP_ID": self.app_id,
            "PIECEFLOW_PARTITIONS": str(self.partitions),
            **extra,
        }

    def start_children(self) -> None:
        from streams.topology import TOPICS

        self.log_dir.mkdir(parents=True, exist_ok=True)
        pipeline_topics = [s.name for s in TOPICS if s.name not in CATALOG_TOPICS]
        start_group_at_end(self.app_id, pipeline_topics, self.settings)
        if not self.options.null:
            from streams import topology

            ensure_internal_topics(self.app_id, list(topology.app.tables), self.settings)
            start_group_at_end(self.sim_group, [QUEUE], self.settings)
        for n in range(1, self.options.workers + 1):
            env = self.child_env(PIECEFLOW_WEB_PORT=str(free_port(self.settings.host)))
            cmd = ([sys.executable, "-m", "streams.null_topology", "warn"] if self.options.null
                   else [sys.executable, "-m", "streams", "worker", "--loglevel", "warn"])
            self.children.append(Child(f"worker-{n}", cmd, env, self.log_dir / f"worker-{n}.log"))
        if not self.options.null:
            cmd = [sys.executable, "-c", "from streams.bench import simulator_main; simulator_main()"]
            env = self.child_env(PIECEFLOW_BENCH_SIM_GROUP=self.sim_group)
            self.children.append(Child("simulator", cmd, env, self.log_dir / "simulator.log"))
        what = "null-pipeline" if self.options.null else "pipeline"
        self.echo(f"Started {self.options.workers} {what} worker(s) as app {self.app_id}"
                  f"{'' if self.options.null else ' and an instant station simulator'}; logs in {self.log_dir}")

    @property
    def send_topic(self) -> str:
        """Where orders go in: the inbound topic, or with no null workers the last hop's topic (one leg)."""
        return QUEUE if self.options.null and self.options.workers == 0 else INBOUND

    def first_tail(self) -> str:
        return self.children[0].tail() if self.children else "(no workers)"

    def check_children(self) -> None:
        for child in self.children:
            if not child.alive():
                raise BenchError(f"{child.name} exited with code {child.proc.returncode}:\n{child.tail()}")
            if child.crashed_agent():
                raise BenchError(f"an agent crashed in {child.name} (Faust keeps the process up):\n{child.tail()}")

    def group_members(self) -> tuple[str, int]:
        future = self.admin.describe_consumer_groups([self.app_id], request_timeout=5)[self.app_id]
        try:
            desc = future.result(timeout=10)
        except KafkaException:
            return "UNKNOWN", 0
        return str(getattr(desc.state, "name", desc.state)), len(desc.members)

    def foreign_consumers(self) -> list[str]:
        """Other consumer groups with live members reading the pipeline's topics (they would share the load).

        The bench runs on the standard topics, so another pipeline (a demo, an integration test) that is
        running at the same time also processes the bench's orders and its station work: the numbers
        are then not the bench's alone. Each one found is named in the report.
        """
        from streams.topology import TOPICS

        watched = {s.name for s in TOPICS if s.name not in CATALOG_TOPICS}
        try:
            listed = self.admin.list_consumer_groups(request_timeout=10).result(timeout=15)
            ids = [g.group_id for g in listed.valid if g.group_id not in (self.app_id, self.sim_group)]
            if not ids:
                return []
            found = []
            for gid, future in self.admin.describe_consumer_groups(ids, request_timeout=10).items():
                with contextlib.suppress(Exception):
                    desc = future.result(timeout=15)
                    topics = {tp.topic for m in desc.members for tp in (m.assignment.topic_partitions or [])}
                    if desc.members and (topics & watched or not topics):
                        found.append(f"{gid} ({len(desc.members)} member(s))")
            return sorted(found)
        except Exception as exc:  # informational only
            return [f"unknown: {exc}"]

    def wait_ready(self, catalog: Catalog, producer: Producer) -> float:
        """Until the group is stable with every worker and probe orders flow end to end."""
        started = time.monotonic()
        deadline = started + self.options.ready_timeout
        last_note = 0.0
        while True:
            self.check_children()
            if self.options.workers == 0:
                break  # the floor: nothing to wait for but the broker
            state, members = self.group_members()
            if state == "STABLE" and members == self.options.workers:
                break
            if time.monotonic() > deadline:
                raise BenchError(f"the workers' group was {state} with {members} member(s) after "
                                 f"{self.options.ready_timeout:.0f}s:\n{self.first_tail()}")
            if time.monotonic() - last_note > 5:
                self.echo(f"  waiting for the workers to join: group {state}, {members}/{self.options.workers}")
                last_note = time.monotonic()
            time.sleep(0.5)
        # Probes: several orders (so every partition is likely hit), waited for end to end.
        rng = random.Random(self.options.seed + 1)
        for attempt in range(1, 4):
            probes = [self.prepare(random_order(catalog, rng, f"probe-{self.run_id}-{attempt}-{i}", source=SOURCE))
                      for i in range(4 * self.partitions)]
            tracked = {p.order_id: Tracked(0, False) for p in probes}
            receiver = Receiver(self.settings, self.registry, tracked, self.options.null).start()
            try:
                for probe in probes:
                    producer.produce(self.send_topic, key=probe.key, value=probe.value, headers=probe.headers)
                producer.flush(30)
                while time.monotonic() < deadline:
                    self.check_children()
                    if receiver.error is not None:
                        raise BenchError(f"the receiver failed: {receiver.error!r}")
                    done = receiver.seen.assigned_at if self.options.null else receiver.seen.dispatched
                    if len(done) + len(receiver.seen.rejected) >= len(probes):
                        break
                    time.sleep(0.1)
                else:
                    raise BenchError(f"probe orders did not come through within {self.options.ready_timeout:.0f}s:"
                                     f"\n{self.first_tail()}")
                if receiver.seen.rejected:
                    raise BenchError(f"probe orders were rejected: {sorted(receiver.seen.rejected)[:3]}")
            finally:
                receiver.close()
            if self.options.workers == 0:
                return time.monotonic() - started
            state, members = self.group_members()
            if state == "STABLE" and members == self.options.workers:
                return time.monotonic() - started
        raise BenchError("the workers' group kept rebalancing during the probes")

    def prepare(self, order: dict[str, Any]) -> Prepared:
        event = Event("OrderPlaced", order["order_id"], order)
        return Prepared(
            order["order_id"],
            order["order_id"].encode(),
            self.registry.encode(INBOUND, "OrderPlaced", order),
            cloudevent_headers(event, "urn:pieceflow:bench"),
        )

    # -- one step at one rate ------------------------------------------------------------------

    def build_orders(self, catalog: Catalog, count: int, step: int) -> list[Prepared]:
        rng = random.Random(self.options.seed)
        return [self.prepare(random_order(catalog, rng, f"{self.run_id}-{step}-{i}", source=SOURCE))
                for i in range(count)]

    def processes(self) -> dict[str, int]:
        pids = {child.name: child.pid for child in self.children}
        if self.stack is not None:
            for component in self.stack.status():
                if component.pid is not None:
                    pids[component.name] = component.pid
        return pids

    def run_step(self, catalog: Catalog, producer: Producer, rate: float, step: int) -> dict[str, Any]:
        opts = self.options
        warmup_n = round(opts.warmup * rate)
        measured_n = round(opts.duration * rate)
        total = warmup_n + measured_n
        self.echo(f"Rate {rate:g}/s: building {total} orders ({warmup_n} warm-up, {measured_n} measured)...")
        prepared = self.build_orders(catalog, total, step)
        orders: dict[str, Tracked] = {}
        end_before = self._inbound_end()
        others_before = self.foreign_consumers()
        receiver = Receiver(self.settings, self.registry, orders, opts.null).start()
        send_delay = new_histogram()
        failed_sends: list[str] = []

        def on_delivery(err: KafkaError | None, _msg: Any) -> None:
            if err is not None:
                failed_sends.append(str(err))

        pids = self.processes()
        interval = 1e9 / rate
        t0 = time.perf_counter_ns() + 20_000_000
        measured_t0 = t0 + round(warmup_n * interval)
        cpu_start: dict[str, float | None] = {}
        wall_start = 0.0
        next_report = t0 + 2_000_000_000
        sleep, perf = time.sleep, time.perf_counter_ns
        produce, poll, topic = producer.produce, producer.poll, self.send_topic
        try:
            for i, order in enumerate(prepared):
                intended = t0 + round(i * interval)
                if i == warmup_n:
                    cpu_start = {name: cpu_seconds(pid) for name, pid in pids.items()}
                    cpu_start["bench"] = own_cpu_seconds()
                    cpu_start["machine"] = machine_busy_seconds()
                    wall_start = time.monotonic()
                remaining = intended - perf()
                if remaining > SPIN_NS:
                    sleep((remaining - SPIN_NS) / 1e9)
                while perf() < intended:
                    pass
                orders[order.order_id] = Tracked(intended, i >= warmup_n)
                now = perf()
                produce(topic, key=order.key, value=order.value, headers=order.headers, on_delivery=on_delivery)
                poll(0)
                if i >= warmup_n:
                    record_us(send_delay, now - intended)
                if now >= next_report:
                    next_report += 2_000_000_000
                    self._progress(rate, (now - t0) / 1e9, (total * interval) / 1e9, i + 1, receiver)
                    if receiver.error is not None:
                        raise BenchError(f"the receiver failed: {receiver.error!r}")
                    self.check_children()
            sent_end = perf()
            if warmup_n == total:  # nothing measured: still take a CPU window
                cpu_start = {name: cpu_seconds(pid) for name, pid in pids.items()}
                cpu_start["bench"] = own_cpu_seconds()
                cpu_start["machine"] = machine_busy_seconds()
                wall_start = time.monotonic()
            unflushed = producer.flush(30)
            # Drain: until every order is through (or the bound).
            drain_start = time.monotonic()
            next_drain_note = drain_start + 2.0
            seen = receiver.seen
            while time.monotonic() - drain_start < opts.drain_timeout:
                done = len(seen.assigned_at) if opts.null else len(seen.dispatched) + len(seen.rejected)
                if done >= total:
                    break
                if receiver.error is not None:
                    raise BenchError(f"the receiver failed: {receiver.error!r}")
                self.check_children()
                if time.monotonic() >= next_drain_note:
                    next_drain_note += 2.0
                    self._progress(rate, (perf() - t0) / 1e9, (total * interval) / 1e9, total, receiver)
                time.sleep(0.05)
            drained = time.monotonic() - drain_start
            time.sleep(0.3)  # late duplicates, if any
            cpu_end = {name: cpu_seconds(pid) for name, pid in pids.items()}
            cpu_end["bench"] = own_cpu_seconds()
            cpu_end["machine"] = machine_busy_seconds()
            wall = time.monotonic() - wall_start
        finally:
            receiver.close()
        if receiver.error is not None:
            raise BenchError(f"the receiver failed: {receiver.error!r}")
        foreign = self._inbound_end() - end_before - total
        others = sorted(set(others_before) | set(self.foreign_consumers()))
        if others:
            self.echo(f"  warning: other consumers read the pipeline topics during this step: {', '.join(others)}")
        return self._report(rate, warmup_n, measured_n, receiver.seen, orders, send_delay, measured_t0, sent_end,
                            cpu_start, cpu_end, wall, drained, unflushed, failed_sends, foreign, others)

    def _inbound_end(self) -> int:
        consumer = Consumer({**self.settings.kafka_config(), "group.id": "pieceflow-bench-ends"})
        try:
            meta = consumer.list_topics(self.send_topic, timeout=10).topics[self.send_topic]
            return sum(consumer.get_watermark_offsets(TopicPartition(self.send_topic, p), timeout=10)[1]
                       for p in meta.partitions)
        finally:
            consumer.close()

    def _progress(self, rate: float, elapsed: float, planned: float, sent: int, receiver: Receiver) -> None:
        seen = receiver.seen
        through = len(seen.assigned_at) if self.options.null else len(seen.dispatched)
        self.echo(f"  {rate:g}/s  {elapsed:5.1f}/{planned:.1f}s  sent {sent}  assigned {len(seen.assigned_at)}  "
                  f"{'' if self.options.null else f'dispatched {through}  '}in flight {sent - through}")

    def _report(
        self, rate: float, warmup_n: int, measured_n: int, seen: Observations, orders: dict[str, Tracked],
        send_delay: HdrHistogram, measured_t0: int, sent_end: int, cpu_start: dict[str, float | None],
        cpu_end: dict[str, float | None], wall: float, drained: float, unflushed: int, failed_sends: list[str],
        foreign: int, others: list[str],
    ) -> dict[str, Any]:
        sent = len(orders)
        measured = [oid for oid, t in orders.items() if t.measured]
        done = seen.assigned_at if self.options.null else seen.dispatched
        through = sum(1 for oid in orders if oid in done)
        measured_through = sum(1 for oid in measured if oid in done)
        last_ns = seen.last_assign_ns if self.options.null else seen.last_dispatch_ns
        span_sent = max(1e-9, (sent_end - measured_t0) / 1e9)
        span_done = max(1e-9, (last_ns - measured_t0) / 1e9) if last_ns else None
        processes: list[dict[str, Any]] = []
        for name in cpu_end:
            start, end = cpu_start.get(name), cpu_end.get(name)
            if start is None or end is None or name == "machine":
                continue
            processes.append({"name": name, "cpu_s": round(end - start, 3),
                              "cores": round((end - start) / wall, 3) if wall > 0 else None})
        busy = (cpu_end.get("machine") or 0.0) - (cpu_start.get("machine") or 0.0)
        other_cpu = busy - sum(p["cpu_s"] for p in processes)
        counts = {
            "sent": sent,
            "warmup_sent": warmup_n,
            "measured_sent": len(measured),
            "assigned": sum(1 for oid in orders if oid in seen.assigned_at),
            "dispatched": None if self.options.null else through,
            "lost": sent - through,
            "duplicated": sum(1 for oid in orders if seen.dispatched.get(oid, 0) > 1),
            "out_of_order": seen.out_of_order,
            "repeated_seq": seen.repeated_seq,
            "rejected": len(seen.rejected),
            "send_failures": len(failed_sends) + unflushed,
            "foreign_inbound": max(0, foreign),
            "foreign_consumers": others,
            "records_read": dict(seen.records),
        }
        return {
            "rate": rate,
            "counts": counts,
            "throughput": {
                "offered_per_s": rate,
                "sent_per_s": round(len(measured) / span_sent, 1),
                "completed_per_s": round(measured_through / span_done, 1) if span_done else None,
                "completed_is": "assigned" if self.options.null else "dispatched",
            },
            "latency_ms": {
                "placed_to_assigned": summarize(seen.to_assigned),
                "placed_to_dispatched": None if self.options.null else summarize(seen.to_dispatched),
                "send_delay": summarize(send_delay),
            },
            "cpu": {
                "window_s": round(wall, 3),
                "window": "first measured send to the end of the drain",
                "processes": processes,
                "machine_busy_cores": round(busy / wall, 3) if wall > 0 else None,
                # Everything else on the machine (other sessions, the kernel): noise in the numbers.
                "other_cores": round(other_cpu / wall, 3) if wall > 0 else None,
            },
            "drain": {"timeout_s": self.options.drain_timeout, "seconds": round(drained, 3),
                      "complete": through + len(seen.rejected) >= sent},
            "out_of_order_examples": seen.examples,
        }

    # -- teardown ------------------------------------------------------------------------------

    def stop_children(self) -> None:
        for child in self.children:
            child.stop()
        self.children = []

    def clean_up(self) -> None:
        """Delete the bench app's internal topics (changelogs, leader topic) and consumer groups."""
        if self.stack is None or not hasattr(self, "admin"):
            return
        with contextlib.suppress(Exception):
            internal = [t for t in self.admin.list_topics(timeout=10).topics if t.startswith(f"{self.app_id}-")]
            if internal:
                for future in self.admin.delete_topics(internal, request_timeout=30).values():
                    with contextlib.suppress(Exception):
                        future.result(timeout=30)
        with contextlib.suppress(Exception):
            for future in self.admin.delete_consumer_groups([self.app_id, self.sim_group]).values():
                with contextlib.suppress(Exception):
                    future.result(timeout=30)
        shutil.rmtree(self.settings.home.resolve() / "faust" / self.app_id, ignore_errors=True)

    # -- the whole run -------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        opts = self.options
        if opts.null and not opts.private_stack:
            raise BenchError("--null needs the bench's private stack: its pass-through records would reach the "
                             "real agents of any other pipeline on the shared topics and be dead-lettered there")
        started_at = datetime.now(UTC)
        steps: list[dict[str, Any]] = []
        producer: Producer | None = None
        try:
            catalog = self.prepare_stack()
            producer = Producer({**self.settings.kafka_config(), **PRODUCER_DEFAULTS})
            self.start_children()
            ready = self.wait_ready(catalog, producer)
            self.echo(f"Pipeline warm after {ready:.1f}s ({self.partitions} partitions, {opts.workers} worker(s)).")
            rates = list(opts.sweep_rates) if opts.sweep else [opts.rate]
            for step, rate in enumerate(rates):
                result = self.run_step(catalog, producer, rate, step)
                steps.append(result)
                self.echo(summary_line(result))
                if opts.sweep and not within_slo(result, opts.slo_ms):
                    break
                if opts.sweep:
                    time.sleep(1.0)
        finally:
            if producer is not None:
                producer.flush(10)
                del producer
            gc.collect()  # let librdkafka's clients go before their broker does
            self.stop_children()
            self.clean_up()
            self.__dict__.pop("admin", None)
            gc.collect()
            if self.private is not None:
                self.echo("Stopping the bench's private stack...")
                self.private.down(purge=True)
        meta = {
            "bench": {
                "mode": ("floor" if opts.workers == 0 else "null") if opts.null else "pipeline",
                "started_at": started_at.isoformat(),
                "rate": opts.rate, "duration_s": opts.duration, "warmup_s": opts.warmup,
                "workers": opts.workers, "partitions": self.partitions, "seed": opts.seed,
                "catalog": opts.catalog, "drain_timeout_s": opts.drain_timeout, "app_id": self.app_id,
                "clock": "time.perf_counter_ns (CLOCK_MONOTONIC); latency from each order's intended send time",
                "sweep": opts.sweep,
                "stack": "private (own broker and registry, same machine)" if opts.private_stack else "shared",
            },
            "machine": machine_info(self.settings),
        }
        if not opts.sweep:
            return {**meta, **steps[0]}
        passing = [s["rate"] for s in steps if within_slo(s, opts.slo_ms)]
        return {
            **meta,
            "sweep": {
                "slo": f"placed_to_assigned p99 <= {opts.slo_ms:g} ms, 0 lost",
                "max_rate_within_slo": max(passing) if passing else None,
                "table": [{"rate": s["rate"], "p50": s["latency_ms"]["placed_to_assigned"]["p50"],
                           "p99": s["latency_ms"]["placed_to_assigned"]["p99"],
                           "completed_per_s": s["throughput"]["completed_per_s"], "lost": s["counts"]["lost"]}
                          for s in steps],
            },
            "steps": steps,
        }


def within_slo(step: dict[str, Any], slo_ms: float) -> bool:
    p99 = step["latency_ms"]["placed_to_assigned"]["p99"]
    return p99 is not None and p99 <= slo_ms and step["counts"]["lost"] == 0


def summary_line(step: dict[str, Any]) -> str:
    lat = step["latency_ms"]
    counts = step["counts"]

    def fmt(name: str) -> str:
        h = lat[name]
        if not h or not h["count"]:
            return f"{name}: -"
        return f"{name} p50 {h['p50']} p90 {h['p90']} p99 {h['p99']} p99.9 {h['p99_9']} max {h['max']} ms"

    cpu = ", ".join(f"{p['name']} {p['cores']}" for p in step["cpu"]["processes"])
    parts = [
        f"rate {step['rate']:g}/s: sent {counts['sent']} ({counts['measured_sent']} measured), "
        f"completed {step['throughput']['completed_per_s']}/s",
        "  " + fmt("placed_to_assigned"),
    ]
    if lat["placed_to_dispatched"] is not None:
        parts.append("  " + fmt("placed_to_dispatched"))
    parts += [
        "  " + fmt("send_delay"),
        f"  lost {counts['lost']}, duplicated {counts['duplicated']}, out-of-order {counts['out_of_order']}, "
        f"rejected {counts['rejected']}, foreign inbound {counts['foreign_inbound']}"
        + (f", OTHER CONSUMERS: {', '.join(counts['foreign_consumers'])}" if counts["foreign_consumers"] else ""),
        f"  CPU (cores): {cpu}; everything else on the machine {step['cpu']['other_cores']}",
    ]
    return "\n".join(parts)


def machine_info(settings: Settings) -> dict[str, Any]:
    import confluent_kafka

    cpu_model = ""
    with contextlib.suppress(OSError):
        cpu_model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                          if line.startswith("model name")), "")
    versions = {}
    for dist in ("faust-streaming", "aiokafka", "confluent-kafka", "fastavro", "hdrhistogram"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions[dist] = metadata.version(dist)
    versions["librdkafka"] = confluent_kafka.libversion()[0]
    versions["kafka"] = settings.kafka_version
    versions["python"] = platform.python_version()
    return {"cpus": os.cpu_count(), "cpu_model": cpu_model, "kernel": platform.release(),
            "hostname": socket.gethostname(), "versions": versions}


def run_bench(options: BenchOptions, settings: Settings, echo: Echo = _stderr) -> dict[str, Any]:
    return Bench(options, settings, echo).run()


def write_report(report: dict[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2) + "\n")


