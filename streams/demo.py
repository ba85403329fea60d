"""``pieceflow demo``: the whole loop on this machine, ending with a lead-time report.

Starts the local stack if needed, loads the scenario's catalog, starts a worker and the station
simulator, places orders from a simulated storefront (customizations, rush orders, amendments,
cancellations and a few bad orders), shows progress, and writes ``report.json`` and a PNG plot.
With ``--policy batch`` it replays the same orders through the seed's legacy batching and reports
both side by side. Everything it starts is stopped at the end, except the stack.
"""

from __future__ import annotations

import contextlib
import random
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from connectors.shopfront import Line, amendment, cancellation, random_order
from connectors.stations import StationSimulator
from connectors.storefront import OrderProducer
from streams import report
from streams.batching import Held, batch_releases
from streams.catalog import Catalog, load_catalog_yaml
from streams.codec import AvroRegistry
from streams.events import Event, from_epoch_ms, new_event_id, utc_now
from streams.metrics import serve_metrics
from streams.readback import Collector
from streams.reference import publish_catalog
from streams.resources import resource_dir
from streams.settings import Settings
from streams.stack import LocalStack
from streams.topics import ensure_topics, start_group_at_end
from streams.topology import ORDERS_DECISIONS, ORDERS_INBOUND, ORDERS_LEADTIME, ORDERS_STATUS, STATIONS_QUEUE, TOPICS
from streams.workers import WorkerProcess


@dataclass(frozen=True)
class DemoConfig:
    scenario: str = "restaurant"
    orders: int = 40
    rate: float = 2.0
    time_scale: float = 0.002
    policy: str = "flow"
    output_dir: Path = Path()
    seed: int = 7
    batch_size: int = 4
    # Longest hold of the legacy policy, in catalog minutes (the seed's manager waits 15, the courier 30).
    hold_minutes: float = 15.0
    courier_minutes: float = 30.0
    timeout: float = 300.0


class DemoError(RuntimeError):
    pass


