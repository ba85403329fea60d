"""The legacy batching rules that the demo's --policy batch replays."""

from __future__ import annotations

import pytest

from streams.batching import Held, batch_releases


def test_a_full_batch_leaves_with_its_last_item() -> None:
    items = [Held(f"o{i}", "kung-pao", float(i)) for i in range(4)]
    assert batch_releases(items, batch_size=4, max_wait=100) == dict.fromkeys(["o0", "o1", "o2", "o3"], 3.0)


def test_a_lonely_item_waits_the_whole_hold() -> None:
    items = [Held("kp", "kung-pao", 0.0), *(Held(f"b{i}", "buddha", float(i)) for i in range(3))]
    released = batch_releases(items, batch_size=3, max_wait=15.0)
    assert released["kp"] == 15.0  # the seed's Kung Pao: held until the manager gives up
    assert released["b0"] == released["b2"] == 2.0


def test_an_item_after_the_deadline_opens_a_new_batch() -> None:
    items = [Held("a", "north", 0.0), Held("b", "north", 20.0), Held("c", "north", 21.0)]
    released = batch_releases(items, batch_size=3, max_wait=10.0)
    assert released == {"a": 10.0, "b": 30.0, "c": 30.0}


def test_batch_size_one_is_one_piece_flow() -> None:
    items = [Held(f"o{i}", "any", float(i) * 0.5) for i in range(5)]
    assert batch_releases(items, batch_size=1, max_wait=60) == {i.item_id: i.ready_at for i in items}


def test_batch_size_must_be_positive() -> None:
    with pytest.raises(ValueError):
        batch_releases([], batch_size=0, max_wait=1)
