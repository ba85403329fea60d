"""Helpers for pipeline tests: read output topics in the background, run workers as processes."""

from __future__ import annotations

from collections import defaultdict

from streams.readback import Collector, Record
from streams.workers import WorkerProcess

__all__ = ["Collector", "Record", "WorkerProcess", "seq_violations"]


def seq_violations(records: list[Record]) -> list[str]:
    """Per key and topic, seq must strictly increase in offset order (gaps allowed)."""
    last: dict[tuple[str, str], int] = defaultdict(lambda: -1)
    problems = []
    for r in sorted(records, key=lambda r: (r.topic, r.partition, r.offset)):
        key = (r.topic, r.key)
        if r.value["seq"] <= last[key]:
            problems.append(f"{r.topic} {r.key}: seq {r.value['seq']} after {last[key]}")
        last[key] = r.value["seq"]
    return problems
