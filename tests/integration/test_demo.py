"""``pieceflow demo`` end to end, short, with both policies: the report must add up. Lead times are not asserted.

The demo runs as the README's first command does, against the suite's local stack: it starts its own
worker and station simulator, places orders, waits for every one to end, and stops what it started.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient

from streams.codec import AvroRegistry
from streams.readback import Collector
from streams.stack import LocalStack
from streams.topics import ensure_topics, start_group_at_end
from streams.topology import DEAD_LETTERS, ORDERS_INBOUND, TOPICS

BOUND = 480.0
ORDERS = 12


def test_a_short_demo_accounts_for_every_order(stack: LocalStack, admin: AdminClient, tmp_path: Path) -> None:
    # An earlier demo committed, then other work wrote to the shared topics: the demo must not process that.
    settings = stack.client_settings()
    ensure_topics(TOPICS, settings)
    start_group_at_end("pieceflow-demo", [ORDERS_INBOUND.name], settings, even_if_committed=True)
    foreign_key = f"not-the-demos-{uuid.uuid4().hex[:8]}"
    producer = Producer(settings.kafka_config())
    producer.produce(ORDERS_INBOUND.name, key=foreign_key, value=b"not avro")
    assert producer.flush(10) == 0
    dead_letters = Collector(settings, AvroRegistry.from_url(settings.schema_registry_url), [DEAD_LETTERS.name])

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

    dead_letters.close()
    assert not dead_letters.where(topic=DEAD_LETTERS.name, key=foreign_key), "the demo processed earlier history"

    # Nothing it started is left running: its worker left the group.
    (group,) = admin.describe_consumer_groups(["pieceflow-demo"]).values()
    assert group.result(timeout=10).members == []
