"""Faust's producer, sending through librdkafka (confluent-kafka) instead of aiokafka.

aiokafka builds every produce request and parses every response in Python, on the worker's event loop;
at a batch size of one that is one request per event. librdkafka does the same work in C, on its own
threads, so an agent's send costs a hand-over and the delivery report comes back as a future.
Everything else (consumer, group membership, topic creation, transactions) stays on Faust's aiokafka
transport (``faust_config.Transport`` puts the two together). faust-streaming ships a confluent driver,
but it swaps key and value, drops headers, partitions by Python's randomised ``hash`` and resolves
futures from a foreign thread.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Mapping
from typing import Any

import confluent_kafka
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import HeadersArg
from faust.types.tuples import TP, RecordMetadata

from streams.producer_config import PRODUCER_DEFAULTS

POLL_SECONDS = 0.1


class ProduceFailed(RuntimeError):
    """Kafka refused a record after librdkafka's retries; Faust does not commit past it."""


class Producer(faust_aiokafka.Producer):
    _rdkafka: confluent_kafka.Producer | None = None
    _polling: threading.Thread | None = None
    _in_flight: set[asyncio.Future[RecordMetadata]]
    _stopping: threading.Event
    _failure: ProduceFailed | None = None

    async def on_start(self) -> None:
        await super().on_start()
        self._in_flight = set()
        servers = ",".join(faust_aiokafka.server_list(self.transport.url, faust_aiokafka.Transport.default_port))
        self._rdkafka = confluent_kafka.Producer(
            {
                "bootstrap.servers": servers,
                # Security settings (TLS, SASL) in librdkafka's terms; Faust's own clients take them as
                # broker credentials (faust_config.Transport carries both).
                **getattr(self.transport, "kafka_config", {}),
                "client.id": self.app.conf.broker_client_id,
                **PRODUCER_DEFAULTS,
            }
        )
        self._stopping = threading.Event()
        self._polling = threading.Thread(target=self._poll, name="rdkafka-delivery", daemon=True)
        self._polling.start()

    def _poll(self) -> None:
        # Delivery reports are served here, off the event loop, and handed to it one by one.
        rdkafka = self._rdkafka
        assert rdkafka is not None
        while not self._stopping.is_set():
            rdkafka.poll(POLL_SECONDS)

    async def on_stop(self) -> None:
        if self._rdkafka is not None:
            # A failure was raised by the flush before the last commit; stopping only waits for the rest.
            await self._delivered(list(self._in_flight))
            self._stopping.set()
            if self._polling is not None:
                await asyncio.to_thread(self._polling.join)
            self._rdkafka = None
        await super().on_stop()

    async def send(
        self,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        partition: int | None,
        timestamp: float | None,
        headers: HeadersArg | None,
        *,
        transactional_id: str | None = None,
    ) -> Awaitable[RecordMetadata]:
        rdkafka = self._rdkafka
        if transactional_id or rdkafka is None:
            return await super().send(
                topic, key, value, partition, timestamp, headers, transactional_id=transactional_id
            )
        loop = asyncio.get_running_loop()
        future: asyncio.Future[RecordMetadata] = loop.create_future()

        def delivered(err: confluent_kafka.KafkaError | None, msg: confluent_kafka.Message) -> None:
            loop.call_soon_threadsafe(self._settle, future, err, msg)

        extra: dict[str, Any] = {}
        if partition is not None:
            extra["partition"] = partition
        if timestamp:
            extra["timestamp"] = int(timestamp * 1000.0)
        if headers:
            extra["headers"] = list(headers.items()) if isinstance(headers, Mapping) else list(headers)
        while True:
            try:
                rdkafka.produce(topic, value=value, key=key, on_delivery=delivered, **extra)
                break
            except BufferError:  # librdkafka's queue is full: let deliveries drain it, then go on
                await asyncio.sleep(POLL_SECONDS)
        self._in_flight.add(future)
        return future

    def _settle(
        self, future: asyncio.Future[RecordMetadata], err: confluent_kafka.KafkaError | None, msg: Any
    ) -> None:
        self._in_flight.discard(future)
        if future.done():
            return
        if err is not None:
            failure = ProduceFailed(f"Kafka did not accept a record for {msg.topic()}: {err.str()}")
            self._failure = self._failure or failure
            future.set_exception(failure)
            return
        tp = TP(msg.topic(), msg.partition())
        future.set_result(RecordMetadata(tp.topic, tp.partition, tp, msg.offset(), timestamp=msg.timestamp()[1]))

    async def flush(self) -> None:
        """Faust flushes before it commits offsets: wait until Kafka confirmed every record sent so far."""
        await super().flush()
        # Only what was sent before this call: the agents keep sending meanwhile, and waiting for a moment
        # with nothing in flight could hold the commit back for as long as the load lasts.
        await self._delivered(list(self._in_flight))
        if self._failure is not None:
            # Committing now would skip the event whose output was lost: stop, and let the restarted
            # worker process it again from the last committed offset.
            raise self._failure

    @staticmethod
    async def _delivered(futures: list[asyncio.Future[RecordMetadata]]) -> None:
        if futures:
            await asyncio.wait(futures)

