"""Topic declarations as data, and creating them on a cluster."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
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
    admin, existing = _visible_topics(settings, timeout)
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
            if exc.args[0].code() == KafkaError.TOPIC_AUTHORIZATION_FAILED:
                raise RuntimeError(
                    f"topic {name} is not visible to {_who(settings)}, which may not create it either: create "
                    "the topic, or grant Describe on it (see deploy/k8s/users.yaml)"
                ) from exc
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise RuntimeError(f"could not create topic {name}: {exc}") from exc
    created = [t.topic for t in wanted]
    _wait_for_leaders(admin, created, timeout, settings)
    return created


def check_topics(names: list[str], settings: Settings, timeout: float = 30.0) -> None:
    """Fail at start, saying what to do, when Kafka cannot be reached or a topic this process uses is
    not there for it (missing, or not granted)."""
    _, visible = _visible_topics(settings, timeout)
    missing = [name for name in names if name not in visible]
    if missing:
        raise RuntimeError(
            f"topic(s) {', '.join(missing)} not visible to {_who(settings)}: create them (`pieceflow topics "
            "create`), or grant the user Describe on them (see deploy/k8s/users.yaml)"
        )


def _visible_topics(settings: Settings, timeout: float) -> tuple[AdminClient, set[str]]:
    # librdkafka tells why it could not connect (refused credentials, an untrusted certificate) only to
    # the error callback, served by poll; the failing call itself says "transport failure".
    errors: list[KafkaError] = []
    config: dict[str, Any] = {**settings.kafka_config(), "error_cb": errors.append}
    admin = AdminClient(config)
    try:
        return admin, set(admin.list_topics(timeout=timeout).topics)
    except KafkaException as exc:
        admin.poll(0)  # serves the error callback
        raise RuntimeError(unreachable(settings, errors[-1] if errors else exc.args[0])) from exc


def _who(settings: Settings) -> str:
    return f"user {settings.sasl_username}" if settings.sasl else "this client"


def unreachable(settings: Settings, error: KafkaError) -> str:
    """What went wrong reaching Kafka, and which settings to look at."""
    where = f"Kafka at {settings.kafka_bootstrap}"
    if error.code() == KafkaError._AUTHENTICATION:
        return (f"{where} refused the SASL credentials ({error.str()}): check PIECEFLOW_SASL_USERNAME, "
                "PIECEFLOW_SASL_PASSWORD and PIECEFLOW_SASL_MECHANISM")
    if error.code() == KafkaError._SSL:
        return (f"the TLS handshake with {where} failed ({error.str()}): check PIECEFLOW_SSL_CA_LOCATION (the CA "
                "that signed the brokers' certificates) and PIECEFLOW_SECURITY_PROTOCOL")
    if settings.bootstrap_servers is None:
        return f"{where} is unreachable ({error.str()}): start the local stack with `pieceflow stack up`"
    return (f"{where} is unreachable ({error.str()}): check PIECEFLOW_BOOTSTRAP_SERVERS and "
            f"PIECEFLOW_SECURITY_PROTOCOL (now {settings.security_protocol})")


def _wait_for_leaders(admin: AdminClient, names: list[str], timeout: float, settings: Settings) -> None:
    """Wait until every partition of the new topics answers for its offsets.

    Metadata names a leader before that broker has loaded the partition, which meanwhile answers
    NOT_LEADER_FOR_PARTITION; the first client to ask would fail.
    """
    deadline = time.monotonic() + timeout
    pending: list[TopicPartition] | None = None
    consumer = Consumer({**settings.kafka_config(), "group.id": "pieceflow-topic-check"})
    try:
        while True:
            if pending is None:
                topics = admin.list_topics(timeout=timeout).topics
                if all(name in topics and topics[name].partitions for name in names):
                    pending = [TopicPartition(n, p) for n in names for p in topics[n].partitions]
            if pending is not None:
                pending = [tp for tp in pending if not _answers(consumer, tp)]
                if not pending:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the new topics {', '.join(names)} are not ready after {timeout:.0f}s")
            time.sleep(0.05)
    finally:
        consumer.close()


def _answers(consumer: Consumer, tp: TopicPartition) -> bool:
    try:
        consumer.get_watermark_offsets(tp, timeout=2.0)
    except KafkaException:
        return False
    return True


def ensure_internal_topics(app_id: str, tables: list[str], settings: Settings, timeout: float = 30.0) -> None:
    """Create a Faust app's table changelogs (compacted, co-partitioned) and its leader topic.

    Faust would create them itself, but on a fresh broker it can look a just-created changelog up
    before the metadata has it, and the agent then crashes with PartitionsMismatch ("changelog has
    0 partitions"). Created up front, they are simply there.
    """
    specs = [
        TopicSpec(f"{app_id}-{table}-changelog", "table key", ("state",), "Faust", compacted=True)
        for table in tables
    ]
    ensure_topics(specs, settings, timeout)
    leader = TopicSpec(f"{app_id}-__assignor-__leader", "-", ("-",), "Faust")
    ensure_topics([leader], settings.model_copy(update={"partitions": 1}), timeout)
    admin = AdminClient(settings.kafka_config())
    _wait_for_leaders(admin, [spec.name for spec in specs] + [leader.name], timeout, settings)


def start_group_at_end(
    group: str, topics: list[str], settings: Settings, timeout: float = 10.0, *, even_if_committed: bool = False
) -> bool:
    """Give a consumer group that has never committed offsets at the topics' current ends.

    For throwaway groups (tests, demo, benchmark) on a long-lived stack: they start with what comes
    next, not with everyone's history. A group with commits is left alone unless ``even_if_committed``
    (a group reused from run to run, whose earlier runs are over); returns whether it was moved.
    """
    consumer = Consumer(
        {**settings.kafka_config(), "group.id": group, "enable.auto.commit": False}
    )
    try:
        partitions = []
        for topic in topics:
            meta = consumer.list_topics(topic, timeout=timeout).topics[topic]
            partitions += [TopicPartition(topic, p) for p in meta.partitions]
        if not even_if_committed and any(tp.offset >= 0 for tp in consumer.committed(partitions, timeout=timeout)):
            return False
        ends = [
            TopicPartition(tp.topic, tp.partition, consumer.get_watermark_offsets(tp, timeout=timeout)[1])
            for tp in partitions
        ]
        consumer.commit(offsets=ends, asynchronous=False)
        return True
    finally:
        consumer.close()
