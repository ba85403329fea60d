"""Schema evolution: today's schemas read data written with the newest released ones.

``schemas/released/<version>/`` holds the schemas of each release (see its README). For every
released schema, a realistic sample is written with the released schema and read back with the
current schema of the same name, by Avro schema resolution (fastavro: writer = released, reader =
current). The negative self-tests prove the very same check catches incompatible changes.
"""

from __future__ import annotations

import copy
import io
import json
import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from functools import cache
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.read import SchemaResolutionError

from connectors.shopfront import amendment, build_order, cancellation
from streams import schemas
from streams.catalog import Catalog, catalog_to_avro, load_catalog_yaml

REPO = Path(__file__).resolve().parents[2]
RELEASED = REPO / "schemas" / "released"
T0 = datetime(2025, 3, 14, 18, 0, tzinfo=UTC)


def version_key(path: Path) -> tuple[int, ...]:
    return tuple(int(part) for part in path.name.split("."))


def newest_release() -> Path:
    releases = [p for p in RELEASED.iterdir() if p.is_dir() and p.name.replace(".", "").isdigit()]
    assert releases, f"no released schema folder under {RELEASED}"
    return max(releases, key=version_key)


def released_names() -> list[str]:
    return sorted(p.stem for p in newest_release().glob("*.avsc"))


def released_schema(name: str) -> dict[str, Any]:
    schema: dict[str, Any] = json.loads((newest_release() / f"{name}.avsc").read_text())
    return schema


def parse(schema: dict[str, Any]) -> Any:
    # Each file is self-contained and reuses nested names (OrderLine…): parse each on its own.
    return fastavro.parse_schema(copy.deepcopy(schema), named_schemas={})


def read_with(writer: dict[str, Any], reader: dict[str, Any], value: dict[str, Any]) -> dict[str, Any]:
    """Write ``value`` with ``writer``; read it back resolved to ``reader``. Raises when incompatible."""
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, parse(writer), value)
    buf.seek(0)
    out = fastavro.schemaless_reader(buf, parse(writer), parse(reader))
    assert buf.tell() == len(buf.getvalue()), "the reader did not consume the whole record"
    assert isinstance(out, dict)
    return out


# ---- realistic samples --------------------------------------------------------------------------


@cache
def restaurant() -> Catalog:
    return load_catalog_yaml(REPO / "deploy" / "catalogs" / "restaurant.yaml")


def from_builders(name: str) -> list[dict[str, Any]]:
    """Samples made by pieceflow's own builders, for the records that have one."""
    catalog = restaurant()
    placed = build_order(
        catalog,
        [("kung-pao-chicken", 2, [("SUBSTITUTE", "vegetable", "asparagus"), ("SELECT", "spice", "extra-spicy")]),
         ("egg-fried-rice", 1, [])],
        external_id="evolution-1", priority="RUSH", at=T0,
        delivery={"method": "DELIVERY", "address": {"neighbourhood": "north", "postcode": "10115",
                                                    "line1": "1 Main St", "city": "Berlin"}},
    )
    products, stations = catalog_to_avro(catalog, T0)
    return {
        "OrderPlaced": [placed],
        "OrderAmended": [amendment(placed, catalog, [("mapo-tofu", 1, [])])],
        "OrderCancelled": [cancellation(placed)],
        "CatalogProduct": products[:3],
        "Station": stations[:3],
    }.get(name, [])


class Sampler:
    """Builds a value for any schema: plausible strings, non-trivial numbers, every branch filled.

    ``full`` picks the non-null branch of every union and fills arrays and maps; otherwise nulls and
    empty collections, so both shapes of each optional field are written.
    """

    def __init__(self, full: bool) -> None:
        self.full = full
        self.named: dict[str, Any] = {}

    def value(self, schema: Any, field: str = "value") -> Any:
        if isinstance(schema, str):
            if schema in self.named:
                return self.value(self.named[schema], field)
            return self.primitive(schema, field)
        if isinstance(schema, list):  # a union
            branches = [b for b in schema if b != "null"] if self.full else schema
            return self.value(branches[0], field) if branches[0] != "null" else None
        kind = schema["type"]
        logical = schema.get("logicalType")
        if logical == "timestamp-millis":
            return T0 + timedelta(minutes=len(field))
        if logical == "decimal":
            return Decimal("12.50").quantize(Decimal(1).scaleb(-schema.get("scale", 0)))
        if kind == "record":
            self.named[schema["name"]] = schema
            if "namespace" in schema:
                self.named[f"{schema['namespace']}.{schema['name']}"] = schema
            return {f["name"]: self.value(f["type"], f["name"]) for f in schema["fields"]}
        if kind == "enum":
            self.named[schema["name"]] = schema
            real = [s for s in schema["symbols"] if s != schema.get("default")]
            return (real or schema["symbols"])[0]
        if kind == "array":
            return [self.value(schema["items"], field) for _ in range(2 if self.full else 0)]
        if kind == "map":
            return {f"{field}-key": self.value(schema["values"], field)} if self.full else {}
        if kind == "fixed":
            return b"\x01" * schema["size"]
        return self.value(kind, field)

    def primitive(self, kind: str, field: str) -> Any:
        if kind == "string":
            return str(uuid.uuid5(uuid.NAMESPACE_URL, field)) if field.endswith("_id") else f"{field} sample"
        return {
            "int": 3,
            "long": 1_741_975_200_123,
            "float": 1.5,
            "double": 2.25,
            "boolean": True,
            "bytes": b"\x00\x01pieceflow",
            "null": None,
        }[kind]


