"""Product catalog and stations: what can be ordered, how it is made, who makes and delivers it.

The catalog is reference data. It is loaded from YAML (``deploy/catalogs/*.yaml``) and published to
compacted topics as ``CatalogProduct`` (key: sku) and ``Station`` (key: station id) records; the
``*_to_avro`` / ``*_from_avro`` pairs convert between the two forms.

Assignment lanes: the assignment stage needs every candidate station of an operation, with its
queue, in one partition. Stations that share a capability are therefore grouped, transitively, into
one *lane* (a connected component of the station-capability graph), and operations are keyed by
the lane of their capability. A station belongs to exactly one lane, so it is owned by exactly one
partition and cannot be double-booked, even when it has several capabilities. When every station
has a single capability, lanes are simply capabilities.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import yaml

CUSTOMIZATION_KINDS = ("SELECT", "SUBSTITUTE", "ADD", "REMOVE", "TEXT")
STATION_KINDS = ("WORK", "COURIER", "CARRIER")
STATION_STATUSES = ("UP", "DOWN", "PAUSED")
# The one value key of a TEXT option: its effects apply to any non-empty text.
ANY_TEXT = "*"
# A courier or carrier serving this neighbourhood serves every neighbourhood.
EVERYWHERE = "*"
# Which kind of station hands over an order for each delivery method.
HANDOVER_KIND = {"DELIVERY": "COURIER", "SHIP": "CARRIER"}


class CatalogError(ValueError):
    """The catalog is inconsistent (e.g. an operation needs a capability no station has)."""


@dataclass(frozen=True)
class OperationSpec:
    """One step of making a unit. ``after`` places an operation added by an option."""

    op_code: str
    capability: str
    duration_ms: int
    per_char_ms: int = 0
    after: str | None = None


@dataclass(frozen=True)
class BomLine:
    component: str
    quantity: int
    uom: str


@dataclass(frozen=True)
class OptionValue:
    """What choosing one value of an option costs and changes in the making."""

    value: str
    price_delta: Decimal = Decimal("0")
    replace_ops: Mapping[str, OperationSpec] = field(default_factory=dict)
    add_ops: tuple[OperationSpec, ...] = ()
    remove_ops: tuple[str, ...] = ()
    extra_duration_ms: Mapping[str, int] = field(default_factory=dict)
    bom_add: tuple[BomLine, ...] = ()
    bom_remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class Option:
    code: str
    kind: str
    values: Mapping[str, OptionValue]
    required: bool = False
    max_length: int = 0

    def value_for(self, value: str) -> OptionValue | None:
        if self.kind == "TEXT":
            return self.values.get(ANY_TEXT) if value else None
        return self.values.get(value)


@dataclass(frozen=True)
class Product:
    sku: str
    name: str
    base_price: Decimal
    max_quantity: int
    operations: tuple[OperationSpec, ...]
    options: Mapping[str, Option] = field(default_factory=dict)
    bom: tuple[BomLine, ...] = ()


@dataclass(frozen=True)
class Station:
    """A work station (``kind`` WORK) or a courier / carrier that hands orders over.

    ``neighbourhoods``: where a work station is; the areas a courier or carrier serves.
    """

    station_id: str
    name: str
    kind: str = "WORK"
    capabilities: tuple[str, ...] = ()
    capacity: int = 1
    status: str = "UP"
    neighbourhoods: tuple[str, ...] = ()


@dataclass(frozen=True)
class Catalog:
    name: str
    currency: str
    products: Mapping[str, Product]
    stations: Mapping[str, Station]
    lanes: Mapping[str, str] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "lanes", _lanes(self.stations.values()))
        for product in self.products.values():
            for op in _all_operations(product):
                if op.capability not in self.lanes:
                    raise CatalogError(
                        f"{product.sku}: operation {op.op_code} needs capability "
                        f"{op.capability!r}, which no work station has"
                    )

    def lane_of(self, capability: str) -> str:
        """The assignment partition key of ``capability``."""
        return self.lanes[capability]

    def lane_of_station(self, station_id: str) -> str:
        return self.lane_of(self.stations[station_id].capabilities[0])

    def stations_in_lane(self, lane: str) -> list[Station]:
        return [
            s
            for s in self.stations.values()
            if s.kind == "WORK" and s.capabilities and self.lanes[s.capabilities[0]] == lane
        ]

    def handover_stations(self, method: str, neighbourhood: str | None) -> list[Station]:
        """Couriers (DELIVERY) or carriers (SHIP) that are up and serve ``neighbourhood``."""
        kind = HANDOVER_KIND.get(method)
        return [
            s
            for s in self.stations.values()
            if s.kind == kind
            and s.status == "UP"
            and (EVERYWHERE in s.neighbourhoods or neighbourhood in s.neighbourhoods)
        ]

    def choose_handover(self, method: str, neighbourhood: str | None, order_id: str) -> str | None:
        """A courier / carrier for the order, or None if nobody serves it.

        A stable hash of the order id spreads orders over equivalent couriers without keeping
        cross-order state, and gives the same answer when an order is reprocessed.
        """
        candidates = sorted(self.handover_stations(method, neighbourhood), key=lambda s: s.station_id)
        if not candidates:
            return None
        return candidates[zlib.crc32(order_id.encode()) % len(candidates)].station_id

    def unit_price(self, product: Product, customizations: Iterable[Mapping[str, Any]]) -> Decimal:
        price = product.base_price
        for c in customizations:
            option = product.options.get(c["option_code"])
            chosen = option.value_for(c["value"]) if option else None
            if chosen is not None:
                price += chosen.price_delta
        return price


def _all_operations(product: Product) -> Iterable[OperationSpec]:
    yield from product.operations
    for option in product.options.values():
        for value in option.values.values():
            yield from value.replace_ops.values()
            yield from value.add_ops


def _lanes(stations: Iterable[Station]) -> dict[str, str]:
    """Map each capability to its lane: the sorted, '+'-joined capabilities of its component."""
    parent: dict[str, str] = {}

    def find(c: str) -> str:
        while parent.setdefault(c, c) != c:
            c = parent[c]
        return c

    for station in stations:
        if station.kind != "WORK":
            continue
        for cap in station.capabilities:
            parent[find(cap)] = find(station.capabilities[0])
    components: dict[str, list[str]] = {}
    for cap in parent:
        components.setdefault(find(cap), []).append(cap)
    return {cap: "+".join(sorted(members)) for members in components.values() for cap in members}


# --- YAML ---------------------------------------------------------------------------------------


def load_catalog_yaml(path: str | Path) -> Catalog:
    raw = yaml.safe_load(Path(path).read_text())
    return catalog_from_dict(raw)


def catalog_from_dict(raw: Mapping[str, Any]) -> Catalog:
    products = {p["sku"]: _product_from_yaml(p) for p in raw.get("products", [])}
    stations = {s["station_id"]: _station_from_yaml(s) for s in raw.get("stations", [])}
    return Catalog(name=raw["name"], currency=raw["currency"], products=products, stations=stations)


def _op_from_yaml(raw: Mapping[str, Any]) -> OperationSpec:
    return OperationSpec(
        op_code=raw["op_code"],
        capability=raw["capability"],
        duration_ms=int(raw["duration_ms"]),
        per_char_ms=int(raw.get("per_char_ms", 0)),
        after=raw.get("after"),
    )


def _bom_from_yaml(raw: Iterable[Mapping[str, Any]]) -> tuple[BomLine, ...]:
    return tuple(BomLine(b["component"], int(b["quantity"]), b["uom"]) for b in raw)


def _value_from_yaml(value: str, raw: Mapping[str, Any] | None) -> OptionValue:
    raw = raw or {}
    return OptionValue(
        value=value,
        price_delta=Decimal(str(raw.get("price_delta", "0"))),
        replace_ops={k: _op_from_yaml(v) for k, v in raw.get("replace_ops", {}).items()},
        add_ops=tuple(_op_from_yaml(o) for o in raw.get("add_ops", [])),
        remove_ops=tuple(raw.get("remove_ops", [])),
        extra_duration_ms={k: int(v) for k, v in raw.get("extra_duration_ms", {}).items()},
        bom_add=_bom_from_yaml(raw.get("bom_add", [])),
        bom_remove=tuple(raw.get("bom_remove", [])),
    )


def _product_from_yaml(raw: Mapping[str, Any]) -> Product:
    options = {}
    for o in raw.get("options", []):
        if o["kind"] not in CUSTOMIZATION_KINDS:
            raise CatalogError(f"{raw['sku']}: option {o['code']} has unknown kind {o['kind']}")
        values = {str(k): _value_from_yaml(str(k), v) for k, v in o.get("values", {}).items()}
        options[o["code"]] = Option(
            code=o["code"],
            kind=o["kind"],
            values=values,
            required=bool(o.get("required", False)),
            max_length=int(o.get("max_length", 0)),
        )
    return Product(
        sku=raw["sku"],
        name=raw["name"],
        base_price=Decimal(str(raw["price"])),
        max_quantity=int(raw["max_quantity"]),
        operations=tuple(_op_from_yaml(o) for o in raw["operations"]),
        options=options,
        bom=_bom_from_yaml(raw.get("bom", [])),
    )


def _station_from_yaml(raw: Mapping[str, Any]) -> Station:
    station = Station(
        station_id=raw["station_id"],
        name=raw.get("name", raw["station_id"]),
        kind=raw.get("kind", "WORK"),
        capabilities=tuple(raw.get("capabilities", [])),
        capacity=int(raw.get("capacity", 1)),
        status=raw.get("status", "UP"),
        neighbourhoods=tuple(raw.get("neighbourhoods", [])),
    )
    if station.kind not in STATION_KINDS or station.status not in STATION_STATUSES:
        raise CatalogError(f"station {station.station_id}: bad kind or status")
    if station.kind == "WORK" and not station.capabilities:
        raise CatalogError(f"work station {station.station_id} has no capability")
    return station


# --- Avro records (CatalogProduct, Station) -----------------------------------------------------


def _op_to_avro(op: OperationSpec) -> dict[str, Any]:
    return {
        "op_code": op.op_code,
        "capability": op.capability,
        "duration_ms": op.duration_ms,
        "per_char_ms": op.per_char_ms,
        "after": op.after,
    }


def _op_from_avro(raw: Mapping[str, Any]) -> OperationSpec:
    return OperationSpec(
        raw["op_code"], raw["capability"], raw["duration_ms"], raw["per_char_ms"], raw["after"]
    )


def _bom_to_avro(bom: Iterable[BomLine]) -> list[dict[str, Any]]:
    return [{"component": b.component, "quantity": b.quantity, "uom": b.uom} for b in bom]


def _bom_from_avro(raw: Iterable[Mapping[str, Any]]) -> tuple[BomLine, ...]:
    return tuple(BomLine(b["component"], b["quantity"], b["uom"]) for b in raw)


def product_to_avro(product: Product, currency: str, updated_at: datetime) -> dict[str, Any]:
    return {
        "sku": product.sku,
        "name": product.name,
        "currency": currency,
        "base_price": product.base_price,
        "max_quantity": product.max_quantity,
        "operations": [_op_to_avro(o) for o in product.operations],
        "bom": _bom_to_avro(product.bom),
        "options": [
            {
                "code": o.code,
                "kind": o.kind,
                "required": o.required,
                "max_length": o.max_length,
                "values": [
                    {
                        "value": v.value,
                        "price_delta": v.price_delta,
                        "replace_ops": [
                            {"op_code": k, "replacement": _op_to_avro(r)} for k, r in v.replace_ops.items()
                        ],
                        "add_ops": [_op_to_avro(a) for a in v.add_ops],
                        "remove_ops": list(v.remove_ops),
                        "extra_duration": [
                            {"op_code": k, "duration_ms": d} for k, d in v.extra_duration_ms.items()
                        ],
                        "bom_add": _bom_to_avro(v.bom_add),
                        "bom_remove": list(v.bom_remove),
                    }
                    for v in o.values.values()
                ],
            }
            for o in product.options.values()
        ],
        "updated_at": updated_at,
    }


def product_from_avro(raw: Mapping[str, Any]) -> Product:
    options = {}
    for o in raw["options"]:
        values = {
            v["value"]: OptionValue(
                value=v["value"],
                price_delta=v["price_delta"],
                replace_ops={r["op_code"]: _op_from_avro(r["replacement"]) for r in v["replace_ops"]},
                add_ops=tuple(_op_from_avro(a) for a in v["add_ops"]),
                remove_ops=tuple(v["remove_ops"]),
                extra_duration_ms={e["op_code"]: e["duration_ms"] for e in v["extra_duration"]},
                bom_add=_bom_from_avro(v["bom_add"]),
                bom_remove=tuple(v["bom_remove"]),
            )
            for v in o["values"]
        }
        options[o["code"]] = Option(o["code"], o["kind"], values, o["required"], o["max_length"])
    return Product(
        sku=raw["sku"],
        name=raw["name"],
        base_price=raw["base_price"],
        max_quantity=raw["max_quantity"],
        operations=tuple(_op_from_avro(o) for o in raw["operations"]),
        options=options,
        bom=_bom_from_avro(raw["bom"]),
    )


def station_to_avro(station: Station, updated_at: datetime) -> dict[str, Any]:
    return {
        "station_id": station.station_id,
        "name": station.name,
        "kind": station.kind,
        "capabilities": list(station.capabilities),
        "capacity": station.capacity,
        "status": station.status,
        "neighbourhoods": list(station.neighbourhoods),
        "updated_at": updated_at,
    }


def station_from_avro(raw: Mapping[str, Any]) -> Station:
    return Station(
        station_id=raw["station_id"],
        name=raw["name"],
        kind=raw["kind"],
        capabilities=tuple(raw["capabilities"]),
        capacity=raw["capacity"],
        status=raw["status"],
        neighbourhoods=tuple(raw["neighbourhoods"]),
    )


def catalog_to_avro(
    catalog: Catalog, updated_at: datetime
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """CatalogProduct and Station records to publish (keys: ``sku`` and ``station_id``)."""
    products = [product_to_avro(p, catalog.currency, updated_at) for p in catalog.products.values()]
    stations = [station_to_avro(s, updated_at) for s in catalog.stations.values()]
    return products, stations


def catalog_from_avro(
    name: str, products: Iterable[Mapping[str, Any]], stations: Iterable[Mapping[str, Any]]
) -> Catalog:
    """Rebuild a catalog from the compacted topics' latest records."""
    products = list(products)
    currencies = {p["currency"] for p in products}
    if len(currencies) > 1:
        raise CatalogError(f"catalog {name} mixes currencies {sorted(currencies)}")
    return Catalog(
        name=name,
        currency=currencies.pop() if currencies else "",
        products={p["sku"]: product_from_avro(p) for p in products},
        stations={s["station_id"]: station_from_avro(s) for s in stations},
    )
