"""streams/metrics.py follows Prometheus naming, and every metric a dashboard or alert uses exists."""

from __future__ import annotations

import json
import socket
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml
from prometheus_client import REGISTRY, generate_latest
from prometheus_client.metrics import MetricWrapperBase

from streams import metrics

ROOT = Path(__file__).resolve().parents[2]
DASHBOARDS = sorted((ROOT / "deploy/grafana/dashboards").glob("*.json"))
RULES = ROOT / "deploy/prometheus/rules.yml"

# The contract other modules code against: name -> (type, label names).
EXPECTED: dict[str, tuple[str, tuple[str, ...]]] = {
    "pieceflow_stage_duration_seconds": ("histogram", ("stage",)),
    "pieceflow_stage_events_in_total": ("counter", ("stage",)),
    "pieceflow_stage_events_out_total": ("counter", ("stage",)),
    "pieceflow_order_lead_time_seconds": ("histogram", ()),
    "pieceflow_order_work_seconds": ("histogram", ()),
    "pieceflow_order_lead_time_ratio": ("histogram", ()),
    "pieceflow_order_stage_seconds": ("histogram", ("part",)),
    "pieceflow_pipeline_overhead_seconds": ("histogram", ("hop",)),
    "pieceflow_orders_accepted_total": ("counter", ()),
    "pieceflow_orders_rejected_total": ("counter", ("reason",)),
    "pieceflow_orders_dispatched_total": ("counter", ()),
    "pieceflow_orders_open": ("gauge", ()),
    "pieceflow_orders_overdue": ("gauge", ()),
    "pieceflow_dead_letters_total": ("counter", ("stage", "reason")),
    "pieceflow_registry_retries_total": ("counter", ("stage",)),
    "pieceflow_station_queue_depth": ("gauge", ("station",)),
    "pieceflow_station_wip": ("gauge", ("station",)),
    "pieceflow_lane_waiting_operations": ("gauge", ("lane",)),
    "pieceflow_station_up": ("gauge", ("station",)),
    "pieceflow_station_busy_seconds_total": ("counter", ("station",)),
    "pieceflow_amendments_total": ("counter", ("result",)),
    "pieceflow_consumer_lag_messages": ("gauge", ("topic", "partition")),
    "pieceflow_intake_requests_total": ("counter", ("source", "status")),
    "pieceflow_sink_rows_total": ("counter", ("table",)),
}
# Histograms that are not durations: dimensionless, documented in the module docstring.
DIMENSIONLESS_HISTOGRAMS = {"pieceflow_order_lead_time_ratio"}
# Labels that would mint one series per order, customer or product.
FORBIDDEN_LABELS = {"order_id", "order", "sku", "customer", "customer_id", "line_id", "item_id"}
GRAFANA_RANGE_VARIABLES = ("$__rate_interval", "$__interval", "$__range")


def module_metrics() -> list[MetricWrapperBase]:
    return [obj for obj in vars(metrics).values() if isinstance(obj, MetricWrapperBase)]


def exposed_name(metric: MetricWrapperBase) -> str:
    # The client stores counters without `_total` and adds it on exposition.
    return f"{metric._name}_total" if metric._type == "counter" else metric._name


def label_names(metric: MetricWrapperBase) -> tuple[str, ...]:
    # No public accessor for a family's label names; the attribute has been stable since 0.4.
    return tuple(metric._labelnames)


def test_module_defines_the_agreed_metrics() -> None:
    found = {exposed_name(m): (m._type, label_names(m)) for m in module_metrics()}
    assert found == EXPECTED


@pytest.mark.parametrize("metric", module_metrics(), ids=exposed_name)
def test_naming_conventions(metric: MetricWrapperBase) -> None:
    name = exposed_name(metric)
    assert name.startswith("pieceflow_"), "one application prefix for every metric"
    assert metric._documentation.strip(), f"{name} has no help text"
    if metric._type == "counter":
        assert name.endswith("_total")
    else:
        assert not name.endswith("_total"), f"only counters end in _total: {name}"
    if metric._type == "histogram":
        assert name.endswith("_seconds") or name in DIMENSIONLESS_HISTOGRAMS, (
            f"{name}: histograms are durations in base units (_seconds) or documented ratios"
        )
    if name in DIMENSIONLESS_HISTOGRAMS:
        assert name in (metrics.__doc__ or ""), f"{name} must be documented in the module docstring"
    for unit in ("_milliseconds", "_ms", "_minutes", "_hours", "_percent"):
        assert unit not in name, f"{name}: use base units"
    assert not FORBIDDEN_LABELS & set(label_names(metric)), f"{name} has a high-cardinality label"


