"""The worker's consumer: what a seek to the committed offsets does to records already fetched.

Faust's own code runs (``Consumer.getmany``, which turns records into messages, and the app's
consumer thread object); only aiokafka is replaced, by a fake holding two partitions: a stream
partition with a committed offset, and a changelog partition without one, whose position a seek
leaves alone, as aiokafka does. The consumer thread's hop between event loops is skipped: both
sides run on the test's loop. Each delivered message goes into an agent's buffer, a queue under the
app's flow control, as Faust's conductor puts it there.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from aiokafka.structs import ConsumerRecord, TopicPartition
from faust.types import TP, Message
from mode.utils.queues import FlowControlQueue

from streams.aiokafka_consumer import Batch, Consumer
from streams.faust_config import new_app
from streams.settings import Settings

STREAM = TopicPartition("orders.inbound.v1", 0)
CHANGELOG = TopicPartition("app-validation-state-changelog", 0)


class FakeAiokafka:
    """Partitions of 20 records; ``fetched_records`` returns up to ``batch`` of each from its position."""

    def __init__(self, committed: dict[TopicPartition, int | None], batch: int = 3) -> None:
        self.on_fetch: Callable[[], None] = lambda: None
        self.committed_offsets = committed
        self.position = {tp: offset or 0 for tp, offset in committed.items()}
        self.batch = batch
        self._closed = False
        self._fetcher = self
        self._subscriptions = self

    @contextlib.contextmanager
    def fetch_context(self) -> Iterator[None]:
        yield

    async def fetched_records(self, partitions: Any, timeout: float = 0, max_records: Any = None) -> dict[Any, Any]:
        records = {}
        for tp, position in self.position.items():
            taken = [record(tp, offset) for offset in range(position, min(position + self.batch, 20))]
            if taken:
                records[tp] = taken
                self.position[tp] += len(taken)
        self.on_fetch()
        return records

    async def committed(self, tp: TopicPartition) -> int | None:
        return self.committed_offsets[tp]

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.position[tp] = offset

    def assignment(self) -> set[TopicPartition]:
        return set(self.position)

    def highwater(self, tp: Any) -> int:
        return 20


def record(tp: TopicPartition, offset: int) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(tp.topic, tp.partition, offset, 0, 0, b"k", b"v", None, 1, 1, [])


@dataclass
class Buffered:
    message: Message


@pytest.fixture
def consumer(settings: Settings) -> Iterator[tuple[Consumer, FakeAiokafka]]:
    app = new_app(settings.model_copy(update={"app_id": "unit-consumer", "bootstrap_servers": "127.0.0.1:1"}))
    consumer = app.consumer
    assert isinstance(consumer, Consumer)
    consumer.agent_buffer = app.FlowControlQueue(maxsize=100, clear_on_resume=True)  # type: ignore[attr-defined]
    app.flow_control.resume()
    fake = FakeAiokafka({STREAM: 5, CHANGELOG: None})
    thread = consumer._thread
    thread._consumer = fake

    async def getmany(active_partitions: Any, timeout: float) -> Batch:
        return await thread._fetch_records(fake, active_partitions, timeout=timeout)

    thread.getmany = getmany  # type: ignore[method-assign]
    thread.seek_to_committed = thread._seek_to_committed  # type: ignore[method-assign]
    thread.rewind = thread._rewind  # type: ignore[method-assign]
    consumer.resume_partitions({TP(tp.topic, tp.partition) for tp in fake.position})  # as after recovery
    yield consumer, fake


def part(tp: Any) -> str:
    return "changelog" if tp == CHANGELOG else "stream"


async def delivered(consumer: Consumer, seek_after: int | None = None) -> list[tuple[str, int]]:
    """(partition, offset) of the messages one ``getmany`` delivers, each put in the agent's buffer.

    With ``seek_after``, the seek lands while the stream's record at that offset is being handed over,
    before it reaches the buffer.
    """
    got = []
    async for tp, message in consumer.getmany(timeout=0):
        got.append((part(tp), message.offset))
        if tp == STREAM and message.offset == seek_after:
            await consumer.perform_seek()
        agent_buffer(consumer).put_nowait(Buffered(message))
    return got


def agent_buffer(consumer: Consumer) -> FlowControlQueue[Buffered]:
    return consumer.agent_buffer  # type: ignore[attr-defined]


def buffered(consumer: Consumer, partition: str) -> list[int]:
    return [item.message.offset for item in agent_buffer(consumer)._queue  # type: ignore[attr-defined]
            if part(item.message.tp) == partition]


def test_the_seek_moves_a_partition_and_its_read_offset_together(consumer: tuple[Consumer, FakeAiokafka]) -> None:
    c, fake = consumer
    fake.position[STREAM] = 9
    c._read_offset[TP(STREAM.topic, STREAM.partition)] = 8

    committed = asyncio.run(c._thread._seek_to_committed())

    assert committed == {STREAM: 5, CHANGELOG: None}
    assert fake.position == {STREAM: 5, CHANGELOG: 0}
    assert c._read_offset[TP(STREAM.topic, STREAM.partition)] == 5
    assert c._thread.moves == {STREAM: 1}


def test_without_a_seek_whole_batches_are_delivered(consumer: tuple[Consumer, FakeAiokafka]) -> None:
    c, _ = consumer
    got = asyncio.run(delivered(c))
    assert sorted(got) == [("changelog", 0), ("changelog", 1), ("changelog", 2), ("stream", 5), ("stream", 6),
                           ("stream", 7)]


def test_records_fetched_before_a_seek_are_read_again_not_delivered_after_it(
    consumer: tuple[Consumer, FakeAiokafka],
) -> None:
    c, fake = consumer

    async def scenario() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        during = await delivered(c, seek_after=5)  # the seek lands while stream offsets 6 and 7 wait
        return during, await delivered(c)

    during, after = asyncio.run(scenario())
    # Had 6 and 7 been delivered after the seek, Faust's drain loop would have moved the read offset
    # (set back to 5 by the seek) on to 7, and skipped the re-read 5 and 6 as already read.
    assert [offset for part, offset in during if part == "stream"] == [5]
    assert [offset for part, offset in after if part == "stream"] == [5, 6, 7]
    # The changelog has no committed offset, so the seek leaves it where it is: none of it is held back.
    changelog = [offset for part, offset in during + after if part == "changelog"]
    assert changelog == list(range(6))
    assert fake.position[STREAM] == 8
    # Offset 5 reached the agent's buffer after the seek had put it back to be read again: it was taken
    # out, so the agent gets it once, in order.
    assert buffered(c, "stream") == [5, 6, 7]


def test_records_buffered_before_a_seek_are_taken_out_and_read_again_once(
    consumer: tuple[Consumer, FakeAiokafka],
) -> None:
    c, fake = consumer

    async def scenario() -> None:
        await delivered(c)  # stream 5-7 and changelog 0-2 wait in the agent's buffer
        fake.position[STREAM] = 11  # and more was fetched, beyond what was delivered
        await c.perform_seek()
        await delivered(c)

    asyncio.run(scenario())
    # Kept, the agent would have processed 5-7, then 5-7 again after them.
    assert buffered(c, "stream") == [5, 6, 7]
    # The changelog did not move: its records stay, and go on from where it was.
    assert buffered(c, "changelog") == [0, 1, 2, 3, 4, 5]


def test_a_batch_dropped_because_the_flow_stopped_is_read_again_from_its_first_record(
    consumer: tuple[Consumer, FakeAiokafka],
) -> None:
    c, fake = consumer
    fake.on_fetch = c.stop_flow  # a rebalance starts while the fetch is under way

    async def scenario() -> tuple[list[tuple[str, int]], list[tuple[str, int]]]:
        dropped = await delivered(c)
        fake.on_fetch = lambda: None
        c.resume_flow()
        return dropped, await delivered(c)

    dropped, after = asyncio.run(scenario())
    assert dropped == []
    # Faust's own seek to the committed offsets would have moved only the stream back; the changelog
    # (no committed offset) would have gone on from offset 3, and its recovery waited for 0-2 forever.
    assert sorted(after) == [("changelog", 0), ("changelog", 1), ("changelog", 2), ("stream", 5), ("stream", 6),
                             ("stream", 7)]
