"""Every dashboard panel and every alert rule, evaluated by a real Prometheus against a running pipeline.

The module starts a private Prometheus (the Debian package's ``prometheus`` binary, installed by
``deploy/dev.sh``; missing, the tests fail, they never skip) with ``deploy/prometheus/prometheus.yml``
rewritten only where it must be: the targets point at this run's processes, scrapes happen every
second, and ``rules.yml`` is loaded from the repository. Its jobs, which the dashboards and the
rules select on, are kept as they are. Every job has a target:

- ``pieceflow-worker``: ``pieceflow worker`` as a child process (its ``/metrics`` on its web port);
- ``pieceflow-intake``: ``pieceflow intake serve`` as a child process;
- ``pieceflow-sink``: ``pieceflow sink erp`` as a child process, on the private PostgreSQL;
- ``pieceflow-demo``: this process, running the station simulator and ``serve_metrics``, the way
  ``pieceflow demo`` does.

Traffic: valid orders through to dispatch, invalid ones for rejections, one undecodable record for
a dead letter, one signed Shopify webhook through the intake. Then each PromQL expression of each
panel (Grafana variables replaced by what "All" and a default range give) and of each alert rule
(with its threshold comparison stripped, ``absent(x)`` as ``x``) must parse and return at least
one series. The worker, simulator and sink use a fresh app id and consumer groups started at the
topics' ends, on free ports, so other engineers' runs on the shared stack are left alone.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import threading
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from confluent_kafka import Producer

from connectors.erp.rows import TOPICS as SINK_TOPICS
from connectors.intake import signatures
from connectors.shopfront import build_order
from connectors.stations import StationSimulator
from connectors.storefront import OrderProducer
from streams.catalog import Catalog, load_catalog_yaml
from streams.codec import AvroRegistry
from streams.events import Event
from streams.metrics import serve_metrics
from streams.readback import Collector
from streams.reference import publish_catalog
from streams.settings import Settings
from streams.stack import LocalStack, log_tail
from streams.topics import ensure_topics, start_group_at_end
from streams.topology import DEAD_LETTERS, ORDERS_DECISIONS, ORDERS_DISPATCHED, ORDERS_INBOUND, STATIONS_QUEUE, TOPICS
from streams.workers import WorkerProcess
from tests.conftest import wait_until

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
DASHBOARDS = sorted((ROOT / "deploy" / "grafana" / "dashboards").glob("*.json"))
CATALOGS = ROOT / "deploy" / "catalogs"
SHOPIFY_PAYLOAD = ROOT / "tests" / "unit" / "payloads" / "shopify_orders_create.json"

APP_ID = f"pieceflow-prom-{uuid.uuid4().hex[:6]}"
PIPELINE_TOPICS = [t.name for t in TOPICS if not t.name.startswith("catalog.")]
SECRET = "prometheus-live-shopify-secret"
BOUND = 120.0  # a worker joining its group, an order through every station, a few scrapes
SERIES_BOUND = 30.0  # once the traffic is scraped, an expression that has series has them at once

# What Grafana puts in place of its built-in variables for a 5-minute dashboard (the panels' own
# variables take their "All" value from the dashboard JSON).
GRAFANA_BUILTINS = {"$__rate_interval": "1m", "$__range": "5m", "$__interval": "15s"}
COMPARISONS = {"==", "!=", ">", "<", ">=", "<="}
VALID_ORDERS = 6
INVALID_ORDERS = 3


# ---- the expressions ----------------------------------------------------------------------------


def grafana_to_promql(expr: str, variables: dict[str, str]) -> str:
    """Replace ``$name`` / ``${name}`` and Grafana's range variables the way "All" and a 5m range would."""
    for name, value in GRAFANA_BUILTINS.items():
        expr = expr.replace(name, value)
    for name, value in variables.items():
        expr = expr.replace("${" + name + "}", value)
        expr = re.sub(r"\$" + re.escape(name) + r"\b", value, expr)
    assert "$" not in expr, f"a Grafana variable is left in {expr!r}"
    return expr