def test_bounded_label_values_are_preinitialised() -> None:
    text = generate_latest(REGISTRY).decode()
    for reason in metrics.REJECTION_REASONS:
        assert f'pieceflow_orders_rejected_total{{reason="{reason}"}} 0.0' in text
    for stage in metrics.STAGES:
        assert f'pieceflow_stage_events_in_total{{stage="{stage}"}}' in text
        assert f'pieceflow_stage_duration_seconds_count{{stage="{stage}"}}' in text
    for part in metrics.LEAD_TIME_PARTS:
        assert f'pieceflow_order_stage_seconds_count{{part="{part}"}}' in text
    assert 'pieceflow_amendments_total{result="rejected"} 0.0' in text
    assert 'pieceflow_dead_letters_total{reason="undecodable",stage="validation"} 0.0' in text


def test_rejection_reasons_match_the_avro_enum() -> None:
    schema = json.loads((ROOT / "schemas/OrderRejected.avsc").read_text())
    symbols: set[str] = set()

    def find_enum(node: Any) -> None:
        if isinstance(node, dict):
            if node.get("type") == "enum" and node.get("name") == "RejectionReason":
                symbols.update(node["symbols"])
            for child in node.values():
                find_enum(child)
        elif isinstance(node, list):
            for child in node:
                find_enum(child)

    find_enum(schema)
    assert symbols, "RejectionReason enum not found in schemas/OrderRejected.avsc"
    assert set(metrics.REJECTION_REASONS) == symbols - {"UNKNOWN"}


def test_ratio_buckets_span_one_to_fifty() -> None:
    assert metrics.RATIO_BUCKETS[0] == 1.0
    assert metrics.RATIO_BUCKETS[-1] == 50.0
    assert metrics.STAGE_BUCKETS[0] < 0.001 and metrics.STAGE_BUCKETS[-1] >= 1.0


def test_serve_metrics_serves_the_default_registry() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    metrics.serve_metrics(port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        body = response.read().decode()
    assert "pieceflow_orders_accepted_total" in body


# --- every metric the dashboards and alerts query exists --------------------------------------


def dashboard_exprs() -> Iterator[tuple[str, str]]:
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel.get("targets", []):
                yield f"{path.name}: {panel['title']}", target["expr"]


def rule_exprs() -> Iterator[tuple[str, str]]:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            yield f"rules.yml: {rule.get('alert') or rule.get('record')}", rule["expr"]


def as_promql(expr: str) -> str:
    """Replace Grafana's range variables, which are not PromQL, by a plain duration."""
    for variable in GRAFANA_RANGE_VARIABLES:
        expr = expr.replace(variable, "5m")
    return expr


def selector_names(expr: str) -> set[str]:
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            names.update(m.value for m in node.matchers.matchers if m.name == "__name__")

    promql_parser.walk(promql_parser.parse(as_promql(expr)), visit)
    return names


def exposed_series_names() -> set[str]:
    names = {"up"}  # synthesised by Prometheus for every target
    for metric in module_metrics():
        base = exposed_name(metric)
        if metric._type == "histogram":
            names.update(f"{metric._name}{suffix}" for suffix in ("_bucket", "_sum", "_count"))
        else:
            names.add(base)
    return names


def test_selector_names_sees_through_functions_and_operators() -> None:
    expr = 'sum(rate(a_bucket{job=~"$job"}[$__rate_interval])) / on (x) group_left b and {__name__="c"}'
    assert selector_names(expr) == {"a_bucket", "b", "c"}


def test_exprs_were_found() -> None:
    # Guards the parametrised test below against silently checking nothing.
    assert len(DASHBOARDS) == 3
    assert sum(1 for _ in dashboard_exprs()) >= 30
    assert sum(1 for _ in rule_exprs()) >= 5


@pytest.mark.parametrize(("where", "expr"), [*dashboard_exprs(), *rule_exprs()])
def test_queried_metrics_exist(where: str, expr: str) -> None:
    unknown = selector_names(expr) - exposed_series_names()
    assert not unknown, f"{where} queries metrics not defined in streams/metrics.py: {sorted(unknown)}"
