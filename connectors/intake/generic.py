"""``POST /orders``: JSON that follows the Avro contracts directly, as plain JSON or a CloudEvent. Pure.

Plain JSON is an OrderPlaced. A CloudEvent in structured JSON mode (``application/cloudevents+json``,
or any body with ``specversion``) carries an OrderPlaced, OrderAmended or OrderCancelled in ``data``,
named by ``type`` (``pieceflow.v1.OrderPlaced`` ...).

The body is checked against the Avro schema itself, so the error names the exact field path. JSON
has no decimal or timestamp type, so amounts are strings ("12.50") and times are ISO 8601 text or epoch
milliseconds. The envelope is the intake's to fill in:

- ``order_id`` is derived from ``source_platform`` and ``external_order_id``; if given it must agree;
- ``event_id``, if absent, is uuid5 of the CloudEvent's (source, id), or of the body's SHA-256 for
  plain JSON, so a re-sent request keeps its id and validation can drop it as DUPLICATE_EVENT;
- ``recorded_at`` is always the time of receipt; ``occurred_at`` defaults to the CloudEvent ``time``,
  else to the time of receipt; ``seq`` defaults as for the webhooks (``common.storefront_seq``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from datetime import datetime
from typing import Any

from connectors.intake.common import (
    MappingError,
    amount,
    event_id_for,
    join,
    obj,
    storefront_seq,
    text,
    timestamp,
)
from streams import schemas
from streams.events import Event, order_id_for

SOURCE = "generic"
CE_TYPE_PREFIX = "pieceflow.v1."
EVENT_TYPES = ("OrderPlaced", "OrderAmended", "OrderCancelled")
CE_CONTENT_TYPE = "application/cloudevents+json"
INT_RANGE = (-(2**31), 2**31 - 1)
LONG_RANGE = (-(2**63), 2**63 - 1)


def is_cloudevent(content_type: str, payload: Any) -> bool:
    return content_type == CE_CONTENT_TYPE or (isinstance(payload, Mapping) and "specversion" in payload)


def map_generic(payload: Any, raw_body: bytes, content_type: str, received_at: datetime) -> Event:
    """A request body of ``POST /orders`` as the event to produce."""
    if is_cloudevent(content_type, payload):
        return _from_cloudevent(obj(payload, ""), received_at)
    data = dict(obj(payload, ""))
    data.setdefault("event_id", event_id_for(SOURCE, hashlib.sha256(raw_body).hexdigest()))
    return _event("OrderPlaced", data, "", received_at, received_at)


def _from_cloudevent(ce: Mapping[str, Any], received_at: datetime) -> Event:
    if ce.get("specversion") != "1.0":
        raise MappingError(f"unsupported CloudEvents specversion {ce.get('specversion')!r}; use 1.0", "specversion")
    ce_type = text(ce, "type", "")
    event_type = ce_type.removeprefix(CE_TYPE_PREFIX)
    if event_type not in EVENT_TYPES:
        expected = ", ".join(CE_TYPE_PREFIX + t for t in EVENT_TYPES)
        raise MappingError(f"unsupported type {ce_type!r}; expected one of {expected}", "type")
    source, ce_id = text(ce, "source", ""), text(ce, "id", "")
    content_type = ce.get("datacontenttype", "application/json")
    if not isinstance(content_type, str) or not content_type.startswith("application/json"):
        raise MappingError(f"unsupported datacontenttype {content_type!r}; use application/json", "datacontenttype")
    if "data_base64" in ce:
        raise MappingError("binary data is not supported; send the event as JSON in data", "data_base64")
    if ce.get("data") is None:
        raise MappingError("is required", "data")
    data = dict(obj(ce["data"], "data"))
    data.setdefault("event_id", event_id_for(f"cloudevents:{source}", ce_id))
    default_time = timestamp(ce["time"], "time") if ce.get("time") is not None else received_at
    return _event(event_type, data, "data", default_time, received_at)


def _event(event_type: str, data: dict[str, Any], path: str, default_time: datetime, received_at: datetime) -> Event:
    source_platform = text(data, "source_platform", path)
    external_id = text(data, "external_order_id", path)
    order_id = order_id_for(source_platform, external_id)
    if data.get("order_id") not in (None, order_id):
        raise MappingError(
            f"{data['order_id']!r} does not match source_platform and external_order_id ({order_id!r})",
            join(path, "order_id"),
        )
    data["order_id"] = order_id
    data["recorded_at"] = received_at.isoformat()
    data.setdefault("occurred_at", default_time.isoformat())
    if "seq" not in data:
        data["seq"] = storefront_seq(event_type, timestamp(data["occurred_at"], join(path, "occurred_at")))
    value = convert(schemas.load_schema(event_type), data, path, {})
    return Event(event_type, order_id, value)


def convert(schema: Any, value: Any, path: str, names: dict[str, Any]) -> Any:
    """A JSON value as the Python value fastavro writes for ``schema``, or a MappingError at ``path``.

    Covers what pieceflow's contracts use: records (unknown fields are errors, as a typo would
    otherwise vanish), nullable unions, enums, arrays, strings, int/long, decimal bytes and
    timestamp-millis longs.
    """
    if isinstance(schema, str) and schema in names:
        schema = names[schema]
    if isinstance(schema, list):
        if value is None:
            if "null" in schema:
                return None
            raise MappingError("must not be null", path)
        branches = [s for s in schema if s != "null"]
        return convert(branches[0], value, path, names)
    kind = schema if isinstance(schema, str) else schema["type"]
    logical = None if isinstance(schema, str) else schema.get("logicalType")
    if value is None:
        raise MappingError("is required", path)
    if kind == "record":
        return _record(schema, value, path, names)
    if kind == "enum":
        names[schema["name"]] = names[f"{schema.get('namespace', '')}.{schema['name']}"] = schema
        if value not in schema["symbols"]:
            raise MappingError(f"{value!r} is not one of {', '.join(schema['symbols'])}", path)
        return value
    if kind == "array":
        return [convert(schema["items"], item, join(path, i), names) for i, item in enumerate(_list(value, path))]
    if kind == "long" and logical == "timestamp-millis":
        return timestamp(value, path)
    if kind == "bytes" and logical == "decimal":
        return amount(value, path)
    if kind in ("int", "long"):
        low, high = INT_RANGE if kind == "int" else LONG_RANGE
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise MappingError(f"must be an integer ({kind}), not {value!r}", path)
        return value
    if kind == "string":
        if not isinstance(value, str):
            raise MappingError(f"must be a string, not {value!r}", path)
        return value
    raise MappingError(f"Avro type {kind} is not supported by the JSON intake", path)  # pragma: no cover


def _record(schema: Mapping[str, Any], value: Any, path: str, names: dict[str, Any]) -> dict[str, Any]:
    names[schema["name"]] = names[f"{schema.get('namespace', '')}.{schema['name']}"] = schema
    data = obj(value, path)
    known = {f["name"] for f in schema["fields"]}
    unknown = sorted(set(data) - known)
    if unknown:
        raise MappingError(f"unknown field of {schema['name']}", join(path, unknown[0]))
    out: dict[str, Any] = {}
    for field in schema["fields"]:
        name = field["name"]
        if name in data:
            out[name] = convert(field["type"], data[name], join(path, name), names)
        elif "default" in field:
            out[name] = _copy_default(field["default"])
        else:
            raise MappingError("is required", join(path, name))
    return out


def _copy_default(default: Any) -> Any:
    return list(default) if isinstance(default, list) else default


def _list(value: Any, path: str) -> list[Any]:
    if not isinstance(value, list):
        raise MappingError("must be a JSON array", path)
    return value
