"""The intake against the real broker and registry: a 202 means the event is on orders.inbound.v1.

The broker-down test runs on the private ``fault_stack`` and kills its broker; the shared stack stays up.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from confluent_kafka import Consumer, Message, TopicPartition

from connectors.intake import signatures
from connectors.intake.service import INBOUND_TOPIC, Intake, KafkaPublisher
from streams.catalog import Catalog, load_catalog_yaml
from streams.codec import AvroRegistry
from streams.settings import Settings
from streams.stack import LocalStack
from streams.topics import ensure_topics
from streams.topology import ORDERS_INBOUND, TOPICS
from tests.conftest import wait_until

ROOT = Path(__file__).resolve().parents[2]
PAYLOADS = ROOT / "tests" / "unit" / "payloads"
SECRET = "integration-shopify-secret"
BOUND = 30.0

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def footwear() -> Catalog:
    return load_catalog_yaml(ROOT / "deploy" / "catalogs" / "footwear.yaml")


def intake_settings(base: Settings, bootstrap: str, registry_url: str) -> Settings:
    return base.model_copy(
        update={"bootstrap_servers": bootstrap, "registry_url": registry_url, "shopify_secret": SECRET}
    )


@pytest.fixture
def shared_settings(settings: Settings, bootstrap: str, registry_url: str) -> Settings:
    configured = intake_settings(settings, bootstrap, registry_url)
    ensure_topics(TOPICS, configured)
    return configured


def shopify_order(order_id: int) -> bytes:
    """The sample orders/create payload for a fresh order id, so reruns never see old records."""
    order = json.loads((PAYLOADS / "shopify_orders_create.json").read_text())
    order["id"] = order_id
    order["admin_graphql_api_id"] = f"gid://shopify/Order/{order_id}"
    return json.dumps(order).encode()


def signed(body: bytes, webhook_id: str) -> dict[str, Any]:
    return {
        "data": body,
        "headers": {
            "Content-Type": "application/json",
            "X-Shopify-Topic": "orders/create",
            "X-Shopify-Hmac-Sha256": signatures.sign(SECRET, body),
            "X-Shopify-Webhook-Id": webhook_id,
        },
    }


def fresh_id() -> int:
    return 6_000_000_000_000 + uuid.uuid4().int % 1_000_000_000_000


def end_offsets(bootstrap: str) -> dict[int, int]:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"intake-test-{uuid.uuid4().hex[:8]}"})
    try:
        meta = consumer.list_topics(INBOUND_TOPIC, timeout=BOUND).topics[INBOUND_TOPIC]
        return {
            p: consumer.get_watermark_offsets(TopicPartition(INBOUND_TOPIC, p), timeout=BOUND)[1]
            for p in meta.partitions
        }
    finally:
        consumer.close()


def read_inbound(bootstrap: str, since: dict[int, int] | None = None) -> list[Message]:
    """Every record of the inbound topic from ``since`` (default: the beginning) to its current end."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"intake-test-{uuid.uuid4().hex[:8]}", "enable.auto.commit": False}
    )
    try:
        ends = end_offsets(bootstrap)
        starts = since or dict.fromkeys(ends, 0)
        consumer.assign([TopicPartition(INBOUND_TOPIC, p, starts.get(p, 0)) for p in ends])
        positions = {p: starts.get(p, 0) for p in ends}
        got: list[Message] = []
        deadline = time.monotonic() + BOUND
        while any(positions[p] < ends[p] for p in ends):
            assert time.monotonic() < deadline, f"could not read {INBOUND_TOPIC} to its end in {BOUND:.0f}s"
            msg = consumer.poll(0.2)
            if msg is None or msg.error() is not None:
                continue
            positions[msg.partition() or 0] = (msg.offset() or 0) + 1
            got.append(msg)
        return got
    finally:
        consumer.close()


def keyed(messages: list[Message], key: str) -> list[Message]:
    return [m for m in messages if m.key() == key.encode()]


def serve(intake: Intake, scenario: Callable[[TestClient[Any, Any]], Awaitable[None]]) -> None:
    async def main() -> None:
        async with TestClient(TestServer(intake.app())) as client:
            await scenario(client)

    asyncio.run(main())


