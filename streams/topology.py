"""The whole flow, top to bottom: every topic, then every agent in the order an order meets them.

    storefront ─▶ orders.inbound ─▶ [validate] ─▶ orders.decisions ─▶ [expand] ─▶ orders.workitems
                                                                                         │
        ┌────────────────────────────────────────────────────────────────────────────────┘
        ▼
    [track] ─▶ operations.requested (key: lane) ─▶ [assign] ─▶ stations.queue (key: station) ─▶ MES
       ▲                                                ▲                                          │
       │                                                └──── stations.lane-events ◀─┐             │
       └── orders.operations (key: order) ◀──────────────── [reroute] ◀── stations.events ◀───────┘
    [track] ─▶ orders.status (compacted) · orders.dispatched · orders.leadtime
    [track] ─▶ orders.phase (compacted) ─▶ [validate]: amendments and cancellations need the phase

Each agent is a thin shell around a pure stage function (``streams.stages``): it loads the state for
the event's key, calls the function, sends every output keyed, then stores the state. Agents run with
concurrency 1, so each partition is processed one event at a time, in order. Per-order events stay on
order-keyed topics; station work is re-keyed by *lane* so one partition owns every station's queue.
"""

from __future__ import annotations

import asyncio
import logging
from functools import partial
from typing import Any

import faust
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from streams import metrics, observe
from streams.catalog import Catalog
from streams.codec import AvroCodec, AvroRegistry, Decoded
from streams.events import Event, epoch_ms, utc_now
from streams.faust_config import new_app
from streams.reference import PRODUCTS_TOPIC, STATIONS_TOPIC, ReferenceData
from streams.runner import StageRunner
from streams.settings import get_settings
from streams.stages import assignment, dispatch, expansion, validation
from streams.topics import TopicSpec

log = logging.getLogger(__name__)

# ---- topics -------------------------------------------------------------------------------------

ORDERS_INBOUND = TopicSpec(
    "orders.inbound.v1", "order id", ("OrderPlaced", "OrderAmended", "OrderCancelled"), "storefront, intake"
)
ORDERS_DECISIONS = TopicSpec(
    "orders.decisions.v1", "order id", ("OrderAccepted", "OrderRejected", "OrderCancellationAccepted"), "validate"
)
ORDERS_WORKITEMS = TopicSpec("orders.workitems.v1", "order id", ("WorkItemPlanned",), "expand")
OPERATIONS_REQUESTED = TopicSpec(
    "operations.requested.v1", "lane", ("OperationRequested", "OperationRevoked"), "track"
)
STATIONS_QUEUE = TopicSpec(
    "stations.queue.v1", "station id", ("OperationAssigned", "OperationUnassigned"), "assign"
)
STATION_EVENT_TYPES = ("OperationStarted", "OperationCompleted", "OperationFailed", "StationStatusChanged")
STATIONS_EVENTS = TopicSpec("stations.events.v1", "station id", STATION_EVENT_TYPES, "MES, station simulator")
STATIONS_LANE_EVENTS = TopicSpec("stations.lane-events.v1", "lane", STATION_EVENT_TYPES, "reroute")
ORDERS_OPERATIONS = TopicSpec(
    "orders.operations.v1", "order id", ("OperationStarted", "OperationCompleted", "OperationFailed"), "reroute"
)
ORDERS_STATUS = TopicSpec("orders.status.v1", "order id", ("OrderStatus",), "track", compacted=True)
ORDERS_PHASE = TopicSpec("orders.phase.v1", "order id", ("OrderPhaseChanged",), "track", compacted=True)
ORDERS_DISPATCHED = TopicSpec("orders.dispatched.v1", "order id", ("OrderDispatched",), "track")
ORDERS_LEADTIME = TopicSpec("orders.leadtime.v1", "order id", ("OrderLeadTime",), "track")
CATALOG_PRODUCTS = TopicSpec(PRODUCTS_TOPIC, "sku", ("CatalogProduct",), "pieceflow catalog load", compacted=True)
CATALOG_STATIONS = TopicSpec(STATIONS_TOPIC, "station id", ("Station",), "pieceflow catalog load", compacted=True)
DEAD_LETTERS = TopicSpec(
    "pieceflow.deadletter.v1", "original key", ("original bytes",), "every agent",
    config={"retention.ms": str(14 * 24 * 3600 * 1000)},
)

TOPICS: list[TopicSpec] = [
    ORDERS_INBOUND, ORDERS_DECISIONS, ORDERS_WORKITEMS, OPERATIONS_REQUESTED, STATIONS_QUEUE, STATIONS_EVENTS,
    STATIONS_LANE_EVENTS, ORDERS_OPERATIONS, ORDERS_STATUS, ORDERS_PHASE, ORDERS_DISPATCHED, ORDERS_LEADTIME,
    CATALOG_PRODUCTS, CATALOG_STATIONS, DEAD_LETTERS,
]

