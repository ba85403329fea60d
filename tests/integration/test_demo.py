"""``pieceflow demo`` end to end, short, with both policies: the report must add up. Lead times are not asserted.

The demo runs as the README's first command does, against the suite's local stack: it starts its own
worker and station simulator, places orders, waits for every one to end, and stops what it started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from confluent_kafka.admin import AdminClient

from streams.stack import LocalStack

BOUND = 480.0
ORDERS = 12


def test_a_short_demo_accounts_for_every_order(stack: LocalStack, admin: AdminClient, tmp_path: Path) -> None:
    command = [sys.executable, "-m", "streams", "demo", "--orders", str(ORDERS), "--rate", "6",
               "--time-scale", "0.0005", "--policy", "batch", "--output-dir", str(tmp_path)]
    env = {**os.environ, "PIECEFLOW_DEMO_METRICS_PORT": "0"}
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=BOUND, env=env)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"the demo did not finish within {BOUND:.0f}s:\n{(exc.stderr or b'')[-4000:]!r}")
    assert done.returncode == 0, f"demo failed ({done.returncode}):\n{done.stderr[-6000:]}"
    assert "Lead-time report" in done.stdout

    result = json.loads((tmp_path / "report.json").read_text())
    assert (tmp_path / "report.png").stat().st_size > 0
    assert set(result["policies"]) == {"one-piece flow", "batching"}
    for name, policy in result["policies"].items():
        assert policy["placed"] == ORDERS, name
        assert policy["lost"] == 0, name
        assert sum(policy["outcomes"].values()) == ORDERS, (name, policy["outcomes"])
        assert policy["out_of_order"] == 0, name
        assert policy["dispatched"] == policy["outcomes"].get("DISPATCHED", 0) == policy["orders"], name
        assert policy["outcomes"].get("REJECTED", 0) <= sum(policy["rejections"].values()), name
        assert len(policy["per_order"]) == policy["dispatched"], name
        for order in policy["per_order"]:
            assert order["lead_minutes"] > 0 and order["work_minutes"] > 0, order

    # Nothing it started is left running: its worker left the group.
    (group,) = admin.describe_consumer_groups(["pieceflow-demo"]).values()
    assert group.result(timeout=10).members == []