def strip_thresholds(expr: str) -> str:
    """The alert without its threshold: ``x > 0`` becomes ``x`` (also under ``and``), ``absent(x)`` becomes ``x``.

    What is left is what the alert looks at; it must return series even when nothing is wrong.
    """

    def replace(node: Any) -> Any:
        comparison = isinstance(node, promql_parser.BinaryExpr) and str(node.op) in COMPARISONS
        if comparison and not (node.modifier and node.modifier.return_bool):  # `> bool 0` filters nothing
            if isinstance(node.rhs, promql_parser.NumberLiteral):
                return node.lhs
            if isinstance(node.lhs, promql_parser.NumberLiteral):
                return node.rhs
        if isinstance(node, promql_parser.Call) and node.func.name == "absent":
            return node.args[0]
        return None

    return str(promql_parser.transform(promql_parser.parse(expr), post_visit=replace))


def panels(items: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in items:
        yield panel
        yield from panels(panel.get("panels", []))


def dashboard_expressions() -> list[tuple[str, str]]:
    found = []
    for path in DASHBOARDS:
        dashboard = json.loads(path.read_text())
        variables = {}
        for variable in dashboard.get("templating", {}).get("list", []):
            if variable["type"] == "datasource":
                continue
            assert variable.get("includeAll"), f"{path.name}: ${variable['name']} has no All value to test with"
            variables[variable["name"]] = variable.get("allValue") or ".*"
        for variable in dashboard.get("templating", {}).get("list", []):
            query = variable.get("query")
            text = query.get("query", "") if isinstance(query, dict) else str(query or "")
            selector = re.fullmatch(r"\s*label_values\((.+),\s*\w+\s*\)\s*", text)
            if variable["type"] == "query":
                assert selector, f"{path.name}: ${variable['name']} is not a label_values(selector, label) query"
                where = f"{path.stem} variable ${variable['name']}"
                found.append((where, grafana_to_promql(selector.group(1), variables)))
        for panel in panels(dashboard["panels"]):
            for target in panel.get("targets", []):
                if target.get("expr"):
                    where = f"{path.stem} panel {panel['title']!r} {target.get('refId', '')}".rstrip()
                    found.append((where, grafana_to_promql(target["expr"], variables)))
    return found


def rule_expressions() -> list[tuple[str, str]]:
    rules = yaml.safe_load((PROMETHEUS_DIR / "rules.yml").read_text())
    return [
        (f"rule {rule.get('alert') or rule.get('record')}", strip_thresholds(rule["expr"]))
        for group in rules["groups"]
        for rule in group["rules"]
    ]


EXPRESSIONS = dashboard_expressions() + rule_expressions()


# ---- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Child:
    """A child process with its output in a log file."""

    def __init__(self, name: str, command: list[str], log_dir: Path, env: dict[str, str]) -> None:
        self.name = name
        self.log = log_dir / f"{name}.log"
        with self.log.open("wb") as out:
            self.proc = subprocess.Popen(
                command, stdout=out, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
                cwd=ROOT,
            )  # fmt: skip

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self) -> str:
        return log_tail(self.log, 40)

    def stop(self) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@dataclass
class Prometheus:
    base: str
    process: Child

    def query(self, expr: str) -> tuple[int, dict[str, Any]]:
        url = f"{self.base}/api/v1/query?" + urllib.parse.urlencode({"query": expr})
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return response.status, json.load(response)
        except urllib.error.HTTPError as exc:
            body = exc.read()
            try:
                return exc.code, json.loads(body)
            except ValueError:
                return exc.code, {"status": "error", "error": body.decode(errors="replace")}

    def series(self, expr: str) -> list[dict[str, Any]]:
        """The result of an instant query; fails at once when Prometheus refuses the expression."""
        status, body = self.query(expr)
        if status != 200 or body.get("status") != "success":
            pytest.fail(f"Prometheus refused {expr!r}: HTTP {status}, {body.get('errorType')}: {body.get('error')}")
        result = body["data"]["result"]
        assert isinstance(result, list)
        return result

    def value(self, expr: str) -> float:
        """The single value of an aggregated expression, 0 when it has no series yet."""
        result = self.series(expr)
        return float(result[0]["value"][1]) if result else 0.0


