"""connectors/connect/debezium-jdbc-sink.json against what the Debezium JDBC sink and the Apicurio
converter document as required.

Where the rules come from:

- Debezium 3.x JDBC sink, ``documentation/modules/ROOT/pages/connectors/jdbc.adoc`` at tag
  ``v3.6.1.Final`` (https://debezium.io/documentation/reference/stable/connectors/jdbc.html, "JDBC
  connector configuration properties"). These properties have "No default": ``name``,
  ``connector.class`` (``io.debezium.connector.jdbc.JdbcSinkConnector``), ``topics`` or
  ``topics.regex`` (not both), ``connection.url``, ``connection.username`` and
  ``connection.password``. The value sets of ``insert.mode``, ``primary.key.mode`` and
  ``schema.evolution`` come from the same tables. ``primary.key.fields`` is required for a primitive
  record key and names value fields for ``record_value``.
- ``JdbcSinkConnectorConfig.java`` (same tag). ``connection.url`` and ``connection.username`` are
  ``.required()``. ``validateInsertMode``: upsert needs ``primary.key.mode``.
  ``validateDeleteEnabled``: ``delete.enabled=true`` needs ``primary.key.mode=record_key``.
- The same jdbc.adoc, "Data and type mappings": the record value must be a flat ``Struct`` (no
  nested structs) or a Debezium change-event envelope.
- Apicurio Registry 3.3 ``SerdeConfig`` / ``SchemaResolverConfig`` / ``KafkaSerdeConfig``:
  ``apicurio.registry.url`` is required. ``apicurio.registry.id-handler``,
  ``apicurio.registry.use-id`` and ``apicurio.registry.headers.enabled`` select the wire layout.
  See connectors/connect/README.md.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from streams.schemas import load_schema
from streams.settings import Settings

CONFIG_FILE = Path(__file__).resolve().parents[2] / "connectors" / "connect" / "debezium-jdbc-sink.json"

REQUIRED = ("connector.class", "connection.url", "connection.username", "connection.password")
INSERT_MODES = {"insert", "update", "upsert"}
PRIMARY_KEY_MODES = {"none", "kafka", "record_key", "record_value", "record_header"}
SCHEMA_EVOLUTION = {"none", "basic"}
APICURIO_AVRO = "io.apicurio.registry.utils.converter.AvroConverter"


@pytest.fixture(scope="module")
def connector() -> dict[str, Any]:
    loaded = json.loads(CONFIG_FILE.read_text())
    assert isinstance(loaded, dict)
    return loaded


@pytest.fixture(scope="module")
def config(connector: dict[str, Any]) -> dict[str, str]:
    return dict(connector["config"])


def test_it_is_a_connect_rest_payload_with_string_values(connector: dict[str, Any]) -> None:
    assert set(connector) == {"name", "config"} and connector["name"]
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in connector["config"].items())


def test_the_documented_required_keys_are_set(config: dict[str, str]) -> None:
    missing = [key for key in REQUIRED if not config.get(key)]
    assert missing == []
    assert config["connector.class"] == "io.debezium.connector.jdbc.JdbcSinkConnector"
    assert ("topics" in config) != ("topics.regex" in config), "exactly one of topics / topics.regex"


def test_writes_are_idempotent_upserts_on_a_declared_key(config: dict[str, str]) -> None:
    assert config["insert.mode"] in INSERT_MODES
    assert config["primary.key.mode"] in PRIMARY_KEY_MODES
    assert config.get("schema.evolution", "none") in SCHEMA_EVOLUTION
    # Redelivery after a Connect restart must not add rows: upsert on a key (validateInsertMode).
    assert config["insert.mode"] == "upsert"
    assert config["primary.key.mode"] in ("record_key", "record_value")
    assert config["primary.key.fields"].strip()
    if config.get("delete.enabled", "false") == "true":
        assert config["primary.key.mode"] == "record_key"  # validateDeleteEnabled


def test_the_database_is_the_erp_database() -> None:
    raw = json.loads(CONFIG_FILE.read_text())["config"]
    jdbc = urlsplit(raw["connection.url"].removeprefix("jdbc:"))
    ours = urlsplit(Settings().database_url)
    assert raw["connection.url"].startswith("jdbc:postgresql://")
    assert (jdbc.hostname, jdbc.port, jdbc.path) == (ours.hostname, ours.port, ours.path)
    assert raw["connection.username"] == ours.username


def test_the_value_converter_reads_the_confluent_wire_format_from_apicurio(config: dict[str, str]) -> None:
    assert config["key.converter"] == "org.apache.kafka.connect.storage.StringConverter"  # keys are raw ids
    assert config["value.converter"] == APICURIO_AVRO
    url = urlsplit(config["value.converter.apicurio.registry.url"])
    defaults = Settings()
    assert (url.hostname, url.port, url.path) == (defaults.host, defaults.registry_port, "/apis/registry/v3")
    # magic byte + 4-byte id in the payload, the id being what ccompat hands out (the content id)
    assert config["value.converter.apicurio.registry.headers.enabled"] == "false"
    assert config["value.converter.apicurio.registry.id-handler"] == "io.apicurio.registry.serde.Default4ByteIdHandler"
    assert config["value.converter.apicurio.registry.use-id"] == "contentId"


def test_every_transform_is_declared(config: dict[str, str]) -> None:
    for name in filter(None, (n.strip() for n in config.get("transforms", "").split(","))):
        assert config.get(f"transforms.{name}.type"), name


def _branches(schema: Any) -> list[Any]:
    """The non-null types of a field: one, or more for a real union."""
    return [b for b in (schema if isinstance(schema, list) else [schema]) if b != "null"]


def _column_problems(path: str, schema: dict[str, Any], flatten: bool) -> list[str]:
    """Why a record would not map to flat columns (recursing into nested records)."""
    problems = []
    for f in schema["fields"]:
        where = f"{path}.{f['name']}"
        branches = _branches(f["type"])
        if len(branches) > 1:
            problems.append(f"{where}: a union of {len(branches)} types")
        for branch in branches:
            kind = branch.get("type") if isinstance(branch, dict) else branch
            # Arrays and maps have no column mapping; nested records need the Flatten transform.
            if kind in ("array", "map"):
                problems.append(f"{where} is an {kind}")
            elif kind == "record":
                if not flatten:
                    problems.append(f"{where} is a nested record but nothing flattens it")
                problems += _column_problems(where, branch, flatten)
    return problems


def test_each_topic_carries_one_record_that_flattens_into_columns(config: dict[str, str]) -> None:
    from streams import topology

    specs = {spec.name: spec for spec in topology.TOPICS}
    key_fields = [f.strip() for f in config["primary.key.fields"].split(",")]
    flatten = any(
        config.get(f"transforms.{n.strip()}.type", "").startswith("org.apache.kafka.connect.transforms.Flatten")
        for n in config.get("transforms", "").split(",")
    )
    for topic in config["topics"].split(","):
        spec = specs[topic]
        # One table per topic: several record types would be merged into one set of columns.
        assert len(spec.values) == 1, topic
        schema = load_schema(spec.values[0])
        assert set(key_fields) <= {f["name"] for f in schema["fields"]}, topic
        assert _column_problems(topic, schema, flatten) == []


def test_the_column_check_catches_what_the_sink_cannot_map() -> None:
    accepted = load_schema("OrderAccepted")  # lines: an array of records
    assert any("lines is an array" in p for p in _column_problems("decisions", accepted, flatten=True))
    dispatched = load_schema("OrderDispatched")
    assert any("nested record" in p for p in _column_problems("dispatched", dispatched, flatten=False))
