"""Faust talks to Kafka through aiokafka; Kafka 4 removed old protocol versions (KIP-896).

These tests prove, on the real broker, that the pinned aiokafka does everything Faust needs:
produce, consume in a group, commit, rebalance, and transactions.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Callable

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.errors import KafkaConnectionError

BOUND = 30.0


async def _drain(consumer: AIOKafkaConsumer, count: int) -> list[tuple[bytes, bytes]]:
    got: list[tuple[bytes, bytes]] = []
    async with asyncio.timeout(BOUND):
        while len(got) < count:
            batch = await consumer.getmany(timeout_ms=500)
            for records in batch.values():
                got.extend((r.key, r.value) for r in records)
    return got


def test_produce_consume_commit_in_a_group(bootstrap: str, new_topic: Callable[..., str]) -> None:
    topic = new_topic("compat", partitions=2)
    group = f"compat-{uuid.uuid4().hex[:8]}"

    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=0)
        await producer.start()
        try:
            for i in range(20):
                await producer.send_and_wait(topic, f"v{i}".encode(), key=f"order-{i % 5}".encode())
        finally:
            await producer.stop()

        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            group_id=group,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        await consumer.start()
        try:
            got = await _drain(consumer, 20)
            await consumer.commit()
            committed = {p: await consumer.committed(TopicPartition(topic, p)) for p in (0, 1)}
        finally:
            await consumer.stop()
        assert sorted(v for _, v in got) == sorted(f"v{i}".encode() for i in range(20))
        assert sum(offset or 0 for offset in committed.values()) == 20

        # A new member of the group resumes from the commit and sees nothing old.
        again = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, group_id=group, auto_offset_reset="earliest"
        )
        await again.start()
        try:
            batch = await again.getmany(timeout_ms=2000)
            assert not any(batch.values())
        finally:
            await again.stop()

    asyncio.run(run())


def test_rebalance_splits_partitions_between_members(bootstrap: str, new_topic: Callable[..., str]) -> None:
    topic = new_topic("rebalance", partitions=2)
    group = f"rebalance-{uuid.uuid4().hex[:8]}"

    async def run() -> None:
        first = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group)
        await first.start()
        second = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, group_id=group)
        try:
            async with asyncio.timeout(BOUND):
                while len(first.assignment()) != 2:
                    await first.getmany(timeout_ms=200)
            await second.start()
            async with asyncio.timeout(BOUND):
                while not (len(first.assignment()) == 1 and len(second.assignment()) == 1):
                    await asyncio.gather(first.getmany(timeout_ms=200), second.getmany(timeout_ms=200))
            assert first.assignment() | second.assignment() == {
                TopicPartition(topic, 0),
                TopicPartition(topic, 1),
            }
        finally:
            await second.stop()
            await first.stop()

    asyncio.run(run())


def test_transactions_commit_and_abort(bootstrap: str, new_topic: Callable[..., str]) -> None:
    topic = new_topic("txn")

    async def run() -> None:
        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, transactional_id=f"txn-{uuid.uuid4().hex[:8]}"
        )
        await producer.start()
        try:
            async with producer.transaction():
                await producer.send_and_wait(topic, b"committed")
            await producer.begin_transaction()
            await producer.send_and_wait(topic, b"aborted")
            await producer.abort_transaction()
            async with producer.transaction():
                await producer.send_and_wait(topic, b"after")
        finally:
            await producer.stop()

        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=bootstrap,
            isolation_level="read_committed",
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            got = await _drain(consumer, 2)
        finally:
            await consumer.stop()
        assert [v for _, v in got] == [b"committed", b"after"]

    asyncio.run(run())


def test_unreachable_broker_fails_fast_with_a_clear_error() -> None:
    async def run() -> None:
        producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", request_timeout_ms=2000)
        with pytest.raises(KafkaConnectionError):
            await producer.start()
        await producer.stop()

    asyncio.run(run())
