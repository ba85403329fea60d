"""The demo report's arithmetic: percentiles, unit conversion, courier waits."""

from __future__ import annotations

from typing import Any

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
