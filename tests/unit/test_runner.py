"""StageRunner: what happens around a stage function when the input cannot be read."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import SimpleNamespace
from typing import Any, cast

import faust

from streams import metrics
from streams.codec import Decoded, DecodeError, RegistryUnavailable, Undecodable
from streams.events import Event
from streams.runner import StageRunner


class Sent:
    """A topic double that records what is sent to it."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    async def send(self, **kwargs: Any) -> None:
        self.records.append(kwargs)


def event(value: object) -> faust.EventT:
    message = SimpleNamespace(topic="orders.inbound.v1", partition=2, offset=41, key=b"o-1", value=b"\x00raw")
    return cast(faust.EventT, SimpleNamespace(message=message, value=value))


def flaky(failures: Sequence[Exception], result: Decoded) -> Any:
    pending = list(failures)

    def retry() -> Decoded:
        if pending:
            raise pending.pop(0)
        return result
    return retry


def run(runner: StageRunner, value: object, seen: list[Decoded]) -> list[Event]:
    def handle(decoded: Decoded) -> list[Event]:
        seen.append(decoded)
        return [Event("OrderAccepted", "o-1", {"order_id": "o-1"})]
    return asyncio.run(runner.run(event(value), handle))


def test_an_event_waits_for_the_registry_and_is_then_processed_not_dead_lettered() -> None:
    out, dead = Sent(), Sent()
    runner = StageRunner("validation", {"OrderAccepted": cast(faust.TopicT, out)}, cast(faust.TopicT, dead))
    decoded = Decoded("OrderPlaced", {"order_id": "o-1"})
    retries = metrics.REGISTRY_RETRIES.labels(stage="validation")
    before = retries._value.get()
    down = [RegistryUnavailable("connection refused"), RegistryUnavailable("timed out")]
    seen: list[Decoded] = []
    emitted = run(runner, Undecodable(b"\x00raw", "the registry did not answer", retry=flaky(down, decoded)), seen)
    assert seen == [decoded] and [e.type for e in emitted] == ["OrderAccepted"]
    assert dead.records == [] and len(out.records) == 1
    assert retries._value.get() - before == 2


def test_a_definite_refusal_after_waiting_is_dead_lettered_with_the_reason() -> None:
    out, dead = Sent(), Sent()
    runner = StageRunner("validation", {"OrderAccepted": cast(faust.TopicT, out)}, cast(faust.TopicT, dead))
    refusal = [RegistryUnavailable("connection refused"), DecodeError("schema id 9 is not in the registry")]
    seen: list[Decoded] = []
    value = Undecodable(b"\x00raw", "the registry did not answer", retry=flaky(refusal, Decoded("X", {})))
    assert run(runner, value, seen) == [] and seen == []
    [record] = dead.records
    assert record["value"] == b"\x00raw"
    assert record["headers"]["dlq.reason"] == b"undecodable"
    assert record["headers"]["dlq.error"] == b"schema id 9 is not in the registry"
    assert record["headers"]["dlq.original.offset"] == b"41"


def test_bad_bytes_are_dead_lettered_at_once() -> None:
    out, dead = Sent(), Sent()
    runner = StageRunner("validation", {"OrderAccepted": cast(faust.TopicT, out)}, cast(faust.TopicT, dead))
    seen: list[Decoded] = []
    assert run(runner, Undecodable(b"\x00raw", "unknown magic byte 7"), seen) == [] and seen == []
    assert [r["headers"]["dlq.error"] for r in dead.records] == [b"unknown magic byte 7"]
