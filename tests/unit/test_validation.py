from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

import pytest

from streams.catalog import Catalog
from streams.events import new_event_id
from streams.stages.validation import ValidationState, observe_phase, validate

T0 = datetime(2025, 3, 14, 18, 0, tzinfo=UTC)
KUNG_PAO = ("kung-pao-chicken", 1, [("SUBSTITUTE", "vegetable", "asparagus")])
DELIVER_NORTH = {
    "method": "DELIVERY",
    "address": {"neighbourhood": "north", "postcode": None, "line1": None, "city": None},
}


def decide(state: ValidationState, kind: str, value: dict[str, Any], catalog: Catalog) -> dict[str, Any]:
    events = validate(state, kind, value, catalog, T0 + timedelta(seconds=1))
    assert len(events) == 1
    assert events[0].key == value["order_id"]
    return {"type": events[0].type, **events[0].value}


AMENDMENTS = itertools.count(1)


def amendment(placed: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """An amendment of ``placed``; unless ``changes`` says otherwise it asks for a new promised time."""
    n = next(AMENDMENTS)
    promised = T0 + timedelta(hours=n)
    return {**placed, "event_id": new_event_id(), "amendment_id": f"A{n}", "promised_by": promised, **changes}


def cancellation(placed: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "order_id",
        "seq",
        "occurred_at",
        "recorded_at",
        "causation_id",
        "source_platform",
        "external_order_id",
    )
    return {**{k: placed[k] for k in keys}, "event_id": new_event_id(), "reason": "changed my mind"}


def test_valid_order_is_accepted_with_its_lines(restaurant: Catalog, make_order: Any) -> None:
    placed = make_order(restaurant, [KUNG_PAO, ("spring-rolls", 2, [])], delivery=DELIVER_NORTH)
    out = decide(ValidationState(), "OrderPlaced", placed, restaurant)
    assert out["type"] == "OrderAccepted"
    assert out["change"] == "PLACED" and out["revision"] == 1
    assert out["lines"] == placed["lines"]
    assert out["placed_at"] == placed["occurred_at"]
    assert out["causation_id"] == placed["event_id"]


@pytest.mark.parametrize(
    ("lines", "reason"),
    [
        ([("peking-duck", 1, [])], "UNKNOWN_SKU"),
        ([("kung-pao-chicken", 1, [("SUBSTITUTE", "vegetable", "kale")])], "OPTION_NOT_ALLOWED"),
        ([("kung-pao-chicken", 1, [("SELECT", "vegetable", "asparagus")])], "OPTION_NOT_ALLOWED"),
        ([("kung-pao-chicken", 1, [("ADD", "glitter", "gold")])], "OPTION_NOT_ALLOWED"),
        ([("egg-fried-rice", 1, [("TEXT", "note", "x" * 41)])], "OPTION_NOT_ALLOWED"),
        ([("kung-pao-chicken", 9, [])], "QUANTITY_OUT_OF_RANGE"),
        ([("kung-pao-chicken", 0, [])], "QUANTITY_OUT_OF_RANGE"),
        ([], "QUANTITY_OUT_OF_RANGE"),
    ],
)
def test_content_rejections(restaurant: Catalog, make_order: Any, lines: list[Any], reason: str) -> None:
    out = decide(ValidationState(), "OrderPlaced", make_order(restaurant, lines), restaurant)
    assert (out["type"], out["reason"], out["request"]) == ("OrderRejected", reason, "PLACE")
    assert out["detail"]


def test_required_option_missing_is_rejected(footwear: Catalog, make_order: Any) -> None:
    placed = make_order(footwear, [("custom-runner", 1, [("SELECT", "size", "42")])])
    out = decide(ValidationState(), "OrderPlaced", placed, footwear)
    assert out["reason"] == "OPTION_NOT_ALLOWED" and "upper-colour" in out["detail"]


def test_price_mismatch_on_unit_price_total_and_currency(restaurant: Catalog, make_order: Any) -> None:
    cheap = make_order(restaurant, [KUNG_PAO])
    cheap["lines"][0]["unit_price"] -= Decimal("1.50")  # asparagus surcharge dropped
    cheap["total"] -= Decimal("1.50")
    assert decide(ValidationState(), "OrderPlaced", cheap, restaurant)["reason"] == "PRICE_MISMATCH"

    wrong_total = make_order(restaurant, [KUNG_PAO], external_id="2")
    wrong_total["total"] += Decimal("0.01")
    assert decide(ValidationState(), "OrderPlaced", wrong_total, restaurant)["reason"] == "PRICE_MISMATCH"

    dollars = make_order(restaurant, [KUNG_PAO], external_id="3")
    dollars["currency"] = "USD"
    assert decide(ValidationState(), "OrderPlaced", dollars, restaurant)["reason"] == "PRICE_MISMATCH"


@pytest.mark.parametrize(
    ("delivery", "reason"),
    [
        ({"method": "DELIVERY", "address": None}, "MISSING_ADDRESS"),
        (
            {
                "method": "DELIVERY",
                "address": {"neighbourhood": None, "postcode": "1011", "line1": None, "city": None},
            },
            "MISSING_ADDRESS",
        ),
        (
            {
                "method": "SHIP",
                "address": {"neighbourhood": "north", "postcode": None, "line1": None, "city": None},
            },
            "MISSING_ADDRESS",
        ),
        (
            {
                "method": "DELIVERY",
                "address": {"neighbourhood": "airport", "postcode": None, "line1": None, "city": None},
            },
            "UNSERVICEABLE_ADDRESS",
        ),
    ],
)
def test_address_rejections(
    restaurant: Catalog, make_order: Any, delivery: dict[str, Any], reason: str
) -> None:
    out = decide(
        ValidationState(), "OrderPlaced", make_order(restaurant, [KUNG_PAO], delivery=delivery), restaurant
    )
    assert out["reason"] == reason


def test_redelivered_event_is_a_duplicate_event_and_changes_nothing(
    restaurant: Catalog, make_order: Any
) -> None:
    state = ValidationState()
    placed = make_order(restaurant, [KUNG_PAO])
    first = decide(state, "OrderPlaced", placed, restaurant)
    again = decide(state, "OrderPlaced", placed, restaurant)
    assert first["type"] == "OrderAccepted"
    assert (again["type"], again["reason"]) == ("OrderRejected", "DUPLICATE_EVENT")
    assert again["rejected_event_id"] == placed["event_id"]
    assert state.phase == "ACCEPTED" and state.revision == 1
    assert again["seq"] > first["seq"]


def test_resent_order_with_new_event_id_is_a_duplicate_order(restaurant: Catalog, make_order: Any) -> None:
    state = ValidationState()
    decide(state, "OrderPlaced", make_order(restaurant, [KUNG_PAO]), restaurant)
    resent = make_order(restaurant, [KUNG_PAO])  # same source + external id -> same order id
    assert decide(state, "OrderPlaced", resent, restaurant)["reason"] == "DUPLICATE_ORDER"


def test_order_may_be_placed_again_after_a_rejection(restaurant: Catalog, make_order: Any) -> None:
    state = ValidationState()
    bad = make_order(restaurant, [("kung-pao-chicken", 99, [])])
    assert decide(state, "OrderPlaced", bad, restaurant)["type"] == "OrderRejected"
    assert (
        decide(state, "OrderPlaced", make_order(restaurant, [KUNG_PAO]), restaurant)["type"]
        == "OrderAccepted"
    )


def test_amendment_before_production_is_accepted_as_next_revision(
    restaurant: Catalog, make_order: Any
) -> None:
    state = ValidationState()
    placed = make_order(restaurant, [KUNG_PAO])
    decide(state, "OrderPlaced", placed, restaurant)
    bigger = make_order(restaurant, [KUNG_PAO, ("mapo-tofu", 1, [])])
    out = decide(
        state, "OrderAmended", amendment(placed, lines=bigger["lines"], total=bigger["total"]), restaurant
    )
    assert (out["type"], out["change"], out["revision"]) == ("OrderAccepted", "AMENDED", 2)
    assert [line["sku"] for line in out["lines"]] == ["kung-pao-chicken", "mapo-tofu"]
    assert out["placed_at"] == placed["occurred_at"]


def test_amendment_content_is_validated(restaurant: Catalog, make_order: Any) -> None:
    state = ValidationState()
    placed = make_order(restaurant, [KUNG_PAO])
    decide(state, "OrderPlaced", placed, restaurant)
    out = decide(state, "OrderAmended", amendment(placed, total=Decimal("1.00")), restaurant)
    assert (out["reason"], out["request"]) == ("PRICE_MISMATCH", "AMEND")
    assert state.phase == "ACCEPTED" and state.revision == 1


@pytest.mark.parametrize(
    ("status", "reason"),
    [("IN_PROGRESS", "ORDER_IN_PRODUCTION"), ("DISPATCHED", "ORDER_CLOSED"), ("FAILED", "ORDER_CLOSED")],
)
def test_amendment_after_production_started_or_dispatch_is_rejected(
    restaurant: Catalog, make_order: Any, status: str, reason: str
) -> None:
    state = ValidationState()
    placed = make_order(restaurant, [KUNG_PAO])
    decide(state, "OrderPlaced", placed, restaurant)
    observe_phase(state, {"state": status, "revision": 1})
    assert decide(state, "OrderAmended", amendment(placed), restaurant)["reason"] == reason


def test_stale_status_of_a_superseded_revision_does_not_block_amendments(
    restaurant: Catalog, make_order: Any
) -> None:
    state = ValidationState()
    placed = make_order(restaurant, [KUNG_PAO])
    decide(state, "OrderPlaced", placed, restaurant)
    decide(state, "OrderAmended", amendment(placed), restaurant)
    observe_phase(state, {"state": "IN_PROGRESS", "revision": 1})
    assert decide(state, "OrderAmended", amendment(placed), restaurant)["revision"] == 3


def test_amend_or_cancel_unknown_order_is_rejected(restaurant: Catalog, make_order: Any) -> None:
    placed = make_order(restaurant, [KUNG_PAO])
    assert (
        decide(ValidationState(), "OrderAmended", amendment(placed), restaurant)["reason"] == "UNKNOWN_ORDER"
    )
    out = decide(ValidationState(), "OrderCancelled", cancellation(placed), restaurant)
    assert (out["reason"], out["request"]) == ("UNKNOWN_ORDER", "CANCEL")


def test_cancellation_accepted_in_production_then_order_is_closed(
    restaurant: Catalog, make_order: Any
) -> None:
    state = ValidationState()
    placed = make_order(restaurant, [KUNG_PAO])
    decide(state, "OrderPlaced", placed, restaurant)
    observe_phase(state, {"state": "IN_PROGRESS", "revision": 1})
    out = decide(state, "OrderCancelled", cancellation(placed), restaurant)
    assert (out["type"], out["in_production"]) == ("OrderCancellationAccepted", True)
    assert decide(state, "OrderCancelled", cancellation(placed), restaurant)["reason"] == "ORDER_CLOSED"
    assert decide(state, "OrderAmended", amendment(placed), restaurant)["reason"] == "ORDER_CLOSED"


def test_cancel_after_dispatch_is_rejected(restaurant: Catalog, make_order: Any) -> None:
    state = ValidationState()
    placed = make_order(restaurant, [KUNG_PAO])
    decide(state, "OrderPlaced", placed, restaurant)
    observe_phase(state, {"state": "DISPATCHED", "revision": 1})
    assert decide(state, "OrderCancelled", cancellation(placed), restaurant)["reason"] == "ORDER_CLOSED"


def test_seq_strictly_increases_and_state_round_trips(restaurant: Catalog, make_order: Any) -> None:
    state = ValidationState()
    placed = make_order(restaurant, [KUNG_PAO])
    seqs = [decide(state, "OrderPlaced", placed, restaurant)["seq"]]
    for _ in range(3):
        state = ValidationState.from_dict(state.to_dict())
        seqs.append(decide(state, "OrderAmended", amendment(placed), restaurant)["seq"])
    assert seqs == sorted(set(seqs))
    assert state.revision == 4


def test_decision_event_ids_are_derived_from_the_cause(restaurant: Catalog, make_order: Any) -> None:
    placed = make_order(restaurant, [KUNG_PAO])
    a = decide(ValidationState(), "OrderPlaced", placed, restaurant)
    b = decide(ValidationState(), "OrderPlaced", placed, restaurant)
    assert a["event_id"] == b["event_id"]
    other = decide(ValidationState(), "OrderPlaced", {**placed, "event_id": new_event_id()}, restaurant)
    assert other["event_id"] != a["event_id"]


def test_a_replay_from_the_same_log_position_emits_nothing(restaurant: Catalog, make_order: Any) -> None:
    state = ValidationState()
    order = make_order(restaurant, [("mapo-tofu", 1, [])])
    first = validate(state, "OrderPlaced", order, restaurant, T0, source="orders.inbound.v1:2:17")
    assert [e.type for e in first] == ["OrderAccepted"]
    assert validate(state, "OrderPlaced", order, restaurant, T0, source="orders.inbound.v1:2:17") == []
    again = validate(state, "OrderPlaced", order, restaurant, T0, source="orders.inbound.v1:2:18")
    assert [(e.type, e.value["reason"]) for e in again] == [("OrderRejected", "DUPLICATE_EVENT")]


def test_an_amendment_that_changes_nothing_gets_no_decision(restaurant: Catalog, make_order: Any) -> None:
    state = ValidationState()
    placed = make_order(restaurant, [KUNG_PAO])
    decide(state, "OrderPlaced", placed, restaurant)
    same = {**placed, "event_id": new_event_id(), "amendment_id": "paid"}  # e.g. Shopify: payment captured
    assert validate(state, "OrderAmended", same, restaurant, T0) == []
    assert state.revision == 1
    # Not even once work has started or the order is out of the door: there is nothing to refuse.
    observe_phase(state, {"state": "DISPATCHED", "revision": 1})
    assert validate(state, "OrderAmended", {**same, "event_id": new_event_id()}, restaurant, T0) == []
    # A real change after dispatch is still refused.
    changed = amendment(placed)
    assert decide(state, "OrderAmended", changed, restaurant)["reason"] == "ORDER_CLOSED"
