"""The HTTP intake (aiohttp): storefront webhooks and generic orders in, order events on Kafka out.

    POST /webhooks/shopify      X-Shopify-Hmac-Sha256, X-Shopify-Topic, X-Shopify-Event-Id / -Webhook-Id
    POST /webhooks/woocommerce  X-WC-Webhook-Signature, X-WC-Webhook-Topic, X-WC-Webhook-Delivery-ID
    POST /orders                Authorization: Bearer; OrderPlaced JSON, or a CloudEvent in structured JSON mode
    GET  /metrics, /healthz

Answers: 202 once Kafka confirmed the event (acks=all); 200 for a repeat of an accepted request
(nothing produced); 401 bad, missing or unconfigured signature secret or token; 400 malformed JSON or a
missing required header; 422 a body that cannot be mapped, as ``{"error", "field"}``; 503 with
Retry-After when Kafka did not confirm within the delivery bound. Nothing is produced on a 4xx, and no
2xx is given for an event that is not on the log.

A webhook endpoint whose secret is unset answers every request 401, naming the variable to set,
instead of refusing to start: one storefront can be wired up before the other, and the service still
never accepts an unsigned order. ``/orders`` does the same without ``PIECEFLOW_INTAKE_TOKEN``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from connectors.intake import signatures
from connectors.intake.common import MappingError
from connectors.intake.generic import map_generic
from connectors.intake.shopify import map_shopify
from connectors.intake.woocommerce import map_woocommerce
from connectors.storefront import DeliveryError, OrderProducer
from streams import metrics
from streams.catalog import Catalog
from streams.codec import AvroRegistry
from streams.events import Event, utc_now
from streams.settings import Settings

log = logging.getLogger(__name__)

# streams.topology.ORDERS_INBOUND (a unit test keeps them equal): importing the topology here would
# build the whole Faust app and its reference-data consumer in the intake process.
INBOUND_TOPIC = "orders.inbound.v1"
CE_SOURCE = "urn:pieceflow:intake"
# How long a request may wait for Kafka's acknowledgement before the answer is 503. Webhook senders
# give up after a few seconds (Shopify: 5 s), so waiting longer only turns a 503 into a timeout.
DELIVERY_TIMEOUT = 5.0
RETRY_AFTER_SECONDS = 5
RETRY_AFTER = {"Retry-After": str(RETRY_AFTER_SECONDS)}
MAX_IN_FLIGHT = 32
DEDUPE_CAPACITY = 100_000
CATALOG_REFRESH_SECONDS = 5.0

TOKEN_ENV = "PIECEFLOW_INTAKE_TOKEN"
SOURCES = {"/webhooks/shopify": "shopify", "/webhooks/woocommerce": "woocommerce", "/orders": "generic"}


class Publisher(Protocol):
    """Writes one event to the inbound topic and returns (partition, offset) only once Kafka has it."""

    def publish(self, event: Event) -> tuple[int, int]: ...


class KafkaPublisher:
    """``OrderProducer.send_confirmed`` with librdkafka's own delivery bound set to ours.

    ``message.timeout.ms`` makes librdkafka drop an undelivered message at the bound, so a request
    answered 503 does not linger in the producer queue and get written once the broker is back. Our
    wait is a second longer so the delivery report, not a race, decides the answer. A message in
    flight when the bound hits may still have reached the log; the client's retry of it carries the
    same event id, which validation rejects as DUPLICATE_EVENT.
    """

    def __init__(
        self,
        settings: Settings,
        registry: AvroRegistry | None = None,
        topic: str = INBOUND_TOPIC,
        delivery_timeout: float = DELIVERY_TIMEOUT,
    ) -> None:
        self.delivery_timeout = delivery_timeout
        self.producer = OrderProducer(
            settings,
            topic,
            source=CE_SOURCE,
            registry=registry,
            config={"message.timeout.ms": int(delivery_timeout * 1000)},
        )

    def publish(self, event: Event) -> tuple[int, int]:
        try:
            msg = self.producer.send_confirmed(event, event.key, timeout=self.delivery_timeout + 1.0)
        except DeliveryError:
            raise
        except Exception as exc:  # registry unreachable, local queue full, unknown topic: not on the log
            raise DeliveryError(f"could not produce: {exc}") from exc
        return msg.partition() or 0, msg.offset() or 0

    def close(self) -> None:
        self.producer.flush(self.delivery_timeout)


@dataclass(frozen=True)
class Receipt:
    event_type: str
    order_id: str
    event_id: str
    partition: int
    offset: int

    def to_json(self, status: str) -> dict[str, Any]:
        return {
            "status": status,
            "type": self.event_type,
            "order_id": self.order_id,
            "event_id": self.event_id,
            "topic": INBOUND_TOPIC,
            "partition": self.partition,
            "offset": self.offset,
        }


class RecentlyAccepted:
    """Bounded LRU of accepted request ids. Memory only: after a restart the deterministic event ids
    are what catches a repeat (validation's DUPLICATE_EVENT)."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._items: OrderedDict[str, Receipt] = OrderedDict()

    def get(self, key: str) -> Receipt | None:
        found = self._items.get(key)
        if found is not None:
            self._items.move_to_end(key)
        return found

    def add(self, key: str, receipt: Receipt) -> None:
        self._items[key] = receipt
        self._items.move_to_end(key)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)


