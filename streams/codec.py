"""Avro in the Confluent wire format (magic 0, 4-byte registry id, Avro binary), on fastavro.

The registry is asked once per (subject, schema) when writing and once per id when reading; after
that, encoding and decoding touch only cached, already-parsed schemas. Several event types share a
topic, so subjects follow the TopicRecordNameStrategy: ``<topic>-<record full name>``.
"""

from __future__ import annotations

import io
import json
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, Protocol

import fastavro
import faust
from confluent_kafka.schema_registry import Schema, SchemaRegistryClient
from confluent_kafka.schema_registry.error import SchemaRegistryError

from streams import schemas

MAGIC = 0
REGISTRY_TIMEOUT_SECONDS = 10
# How long an id the registry said it does not have is refused without asking again: a topic full of
# records with an unknown id would otherwise cost one registry round trip per record.
MISSING_ID_SECONDS = 60.0
_HEADER = struct.Struct(">bI")


class Typed(Protocol):
    """Anything carrying an Avro record name and its value, such as ``streams.events.Event``."""

    @property
    def type(self) -> str: ...

    @property
    def value(self) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Decoded:
    """A record read from Kafka: its Avro record name (without namespace) and its value."""

    type: str
    value: dict[str, Any]


@dataclass(frozen=True)
class Undecodable:
    """Bytes that could not be read.

    With ``retry`` unset they are not a record we can read, and agents send them to the dead-letter
    topic. With ``retry`` set their schema has not been fetched yet (the first record of a schema id) or
    the registry could not be asked for it (a transient outage, not bad input): agents call ``retry``,
    off the event loop, until it decodes them or refuses them for good.
    """

    raw: bytes
    error: str
    retry: Callable[[], Decoded] | None = None


class DecodeError(ValueError):
    pass


class RegistryUnavailable(DecodeError):
    """The registry did not answer for a schema id: the record may well be good; try again later."""


@dataclass(frozen=True)
class _Reader:
    name: str
    writer: Any
    reader: Any


