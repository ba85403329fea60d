"""Validation: storefront requests (place, amend, cancel) in, accept or reject decisions out.

State is keyed by order id. Because order ids are derived from (source platform, external order
id) (see ``streams.events.order_id_for``), a re-sent order lands on the same key and is caught as
DUPLICATE_ORDER; a redelivered event is caught by its event id as DUPLICATE_EVENT. Duplicate
rejections are informational and never change the order.

Amendments carry the complete new content and are accepted only before production starts; the
production phase is learnt from the OrderPhaseChanged records of the dispatch stage (``observe_phase``).
An amendment whose content equals the accepted content changes nothing and gets no decision:
storefronts send order updates for payment, tags or fulfilment too (Shopify's orders/updated), and
each would otherwise re-plan the order's work, or be rejected once work has started.
Cancellations are accepted until the order is dispatched.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from streams.catalog import Catalog, Product
from streams.events import Event, derived_event_id, envelope, epoch_ms, from_epoch_ms

# Enough to catch storefront webhook retries, which repeat recent events of the order.
SEEN_EVENT_IDS = 32

PLACE, AMEND, CANCEL = "PLACE", "AMEND", "CANCEL"
# What an accepted placement or amendment decides; the rest of a request is about where it came from.
CONTENT = ("priority", "delivery", "currency", "total", "promised_by", "lines")
REQUESTS = {"OrderPlaced": PLACE, "OrderAmended": AMEND, "OrderCancelled": CANCEL}

# Order phases as validation knows them.
NEW, REJECTED, ACCEPTED, IN_PRODUCTION = "NEW", "REJECTED", "ACCEPTED", "IN_PRODUCTION"
DISPATCHED, CANCELLED, FAILED = "DISPATCHED", "CANCELLED", "FAILED"
CLOSED = (DISPATCHED, CANCELLED, FAILED)
LIVE = (ACCEPTED, IN_PRODUCTION)
# OrderPhaseChanged.state -> phase.
_STATUS_PHASE = {
    "IN_PROGRESS": IN_PRODUCTION,
    "DISPATCHED": DISPATCHED,
    "CANCELLED": CANCELLED,
    "FAILED": FAILED,
}


@dataclass
class ValidationState:
    """Per-order validation state (key: order id)."""

    order_id: str = ""
    seq: int = 0
    phase: str = NEW
    revision: int = 0
    placed_at_ms: int | None = None
    seen_event_ids: list[str] = field(default_factory=list)
    # Where each seen event was read (topic:partition:offset): the same event from the same place is
    # a replay after a crash or rebalance, whose outputs are already on the log.
    seen_at: dict[str, str] = field(default_factory=dict)
    content_digest: str | None = None  # of the accepted content (``content_digest``)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> ValidationState:
        return cls(**raw) if raw else cls()


Problem = tuple[str, str]


def validate(
    state: ValidationState,
    event_type: str,
    value: Mapping[str, Any],
    catalog: Catalog,
    now: datetime,
    source: str | None = None,
) -> list[Event]:
    """Decide on an OrderPlaced / OrderAmended / OrderCancelled.

    Emits exactly one of OrderAccepted, OrderRejected or OrderCancellationAccepted (key: order id),
    or nothing for a replay (an event seen before at the same ``source`` position of the log) and
    for an amendment that asks for exactly the accepted content. The
    same event id anywhere else is a storefront sending it twice, and is rejected as a duplicate.
    """
    request = REQUESTS[event_type]
    state.order_id = value["order_id"]
    event_id = value["event_id"]
    if event_id in state.seen_event_ids:
        if source is not None and state.seen_at.get(event_id) == source:
            return []
        return [_reject(state, value, request, [("DUPLICATE_EVENT", "event already processed")], now)]
    state.seen_event_ids = [*state.seen_event_ids, event_id][-SEEN_EVENT_IDS:]
    if source is not None:
        state.seen_at = {k: v for k, v in state.seen_at.items() if k in state.seen_event_ids} | {event_id: source}

    if request == CANCEL:
        return _cancel(state, value, now)
    digest = content_digest(value)
    if request == AMEND and digest == state.content_digest:
        return []
    lifecycle = _lifecycle_problem(state, request)
    if lifecycle:
        return [_reject(state, value, request, [lifecycle], now)]
    problems = content_problems(value, catalog)
    if problems:
        if state.phase == NEW:
            state.phase = REJECTED
        return [_reject(state, value, request, problems, now)]
    if request == PLACE:
        state.placed_at_ms = epoch_ms(value["occurred_at"])
        state.phase = ACCEPTED
    state.revision += 1
    state.content_digest = digest
    return [_accept(state, value, request, now)]


def content_digest(value: Mapping[str, Any]) -> str:
    """A fingerprint of what a placement or amendment asks for, the same for the same content."""
    canonical = json.dumps({k: value[k] for k in CONTENT}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


def observe_phase(state: ValidationState, status: Mapping[str, Any]) -> None:
    """Learn the production phase from an OrderPhaseChanged record of the dispatch stage."""
    phase = _STATUS_PHASE.get(status["state"])
    if phase is None or state.phase not in LIVE:
        return
    if phase == IN_PRODUCTION and status["revision"] < state.revision:
        return  # work on a superseded revision does not freeze the current one
    state.phase = phase


def _lifecycle_problem(state: ValidationState, request: str) -> Problem | None:
    if request == PLACE:
        if state.phase in (NEW, REJECTED):
            return None
        return ("DUPLICATE_ORDER", f"order {state.order_id} was already placed")
    if state.phase in (NEW, REJECTED):
        return ("UNKNOWN_ORDER", f"no accepted order {state.order_id}")
    if state.phase in CLOSED:
        return ("ORDER_CLOSED", f"order is {state.phase.lower()}")
    if state.phase == IN_PRODUCTION and request == AMEND:
        return ("ORDER_IN_PRODUCTION", "work on the order has started")
    return None


def content_problems(value: Mapping[str, Any], catalog: Catalog) -> list[Problem]:
    """Everything wrong with the content of a placement or amendment, most specific first."""
    problems: list[Problem] = []
    lines = value["lines"]
    if not lines:
        problems.append(("QUANTITY_OUT_OF_RANGE", "order has no lines"))
    expected_total = Decimal("0")
    for line in lines:
        product = catalog.products.get(line["sku"])
        where = f"line {line['line_id']}"
        if product is None:
            problems.append(("UNKNOWN_SKU", f"{where}: unknown sku {line['sku']!r}"))
            continue
        if not 1 <= line["quantity"] <= product.max_quantity:
            problems.append(
                (
                    "QUANTITY_OUT_OF_RANGE",
                    f"{where}: quantity {line['quantity']} not in 1..{product.max_quantity}",
                )
            )
        option_problems = _option_problems(product, line["customizations"], where)
        problems.extend(option_problems)
        expected = catalog.unit_price(product, line["customizations"])
        if not option_problems and line["unit_price"] != expected:
            problems.append(
                ("PRICE_MISMATCH", f"{where}: unit price {line['unit_price']}, catalog says {expected}")
            )
        expected_total += line["unit_price"] * line["quantity"]
    problems.extend(_delivery_problems(value["delivery"], catalog))
    if value["currency"] != catalog.currency:
        problems.append(("PRICE_MISMATCH", f"currency {value['currency']}, catalog uses {catalog.currency}"))
    elif value["total"] != expected_total:
        problems.append(("PRICE_MISMATCH", f"total {value['total']}, lines sum to {expected_total}"))
    return problems


def _option_problems(product: Product, customizations: list[Mapping[str, Any]], where: str) -> list[Problem]:
    problems: list[Problem] = []
    counts = Counter(c["option_code"] for c in customizations)
    for c in customizations:
        code, kind, chosen = c["option_code"], c["kind"], c["value"]
        option = product.options.get(code)
        if option is None:
            problems.append(("OPTION_NOT_ALLOWED", f"{where}: {product.sku} has no option {code!r}"))
        elif option.kind != kind:
            problems.append(("OPTION_NOT_ALLOWED", f"{where}: option {code} is {option.kind}, not {kind}"))
        elif option.kind == "TEXT" and not 0 < len(chosen) <= option.max_length:
            problems.append(
                ("OPTION_NOT_ALLOWED", f"{where}: text for {code} must be 1..{option.max_length} chars")
            )
        elif option.value_for(chosen) is None:
            problems.append(("OPTION_NOT_ALLOWED", f"{where}: {chosen!r} is not allowed for {code}"))
        elif counts[code] > 1 and option.kind not in ("ADD", "REMOVE"):
            problems.append(("OPTION_NOT_ALLOWED", f"{where}: option {code} chosen more than once"))
    for option in product.options.values():
        if option.required and option.code not in counts:
            problems.append(("OPTION_NOT_ALLOWED", f"{where}: option {option.code} is required"))
    return problems


def _delivery_problems(delivery: Mapping[str, Any], catalog: Catalog) -> list[Problem]:
    method = delivery["method"]
    address = delivery["address"] or {}
    if method == "PICKUP":
        return []
    needed = {"DELIVERY": "neighbourhood", "SHIP": "postcode"}.get(method)
    if needed is None:
        return [("MISSING_ADDRESS", f"unknown delivery method {method}")]
    if not address.get(needed):
        return [("MISSING_ADDRESS", f"{method} needs an address with a {needed}")]
    if not catalog.handover_stations(method, address.get("neighbourhood")):
        return [("UNSERVICEABLE_ADDRESS", f"nobody delivers to {address.get('neighbourhood')!r}")]
    return []


def _cancel(state: ValidationState, value: Mapping[str, Any], now: datetime) -> list[Event]:
    lifecycle = _lifecycle_problem(state, CANCEL)
    if lifecycle:
        return [_reject(state, value, CANCEL, [lifecycle], now)]
    in_production = state.phase == IN_PRODUCTION
    state.phase = CANCELLED
    state.seq += 1
    return [
        Event(
            "OrderCancellationAccepted",
            state.order_id,
            {
                **_envelope(state, value, "OrderCancellationAccepted", now),
                "source_platform": value["source_platform"],
                "external_order_id": value["external_order_id"],
                "reason": value["reason"],
                "in_production": in_production,
            },
        )
    ]


def _accept(state: ValidationState, value: Mapping[str, Any], request: str, now: datetime) -> Event:
    state.seq += 1
    assert state.placed_at_ms is not None  # set on the accepted placement, before any amendment
    content = (
        "source_platform",
        "external_order_id",
        "priority",
        "delivery",
        "currency",
        "total",
        "promised_by",
        "lines",
    )
    return Event(
        "OrderAccepted",
        state.order_id,
        {
            **_envelope(state, value, "OrderAccepted", now),
            "change": "PLACED" if request == PLACE else "AMENDED",
            "revision": state.revision,
            "placed_at": from_epoch_ms(state.placed_at_ms),
            **{k: value[k] for k in content},
        },
    )


def _reject(
    state: ValidationState, value: Mapping[str, Any], request: str, problems: list[Problem], now: datetime
) -> Event:
    state.seq += 1
    return Event(
        "OrderRejected",
        state.order_id,
        {
            **_envelope(state, value, f"OrderRejected:{problems[0][0]}", now),
            "request": request,
            "rejected_event_id": value["event_id"],
            "reason": problems[0][0],
            "detail": "; ".join(detail for _, detail in problems),
            "source_platform": value["source_platform"],
            "external_order_id": value["external_order_id"],
        },
    )


def _envelope(state: ValidationState, cause: Mapping[str, Any], kind: str, now: datetime) -> dict[str, Any]:
    return envelope(
        state.order_id,
        state.seq,
        now,
        event_id=derived_event_id(cause["event_id"], kind),
        causation_id=cause["event_id"],
    )
