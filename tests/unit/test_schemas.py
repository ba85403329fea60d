from __future__ import annotations

import io
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import fastavro
import pytest
from fastavro.validation import validate

from streams import schemas
from streams.catalog import Catalog, catalog_to_avro
from streams.events import derived_event_id, epoch_ms, from_epoch_ms, new_event_id, utc_now

T0 = datetime(2025, 3, 14, 18, 0, tzinfo=UTC)
S = timedelta(seconds=1)
REFERENCE_DATA = ("CatalogProduct", "Station")
ENVELOPE = [
    ("event_id", "string"),
    ("order_id", "string"),
    ("seq", "long"),
    ("occurred_at", {"type": "long", "logicalType": "timestamp-millis"}),
    ("recorded_at", {"type": "long", "logicalType": "timestamp-millis"}),
    ("causation_id", ["null", "string"]),
]
MONEY_FIELDS = {"total", "unit_price", "base_price", "price_delta"}


def named_types(node: Any) -> Iterator[dict[str, Any]]:
    """Every record and enum definition inside a schema."""
    if isinstance(node, dict):
        if node.get("type") in ("record", "enum"):
            yield node
        for value in node.values():
            yield from named_types(value)
    elif isinstance(node, list):
        for value in node:
            yield from named_types(value)


def fields() -> Iterator[tuple[str, dict[str, Any]]]:
    for name in schemas.all_schema_names():
        for record in named_types(schemas.load_schema(name)):
            for field in record.get("fields", []):
                yield f"{name}.{record['name']}.{field['name']}", field


def branches(type_: Any) -> list[Any]:
    return type_ if isinstance(type_, list) else [type_]


def test_every_schema_parses_and_is_named_after_its_file() -> None:
    names = schemas.all_schema_names()
    assert len(names) >= 20
    for name in names:
        raw = schemas.load_schema(name)
        assert (raw["name"], raw["namespace"], raw["type"]) == (name, "pieceflow.v1", "record")
        assert schemas.parsed_schema(name) is schemas.parsed_schema(name)  # parsed once


def test_load_schema_returns_a_private_copy() -> None:
    schemas.load_schema("OrderPlaced")["fields"].clear()
    assert schemas.load_schema("OrderPlaced")["fields"]


def test_every_record_enum_and_field_has_a_doc() -> None:
    for name in schemas.all_schema_names():
        for node in named_types(schemas.load_schema(name)):
            assert node.get("doc", "").strip(), f"{name}: {node['name']} has no doc"
    missing = [where for where, field in fields() if not field.get("doc", "").strip()]
    assert missing == []


def test_every_enum_has_unknown_first_as_default() -> None:
    for name in schemas.all_schema_names():
        for node in named_types(schemas.load_schema(name)):
            if node["type"] == "enum":
                assert node["symbols"][0] == "UNKNOWN" and node["default"] == "UNKNOWN", (
                    f"{name}.{node['name']}"
                )


def test_times_are_timestamp_millis_and_money_is_decimal() -> None:
    for where, field in fields():
        types = branches(field["type"])
        if field["name"].endswith("_at") or field["name"] == "promised_by":
            assert {"type": "long", "logicalType": "timestamp-millis"} in types, where
        if field["name"] in MONEY_FIELDS:
            assert {"type": "bytes", "logicalType": "decimal", "precision": 12, "scale": 2} in types, where
        if "double" in types or "float" in types:
            assert field["name"].endswith("ratio"), f"{where}: floating point is for ratios only"


def test_optional_fields_default_to_null() -> None:
    for where, field in fields():
        if isinstance(field["type"], list) and "null" in field["type"]:
            assert field["type"][0] == "null" and field.get("default", "missing") is None, where


def test_every_event_starts_with_the_envelope() -> None:
    for name in schemas.all_schema_names():
        if name in REFERENCE_DATA:
            continue
        head = [(f["name"], f["type"]) for f in schemas.load_schema(name)["fields"][: len(ENVELOPE)]]
        assert head == ENVELOPE, name