class AvroRegistry:
    """Schema ids and parsed schemas, shared by every codec of a process."""

    def __init__(self, client: SchemaRegistryClient) -> None:
        self.client = client
        self._ids: dict[tuple[str, str], int] = {}
        self._readers: dict[int, _Reader] = {}
        self._missing: dict[int, tuple[float, str]] = {}  # id -> (when the registry said so, what it said)
        self._lock = threading.Lock()

    @classmethod
    def from_url(cls, url: str) -> AvroRegistry:
        # The client waits forever by default; a registry that stops answering must fail the call.
        return cls(SchemaRegistryClient({"url": url, "timeout": REGISTRY_TIMEOUT_SECONDS}))

    def schema_id(self, topic: str, record: str) -> int:
        key = (topic, record)
        found = self._ids.get(key)
        if found is not None:
            return found
        with self._lock:
            if key not in self._ids:
                raw = schemas.load_schema(record)
                subject = f"{topic}-{raw['namespace']}.{raw['name']}"
                self._ids[key] = self.client.register_schema(subject, Schema(json.dumps(raw), "AVRO"))
            return self._ids[key]

    def reader(self, schema_id: int) -> _Reader:
        found = self._readers.get(schema_id)
        if found is not None:
            return found
        with self._lock:
            if schema_id not in self._readers:
                registered = self._fetch(schema_id)
                writer_raw = json.loads(registered.schema_str or "null")
                if not isinstance(writer_raw, dict) or writer_raw.get("type") != "record":
                    raise DecodeError(f"schema id {schema_id} is not an Avro record schema")
                name = writer_raw["name"]
                writer = fastavro.parse_schema(writer_raw)
                # Read with today's schema, so older writers resolve to the fields this code knows.
                reader = schemas.parsed_schema(name) if name in schemas.all_schema_names() else writer
                self._readers[schema_id] = _Reader(name, writer, reader)
            return self._readers[schema_id]

    def unfetched_schema_id(self, data: bytes) -> int | None:
        """The schema id of ``data`` when decoding it needs a registry request, else None: its id is
        cached (as known or as missing), or the bytes are refused before any lookup."""
        if len(data) < _HEADER.size:
            return None
        magic, schema_id = _HEADER.unpack_from(data)
        if magic != MAGIC or schema_id in self._readers or self._known_missing(schema_id) is not None:
            return None
        return schema_id

    def _known_missing(self, schema_id: int) -> str | None:
        """What the registry said when it last reported ``schema_id`` missing, within the last minute."""
        missing = self._missing.get(schema_id)
        if missing is not None and time.monotonic() - missing[0] < MISSING_ID_SECONDS:
            return missing[1]
        return None

    def _fetch(self, schema_id: int) -> Schema:
        said = self._known_missing(schema_id)
        if said is not None:
            raise DecodeError(f"schema id {schema_id} is not in the registry: {said}")
        try:
            return self.client.get_schema(schema_id)
        except SchemaRegistryError as exc:
            status = exc.http_status_code
            if status == 404:
                self._missing[schema_id] = (time.monotonic(), exc.error_message)
                raise DecodeError(f"schema id {schema_id} is not in the registry: {exc.error_message}") from exc
            if 400 <= status < 500 and status not in (408, 429):  # refused for good, not busy or slow
                raise DecodeError(f"the registry refused schema id {schema_id}: {exc}") from exc
            raise RegistryUnavailable(f"the registry failed to return schema id {schema_id}: {exc}") from exc
        except Exception as exc:  # connection refused, timeout: nothing is known about the record yet
            raise RegistryUnavailable(f"the registry did not answer for schema id {schema_id}: {exc!r}") from exc

    def encode(self, topic: str, record: str, value: dict[str, Any]) -> bytes:
        schema_id = self.schema_id(topic, record)
        buf = io.BytesIO()
        buf.write(_HEADER.pack(MAGIC, schema_id))
        fastavro.schemaless_writer(buf, schemas.parsed_schema(record), value)
        return buf.getvalue()

    def decode(self, data: bytes) -> Decoded:
        if len(data) < _HEADER.size:
            raise DecodeError(f"{len(data)} bytes is shorter than the 5-byte wire-format header")
        magic, schema_id = _HEADER.unpack_from(data)
        if magic != MAGIC:
            raise DecodeError(f"unknown magic byte {magic}: not the Confluent Avro wire format")
        try:
            reader = self.reader(schema_id)
        except DecodeError:
            raise
        except Exception as exc:  # the registry's schema itself does not parse
            raise DecodeError(f"schema id {schema_id} from the registry is not usable: {exc}") from exc
        buf = io.BytesIO(data)
        buf.seek(_HEADER.size)
        try:
            value = fastavro.schemaless_reader(buf, reader.writer, reader.reader)
        except Exception as exc:
            raise DecodeError(f"body does not match schema {schema_id} ({reader.name}): {exc!r}") from exc
        if not isinstance(value, dict):
            raise DecodeError(f"schema {schema_id} ({reader.name}) is not a record")
        if buf.tell() != len(data):
            raise DecodeError(f"{len(data) - buf.tell()} trailing bytes after a {reader.name} record")
        return Decoded(reader.name, value)


class AvroCodec(faust.Codec):
    """A Faust codec bound to one topic: sends ``Typed`` values, receives ``Decoded`` ones.

    Receiving never raises: bytes that cannot be read come back as ``Undecodable`` so that the agent,
    not Faust, decides what happens to them (Faust would log the error and drop the message).
    """

    def __init__(self, registry: AvroRegistry, topic: str, **kwargs: Any) -> None:
        self.registry = registry
        self.topic = topic
        super().__init__(**kwargs)

    def _dumps(self, obj: Any) -> bytes:
        if isinstance(obj, bytes | bytearray):
            return bytes(obj)  # already encoded: dead letters keep the original bytes
        return self.registry.encode(self.topic, obj.type, obj.value)

    def _loads(self, s: bytes) -> Decoded | Undecodable:
        data = bytes(s)
        schema_id = self.registry.unfetched_schema_id(data)
        if schema_id is not None:
            # Faust decodes on the event loop: a registry that hangs would stall every partition of the
            # worker (measured: 46 s per lookup against a frozen registry). The agent fetches in a thread.
            retry = partial(self.registry.decode, data)
            return Undecodable(data, f"schema id {schema_id} not fetched yet", retry=retry)
        try:
            return self.registry.decode(data)
        except RegistryUnavailable as exc:
            return Undecodable(data, str(exc), retry=partial(self.registry.decode, data))
        except DecodeError as exc:
            return Undecodable(data, str(exc))