class Demo:
    def __init__(self, config: DemoConfig, settings: Settings, console: Console) -> None:
        self.config = config
        self.console = console
        self.stack = LocalStack(settings, echo=lambda line: console.print(f"[dim]{line}[/dim]"))
        self.settings = settings
        self.run_id = uuid.uuid4().hex[:6]
        self.rng = random.Random(config.seed)

    # ---- set-up ---------------------------------------------------------------------------------

    def start(self) -> None:
        self.stack.up(cluster=self.stack.configured_nodes())
        if self.settings.demo_metrics_port:
            try:
                serve_metrics(self.settings.demo_metrics_port, self.settings.host)
            except OSError as exc:  # metrics are a bonus; a taken port must not stop the demo
                self.console.print(f"[yellow]no /metrics on port {self.settings.demo_metrics_port}: {exc}[/yellow]")
        self.settings = self.stack.client_settings()
        self.registry = AvroRegistry.from_url(self.settings.schema_registry_url)
        ensure_topics(TOPICS, self.settings)
        path = resource_dir("deploy/catalogs") / f"{self.config.scenario}.yaml"
        if not path.is_file():
            raise DemoError(f"no scenario {self.config.scenario!r}: use restaurant or footwear")
        self.catalog: Catalog = load_catalog_yaml(path)
        publish_catalog(self.catalog, self.settings, self.registry)
        self.collector = Collector(
            self.settings, self.registry, [ORDERS_DECISIONS.name, ORDERS_STATUS.name, ORDERS_LEADTIME.name]
        )
        # From the topics' ends even after an earlier demo: what other work wrote to the shared topics
        # since then is not this demo's, and its worker would otherwise process all of it first.
        start_group_at_end("pieceflow-demo", [t.name for t in TOPICS if not t.name.startswith("catalog.")],
                           self.settings, even_if_committed=True)
        start_group_at_end("pieceflow-demo-stations", [STATIONS_QUEUE.name], self.settings, even_if_committed=True)
        self.console.print(
            f"Starting a worker and {self.config.scenario} stations (time scale {self.config.time_scale})"
        )
        self.worker = WorkerProcess(
            self.settings, self.settings.home / "logs", "demo-worker", {"PIECEFLOW_APP_ID": "pieceflow-demo"}
        )
        self.simulator = StationSimulator(
            self.settings, self.catalog, time_scale=self.config.time_scale, registry=self.registry,
            group_id="pieceflow-demo-stations",
        )
        self.stop_simulator = threading.Event()
        self.simulator_thread = threading.Thread(target=self.simulator.run, args=(self.stop_simulator,), daemon=True)
        self.simulator_thread.start()
        self.producer = OrderProducer(self.settings, ORDERS_INBOUND.name, source="urn:pieceflow:demo",
                                      registry=self.registry)
        self._wait_warm()

    def _wait_warm(self) -> None:
        probe = random_order(self.catalog, self.rng, f"warmup-{self.run_id}", source="demo")
        self._send("OrderPlaced", probe)
        with self.console.status("Waiting for the worker to join the pipeline..."):
            self._wait(lambda: bool(self.collector.for_orders({probe["order_id"]}, "OrderAccepted")), 120, "warm-up")

    def stop(self) -> None:
        for closer in (
            lambda: self.stop_simulator.set(),
            lambda: self.simulator_thread.join(15),
            lambda: self.worker.stop(),
            lambda: self.collector.close(),
        ):
            with contextlib.suppress(AttributeError):  # set-up stopped before this part started
                closer()

    # ---- feeding --------------------------------------------------------------------------------

    def _send(self, kind: str, value: dict[str, Any]) -> None:
        self.producer.send(Event(kind, value["order_id"], value), value["order_id"])

    def _wait(self, done: Any, bound: float, what: str) -> None:
        deadline = time.monotonic() + bound
        while not done():
            if not self.worker.alive():
                raise DemoError(f"the worker stopped; its log ends:\n{self.worker.tail()}")
            if time.monotonic() > deadline:
                raise DemoError(f"{what} took over {bound:.0f}s; worker log ends:\n{self.worker.tail()}")
            time.sleep(0.1)

    def make_orders(self) -> list[dict[str, Any]]:
        orders = []
        for i in range(self.config.orders):
            order = random_order(self.catalog, self.rng, f"{self.run_id}-{i:04d}", source="demo")
            roll = self.rng.random()
            if roll < 0.04:
                order["lines"][0]["sku"] = "off-menu-special"  # rejected: unknown SKU
            elif roll < 0.07:
                order["total"] = order["total"] + 3  # rejected: price mismatch
            orders.append(order)
        return orders

    def feed(self, orders: list[dict[str, Any]], release_at: dict[str, float] | None, label: str) -> dict[str, int]:
        """Place the orders (at the configured rate, or at their batch release times), with extras."""
        start = time.monotonic()
        extras = {"amendments": 0, "cancellations": 0}
        for i, order in enumerate(orders):
            due = start + (release_at[order["order_id"]] if release_at else i / self.config.rate)
            while time.monotonic() < due:
                time.sleep(min(0.01, max(0.0, due - time.monotonic())))
            if release_at is None:  # placed now; a held order keeps the time it was placed at
                order["occurred_at"] = order["recorded_at"] = utc_now()
            self._send("OrderPlaced", order)
            # Seeded per order, so a replay of the same orders gets the same amendments and cancellations.
            roll = random.Random(f"{self.config.seed}:{i}").random()
            if roll < 0.08:
                lines: list[Line] = [(line["sku"], line["quantity"], []) for line in order["lines"]]
                self._send("OrderAmended", amendment(order, self.catalog, lines))
                extras["amendments"] += 1
            elif roll < 0.13:
                self._send("OrderCancelled", cancellation(order))
                extras["cancellations"] += 1
            self.progress.update(self.tasks[label]["placed"], advance=1)
            self.producer.producer.poll(0)
        if self.producer.flush(30):
            raise DemoError("Kafka did not confirm every order within 30s")
        return extras

    def wait_done(self, ids: set[str], label: str) -> None:
        deadline = time.monotonic() + self.config.timeout
        while True:
            decided = {r.key for r in self.collector.for_orders(ids, "OrderRejected")
                       if r.value["request"] == "PLACE"}
            statuses: dict[str, str] = {}
            for record in self.collector.for_orders(ids, "OrderStatus"):
                statuses[record.key] = record.value["state"]
            done = {oid for oid, state in statuses.items() if state in report.TERMINAL_STATES} | decided
            dispatched = sum(1 for state in statuses.values() if state == "DISPATCHED")
            in_production = sum(1 for state in statuses.values() if state in ("PLANNED", "IN_PROGRESS"))
            tasks = self.tasks[label]
            self.progress.update(tasks["production"], completed=in_production, total=len(ids))
            self.progress.update(tasks["dispatched"], completed=dispatched, total=len(ids))
            if done >= ids:
                return
            if not self.worker.alive():
                raise DemoError(f"the worker stopped; its log ends:\n{self.worker.tail()}")
            if time.monotonic() > deadline:
                raise DemoError(f"{len(ids - done)} orders unfinished after {self.config.timeout:.0f}s")
            time.sleep(0.2)

    # ---- one policy -----------------------------------------------------------------------------

    def run_policy(
        self, label: str, orders: list[dict[str, Any]], release_at: dict[str, float] | None
    ) -> dict[str, Any]:
        ids = {o["order_id"] for o in orders}
        self.tasks[label] = {
            "placed": self.progress.add_task(f"{label}: placed", total=len(orders)),
            "production": self.progress.add_task(f"{label}: in production", total=len(orders)),
            "dispatched": self.progress.add_task(f"{label}: dispatched", total=len(orders)),
        }
        busy_before = {s.station_id: s.busy_seconds for s in self.simulator.stations.values()}
        started = time.monotonic()
        extras = self.feed(orders, release_at, label)
        self.wait_done(ids, label)
        elapsed = time.monotonic() - started
        leads = [r.value for r in self.collector.for_orders(ids, "OrderLeadTime")]
        rejected = [r.value["reason"] for r in self.collector.for_orders(ids, "OrderRejected")]
        out_the_door = self.courier_batches(leads) if release_at is not None else None
        result = report.policy_report(leads, self.config.time_scale, out_the_door)
        result["rejections"] = report.rejection_counts(rejected)
        result["placed"] = len(orders)
        result["dispatched"] = len(leads)
        records = self.collector.for_orders(ids)
        result["outcomes"] = report.outcomes(ids, records)
        result["lost"] = len(ids) - sum(result["outcomes"].values())
        result["out_of_order"] = report.seq_regressions(records)
        result.update(extras)
        result["wall_seconds"] = elapsed
        result["station_utilisation"] = {
            s.station_id: round((s.busy_seconds - busy_before[s.station_id]) / (elapsed * s.capacity), 3)
            for s in self.simulator.stations.values()
        }
        return result

    # ---- the legacy policy ----------------------------------------------------------------------

    def hold_for_batches(self, orders: list[dict[str, Any]]) -> dict[str, float]:
        """When the front desk releases each order: once a batch of the same dish has come in."""
        hold = self.config.hold_minutes * 60 * self.config.time_scale
        items = [Held(o["order_id"], o["lines"][0]["sku"], i / self.config.rate) for i, o in enumerate(orders)]
        return batch_releases(items, self.config.batch_size, hold)

    def courier_batches(self, leads: list[dict[str, Any]]) -> dict[str, float]:
        """How long each dispatched order waits for the courier to have a full run to its neighbourhood."""
        wait = self.config.courier_minutes * 60 * self.config.time_scale
        by_id = {o["order_id"]: o for o in self._batch_orders}
        items = []
        for lead in leads:
            delivery = by_id[lead["order_id"]]["delivery"]
            group = (delivery.get("address") or {}).get("neighbourhood") or delivery["method"]
            items.append(Held(lead["order_id"], group, lead["dispatched_at"].timestamp()))
        departures = batch_releases(items, 3, wait)
        return {i.item_id: departures[i.item_id] - i.ready_at for i in items}

    def batch_copy(self, orders: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The same orders again, under new ids, for the legacy run."""
        copies = []
        for order in orders:
            external = f"{order['external_order_id']}-batch"
            copy = {**order, "event_id": new_event_id(), "external_order_id": external,
                    "order_id": f"{order['source_platform']}:{external}"}
            copies.append(copy)
        return copies

    # ---- all of it ------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        self.tasks: dict[str, dict[str, Any]] = {}
        orders = self.make_orders()
        result: dict[str, Any] = {
            "scenario": self.config.scenario,
            "orders": self.config.orders,
            "rate_per_second": self.config.rate,
            "time_scale": self.config.time_scale,
            "units": "catalog minutes (wall time divided by the time scale)",
            "policies": {},
        }
        columns = (TextColumn("{task.description:<28}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        with Progress(*columns, console=self.console) as self.progress:
            result["policies"]["one-piece flow"] = self.run_policy("flow", orders, None)
            if self.config.policy == "batch":
                self._batch_orders = self.batch_copy(orders)
                releases = self.hold_for_batches(self._batch_orders)
                # The legacy run keeps the original placement times: the hold counts as lead time.
                started = time.time()
                for i, order in enumerate(self._batch_orders):
                    placed = from_epoch_ms(int((started + i / self.config.rate) * 1000))
                    order["occurred_at"] = order["recorded_at"] = placed
                result["policies"]["batching"] = self.run_policy("batch", self._batch_orders, releases)
        return result


def run_demo(config: DemoConfig, settings: Settings, console: Console) -> dict[str, Any]:
    demo = Demo(config, settings, console)
    try:
        demo.start()
        result = demo.run()
    finally:
        demo.stop()
    config.output_dir.mkdir(parents=True, exist_ok=True)
    report.write_json(result, config.output_dir / "report.json")
    report.plot(result, config.output_dir / "report.png")
    return result
