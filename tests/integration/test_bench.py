"""``pieceflow bench`` end to end, short: the report must be consistent. Latency numbers are not asserted.

The bench starts its own private stack (ports + 2000), workers and an instant station simulator as
child processes, and stops them all; the whole command is bounded by a subprocess timeout.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from streams.stack import LocalStack

BOUND = 480.0
LATENCY_KEYS = {"count", "p50", "p90", "p99", "p99_9", "max", "mean"}


def run_bench(tmp_path: Path, *args: str) -> dict:
    out = tmp_path / "bench.json"
    try:
        done = subprocess.run(
            [sys.executable, "-m", "streams", "bench", *args, "--output", str(out)],
            capture_output=True, text=True, timeout=BOUND, env=os.environ.copy(),
        )
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the bench did not finish within {BOUND:.0f}s:\n{(exc.stderr or b'')[-4000:]!r}")
    assert done.returncode == 0, f"bench failed ({done.returncode}):\n{done.stderr[-6000:]}"
    assert "placed_to_assigned p50" in done.stderr  # the human summary
    return json.loads(out.read_text())


def test_a_short_bench_reports_consistent_counts(stack: LocalStack, tmp_path: Path) -> None:
    report = run_bench(tmp_path, "--rate", "50", "--duration", "3", "--warmup", "1", "--drain-timeout", "240")

    assert report["bench"]["mode"] == "pipeline"
    assert report["bench"]["partitions"] >= 1
    assert report["machine"]["cpus"] >= 1
    counts = report["counts"]
    assert counts["warmup_sent"] == 50
    assert counts["measured_sent"] == 150
    assert counts["sent"] == counts["warmup_sent"] + counts["measured_sent"]
    assert counts["dispatched"] + counts["lost"] == counts["sent"]
    assert counts["lost"] == 0, report["drain"]
    assert counts["duplicated"] == 0
    assert counts["out_of_order"] == 0, report["out_of_order_examples"]
    assert counts["rejected"] == 0
    assert counts["send_failures"] == 0
    assert counts["assigned"] == counts["sent"]
    assert report["drain"]["complete"] is True

    latency = report["latency_ms"]
    for name in ("placed_to_assigned", "placed_to_dispatched", "send_delay"):
        assert set(latency[name]) >= LATENCY_KEYS, name
        assert latency[name]["count"] == counts["measured_sent"], name
        h = latency[name]
        assert h["p50"] <= h["p90"] <= h["p99"] <= h["p99_9"] <= h["max"], name
    assert report["throughput"]["sent_per_s"] > 0
    assert report["throughput"]["completed_per_s"] > 0
    names = {p["name"] for p in report["cpu"]["processes"]}
    assert {"worker-1", "simulator", "bench"} <= names
    assert all(p["cpu_s"] >= 0 for p in report["cpu"]["processes"])


def test_the_floor_measures_one_kafka_leg_with_no_worker(stack: LocalStack, tmp_path: Path) -> None:
    report = run_bench(tmp_path, "--null", "--workers", "0", "--rate", "200", "--duration", "2", "--warmup", "1")

    assert report["bench"]["mode"] == "floor"
    counts = report["counts"]
    assert counts["sent"] == counts["warmup_sent"] + counts["measured_sent"] == 600
    assert counts["assigned"] == counts["sent"] and counts["lost"] == 0
    assert counts["duplicated"] == counts["out_of_order"] == counts["send_failures"] == 0
    assert report["latency_ms"]["placed_to_assigned"]["count"] == counts["measured_sent"]
    assert report["latency_ms"]["placed_to_dispatched"] is None
    names = {p["name"] for p in report["cpu"]["processes"]}
    assert not any(name.startswith("worker") for name in names) and "bench" in names
