"""The bench's pieces that need no broker: the envelope reader and the null app's settings."""

from __future__ import annotations

import io

import fastavro

from streams import schemas
from streams.bench import envelope_prefix, new_histogram, record_us, summarize
from streams.codec import _HEADER


def test_envelope_prefix_reads_order_id_and_seq_from_wire_format_records() -> None:
    # Every pipeline record starts with the envelope; the reader reads nothing past it.
    envelope = {"type": "record", "name": "E", "fields": schemas.load_schema("OrderStatus")["fields"][:3]}
    assert [f["name"] for f in envelope["fields"]] == ["event_id", "order_id", "seq"]
    buf = io.BytesIO()
    buf.write(_HEADER.pack(0, 42))
    fastavro.schemaless_writer(buf, fastavro.parse_schema(envelope),
                               {"event_id": "e-1", "order_id": "bench:run-12", "seq": 300})
    buf.write(b"rest of the record")
    assert envelope_prefix(buf.getvalue()) == (42, "bench:run-12", 300)


def test_envelope_prefix_refuses_what_is_not_the_wire_format() -> None:
    assert envelope_prefix(b"") is None
    assert envelope_prefix(b"\x07not avro") is None
    assert envelope_prefix(b"\x00\x00\x00\x00\x01\x7f") is None  # a string longer than the record


def test_summaries_are_in_milliseconds() -> None:
    hist = new_histogram()
    for ns in (1_000_000, 2_000_000, 3_000_000, 100_000_000):
        record_us(hist, ns)
    summary = summarize(hist)
    assert summary["count"] == 4
    assert 1.9 <= summary["p50"] <= 2.1
    assert 99 <= summary["max"] <= 101
    assert summarize(new_histogram())["p50"] is None


def test_the_null_app_has_the_real_apps_faust_settings() -> None:
    from streams import null_topology, topology

    for setting in (
        "processing_guarantee", "producer_linger", "producer_acks", "broker_commit_interval", "stream_buffer_maxsize",
        "stream_wait_empty", "stream_publish_on_commit", "consumer_auto_offset_reset", "topic_partitions",
        "topic_replication_factor", "broker", "id",
    ):
        assert getattr(null_topology.app.conf, setting) == getattr(topology.app.conf, setting), setting
    hops = [(source, target) for _, source, target in null_topology.HOPS]
    assert hops == [
        (topology.ORDERS_INBOUND.name, topology.ORDERS_DECISIONS.name),
        (topology.ORDERS_DECISIONS.name, topology.ORDERS_WORKITEMS.name),
        (topology.ORDERS_WORKITEMS.name, topology.OPERATIONS_REQUESTED.name),
        (topology.OPERATIONS_REQUESTED.name, topology.STATIONS_QUEUE.name),
    ]