def test_signed_webhook_is_on_the_log_once(shared_settings: Settings, footwear: Catalog) -> None:
    assert ORDERS_INBOUND.name == INBOUND_TOPIC
    registry = AvroRegistry.from_url(shared_settings.schema_registry_url)
    publisher = KafkaPublisher(shared_settings, registry)
    intake = Intake(shared_settings, publisher, lambda: footwear)
    before = end_offsets(shared_settings.kafka_bootstrap)
    external_id = fresh_id()
    body = shopify_order(external_id)
    webhook_id = f"wh-{uuid.uuid4()}"
    answers: list[dict[str, Any]] = []

    async def scenario(client: TestClient[Any, Any]) -> None:
        first = await client.post("/webhooks/shopify", **signed(body, webhook_id))
        assert first.status == 202, await first.text()
        answers.append(await first.json())
        again = await client.post("/webhooks/shopify", **signed(body, webhook_id))
        assert again.status == 200, await again.text()
        assert (await again.json())["status"] == "duplicate"

    serve(intake, scenario)
    publisher.close()
    order_id = f"shopify:{external_id}"
    ours = keyed(read_inbound(shared_settings.kafka_bootstrap, before), order_id)
    assert len(ours) == 1, f"expected exactly one record for {order_id}, got {len(ours)}"
    msg = ours[0]
    assert (msg.partition(), msg.offset()) == (answers[0]["partition"], answers[0]["offset"])
    decoded = registry.decode(msg.value() or b"")
    assert decoded.type == "OrderPlaced"
    assert decoded.value["order_id"] == order_id
    assert decoded.value["event_id"] == answers[0]["event_id"]
    assert [line["sku"] for line in decoded.value["lines"]] == ["custom-runner", "shoe-care-kit"]
    headers = dict(msg.headers() or [])
    assert headers == {
        "ce_specversion": b"1.0",
        "ce_id": answers[0]["event_id"].encode(),
        "ce_type": b"pieceflow.v1.OrderPlaced",
        "ce_source": b"urn:pieceflow:intake",
        "content-type": b"application/avro",
    }


def test_broker_down_503_and_nothing_produced(fault_stack: LocalStack, settings: Settings, footwear: Catalog) -> None:
    configured = intake_settings(settings, fault_stack.bootstrap(), fault_stack.registry_url())
    ensure_topics(TOPICS, configured)
    registry = AvroRegistry.from_url(configured.schema_registry_url)
    publisher = KafkaPublisher(configured, registry)
    intake = Intake(configured, publisher, lambda: footwear)
    before_id, down_id, after_id = fresh_id(), fresh_id(), fresh_id()

    async def post(client: TestClient[Any, Any], external_id: int) -> tuple[int, dict[str, str]]:
        resp = await client.post("/webhooks/shopify", **signed(shopify_order(external_id), f"wh-{external_id}"))
        await resp.read()
        return resp.status, dict(resp.headers)

    async def scenario(client: TestClient[Any, Any]) -> None:
        assert (await post(client, before_id))[0] == 202
        await asyncio.to_thread(fault_stack.kill_broker, 1)
        try:
            started = time.monotonic()
            status, headers = await post(client, down_id)
            assert status == 503
            assert int(headers["Retry-After"]) > 0
            assert time.monotonic() - started < 15, "the 503 must come within the delivery bound"
        finally:
            await asyncio.to_thread(fault_stack.start_broker, 1)
        # The producer reconnects on its own; the platform's retry is what a real recovery looks like.
        deadline = time.monotonic() + BOUND
        while (status := (await post(client, after_id))[0]) != 202:
            assert status == 503 and time.monotonic() < deadline, f"no recovery after the restart: {status}"

    serve(intake, scenario)
    publisher.close()
    # Anything the killed broker had not confirmed would surface here, once it is back.
    records = wait_until(
        lambda: (got := read_inbound(configured.kafka_bootstrap)) and keyed(got, f"shopify:{after_id}") and got,
        BOUND,
        "the post-restart order on the fault stack's inbound topic",
    )
    assert len(keyed(records, f"shopify:{before_id}")) == 1
    assert len(keyed(records, f"shopify:{after_id}")) == 1
    assert keyed(records, f"shopify:{down_id}") == [], "an order answered 503 reached the log"
