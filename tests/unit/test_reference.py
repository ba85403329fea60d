"""A worker's catalog refresh: a registry outage delays catalog records, it never drops them."""

from __future__ import annotations

from typing import Any

import pytest

from streams.catalog import Catalog, catalog_to_avro
from streams.codec import Decoded, DecodeError, RegistryUnavailable
from streams.reference import PRODUCTS_TOPIC, STATIONS_TOPIC, ReferenceData
from streams.settings import Settings
from tests.unit.conftest import T0


class Record:
    """A consumed record whose value names what the fake registry decodes it to."""

    def __init__(self, topic: str, offset: int, key: str) -> None:
        self._topic, self._offset, self._key = topic, offset, key

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return 0

    def offset(self) -> int:
        return self._offset

    def key(self) -> bytes:
        return self._key.encode()

    def value(self) -> bytes:
        return f"{self._topic}|{self._key}".encode()


class Consumer:
    """Hands out each batch once, as a consumer's position moves past what it returned."""

    def __init__(self, batches: list[list[Record]]) -> None:
        self.batches = batches

    def consume(self, num_messages: int, timeout: float) -> list[Record]:
        return self.batches.pop(0) if self.batches else []


class Registry:
    def __init__(self, values: dict[str, dict[str, Any]]) -> None:
        self.values = values
        self.up = True
        self.unreadable: set[str] = set()

    def decode(self, data: bytes) -> Decoded:
        if not self.up:
            raise RegistryUnavailable("the registry did not answer for schema id 7")
        if data.decode() in self.unreadable:
            raise DecodeError("body does not match schema 7")
        return Decoded("record", self.values[data.decode()])


@pytest.fixture
def published(restaurant: Catalog) -> tuple[list[Record], Registry]:
    """The restaurant catalog as records on the two topics, stations first, and a registry that reads them."""
    products, stations = catalog_to_avro(restaurant, T0)
    keyed = [(STATIONS_TOPIC, s["station_id"], s) for s in stations] + [(PRODUCTS_TOPIC, p["sku"], p) for p in products]
    records = [Record(topic, i, key) for i, (topic, key, _) in enumerate(keyed)]
    return records, Registry({f"{topic}|{key}": value for topic, key, value in keyed})


def reference(settings: Settings, registry: Registry, batches: list[list[Record]]) -> ReferenceData:
    data = ReferenceData(settings, registry)  # type: ignore[arg-type]
    data._consumer = Consumer(batches)  # type: ignore[assignment]
    return data


def test_records_wait_for_the_registry_and_are_applied_once_it_answers(
    settings: Settings, restaurant: Catalog, published: tuple[list[Record], Registry],
) -> None:
    records, registry = published
    data = reference(settings, registry, [records])

    registry.up = False
    assert data.refresh() is False
    assert data.catalog.products == {}

    registry.up = True
    assert data.refresh() is True  # nothing new arrived: the records that waited are applied
    assert sorted(data.catalog.products) == sorted(restaurant.products)
    assert data.refresh() is False


def test_an_unreadable_record_is_skipped_and_the_rest_applied(
    settings: Settings, restaurant: Catalog, published: tuple[list[Record], Registry],
    caplog: pytest.LogCaptureFixture,
) -> None:
    records, registry = published
    bad = records[-1]
    registry.unreadable.add(bad.value().decode())
    data = reference(settings, registry, [records])

    assert data.refresh() is True
    assert sorted(data.catalog.products) == sorted(set(restaurant.products) - {bad.key().decode()})
    assert f"{PRODUCTS_TOPIC}[0]@{bad.offset()}" in caplog.text


def test_products_read_before_their_stations_keep_the_previous_catalog(
    settings: Settings, restaurant: Catalog, published: tuple[list[Record], Registry],
) -> None:
    records, registry = published
    stations = [r for r in records if r.topic() == STATIONS_TOPIC]
    products = [r for r in records if r.topic() == PRODUCTS_TOPIC]
    data = reference(settings, registry, [products, stations])

    assert data.refresh() is False  # products that no station can make: not a catalog yet
    assert data.catalog.products == {}
    assert data.refresh() is True
    assert sorted(data.catalog.products) == sorted(restaurant.products)