# ---- the Faust application ----------------------------------------------------------------------

settings = get_settings()
registry = AvroRegistry.from_url(settings.schema_registry_url)

app = new_app(settings)


def source(*specs: TopicSpec) -> faust.TopicT:
    """A topic to read: values decode by registry id, whatever the subject, so one codec serves all."""
    return app.topic(*(s.name for s in specs), value_serializer=AvroCodec(registry, specs[0].name))


def sink(spec: TopicSpec) -> faust.TopicT:
    """A topic to write: the codec registers each record under ``<topic>-<record name>``."""
    return app.topic(spec.name, value_serializer=AvroCodec(registry, spec.name))


def routes(*specs: TopicSpec) -> dict[str, faust.TopicT]:
    return {record: topic for spec in specs for topic in [sink(spec)] for record in spec.values}


dead_letters = app.topic(DEAD_LETTERS.name, value_serializer="raw")


def table(name: str) -> Any:
    # JSON state: the stage state classes convert to and from plain dicts.
    return app.Table(
        name,
        default=None,
        partitions=settings.partitions,
        schema=faust.Schema(key_serializer="raw", value_serializer="json"),
    )


validation_state = table("validation-state")
expansion_state = table("expansion-state")
order_progress = table("order-progress")
lane_state = table("lane-state")

reference = ReferenceData(settings, registry)


def catalog() -> Catalog:
    return reference.catalog


@app.on_rebalance_complete.connect
async def stop_reading_changelogs(sender: Any, /, *args: Any, signal: Any, **kwargs: Any) -> None:
    """Once tables are recovered, stop fetching their changelogs.

    When there was nothing to recover (a new app, empty tables), faust-streaming 0.15 leaves the
    changelog partitions fetching: every state write came back and was JSON-decoded again, which
    took most of the worker's CPU. Recovery resumes them itself when a rebalance needs them.
    """
    consumer = app.consumer
    consumer.pause_partitions({tp for tp in consumer.assignment() if tp.topic.endswith("-changelog")})


@app.timer(interval=1.0)
async def refresh_reference_data() -> None:
    # In a thread: a new schema id means a registry request, and a registry that hangs must not stall
    # the worker's partitions.
    try:
        await asyncio.to_thread(reference.refresh)
    except Exception:  # a failed refresh must not stop the worker: the stages go on with the last catalog
        log.exception("catalog refresh failed; keeping the last catalog")


@app.timer(interval=5.0)
async def report_health() -> None:
    """Lag per assigned partition and overdue orders, for the flow-health and lead-time dashboards."""
    consumer = app.consumer
    for tp in consumer.assignment():
        position = await consumer.position(tp)
        if position is not None:
            lag = max(0, consumer.highwater(tp) - position)
            metrics.CONSUMER_LAG.labels(topic=tp.topic, partition=str(tp.partition)).set(lag)
    observe.overdue(epoch_ms(utc_now()))


def key_of(event: faust.EventT) -> str:
    key = event.message.key
    return key.decode() if isinstance(key, bytes) else str(key)


def ignore_others(accepted: tuple[str, ...], ignored: tuple[str, ...], value: Decoded) -> bool:
    """True when this agent has nothing to do with ``value``; an unknown type is an error."""
    if value.type in accepted:
        return False
    if value.type in ignored:
        return True
    raise ValueError(f"unexpected {value.type} on this stage's input")


# ---- 1. validation ------------------------------------------------------------------------------

validate_runner = StageRunner("validation", routes(ORDERS_DECISIONS), dead_letters)


def validation_step(state: validation.ValidationState, source: str, value: Decoded) -> list[Event]:
    if value.type == "OrderPhaseChanged":  # amendments are refused once work starts, everything once closed
        validation.observe_phase(state, value.value)
        return []
    return validation.validate(state, value.type, value.value, catalog(), utc_now(), source)


@app.agent(source(ORDERS_INBOUND, ORDERS_PHASE), concurrency=1)
async def validate(stream: faust.StreamT) -> None:
    async for event in stream.events():
        key = key_of(event)
        state = validation.ValidationState.from_dict(validation_state.get(key))
        where = f"{event.message.topic}:{event.message.partition}:{event.message.offset}"
        out = await validate_runner.run(event, partial(validation_step, state, where))
        observe.validation(out)
        validation_state[key] = state.to_dict()


# ---- 2. customization expansion -----------------------------------------------------------------

expand_runner = StageRunner("expansion", routes(ORDERS_WORKITEMS), dead_letters)


def expansion_step(state: expansion.ExpansionState, value: Decoded) -> list[Event]:
    if ignore_others(("OrderAccepted",), ("OrderRejected", "OrderCancellationAccepted"), value):
        return []
    return expansion.expand(state, value.value, catalog(), utc_now())


