"""Faust's aiokafka consumer, made safe for records already fetched when the consumer repositions.

Faust (faust-streaming 0.15) seeks every partition back to its committed offset at the end of each
rebalance, and again when a fetch returns after the flow has stopped (it then drops that batch).
Its drain loop skips, without a log line, every record below the partition's *read offset* (the
last offset it delivered). The seek moves aiokafka's position on the consumer thread and sets the
read offset later, on the worker's loop, which meanwhile keeps delivering. Three windows lose
records:

- a batch fetched before the seek and delivered after it moves the read offset past the records the
  seek is about to re-read, so they are all skipped;
- records fetched from the new position before the read offset is reset are compared with the old
  read offset, and skipped;
- a dropped batch is read again only where the seek moves the partition back; a table's changelog
  has no committed offset, stays where it is, and recovery then waits for its records forever.

A skipped record may not have been processed (a rebalance clears the agents' buffers), and Faust's
committed offset can then never pass it. Two workers sharing the pipeline lost orders, or stalled
with one worker stuck in table recovery, like this when the second joined under load.

So the seek runs partition by partition on the consumer thread and sets the read offset in the same
step, with no await in between, and the thread stamps each batch with how often each of its
partitions had been moved by then. The worker does not deliver a record whose partition moved after
its batch was fetched: that record is read again, because the seek put the partition back at the
committed offset, below every record not yet delivered. When a seek lands while a record is being
handed to its agent, Faust then sets the read offset to that record's offset; the worker puts the
seek's back. And a batch that arrives after the flow stopped moves each of its partitions back to
its first record before Faust drops it.

Records handed to the agents before a seek can still sit in their buffers when it lands, and the seek
puts them back to be read again. Faust meant to throw them away by emptying every buffer when table
recovery resumes flow control after its seek; that also threw away records delivered after the seek,
which nothing reads again (``streams.flow_control`` stops it). Instead each seek takes out of the
buffers exactly the records of the partitions it moved that were fetched before it and that it puts
back; an agent would otherwise process them twice, the first time ahead of the records before them.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter, deque
from collections.abc import AsyncGenerator, AsyncIterator, Mapping
from typing import Any, cast

import aiokafka
from faust.transport.consumer import ensure_TP
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message


class Batch(dict[TP, list[Any]]):
    """Records as aiokafka returned them, and how often each partition had been moved by a seek by then."""

    def __init__(self, records: Mapping[TP, list[Any]], moves: Mapping[TP, int]) -> None:
        super().__init__(records)
        self.moves = {tp: moves[tp] for tp in records}


class ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    moves: Counter[TP]
    moved_to: dict[TP, int]

    def __post_init__(self) -> None:
        super().__post_init__()
        self.moves = Counter()
        self.moved_to = {}

    async def seek_to_committed(self) -> Mapping[TP, int]:
        return await self.call_thread(self._seek_to_committed)

    async def _seek_to_committed(self) -> dict[TP, int]:
        """Like aiokafka's ``seek_to_committed``: a partition without a committed offset maps to None."""
        consumer = self._ensure_consumer()
        read_offset = self.consumer._read_offset
        committed: dict[TP, Any] = {}
        for tp in consumer.assignment():
            offset = await consumer.committed(tp)
            committed[tp] = offset
            if offset and offset > 0:
                self._move(consumer, tp, offset)
            else:
                read_offset[ensure_TP(tp)] = offset if offset is not None and offset >= 0 else None
        return committed

    async def rewind(self, offsets: Mapping[TP, int]) -> None:
        await self.call_thread(self._rewind, offsets)

    async def _rewind(self, offsets: Mapping[TP, int]) -> None:
        consumer = self._ensure_consumer()
        assigned = consumer.assignment()
        for tp, offset in offsets.items():
            if tp in assigned:
                self._move(consumer, tp, offset)

    def _move(self, consumer: aiokafka.AIOKafkaConsumer, tp: TP, offset: int) -> None:
        # Synchronous on purpose: a fetch on this thread sees the new position only together with the
        # read offset and the move count that belong to it.
        consumer.seek(tp, offset)
        self.moves[tp] += 1
        self.moved_to[tp] = offset
        self.consumer._read_offset[ensure_TP(tp)] = offset or None

    async def _fetch_records(
        self,
        consumer: aiokafka.AIOKafkaConsumer,
        active_partitions: set[TP],
        timeout: float | None = None,
        max_records: int | None = None,
    ) -> Batch:
        records = await super()._fetch_records(consumer, active_partitions, timeout, max_records)
        return Batch(records, self.moves)


