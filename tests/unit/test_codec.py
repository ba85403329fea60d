"""The wire format and its failure modes, with confluent-kafka's in-process registry double."""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, cast

import pytest
from confluent_kafka.schema_registry import SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from streams.codec import AvroCodec, AvroRegistry, Decoded, DecodeError, RegistryUnavailable, Undecodable
from streams.events import Event


@pytest.fixture
def registry() -> AvroRegistry:
    return AvroRegistry(SchemaRegistryClient.new_client({"url": "mock://codec-test"}))


def rejected() -> Event:
    now = datetime(2026, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)
    return Event("OrderRejected", "shop:1", {
        "event_id": "e1", "order_id": "shop:1", "seq": 3, "occurred_at": now, "recorded_at": now,
        "causation_id": None, "request": "PLACE", "rejected_event_id": "e0", "reason": "PRICE_MISMATCH",
        "detail": "total 13.00 != 12.50", "source_platform": "shop", "external_order_id": "1",
    })


def test_round_trip_keeps_times_and_enums(registry: AvroRegistry) -> None:
    event = rejected()
    data = registry.encode("orders.decisions.v1", event.type, event.value)
    assert data[0] == 0
    decoded = registry.decode(data)
    assert decoded == Decoded("OrderRejected", event.value)


def test_subjects_follow_topic_record_naming(registry: AvroRegistry) -> None:
    event = rejected()
    registry.encode("orders.decisions.v1", event.type, event.value)
    assert registry.client.get_subjects() == ["orders.decisions.v1-pieceflow.v1.OrderRejected"]


def test_money_stays_decimal(registry: AvroRegistry) -> None:
    from connectors.shopfront import build_order
    from streams.catalog import load_catalog_yaml
    from streams.resources import resource_dir

    catalog = load_catalog_yaml(resource_dir("deploy/catalogs") / "restaurant.yaml")
    order = build_order(catalog, [("kung-pao-chicken", 2, [("SUBSTITUTE", "vegetable", "asparagus")])],
                        external_id="9")
    value = registry.decode(registry.encode("orders.inbound.v1", "OrderPlaced", order)).value
    assert value["total"] == Decimal("28.00")
    assert isinstance(value["lines"][0]["unit_price"], Decimal)


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "shorter than the 5-byte"),
        (b"\x01\x00\x00\x00\x01abc", "magic byte"),
        (b"\x00\x00\x00\x7f\xffabc", "is not in the registry"),
    ],
)
def test_bad_bytes_raise_a_clear_error(registry: AvroRegistry, data: bytes, message: str) -> None:
    with pytest.raises(DecodeError, match=message):
        registry.decode(data)


def test_truncated_and_padded_bodies_are_refused(registry: AvroRegistry) -> None:
    event = rejected()
    data = registry.encode("orders.decisions.v1", event.type, event.value)
    with pytest.raises(DecodeError):
        registry.decode(data[:-3])
    with pytest.raises(DecodeError, match="trailing"):
        registry.decode(data + b"\x00")


def test_faust_codec_never_raises_on_receive(registry: AvroRegistry) -> None:
    codec = AvroCodec(registry, "orders.decisions.v1")
    assert isinstance(codec.loads(b"\x07garbage"), Undecodable)
    event = rejected()
    first = codec.loads(codec.dumps(event))
    assert isinstance(first, Undecodable) and first.retry is not None  # fetched by the agent, in a thread
    assert first.retry() == Decoded(event.type, event.value)
    assert codec.dumps(b"raw bytes") == b"raw bytes"  # dead letters keep the original bytes


def test_the_first_record_of_a_schema_id_is_fetched_off_the_event_loop(registry: AvroRegistry) -> None:
    data = AvroCodec(registry, "orders.decisions.v1").dumps(rejected())
    counting = FlakyRegistryClient(registry.client, [])
    reading = AvroCodec(AvroRegistry(cast(SchemaRegistryClient, counting)), "orders.decisions.v1")
    first = reading.loads(data)
    assert isinstance(first, Undecodable) and first.retry is not None
    assert "not fetched yet" in first.error
    assert counting.calls == 0  # Faust's loads made no registry request
    assert first.retry() == Decoded("OrderRejected", rejected().value)
    assert reading.loads(data) == Decoded("OrderRejected", rejected().value)  # cached from now on
    assert counting.calls == 1


class FlakyRegistryClient:
    """Delegates to a registry client, but answers ``get_schema`` with the given failures first."""

    def __init__(self, client: SchemaRegistryClient, failures: list[Exception]) -> None:
        self.client = client
        self.failures = failures
        self.calls = 0

    def get_schema(self, schema_id: int) -> Any:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return self.client.get_schema(schema_id)


def test_an_unanswered_schema_lookup_is_retryable_not_bad_input(registry: AvroRegistry) -> None:
    data = AvroCodec(registry, "orders.decisions.v1").dumps(rejected())
    flaky = FlakyRegistryClient(registry.client, [ConnectionError("connection refused")])
    reading = AvroCodec(AvroRegistry(cast(SchemaRegistryClient, flaky)), "orders.decisions.v1")
    value = reading.loads(data)
    assert isinstance(value, Undecodable) and value.retry is not None
    with pytest.raises(RegistryUnavailable, match="did not answer"):
        value.retry()
    assert value.retry() == Decoded("OrderRejected", rejected().value)  # the registry is back


def test_an_unknown_schema_id_is_refused_and_not_asked_for_again(registry: AvroRegistry) -> None:
    data = AvroCodec(registry, "orders.decisions.v1").dumps(rejected())
    flaky = FlakyRegistryClient(registry.client, [SchemaRegistryError(404, 40403, "Schema not found")])
    reading = AvroCodec(AvroRegistry(cast(SchemaRegistryClient, flaky)), "orders.decisions.v1")
    first = reading.loads(data)
    assert isinstance(first, Undecodable) and first.retry is not None
    with pytest.raises(DecodeError, match="is not in the registry: Schema not found"):
        first.retry()
    for _ in range(3):
        value = reading.loads(data)
        assert isinstance(value, Undecodable) and value.retry is None
        assert "is not in the registry: Schema not found" in value.error
    assert flaky.calls == 1


def test_a_registry_error_other_than_not_found_is_retryable(registry: AvroRegistry) -> None:
    data = AvroCodec(registry, "orders.decisions.v1").dumps(rejected())
    flaky = FlakyRegistryClient(registry.client, [SchemaRegistryError(503, 50301, "unavailable")])
    value = AvroCodec(AvroRegistry(cast(SchemaRegistryClient, flaky)), "orders.decisions.v1").loads(data)
    assert isinstance(value, Undecodable) and value.retry is not None
    with pytest.raises(RegistryUnavailable, match="failed to return"):
        value.retry()
