"""Topic declarations as data, and creating them on a cluster."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import AdminClient, NewTopic

from streams.settings import Settings


@dataclass(frozen=True)
class TopicSpec:
    """One topic of the pipeline: what it is keyed by, what it carries, who writes it."""

    name: str
    key: str
    values: tuple[str, ...]
    writer: str
    compacted: bool = False
    config: dict[str, str] = field(default_factory=dict)

    @property
    def cleanup_policy(self) -> str:
        return "compact" if self.compacted else "delete"

    def describe(self, partitions: int) -> dict[str, Any]:
        row = asdict(self)
        row["values"] = list(self.values)
        row["partitions"] = partitions
        row["cleanup_policy"] = self.cleanup_policy
        return row


def ensure_topics(specs: list[TopicSpec], settings: Settings, timeout: float = 30.0) -> list[str]:
    """Create the topics that do not exist yet; returns the names created. Existing ones are kept."""
    admin = AdminClient({"bootstrap.servers": settings.kafka_bootstrap})
    try:
        existing = set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        raise RuntimeError(
            f"Kafka at {settings.kafka_bootstrap} is unreachable ({exc}): start it with `pieceflow stack up`"
        ) from exc
    wanted = [
        NewTopic(
            spec.name,
            settings.partitions,
            settings.replication_factor,
            config={"cleanup.policy": spec.cleanup_policy, **spec.config},
        )
        for spec in specs
        if spec.name not in existing
    ]
    if not wanted:
        return []
    for name, future in admin.create_topics(wanted, request_timeout=timeout).items():
        try:
            future.result(timeout=timeout)
        except KafkaException as exc:
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise RuntimeError(f"could not create topic {name}: {exc}") from exc
    return [t.topic for t in wanted]
