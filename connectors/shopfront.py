"""A simulated storefront: consistent OrderPlaced / OrderAmended / OrderCancelled values for a catalog.

The demo, the benchmark and the integration tests place orders through it, so every order that
should pass validation does (prices and totals come from the catalog), and the ones that should
not are wrong on purpose.
"""

from __future__ import annotations

import random
from datetime import datetime
from decimal import Decimal
from typing import Any

from streams.catalog import Catalog, Product
from streams.events import new_event_id, order_id_for, utc_now

Line = tuple[str, int, list[tuple[str, str, str]]]  # sku, quantity, [(kind, option code, value)]


def build_order(
    catalog: Catalog,
    lines: list[Line],
    *,
    external_id: str,
    source: str = "demo",
    priority: str = "STANDARD",
    delivery: dict[str, Any] | None = None,
    at: datetime | None = None,
    seq: int = 1,
) -> dict[str, Any]:
    """An OrderPlaced value whose unit prices and total agree with the catalog."""
    now = at or utc_now()
    built: list[dict[str, Any]] = []
    for i, (sku, qty, custom) in enumerate(lines):
        customizations = [{"kind": k, "option_code": o, "value": v} for k, o, v in custom]
        product = catalog.products.get(sku)
        price = catalog.unit_price(product, customizations) if product else Decimal("1.00")
        built.append(
            {"line_id": f"L{i + 1}", "sku": sku, "quantity": qty, "unit_price": price, "customizations": customizations}
        )
    return {
        "event_id": new_event_id(),
        "order_id": order_id_for(source, external_id),
        "seq": seq,
        "occurred_at": now,
        "recorded_at": now,
        "causation_id": None,
        "source_platform": source,
        "external_order_id": external_id,
        "priority": priority,
        "delivery": delivery or {"method": "PICKUP", "address": None},
        "currency": catalog.currency,
        "total": sum((line["unit_price"] * line["quantity"] for line in built), Decimal("0")),
        "promised_by": None,
        "lines": built,
        "customer_ref": f"customer-{external_id}",
    }


def amendment(placed: dict[str, Any], catalog: Catalog, lines: list[Line], seq: int = 2) -> dict[str, Any]:
    """An OrderAmended that replaces the order's lines."""
    replacement = build_order(
        catalog, lines, external_id=placed["external_order_id"], source=placed["source_platform"],
        priority=placed["priority"], delivery=placed["delivery"], seq=seq,
    )
    return {**replacement, "amendment_id": new_event_id()}


def cancellation(placed: dict[str, Any], seq: int = 2, reason: str = "customer changed their mind") -> dict[str, Any]:
    now = utc_now()
    return {
        "event_id": new_event_id(),
        "order_id": placed["order_id"],
        "seq": seq,
        "occurred_at": now,
        "recorded_at": now,
        "causation_id": None,
        "source_platform": placed["source_platform"],
        "external_order_id": placed["external_order_id"],
        "reason": reason,
    }


def random_customizations(product: Product, rng: random.Random) -> list[tuple[str, str, str]]:
    chosen = []
    for option in product.options.values():
        if option.required or rng.random() < 0.45:
            if option.kind == "TEXT":
                text = rng.choice(["JD", "AMY", "no onions please", "K"])
                chosen.append((option.kind, option.code, text[: option.max_length or None]))
            else:
                value = rng.choice(sorted(option.values))
                chosen.append((option.kind, option.code, value))
    return chosen


def random_order(
    catalog: Catalog,
    rng: random.Random,
    external_id: str,
    *,
    source: str = "demo",
    rush_share: float = 0.1,
) -> dict[str, Any]:
    """A realistic order: one to three lines, mostly one unit each, some customized, some rush."""
    skus = sorted(catalog.products)
    lines: list[Line] = []
    for sku in rng.sample(skus, k=min(len(skus), rng.choice([1, 1, 1, 2, 2, 3]))):
        product = catalog.products[sku]
        lines.append((sku, rng.choice([1, 1, 1, 2]), random_customizations(product, rng)))
    couriers = sorted({n for s in catalog.stations.values() if s.kind == "COURIER" for n in s.neighbourhoods} - {"*"})
    carriers = [s for s in catalog.stations.values() if s.kind == "CARRIER"]
    delivery: dict[str, Any]
    if couriers and rng.random() < 0.7:
        delivery = {"method": "DELIVERY", "address": {"neighbourhood": rng.choice(couriers), "postcode": None,
                                                     "line1": "1 Example Street", "city": None}}
    elif carriers and rng.random() < 0.8:
        delivery = {"method": "SHIP", "address": {"neighbourhood": None, "postcode": f"{rng.randint(10000, 99999)}",
                                                 "line1": "1 Example Street", "city": "Example City"}}
    else:
        delivery = {"method": "PICKUP", "address": None}
    priority = "RUSH" if rng.random() < rush_share else "STANDARD"
    return build_order(catalog, lines, external_id=external_id, source=source, priority=priority, delivery=delivery)
