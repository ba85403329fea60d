"""The pipeline on a cluster set up as deploy/k8s/ sets it up: TLS, SCRAM-SHA-512, and the ACLs of
deploy/k8s/users.yaml with everything else denied.

A private broker gets a second listener, SASL_SSL with SCRAM-SHA-512 and a certificate from a throwaway
CA, and an authorizer. Its plain-text listener is the administrator's (a super user, as the Strimzi
operators are): the stack's readiness check, the SCRAM users and their ACLs, the topics (which the
topic operator creates on Kubernetes), and the test's own read-back. The catalog load, the worker, the
station simulator, the storefront producer and the ERP sink each connect to the secured listener
only, as their own KafkaUser, through the PIECEFLOW_SECURITY_* settings.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import trustme
import yaml
from confluent_kafka.admin import (
    AclBinding,
    AclOperation,
    AclPermissionType,
    AdminClient,
    ResourcePatternType,
    ResourceType,
    ScramCredentialInfo,
    ScramMechanism,
    UserScramCredentialAlteration,
    UserScramCredentialUpsertion,
)
from cryptography.hazmat.primitives import serialization
from pydantic import SecretStr

from connectors.erp.sink import ErpSink
from connectors.shopfront import build_order
from connectors.storefront import OrderProducer
from streams.catalog import Catalog
from streams.codec import AvroRegistry
from streams.events import Event
from streams.readback import Collector
from streams.settings import Settings
from streams.stack import LocalStack, StackError
from streams.topics import ensure_topics, start_group_at_end
from streams.topology import ORDERS_DISPATCHED, ORDERS_INBOUND, ORDERS_STATUS, STATIONS_QUEUE, TOPICS
from streams.workers import WorkerProcess
from tests.integration.conftest import private_stack
from tests.integration.live import SimulatorThread, unhandled_errors, wait_live

USERS_FILE = Path(__file__).resolve().parents[2] / "deploy/k8s/users.yaml"
PASSWORD = "scram-test-password"
PORT_OFFSET = 3000
SECURED_PORT_STEP = 100  # the secured listener: the broker port + this
# The consumer groups users.yaml grants: the default app id, and the simulator's group.
APP_ID = "pieceflow"
PIPELINE_TOPICS = [t.name for t in TOPICS if not t.name.startswith("catalog.")]


def write_certificates(folder: Path) -> tuple[Path, Path]:
    """A CA, and a broker certificate for 127.0.0.1 signed by it: (the broker's PEM key store, the CA)."""
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    key = serialization.load_pem_private_key(cert.private_key_pem.bytes(), password=None)
    # Kafka's PEM key stores take PKCS#8 keys only.
    pkcs8 = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    store = folder / "broker.pem"
    store.write_bytes(pkcs8 + b"".join(pem.bytes() for pem in cert.cert_chain_pems))
    ca_file = folder / "ca.pem"
    ca_file.write_bytes(ca.cert_pem.bytes())
    return store, ca_file


def secured_listener(settings: Settings, key_store: Path) -> dict[str, object]:
    host, plain, controller = settings.host, settings.kafka_port, settings.kafka_port + 1
    secured = plain + SECURED_PORT_STEP
    return {
        "listeners": f"PLAINTEXT://{host}:{plain},CONTROLLER://{host}:{controller},SECURED://{host}:{secured}",
        "advertised.listeners": f"PLAINTEXT://{host}:{plain},CONTROLLER://{host}:{controller},"
        f"SECURED://{host}:{secured}",
        "listener.security.protocol.map": "CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT,SECURED:SASL_SSL",
        "listener.name.secured.sasl.enabled.mechanisms": "SCRAM-SHA-512",
        "listener.name.secured.scram-sha-512.sasl.jaas.config":
            "org.apache.kafka.common.security.scram.ScramLoginModule required;",
        "listener.name.secured.ssl.keystore.type": "PEM",
        "listener.name.secured.ssl.keystore.location": key_store,
        # Anything not granted is denied, as with Strimzi's `authorization: simple`. The plain-text
        # listeners (controller, inter-broker, the administrator) authenticate nobody: ANONYMOUS.
        "authorizer.class.name": "org.apache.kafka.metadata.authorizer.StandardAuthorizer",
        "super.users": "User:ANONYMOUS",
    }


def kafka_users() -> dict[str, list[dict[str, Any]]]:
    """users.yaml: each KafkaUser's ACLs, in Strimzi's form."""
    docs = [d for d in yaml.safe_load_all(USERS_FILE.read_text()) if d and d["kind"] == "KafkaUser"]
    return {d["metadata"]["name"]: d["spec"]["authorization"]["acls"] for d in docs}


def acl_bindings(user: str, acls: list[dict[str, Any]]) -> list[AclBinding]:
    """Strimzi ACL rules as the broker's ACL bindings (allow, any host)."""
    patterns = {"literal": ResourcePatternType.LITERAL, "prefix": ResourcePatternType.PREFIXED}
    return [
        AclBinding(
            ResourceType[acl["resource"]["type"].upper()],
            acl["resource"]["name"],
            patterns[acl["resource"].get("patternType", "literal")],
            f"User:{user}",
            "*",
            AclOperation[re.sub(r"(?<!^)(?=[A-Z])", "_", operation).upper()],
            AclPermissionType.ALLOW,
        )
        for acl in acls
        for operation in acl["operations"]
    ]


class SecuredCluster:
    def __init__(self, stack: LocalStack, bootstrap: str, ca_file: Path) -> None:
        self.stack = stack
        self.bootstrap = bootstrap
        self.ca_file = ca_file
        self.admin = stack.client_settings()  # plain text: the super user

    def as_user(self, user: str, password: str = PASSWORD) -> Settings:
        return self.admin.model_copy(
            update={
                "bootstrap_servers": self.bootstrap,
                "security_protocol": "SASL_SSL",
                "sasl_mechanism": "SCRAM-SHA-512",
                "sasl_username": user,
                "sasl_password": SecretStr(password),
                "ssl_ca_location": self.ca_file,
                "app_id": APP_ID,
            }
        )


@pytest.fixture(scope="module")
def secured(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SecuredCluster]:
    """A private stack with a SASL_SSL listener, an authorizer, and the KafkaUsers of users.yaml."""
    key_store, ca_file = write_certificates(tmp_path_factory.mktemp("certs"))
    ports = settings.model_copy(update={"kafka_port": settings.kafka_port + PORT_OFFSET})
    stack = private_stack(settings, tmp_path_factory.mktemp("secured-stack"), PORT_OFFSET,
                          secured_listener(ports, key_store))
    try:
        stack.up()
    except StackError as exc:
        stack.down()
        pytest.fail(f"the secured stack could not start: {exc}", pytrace=False)
    admin = AdminClient({"bootstrap.servers": stack.bootstrap()})
    users = kafka_users()
    upserts: list[UserScramCredentialAlteration] = [
        UserScramCredentialUpsertion(user, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 4096), PASSWORD.encode())
        for user in users
    ]
    for future in admin.alter_user_scram_credentials(upserts).values():
        future.result(timeout=30)
    bindings = [binding for user, acls in users.items() for binding in acl_bindings(user, acls)]
    for future in admin.create_acls(bindings).values():
        future.result(timeout=30)
    cluster = SecuredCluster(stack, f"{settings.host}:{ports.kafka_port + SECURED_PORT_STEP}", ca_file)
    ensure_topics(TOPICS, cluster.admin)  # the topic operator's part on Kubernetes
    yield cluster
    stack.down(purge=True)


