"""pieceflow's Prometheus metrics: one module-level object per metric, on the default registry.

Every process (Faust worker, intake service, ERP sink, demo) imports this module and updates the
objects it owns; what a process does not touch stays at its initial value. The default registry is
used on purpose: Faust's Prometheus sensor serves ``generate_latest(REGISTRY)`` on the worker's web
port, so business metrics defined here appear on the same ``/metrics`` page without extra wiring.

Naming follows https://prometheus.io/docs/practices/naming: a ``pieceflow_`` prefix, base units
(seconds), ``_total`` on counters and no order-id or SKU labels (those belong in log lines; as
labels they would create one series per order). ``pieceflow_order_lead_time_ratio`` is the one
dimensionless histogram: lead time divided by critical-path work time, so 1 means "no waiting".

The dashboards in ``deploy/grafana/dashboards`` and the alert rules in ``deploy/prometheus/rules.yml``
query these names; ``tests/unit/test_metrics.py`` fails when one of them refers to a metric that
is not defined here.
"""

from __future__ import annotations

from typing import Final

from prometheus_client import Counter, Gauge, Histogram, start_http_server

STAGES: Final = ("validation", "expansion", "assignment", "dispatch")
"""The Faust agents of the pipeline, in order; the ``stage`` label takes these values."""

REJECTION_REASONS: Final = (
    "UNKNOWN_SKU",
    "OPTION_NOT_ALLOWED",
    "QUANTITY_OUT_OF_RANGE",
    "MISSING_ADDRESS",
    "UNSERVICEABLE_ADDRESS",
    "PRICE_MISMATCH",
    "DUPLICATE_EVENT",
    "DUPLICATE_ORDER",
    "UNKNOWN_ORDER",
    "ORDER_IN_PRODUCTION",
    "ORDER_CLOSED",
)
"""Why validation rejects an order; the ``reason`` label of ``pieceflow_orders_rejected_total``.
The RejectionReason symbols of schemas/OrderRejected.avsc, less its forward-compatibility default
UNKNOWN (a unit test keeps the two in step)."""

DEAD_LETTER_REASONS: Final = ("undecodable", "stage-error")
"""Why a stage dead-letters an event (streams/runner.py); other reasons still count, unlisted."""

LEAD_TIME_PARTS: Final = ("queue", "work", "sibling_wait", "dispatch")
"""Where an order's lead time went: waiting at a station, being worked on, waiting for the other
items of the same order, and from the last item done to dispatch."""

AMENDMENT_RESULTS: Final = ("accepted", "rejected")

# Per-stage handling of one event is CPU work plus a produce: sub-millisecond when idle, up to a
# second under load or a slow registry. Finer buckets at the low end keep p50 meaningful.
STAGE_BUCKETS: Final = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)

# Order-level durations span a compressed demo (seconds) to a real shop floor (hours to a week).
ORDER_BUCKETS: Final = (
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0,
    7200.0, 14400.0, 28800.0, 86400.0, 172800.0, 604800.0,
)  # fmt: skip

# Lead time / work time: 1 is a perfect flow; anything past 50 is "stuck" and needs no detail.
RATIO_BUCKETS: Final = (1.0, 1.1, 1.25, 1.5, 2.0, 3.0, 4.0, 5.0, 7.5, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0)

# Time spent by an event inside the pipeline itself (broker + agents), not on the shop floor.
OVERHEAD_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# --- per-stage flow ---------------------------------------------------------------------------

STAGE_DURATION = Histogram(
    "pieceflow_stage_duration_seconds",
    "Time a pipeline stage spent handling one event, from receipt to its output being produced.",
    ["stage"],
    buckets=STAGE_BUCKETS,
)
STAGE_EVENTS_IN = Counter("pieceflow_stage_events_in_total", "Events a pipeline stage received.", ["stage"])
STAGE_EVENTS_OUT = Counter(
    "pieceflow_stage_events_out_total", "Events a pipeline stage produced downstream.", ["stage"]
)
PIPELINE_OVERHEAD = Histogram(
    "pieceflow_pipeline_overhead_seconds",
    "Time an event spent in the pipeline itself (recorded_at - occurred_at), per hop.",
    ["hop"],
    buckets=OVERHEAD_BUCKETS,
)
DEAD_LETTERS = Counter(
    "pieceflow_dead_letters_total",
    "Events routed to the dead-letter topic, by the stage that gave up and why.",
    ["stage", "reason"],
)
REGISTRY_RETRIES = Counter(
    "pieceflow_registry_retries_total",
    "Attempts to read an event again because the schema registry did not answer for its schema.",
    ["stage"],
)
CONSUMER_LAG = Gauge(
    "pieceflow_consumer_lag_messages",
    "Messages between a partition's end offset and the worker's position in it.",
    ["topic", "partition"],
)

