"""What every intake mapping shares: the error type, typed field readers that know their path, ids,
seqs, and turning a storefront's line-item properties into catalog customizations.

Everything here is pure: no clock, no I/O. A mapping is given the time the request was received.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Decimal, InvalidOperation
from typing import Any

from streams.catalog import Catalog
from streams.events import epoch_ms

# Event ids of intake events are uuid5 of (source, webhook delivery id): a webhook that is re-delivered
# after the intake restarted (its in-memory dedupe gone) gets the same event id again, and validation
# rejects it as DUPLICATE_EVENT instead of acting on it twice.
INTAKE_NAMESPACE = uuid.UUID("8d3f6a52-1c47-4e0b-b7a9-3e61f0c2d915")

# Seq ranks: a storefront cancellation often carries the same timestamp as the "updated" webhook the
# same change fires (Shopify sends both), so the type breaks the tie and seq stays strictly increasing.
_SEQ_RANK = {"OrderPlaced": 0, "OrderAmended": 1, "OrderCancelled": 2}

CENTS = Decimal("0.01")
# Avro decimal(12, 2): ten digits before the point.
MAX_AMOUNT = Decimal("9999999999.99")


class MappingError(ValueError):
    """A payload that cannot become an order event; ``field`` is the path of the offending field."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(f"{field}: {message}" if field else message)
        self.message = message
        self.field = field

    def to_json(self) -> dict[str, str]:
        return {"error": self.message, "field": self.field}


def event_id_for(source: str, delivery_id: str) -> str:
    return str(uuid.uuid5(INTAKE_NAMESPACE, f"{source}|{delivery_id}"))


def storefront_seq(event_type: str, occurred_at: datetime) -> int:
    """Seq of a storefront event: its platform time in ms, times 4, plus the type's rank.

    The platform's clock orders an order's changes; the intake is stateless (any replica, any
    restart), so a counter of its own could not be strictly increasing per order.
    """
    return epoch_ms(occurred_at) * 4 + _SEQ_RANK[event_type]


def join(path: str, key: str | int) -> str:
    if isinstance(key, int):
        return f"{path}[{key}]"
    return f"{path}.{key}" if path else key


def obj(value: Any, path: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise MappingError(f"must be a JSON object, not {_json_type(value)}", path)
    return value


def array(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise MappingError(f"must be a JSON array, not {_json_type(value)}", path)
    return value


def required(data: Mapping[str, Any], key: str, path: str) -> Any:
    if key not in data or data[key] is None:
        raise MappingError("is required", join(path, key))
    return data[key]


def text(data: Mapping[str, Any], key: str, path: str) -> str:
    """A required non-empty string; platform ids that are JSON numbers become their decimal text."""
    value = required(data, key, path)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise MappingError(f"must be a string, not {_json_type(value)}", join(path, key))
    result = str(value).strip()
    if not result:
        raise MappingError("must not be empty", join(path, key))
    return result


def optional_text(data: Mapping[str, Any], key: str, path: str) -> str | None:
    value = data.get(key)
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise MappingError(f"must be a string, not {_json_type(value)}", join(path, key))
    return str(value).strip() or None


def integer(data: Mapping[str, Any], key: str, path: str) -> int:
    value = required(data, key, path)
    if isinstance(value, bool) or not isinstance(value, int):
        raise MappingError(f"must be an integer, not {_json_type(value)}", join(path, key))
    return value


def amount(value: Any, path: str) -> Decimal:
    """A money amount to exactly two decimals. Platforms send strings ("12.50"); numbers are accepted
    through their shortest text form so 12.5 is 12.50, but never more than cents."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise MappingError(f"must be a decimal amount, not {_json_type(value)}", path)
    try:
        parsed = Decimal(str(value).strip())
    except InvalidOperation:
        raise MappingError(f"{value!r} is not a decimal amount", path) from None
    if not parsed.is_finite():
        raise MappingError(f"{value!r} is not a decimal amount", path)
    if parsed != parsed.quantize(CENTS, rounding=ROUND_HALF_UP):
        raise MappingError(f"{value!r} has more than two decimals", path)
    if abs(parsed) > MAX_AMOUNT:
        raise MappingError(f"{value!r} exceeds decimal(12, 2)", path)
    return parsed.quantize(CENTS)


def timestamp(value: Any, path: str) -> datetime:
    """ISO 8601 text (naive means UTC, as WooCommerce's *_gmt fields) or epoch milliseconds."""
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise MappingError(f"must be an ISO 8601 timestamp, not {_json_type(value)}", path)
    if isinstance(value, int):
        moment = datetime.fromtimestamp(value / 1000, UTC)
    else:
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise MappingError(f"{value!r} is not an ISO 8601 timestamp", path) from None
        moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    # timestamp-millis: drop what Avro would drop anyway, so the value reads back equal.
    return moment.replace(microsecond=moment.microsecond // 1000 * 1000)


def slug(name: str) -> str:
    """How storefront labels become catalog codes: "Upper colour" -> "upper-colour"."""
    return re.sub(r"[^a-z0-9]+", "-", name.strip().lower()).strip("-")


def is_hidden(name: str) -> bool:
    # Both platforms mark machine-only entries with a leading underscore (Shopify hides such line-item
    # properties at checkout; WooCommerce keeps its own bookkeeping, e.g. _reduced_stock, under it).
    return name.startswith("_")


def customizations(catalog: Catalog, sku: str, name: str, raw_value: Any, path: str) -> list[dict[str, Any]]:
    """One storefront property (name, value) of a line as customizations of that line's product.

    The name matches an option of the sku by its code or its label slugged ("Upper colour" is
    ``upper-colour``); a WooCommerce attribute taxonomy prefix ``pa_`` is dropped. The kind comes from
    the catalog. A value is matched to an option value code the same way, except for TEXT options,
    whose value is the customer's text. ADD and REMOVE options may list several values, comma-separated.

    Unknown names pass through with kind UNKNOWN and the slugged name as the option code: validation
    then rejects the order as OPTION_NOT_ALLOWED, naming the option, and that rejection is on the log
    for the shop to see. A 422 instead would make the platform retry a webhook that can never succeed
    and, after enough failures, switch the subscription off.
    """
    if isinstance(raw_value, bool) or not isinstance(raw_value, str | int | float):
        raise MappingError(f"must be a string or a number, not {_json_type(raw_value)}", path)
    value = str(raw_value).strip()
    label = name[3:] if name.startswith("pa_") else name
    product = catalog.products.get(sku)
    option = None
    if product is not None:
        option = product.options.get(label) or product.options.get(slug(label))
    if option is None:
        return [{"kind": "UNKNOWN", "option_code": slug(label) or label, "value": value}]
    if option.kind == "TEXT":
        return [{"kind": "TEXT", "option_code": option.code, "value": value}]
    parts = [p.strip() for p in value.split(",")] if option.kind in ("ADD", "REMOVE") else [value]
    return [
        {"kind": option.kind, "option_code": option.code, "value": p if p in option.values else slug(p)}
        for p in parts
        if p
    ]


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"
