from __future__ import annotations

import json
import random
from datetime import UTC, datetime, timedelta
from typing import Any

from streams.catalog import Catalog
from streams.events import Event, new_event_id
from streams.stages.assignment import LaneState, handle

T0 = datetime(2025, 3, 14, 18, 0, tzinfo=UTC)
S = timedelta(seconds=1)


def request(
    op_id: str, capability: str, seconds: int, *, rush: bool = False, release: datetime = T0, attempt: int = 1
) -> dict[str, Any]:
    return {
        "event_id": new_event_id(),
        "order_id": f"order-{op_id}",
        "seq": 1,
        "occurred_at": T0,
        "recorded_at": T0,
        "causation_id": None,
        "op_id": op_id,
        "work_item_id": f"wi-{op_id}",
        "op_code": "do",
        "capability": capability,
        "lane": capability,
        "est_duration_ms": seconds * 1000,
        "rush": rush,
        "placed_at": T0,
        "release_at": release,
        "attempt": attempt,
    }


def station_event(station_id: str, status: str, capabilities: list[str], capacity: int = 1) -> dict[str, Any]:
    return {
        "event_id": new_event_id(),
        "order_id": "",
        "seq": 1,
        "occurred_at": T0,
        "recorded_at": T0,
        "causation_id": None,
        "station_id": station_id,
        "status": status,
        "capabilities": capabilities,
        "capacity": capacity,
        "reason": None,
    }


def mes(op_id: str, station_id: str, started: datetime, ended: datetime | None = None) -> dict[str, Any]:
    return {
        "event_id": new_event_id(),
        "order_id": f"order-{op_id}",
        "seq": 1,
        "occurred_at": started,
        "recorded_at": started,
        "causation_id": None,
        "op_id": op_id,
        "work_item_id": f"wi-{op_id}",
        "capability": "wok",
        "station_id": station_id,
        "started_at": started,
        "completed_at": ended,
        "operator_ref": None,
    }


def assign(lane: LaneState, value: dict[str, Any], now: datetime = T0) -> dict[str, Any]:
    [event] = handle(lane, "OperationRequested", value, now)
    assert event.type == "OperationAssigned" and event.key == event.value["station_id"]
    return event.value


def queue_ids(lane: LaneState, station_id: str) -> list[str]:
    return [q.op_id for q in lane.stations[station_id].queue]


def single_wok(restaurant: Catalog) -> LaneState:
    lane = LaneState.for_lane(restaurant, "wok")
    for sid in ("wok-2", "wok-3"):
        handle(lane, "StationStatusChanged", station_event(sid, "DOWN", ["wok"]), T0)
    return lane


def test_least_expected_finish_spreads_work_then_queues(restaurant: Catalog) -> None:
    lane = LaneState.for_lane(restaurant, "wok")
    first = [assign(lane, request(f"a{i}", "wok", 240)) for i in range(3)]
    assert sorted(a["station_id"] for a in first) == ["wok-1", "wok-2", "wok-3"]
    assert all(a["predicted_start"] == T0 and a["queue_depth_at_assign"] == 0 for a in first)
    fourth = assign(lane, request("a3", "wok", 240))
    assert fourth["queue_depth_at_assign"] == 1
    assert fourth["predicted_start"] == T0 + 240 * S
    assert fourth["predicted_end"] == T0 + 480 * S


def test_choice_is_by_predicted_finish_not_queue_length(restaurant: Catalog) -> None:
    lane = LaneState.for_lane(restaurant, "prep")
    long_op = assign(lane, request("long", "prep", 600))
    shorts = [assign(lane, request(f"s{i}", "prep", 60)) for i in range(3)]
    other = ({"prep-1", "prep-2"} - {long_op["station_id"]}).pop()
    assert {s["station_id"] for s in shorts} == {other}
    assert len(queue_ids(lane, other)) == 3 > len(queue_ids(lane, long_op["station_id"]))
    assert shorts[-1]["predicted_end"] < long_op["predicted_end"]


def test_fifo_per_station_with_increasing_predictions(restaurant: Catalog) -> None:
    lane = single_wok(restaurant)
    assigned = [assign(lane, request(f"o{i}", "wok", 100)) for i in range(4)]
    assert queue_ids(lane, "wok-1") == ["o0", "o1", "o2", "o3"]
    assert [a["queue_position"] for a in assigned] == [0, 1, 2, 3]
    assert [a["reason"] for a in assigned] == ["INITIAL"] * 4
    starts = [a["predicted_start"] for a in assigned]
    assert starts == sorted(starts) and len(set(starts)) == 4


