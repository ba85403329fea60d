from __future__ import annotations

import io
from dataclasses import replace
from datetime import UTC, datetime
from decimal import Decimal
from pathlib import Path
from typing import Any

import fastavro
import pytest
import yaml

from streams import schemas
from streams.catalog import (
    Catalog,
    CatalogError,
    catalog_from_avro,
    catalog_from_dict,
    catalog_to_avro,
    load_catalog_yaml,
)

T0 = datetime(2025, 3, 14, 18, 0, tzinfo=UTC)
CATALOGS = Path(__file__).resolve().parents[2] / "deploy" / "catalogs"


def avro_round_trip(name: str, value: dict[str, Any]) -> dict[str, Any]:
    buf = io.BytesIO()
    fastavro.schemaless_writer(buf, schemas.parsed_schema(name), value)
    buf.seek(0)
    result = fastavro.schemaless_reader(buf, schemas.parsed_schema(name))
    assert isinstance(result, dict)
    return result


@pytest.mark.parametrize("path", sorted(CATALOGS.glob("*.yaml")), ids=lambda p: p.stem)
def test_seed_catalogs_load_with_several_stations_per_capability(path: Path) -> None:
    catalog = load_catalog_yaml(path)
    assert len(catalog.products) >= 3
    for capability in catalog.lanes:
        capable = [s for s in catalog.stations.values() if capability in s.capabilities]
        assert len(capable) >= 2, f"{path.stem}: {capability} has a single point of failure"
    assert any(s.kind in ("COURIER", "CARRIER") for s in catalog.stations.values())


def test_restaurant_has_the_kung_pao_asparagus_substitution(restaurant: Catalog) -> None:
    option = restaurant.products["kung-pao-chicken"].options["vegetable"]
    assert option.kind == "SUBSTITUTE"
    assert "cut-green-peppers" in option.values["asparagus"].replace_ops


def test_lanes_group_stations_that_share_capabilities(footwear: Catalog, restaurant: Catalog) -> None:
    assert footwear.lane_of("qc") == footwear.lane_of("pack") == "pack+qc"
    assert footwear.lane_of("stitching") == "stitching"
    assert {s.station_id for s in footwear.stations_in_lane("pack+qc")} == {"qc-1", "qc-2", "pack-1"}
    assert footwear.lane_of_station("qc-1") == footwear.lane_of_station("pack-1")
    assert all(restaurant.lane_of(c) == c for c in restaurant.lanes)


def test_operation_without_a_capable_station_is_a_catalog_error() -> None:
    raw = yaml.safe_load((CATALOGS / "restaurant.yaml").read_text())
    raw["stations"] = [s for s in raw["stations"] if "fryer" not in s.get("capabilities", [])]
    with pytest.raises(CatalogError, match="fryer"):
        catalog_from_dict(raw)


def test_unit_price_adds_option_deltas(restaurant: Catalog, footwear: Catalog) -> None:
    kp = restaurant.products["kung-pao-chicken"]
    custom = [
        {"kind": "SUBSTITUTE", "option_code": "vegetable", "value": "asparagus"},
        {"kind": "SELECT", "option_code": "spice", "value": "extra-spicy"},
    ]
    assert restaurant.unit_price(kp, custom) == kp.base_price + Decimal("2.00")
    runner = footwear.products["custom-runner"]
    monogram = [{"kind": "TEXT", "option_code": "monogram", "value": "JD"}]
    assert footwear.unit_price(runner, monogram) == runner.base_price + Decimal("9.00")
    assert footwear.unit_price(runner, [{**monogram[0], "value": ""}]) == runner.base_price


def test_handover_follows_neighbourhood_status_and_is_stable(restaurant: Catalog) -> None:
    assert restaurant.choose_handover("DELIVERY", "south", "o-1") == "bike-south"
    both = {restaurant.choose_handover("DELIVERY", "old-town", f"o-{i}") for i in range(50)}
    assert both == {"bike-north", "bike-centre"}  # spread over the couriers serving the area
    assert restaurant.choose_handover("DELIVERY", "old-town", "o-7") == restaurant.choose_handover(
        "DELIVERY", "old-town", "o-7"
    )
    assert restaurant.choose_handover("DELIVERY", "airport", "o-1") is None
    stations = dict(restaurant.stations)
    stations["bike-south"] = replace(stations["bike-south"], status="DOWN")
    down = Catalog(restaurant.name, restaurant.currency, restaurant.products, stations)
    assert down.choose_handover("DELIVERY", "south", "o-1") is None


@pytest.mark.parametrize("name", ["restaurant", "footwear"])
def test_catalog_round_trips_through_its_avro_records(name: str, request: pytest.FixtureRequest) -> None:
    catalog: Catalog = request.getfixturevalue(name)
    products, stations = catalog_to_avro(catalog, T0)
    products = [avro_round_trip("CatalogProduct", p) for p in products]
    stations = [avro_round_trip("Station", s) for s in stations]
    rebuilt = catalog_from_avro(catalog.name, products, stations)
    assert rebuilt == catalog
    assert rebuilt.lanes == catalog.lanes


def test_mixed_currencies_are_refused(restaurant: Catalog) -> None:
    products, stations = catalog_to_avro(restaurant, T0)
    products[0] = {**products[0], "currency": "USD"}
    with pytest.raises(CatalogError, match="currencies"):
        catalog_from_avro("mixed", products, stations)
