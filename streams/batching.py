"""The seed's legacy behaviour, as pure functions: hold work until a batch has formed.

The demo's ``--policy batch`` replays the same orders through these rules, so the report can put
one-piece flow and batching side by side: the front desk holds orders until several of the same
dish have come in, and couriers wait until several orders for one neighbourhood are ready.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Held:
    """One thing waiting for its batch: an order for a dish, or a parcel for a neighbourhood."""

    item_id: str
    group: str
    ready_at: float


def batch_releases(items: Iterable[Held], batch_size: int, max_wait: float) -> dict[str, float]:
    """When each item is released: its group's batch is full, or the batch's oldest waited ``max_wait``.

    A batch opens with its first item; it closes when it holds ``batch_size`` items (released at the
    arrival of the last one) or when ``max_wait`` has passed since it opened, whichever is first.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    released: dict[str, float] = {}
    open_batches: dict[str, list[Held]] = defaultdict(list)
    for item in sorted(items, key=lambda i: i.ready_at):
        batch = open_batches[item.group]
        # A batch whose deadline passed before this arrival left without it.
        if batch and item.ready_at > batch[0].ready_at + max_wait:
            _release(released, batch, batch[0].ready_at + max_wait)
            batch.clear()
        batch.append(item)
        if len(batch) >= batch_size:
            _release(released, batch, item.ready_at)
            batch.clear()
    for batch in open_batches.values():
        if batch:
            _release(released, batch, batch[0].ready_at + max_wait)
    return released


def _release(released: dict[str, float], batch: list[Held], at: float) -> None:
    for held in batch:
        released[held.item_id] = at