def test_rush_goes_ahead_of_non_rush_and_is_recorded(restaurant: Catalog) -> None:
    lane = single_wok(restaurant)
    for i in range(3):
        assign(lane, request(f"n{i}", "wok", 100))
    handle(lane, "OperationStarted", mes("n0", "wok-1", T0), T0)  # a started op cannot be overtaken
    r1 = assign(lane, request("r1", "wok", 50, rush=True))
    r2 = assign(lane, request("r2", "wok", 50, rush=True))
    late = assign(lane, request("n3", "wok", 100))
    assert queue_ids(lane, "wok-1") == ["r1", "r2", "n1", "n2", "n3"]
    assert (r1["reason"], r1["rush"], r1["queue_position"], r1["queue_depth_at_assign"]) == (
        "RUSH",
        True,
        0,
        2,
    )
    assert r1["overtaken_op_ids"] == ["n1", "n2"]
    assert r2["queue_position"] == 1 and r2["overtaken_op_ids"] == ["n1", "n2"]
    assert (late["reason"], late["overtaken_op_ids"], late["queue_position"]) == ("INITIAL", [], 4)
    assert r1["predicted_start"] == T0 + 100 * S  # after the running op


def test_rush_behind_nothing_is_not_an_exception(restaurant: Catalog) -> None:
    lane = LaneState.for_lane(restaurant, "wok")
    a = assign(lane, request("r", "wok", 50, rush=True))
    assert (a["reason"], a["rush"], a["overtaken_op_ids"]) == ("INITIAL", True, [])


def test_capacity_slots_and_release_time(restaurant: Catalog) -> None:
    lane = LaneState.for_lane(restaurant, "fryer")
    assigned = [assign(lane, request(f"f{i}", "fryer", 180)) for i in range(4)]
    assert all(a["predicted_start"] == T0 for a in assigned)  # 2 fryers x capacity 2
    fifth = assign(lane, request("f4", "fryer", 180))
    assert fifth["predicted_start"] == T0 + 180 * S
    held = assign(lane, request("f5", "fryer", 180, release=T0 + 600 * S))
    assert held["predicted_start"] == T0 + 600 * S


def test_station_down_moves_unstarted_queue_with_reason(restaurant: Catalog) -> None:
    lane = LaneState.for_lane(restaurant, "wok")
    handle(lane, "StationStatusChanged", station_event("wok-3", "DOWN", ["wok"]), T0)
    for i in range(4):
        assign(lane, request(f"o{i}", "wok", 100))
    handle(lane, "OperationStarted", mes("o0", "wok-1", T0), T0)
    queued_at_wok1 = queue_ids(lane, "wok-1")
    assert queued_at_wok1  # something waits behind the running op
    events = handle(lane, "StationStatusChanged", station_event("wok-1", "DOWN", ["wok"]), T0 + S)
    moved = [e.value for e in events if e.type == "OperationAssigned"]
    left = [e for e in events if e.type == "OperationUnassigned"]
    assert [m["op_id"] for m in moved] == queued_at_wok1
    assert all(m["reason"] == "STATION_DOWN" and m["previous_station_id"] == "wok-1" for m in moved)
    assert all(m["station_id"] == "wok-2" for m in moved)
    assert [(e.key, e.value["op_id"], e.value["next_station_id"]) for e in left] == [
        ("wok-1", op, "wok-2") for op in queued_at_wok1
    ]
    assert queue_ids(lane, "wok-1") == []
    assert [r.op_id for r in lane.stations["wok-1"].running] == ["o0"]  # started work stays


def test_no_station_up_waits_then_assigns_when_one_comes_up(restaurant: Catalog) -> None:
    lane = LaneState.for_lane(restaurant, "expo")
    for sid in ("expo-1", "expo-2"):
        handle(lane, "StationStatusChanged", station_event(sid, "DOWN", ["expo"]), T0)
    assert handle(lane, "OperationRequested", request("w1", "expo", 30), T0) == []
    assert handle(lane, "OperationRequested", request("w2", "expo", 30), T0) == []
    events = handle(lane, "StationStatusChanged", station_event("expo-2", "UP", ["expo"]), T0 + S)
    assert [(e.value["op_id"], e.value["reason"], e.key) for e in events] == [
        ("w1", "STATION_UP", "expo-2"),
        ("w2", "STATION_UP", "expo-2"),
    ]
    assert lane.waiting == []


def test_paused_station_takes_no_new_work_but_keeps_queue(restaurant: Catalog) -> None:
    lane = LaneState.for_lane(restaurant, "prep")
    a = assign(lane, request("p0", "prep", 60))
    assert handle(lane, "StationStatusChanged", station_event(a["station_id"], "PAUSED", ["prep"]), T0) == []
    assert queue_ids(lane, a["station_id"]) == ["p0"]
    assert all(assign(lane, request(f"p{i}", "prep", 60))["station_id"] != a["station_id"] for i in (1, 2))


