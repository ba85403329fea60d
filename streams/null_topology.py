"""The null pipeline: the benchmark's baseline, the same hops as the real pipeline with no stage logic.

``pieceflow bench --null`` runs workers of this app instead of ``streams.topology``. It is a separate
Faust app, not a switch inside the real one, so the real agents stay exactly as they are. It keeps what
the real pipeline pays for Kafka and Faust and drops what the stages add:

    orders.inbound ─▶ [validate] ─▶ orders.decisions ─▶ [expand] ─▶ orders.workitems
        ─▶ [track] ─▶ operations.requested ─▶ [assign] ─▶ stations.queue

Four agents with concurrency 1, on the same topics and with the same Faust settings as the real app,
each forwarding the raw key and value bytes of every event it reads to the next topic: no Avro
decoding or encoding, no tables, no fan-out (one record per order per hop). The record that arrives
on ``stations.queue.v1`` is the OrderPlaced the storefront sent, so the benchmark reads it there as
the null pipeline's "assignment". There is no station loop, hence no dispatch, in the null pipeline.

Run it with ``python -m streams.null_topology`` (with ``PIECEFLOW_APP_ID`` etc. in the environment).
"""

from __future__ import annotations

import sys
from typing import Any

import faust

from streams.faust_config import new_app, prepare_worker_process, run_worker
from streams.settings import get_settings
from streams.topics import TopicSpec

# The names only: importing streams.topology would build the real app (and its registry clients) too.
ORDERS_INBOUND = "orders.inbound.v1"
ORDERS_DECISIONS = "orders.decisions.v1"
ORDERS_WORKITEMS = "orders.workitems.v1"
OPERATIONS_REQUESTED = "operations.requested.v1"
STATIONS_QUEUE = "stations.queue.v1"

HOPS: list[tuple[str, str, str]] = [
    ("validate", ORDERS_INBOUND, ORDERS_DECISIONS),
    ("expand", ORDERS_DECISIONS, ORDERS_WORKITEMS),
    ("track", ORDERS_WORKITEMS, OPERATIONS_REQUESTED),
    ("assign", OPERATIONS_REQUESTED, STATIONS_QUEUE),
]

settings = get_settings()

app = new_app(settings)


def _forwarder(target: faust.TopicT) -> Any:
    async def forward(stream: faust.StreamT) -> None:
        async for event in stream.events():
            await target.send(key=event.message.key, value=event.message.value)

    return forward


for _name, _source, _target in HOPS:
    app.agent(app.topic(_source), name=f"null.{_name}", concurrency=1)(_forwarder(app.topic(_target)))


def topic_specs() -> list[TopicSpec]:
    """The topics the null pipeline touches (they are the real pipeline's; created by the bench)."""
    names = [ORDERS_INBOUND, ORDERS_DECISIONS, ORDERS_WORKITEMS, OPERATIONS_REQUESTED, STATIONS_QUEUE]
    return [TopicSpec(name, "", (), "null pipeline") for name in names]


def main(loglevel: str = "warn") -> None:
    # The same process set-up as the pipeline's worker: the baseline must not pay for a slower loop.
    prepare_worker_process()
    run_worker(app, "pieceflow null-worker", loglevel, settings.web_port)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "warn")
