"""``pieceflow sink erp``: the Kafka consumer that keeps the ERP tables in PostgreSQL.

Each poll returns a batch; the batch is applied in one database transaction (each event in a
savepoint), then its offsets are committed synchronously. Kafka offsets never run ahead of the
database, so a crash at any point only replays records, and the ledger in ``event_positions``
(see ``connectors.erp.store``) turns every replayed event into a no-op.

When PostgreSQL goes away mid-batch (restart, failover, network), the transaction is rolled back,
the consumer seeks back to the last committed offsets, the connection is re-established with
bounded exponential backoff, and the records are read and applied again. The same replay covers a
schema registry that cannot be reached. Bytes that are not a record of ours are counted and
skipped: the pipeline's dead-letter topic already holds bad input, and one bad record must not stop
the ERP feed.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Final

import psycopg
from confluent_kafka import OFFSET_INVALID, Consumer, KafkaException, Message, TopicPartition
from prometheus_client import Counter as MetricCounter
from tenacity import (
    RetryCallState,
    Retrying,
    retry_if_exception_type,
    stop_after_delay,
    stop_when_event_set,
    wait_exponential,
)

from connectors.erp.rows import TOPICS, Unmapped, change_for
from connectors.erp.store import apply_change
from streams.codec import AvroRegistry, DecodeError, RegistryUnavailable
from streams.metrics import SINK_ROWS
from streams.settings import Settings

log = logging.getLogger(__name__)

OUTCOMES: Final = ("applied", "duplicate", "undecodable", "unmapped", "refused", "tombstone")
# Defined here rather than in streams/metrics.py because only this process updates it; the name
# follows the same conventions (pieceflow_ prefix, _total, bounded labels).
SINK_EVENTS = MetricCounter(
    "pieceflow_sink_events_total",
    "Records the ERP sink read, by outcome: applied, duplicate (already applied, a replay), "
    "undecodable, unmapped (no table for the type), refused (by the database), tombstone.",
    ["outcome"],
)
for _outcome in OUTCOMES:
    SINK_EVENTS.labels(outcome=_outcome)  # at 0 from the start, so rate() and alerts see the first one

# Errors after which the same records can succeed later: the connection dropped or the server is
# shutting down (OperationalError covers AdminShutdown, serialization failures and deadlocks), or
# the connection object was already closed (InterfaceError).
TRANSIENT_DB: Final = (psycopg.OperationalError, psycopg.InterfaceError)
# Errors the database gives for this one record's content; retrying cannot help.
REFUSED_BY_DB: Final = (psycopg.DataError, psycopg.IntegrityError)

MAX_BACKOFF_S: Final = 5.0


class TransientFailure(Exception):
    """The batch could not be applied for a reason that will pass; replay it."""


class SinkUnavailable(RuntimeError):
    """PostgreSQL or the registry stayed unreachable for longer than the retry budget."""


@dataclass
class BatchResult:
    outcomes: Counter[str] = field(default_factory=Counter)
    rows: Counter[str] = field(default_factory=Counter)


def coordinates(m: Message) -> tuple[str, int, int]:
    """Topic, partition and offset of a consumed record (only error events lack them)."""
    topic, partition, offset = m.topic(), m.partition(), m.offset()
    if topic is None or partition is None or offset is None:
        raise ValueError("a consumed record without topic, partition or offset")
    return topic, partition, offset


def _first_offsets(records: Iterable[Message]) -> dict[tuple[str, int], int]:
    first: dict[tuple[str, int], int] = {}
    for m in records:
        topic, partition, offset = coordinates(m)
        first[(topic, partition)] = min(first.get((topic, partition), offset), offset)
    return first


def _next_offsets(records: Iterable[Message]) -> list[TopicPartition]:
    last: dict[tuple[str, int], int] = {}
    for m in records:
        topic, partition, offset = coordinates(m)
        last[(topic, partition)] = max(last.get((topic, partition), offset), offset)
    return [TopicPartition(topic, partition, offset + 1) for (topic, partition), offset in last.items()]


class ErpSink:
    """One consumer in ``group_id`` feeding one PostgreSQL connection; run several for more throughput."""

    def __init__(
        self,
        settings: Settings,
        *,
        group_id: str | None = None,
        instance_id: str | None = None,
        registry: AvroRegistry | None = None,
        batch_size: int = 500,
        poll_timeout: float = 0.5,
        retry_timeout: float = 120.0,
    ) -> None:
        self.settings = settings
        self.group_id = group_id or f"{settings.app_id}-erp-sink"
        self.instance_id = instance_id
        self.registry = registry or AvroRegistry.from_url(settings.schema_registry_url)
        self.batch_size = batch_size
        self.poll_timeout = poll_timeout
        # Below Kafka's max.poll.interval.ms (300 s): while reconnecting the consumer is not polled,
        # and giving up before the group evicts us lets a restarted sink take over cleanly.
        self.retry_timeout = retry_timeout
        self.conn: psycopg.Connection[Any] | None = None
        self.totals = BatchResult()
        self._failing_since: float | None = None
        self._failures = 0
        self._stop = threading.Event()

    @property
    def consecutive_failures(self) -> int:
        """Batches rolled back since the last one that went through."""
        return self._failures

    # ---- Kafka --------------------------------------------------------------------------------

    def consumer_config(self) -> dict[str, Any]:
        static = {"group.instance.id": self.instance_id} if self.instance_id else {}
        return {
            # Static membership: a sink restarted under the same id (a supervisor restarting it
            # after a crash) gets its partitions back at once instead of after the session timeout.
            **static,
            **self.settings.kafka_config(),
            "group.id": self.group_id,
            "client.id": "pieceflow-erp-sink",
            # Offsets move only by the synchronous commit after the database commit.
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            # A new sink (or a new ERP database) starts from the beginning of each topic.
            "auto.offset.reset": "earliest",
            "isolation.level": "read_committed",
        }

    def run(self, stop: threading.Event) -> BatchResult:
        """Consume until ``stop`` is set; returns the totals of this run."""
        self._stop = stop
        consumer = Consumer(self.consumer_config())
        consumer.subscribe(list(TOPICS), on_assign=self._on_assign, on_revoke=self._on_revoke)
        try:
            self._connect()
            while not stop.is_set():
                messages = consumer.consume(self.batch_size, self.poll_timeout)
                if messages:
                    self.handle_batch(consumer, messages)
        except SinkUnavailable:
            if not stop.is_set():
                raise
            # Asked to stop while waiting for the database: nothing was lost, offsets are behind it.
            log.info("stopped while waiting for the database")
        finally:
            # close() leaves the group at once, so a restarted sink gets the partitions back
            # without waiting for the session timeout.
            consumer.close()
            self._disconnect()
        return self.totals

    @staticmethod
    def _on_assign(_consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.info("assigned %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing")

    @staticmethod
    def _on_revoke(_consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Nothing to flush: every batch is committed before the next poll, and revocation only
        # happens inside a poll.
        log.info("revoked %s", ", ".join(f"{p.topic}[{p.partition}]" for p in partitions) or "nothing")

    def handle_batch(self, consumer: Consumer, messages: list[Message]) -> BatchResult | None:
        """Apply one polled batch and commit its offsets; on a transient failure rewind instead."""
        records: list[Message] = []
        for m in messages:
            error = m.error()
            if error is None:
                records.append(m)
            elif error.fatal():
                raise KafkaException(error)
            else:
                log.warning("consumer error: %s", error)
        if not records:
            return None
        try:
            result = self._apply(records)
        except TransientFailure as exc:
            log.warning("rolled back %d record(s), replaying from the last committed offsets: %s", len(records), exc)
            self._rewind(consumer, records)
            self._recover(exc)
            return None
        self._failing_since, self._failures = None, 0
        self._commit(consumer, records)
        for table, count in result.rows.items():
            SINK_ROWS.labels(table=table).inc(count)
        for outcome, count in result.outcomes.items():
            SINK_EVENTS.labels(outcome=outcome).inc(count)
        self.totals.rows.update(result.rows)
        self.totals.outcomes.update(result.outcomes)
        return result

    def _rewind(self, consumer: Consumer, records: list[Message]) -> None:
        """Seek every partition of the batch back to its committed offset (or the batch start)."""
        first = _first_offsets(records)
        try:
            committed = {
                (tp.topic, tp.partition): tp.offset
                for tp in consumer.committed([TopicPartition(t, p) for t, p in first], timeout=10)
            }
        except KafkaException as exc:
            log.warning("could not read committed offsets (%s); rewinding to the batch start", exc)
            committed = {}
        for (topic, partition), batch_start in first.items():
            offset = committed.get((topic, partition), OFFSET_INVALID)
            # Nothing committed yet by this group: the batch start is where consumption began.
            target = offset if offset >= 0 else batch_start
            try:
                consumer.seek(TopicPartition(topic, partition, target))
            except KafkaException as exc:
                # Revoked meanwhile: its next owner starts from the committed offset anyway.
                log.info("not rewinding %s[%d]: %s", topic, partition, exc)

    def _commit(self, consumer: Consumer, records: list[Message]) -> None:
        offsets = _next_offsets(records)
        try:
            answered = consumer.commit(offsets=offsets, asynchronous=False) or []
        except KafkaException as exc:
            # The rows are committed: at worst these records are read again and the ledger
            # skips them, so a failed offset commit is a warning, not a reason to stop.
            log.warning("offset commit failed (records will be replayed as duplicates): %s", exc)
            return
        for tp in answered:
            if tp.error is not None:
                log.warning("offset commit failed for %s[%d]: %s", tp.topic, tp.partition, tp.error)

    # ---- PostgreSQL ---------------------------------------------------------------------------

    def _connect(self) -> None:
        """Open the connection, retrying with exponential backoff for at most ``retry_timeout``."""

        def note(state: RetryCallState) -> None:
            outcome = state.outcome
            error = outcome.exception() if outcome is not None else None
            log.warning("database unavailable (attempt %d): %s", state.attempt_number, " ".join(str(error).split()))

        retrying = Retrying(
            retry=retry_if_exception_type(psycopg.OperationalError),
            wait=wait_exponential(multiplier=0.1, max=MAX_BACKOFF_S),
            # A shutdown request ends the wait at once instead of after the whole retry budget.
            stop=stop_after_delay(self.retry_timeout) | stop_when_event_set(self._stop),
            sleep=self._pause,
            before_sleep=note,
            reraise=True,
        )
        try:
            for attempt in retrying:
                with attempt:
                    self.conn = psycopg.connect(
                        self.settings.database_url, connect_timeout=5, application_name="pieceflow-erp-sink"
                    )
        except psycopg.OperationalError as exc:
            raise SinkUnavailable(
                f"PostgreSQL at {self.settings.database_url} unreachable for {self.retry_timeout:.0f}s: {exc}"
            ) from exc
        if retrying.statistics.get("attempt_number", 1) > 1:
            log.info("database connection re-established")

    def _pause(self, seconds: float) -> None:
        """Sleep, but wake up for a shutdown request."""
        self._stop.wait(seconds)

    def _disconnect(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def _recover(self, failure: TransientFailure) -> None:
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
        elif now - self._failing_since > self.retry_timeout:
            raise SinkUnavailable(f"no progress for {self.retry_timeout:.0f}s: {failure}") from failure
        self._failures += 1
        if self.conn is not None and (self.conn.closed or self.conn.broken):
            self._disconnect()
        if self.conn is None:
            self._connect()
        else:
            # The database is fine (the registry was not): pause before the replay.
            self._pause(min(MAX_BACKOFF_S, 0.1 * 2**self._failures))

    def _apply(self, records: list[Message]) -> BatchResult:
        if self.conn is None:
            try:
                self._connect()
            except SinkUnavailable as exc:
                raise TransientFailure(str(exc)) from exc
        conn = self.conn
        assert conn is not None
        result = BatchResult()
        try:
            with conn.transaction(), conn.cursor() as cur:
                for m in records:
                    result.outcomes[self._apply_one(conn, cur, m, result)] += 1
        except TRANSIENT_DB as exc:
            raise TransientFailure(f"database: {' '.join(str(exc).split())}") from exc
        return result

    def _apply_one(
        self, conn: psycopg.Connection[Any], cur: psycopg.Cursor[Any], m: Message, result: BatchResult
    ) -> str:
        topic, partition, offset = coordinates(m)
        where = f"{topic}[{partition}]@{offset}"
        raw = m.value()
        if raw is None:
            return "tombstone"  # compaction markers on the status topic carry no event
        try:
            decoded = self.registry.decode(raw)
        except RegistryUnavailable as exc:
            raise TransientFailure(f"schema registry: {exc}") from exc
        except DecodeError as exc:
            log.warning("skipping undecodable record %s: %s", where, exc)
            return "undecodable"
        try:
            change = change_for(topic, decoded.type, decoded.value)
        except Unmapped as exc:
            log.info("skipping %s: %s", where, exc)
            return "unmapped"
        except (KeyError, TypeError) as exc:
            log.error("skipping %s: %s does not have the expected fields (%r)", where, decoded.type, exc)
            return "unmapped"
        try:
            with conn.transaction():  # a savepoint: a refused row skips this event, not the batch
                written = apply_change(cur, change, topic, partition, offset)
        except REFUSED_BY_DB as exc:
            log.error("database refused %s %s at %s: %s", decoded.type, change.event_id, where, exc)
            return "refused"
        if written is None:
            return "duplicate"
        result.rows.update(written)
        return "applied"
