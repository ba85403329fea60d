"""What stages return: typed, keyed Avro values, plus the envelope every event carries."""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

# Stage outputs get ids derived from their cause, so reprocessing an input after a crash
# re-emits the same event ids and downstream dedupe drops the repeats.
_EVENT_NAMESPACE = uuid.UUID("5b0b7a43-8f2e-4f6e-9d1c-2f7c3b1f0a11")
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


@dataclass(frozen=True)
class Event:
    """An Avro record to send: ``type`` is its record name, ``key`` its Kafka key."""

    type: str
    key: str
    value: dict[str, Any]


def utc_now() -> datetime:
    """Current UTC time at millisecond precision, the precision of timestamp-millis."""
    moment = datetime.now(UTC)
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def epoch_ms(moment: datetime) -> int:
    """Milliseconds since the epoch: how stage state stores times, to stay JSON-compatible."""
    aware = moment if moment.tzinfo else moment.replace(tzinfo=UTC)
    return (aware - _EPOCH) // timedelta(milliseconds=1)


def from_epoch_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def new_event_id() -> str:
    """A random id, for events entering pieceflow from outside (storefronts, stations)."""
    return str(uuid.uuid4())


def derived_event_id(cause_event_id: str, *parts: str) -> str:
    """A deterministic id for an output of a stage: same cause and parts, same id."""
    return str(uuid.uuid5(_EVENT_NAMESPACE, "|".join((cause_event_id, *parts))))


def order_id_for(source_platform: str, external_order_id: str) -> str:
    """The order id of a storefront order.

    Deriving it from the source and the storefront's id gives every re-send of the same order the
    same Kafka key, so validation sees it in the same partition and state and can reject it as
    DUPLICATE_ORDER; a random id per re-send would make duplicates undetectable.
    """
    return f"{source_platform.lower()}:{external_order_id}"


def envelope(
    order_id: str,
    seq: int,
    now: datetime,
    *,
    event_id: str,
    causation_id: str | None = None,
    occurred_at: datetime | None = None,
) -> dict[str, Any]:
    """The fields every event starts with; ``occurred_at`` defaults to ``now``."""
    return {
        "event_id": event_id,
        "order_id": order_id,
        "seq": seq,
        "occurred_at": occurred_at or now,
        "recorded_at": now,
        "causation_id": causation_id,
    }