def test_wrong_credentials_get_an_error_that_names_them(secured: SecuredCluster) -> None:
    with pytest.raises(RuntimeError, match="PIECEFLOW_SASL_USERNAME"):
        ensure_topics(TOPICS, secured.as_user("pieceflow-worker", "not-the-password"), timeout=10)


def test_an_untrusted_broker_certificate_is_refused(secured: SecuredCluster, tmp_path: Path) -> None:
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes(trustme.CA().cert_pem.bytes())
    client = secured.as_user("pieceflow-worker").model_copy(update={"ssl_ca_location": other_ca})
    with pytest.raises(RuntimeError, match="PIECEFLOW_SSL_CA_LOCATION"):
        ensure_topics(TOPICS, client, timeout=10)


def test_a_user_sees_only_what_it_is_granted(secured: SecuredCluster) -> None:
    """The authorizer is on: the catalog's user may not even see the order topics."""
    catalog_user = secured.as_user("pieceflow-catalog")
    with pytest.raises(RuntimeError, match=f"topic {ORDERS_INBOUND.name} is not visible to user pieceflow-catalog"):
        ensure_topics([ORDERS_INBOUND], catalog_user, timeout=10)


def dispatched_in_erp(url: str, order_ids: set[str]) -> set[str]:
    with psycopg.connect(url, connect_timeout=5) as conn:
        rows = conn.execute("SELECT order_id FROM dispatches WHERE order_id = ANY(%s)", (list(order_ids),))
        return {str(order_id) for (order_id,) in rows}