# --- orders -----------------------------------------------------------------------------------

ORDER_LEAD_TIME = Histogram(
    "pieceflow_order_lead_time_seconds",
    "Order lead time, from placed to dispatched.",
    buckets=ORDER_BUCKETS,
)
ORDER_WORK = Histogram(
    "pieceflow_order_work_seconds",
    "Critical-path work time of an order: the longest chain of station operations it needed.",
    buckets=ORDER_BUCKETS,
)
ORDER_LEAD_TIME_RATIO = Histogram(
    "pieceflow_order_lead_time_ratio",
    "Lead time divided by critical-path work time (dimensionless; 1 means no waiting).",
    buckets=RATIO_BUCKETS,
)
ORDER_STAGE = Histogram(
    "pieceflow_order_stage_seconds",
    "Breakdown of an order's lead time into queue, work, sibling_wait and dispatch.",
    ["part"],
    buckets=ORDER_BUCKETS,
)
ORDERS_ACCEPTED = Counter("pieceflow_orders_accepted_total", "Orders that passed validation.")
ORDERS_REJECTED = Counter(
    "pieceflow_orders_rejected_total", "Orders rejected by validation, by reason.", ["reason"]
)
ORDERS_DISPATCHED = Counter("pieceflow_orders_dispatched_total", "Orders dispatched to the customer.")
ORDERS_OPEN = Gauge("pieceflow_orders_open", "Orders accepted and neither dispatched nor cancelled.")
ORDERS_OVERDUE = Gauge("pieceflow_orders_overdue", "Open orders whose promised dispatch time has passed.")
AMENDMENTS = Counter(
    "pieceflow_amendments_total", "Order amendments, by whether they could still be applied.", ["result"]
)

# --- stations ---------------------------------------------------------------------------------

STATION_QUEUE_DEPTH = Gauge("pieceflow_station_queue_depth", "Operations waiting at a station.", ["station"])
STATION_WIP = Gauge("pieceflow_station_wip", "Operations a station is working on right now.", ["station"])
STATION_UP = Gauge("pieceflow_station_up", "1 if the station reports itself up, else 0.", ["station"])
LANE_WAITING = Gauge(
    "pieceflow_lane_waiting_operations",
    "Operations waiting in a lane because none of its stations that can do them is up.",
    ["lane"],
)
STATION_BUSY = Counter(
    "pieceflow_station_busy_seconds_total",
    "Seconds a station spent working; rate() of it is the station's utilisation (0..1 per slot).",
    ["station"],
)

# --- edges: intake and ERP sink ---------------------------------------------------------------

INTAKE_REQUESTS = Counter(
    "pieceflow_intake_requests_total",
    "Webhook requests received by the intake service, by storefront and HTTP status.",
    ["source", "status"],
)
SINK_ROWS = Counter(
    "pieceflow_sink_rows_total", "Rows the ERP sink wrote to PostgreSQL, by table.", ["table"]
)


def _preinitialise() -> None:
    """Create the known label sets at 0.

    A labelled series only exists once it is first touched; until then ``rate()`` and
    ``increase()`` return nothing instead of 0, so a dashboard shows "No data" and an alert on a
    rise from zero cannot fire on the first event. Only bounded, known label values are listed.
    """
    for stage in STAGES:
        STAGE_DURATION.labels(stage=stage)
        STAGE_EVENTS_IN.labels(stage=stage)
        STAGE_EVENTS_OUT.labels(stage=stage)
    for reason in REJECTION_REASONS:
        ORDERS_REJECTED.labels(reason=reason)
    for stage in STAGES:
        for reason in DEAD_LETTER_REASONS:
            # Without a 0 sample first, increase() misses the first dead letter and the alert on
            # dead-letter growth stays silent for it.
            DEAD_LETTERS.labels(stage=stage, reason=reason)
    for part in LEAD_TIME_PARTS:
        ORDER_STAGE.labels(part=part)
    for result in AMENDMENT_RESULTS:
        AMENDMENTS.labels(result=result)


_preinitialise()


def serve_metrics(port: int, host: str = "127.0.0.1") -> None:
    """Serve the default registry at ``http://host:port/metrics`` from a daemon thread.

    For processes without a web server of their own (intake, sink, demo); the Faust worker already
    serves ``/metrics`` on its web port. Loopback by default so a laptop run exposes nothing;
    containers pass ``0.0.0.0``.
    """
    start_http_server(port, addr=host)