def drain(pipe: Any, start: datetime) -> datetime:
    """Act as the MES: run requested operations, oldest first, until none is left."""
    t, done = start, set()
    while pending := [r for r in pipe.requested() if r["op_id"] not in done]:
        op = pending[0]
        t = max(t, op["release_at"]) + S
        pipe.mes("OperationStarted", op["op_id"], t)
        pipe.mes("OperationCompleted", op["op_id"], t, t + 10 * S)
        t += 10 * S
        done.add(op["op_id"])
    return t


@pytest.fixture(scope="module")
def examples(restaurant: Catalog, make_order: Any, pipeline: Any) -> dict[str, list[dict[str, Any]]]:
    """Realistic values of every schema, produced by the stages themselves."""
    pipe = pipeline(restaurant)
    north = {
        "method": "DELIVERY",
        "address": {"neighbourhood": "north", "postcode": "1011", "line1": "Canal 1", "city": "Ams"},
    }
    custom = [
        ("SUBSTITUTE", "vegetable", "asparagus"),
        ("SELECT", "spice", "extra-spicy"),
        ("ADD", "extra", "fried-egg"),
        ("REMOVE", "without", "peanuts"),
    ]
    happy = make_order(
        restaurant,
        [("kung-pao-chicken", 2, custom), ("egg-fried-rice", 1, [("TEXT", "note", "no MSG")])],
        priority="RUSH",
        delivery=north,
    )
    happy["promised_by"] = T0 + timedelta(hours=1)
    pipe.send("OrderPlaced", happy, T0)
    drain(pipe, T0)

    pipe.send("OrderPlaced", make_order(restaurant, [("peking-duck", 1, [])], external_id="bad"), T0)

    other = make_order(restaurant, [("spring-rolls", 3, [])], external_id="2002")
    pipe.send("OrderPlaced", other, T0)
    amended = {k: v for k, v in other.items() if k != "customer_ref"}
    pipe.send("OrderAmended", {**amended, "event_id": new_event_id(), "amendment_id": "A1"}, T0 + S)
    first = pipe.requested()[-1]["op_id"]
    pipe.mes("OperationStarted", first, T0 + 2 * S)
    pipe.mes("OperationFailed", first, T0 + 2 * S, T0 + 3 * S)
    pipe.station_status(pipe.assigned(pipe.requested()[-2]["op_id"])["station_id"], "DOWN", T0 + 4 * S)
    cancel = {
        k: other[k]
        for k in (
            "order_id",
            "seq",
            "occurred_at",
            "recorded_at",
            "causation_id",
            "source_platform",
            "external_order_id",
        )
    }
    pipe.send("OrderCancelled", {**cancel, "event_id": new_event_id(), "reason": "late"}, T0 + 5 * S)

    found: dict[str, list[dict[str, Any]]] = {}
    for type_, value in [*pipe.inputs, *((e.type, e.value) for e in pipe.log)]:
        found.setdefault(type_, []).append(value)
    products, stations = catalog_to_avro(restaurant, T0)
    found["CatalogProduct"], found["Station"] = products, stations
    return found


def test_stages_produce_an_example_of_every_schema(examples: dict[str, list[dict[str, Any]]]) -> None:
    assert sorted(examples) == sorted(schemas.all_schema_names())


@pytest.mark.parametrize("name", schemas.all_schema_names())
def test_examples_round_trip_through_fastavro(name: str, examples: dict[str, list[dict[str, Any]]]) -> None:
    parsed = schemas.parsed_schema(name)
    for value in examples[name]:
        assert validate(value, parsed, strict=True)
        buf = io.BytesIO()
        fastavro.schemaless_writer(buf, parsed, value)
        buf.seek(0)
        assert fastavro.schemaless_reader(buf, parsed) == value


def test_envelope_time_and_id_helpers() -> None:
    now = utc_now()
    assert now.tzinfo is not None and now.microsecond % 1000 == 0
    assert from_epoch_ms(epoch_ms(now)) == now
    assert epoch_ms(T0.replace(tzinfo=None)) == epoch_ms(T0)
    cause = new_event_id()
    assert derived_event_id(cause, "A") == derived_event_id(cause, "A") != derived_event_id(cause, "B")
