from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from streams.catalog import Catalog
from streams.stages.expansion import ExpansionState, expand, plan_unit
from streams.stages.validation import ValidationState, validate

T0 = datetime(2025, 3, 14, 18, 0, tzinfo=UTC)


def accepted(catalog: Catalog, order: dict[str, Any]) -> dict[str, Any]:
    [decision] = validate(ValidationState(), "OrderPlaced", order, catalog, T0)
    assert decision.type == "OrderAccepted", decision.value.get("detail")
    return decision.value


def planned(catalog: Catalog, order: dict[str, Any]) -> list[dict[str, Any]]:
    events = expand(ExpansionState(), accepted(catalog, order), catalog, T0)
    assert {(e.type, e.key) for e in events} == {("WorkItemPlanned", order["order_id"])}
    return [e.value for e in events]


def durations(item: dict[str, Any]) -> dict[str, int]:
    return {op["op_code"]: op["est_duration_ms"] for op in item["operations"]}


def test_one_work_item_per_unit_of_each_line(restaurant: Catalog, make_order: Any) -> None:
    order = make_order(
        restaurant, [("kung-pao-chicken", 3, []), ("spring-rolls", 2, []), ("mapo-tofu", 1, [])]
    )
    items = planned(restaurant, order)
    assert len(items) == 6
    assert len({i["work_item_id"] for i in items}) == 6
    assert all(i["item_count"] == 6 for i in items)
    assert [(i["line_index"], i["unit_index"]) for i in items] == [
        (0, 0),
        (0, 1),
        (0, 2),
        (1, 0),
        (1, 1),
        (2, 0),
    ]
    assert [i["seq"] for i in items] == sorted({i["seq"] for i in items})


def test_operations_follow_the_recipe_in_sequence(restaurant: Catalog, make_order: Any) -> None:
    [item] = planned(restaurant, make_order(restaurant, [("kung-pao-chicken", 1, [])]))
    recipe = restaurant.products["kung-pao-chicken"].operations
    ops = item["operations"]
    assert [o["op_code"] for o in ops] == [o.op_code for o in recipe]
    assert [o["sequence"] for o in ops] == list(range(len(ops)))
    assert ops[0]["depends_on"] == []
    assert all(ops[i]["depends_on"] == [ops[i - 1]["op_id"]] for i in range(1, len(ops)))
    assert all(o["lane"] == restaurant.lane_of(o["capability"]) for o in ops)
    assert item["est_path_ms"] == sum(o.duration_ms for o in recipe)


def test_substitution_replaces_operation_duration_and_bom(restaurant: Catalog, make_order: Any) -> None:
    plain, asparagus = planned(
        restaurant,
        make_order(
            restaurant,
            [
                ("kung-pao-chicken", 1, []),
                ("kung-pao-chicken", 1, [("SUBSTITUTE", "vegetable", "asparagus")]),
            ],
        ),
    )
    option = restaurant.products["kung-pao-chicken"].options["vegetable"].values["asparagus"]
    replacement = option.replace_ops["cut-green-peppers"]
    assert "cut-green-peppers" in durations(plain) and "cut-green-peppers" not in durations(asparagus)
    assert durations(asparagus)[replacement.op_code] == replacement.duration_ms
    assert asparagus["est_path_ms"] - plain["est_path_ms"] == (
        replacement.duration_ms - durations(plain)["cut-green-peppers"]
    )
    components = {b["component"] for b in asparagus["bom"]}
    assert "asparagus" in components and "green-pepper" not in components


def test_add_remove_and_extra_duration(restaurant: Catalog, make_order: Any) -> None:
    [base] = planned(restaurant, make_order(restaurant, [("kung-pao-chicken", 1, [])], external_id="a"))
    custom = [
        ("ADD", "extra", "fried-egg"),
        ("SELECT", "spice", "extra-spicy"),
        ("REMOVE", "without", "peanuts"),
    ]
    [item] = planned(restaurant, make_order(restaurant, [("kung-pao-chicken", 1, custom)], external_id="b"))
    codes = [o["op_code"] for o in item["operations"]]
    assert codes.index("fry-egg") == codes.index("cut-green-peppers") + 1
    assert durations(item)["wok-fry"] == durations(base)["wok-fry"] + 30000
    assert "peanuts" not in {b["component"] for b in item["bom"]}


def test_monogram_text_adds_a_stitch_operation_priced_per_character(footwear: Catalog) -> None:
    product = footwear.products["custom-runner"]

    def monogrammed(text: str) -> dict[str, int]:
        chosen = [("SELECT", "size", "42"), ("SELECT", "upper-colour", "black"), ("TEXT", "monogram", text)]
        ops, _ = plan_unit(product, [{"kind": k, "option_code": o, "value": v} for k, o, v in chosen])
        assert [op.spec.op_code for op in ops].index("embroider-monogram") == 3  # after stitch-upper
        return {op.spec.op_code: op.duration_ms for op in ops}

    per_char = product.options["monogram"].values["*"].add_ops[0].per_char_ms
    assert (
        monogrammed("ABCDEF")["embroider-monogram"] - monogrammed("AB")["embroider-monogram"] == 4 * per_char
    )


def test_fire_offsets_make_items_finish_together(restaurant: Catalog, make_order: Any) -> None:
    items = planned(
        restaurant, make_order(restaurant, [("kung-pao-chicken", 1, []), ("egg-fried-rice", 2, [])])
    )
    longest = max(i["est_path_ms"] for i in items)
    for i in items:
        assert i["fire_offset_ms"] == longest - i["est_path_ms"]
        assert i["operations"][0]["fire_offset_ms"] == i["fire_offset_ms"]
        assert all(o["fire_offset_ms"] == 0 for o in i["operations"][1:])
        assert i["fire_offset_ms"] + i["est_path_ms"] == longest
    assert min(i["fire_offset_ms"] for i in items) == 0
    assert any(i["fire_offset_ms"] > 0 for i in items)


def test_replayed_acceptance_is_not_expanded_twice_but_an_amendment_is(
    restaurant: Catalog, make_order: Any
) -> None:
    state = ExpansionState()
    decision = accepted(restaurant, make_order(restaurant, [("spring-rolls", 2, [])]))
    first = expand(state, decision, restaurant, T0)
    assert expand(state, decision, restaurant, T0) == []
    amended = {**decision, "event_id": "amend-1", "revision": 2, "change": "AMENDED"}
    second = expand(ExpansionState.from_dict(state.to_dict()), amended, restaurant, T0)
    assert len(second) == 2
    assert {e.value["revision"] for e in second} == {2}
    assert {e.value["work_item_id"] for e in first}.isdisjoint(e.value["work_item_id"] for e in second)
    assert min(e.value["seq"] for e in second) > max(e.value["seq"] for e in first)
