"""What every agent does around its stage's pure function: decode check, call, route, dead-letter.

No exception leaves ``StageRunner.run``: Faust acks an event whose agent raised, and the event would be
lost. Anything that cannot be processed goes to the dead-letter topic with its original bytes.
An event whose schema the registry did not return is not bad input: the runner reads it again, with
backoff, until the registry answers. Its partition waits meanwhile, so nothing overtakes it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import faust
from tenacity import AsyncRetrying, retry_if_exception_type, wait_exponential

from streams import metrics
from streams.codec import Decoded, DecodeError, RegistryUnavailable, Undecodable
from streams.events import Event

log = logging.getLogger(__name__)

Route = Callable[[Event], faust.TopicT]


def dead_letter_headers(event: faust.EventT, stage: str, reason: str, error: str) -> dict[str, bytes]:
    message = event.message
    key = message.key if isinstance(message.key, bytes) else str(message.key or "").encode()
    return {
        "dlq.reason": reason.encode(),
        "dlq.error": error[:2000].encode(errors="replace"),
        "dlq.stage": stage.encode(),
        "dlq.original.topic": message.topic.encode(),
        "dlq.original.partition": str(message.partition).encode(),
        "dlq.original.offset": str(message.offset).encode(),
        "dlq.original.key": key,
    }


class StageRunner:
    def __init__(self, stage: str, routes: Mapping[str, faust.TopicT], dead_letters: faust.TopicT) -> None:
        self.stage = stage
        self.routes = routes
        self.dead_letters = dead_letters

    async def dead_letter(self, event: faust.EventT, reason: str, error: str) -> None:
        metrics.DEAD_LETTERS.labels(stage=self.stage, reason=reason).inc()
        log.warning(
            "%s: dead-lettering %s[%s]@%s: %s",
            self.stage,
            event.message.topic,
            event.message.partition,
            event.message.offset,
            error,
        )
        raw = event.message.value
        await self.dead_letters.send(
            key=event.message.key,
            value=raw if isinstance(raw, bytes) else b"",
            headers=dead_letter_headers(event, self.stage, reason, error),
        )

    async def read_again(self, event: faust.EventT, value: Undecodable) -> Decoded | Undecodable:
        """Decode ``value`` again until the registry answers; a definite answer may still be a refusal."""
        retry = value.retry
        assert retry is not None

        def waiting(state: Any) -> None:
            metrics.REGISTRY_RETRIES.labels(stage=self.stage).inc()
            log.warning(
                "%s: %s[%s]@%s waits for the schema registry (attempt %d): %s",
                self.stage, event.message.topic, event.message.partition, event.message.offset,
                state.attempt_number, state.outcome.exception() if state.outcome else value.error,
            )

        try:
            async for attempt in AsyncRetrying(
                retry=retry_if_exception_type(RegistryUnavailable),
                wait=wait_exponential(multiplier=0.1, max=5.0),
                before_sleep=waiting,
            ):
                with attempt:
                    # In a thread: a registry that hangs must not stall the worker's other partitions.
                    return await asyncio.to_thread(retry)
        except DecodeError as exc:
            return Undecodable(value.raw, str(exc))
        raise AssertionError("unreachable: the retry loop either returns or raises")

    async def emit(self, outputs: Iterable[Event]) -> None:
        for out in outputs:
            await self.routes[out.type].send(key=out.key.encode(), value=out)
            metrics.STAGE_EVENTS_OUT.labels(stage=self.stage).inc()

    async def run(self, event: faust.EventT, handle: Callable[[Decoded], list[Event]]) -> list[Event]:
        """Process one event; returns what was emitted (empty when it was dead-lettered)."""
        metrics.STAGE_EVENTS_IN.labels(stage=self.stage).inc()
        value: Any = event.value
        if isinstance(value, Undecodable) and value.retry is not None:
            value = await self.read_again(event, value)
        if isinstance(value, Undecodable):
            await self.dead_letter(event, "undecodable", value.error)
            return []
        started = time.perf_counter()
        try:
            outputs = handle(value)
            unroutable = [out.type for out in outputs if out.type not in self.routes]
            if unroutable:
                raise LookupError(f"stage {self.stage} has no topic for {', '.join(unroutable)}")
        except Exception as exc:  # a bug or an unforeseen input must not cost the event
            log.exception("%s failed on %s", self.stage, getattr(value, "type", type(value).__name__))
            await self.dead_letter(event, "stage-error", f"{type(exc).__name__}: {exc}")
            return []
        metrics.STAGE_DURATION.labels(stage=self.stage).observe(time.perf_counter() - started)
        await self.emit(outputs)
        return outputs