def samples(name: str, schema: dict[str, Any]) -> list[dict[str, Any]]:
    return [*from_builders(name), Sampler(full=True).value(schema), Sampler(full=False).value(schema)]


# ---- the check ----------------------------------------------------------------------------------


def test_there_is_a_release_and_it_covers_every_current_schema() -> None:
    """The first release was 0.1.0; a schema added since then has no released copy yet, and that is fine,
    but each released one must still exist today."""
    assert version_key(newest_release()) >= (0, 1, 0)
    assert set(released_names()) <= set(schemas.all_schema_names()), (
        "a released schema was deleted: data written with it could no longer be read"
    )


@pytest.mark.parametrize("name", released_names())
def test_current_schema_reads_data_written_with_the_released_one(name: str) -> None:
    old = released_schema(name)
    assert name in schemas.all_schema_names(), f"{name} was released but no longer exists in schemas/"
    current = schemas.load_schema(name)
    assert (current["namespace"], current["name"]) == (old["namespace"], old["name"]), (
        "renaming a record breaks resolution (and its registry subject)"
    )
    current_fields = {f["name"] for f in current["fields"]}
    for sample in samples(name, old):
        fastavro.validate(sample, parse(old), raise_errors=True)
        read = read_with(old, current, sample)
        # What both versions know must survive unchanged; new fields come from their defaults.
        for field, value in sample.items():
            if field in current_fields:
                assert read[field] == value, f"{name}.{field} changed across versions"


# ---- negative self-tests: the same check catches incompatible changes ----------------------------


def with_new_required_field(schema: dict[str, Any]) -> dict[str, Any]:
    changed = copy.deepcopy(schema)
    changed["fields"].append({"name": "station_hint", "type": "string", "doc": "new, without a default"})
    return changed


def with_field_type(schema: dict[str, Any], field: str, new_type: Any) -> dict[str, Any]:
    changed = copy.deepcopy(schema)
    for f in changed["fields"]:
        if f["name"] == field:
            f["type"] = new_type
            f.pop("default", None)
    return changed


def with_enum_symbol_removed(schema: dict[str, Any], field: str, symbol: str) -> dict[str, Any]:
    changed = copy.deepcopy(schema)
    for f in changed["fields"]:
        if f["name"] == field:
            f["type"]["symbols"].remove(symbol)
            f["type"].pop("default", None)
    return changed


@pytest.mark.parametrize(
    ("change", "make"),
    [
        ("a new field without a default", lambda s: with_new_required_field(s)),
        ("seq narrowed from long to int", lambda s: with_field_type(s, "seq", "int")),
        ("an optional field made required", lambda s: with_field_type(s, "causation_id", "string")),
        ("an enum symbol removed, no enum default", lambda s: with_enum_symbol_removed(s, "priority", "RUSH")),
    ],
)
def test_the_check_detects_an_incompatible_change(change: str, make: Any) -> None:
    old = released_schema("OrderPlaced")
    incompatible = make(old)
    sample = from_builders("OrderPlaced")[0]
    assert sample["priority"] == "RUSH" and sample["causation_id"] is None  # the values the changes break
    parse(incompatible)  # a valid schema on its own: only the resolution against old data fails
    with pytest.raises(SchemaResolutionError):
        read_with(old, incompatible, sample)


def test_the_check_accepts_a_compatible_change() -> None:
    """The positive control of the self-test: a new optional field with a default reads old data."""
    old = released_schema("OrderPlaced")
    compatible = copy.deepcopy(old)
    compatible["fields"].append({"name": "station_hint", "type": ["null", "string"], "default": None})
    read = read_with(old, compatible, from_builders("OrderPlaced")[0])
    assert read["station_hint"] is None