@dataclass
class Pipeline:
    settings: Settings
    worker: WorkerProcess
    intake: Child
    sink: Child
    targets: dict[str, str]  # scrape job -> host:port
    order_ids: set[str]
    rejected_ids: set[str]

    def check_alive(self) -> None:
        if not self.worker.alive():
            pytest.fail(f"the worker died:\n{self.worker.tail()}")
        for child in (self.intake, self.sink):
            if not child.alive():
                pytest.fail(f"the {child.name} died:\n{child.tail()}")


@pytest.fixture(scope="module")
def prometheus_binary() -> str:
    """Checked before anything starts: a missing Prometheus fails the module at once, never skips it."""
    path = shutil.which("prometheus")
    if path is None:
        pytest.fail(
            "prometheus not found: install the Debian package with "
            "`sudo apt-get install -y --no-install-recommends prometheus` (deploy/dev.sh does it)",
            pytrace=False,
        )
    return path


def scrape_config(targets: dict[str, str]) -> dict[str, Any]:
    """deploy/prometheus/prometheus.yml with this run's targets, 1 s scrapes and the repository's rules."""
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update({"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"})
    config["rule_files"] = [str((PROMETHEUS_DIR / name).resolve()) for name in config["rule_files"]]
    jobs = {job["job_name"] for job in config["scrape_configs"]}
    assert jobs == set(targets), f"prometheus.yml scrapes {sorted(jobs)}; this test runs {sorted(targets)}"
    for job in config["scrape_configs"]:
        job["static_configs"] = [{"targets": [targets[job["job_name"]]]}]
    return config


# ---- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def live_settings(stack: LocalStack) -> Settings:
    return stack.client_settings()


@pytest.fixture(scope="module")
def restaurant() -> Catalog:
    return load_catalog_yaml(CATALOGS / "restaurant.yaml")


@pytest.fixture(scope="module")
def registry(live_settings: Settings) -> AvroRegistry:
    return AvroRegistry.from_url(live_settings.schema_registry_url)


@pytest.fixture(scope="module")
def demo_port() -> int:
    """This process plays the demo job: the station simulator's utilisation on its own /metrics."""
    port = free_port()
    serve_metrics(port)  # a daemon thread on loopback; it ends with this test process
    return port


@pytest.fixture(scope="module")
def pipeline(
    prometheus_binary: str,
    live_settings: Settings,
    restaurant: Catalog,
    registry: AvroRegistry,
    postgres: object,
    demo_port: int,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Pipeline]:
    logs = tmp_path_factory.mktemp("prometheus-live")
    ensure_topics(TOPICS, live_settings)
    publish_catalog(restaurant, live_settings, registry)
    sink_group = f"{APP_ID}-erp-sink"
    start_group_at_end(APP_ID, PIPELINE_TOPICS, live_settings)
    start_group_at_end(f"{APP_ID}-stations", [STATIONS_QUEUE.name], live_settings)
    start_group_at_end(sink_group, list(SINK_TOPICS), live_settings)
    cluster = {**live_settings.cluster_env(), "PIECEFLOW_APP_ID": APP_ID}
    web_port, intake_port, sink_port = free_port(), free_port(), free_port()
    worker = WorkerProcess(live_settings, logs, "worker", {**cluster, "PIECEFLOW_WEB_PORT": str(web_port)})
    intake = Child(
        "intake",
        [sys.executable, "-m", "streams", "intake", "serve", "--port", str(intake_port),
         "--catalog", str(CATALOGS / "footwear.yaml")],
        logs, {**cluster, "PIECEFLOW_SHOPIFY_SECRET": SECRET},
    )  # fmt: skip
    sink = Child(
        "sink",
        [sys.executable, "-m", "streams", "sink", "erp", "--group", sink_group],
        logs, {**cluster, "PIECEFLOW_DATABASE_URL": live_settings.database_url,
               "PIECEFLOW_SINK_METRICS_PORT": str(sink_port)},
    )  # fmt: skip
    simulator = StationSimulator(
        live_settings, restaurant, time_scale=0.0005, registry=registry, group_id=f"{APP_ID}-stations"
    )
    stop = threading.Event()
    thread = threading.Thread(target=simulator.run, args=(stop,), daemon=True)
    thread.start()
    collector = Collector(live_settings, registry, [ORDERS_DECISIONS.name, ORDERS_DISPATCHED.name, DEAD_LETTERS.name])
    targets = {
        "pieceflow-worker": f"127.0.0.1:{web_port}",
        "pieceflow-intake": f"127.0.0.1:{intake_port}",
        "pieceflow-sink": f"127.0.0.1:{sink_port}",
        "pieceflow-demo": f"127.0.0.1:{demo_port}",
    }
    run = Pipeline(live_settings, worker, intake, sink, targets, set(), set())
    try:
        drive_traffic(run, restaurant, registry, collector, intake_port, sink_port)
        yield run
    finally:
        collector.close()
        stop.set()
        thread.join(15)
        for child in (intake, sink):
            child.stop()
        worker.stop()