def test_started_and_completed_update_the_queue_and_free_time(restaurant: Catalog) -> None:
    lane = single_wok(restaurant)
    assign(lane, request("a", "wok", 100))
    assign(lane, request("b", "wok", 100))
    handle(lane, "OperationStarted", mes("a", "wok-1", T0 + 10 * S), T0 + 10 * S)
    assert queue_ids(lane, "wok-1") == ["b"]
    handle(lane, "OperationCompleted", mes("a", "wok-1", T0 + 10 * S, T0 + 50 * S), T0 + 50 * S)
    assert lane.stations["wok-1"].running == []
    c = assign(lane, request("c", "wok", 100), now=T0 + 50 * S)
    assert c["predicted_start"] == T0 + 150 * S  # behind b, which can start now
    assert handle(lane, "OperationRequested", request("a", "wok", 100), T0 + 60 * S) == []  # replay
    retry = assign(lane, request("a", "wok", 100, attempt=2), now=T0 + 60 * S)
    assert retry["attempt"] == 2


def test_revoked_operation_leaves_the_queue_and_stays_out(restaurant: Catalog) -> None:
    lane = single_wok(restaurant)
    assign(lane, request("a", "wok", 100))
    assign(lane, request("b", "wok", 100))
    revoke = {**request("a", "wok", 100), "event_id": new_event_id(), "reason": "CANCELLATION"}
    [event] = handle(lane, "OperationRevoked", revoke, T0)
    assert (event.type, event.key, event.value["reason"]) == ("OperationUnassigned", "wok-1", "REVOKED")
    assert queue_ids(lane, "wok-1") == ["b"]
    assert handle(lane, "OperationRequested", request("a", "wok", 100), T0) == []


def test_multi_capability_station_lives_in_one_lane_and_only_does_its_capabilities(footwear: Catalog) -> None:
    work = [s.station_id for s in footwear.stations.values() if s.kind == "WORK"]
    lanes = {
        lane: {s.station_id for s in footwear.stations_in_lane(lane)} for lane in set(footwear.lanes.values())
    }
    assert sorted(sid for members in lanes.values() for sid in members) == sorted(work)  # a partition
    lane = LaneState.for_lane(footwear, footwear.lane_of("qc"))
    for i in range(6):
        value = {**request(f"q{i}", "qc", 100), "lane": lane.lane}
        assert assign(lane, value)["station_id"] in {"qc-1", "qc-2"}
    packed = assign(lane, {**request("pk", "pack", 60), "lane": lane.lane})
    assert packed["station_id"] == "pack-1"  # qc-1 can pack but is busy with qc work


def test_no_double_booking_and_per_station_seq_under_churn(restaurant: Catalog) -> None:
    rng = random.Random(7)
    lane = LaneState.for_lane(restaurant, "wok")
    now = T0
    events: list[Event] = []
    started: list[tuple[str, str]] = []
    for i in range(300):
        now += S
        roll = rng.random()
        if roll < 0.5:
            events += handle(
                lane,
                "OperationRequested",
                request(f"x{i}", "wok", rng.randint(10, 300), rush=rng.random() < 0.2),
                now,
            )
        elif roll < 0.7:
            queued = [(q.op_id, sid) for sid, s in lane.stations.items() for q in s.queue[:1]]
            if queued:
                op_id, sid = rng.choice(queued)
                events += handle(lane, "OperationStarted", mes(op_id, sid, now), now)
                started.append((op_id, sid))
        elif roll < 0.85 and started:
            op_id, sid = started.pop(0)
            events += handle(lane, "OperationCompleted", mes(op_id, sid, now, now), now)
        else:
            sid = rng.choice(["wok-1", "wok-2", "wok-3"])
            status = rng.choice(["UP", "DOWN"])
            events += handle(lane, "StationStatusChanged", station_event(sid, status, ["wok"]), now)
        lane = LaneState.from_dict(json.loads(json.dumps(lane.to_dict())))
        holders = [q.op_id for s in lane.stations.values() for q in s.queue]
        holders += [r.op_id for s in lane.stations.values() for r in s.running]
        holders += [q.op_id for q in lane.waiting]
        assert len(holders) == len(set(holders)), "an operation is held twice"
        for s in lane.stations.values():
            rush_flags = [q.rush for q in s.queue]
            assert rush_flags == sorted(rush_flags, reverse=True), "rush ops must lead the queue"
            if s.status == "DOWN":
                assert s.queue == []
    per_station: dict[str, list[int]] = {}
    for e in events:
        per_station.setdefault(e.key, []).append(e.value["seq"])
    assert all(seqs == sorted(set(seqs)) for seqs in per_station.values())
    assert any(e.value.get("reason") == "STATION_DOWN" for e in events)
