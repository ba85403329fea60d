"""The demo's lead-time report: numbers from the pipeline's own events, as JSON and as a plot."""

from __future__ import annotations

import json
import math
import statistics
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

PARTS = ("intake", "queue", "work", "sibling_wait", "dispatch")
# OrderStatus states after which nothing more happens to an order.
TERMINAL_STATES = ("DISPATCHED", "CANCELLED", "FAILED")


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); 0.0 for no values."""
    if not values:
        return 0.0
    ordered = sorted(values)
    rank = max(1, min(len(ordered), math.ceil(q / 100 * len(ordered))))
    return ordered[rank - 1]


def summary(values: Iterable[float]) -> dict[str, float]:
    data = list(values)
    return {
        "count": len(data),
        "mean": statistics.fmean(data) if data else 0.0,
        "p50": percentile(data, 50),
        "p95": percentile(data, 95),
        "p99": percentile(data, 99),
        "max": max(data, default=0.0),
    }


def policy_report(
    lead_times: Sequence[Mapping[str, Any]], time_scale: float, out_the_door: Mapping[str, float] | None = None
) -> dict[str, Any]:
    """Lead time per order and per stage, in catalog minutes (simulated time divided by the time scale).

    ``out_the_door`` optionally overrides when an order really left (couriers batching by
    neighbourhood), as seconds of wall time after dispatch.
    """
    scale = time_scale if time_scale > 0 else 1.0
    per_order = []
    for lead in lead_times:
        extra_ms = (out_the_door or {}).get(lead["order_id"], 0.0) * 1000
        lead_ms = lead["lead_time_ms"] + extra_ms
        work_ms = max(lead["critical_path_work_ms"], 1)
        per_order.append(
            {
                "order_id": lead["order_id"],
                "lead_minutes": lead_ms / scale / 60000,
                "work_minutes": work_ms / scale / 60000,
                "ratio": lead_ms / work_ms,
                **{f"{p}_minutes": (lead[f"{p}_ms"] + (extra_ms if p == "dispatch" else 0)) / scale / 60000
                   for p in PARTS},
            }
        )
    return {
        "orders": len(per_order),
        "lead_minutes": summary(o["lead_minutes"] for o in per_order),
        "work_minutes": summary(o["work_minutes"] for o in per_order),
        "lead_to_work_ratio": summary(o["ratio"] for o in per_order),
        "stages_minutes": {p: summary(o[f"{p}_minutes"] for o in per_order) for p in PARTS},
        "per_order": per_order,
    }


def rejection_counts(reasons: Iterable[str]) -> dict[str, int]:
    return dict(sorted(Counter(reasons).items()))


class Output(Protocol):
    """A pipeline record read back: where it was, its key (the order id), its type and its value."""

    @property
    def topic(self) -> str: ...

    @property
    def key(self) -> str: ...

    @property
    def type(self) -> str: ...

    @property
    def value(self) -> dict[str, Any]: ...


def outcomes(order_ids: Iterable[str], records: Iterable[Output]) -> dict[str, int]:
    """How each order ended: its last OrderStatus state, or REJECTED when its placement was refused.

    An order with neither is not counted: the caller reports it as lost.
    """
    last: dict[str, str] = {}
    refused = set()
    for record in records:
        if record.type == "OrderStatus":
            last[record.key] = record.value["state"]
        elif record.type == "OrderRejected" and record.value["request"] == "PLACE":
            refused.add(record.key)
    ended: Counter[str] = Counter()
    for order_id in order_ids:
        if last.get(order_id) in TERMINAL_STATES:
            ended[last[order_id]] += 1
        elif order_id in refused and order_id not in last:
            ended["REJECTED"] += 1
    return dict(sorted(ended.items()))


def seq_regressions(records: Iterable[Output]) -> int:
    """Records whose per-order ``seq`` does not increase on their topic, repeats of one event ignored."""
    last: dict[tuple[str, str], int] = {}
    seen: set[str] = set()
    regressions = 0
    for record in records:
        event_id = record.value["event_id"]
        if event_id in seen:
            continue  # an at-least-once repeat of an event already counted
        seen.add(event_id)
        key = (record.topic, record.key)
        if key in last and record.value["seq"] <= last[key]:
            regressions += 1
        last[key] = max(record.value["seq"], last.get(key, record.value["seq"]))
    return regressions


def write_json(report: Mapping[str, Any], path: Path) -> None:
    path.write_text(json.dumps(report, indent=2, default=str))


def plot(report: Mapping[str, Any], path: Path) -> None:
    """Lead-time distribution and per-stage breakdown, one column per policy."""
    import matplotlib

    matplotlib.use("Agg")  # no display: write the file only
    import matplotlib.pyplot as plt

    policies = report["policies"]
    fig, axes = plt.subplots(2, 1, figsize=(9, 8))
    for name, data in policies.items():
        leads = [o["lead_minutes"] for o in data["per_order"]]
        axes[0].hist(leads, bins=20, alpha=0.6, label=f"{name} (p50 {data['lead_minutes']['p50']:.1f} min)")
    axes[0].set_title(f"Lead time per order ({report['scenario']}, catalog minutes)")
    axes[0].set_xlabel("minutes from placed to out the door")
    axes[0].set_ylabel("orders")
    axes[0].legend()
    width = 0.8 / max(1, len(policies))
    for i, data in enumerate(policies.values()):
        bottoms = 0.0
        for part in PARTS:
            value = data["stages_minutes"][part]["p50"]
            axes[1].bar(i, value, width, bottom=bottoms, label=part if i == 0 else None)
            bottoms += value
    axes[1].set_xticks(range(len(policies)), list(policies))
    axes[1].set_title("Median lead time by stage")
    axes[1].set_ylabel("minutes")
    axes[1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