def test_orders_flow_to_dispatch_with_each_service_as_its_own_user(
    secured: SecuredCluster, catalog: Catalog, postgres: object, tmp_path_factory: pytest.TempPathFactory
) -> None:
    registry = AvroRegistry.from_url(secured.admin.schema_registry_url)
    load = subprocess.run(
        [sys.executable, "-m", "streams", "catalog", "load", "restaurant"],
        env={**os.environ, **secured.as_user("pieceflow-catalog").cluster_env()},
        capture_output=True, text=True, timeout=120,
    )
    assert load.returncode == 0, f"catalog load as pieceflow-catalog failed:\n{load.stderr[-3000:]}"
    start_group_at_end(APP_ID, PIPELINE_TOPICS, secured.admin)
    start_group_at_end(f"{APP_ID}-stations", [STATIONS_QUEUE.name], secured.admin)
    collector = Collector(secured.admin, registry, [ORDERS_STATUS.name, ORDERS_DISPATCHED.name])
    worker_user = secured.as_user("pieceflow-worker")
    worker = WorkerProcess(worker_user, tmp_path_factory.mktemp("secured-worker"), "worker-1",
                           {"PIECEFLOW_WEB_PORT": str(worker_user.web_port + PORT_OFFSET)})
    simulator = SimulatorThread(secured.as_user("pieceflow-simulator"), catalog, registry, f"{APP_ID}-stations",
                                time_scale=0.0005)
    sink = ErpSink(secured.as_user("pieceflow-sink"), registry=registry)  # its default group, as deployed
    stop_sink = threading.Event()
    sink_thread = threading.Thread(target=sink.run, args=(stop_sink,), daemon=True)
    sink_thread.start()
    try:
        producer = OrderProducer(secured.as_user("pieceflow-intake"), ORDERS_INBOUND.name, registry=registry)
        orders = [build_order(catalog, [("kung-pao-chicken", 1, []), ("spring-rolls", 1, [])],
                              external_id=f"secured-{uuid.uuid4().hex[:10]}") for _ in range(3)]
        for order in orders:
            oid = str(order["order_id"])
            producer.send_confirmed(Event("OrderPlaced", oid, dict(order)), oid)
        ids = {str(o["order_id"]) for o in orders}
        wait_live("every order dispatched, each service as its own user",
                  lambda: {r.key for r in collector.for_orders(ids, "OrderDispatched")} == ids, 120, [worker],
                  simulator)
        wait_live("every dispatch in the ERP tables, written by the sink as its own user",
                  lambda: not sink_thread.is_alive() or dispatched_in_erp(secured.admin.database_url, ids) == ids,
                  60, [worker])
        assert sink_thread.is_alive(), "the ERP sink stopped (see the log)"
    finally:
        stop_sink.set()
        sink_thread.join(30)
        simulator.stop()
        worker.stop()
        collector.close()
    assert unhandled_errors(worker.log.read_text(errors="replace")) == []


@pytest.mark.parametrize(
    ("command", "user", "password", "expected"),
    [
        (["stations", "simulate"], "pieceflow-simulator", "not-the-password", "PIECEFLOW_SASL_PASSWORD"),
        (["intake", "serve"], "pieceflow-sink", PASSWORD, "orders.inbound.v1 not visible to user pieceflow-sink"),
        (["sink", "erp"], "pieceflow-intake", PASSWORD, "not visible to user pieceflow-intake"),
    ],
)
def test_a_service_that_cannot_reach_its_topics_stops_at_once_saying_why(
    secured: SecuredCluster, command: list[str], user: str, password: str, expected: str
) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "streams", *command],
        env={**os.environ, **secured.as_user(user, password).cluster_env()},
        capture_output=True, text=True, timeout=90,
    )
    assert done.returncode == 1, done.stderr[-2000:]
    assert expected in done.stderr
    assert "Traceback" not in done.stderr
