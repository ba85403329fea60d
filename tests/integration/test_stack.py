"""The local stack's lifecycle, on a private stack so the shared one is never disturbed."""

from __future__ import annotations

import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import pytest
from confluent_kafka import Producer
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic

from streams.settings import Settings
from streams.stack import LocalStack
from tests.conftest import wait_until


def _stack_env(stack: LocalStack) -> dict[str, str]:
    s = stack.settings
    return {
        **os.environ,
        "PIECEFLOW_HOME": str(s.home),
        "PIECEFLOW_KAFKA_PORT": str(s.kafka_port),
        "PIECEFLOW_REGISTRY_PORT": str(s.registry_port),
        "PIECEFLOW_REGISTRY_MANAGEMENT_PORT": str(s.registry_management_port),
    }


def _cli(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streams", *args],
        env=_stack_env(stack), capture_output=True, text=True, timeout=180, check=False,
    )


def test_up_twice_says_already_up_and_status_is_healthy(fault_stack: LocalStack) -> None:
    second = _cli(fault_stack, "stack", "up")
    assert second.returncode == 0, second.stderr
    assert "already up" in second.stdout
    status = _cli(fault_stack, "stack", "status")
    assert status.returncode == 0, status.stdout + status.stderr
    lines = status.stdout.splitlines()
    assert any(line.startswith("kafka-1") and "healthy" in line and "4.4.0" in line for line in lines)
    assert any(line.startswith("registry") and "healthy" in line for line in lines)
    for component in fault_stack.status():
        assert component.pid is not None and Path(f"/proc/{component.pid}").exists()


def test_killed_broker_fails_producers_within_bounds_and_restarts(fault_stack: LocalStack) -> None:
    fault_stack.kill_broker(1)
    wait_until(lambda: not fault_stack.kafka_ready(1, timeout=1.0), 30, "the killed broker to stop answering")
    status = _cli(fault_stack, "stack", "status")
    assert status.returncode == 1
    assert "stopped" in status.stdout

    producer = Producer({"bootstrap.servers": fault_stack.bootstrap(), "message.timeout.ms": 3000})
    errors: list[str] = []
    producer.produce("any", b"x", on_delivery=lambda err, _msg: errors.append(str(err)))
    assert producer.flush(15) == 0
    assert errors and "timed out" in errors[0].lower()

    fault_stack.start_broker(1)
    assert fault_stack.kafka_ready(1)


def test_down_stops_every_jvm_it_started(fault_stack: LocalStack) -> None:
    pids = [c.pid for c in fault_stack.status() if c.pid is not None]
    assert pids
    stopped = _cli(fault_stack, "stack", "down")
    assert stopped.returncode == 0
    for pid in pids:
        wait_until(partial(_gone, pid), 30, f"pid {pid} to exit")
    assert all(not c.running for c in fault_stack.status())
    # Data is kept: the next `up` reuses the formatted storage.
    assert any((fault_stack.home / "kafka").rglob("meta.properties"))
    again = _cli(fault_stack, "stack", "up")
    assert again.returncode == 0, again.stderr
    assert "Stack is up" in again.stdout


def _gone(pid: int) -> bool:
    return not Path(f"/proc/{pid}").exists() or _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] == "Z"
    except OSError:
        return True


def test_a_three_node_cluster_keeps_writing_with_one_broker_down(
    settings: Settings, tmp_path_factory: pytest.TempPathFactory
) -> None:
    home = tmp_path_factory.mktemp("cluster-3")
    shared = LocalStack(settings)
    shared.assemble()
    (home / "dist").symlink_to(shared.dist)
    private = settings.model_copy(update={
        "home": home, "kafka_port": settings.kafka_port + 3000, "registry_port": settings.registry_port + 3000,
        "registry_management_port": settings.registry_management_port + 3000, "kafka_heap": "256m",
    })
    cluster = LocalStack(private)
    try:
        cluster.up(cluster=3)
        admin = AdminClient({"bootstrap.servers": cluster.bootstrap()})
        admin.create_topics([NewTopic("replicated", 3, 3)])["replicated"].result(timeout=30)

        def replicated() -> object:
            # A new topic reaches each broker's metadata cache a moment after creation returns.
            meta = admin.list_topics(timeout=10)
            topic = meta.topics.get("replicated")
            ready = len(meta.brokers) == 3 and topic is not None and len(topic.partitions) == 3
            return ready and topic is not None and all(
                len(p.replicas) == 3 and len(p.isrs) == 3 for p in topic.partitions.values()
            )

        wait_until(replicated, 30, "three partitions with three in-sync replicas each on three brokers")
        configs = admin.describe_configs([ConfigResource("topic", "replicated")])
        assert next(iter(configs.values())).result()["min.insync.replicas"].value == "2"

        cluster.kill_broker(3)
        producer = Producer({"bootstrap.servers": cluster.bootstrap(), "acks": "all", "message.timeout.ms": 30000})
        errors: list[object] = []
        for i in range(20):
            producer.produce("replicated", f"v{i}".encode(), key=f"k{i}".encode(),
                             on_delivery=lambda err, _msg: errors.append(err) if err else None)
        assert producer.flush(40) == 0
        assert errors == []
    finally:
        cluster.down(purge=True)
