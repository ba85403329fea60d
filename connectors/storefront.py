"""The producer API for storefronts that write orders to Kafka directly.

Orders go out in the Confluent Avro wire format with CloudEvents binary-mode headers, partitioned
with murmur2 like the Faust workers (librdkafka's default CRC32 would put an order id on a
different partition than the pipeline expects).
"""

from __future__ import annotations

import threading
from typing import Any

from confluent_kafka import KafkaError, Message, Producer

from streams.codec import AvroRegistry, Typed
from streams.producer_config import PRODUCER_DEFAULTS
from streams.settings import Settings


class DeliveryError(RuntimeError):
    """Kafka did not confirm the write; the caller must not report the order as accepted."""


def cloudevent_headers(event: Typed, source: str) -> list[tuple[str, str | bytes | None]]:
    return [
        ("ce_specversion", b"1.0"),
        ("ce_id", str(event.value["event_id"]).encode()),
        ("ce_type", f"pieceflow.v1.{event.type}".encode()),
        ("ce_source", source.encode()),
        ("content-type", b"application/avro"),
    ]


class OrderProducer:
    """Sends storefront events (OrderPlaced, OrderAmended, OrderCancelled) keyed by order id."""

    def __init__(
        self,
        settings: Settings,
        topic: str,
        source: str = "urn:pieceflow:storefront",
        registry: AvroRegistry | None = None,
        config: dict[str, Any] | None = None,
    ) -> None:
        self.topic = topic
        self.source = source
        self.registry = registry or AvroRegistry.from_url(settings.schema_registry_url)
        self.producer = Producer(
            {**settings.kafka_config(), **PRODUCER_DEFAULTS, **(config or {})}
        )

    def send(self, event: Typed, key: str) -> None:
        """Queue one event; ``flush`` or ``send_confirmed`` report whether Kafka has it."""
        self.producer.produce(
            self.topic,
            key=key.encode(),
            value=self.registry.encode(self.topic, event.type, event.value),
            headers=cloudevent_headers(event, self.source),
        )
        self.producer.poll(0)

    def send_confirmed(self, event: Typed, key: str, timeout: float = 10.0) -> Message:
        """Send one event and block until the brokers confirm it (acks=all), or raise DeliveryError."""
        done = threading.Event()
        outcome: dict[str, Any] = {}

        def on_delivery(err: KafkaError | None, msg: Message) -> None:
            outcome["err"], outcome["msg"] = err, msg
            done.set()

        self.producer.produce(
            self.topic,
            key=key.encode(),
            value=self.registry.encode(self.topic, event.type, event.value),
            headers=cloudevent_headers(event, self.source),
            on_delivery=on_delivery,
        )
        deadline_polls = max(1, int(timeout / 0.05))
        for _ in range(deadline_polls):
            self.producer.poll(0.05)
            if done.is_set():
                break
        if not done.is_set():
            raise DeliveryError(f"Kafka did not confirm the write within {timeout:.0f}s")
        if outcome["err"] is not None:
            raise DeliveryError(f"Kafka refused the write: {outcome['err']}")
        msg: Message = outcome["msg"]
        return msg

    def flush(self, timeout: float = 30.0) -> int:
        """Wait for every queued event; returns how many are still undelivered."""
        remaining: int = self.producer.flush(timeout)
        return remaining