def error(status: int, message: str, field: str = "", **headers: str) -> web.Response:
    return web.json_response({"error": message, "field": field}, status=status, headers=headers or None)


@dataclass(frozen=True)
class Webhook:
    """How one platform signs, names and identifies its webhook deliveries."""

    source: str
    secret_env: str
    signature_header: str
    topic_header: str
    id_headers: tuple[str, ...]
    mapper: Callable[[str, Any, str, Catalog, datetime], Event]


SHOPIFY = Webhook(
    "shopify",
    "PIECEFLOW_SHOPIFY_SECRET",
    signatures.SHOPIFY_HEADER,
    "X-Shopify-Topic",
    # The event id is shared by every delivery of one event (retries, several subscriptions); the
    # webhook id only by retries of one delivery. Older API versions send only the webhook id.
    ("X-Shopify-Event-Id", "X-Shopify-Webhook-Id"),
    map_shopify,
)
WOOCOMMERCE = Webhook(
    "woocommerce",
    "PIECEFLOW_WOOCOMMERCE_SECRET",
    signatures.WOOCOMMERCE_HEADER,
    "X-WC-Webhook-Topic",
    ("X-WC-Webhook-Delivery-ID",),
    map_woocommerce,
)


class Intake:
    """The request handling; ``app()`` is the aiohttp application."""

    def __init__(
        self,
        settings: Settings,
        publisher: Publisher,
        catalog: Callable[[], Catalog],
        *,
        clock: Callable[[], datetime] = utc_now,
        max_in_flight: int = MAX_IN_FLIGHT,
        dedupe_capacity: int = DEDUPE_CAPACITY,
    ) -> None:
        self.settings = settings
        self.publisher = publisher
        self.catalog = catalog
        self.clock = clock
        self.max_in_flight = max_in_flight
        self.accepted = RecentlyAccepted(dedupe_capacity)
        self._pending: dict[str, asyncio.Future[None]] = {}
        self._in_flight = 0
        # The confirmed send blocks a thread for up to the delivery bound; one per in-flight request.
        self._executor = ThreadPoolExecutor(max_workers=max_in_flight, thread_name_prefix="intake-produce")

    def app(self) -> web.Application:
        app = web.Application(middlewares=[count_requests])
        app.router.add_post("/webhooks/shopify", self.shopify)
        app.router.add_post("/webhooks/woocommerce", self.woocommerce)
        app.router.add_post("/orders", self.orders)
        app.router.add_get("/metrics", metrics_page)
        app.router.add_get("/healthz", healthz)
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, app: web.Application) -> None:
        self._executor.shutdown(wait=True)

    # ---- endpoints ------------------------------------------------------------------------------

    async def shopify(self, request: web.Request) -> web.Response:
        return await self._webhook(request, SHOPIFY, self.settings.shopify_secret)

    async def woocommerce(self, request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get(WOOCOMMERCE.topic_header) is None and body.startswith(b"webhook_id="):
            # WooCommerce pings a new webhook with a form body and no signature; nothing is produced.
            return web.json_response({"status": "ping"})
        return await self._webhook(request, WOOCOMMERCE, self.settings.woocommerce_secret)

    async def orders(self, request: web.Request) -> web.Response:
        refused = self._unauthorized(request)
        if refused is not None:
            return refused
        body = await request.read()
        payload = parse_json(body)
        if isinstance(payload, web.Response):
            return payload
        try:
            event = map_generic(payload, body, request.content_type, self.clock())
        except MappingError as exc:
            return web.json_response(exc.to_json(), status=422)
        return await self._deliver(f"generic:{event.value['event_id']}", lambda: event)

    def _unauthorized(self, request: web.Request) -> web.Response | None:
        token = self.settings.intake_token
        if not token:
            return error(401, f"intake token not configured: set {TOKEN_ENV}", TOKEN_ENV)
        given = request.headers.get("Authorization", "")
        scheme, _, credentials = given.partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), token.encode()):
            return None
        return error(401, "bad token" if given else "missing token", "Authorization",
                     **{"WWW-Authenticate": 'Bearer realm="pieceflow-intake"'})

    async def _webhook(self, request: web.Request, hook: Webhook, secret: str | None) -> web.Response:
        body = await request.read()
        if not secret:
            return error(401, f"webhook secret not configured: set {hook.secret_env}", hook.secret_env)
        signature = request.headers.get(hook.signature_header)
        if not signatures.verify(secret, body, signature):
            reason = "bad signature" if signature else "missing signature"
            return error(401, reason, hook.signature_header)
        topic = request.headers.get(hook.topic_header)
        if not topic:
            return error(400, "missing header", hook.topic_header)
        payload = parse_json(body)
        if isinstance(payload, web.Response):
            return payload
        # Without a delivery id, identical bytes are the best sign of a re-delivery.
        delivery_id = next(
            (v for h in hook.id_headers if (v := request.headers.get(h))), hashlib.sha256(body).hexdigest()
        )
        received_at = self.clock()

        def make_event() -> Event:
            return hook.mapper(topic, payload, delivery_id, self.catalog(), received_at)

        return await self._deliver(f"{hook.source}:{delivery_id}", make_event)

    # ---- produce, exactly once per request id -------------------------------------------------

    async def _deliver(self, key: str, make_event: Callable[[], Event]) -> web.Response:
        # A retry that arrives while the first attempt still waits for Kafka waits for its outcome.
        while (pending := self._pending.get(key)) is not None:
            await asyncio.wait([pending])
        seen = self.accepted.get(key)
        if seen is not None:
            return web.json_response(seen.to_json("duplicate"), status=200)
        try:
            event = make_event()
        except MappingError as exc:
            return web.json_response(exc.to_json(), status=422)
        if self._in_flight >= self.max_in_flight:
            # Shed load rather than queue behind a slow broker past the delivery bound.
            return error(503, "too many requests waiting for Kafka", "", **RETRY_AFTER)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._pending[key] = done
        self._in_flight += 1
        try:
            loop = asyncio.get_running_loop()
            partition, offset = await loop.run_in_executor(self._executor, self.publisher.publish, event)
        except DeliveryError as exc:
            log.warning("not accepted, Kafka did not confirm %s %s: %s", event.type, event.key, exc)
            return error(503, f"Kafka did not confirm the event: {exc}", "", **RETRY_AFTER)
        finally:
            self._in_flight -= 1
            del self._pending[key]
            done.set_result(None)
        receipt = Receipt(event.type, event.key, event.value["event_id"], partition, offset)
        self.accepted.add(key, receipt)
        return web.json_response(receipt.to_json("accepted"), status=202)


