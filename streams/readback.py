"""Reading pipeline outputs back: every record of some topics from their current end, decoded.

The demo, the benchmark and the integration tests watch what the pipeline emits with this; it uses
no consumer group, so it never takes partitions from a worker or commits anything.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from streams.codec import AvroRegistry, DecodeError
from streams.settings import Settings


@dataclass(frozen=True)
class Record:
    topic: str
    key: str
    type: str
    value: dict[str, Any]
    headers: dict[str, bytes]
    raw: bytes
    partition: int
    offset: int


def assign_at_end(consumer: Consumer, topics: Iterable[str], timeout: float = 10.0) -> None:
    """Assign every partition of ``topics`` at its current end: read only what comes next."""
    partitions = []
    for topic in topics:
        meta = consumer.list_topics(topic, timeout=timeout).topics[topic]
        for p in meta.partitions:
            high = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout)[1]
            partitions.append(TopicPartition(topic, p, high))
    consumer.assign(partitions)


class Collector:
    """Consumes topics from their current end (no group) and keeps every record, decoded."""

    def __init__(self, settings: Settings, registry: AvroRegistry, topics: list[str]) -> None:
        self.registry = registry
        self.consumer = Consumer(
            {**settings.kafka_config(), "group.id": f"collector-{uuid.uuid4().hex[:8]}",
             "enable.auto.commit": False}
        )
        assign_at_end(self.consumer, topics)
        self.records: list[Record] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            msg = self.consumer.poll(0.05)
            if msg is None or msg.error() is not None:
                continue
            raw = msg.value() or b""
            try:
                decoded = self.registry.decode(raw)
                kind, value = decoded.type, decoded.value
            except DecodeError:
                kind, value = "undecodable", {}
            headers = {k: v if isinstance(v, bytes) else (v or "").encode() for k, v in _header_pairs(msg.headers())}
            record = Record(msg.topic() or "", (msg.key() or b"").decode(errors="replace"), kind, value, headers, raw,
                            msg.partition() or 0, msg.offset() or 0)
            with self.lock:
                self.records.append(record)

    def where(self, **match: Any) -> list[Record]:
        with self.lock:
            records = list(self.records)
        return [r for r in records if all(getattr(r, k) == v for k, v in match.items())]

    def for_orders(self, order_ids: set[str], kind: str | None = None) -> list[Record]:
        with self.lock:
            records = list(self.records)
        return [r for r in records if r.value.get("order_id") in order_ids and (kind is None or r.type == kind)]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.consumer.close()


def _header_pairs(headers: Any) -> list[tuple[str, Any]]:
    return list(headers or [])