def waiting(run: Pipeline, condition: Callable[[], object]) -> Callable[[], object]:
    def check() -> object:
        run.check_alive()
        return condition()

    return check


def drive_traffic(
    run: Pipeline, catalog: Catalog, registry: AvroRegistry, collector: Collector, intake_port: int, sink_port: int
) -> None:
    """Orders to dispatch, rejections, one dead letter and one webhook; returns once the pipeline has them."""
    settings = run.settings
    wait_until(waiting(run, lambda: http_ok(f"http://127.0.0.1:{intake_port}/healthz")), BOUND, "the intake service")
    wait_until(waiting(run, lambda: http_ok(f"http://127.0.0.1:{sink_port}/metrics")), BOUND, "the ERP sink")
    producer = OrderProducer(settings, ORDERS_INBOUND.name, registry=registry)

    def place(order: dict[str, Any]) -> str:
        producer.send_confirmed(Event("OrderPlaced", order["order_id"], order), order["order_id"])
        return str(order["order_id"])

    def unique(prefix: str) -> str:
        return f"prom-{prefix}-{uuid.uuid4().hex[:10]}"

    # Warm-up: the worker has joined its group once it accepts an order.
    warm = place(build_order(catalog, [("spring-rolls", 1, [])], external_id=unique("warm")))
    wait_until(
        waiting(run, lambda: collector.for_orders({warm}, "OrderAccepted")), BOUND, "the worker to accept an order"
    )
    run.order_ids.add(warm)
    for i in range(VALID_ORDERS - 1):
        lines = [("kung-pao-chicken", 1, [("SELECT", "spice", "extra-spicy")]), ("egg-fried-rice", 1 + i % 2, [])]
        run.order_ids.add(place(build_order(catalog, lines, external_id=unique("ok"))))
    wrong_price = build_order(catalog, [("mapo-tofu", 1, [])], external_id=unique("price"))
    wrong_price["total"] += 5
    wrong_price["lines"][0]["unit_price"] += 5
    for order in (
        build_order(catalog, [("no-such-dish", 1, [])], external_id=unique("sku")),
        build_order(catalog, [("spring-rolls", 99, [])], external_id=unique("qty")),
        wrong_price,
    ):
        run.rejected_ids.add(place(order))
    # Not Avro at all: the validation stage dead-letters it and goes on.
    garbage_key = unique("garbage")
    raw = Producer({"bootstrap.servers": settings.kafka_bootstrap, "partitioner": "murmur2_random"})
    raw.produce(ORDERS_INBOUND.name, key=garbage_key.encode(), value=b"\x07not avro at all")
    assert raw.flush(10) == 0
    # One signed Shopify webhook through the intake service.
    body = json.loads(SHOPIFY_PAYLOAD.read_text())
    body["id"] = 7_000_000_000_000 + uuid.uuid4().int % 1_000_000_000_000
    payload = json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://127.0.0.1:{intake_port}/webhooks/shopify",
        data=payload,
        method="POST",
        headers={
            "Content-Type": "application/json",
            "X-Shopify-Topic": "orders/create",
            "X-Shopify-Hmac-Sha256": signatures.sign(SECRET, payload),
            "X-Shopify-Webhook-Id": uuid.uuid4().hex,
        },
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        assert response.status == 202, f"the intake answered {response.status}: {response.read()!r}"

    wait_until(
        waiting(run, lambda: {r.key for r in collector.for_orders(run.order_ids, "OrderDispatched")} >= run.order_ids),
        BOUND, "every valid order dispatched",
    )  # fmt: skip
    wait_until(
        waiting(run, lambda: {r.key for r in collector.for_orders(run.rejected_ids, "OrderRejected")}
                >= run.rejected_ids),
        BOUND, "every invalid order rejected",
    )  # fmt: skip
    wait_until(
        waiting(run, lambda: collector.where(topic=DEAD_LETTERS.name, key=garbage_key)), BOUND, "the dead letter"
    )