def parse_json(body: bytes) -> Any:
    """The parsed body, or the 400 response for a body that is not JSON."""
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        return error(400, f"malformed JSON: {exc}", "")


@web.middleware
async def count_requests(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    source = SOURCES.get(request.path)
    if source is None:
        return await handler(request)
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:  # 405, 413 ... raised by aiohttp itself
        status = exc.status
        raise
    finally:
        metrics.INTAKE_REQUESTS.labels(source=source, status=str(status)).inc()


async def metrics_page(request: web.Request) -> web.Response:
    return web.Response(body=generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])


async def healthz(request: web.Request) -> web.Response:
    # Liveness only: a Kafka outage must not restart every replica (see deploy/k8s/intake.yaml).
    return web.json_response({"status": "ok"})


# ---- running it ---------------------------------------------------------------------------------


def build_app(settings: Settings, catalog_file: Path | None = None) -> web.Application:
    """The production wiring: Kafka publisher, and the catalog from a file or the cluster's topics."""
    from streams.catalog import load_catalog_yaml
    from streams.reference import ReferenceData

    registry = AvroRegistry.from_url(settings.schema_registry_url)
    publisher = KafkaPublisher(settings, registry)
    refresh: Callable[[], object] | None = None
    if catalog_file is not None:
        fixed = load_catalog_yaml(catalog_file)
        intake = Intake(settings, publisher, lambda: fixed)
    else:
        reference = ReferenceData(settings, registry)
        reference.load()
        refresh = reference.refresh
        intake = Intake(settings, publisher, lambda: reference.catalog)
    for hook, secret in ((SHOPIFY, settings.shopify_secret), (WOOCOMMERCE, settings.woocommerce_secret)):
        if not secret:
            log.warning("%s is not set: /webhooks/%s answers 401 to every request", hook.secret_env, hook.source)
    if not settings.intake_token:
        log.warning("%s is not set: /orders answers 401 to every request", TOKEN_ENV)
    app = intake.app()

    async def background(app: web.Application) -> AsyncIterator[None]:
        task = asyncio.create_task(_refresh_catalog(refresh)) if refresh else None
        yield
        if task:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await asyncio.get_running_loop().run_in_executor(None, publisher.close)

    app.cleanup_ctx.append(background)
    return app


async def _refresh_catalog(refresh: Callable[[], object]) -> None:
    # Catalog changes (new products, options) reach the mapping without a restart, as in the worker.
    loop = asyncio.get_running_loop()
    while True:
        try:
            await loop.run_in_executor(None, refresh)
        except Exception:
            log.exception("catalog refresh failed; keeping the last catalog")
        await asyncio.sleep(CATALOG_REFRESH_SECONDS)


def serve(
    settings: Settings, host: str | None = None, port: int | None = None, catalog_file: Path | None = None
) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    app = build_app(settings, catalog_file)
    web.run_app(app, host=host or settings.host, port=port or settings.intake_port, print=log.info)