@app.agent(source(ORDERS_DECISIONS), concurrency=1)
async def expand(stream: faust.StreamT) -> None:
    async for event in stream.events():
        key = key_of(event)
        state = expansion.ExpansionState.from_dict(expansion_state.get(key))
        await expand_runner.run(event, partial(expansion_step, state))
        expansion_state[key] = state.to_dict()


# ---- 3. progress and dispatch (per order) -------------------------------------------------------

track_runner = StageRunner(
    "dispatch",
    routes(OPERATIONS_REQUESTED, ORDERS_STATUS, ORDERS_PHASE, ORDERS_DISPATCHED, ORDERS_LEADTIME),
    dead_letters,
)
TRACKED = ("WorkItemPlanned", "OperationStarted", "OperationCompleted", "OperationFailed", "OrderCancellationAccepted")


def dispatch_step(state: dispatch.OrderProgress, value: Decoded) -> list[Event]:
    if ignore_others(TRACKED, ("OrderAccepted", "OrderRejected"), value):
        return []
    return dispatch.handle(state, value.type, value.value, catalog(), utc_now())


@app.agent(source(ORDERS_WORKITEMS, ORDERS_OPERATIONS, ORDERS_DECISIONS), concurrency=1)
async def track(stream: faust.StreamT) -> None:
    async for event in stream.events():
        key = key_of(event)
        state = dispatch.OrderProgress.from_dict(order_progress.get(key))
        out = await track_runner.run(event, partial(dispatch_step, state))
        observe.dispatch(out)
        observe.promise(state)
        order_progress[key] = state.to_dict()


# ---- 4. station assignment (per lane) -----------------------------------------------------------

assign_runner = StageRunner("assignment", routes(STATIONS_QUEUE), dead_letters)


def assignment_step(state: assignment.LaneState, value: Decoded) -> list[Event]:
    return assignment.handle(state, value.type, value.value, utc_now())


@app.agent(source(OPERATIONS_REQUESTED, STATIONS_LANE_EVENTS), concurrency=1)
async def assign(stream: faust.StreamT) -> None:
    async for event in stream.events():
        lane = key_of(event)
        raw = lane_state.get(lane)
        state = (
            assignment.LaneState.from_dict(raw) if raw is not None else assignment.LaneState.for_lane(catalog(), lane)
        )
        await assign_runner.run(event, partial(assignment_step, state))
        observe.lane(state)
        lane_state[lane] = state.to_dict()


# ---- station feed: re-key the MES's events for the lane and for the order -----------------------

reroute_runner = StageRunner("reroute", {}, dead_letters)
lane_events = sink(STATIONS_LANE_EVENTS)
order_operations = sink(ORDERS_OPERATIONS)


def reroute_step(targets: list[tuple[faust.TopicT, Event]], value: Decoded) -> list[Event]:
    """Collect where a station event goes: to its lane, and operation events also to their order."""
    current = catalog()
    if value.type == "StationStatusChanged":
        keys = [(lane_events, current.lane_of_station(value.value["station_id"]))]
    elif value.type in ORDERS_OPERATIONS.values:
        keys = [(lane_events, current.lane_of(value.value["capability"])),
                (order_operations, value.value["order_id"])]
    else:
        raise ValueError(f"unexpected {value.type} on {STATIONS_EVENTS.name}")
    targets.extend((topic, Event(value.type, key, value.value)) for topic, key in keys)
    return []


@app.agent(source(STATIONS_EVENTS), concurrency=1)
async def reroute(stream: faust.StreamT) -> None:
    async for event in stream.events():
        targets: list[tuple[faust.TopicT, Event]] = []
        await reroute_runner.run(event, partial(reroute_step, targets))
        for topic, out in targets:
            await topic.send(key=out.key.encode(), value=out)


# ---- web ----------------------------------------------------------------------------------------


@app.page("/metrics")
async def metrics_page(web: Any, request: Any) -> Any:
    return web.bytes(generate_latest(), content_type=CONTENT_TYPE_LATEST.split(";")[0])


def agent_names() -> list[str]:
    return [name.rsplit(".", 1)[-1] for name in app.agents]


def input_topics() -> list[str]:
    """Every topic an agent reads, in the order the agents are declared."""
    return list(dict.fromkeys(name for agent in app.agents.values() for name in agent.channel.topics))


def output_records() -> list[tuple[str, str]]:
    """(topic, record) of everything the agents write as Avro."""
    agents = set(agent_names())
    return [(spec.name, record) for spec in TOPICS if spec.writer in agents for record in spec.values]


def register_output_schemas() -> None:
    """Register what the agents write before the worker starts; each record's first send would
    otherwise ask the registry on the event loop, and a slow registry would stall every partition."""
    for topic, record in output_records():
        registry.schema_id(topic, record)