class Consumer(faust_aiokafka.Consumer):
    _thread: ConsumerThread
    _batch_moves: Mapping[TP, int] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        # How often its partition had been moved when each message still alive was fetched.
        self._fetched_at: weakref.WeakKeyDictionary[Message, int] = weakref.WeakKeyDictionary()

    def _new_consumer_thread(self) -> ConsumerThread:
        return ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def perform_seek(self) -> None:
        committed = await self.seek_to_committed()  # the read offsets are set on the thread, with the seek
        self._committed_offset.update(
            {ensure_TP(tp): offset or None for tp, offset in committed.items() if offset is not None}
        )
        self._drop_read_again()

    def _moved_since_fetch(self, tp: TP, fetched_at: int | None) -> bool:
        return fetched_at is not None and fetched_at != self._thread.moves[tp]

    def _drop_read_again(self) -> None:
        """Take out of the agents' buffers every record that a move since its fetch puts back to be read.

        Left there, an agent would process it twice, the first time ahead of the records before it.
        Records below the new position stay: nothing reads them again.
        """

        def read_again(item: Any) -> bool:
            message = getattr(item, "message", None)
            if message is None:
                return False
            tp = message.tp
            return self._moved_since_fetch(tp, self._fetched_at.get(message)) and (
                message.offset >= self._thread.moved_to[tp]
            )

        dropped = 0
        for queue in list(self.app.flow_control._queues):
            # The deque behind asyncio.Queue, which mode's own clear() empties the same way.
            buffered: deque[Any] = queue._queue  # type: ignore[attr-defined]
            kept = [item for item in buffered if not read_again(item)]
            if len(kept) < len(buffered):
                dropped += len(buffered) - len(kept)
                buffered.clear()
                buffered.extend(kept)
        if dropped:
            self.log.info("Took %d records out of the agents' buffers; a seek reads them again", dropped)

    async def _wait_next_records(self, timeout: float) -> tuple[Any, Any]:
        records, active_partitions = await super()._wait_next_records(timeout)
        if records and not self.flow_active:
            # Faust drops a batch that arrives once the flow has stopped, and seeks back to the committed
            # offsets. A partition without one keeps its position past the dropped records: a table's
            # changelog that recovery had just positioned then never delivers them, and recovery waits
            # for them forever. So every partition of the batch goes back to its first record.
            await self._thread.rewind({tp: batch[0].offset for tp, batch in records.items() if batch})
            records = Batch({}, {})
        self._batch_moves = records.moves if isinstance(records, Batch) else None
        return records, active_partitions

    async def getmany(self, timeout: float) -> AsyncIterator[tuple[TP, Message]]:
        held_back = 0
        fetched = cast(AsyncGenerator[tuple[TP, Message], None], super().getmany(timeout))
        async with contextlib.aclosing(fetched) as batch:
            async for tp, message in batch:
                fetched_at = self._batch_moves[tp] if self._batch_moves is not None else None
                if self._moved_since_fetch(tp, fetched_at):
                    held_back += 1
                    continue
                if fetched_at is not None:
                    self._fetched_at[message] = fetched_at
                yield tp, message
                # Faust has now handed the message over and set the read offset to its offset.
                if self._moved_since_fetch(tp, fetched_at):
                    self._read_offset[ensure_TP(tp)] = self._thread.moved_to[tp]
                    self._drop_read_again()
        if held_back:
            self.log.info("Held back %d records fetched before a seek; they are read again", held_back)
