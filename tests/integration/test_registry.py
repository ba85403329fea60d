"""The real registry (Apicurio, Confluent-compatible API) enforces BACKWARD_TRANSITIVE compatibility."""

from __future__ import annotations

import json
import uuid

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient, topic_subject_name_strategy
from confluent_kafka.schema_registry.avro import AvroDeserializer, AvroSerializer
from confluent_kafka.schema_registry.error import SchemaRegistryError
from confluent_kafka.serialization import MessageField, SerializationContext

V1 = {
    "type": "record",
    "name": "Probe",
    "namespace": "pieceflow.test",
    "fields": [{"name": "order_id", "type": "string"}, {"name": "quantity", "type": "int"}],
}
# Adds a field with a default: old data stays readable.
V2_COMPATIBLE = {**V1, "fields": [*V1["fields"], {"name": "note", "type": "string", "default": ""}]}
# Adds a field without a default: a v2 reader cannot read v1 data.
V2_INCOMPATIBLE = {**V1, "fields": [*V1["fields"], {"name": "station", "type": "string"}]}


@pytest.fixture
def client(registry_url: str) -> SchemaRegistryClient:
    return SchemaRegistryClient({"url": registry_url, "timeout": 10})


def test_global_compatibility_is_backward_transitive(client: SchemaRegistryClient) -> None:
    assert client.get_compatibility() == "BACKWARD_TRANSITIVE"


def test_registry_refuses_incompatible_and_accepts_compatible(client: SchemaRegistryClient) -> None:
    subject = f"probe-{uuid.uuid4().hex[:8]}-value"
    first = client.register_schema(subject, Schema(json.dumps(V1), "AVRO"))
    with pytest.raises(SchemaRegistryError) as refused:
        client.register_schema(subject, Schema(json.dumps(V2_INCOMPATIBLE), "AVRO"))
    assert refused.value.http_status_code == 409
    second = client.register_schema(subject, Schema(json.dumps(V2_COMPATIBLE), "AVRO"))
    assert second != first
    assert [v for v in client.get_versions(subject)] == [1, 2]


def test_confluent_serializer_round_trip_uses_registry_ids(client: SchemaRegistryClient) -> None:
    topic = f"probe-{uuid.uuid4().hex[:8]}"
    ctx = SerializationContext(topic, MessageField.VALUE)
    # The topic strategy, as pieceflow's producers use: the default in confluent-kafka 2.16 first asks
    # the registry for subject associations, an API Apicurio does not have.
    serializer = AvroSerializer(client, json.dumps(V1), conf={"subject.name.strategy": topic_subject_name_strategy})
    data = serializer({"order_id": "A1", "quantity": 2}, ctx)
    assert data is not None and data[0] == 0
    schema_id = int.from_bytes(data[1:5], "big")
    assert client.get_latest_version(f"{topic}-value").schema_id == schema_id
    assert AvroDeserializer(client)(data, ctx) == {"order_id": "A1", "quantity": 2}
