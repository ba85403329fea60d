"""The agents' producer (librdkafka under Faust's producer interface) on the real broker.

What Faust relies on: keys, values and headers arrive as sent; a key lands on the partition aiokafka's
Java-compatible partitioner picks (the stores and the intake partition the same keys); and a record Kafka
refuses makes ``flush`` raise, so the offsets of the event that produced it are never committed.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable
from typing import Any

from aiokafka.partitioner import DefaultPartitioner
from confluent_kafka import Consumer

from streams.faust_config import new_app
from streams.rdkafka_producer import ProduceFailed, Producer
from streams.settings import Settings
from tests.conftest import wait_until


def new_producer(settings: Settings, bootstrap: str) -> Producer:
    app_id = f"producer-{uuid.uuid4().hex[:8]}"
    producer = new_app(settings.model_copy(update={"bootstrap_servers": bootstrap, "app_id": app_id})).producer
    assert isinstance(producer, Producer)
    return producer


def read_all(bootstrap: str, topic: str, count: int) -> list[tuple[Any, ...]]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": uuid.uuid4().hex, "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    got: list[tuple[Any, ...]] = []

    def more() -> bool:
        msg = consumer.poll(0.2)
        if msg is not None and msg.error() is None:
            got.append((msg.partition(), msg.key(), msg.value(), msg.headers() or []))
        return len(got) >= count

    try:
        wait_until(more, 30, f"{count} records on {topic}")
    finally:
        consumer.close()
    return got


def test_records_arrive_whole_on_the_java_partition(
    settings: Settings, bootstrap: str, new_topic: Callable[..., str]
) -> None:
    topic = new_topic("rdkafka", partitions=4)
    keys = [f"order-{i}".encode() for i in range(12)]

    async def send() -> list[int]:
        producer = new_producer(settings, bootstrap)
        await producer.start()
        try:
            futures = [
                await producer.send(topic, key, b"v-" + key, None, None, {"trace": key}) for key in keys
            ]
            await producer.flush()
            return [(await future).offset for future in futures]
        finally:
            await producer.stop()

    offsets = asyncio.run(send())
    assert all(offset >= 0 for offset in offsets)
    java = DefaultPartitioner()
    for partition, key, value, headers in read_all(bootstrap, topic, len(keys)):
        assert key is not None
        assert partition == java(key, [0, 1, 2, 3], [0, 1, 2, 3])
        assert value == b"v-" + key
        assert headers == [("trace", key)]


def test_a_refused_record_makes_flush_raise(settings: Settings, bootstrap: str, new_topic: Callable[..., str]) -> None:
    topic = new_topic("rdkafka-refused", config={"max.message.bytes": "1024"})

    async def send() -> None:
        producer = new_producer(settings, bootstrap)
        await producer.start()
        try:
            future = await producer.send(topic, b"k", b"x" * 4096, None, None, None)
            try:
                await producer.flush()
            except ProduceFailed as failed:
                assert topic in str(failed)
            else:
                raise AssertionError("flush returned although Kafka refused the record")
            assert isinstance(future.exception(), ProduceFailed)  # type: ignore[attr-defined]
        finally:
            await producer.stop()

    asyncio.run(send())
