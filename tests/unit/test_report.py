"""The demo report's arithmetic: percentiles, unit conversion, courier waits, how orders ended."""

from __future__ import annotations

from typing import Any

from streams import report
from streams.readback import Record
from streams.report import percentile, policy_report, rejection_counts, summary


def lead(order_id: str, **ms: int) -> dict[str, Any]:
    parts = {"intake_ms": 0, "queue_ms": 0, "work_ms": 0, "sibling_wait_ms": 0, "dispatch_ms": 0, **ms}
    total = sum(parts.values())
    return {"order_id": order_id, "lead_time_ms": total, "critical_path_work_ms": parts["work_ms"], **parts}


def test_nearest_rank_percentiles() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 50) == 50.0
    assert percentile(values, 99) == 99.0
    assert percentile(values, 100) == 100.0
    assert percentile([], 50) == 0.0
    assert summary([3.0, 1.0, 2.0])["max"] == 3.0


def test_minutes_are_catalog_minutes() -> None:
    # 1.2 s of wall time at time scale 0.002 is 10 catalog minutes.
    report = policy_report([lead("a", work_ms=1200)], time_scale=0.002)
    assert report["lead_minutes"]["p50"] == 10.0
    assert report["lead_to_work_ratio"]["p50"] == 1.0


def test_courier_wait_adds_to_dispatch_and_lead_time() -> None:
    report = policy_report([lead("a", work_ms=600, queue_ms=600)], time_scale=0.002, out_the_door={"a": 1.2})
    order = report["per_order"][0]
    assert order["dispatch_minutes"] == 10.0
    assert order["lead_minutes"] == 20.0
    assert order["ratio"] == 4.0


def test_rejections_are_counted_by_reason() -> None:
    assert rejection_counts(["PRICE_MISMATCH", "UNKNOWN_SKU", "PRICE_MISMATCH"]) == {
        "PRICE_MISMATCH": 2,
        "UNKNOWN_SKU": 1,
    }


def out(topic: str, key: str, kind: str, value: dict[str, Any]) -> Record:
    return Record(topic, key, kind, value, {}, b"", 0, 0)


def status(order_id: str, state: str, seq: int) -> Record:
    value = {"event_id": f"{order_id}-s{seq}", "seq": seq, "state": state}
    return out("orders.status.v1", order_id, "OrderStatus", value)


def test_outcomes_count_how_each_order_ended_and_leave_out_the_lost() -> None:
    records = [
        status("a", "PLANNED", 1), status("a", "DISPATCHED", 2),
        status("b", "IN_PROGRESS", 1), status("b", "CANCELLED", 2),
        out("orders.decisions.v1", "c", "OrderRejected", {"event_id": "c-r", "seq": 1, "request": "PLACE"}),
        out("orders.decisions.v1", "a", "OrderRejected", {"event_id": "a-r", "seq": 2, "request": "AMEND"}),
        status("d", "IN_PROGRESS", 1),  # never ended
    ]
    ended = report.outcomes(["a", "b", "c", "d", "e"], records)
    assert ended == {"CANCELLED": 1, "DISPATCHED": 1, "REJECTED": 1}  # d and e are lost


def test_seq_regressions_ignore_repeats_of_one_event() -> None:
    first, second = status("a", "PLANNED", 1), status("a", "IN_PROGRESS", 2)
    assert report.seq_regressions([first, second, second, status("b", "PLANNED", 1)]) == 0
    assert report.seq_regressions([second, first]) == 1
