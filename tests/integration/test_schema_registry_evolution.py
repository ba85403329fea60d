"""The real registry accepts every current schema after its newest released version, under
BACKWARD_TRANSITIVE, and refuses an incompatible OrderPlaced (see ``schemas/released/README.md``).

Each run registers under fresh subjects, so it never touches the pipeline's own subjects and runs
alongside other tests on the shared stack.
"""

from __future__ import annotations

import contextlib
import copy
import json
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from streams import schemas
from tests.unit.test_schema_evolution import released_names, released_schema


@pytest.fixture
def client(registry_url: str) -> SchemaRegistryClient:
    return SchemaRegistryClient({"url": registry_url, "timeout": 10})


@pytest.fixture
def fresh_subjects(client: SchemaRegistryClient) -> Iterator[Any]:
    """Makes unique subject names; deletes them afterwards (best effort: the registry is shared)."""
    run = uuid.uuid4().hex[:8]
    made: list[str] = []

    def make(name: str) -> str:
        subject = f"evolution-{run}-pieceflow.v1.{name}"
        made.append(subject)
        return subject

    yield make
    for subject in made:
        with contextlib.suppress(SchemaRegistryError):
            client.delete_subject(subject)


def avro(schema: dict[str, Any]) -> Schema:
    return Schema(json.dumps(schema), "AVRO")


def test_registry_is_backward_transitive(client: SchemaRegistryClient) -> None:
    assert client.get_compatibility() == "BACKWARD_TRANSITIVE"


def test_every_current_schema_is_accepted_after_its_released_version(
    client: SchemaRegistryClient, fresh_subjects: Any
) -> None:
    names = released_names()
    assert names, "no released schemas"
    refused = {}
    for name in names:
        subject = fresh_subjects(name)
        released_id = client.register_schema(subject, avro(released_schema(name)))
        try:
            current_id = client.register_schema(subject, avro(schemas.load_schema(name)))
        except SchemaRegistryError as exc:
            refused[name] = f"{exc.http_status_code}: {exc.error_message}"
            continue
        versions = client.get_versions(subject)
        # An unchanged schema is the same registry entry; a changed one is a new version after it.
        assert (current_id == released_id and versions == [1]) or versions == [1, 2], (name, versions)
    assert refused == {}, "the registry refused current schemas as incompatible with the released ones"


def test_an_incompatible_order_placed_is_refused_with_409(client: SchemaRegistryClient, fresh_subjects: Any) -> None:
    subject = fresh_subjects("OrderPlaced")
    client.register_schema(subject, avro(released_schema("OrderPlaced")))
    client.register_schema(subject, avro(schemas.load_schema("OrderPlaced")))
    incompatible = copy.deepcopy(schemas.load_schema("OrderPlaced"))
    incompatible["fields"].append({"name": "station_hint", "type": "string", "doc": "new, without a default"})
    with pytest.raises(SchemaRegistryError) as refused:
        client.register_schema(subject, avro(incompatible))
    assert refused.value.http_status_code == 409
    # The refusal changed nothing: the subject still ends with what was accepted.
    latest = client.get_latest_version(subject)
    assert "station_hint" not in {f["name"] for f in json.loads(latest.schema.schema_str or "{}")["fields"]}
