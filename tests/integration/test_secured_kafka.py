"""The pipeline on a cluster that only speaks TLS and SCRAM-SHA-512, as deploy/k8s/ configures it.

A private broker gets a second listener, SASL_SSL with SCRAM-SHA-512 and a certificate from a throwaway
CA; its plain-text listener stays for the stack's own readiness check and for creating the SCRAM user.
Everything under test (topic creation, catalog load, worker, station simulator, storefront producer,
read-back) connects to the secured listener only, through the PIECEFLOW_SECURITY_* settings.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import trustme
from confluent_kafka.admin import AdminClient, ScramCredentialInfo, ScramMechanism, UserScramCredentialUpsertion
from cryptography.hazmat.primitives import serialization
from pydantic import SecretStr

from connectors.shopfront import build_order
from connectors.storefront import OrderProducer
from streams.catalog import Catalog
from streams.codec import AvroRegistry
from streams.events import Event
from streams.readback import Collector
from streams.reference import publish_catalog
from streams.settings import Settings
from streams.stack import LocalStack, StackError
from streams.topics import ensure_topics, start_group_at_end
from streams.topology import ORDERS_DISPATCHED, ORDERS_INBOUND, ORDERS_STATUS, TOPICS
from streams.workers import WorkerProcess
from tests.integration.conftest import private_stack
from tests.integration.live import SimulatorThread, unhandled_errors, wait_live

USER, PASSWORD = "pieceflow-worker", "scram-test-password"
PORT_OFFSET = 3000
SECURED_PORT_STEP = 100  # the secured listener: the broker port + this
APP_ID = f"pieceflow-secured-{uuid.uuid4().hex[:6]}"
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
    }


@pytest.fixture(scope="module")
def secured(settings: Settings, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, Settings]]:
    """A private stack with a SASL_SSL listener and a SCRAM user; yields it and settings that use that listener."""
    certs = tmp_path_factory.mktemp("certs")
    key_store, ca_file = write_certificates(certs)
    ports = settings.model_copy(update={"kafka_port": settings.kafka_port + PORT_OFFSET})
    stack = private_stack(settings, tmp_path_factory.mktemp("secured-stack"), PORT_OFFSET,
                          secured_listener(ports, key_store))
    try:
        stack.up()
    except StackError as exc:
        stack.down()
        pytest.fail(f"the secured stack could not start: {exc}", pytrace=False)
    admin = AdminClient({"bootstrap.servers": stack.bootstrap()})
    upsert = UserScramCredentialUpsertion(
        USER, ScramCredentialInfo(ScramMechanism.SCRAM_SHA_512, 4096), PASSWORD.encode()
    )
    for future in admin.alter_user_scram_credentials([upsert]).values():
        future.result(timeout=30)
    client = stack.client_settings().model_copy(
        update={
            "bootstrap_servers": f"{settings.host}:{settings.kafka_port + PORT_OFFSET + SECURED_PORT_STEP}",
            "security_protocol": "SASL_SSL",
            "sasl_mechanism": "SCRAM-SHA-512",
            "sasl_username": USER,
            "sasl_password": SecretStr(PASSWORD),
            "ssl_ca_location": ca_file,
            "app_id": APP_ID,
        }
    )
    yield stack, client
    stack.down(purge=True)


def test_wrong_credentials_get_an_error_that_names_them(secured: tuple[LocalStack, Settings]) -> None:
    _, client = secured
    wrong = client.model_copy(update={"sasl_password": SecretStr("not-the-password")})
    with pytest.raises(RuntimeError, match="PIECEFLOW_SASL_USERNAME"):
        ensure_topics(TOPICS, wrong, timeout=10)


def test_an_untrusted_broker_certificate_is_refused(
    secured: tuple[LocalStack, Settings], tmp_path: Path
) -> None:
    _, client = secured
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes(trustme.CA().cert_pem.bytes())
    with pytest.raises(RuntimeError, match="PIECEFLOW_SSL_CA_LOCATION"):
        ensure_topics(TOPICS, client.model_copy(update={"ssl_ca_location": other_ca}), timeout=10)


def test_orders_flow_to_dispatch_over_tls_and_scram(
    secured: tuple[LocalStack, Settings], catalog: Catalog, tmp_path_factory: pytest.TempPathFactory
) -> None:
    _, client = secured
    registry = AvroRegistry.from_url(client.schema_registry_url)
    ensure_topics(TOPICS, client)
    publish_catalog(catalog, client, registry)
    start_group_at_end(APP_ID, PIPELINE_TOPICS, client)
    collector = Collector(client, registry, [ORDERS_STATUS.name, ORDERS_DISPATCHED.name])
    worker = WorkerProcess(client, tmp_path_factory.mktemp("secured-worker"), "worker-1",
                           {"PIECEFLOW_WEB_PORT": str(client.web_port + PORT_OFFSET)})
    simulator = SimulatorThread(client, catalog, registry, f"{APP_ID}-stations", time_scale=0.0005)
    try:
        producer = OrderProducer(client, ORDERS_INBOUND.name, registry=registry)
        orders = [build_order(catalog, [("kung-pao-chicken", 1, []), ("spring-rolls", 1, [])],
                              external_id=f"secured-{uuid.uuid4().hex[:10]}") for _ in range(3)]
        for order in orders:
            oid = str(order["order_id"])
            producer.send_confirmed(Event("OrderPlaced", oid, dict(order)), oid)
        ids = {str(o["order_id"]) for o in orders}
        wait_live("every order dispatched over SASL_SSL",
                  lambda: {r.key for r in collector.for_orders(ids, "OrderDispatched")} == ids, 120, [worker])
    finally:
        simulator.stop()
        worker.stop()
        collector.close()
    assert unhandled_errors(worker.log.read_text(errors="replace")) == []
