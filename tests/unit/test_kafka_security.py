"""The PIECEFLOW_SECURITY_* settings reach every Kafka client: librdkafka's properties, Faust's credentials."""

from __future__ import annotations

import re
import ssl
from pathlib import Path

import pytest
import trustme
from faust.auth import SASLCredentials, SSLCredentials
from faust.transport.drivers.aiokafka import credentials_to_aiokafka_auth
from pydantic import SecretStr, ValidationError

from streams import cli
from streams.faust_config import Transport, broker_credentials, new_app
from streams.settings import Settings, get_settings

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def ca_file(tmp_path: Path) -> Path:
    path = tmp_path / "ca.pem"
    path.write_bytes(trustme.CA().cert_pem.bytes())
    return path


def secured(ca_file: Path, **changes: object) -> Settings:
    values: dict[str, object] = {
        "bootstrap_servers": "kafka-1:9093",
        "security_protocol": "SASL_SSL",
        "sasl_mechanism": "SCRAM-SHA-512",
        "sasl_username": "pieceflow-worker",
        "sasl_password": SecretStr("s3cret"),
        "ssl_ca_location": ca_file,
        **changes,
    }
    return Settings(**values)  # type: ignore[arg-type]


def test_plaintext_by_default() -> None:
    settings = Settings(bootstrap_servers="localhost:9092")
    assert settings.kafka_config() == {"bootstrap.servers": "localhost:9092", "security.protocol": "plaintext"}
    assert broker_credentials(settings) is None


def test_sasl_ssl_gives_librdkafka_every_property(ca_file: Path) -> None:
    assert secured(ca_file).kafka_config() == {
        "bootstrap.servers": "kafka-1:9093",
        "security.protocol": "sasl_ssl",
        "sasl.mechanism": "SCRAM-SHA-512",
        "sasl.username": "pieceflow-worker",
        "sasl.password": "s3cret",
        "ssl.ca.location": str(ca_file),
    }


def test_sasl_ssl_gives_aiokafka_the_same_through_faust(ca_file: Path) -> None:
    credentials = broker_credentials(secured(ca_file))
    assert isinstance(credentials, SASLCredentials)
    auth = credentials_to_aiokafka_auth(credentials)
    assert auth["security_protocol"] == "SASL_SSL"
    assert auth["sasl_mechanism"] == "SCRAM-SHA-512"
    assert (auth["sasl_plain_username"], auth["sasl_plain_password"]) == ("pieceflow-worker", "s3cret")
    context = auth["ssl_context"]
    assert isinstance(context, ssl.SSLContext)
    assert context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
    # The CA file, not the system's CAs, is what the brokers' certificates are checked against.
    assert context.get_ca_certs() == ssl.create_default_context(cafile=ca_file).get_ca_certs()


def test_sasl_without_tls_and_tls_without_sasl(ca_file: Path) -> None:
    plain = secured(ca_file, security_protocol="SASL_PLAINTEXT", ssl_ca_location=None, sasl_mechanism="PLAIN")
    assert "ssl.ca.location" not in plain.kafka_config()
    auth = credentials_to_aiokafka_auth(broker_credentials(plain))
    assert (auth["security_protocol"], auth["sasl_mechanism"], auth["ssl_context"]) == ("SASL_PLAINTEXT", "PLAIN", None)

    tls = Settings(bootstrap_servers="kafka-1:9093", security_protocol="SSL", ssl_ca_location=ca_file)
    assert tls.kafka_config() == {
        "bootstrap.servers": "kafka-1:9093", "security.protocol": "ssl", "ssl.ca.location": str(ca_file)
    }
    credentials = broker_credentials(tls)
    assert isinstance(credentials, SSLCredentials)
    assert credentials_to_aiokafka_auth(credentials)["security_protocol"] == "SSL"


def test_the_worker_app_carries_the_settings_to_both_clients(ca_file: Path) -> None:
    settings = secured(ca_file, app_id="unit-secured")
    app = new_app(settings)
    assert isinstance(app.conf.broker_credentials, SASLCredentials)
    assert app.conf.broker_credentials.username == "pieceflow-worker"
    # What the librdkafka producer merges into its configuration.
    assert isinstance(app.transport, Transport)
    assert app.transport.kafka_config == settings.kafka_config()


def test_sasl_needs_a_user_and_a_password() -> None:
    with pytest.raises(ValidationError, match="PIECEFLOW_SASL_USERNAME and PIECEFLOW_SASL_PASSWORD"):
        Settings(security_protocol="SASL_SSL", sasl_username="someone")


def test_a_missing_ca_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="PIECEFLOW_SSL_CA_LOCATION"):
        Settings(security_protocol="SSL", ssl_ca_location=tmp_path / "missing.pem")


def test_a_child_process_reaches_the_same_cluster(ca_file: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    parent = secured(ca_file)
    for name, value in parent.cluster_env().items():
        monkeypatch.setenv(name, value)
    child = Settings()
    assert child.kafka_config() == parent.kafka_config()
    assert child.schema_registry_url == parent.schema_registry_url


def test_the_cli_names_the_variable_of_an_invalid_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PIECEFLOW_SECURITY_PROTOCOL", "SASL_SSL")
    monkeypatch.delenv("PIECEFLOW_SASL_USERNAME", raising=False)
    monkeypatch.setattr("sys.argv", ["pieceflow", "topics", "create"])
    get_settings.cache_clear()
    try:
        with pytest.raises(SystemExit) as exit_:
            cli.main()
    finally:
        get_settings.cache_clear()
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "PIECEFLOW_SECURITY_PROTOCOL=SASL_SSL needs PIECEFLOW_SASL_USERNAME" in err
    assert "Traceback" not in err


def test_every_kafka_client_takes_its_connection_from_the_settings() -> None:
    """A client configured with a bare bootstrap address would ignore TLS and SASL and fail on a secured
    cluster. Only the local stack's own readiness check (always plain text) may do that."""
    allowed = {"streams/settings.py", "streams/stack.py", "streams/rdkafka_producer.py"}
    offenders = [
        str(path.relative_to(ROOT))
        for folder in ("streams", "connectors")
        for path in (ROOT / folder).rglob("*.py")
        if str(path.relative_to(ROOT)) not in allowed
        and re.search(r"[\"']bootstrap\.servers[\"']|bootstrap_servers=", path.read_text())
    ]
    assert offenders == []
