"""The Avro contract: ``schemas/*.avsc``, one record per file, loaded and parsed once.

Each file is self-contained (nested types are defined inline, envelope fields are inlined), so
every schema parses on its own and registers as one subject without references. For that reason
each file is parsed with its own named-type namespace: the same nested name (e.g. ``OrderLine``)
appears in several files.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import fastavro


@cache
def schema_dir() -> Path:
    """The packaged copy in an installed wheel, else ``<repo>/schemas`` in a checkout."""
    here = Path(__file__).resolve().parent
    # streams/_data/schemas is where pyproject's wheel build currently puts them.
    for candidate in (here / "_schemas", here / "_data" / "schemas", here.parent / "schemas"):
        if candidate.is_dir() and any(candidate.glob("*.avsc")):
            return candidate
    raise FileNotFoundError("pieceflow's Avro schemas are missing (no streams/_schemas or schemas/)")


@cache
def all_schema_names() -> tuple[str, ...]:
    """Record names (without namespace), e.g. ``"OrderAccepted"``, sorted."""
    return tuple(sorted(p.stem for p in schema_dir().glob("*.avsc")))


@cache
def _raw(name: str) -> str:
    path = schema_dir() / f"{name}.avsc"
    if not path.is_file():
        raise KeyError(f"no Avro schema named {name!r}")
    return path.read_text()


def load_schema(name: str) -> dict[str, Any]:
    """The schema as JSON (a fresh copy, safe to modify)."""
    schema: dict[str, Any] = json.loads(_raw(name))
    return schema


@cache
def parsed_schema(name: str) -> Any:
    """The fastavro-parsed schema for schemaless_writer / schemaless_reader."""
    return fastavro.parse_schema(load_schema(name), named_schemas={})
