"""Stage state survives the table round trip (JSON), and the fast to_dict matches a full deep copy."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from streams.catalog import Catalog
from streams.stages.assignment import LaneState
from streams.stages.dispatch import OrderProgress
from tests.unit.conftest import T0


def test_lane_and_order_state_round_trip(restaurant: Catalog, pipeline: Any, make_order: Any) -> None:
    p = pipeline(restaurant)
    order = make_order(restaurant, [("kung-pao-chicken", 2, [("ADD", "extra", "fried-egg")])])
    p.send("OrderPlaced", order, T0)
    first = p.requested()[0]["op_id"]
    p.mes("OperationStarted", first, T0 + timedelta(seconds=1))
    assert p.lanes and p.progress
    for lane in p.lanes.values():
        as_json = json.loads(json.dumps(lane.to_dict()))
        assert lane.to_dict() == asdict(lane)
        assert LaneState.from_dict(as_json) == lane
    for progress in p.progress.values():
        as_json = json.loads(json.dumps(progress.to_dict()))
        assert progress.to_dict() == asdict(progress)
        assert OrderProgress.from_dict(as_json) == progress


def test_to_dict_is_a_copy(restaurant: Catalog, pipeline: Any, make_order: Any) -> None:
    p = pipeline(restaurant)
    p.send("OrderPlaced", make_order(restaurant, [("mapo-tofu", 1, [])]), T0)
    lane = next(iter(p.lanes.values()))
    saved = lane.to_dict()
    before = json.dumps(saved, sort_keys=True)
    for station in lane.stations.values():
        station.queue.clear()
    lane.finished["x"] = 1
    assert json.dumps(saved, sort_keys=True) == before
