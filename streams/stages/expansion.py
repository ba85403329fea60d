"""Expansion: an accepted order in, one WorkItemPlanned per line x unit out.

A unit's operations are the product recipe changed by its customizations (substituted, added and
removed operations, extra durations, BOM changes), run in sequence: each operation depends on the
one before. Items of one order are made in parallel, so the order is ready when its longest item
is; every shorter item gets a fire offset (longest path - its path) on its first operation so that
all parts finish together instead of waiting, finished, for the slowest.

Expansion emits only WorkItemPlanned. The dispatch (progress) stage turns planned items into
OperationRequested events, first operations at once and each next one when its predecessor
completes, so OperationRequested has a single writer and a per-order seq that only increases.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from streams.catalog import ANY_TEXT, BomLine, Catalog, OperationSpec, Product
from streams.events import Event, derived_event_id, envelope


@dataclass
class ExpansionState:
    """Per-order expansion state (key: order id): the output seq and the last revision planned."""

    order_id: str = ""
    seq: int = 0
    revision: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any] | None) -> ExpansionState:
        return cls(**raw) if raw else cls()


@dataclass(frozen=True)
class PlannedOp:
    spec: OperationSpec
    duration_ms: int


def plan_unit(
    product: Product, customizations: Iterable[Mapping[str, Any]]
) -> tuple[list[PlannedOp], list[BomLine]]:
    """Operations (in order, with durations) and bill of materials of one customized unit."""
    ops = [PlannedOp(o, o.duration_ms) for o in product.operations]
    bom = list(product.bom)
    for c in customizations:
        option = product.options[c["option_code"]]
        chosen = option.value_for(c["value"])
        if chosen is None:
            continue
        text_chars = len(c["value"]) if ANY_TEXT in option.values else 0
        for i, op in enumerate(ops):
            replacement = chosen.replace_ops.get(op.spec.op_code)
            if replacement is not None:
                ops[i] = PlannedOp(replacement, replacement.duration_ms)
        ops = [op for op in ops if op.spec.op_code not in chosen.remove_ops]
        for added in chosen.add_ops:
            codes = [op.spec.op_code for op in ops]
            at = codes.index(added.after) + 1 if added.after in codes else len(ops)
            ops.insert(at, PlannedOp(added, added.duration_ms + added.per_char_ms * text_chars))
        ops = [
            PlannedOp(op.spec, max(0, op.duration_ms + chosen.extra_duration_ms.get(op.spec.op_code, 0)))
            for op in ops
        ]
        bom = [b for b in bom if b.component not in chosen.bom_remove] + list(chosen.bom_add)
    return ops, bom


def expand(
    state: ExpansionState, accepted: Mapping[str, Any], catalog: Catalog, now: datetime
) -> list[Event]:
    """Plan every unit of an OrderAccepted. Emits WorkItemPlanned events (key: order id).

    A revision already planned (a replayed OrderAccepted) yields nothing.
    """
    revision = accepted["revision"]
    if revision <= state.revision:
        return []
    state.order_id = order_id = accepted["order_id"]
    state.revision = revision
    units: list[tuple[int, Mapping[str, Any], int, list[PlannedOp], list[BomLine]]] = []
    for line_index, line in enumerate(accepted["lines"]):
        ops, bom = plan_unit(catalog.products[line["sku"]], line["customizations"])
        units.extend((line_index, line, unit, ops, bom) for unit in range(line["quantity"]))
    longest = max((sum(op.duration_ms for op in u[3]) for u in units), default=0)
    events = []
    for line_index, line, unit_index, ops, bom in units:
        work_item_id = f"{order_id}/r{revision}/l{line_index}/u{unit_index}"
        path = sum(op.duration_ms for op in ops)
        offset = longest - path
        op_ids = [f"{work_item_id}/{i:02d}-{op.spec.op_code}" for i, op in enumerate(ops)]
        state.seq += 1
        events.append(
            Event(
                "WorkItemPlanned",
                order_id,
                {
                    **envelope(
                        order_id,
                        state.seq,
                        now,
                        event_id=derived_event_id(accepted["event_id"], work_item_id),
                        causation_id=accepted["event_id"],
                    ),
                    "work_item_id": work_item_id,
                    "revision": revision,
                    "line_index": line_index,
                    "line_id": line["line_id"],
                    "sku": line["sku"],
                    "unit_index": unit_index,
                    "item_count": len(units),
                    "placed_at": accepted["placed_at"],
                    "priority": accepted["priority"],
                    "delivery": accepted["delivery"],
                    "promised_by": accepted["promised_by"],
                    "customizations": line["customizations"],
                    "est_path_ms": path,
                    "fire_offset_ms": offset,
                    "operations": [
                        {
                            "op_id": op_ids[i],
                            "op_code": op.spec.op_code,
                            "capability": op.spec.capability,
                            "lane": catalog.lane_of(op.spec.capability),
                            "est_duration_ms": op.duration_ms,
                            "sequence": i,
                            "depends_on": op_ids[i - 1 : i],
                            "fire_offset_ms": offset if i == 0 else 0,
                        }
                        for i, op in enumerate(ops)
                    ],
                    "bom": [asdict(b) for b in bom],
                },
            )
        )
    return events
