"""The HTTP paths of the intake with a fake publisher: 202, 200 on a repeat, 400, 401, 422, 503.

The real broker paths (delivery confirmed, broker down) are in tests/integration/test_intake.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from connectors.intake import signatures
from connectors.intake.service import INBOUND_TOPIC, Intake
from connectors.storefront import DeliveryError
from streams import metrics
from streams.catalog import Catalog
from streams.events import Event
from streams.settings import Settings

PAYLOADS = Path(__file__).parent / "payloads"
SHOPIFY_SECRET = "shopify-test-secret"
WOO_SECRET = "woo-test-secret"
TOKEN = "intake-test-token"
BEARER = {"Authorization": f"Bearer {TOKEN}"}


class FakePublisher:
    """Records what would be produced; ``fail`` makes it behave like an unconfirmed write."""

    def __init__(self) -> None:
        self.events: list[Event] = []
        self.fail = False
        self.release: threading.Event | None = None

    def publish(self, event: Event) -> tuple[int, int]:
        if self.release is not None:
            self.release.wait(5)
        if self.fail:
            raise DeliveryError("Kafka did not confirm the write within 5s")
        self.events.append(event)
        return 0, len(self.events) - 1


def make_intake(catalog: Catalog, publisher: FakePublisher, **secrets: str | None) -> Intake:
    settings = Settings(
        shopify_secret=secrets.get("shopify", SHOPIFY_SECRET),
        woocommerce_secret=secrets.get("woo", WOO_SECRET),
        intake_token=secrets.get("token", TOKEN),
    )
    return Intake(settings, publisher, lambda: catalog)


def run(intake: Intake, scenario: Callable[[TestClient[Any, Any]], Awaitable[None]]) -> None:
    async def main() -> None:
        async with TestClient(TestServer(intake.app())) as client:
            await scenario(client)

    asyncio.run(main())


def shopify_request(body: bytes, topic: str = "orders/create", webhook_id: str = "wh-1", **extra: str) -> Any:
    headers = {
        "Content-Type": "application/json",
        "X-Shopify-Topic": topic,
        "X-Shopify-Hmac-Sha256": signatures.sign(SHOPIFY_SECRET, body),
        "X-Shopify-Webhook-Id": webhook_id,
        "X-Shopify-Shop-Domain": "pieceflow-footwear.myshopify.com",
        **extra,
    }
    return {"data": body, "headers": headers}


@pytest.fixture
def shopify_body() -> bytes:
    return (PAYLOADS / "shopify_orders_create.json").read_bytes()


def test_inbound_topic_is_the_topology_one() -> None:
    from streams.topology import ORDERS_INBOUND

    assert ORDERS_INBOUND.name == INBOUND_TOPIC


def test_signed_shopify_webhook_is_produced_then_202(footwear: Catalog, shopify_body: bytes) -> None:
    publisher = FakePublisher()
    before = metrics.INTAKE_REQUESTS.labels(source="shopify", status="202")._value.get()

    async def scenario(client: TestClient[Any, Any]) -> None:
        resp = await client.post("/webhooks/shopify", **shopify_request(shopify_body))
        assert resp.status == 202, await resp.text()
        body = await resp.json()
        assert body["status"] == "accepted"
        assert body["order_id"] == "shopify:5923157360923"
        assert body["type"] == "OrderPlaced"

    run(make_intake(footwear, publisher), scenario)
    assert [e.type for e in publisher.events] == ["OrderPlaced"]
    assert metrics.INTAKE_REQUESTS.labels(source="shopify", status="202")._value.get() == before + 1


def test_repeated_webhook_is_answered_without_producing_again(footwear: Catalog, shopify_body: bytes) -> None:
    publisher = FakePublisher()

    async def scenario(client: TestClient[Any, Any]) -> None:
        first = await client.post("/webhooks/shopify", **shopify_request(shopify_body, webhook_id="wh-dup"))
        again = await client.post("/webhooks/shopify", **shopify_request(shopify_body, webhook_id="wh-dup"))
        assert (first.status, again.status) == (202, 200)
        assert (await again.json())["status"] == "duplicate"
        assert (await again.json())["event_id"] == (await first.json())["event_id"]

    run(make_intake(footwear, publisher), scenario)
    assert len(publisher.events) == 1


def test_concurrent_repeats_produce_once(footwear: Catalog, shopify_body: bytes) -> None:
    publisher = FakePublisher()
    publisher.release = threading.Event()

    async def scenario(client: TestClient[Any, Any]) -> None:
        request = shopify_request(shopify_body, webhook_id="wh-race")
        first = asyncio.ensure_future(client.post("/webhooks/shopify", **request))
        second = asyncio.ensure_future(client.post("/webhooks/shopify", **request))
        await asyncio.sleep(0.2)  # both are in: the first waits in the publisher, the second on the first
        assert publisher.release is not None
        publisher.release.set()
        statuses = sorted([(await first).status, (await second).status])
        assert statuses == [200, 202]

    run(make_intake(footwear, publisher), scenario)
    assert len(publisher.events) == 1


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        ({"X-Shopify-Hmac-Sha256": "c2lnbmVkIHdpdGggYW5vdGhlciBzZWNyZXQ="}, "bad signature"),
        ({"X-Shopify-Hmac-Sha256": ""}, "missing signature"),
    ],
)
def test_bad_or_missing_signature_401(
    footwear: Catalog, shopify_body: bytes, headers: dict[str, str], message: str
) -> None:
    publisher = FakePublisher()

    async def scenario(client: TestClient[Any, Any]) -> None:
        request = shopify_request(shopify_body)
        request["headers"].update(headers)
        resp = await client.post("/webhooks/shopify", **request)
        assert resp.status == 401
        assert await resp.json() == {"error": message, "field": "X-Shopify-Hmac-Sha256"}

    run(make_intake(footwear, publisher), scenario)
    assert publisher.events == []


def test_unset_secret_401_names_the_variable(footwear: Catalog, shopify_body: bytes) -> None:
    publisher = FakePublisher()

    async def scenario(client: TestClient[Any, Any]) -> None:
        resp = await client.post("/webhooks/shopify", **shopify_request(shopify_body))
        assert resp.status == 401
        assert "PIECEFLOW_SHOPIFY_SECRET" in (await resp.json())["error"]

    run(make_intake(footwear, publisher, shopify=None), scenario)
    assert publisher.events == []


def test_malformed_json_400(footwear: Catalog) -> None:
    publisher = FakePublisher()

    async def scenario(client: TestClient[Any, Any]) -> None:
        resp = await client.post("/webhooks/shopify", **shopify_request(b'{"id": 1, "line_items": [}'))
        assert resp.status == 400
        assert (await resp.json())["error"].startswith("malformed JSON")
        resp = await client.post("/orders", data=b"\xff\xfe", headers={"Content-Type": "application/json", **BEARER})
        assert resp.status == 400

    run(make_intake(footwear, publisher), scenario)
    assert publisher.events == []


def test_unmappable_payload_422_with_the_field(footwear: Catalog) -> None:
    publisher = FakePublisher()
    order = json.loads((PAYLOADS / "shopify_orders_create.json").read_text())
    order["line_items"][0]["price"] = "a lot"
    body = json.dumps(order).encode()

    async def scenario(client: TestClient[Any, Any]) -> None:
        resp = await client.post("/webhooks/shopify", **shopify_request(body))
        assert resp.status == 422
        assert await resp.json() == {"error": "'a lot' is not a decimal amount", "field": "line_items[0].price"}
        resp = await client.post("/orders", json={"source_platform": "pos"}, headers=BEARER)
        assert resp.status == 422
        assert await resp.json() == {"error": "is required", "field": "external_order_id"}

    run(make_intake(footwear, publisher), scenario)
    assert publisher.events == []


def test_unconfirmed_write_503_with_retry_after_and_no_dedupe(footwear: Catalog, shopify_body: bytes) -> None:
    publisher = FakePublisher()
    publisher.fail = True

    async def scenario(client: TestClient[Any, Any]) -> None:
        resp = await client.post("/webhooks/shopify", **shopify_request(shopify_body, webhook_id="wh-503"))
        assert resp.status == 503
        assert int(resp.headers["Retry-After"]) > 0
        # The platform's retry of a 503 must be produced, not answered as a duplicate.
        publisher.fail = False
        resp = await client.post("/webhooks/shopify", **shopify_request(shopify_body, webhook_id="wh-503"))
        assert resp.status == 202

    run(make_intake(footwear, publisher), scenario)
    assert len(publisher.events) == 1


def test_woocommerce_signed_and_ping(restaurant: Catalog) -> None:
    publisher = FakePublisher()
    body = (PAYLOADS / "woocommerce_order_created.json").read_bytes()

    async def scenario(client: TestClient[Any, Any]) -> None:
        headers = {
            "Content-Type": "application/json",
            "X-WC-Webhook-Topic": "order.created",
            "X-WC-Webhook-Resource": "order",
            "X-WC-Webhook-Event": "created",
            "X-WC-Webhook-Signature": signatures.sign(WOO_SECRET, body),
            "X-WC-Webhook-Delivery-ID": "8c3e1f0a7d",
            "X-WC-Webhook-ID": "12",
        }
        resp = await client.post("/webhooks/woocommerce", data=body, headers=headers)
        assert resp.status == 202, await resp.text()
        headers["X-WC-Webhook-Signature"] = signatures.sign("wrong", body)
        resp = await client.post("/webhooks/woocommerce", data=body, headers=headers)
        assert resp.status == 401
        ping = await client.post(
            "/webhooks/woocommerce",
            data=b"webhook_id=12",
            headers={"Content-Type": "application/x-www-form-urlencoded"},
        )
        assert ping.status == 200

    run(make_intake(restaurant, publisher), scenario)
    assert [e.key for e in publisher.events] == ["woocommerce:727"]


def test_generic_and_cloudevent_orders(restaurant: Catalog) -> None:
    publisher = FakePublisher()
    order = (PAYLOADS / "generic_order.json").read_bytes()
    cloudevent = (PAYLOADS / "cloudevent_order_amended.json").read_bytes()

    async def scenario(client: TestClient[Any, Any]) -> None:
        resp = await client.post("/orders", data=order, headers={"Content-Type": "application/json", **BEARER})
        assert resp.status == 202, await resp.text()
        resp = await client.post("/orders", data=order, headers={"Content-Type": "application/json", **BEARER})
        assert resp.status == 200  # same bytes, same event id
        resp = await client.post(
            "/orders", data=cloudevent,
            headers={"Content-Type": "application/cloudevents+json; charset=utf-8", **BEARER},
        )
        assert resp.status == 202, await resp.text()

    run(make_intake(restaurant, publisher), scenario)
    assert [e.type for e in publisher.events] == ["OrderPlaced", "OrderAmended"]


def test_metrics_and_healthz(footwear: Catalog) -> None:
    async def scenario(client: TestClient[Any, Any]) -> None:
        assert (await client.get("/healthz")).status == 200
        resp = await client.get("/metrics")
        assert resp.status == 200
        assert "pieceflow_intake_requests_total" in await resp.text()

    run(make_intake(footwear, FakePublisher()), scenario)


def test_orders_need_the_bearer_token(restaurant: Catalog) -> None:
    publisher = FakePublisher()
    order = (PAYLOADS / "generic_order.json").read_bytes()
    json_body = {"Content-Type": "application/json"}

    async def scenario(client: TestClient[Any, Any]) -> None:
        resp = await client.post("/orders", data=order, headers=json_body)
        assert resp.status == 401
        assert await resp.json() == {"error": "missing token", "field": "Authorization"}
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        resp = await client.post("/orders", data=order, headers={**json_body, "Authorization": f"Bearer {TOKEN}x"})
        assert resp.status == 401
        assert (await resp.json())["error"] == "bad token"
        resp = await client.post("/orders", data=order, headers={**json_body, "Authorization": f"Basic {TOKEN}"})
        assert resp.status == 401

    run(make_intake(restaurant, publisher), scenario)
    assert publisher.events == []


def test_orders_without_a_configured_token_are_refused(restaurant: Catalog) -> None:
    publisher = FakePublisher()
    order = (PAYLOADS / "generic_order.json").read_bytes()

    async def scenario(client: TestClient[Any, Any]) -> None:
        resp = await client.post("/orders", data=order, headers={"Content-Type": "application/json", **BEARER})
        assert resp.status == 401
        assert "PIECEFLOW_INTAKE_TOKEN" in (await resp.json())["error"]

    run(make_intake(restaurant, publisher, token=None), scenario)
    assert publisher.events == []
