"""A worker registers every record its agents write before it starts, not on its event loop at first send."""

from __future__ import annotations

import pytest

from streams import topology


def test_every_agent_written_record_is_registered_before_the_worker_starts(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    asked: list[tuple[str, str]] = []

    def schema_id(topic: str, record: str) -> int:
        asked.append((topic, record))
        return len(asked)

    monkeypatch.setattr(topology.registry, "schema_id", schema_id)

    topology.register_output_schemas()

    assert set(asked) == set(topology.output_records())
    written = {(spec.name, record) for spec in topology.TOPICS if spec.writer in topology.agent_names()
               for record in spec.values}
    assert set(asked) == written
    # Every route an agent's runner can send to is among them.
    routed = {(topic.get_topic_name(), record) for runner in (topology.validate_runner, topology.expand_runner,
              topology.track_runner, topology.assign_runner) for record, topic in runner.routes.items()}
    assert routed <= set(asked)
    # What reroute writes goes to two topics; dead letters keep their original bytes and have no schema.
    assert {(topology.STATIONS_LANE_EVENTS.name, "OperationCompleted"),
            (topology.ORDERS_OPERATIONS.name, "OperationCompleted")} <= set(asked)
    assert not any(topic == topology.DEAD_LETTERS.name for topic, _ in asked)
