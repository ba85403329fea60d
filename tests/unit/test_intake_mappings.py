"""The pure mappings: platform payloads (tests/unit/payloads) to pieceflow order events.

Mapped placements are also run through validation's content checks against the seed catalogs: a
mapping that compiles but produces orders the pipeline would reject is still wrong.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import pytest

from connectors.intake.common import MappingError, event_id_for, storefront_seq
from connectors.intake.generic import map_generic
from connectors.intake.shopify import map_shopify
from connectors.intake.woocommerce import map_woocommerce
from streams import schemas
from streams.catalog import Catalog
from streams.stages.validation import content_problems

PAYLOADS = Path(__file__).parent / "payloads"
NOW = datetime(2025, 3, 14, 18, 0, 5, tzinfo=UTC)


def payload(name: str) -> Any:
    return json.loads((PAYLOADS / name).read_text())


def assert_valid_avro(event_type: str, value: dict[str, Any]) -> None:
    assert fastavro.validate(value, schemas.parsed_schema(event_type), raise_errors=True)


# ---- Shopify ------------------------------------------------------------------------------------


def test_shopify_orders_create_is_a_valid_order_placed(footwear: Catalog) -> None:
    event = map_shopify("orders/create", payload("shopify_orders_create.json"), "wh-1", footwear, NOW)
    value = event.value
    assert event.type == "OrderPlaced"
    assert event.key == value["order_id"] == "shopify:5923157360923"
    assert value["event_id"] == event_id_for("shopify", "wh-1")
    assert value["external_order_id"] == "5923157360923"
    assert value["occurred_at"] == datetime(2025, 3, 14, 18, 0, tzinfo=UTC)
    assert value["recorded_at"] == NOW
    assert value["customer_ref"] == "7316842430747"
    assert value["currency"] == "EUR"
    assert value["total"] == Decimal("186.00")  # lines only: total_price 190.95 holds shipping
    assert value["delivery"] == {
        "method": "SHIP",
        "address": {"neighbourhood": None, "postcode": "1015 CJ", "line1": "Keizersgracht 123", "city": "Amsterdam"},
    }
    runner, kit = value["lines"]
    assert (runner["line_id"], runner["sku"], runner["quantity"], runner["unit_price"]) == (
        "14470513443099",
        "custom-runner",
        1,
        Decimal("148.00"),
    )
    # "_preview_image" is a hidden property: not a customization.
    assert runner["customizations"] == [
        {"kind": "SELECT", "option_code": "size", "value": "42"},
        {"kind": "SELECT", "option_code": "upper-colour", "value": "ocean"},
        {"kind": "TEXT", "option_code": "monogram", "value": "MARA"},
    ]
    assert kit["customizations"] == []
    assert_valid_avro("OrderPlaced", value)
    assert content_problems(value, footwear) == []


def test_shopify_orders_updated_is_an_amendment_with_the_edited_lines(footwear: Catalog) -> None:
    event = map_shopify("orders/updated", payload("shopify_orders_updated.json"), "wh-2", footwear, NOW)
    value = event.value
    assert event.type == "OrderAmended"
    assert value["amendment_id"] == "5923157360923@2025-03-14T19:04:30+01:00"
    assert value["priority"] == "RUSH"  # tags "rush, vip"
    # The care kit was edited out (current_quantity 0): the amendment carries the complete new lines.
    assert [line["sku"] for line in value["lines"]] == ["custom-runner"]
    assert {"kind": "SELECT", "option_code": "upper-colour", "value": "sunset"} in value["lines"][0]["customizations"]
    assert value["total"] == Decimal("148.00")
    assert_valid_avro("OrderAmended", value)
    assert content_problems(value, footwear) == []


def test_shopify_orders_cancelled(footwear: Catalog) -> None:
    event = map_shopify("orders/cancelled", payload("shopify_orders_cancelled.json"), "wh-3", footwear, NOW)
    assert event.type == "OrderCancelled"
    assert event.value["reason"] == "customer"
    assert event.value["occurred_at"] == datetime(2025, 3, 14, 18, 10, tzinfo=UTC)
    assert_valid_avro("OrderCancelled", event.value)


def test_seq_orders_place_amend_cancel_even_at_the_same_instant() -> None:
    t = datetime(2025, 3, 14, 18, 10, tzinfo=UTC)
    assert storefront_seq("OrderPlaced", t) < storefront_seq("OrderAmended", t) < storefront_seq("OrderCancelled", t)


def test_same_webhook_id_same_event_id(footwear: Catalog) -> None:
    body = payload("shopify_orders_create.json")
    first = map_shopify("orders/create", body, "wh-9", footwear, NOW)
    again = map_shopify("orders/create", body, "wh-9", footwear, datetime(2025, 3, 15, tzinfo=UTC))
    other = map_shopify("orders/create", body, "wh-10", footwear, NOW)
    assert first.value["event_id"] == again.value["event_id"] != other.value["event_id"]


def test_unknown_properties_pass_through_for_validation_to_reject(footwear: Catalog) -> None:
    body = payload("shopify_orders_create.json")
    body["line_items"][0]["properties"].append({"name": "Gift wrap", "value": "Yes please"})
    value = map_shopify("orders/create", body, "wh-4", footwear, NOW).value
    assert {"kind": "UNKNOWN", "option_code": "gift-wrap", "value": "Yes please"} in value["lines"][0]["customizations"]
    assert ("OPTION_NOT_ALLOWED", "line 14470513443099: custom-runner has no option 'gift-wrap'") in content_problems(
        value, footwear
    )


def test_pickup_and_local_delivery(footwear: Catalog) -> None:
    body = payload("shopify_orders_create.json")
    body["shipping_lines"] = [{"code": "Pickup at the workshop", "title": "Pickup", "price": "0.00"}]
    assert map_shopify("orders/create", body, "a", footwear, NOW).value["delivery"] == {
        "method": "PICKUP",
        "address": None,
    }
    body["shipping_lines"] = [{"code": "Local Delivery", "title": "Local Delivery", "price": "0.00"}]
    body["note_attributes"] = [{"name": "Neighbourhood", "value": "docks"}]
    delivery = map_shopify("orders/create", body, "b", footwear, NOW).value["delivery"]
    assert delivery["method"] == "DELIVERY"
    assert delivery["address"]["neighbourhood"] == "docks"


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (lambda o: o.pop("id"), "id", "is required"),
        (lambda o: o.update(line_items="nope"), "line_items", "must be a JSON array, not a string"),
        (lambda o: o["line_items"][1].update(sku=None), "line_items[1].sku", "has no sku"),
        (lambda o: o["line_items"][0].update(price="12,50"), "line_items[0].price", "'12,50' is not a decimal amount"),
        (lambda o: o["line_items"][0].update(price="1.005"), "line_items[0].price", "has more than two decimals"),
        (lambda o: o["line_items"][0].update(quantity="1"), "line_items[0].quantity", "must be an integer"),
        (
            lambda o: o["line_items"][0]["properties"][0].update(value={"cm": 27}),
            "line_items[0].properties[0].value",
            "must be a string or a number",
        ),
        (lambda o: o.update(created_at="yesterday"), "created_at", "is not an ISO 8601 timestamp"),
        (lambda o: o.pop("currency"), "currency", "is required"),
    ],
)
def test_shopify_mapping_errors_name_the_field(footwear: Catalog, change: Any, field: str, message: str) -> None:
    body = copy.deepcopy(payload("shopify_orders_create.json"))
    change(body)
    with pytest.raises(MappingError) as caught:
        map_shopify("orders/create", body, "wh", footwear, NOW)
    assert caught.value.field == field
    assert message in caught.value.message


def test_shopify_unsupported_topic(footwear: Catalog) -> None:
    with pytest.raises(MappingError) as caught:
        map_shopify("products/create", {"id": 1}, "wh", footwear, NOW)
    assert caught.value.field == "X-Shopify-Topic"


# ---- WooCommerce --------------------------------------------------------------------------------


def test_woocommerce_order_created_is_a_valid_order_placed(restaurant: Catalog) -> None:
    event = map_woocommerce("order.created", payload("woocommerce_order_created.json"), "d-1", restaurant, NOW)
    value = event.value
    assert event.type == "OrderPlaced"
    assert event.key == "woocommerce:727"
    assert value["event_id"] == event_id_for("woocommerce", "d-1")
    assert value["occurred_at"] == datetime(2025, 3, 14, 18, 30, tzinfo=UTC)  # date_created_gmt
    assert value["customer_ref"] == "18"
    assert value["delivery"]["method"] == "DELIVERY"
    assert value["delivery"]["address"]["neighbourhood"] == "old-town"
    chicken, rice = value["lines"]
    assert chicken["unit_price"] == Decimal("14.50")  # subtotal 29.00 / 2
    assert chicken["customizations"] == [
        {"kind": "SUBSTITUTE", "option_code": "vegetable", "value": "asparagus"},
        {"kind": "SELECT", "option_code": "spice", "value": "extra-spicy"},
        {"kind": "REMOVE", "option_code": "without", "value": "peanuts"},
    ]
    assert rice["customizations"] == [{"kind": "TEXT", "option_code": "note", "value": "light on the soy, please"}]
    assert value["total"] == Decimal("34.90")  # lines; "total" 38.40 holds shipping
    assert_valid_avro("OrderPlaced", value)
    assert content_problems(value, restaurant) == []


def test_woocommerce_status_cancelled_is_a_cancellation(restaurant: Catalog) -> None:
    event = map_woocommerce("order.updated", payload("woocommerce_order_cancelled.json"), "d-2", restaurant, NOW)
    assert event.type == "OrderCancelled"
    assert event.value["reason"] == "order status cancelled"
    assert_valid_avro("OrderCancelled", event.value)


def test_woocommerce_update_is_an_amendment(restaurant: Catalog) -> None:
    event = map_woocommerce("order.updated", payload("woocommerce_order_created.json"), "d-3", restaurant, NOW)
    assert event.type == "OrderAmended"
    assert event.value["amendment_id"] == "727@2025-03-14T18:30:02"
    assert_valid_avro("OrderAmended", event.value)


def test_woocommerce_attribute_taxonomy_and_several_values(restaurant: Catalog) -> None:
    body = payload("woocommerce_order_created.json")
    meta = body["line_items"][0]["meta_data"]
    meta[0]["key"] = "pa_vegetable"
    meta[2]["value"] = "peanuts, spring onion"
    custom = map_woocommerce("order.created", body, "d", restaurant, NOW).value["lines"][0]["customizations"]
    assert custom[0] == {"kind": "SUBSTITUTE", "option_code": "vegetable", "value": "asparagus"}
    assert {"kind": "REMOVE", "option_code": "without", "value": "spring-onion"} in custom


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda o: o.pop("date_created_gmt"), "date_created_gmt"),
        (lambda o: o["line_items"][0].update(subtotal=None), "line_items[0].subtotal"),
        (lambda o: o["line_items"][1]["meta_data"][0].pop("key"), "line_items[1].meta_data[0].key"),
        (lambda o: o["line_items"][0].update(quantity=0), "line_items[0].quantity"),
    ],
)
def test_woocommerce_mapping_errors_name_the_field(restaurant: Catalog, change: Any, field: str) -> None:
    body = payload("woocommerce_order_created.json")
    change(body)
    with pytest.raises(MappingError) as caught:
        map_woocommerce("order.created", body, "d", restaurant, NOW)
    assert caught.value.field == field


# ---- generic JSON and CloudEvents ---------------------------------------------------------------


def test_generic_order_placed(restaurant: Catalog) -> None:
    raw = (PAYLOADS / "generic_order.json").read_bytes()
    event = map_generic(json.loads(raw), raw, "application/json", NOW)
    value = event.value
    assert event.type == "OrderPlaced"
    assert event.key == value["order_id"] == "pos:T7-0091"
    assert value["recorded_at"] == NOW
    assert value["total"] == Decimal("17.90")
    assert value["lines"][0]["unit_price"] == Decimal("11.40")
    assert value["causation_id"] is None  # schema default filled in
    assert_valid_avro("OrderPlaced", value)
    assert content_problems(value, restaurant) == []
    # Same bytes, same event id: a re-sent request is a duplicate to validation too.
    assert map_generic(json.loads(raw), raw, "application/json", NOW).value["event_id"] == value["event_id"]


def test_cloudevent_structured_amendment(restaurant: Catalog) -> None:
    body = payload("cloudevent_order_amended.json")
    event = map_generic(body, b"", "application/cloudevents+json", NOW)
    assert event.type == "OrderAmended"
    assert event.value["event_id"] == event_id_for("cloudevents:urn:pos:store-12", "a1b2c3d4-0001")
    assert event.value["occurred_at"] == datetime(2025, 3, 14, 18, 50, tzinfo=UTC)  # the CloudEvent time
    assert event.value["delivery"] == {"method": "PICKUP", "address": None}
    assert_valid_avro("OrderAmended", event.value)
    assert content_problems(event.value, restaurant) == []


@pytest.mark.parametrize(
    ("change", "field", "message"),
    [
        (lambda o: o["lines"][0].update(quantity=1.5), "lines[0].quantity", "must be an integer"),
        (lambda o: o.update(priority="URGENT"), "priority", "'URGENT' is not one of UNKNOWN, STANDARD, RUSH"),
        (lambda o: o["lines"][1].pop("sku"), "lines[1].sku", "is required"),
        (lambda o: o.update(totl="1.00"), "totl", "unknown field of OrderPlaced"),
        (lambda o: o["lines"][0]["customizations"][0].update(kind="SWAP"), "lines[0].customizations[0].kind", "SWAP"),
        (lambda o: o.update(order_id="pos:other"), "order_id", "does not match"),
        (lambda o: o["delivery"].update(method=None), "delivery.method", "is required"),
    ],
)
def test_generic_errors_name_the_field(change: Any, field: str, message: str) -> None:
    body = payload("generic_order.json")
    change(body)
    with pytest.raises(MappingError) as caught:
        map_generic(body, json.dumps(body).encode(), "application/json", NOW)
    assert caught.value.field == field
    assert message in caught.value.message


def test_cloudevent_errors() -> None:
    body = payload("cloudevent_order_amended.json")
    body["type"] = "com.example.Other"
    with pytest.raises(MappingError) as caught:
        map_generic(body, b"", "application/cloudevents+json", NOW)
    assert caught.value.field == "type"
    body = payload("cloudevent_order_amended.json")
    del body["data"]["amendment_id"]
    with pytest.raises(MappingError) as caught:
        map_generic(body, b"", "application/cloudevents+json", NOW)
    assert caught.value.field == "data.amendment_id"
