-- The ERP tables. Every row carries `applied` (how many events were merged into it) and
-- `updated_at`; exactly-once is checked with `applied`, and operators see when a row last moved.

-- The idempotency ledger: per order and sequence stream (a topic, or topic@station for the station
-- feed whose seq counts per station), the last seq applied. An event is applied only if its seq is
-- above last_seq, in the same transaction as its rows, so a replay after a crash changes nothing.
CREATE TABLE event_positions (
    order_id      text        NOT NULL,
    stream        text        NOT NULL,
    last_seq      bigint      NOT NULL,
    last_event_id text        NOT NULL,
    topic         text        NOT NULL,
    kafka_partition integer   NOT NULL,
    kafka_offset  bigint      NOT NULL,
    applied       integer     NOT NULL DEFAULT 1,
    updated_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (order_id, stream)
);

CREATE TABLE orders (
    order_id                text PRIMARY KEY,
    source_platform         text,
    external_order_id       text,
    -- validation's verdict: ACCEPTED, REJECTED (placement refused) or CANCELLED
    decision                text,
    decided_at              timestamptz,
    decision_seq            bigint,
    revision                integer,
    priority                text,
    currency                text,
    total                   numeric(12, 2),
    placed_at               timestamptz,
    promised_by             timestamptz,
    delivery_method         text,
    delivery_address        jsonb,
    lines                   jsonb,
    cancelled_at            timestamptz,
    cancel_reason           text,
    cancelled_in_production boolean,
    -- production progress, from the order status topic
    state                   text,
    state_at                timestamptz,
    status_seq              bigint,
    items_total             integer,
    items_done              integer,
    ops_total               integer,
    ops_started             integer,
    ops_done                integer,
    dispatched_at           timestamptz,
    carrier_id              text,
    state_detail            text,
    applied                 integer     NOT NULL DEFAULT 1,
    updated_at              timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX orders_state ON orders (state);
CREATE INDEX orders_external ON orders (source_platform, external_order_id);

CREATE TABLE order_rejections (
    event_id          text PRIMARY KEY,
    order_id          text        NOT NULL,
    request           text        NOT NULL,
    rejected_event_id text        NOT NULL,
    reason            text        NOT NULL,
    detail            text        NOT NULL,
    rejected_at       timestamptz NOT NULL,
    seq               bigint      NOT NULL,
    applied           integer     NOT NULL DEFAULT 1,
    updated_at        timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX order_rejections_order ON order_rejections (order_id);

CREATE TABLE work_items (
    work_item_id   text PRIMARY KEY,
    order_id       text        NOT NULL,
    revision       integer     NOT NULL,
    line_index     integer     NOT NULL,
    line_id        text        NOT NULL,
    sku            text        NOT NULL,
    unit_index     integer     NOT NULL,
    item_count     integer     NOT NULL,
    priority       text,
    placed_at      timestamptz,
    promised_by    timestamptz,
    est_path_ms    bigint,
    fire_offset_ms bigint,
    customizations jsonb,
    bom            jsonb,
    planned_at     timestamptz NOT NULL,
    seq            bigint      NOT NULL,
    applied        integer     NOT NULL DEFAULT 1,
    updated_at     timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX work_items_order ON work_items (order_id);

-- One row per operation, created by whichever of its events arrives first (the plan, the station
-- queue and the station feed are different topics), so only the keys are NOT NULL.
CREATE TABLE operations (
    op_id               text PRIMARY KEY,
    order_id            text        NOT NULL,
    work_item_id        text        NOT NULL,
    revision            integer,
    op_code             text,
    capability          text,
    lane                text,
    sequence            integer,
    depends_on          jsonb,
    est_duration_ms     bigint,
    fire_offset_ms      bigint,
    status              text        NOT NULL,
    status_rank         smallint    NOT NULL,
    status_at           timestamptz NOT NULL,
    assigned_station_id text,
    assigned_at         timestamptz,
    attempt             integer,
    assign_reason       text,
    rush                boolean,
    queue_position      integer,
    predicted_start     timestamptz,
    predicted_end       timestamptz,
    station_id          text,
    operator_ref        text,
    started_at          timestamptz,
    completed_at        timestamptz,
    failed_at           timestamptz,
    failure_reason      text,
    failures            integer     NOT NULL DEFAULT 0,
    applied             integer     NOT NULL DEFAULT 1,
    updated_at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX operations_order ON operations (order_id);
CREATE INDEX operations_station_status ON operations (assigned_station_id, status);

CREATE TABLE dispatches (
    order_id              text PRIMARY KEY,
    handover              text        NOT NULL,
    carrier_id            text        NOT NULL,
    delivery_method       text,
    delivery_address      jsonb,
    items                 integer     NOT NULL,
    placed_at             timestamptz NOT NULL,
    ready_at              timestamptz NOT NULL,
    dispatched_at         timestamptz NOT NULL,
    lead_time_ms          bigint      NOT NULL,
    intake_ms             bigint      NOT NULL,
    queue_ms              bigint      NOT NULL,
    work_ms               bigint      NOT NULL,
    sibling_wait_ms       bigint      NOT NULL,
    dispatch_ms           bigint      NOT NULL,
    critical_path_work_ms bigint      NOT NULL,
    critical_work_item_id text        NOT NULL,
    lead_to_work_ratio    double precision NOT NULL,
    seq                   bigint      NOT NULL,
    applied               integer     NOT NULL DEFAULT 1,
    updated_at            timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE lead_times (
    order_id                 text PRIMARY KEY,
    priority                 text,
    items                    integer     NOT NULL,
    planned_critical_path_ms bigint      NOT NULL,
    promised_by              timestamptz,
    promise_met              boolean,
    placed_at                timestamptz NOT NULL,
    ready_at                 timestamptz NOT NULL,
    dispatched_at            timestamptz NOT NULL,
    lead_time_ms             bigint      NOT NULL,
    intake_ms                bigint      NOT NULL,
    queue_ms                 bigint      NOT NULL,
    work_ms                  bigint      NOT NULL,
    sibling_wait_ms          bigint      NOT NULL,
    dispatch_ms              bigint      NOT NULL,
    critical_path_work_ms    bigint      NOT NULL,
    critical_work_item_id    text        NOT NULL,
    lead_to_work_ratio       double precision NOT NULL,
    seq                      bigint      NOT NULL,
    applied                  integer     NOT NULL DEFAULT 1,
    updated_at               timestamptz NOT NULL DEFAULT now()
);
