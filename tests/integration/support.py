"""Helpers for pipeline tests: read output topics in the background, run workers as processes."""

from __future__ import annotations

import os
import subprocess
import sys
import threading
import uuid
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import Consumer, TopicPartition

from streams.codec import AvroRegistry, DecodeError
from streams.settings import Settings
from streams.stack import log_tail


@dataclass(frozen=True)
class Record:
    topic: str
    key: str
    type: str
    value: dict[str, Any]
    headers: dict[str, bytes]
    raw: bytes
    partition: int
    offset: int


class Collector:
    """Consumes topics from their current end (no group) and keeps every record, decoded."""

    def __init__(self, settings: Settings, registry: AvroRegistry, topics: list[str]) -> None:
        self.registry = registry
        self.consumer = Consumer(
            {"bootstrap.servers": settings.kafka_bootstrap, "group.id": f"collector-{uuid.uuid4().hex[:8]}",
             "enable.auto.commit": False}
        )
        partitions = []
        for topic in topics:
            meta = self.consumer.list_topics(topic, timeout=10).topics[topic]
            for p in meta.partitions:
                high = self.consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                partitions.append(TopicPartition(topic, p, high))
        self.consumer.assign(partitions)
        self.records: list[Record] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop.is_set():
            msg = self.consumer.poll(0.05)
            if msg is None or msg.error() is not None:
                continue
            raw = msg.value() or b""
            try:
                decoded = self.registry.decode(raw)
                kind, value = decoded.type, decoded.value
            except DecodeError:
                kind, value = "undecodable", {}
            headers = {k: v or b"" for k, v in (msg.headers() or [])}
            record = Record(msg.topic() or "", (msg.key() or b"").decode(errors="replace"), kind, value, headers, raw,
                            msg.partition() or 0, msg.offset() or 0)
            with self.lock:
                self.records.append(record)

    def where(self, **match: Any) -> list[Record]:
        with self.lock:
            records = list(self.records)
        return [r for r in records if all(getattr(r, k) == v for k, v in match.items())]

    def for_orders(self, order_ids: set[str], kind: str | None = None) -> list[Record]:
        with self.lock:
            records = list(self.records)
        return [r for r in records if r.value.get("order_id") in order_ids and (kind is None or r.type == kind)]

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        self.consumer.close()


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


class WorkerProcess:
    """``pieceflow worker`` as a child process, with its own log file."""

    def __init__(self, settings: Settings, log_dir: Path, name: str, env: dict[str, str]) -> None:
        self.log = log_dir / f"{name}.log"
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "streams", "worker", "--loglevel", "info"],
            env={**os.environ, **env},
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )

    def alive(self) -> bool:
        return self.proc.poll() is None

    def tail(self) -> str:
        return log_tail(self.log, 60)

    def stop(self, timeout: float = 30.0) -> None:
        if self.alive():
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)