@pytest.fixture(scope="module")
def prometheus(
    prometheus_binary: str, pipeline: Pipeline, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Prometheus]:
    home = tmp_path_factory.mktemp("prometheus")
    config = home / "prometheus.yml"
    config.write_text(yaml.safe_dump(scrape_config(pipeline.targets), sort_keys=False))
    port = free_port()
    child = Child(
        "prometheus",
        [prometheus_binary, f"--config.file={config}", f"--storage.tsdb.path={home / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
        home, {},
    )  # fmt: skip
    server = Prometheus(f"http://127.0.0.1:{port}", child)

    def ready() -> bool:
        if not child.alive():
            pytest.fail(f"prometheus exited with {child.proc.returncode}:\n{child.tail()}")
        return http_ok(f"{server.base}/-/ready")

    try:
        wait_until(ready, 60, "Prometheus to be ready on /-/ready", interval=0.2)
        yield server
    finally:
        child.stop()


@pytest.fixture(scope="module")
def scraped(prometheus: Prometheus, pipeline: Pipeline) -> Prometheus:
    """Prometheus once it has scraped the traffic from every job: each count below is this run's doing."""
    expected = {
        'sum(up{job=~"pieceflow-.*"} == 1)': 4,
        'sum(pieceflow_orders_dispatched_total{job="pieceflow-worker"})': VALID_ORDERS,
        'sum(pieceflow_orders_accepted_total{job="pieceflow-worker"})': VALID_ORDERS,
        'sum(pieceflow_orders_rejected_total{job="pieceflow-worker"})': INVALID_ORDERS,
        'sum(pieceflow_dead_letters_total{job="pieceflow-worker", reason="undecodable"})': 1,
        'count(pieceflow_consumer_lag_messages{job="pieceflow-worker"})': 1,
        'count(pieceflow_station_up{job="pieceflow-worker"})': 1,
        'sum(pieceflow_intake_requests_total{job="pieceflow-intake", status="202"})': 1,
        'sum(pieceflow_sink_rows_total{job="pieceflow-sink"})': 1,
        'count(pieceflow_station_busy_seconds_total{job="pieceflow-demo"} > 0)': 1,
    }
    for expr, at_least in expected.items():
        wait_until(waiting(pipeline, reaches(prometheus, expr, at_least)), BOUND, f"{expr} >= {at_least} in Prometheus")
    return prometheus


def reaches(prometheus: Prometheus, expr: str, at_least: float) -> Callable[[], bool]:
    return lambda: prometheus.value(expr) >= at_least


# ---- tests --------------------------------------------------------------------------------------


def test_the_rules_load_and_evaluate(scraped: Prometheus) -> None:
    expected = {name.removeprefix("rule ") for name, _ in rule_expressions()}

    def evaluated() -> dict[str, dict[str, Any]] | None:
        with urllib.request.urlopen(f"{scraped.base}/api/v1/rules", timeout=10) as response:
            groups = json.load(response)["data"]["groups"]
        rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
        return rules if set(rules) == expected and all(r["health"] != "unknown" for r in rules.values()) else None

    rules = wait_until(evaluated, SERIES_BOUND, "every rule of rules.yml loaded and evaluated once")
    broken = {name: rule.get("lastError") for name, rule in rules.items() if rule["health"] != "ok"}
    assert not broken, f"rules that fail to evaluate: {broken}"


@pytest.mark.parametrize(("where", "expr"), EXPRESSIONS, ids=[where for where, _ in EXPRESSIONS])
def test_expression_returns_series(scraped: Prometheus, pipeline: Pipeline, where: str, expr: str) -> None:
    scraped.series(expr)  # parses, or fails at once with Prometheus's error
    wait_until(
        waiting(pipeline, lambda: scraped.series(expr)), SERIES_BOUND, f"series from {where}: {expr}", interval=0.5
    )
