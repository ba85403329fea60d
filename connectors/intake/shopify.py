"""Shopify order webhooks (REST Admin API order JSON) as pieceflow order events. Pure.

- ``orders/create`` -> OrderPlaced, ``orders/updated`` -> OrderAmended, ``orders/cancelled`` -> OrderCancelled.
- The external order id is the numeric ``id`` (the one every later webhook for the order carries).
- Line ``price`` is the unit price; each line's ``sku`` must be the catalog sku.
- ``properties`` ([{name, value}]) become customizations (see ``common.customizations``).
- ``total`` is the sum of quantity x unit price over the lines: that is what the OrderPlaced contract
  calls the total. Shopify's ``total_price`` also holds shipping, tax and discounts, which pieceflow
  does not price, so comparing it would reject every shipped order.
- Delivery: a shipping line whose code or title says pickup -> PICKUP; one that says delivery (Shopify
  local delivery) -> DELIVERY; otherwise a shipping address -> SHIP; no address -> PICKUP. The
  neighbourhood a courier needs comes from the order's ``note_attributes`` entry "neighbourhood".
- Priority is RUSH when the order's ``tags`` include "rush", else STANDARD.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from decimal import Decimal
from typing import Any

from connectors.intake.common import (
    MappingError,
    amount,
    array,
    customizations,
    event_id_for,
    integer,
    is_hidden,
    join,
    obj,
    optional_text,
    required,
    storefront_seq,
    text,
    timestamp,
)
from streams.catalog import Catalog
from streams.events import Event, order_id_for

SOURCE = "shopify"
TOPICS = {"orders/create": "OrderPlaced", "orders/updated": "OrderAmended", "orders/cancelled": "OrderCancelled"}


def map_shopify(topic: str, payload: Any, delivery_id: str, catalog: Catalog, received_at: datetime) -> Event:
    """One Shopify webhook (``X-Shopify-Topic``, JSON body, delivery id) as the event to produce."""
    event_type = TOPICS.get(topic)
    if event_type is None:
        raise MappingError(f"unsupported topic {topic!r}; expected one of {', '.join(TOPICS)}", "X-Shopify-Topic")
    order = obj(payload, "")
    external_id = text(order, "id", "")
    order_id = order_id_for(SOURCE, external_id)
    when_field = {"OrderPlaced": "created_at", "OrderAmended": "updated_at", "OrderCancelled": "cancelled_at"}
    field = when_field[event_type]
    if event_type == "OrderCancelled" and order.get(field) is None:
        field = "updated_at"  # a cancellation is also an update, stamped at the same moment
    occurred_at = timestamp(required(order, field, ""), field)
    value: dict[str, Any] = {
        "event_id": event_id_for(SOURCE, delivery_id),
        "order_id": order_id,
        "seq": storefront_seq(event_type, occurred_at),
        "occurred_at": occurred_at,
        "recorded_at": received_at,
        "causation_id": None,
        "source_platform": SOURCE,
        "external_order_id": external_id,
    }
    if event_type == "OrderCancelled":
        value["reason"] = optional_text(order, "cancel_reason", "")
        return Event(event_type, order_id, value)
    value.update(_content(order, catalog, amended=event_type == "OrderAmended"))
    if event_type == "OrderAmended":
        # Shopify has no amendment id; the update time names the revision, and every re-delivery of
        # the same update names it alike.
        value["amendment_id"] = f"{external_id}@{order[field]}"
    else:
        customer = order.get("customer")
        value["customer_ref"] = (
            optional_text(obj(customer, "customer"), "id", "customer") if customer is not None else None
        )
    return Event(event_type, order_id, value)


def _content(order: Mapping[str, Any], catalog: Catalog, *, amended: bool) -> dict[str, Any]:
    lines = []
    for i, raw in enumerate(array(order.get("line_items"), "line_items")):
        path = join("line_items", i)
        line = _line(obj(raw, path), path, catalog, amended=amended)
        if line is not None:
            lines.append(line)
    tags = optional_text(order, "tags", "") or ""
    return {
        "priority": "RUSH" if "rush" in {t.strip().lower() for t in tags.split(",")} else "STANDARD",
        "delivery": _delivery(order),
        "currency": text(order, "currency", ""),
        "total": sum((line["unit_price"] * line["quantity"] for line in lines), Decimal("0.00")),
        "promised_by": None,
        "lines": lines,
    }


def _line(item: Mapping[str, Any], path: str, catalog: Catalog, *, amended: bool) -> dict[str, Any] | None:
    quantity = integer(item, "quantity", path)
    if amended and item.get("current_quantity") is not None:
        # An order edit leaves ``quantity`` as first ordered and puts what is left in current_quantity.
        quantity = integer(item, "current_quantity", path)
        if quantity == 0:
            return None  # removed by the edit; an amendment carries the complete new set of lines
    sku = optional_text(item, "sku", path)
    if sku is None:
        raise MappingError("has no sku: give the Shopify variant the catalog sku", join(path, "sku"))
    custom: list[dict[str, Any]] = []
    for j, prop in enumerate(array(item.get("properties") or [], join(path, "properties"))):
        prop_path = join(join(path, "properties"), j)
        prop = obj(prop, prop_path)
        name = text(prop, "name", prop_path)
        if not is_hidden(name):
            custom += customizations(catalog, sku, name, prop.get("value"), join(prop_path, "value"))
    return {
        "line_id": text(item, "id", path),
        "sku": sku,
        "quantity": quantity,
        "unit_price": amount(item.get("price"), join(path, "price")),
        "customizations": custom,
    }


def _delivery(order: Mapping[str, Any]) -> dict[str, Any]:
    shipping_lines = array(order.get("shipping_lines") or [], "shipping_lines")
    words = " ".join(
        f"{obj(s, join('shipping_lines', i)).get('code') or ''} {s.get('title') or ''}".lower()
        for i, s in enumerate(shipping_lines)
    )
    raw_address = order.get("shipping_address")
    address = obj(raw_address, "shipping_address") if raw_address is not None else None
    if "pickup" in words or "pick up" in words:
        return {"method": "PICKUP", "address": None}
    if address is None:
        return {"method": "PICKUP", "address": None}
    return {
        "method": "DELIVERY" if "delivery" in words else "SHIP",
        "address": {
            "neighbourhood": _note_attribute(order, "neighbourhood"),
            "postcode": optional_text(address, "zip", "shipping_address"),
            "line1": optional_text(address, "address1", "shipping_address"),
            "city": optional_text(address, "city", "shipping_address"),
        },
    }


def _note_attribute(order: Mapping[str, Any], wanted: str) -> str | None:
    for i, attr in enumerate(array(order.get("note_attributes") or [], "note_attributes")):
        path = join("note_attributes", i)
        attr = obj(attr, path)
        if str(attr.get("name", "")).strip().lower() == wanted:
            return optional_text(attr, "value", path)
    return None
