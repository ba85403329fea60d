"""Reference data on compacted topics: publishing the catalog and reading it back in a worker."""

from __future__ import annotations

import logging
import time
import uuid
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Producer, TopicPartition

from streams.catalog import Catalog, CatalogError, catalog_from_avro, catalog_to_avro
from streams.codec import AvroRegistry, DecodeError, RegistryUnavailable
from streams.events import utc_now
from streams.producer_config import PRODUCER_DEFAULTS
from streams.settings import Settings

log = logging.getLogger(__name__)

PRODUCTS_TOPIC = "catalog.products.v1"
STATIONS_TOPIC = "catalog.stations.v1"


def publish_catalog(catalog: Catalog, settings: Settings, registry: AvroRegistry) -> tuple[int, int]:
    """Write every product and station, keyed by sku and station id; returns the counts."""
    producer = Producer({**settings.kafka_config(), **PRODUCER_DEFAULTS})
    products, stations = catalog_to_avro(catalog, utc_now())
    for product in products:
        value = registry.encode(PRODUCTS_TOPIC, "CatalogProduct", product)
        producer.produce(PRODUCTS_TOPIC, key=product["sku"].encode(), value=value)
    for station in stations:
        value = registry.encode(STATIONS_TOPIC, "Station", station)
        producer.produce(STATIONS_TOPIC, key=station["station_id"].encode(), value=value)
    if producer.flush(30) > 0:
        raise RuntimeError("Kafka did not confirm the catalog within 30s: check `pieceflow stack status`")
    return len(products), len(stations)


class ReferenceData:
    """The latest product and station records, read without a consumer group so every worker sees all."""

    def __init__(self, settings: Settings, registry: AvroRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self._consumer: Consumer | None = None
        self._waiting: list[Any] = []  # records read but not applied: the registry did not answer for them
        self.products: dict[str, dict[str, Any]] = {}
        self.stations: dict[str, dict[str, Any]] = {}
        self.catalog: Catalog = catalog_from_avro("empty", [], [])

    @property
    def consumer(self) -> Consumer:
        # Created on first use: importing the topology (e.g. for `pieceflow topics`) must not connect.
        if self._consumer is None:
            self._consumer = Consumer(
                {
                    **self.settings.kafka_config(),
                    "group.id": f"pieceflow-reference-{uuid.uuid4().hex[:8]}",
                    "enable.auto.commit": False,
                    "auto.offset.reset": "earliest",
                }
            )
        return self._consumer

    def load(self, timeout: float = 30.0) -> Catalog:
        """Read both topics to their end; raise if that takes longer than ``timeout``."""
        partitions = []
        for topic in (PRODUCTS_TOPIC, STATIONS_TOPIC):
            meta = self.consumer.list_topics(topic, timeout=timeout).topics[topic]
            if meta.error is not None:
                raise RuntimeError(f"topic {topic} is missing: run `pieceflow topics create`")
            partitions += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in meta.partitions]
        self.consumer.assign(partitions)
        ends = {(tp.topic, tp.partition): self.consumer.get_watermark_offsets(tp, timeout)[1] for tp in partitions}
        positions = dict.fromkeys(ends, 0)
        deadline = time.monotonic() + timeout
        while any(positions[k] < ends[k] for k in ends):
            if time.monotonic() > deadline:
                raise RuntimeError(f"reading the catalog took over {timeout:.0f}s")
            msg = self.consumer.poll(0.2)
            if msg is None:
                continue
            try:
                applied = self._apply(msg)
            except RegistryUnavailable as exc:
                raise RuntimeError(f"reading the catalog needs the schema registry: {exc}; "
                                   "check `pieceflow stack status`") from exc
            if applied:
                positions[(msg.topic() or "", msg.partition() or 0)] = (msg.offset() or 0) + 1
        self._rebuild()
        return self.catalog

    def refresh(self) -> bool:
        """Apply whatever arrived since the last call, without waiting; True when the catalog changed.

        A record whose schema the registry did not return waits, with every record after it, for the
        next call: skipping it would leave the catalog without that product or station for good.
        """
        if self._consumer is None:
            return False
        records = self._waiting or self.consumer.consume(num_messages=500, timeout=0)
        self._waiting = []
        changed = False
        for i, msg in enumerate(records):
            try:
                changed = self._apply(msg) or changed
            except RegistryUnavailable as exc:
                log.warning("Reference data waits for the schema registry (%d records): %s", len(records) - i, exc)
                self._waiting = records[i:]
                break
        if not changed:
            return False
        try:
            self._rebuild()
        except CatalogError as exc:  # e.g. new products read before the stations that make them
            log.warning("Reference data is not a complete catalog yet; the previous one stays: %s", exc)
            return False
        return True

    def _apply(self, msg: Any) -> bool:
        if msg.error() is not None:
            if msg.error().code() == KafkaError._PARTITION_EOF:
                return False
            raise RuntimeError(f"reading reference data failed: {msg.error()}")
        key = msg.key().decode()
        target = self.products if msg.topic() == PRODUCTS_TOPIC else self.stations
        if msg.value() is None:  # a tombstone retires the product or station
            target.pop(key, None)
            return True
        try:
            target[key] = self.registry.decode(msg.value()).value
        except RegistryUnavailable:
            raise
        except DecodeError as exc:  # not a record this code can read: the offset still advances
            log.warning("Skipping unreadable reference record %s[%s]@%s: %s",
                        msg.topic(), msg.partition(), msg.offset(), exc)
        return True

    def _rebuild(self) -> None:
        self.catalog = catalog_from_avro("kafka", self.products.values(), self.stations.values())

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
