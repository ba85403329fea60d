"""WooCommerce order webhooks (REST API v3 order JSON) as pieceflow order events. Pure.

- ``order.created`` -> OrderPlaced; ``order.updated`` -> OrderAmended, or OrderCancelled when the new
  status is cancelled, refunded or failed (WooCommerce has no cancellation topic); ``order.deleted``
  (body ``{"id": ...}``) -> OrderCancelled.
- Line unit price is ``subtotal`` / ``quantity``: ``subtotal`` is before coupons and tax, as the
  catalog prices are, while ``price`` is a float after coupons. Each line's ``sku`` must be the
  catalog sku. The order ``total`` holds shipping and tax, so the event's total is the sum of the lines.
- Line ``meta_data`` ([{key, value}]) becomes customizations (see ``common.customizations``); keys
  starting with ``_`` are WooCommerce's own bookkeeping and are skipped; ``pa_size`` is ``size``.
- Delivery: a shipping line ``local_pickup`` / ``pickup_location`` -> PICKUP; one whose id or title says
  delivery -> DELIVERY; otherwise a shipping address -> SHIP; none -> PICKUP. The neighbourhood comes
  from the order's ``meta_data`` key "neighbourhood"; priority is RUSH when its "priority" is "rush".
- Times are the ``*_gmt`` fields (UTC without an offset); the others are in the shop's time zone.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from connectors.intake.common import (
    CENTS,
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

SOURCE = "woocommerce"
TOPICS = ("order.created", "order.updated", "order.deleted")
CANCELLED_STATUSES = ("cancelled", "refunded", "failed")
PICKUP_METHODS = ("local_pickup", "pickup_location")


def map_woocommerce(topic: str, payload: Any, delivery_id: str, catalog: Catalog, received_at: datetime) -> Event:
    """One WooCommerce webhook (``X-WC-Webhook-Topic``, JSON body, delivery id) as the event to produce."""
    if topic not in TOPICS:
        raise MappingError(f"unsupported topic {topic!r}; expected one of {', '.join(TOPICS)}", "X-WC-Webhook-Topic")
    order = obj(payload, "")
    external_id = text(order, "id", "")
    order_id = order_id_for(SOURCE, external_id)
    status = optional_text(order, "status", "")
    if topic == "order.created":
        event_type = "OrderPlaced"
        occurred_at = timestamp(required(order, "date_created_gmt", ""), "date_created_gmt")
    elif topic == "order.deleted":
        event_type = "OrderCancelled"
        occurred_at = received_at  # the body is only the id: the deletion time is when we heard of it
    else:
        event_type = "OrderCancelled" if status in CANCELLED_STATUSES else "OrderAmended"
        occurred_at = timestamp(required(order, "date_modified_gmt", ""), "date_modified_gmt")
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
        value["reason"] = "order deleted" if topic == "order.deleted" else f"order status {status}"
        return Event(event_type, order_id, value)
    value.update(_content(order, catalog))
    if event_type == "OrderAmended":
        value["amendment_id"] = f"{external_id}@{order['date_modified_gmt']}"
    else:
        customer_id = order.get("customer_id")
        value["customer_ref"] = str(customer_id) if customer_id else None  # 0 is a guest checkout
    return Event(event_type, order_id, value)


def _content(order: Mapping[str, Any], catalog: Catalog) -> dict[str, Any]:
    lines = [
        _line(obj(raw, join("line_items", i)), join("line_items", i), catalog)
        for i, raw in enumerate(array(order.get("line_items"), "line_items"))
    ]
    meta = _meta(order)
    return {
        "priority": "RUSH" if str(meta.get("priority", "")).strip().lower() == "rush" else "STANDARD",
        "delivery": _delivery(order, meta),
        "currency": text(order, "currency", ""),
        "total": sum((line["unit_price"] * line["quantity"] for line in lines), Decimal("0.00")),
        "promised_by": None,
        "lines": lines,
    }


def _line(item: Mapping[str, Any], path: str, catalog: Catalog) -> dict[str, Any]:
    quantity = integer(item, "quantity", path)
    if quantity <= 0:
        raise MappingError(f"must be positive, not {quantity}", join(path, "quantity"))
    sku = optional_text(item, "sku", path)
    if sku is None:
        raise MappingError("has no sku: give the WooCommerce product the catalog sku", join(path, "sku"))
    subtotal = amount(required(item, "subtotal", path), join(path, "subtotal"))
    custom: list[dict[str, Any]] = []
    for j, entry in enumerate(array(item.get("meta_data") or [], join(path, "meta_data"))):
        entry_path = join(join(path, "meta_data"), j)
        entry = obj(entry, entry_path)
        key = text(entry, "key", entry_path)
        if not is_hidden(key):
            custom += customizations(catalog, sku, key, entry.get("value"), join(entry_path, "value"))
    return {
        "line_id": text(item, "id", path),
        "sku": sku,
        "quantity": quantity,
        "unit_price": (subtotal / quantity).quantize(CENTS, rounding=ROUND_HALF_UP),
        "customizations": custom,
    }


def _meta(order: Mapping[str, Any]) -> dict[str, Any]:
    found: dict[str, Any] = {}
    for i, entry in enumerate(array(order.get("meta_data") or [], "meta_data")):
        entry = obj(entry, join("meta_data", i))
        if isinstance(entry.get("key"), str):
            found[entry["key"].strip().lower()] = entry.get("value")
    return found


def _delivery(order: Mapping[str, Any], meta: Mapping[str, Any]) -> dict[str, Any]:
    methods = []
    for i, line in enumerate(array(order.get("shipping_lines") or [], "shipping_lines")):
        line = obj(line, join("shipping_lines", i))
        methods.append((str(line.get("method_id") or "").lower(), str(line.get("method_title") or "").lower()))
    if any(method_id in PICKUP_METHODS or "pickup" in title for method_id, title in methods):
        return {"method": "PICKUP", "address": None}
    raw = order.get("shipping")
    shipping = obj(raw, "shipping") if raw is not None else {}
    address = {
        "neighbourhood": str(meta["neighbourhood"]).strip() or None if meta.get("neighbourhood") else None,
        "postcode": optional_text(shipping, "postcode", "shipping"),
        "line1": optional_text(shipping, "address_1", "shipping"),
        "city": optional_text(shipping, "city", "shipping"),
    }
    if any("delivery" in method_id or "delivery" in title for method_id, title in methods):
        return {"method": "DELIVERY", "address": address}
    # WooCommerce sends every shipping field, empty when there is no address.
    if address["postcode"] or address["line1"]:
        return {"method": "SHIP", "address": address}
    return {"method": "PICKUP", "address": None}
