"""Topic-aware encoding: which framing to write, and decoding whichever arrives.

Without a schema registry every event is written in Avro single-object encoding.
With ``MESH_SCHEMA_REGISTRY__URL`` set, the value schema of each topic is registered
under ``<topic>-value`` (Confluent's TopicNameStrategy) and events are written in the
Confluent wire format. Both framings are always accepted on read; a Confluent schema id
that is not cached is fetched from the registry once.

A value written with another schema than the topic's model (an older or newer version
of it) is resolved against the model by Avro's rules. The writer schema of a
single-object value is found by its fingerprint in the schema history,
``schemas/history/<fingerprint>.avsc`` (see :mod:`mesh.serde.history`), or among the schemas
given to :meth:`Codec.learn`; that of a Confluent value by its id in the registry.
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Any

import fastavro
from fastavro.read import SchemaResolutionError
from pydantic import BaseModel

from mesh.config import SchemaRegistrySettings
from mesh.errors import ConfigError, DecodeError, TransportError, UnknownSchema
from mesh.serde.avro import AvroSerde, framing_of
from mesh.serde.compare import schema_differences
from mesh.serde.history import HISTORY, SchemaHistory
from mesh.topic import Topic

logger = logging.getLogger(__name__)


class Codec:
    """Encodes payloads for topics and decodes consumed values, in either framing.

    ``history`` is the directory of writer schemas by fingerprint; by default the
    registry settings' ``history_dir`` when they have one, else ``schemas/history`` under
    the working directory (where ``mesh schemas export`` writes it, and where the
    container image has it). A missing directory is an empty history.

    Example:
        >>> codec = Codec()
        >>> data, fingerprint = codec.encode(orders, Order(order_id="o1"))  # doctest: +SKIP
        >>> await codec.decode(orders, data)  # doctest: +SKIP
        Order(order_id='o1')
        >>> codec.learn(json.loads(Path("old-order.avsc").read_text()))  # doctest: +SKIP
        '5f0c1c9e3b8a7d21'
    """

    def __init__(self, registry: SchemaRegistrySettings | None = None, *,
                 history: Path | SchemaHistory | None = None) -> None:
        if not isinstance(history, SchemaHistory):
            configured = registry.history_dir if registry is not None else None
            history = SchemaHistory(Path(history or configured or Path("schemas") / HISTORY))
        self.history = history
        self._serdes: dict[type[BaseModel], AvroSerde] = {}
        self._ids: dict[str, int] = {}  # topic -> registered schema id of its value schema
        self._writers: dict[int, Any] = {}  # registry id -> parsed writer schema
        # registry id -> its fetch under way: inputs of several keys decoded at once
        # that meet a new id wait for one request
        self._fetching: dict[int, asyncio.Future[Any]] = {}
        self._registry_settings = registry if registry and registry.url else None
        self._client: Any = None

    @property
    def uses_registry(self) -> bool:
        return self._registry_settings is not None

    def learn(self, schema: dict[str, Any] | str) -> str:
        """Know ``schema`` (a dict or JSON text) as a writer schema of single-object
        values, beside the history's; returns its fingerprint."""
        return self.history.learn(schema)

    def serde(self, model: type[BaseModel]) -> AvroSerde:
        """The (cached) serde of ``model``."""
        serde = self._serdes.get(model)
        if serde is None:
            serde = self._serdes[model] = AvroSerde.for_model(model)
        return serde

    async def prepare(self, topics: list[Topic[Any]]) -> None:
        """Build serdes and, with a registry, register each topic's value schema."""
        for topic in topics:
            serde = self.serde(topic.model)
            if self._registry_settings is not None and topic.name not in self._ids:
                client = self._registry()
                try:
                    schema_id = await client.register(f"{topic.name}-value", serde.schema)
                except Exception as exc:  # httpx/registry errors, all transient or config
                    raise TransportError(f"Registering the schema of {topic.name} at "
                                         f"{self._registry_settings.url} failed: {exc}") from exc
                self._ids[topic.name] = schema_id
                self._writers[schema_id] = serde.parsed

    def encode(self, topic: Topic[Any], payload: BaseModel) -> tuple[bytes, str]:
        """The framed bytes of ``payload`` for ``topic`` and its schema fingerprint."""
        serde, prefix = self._framing(topic)
        return prefix + serde.body(payload), serde.fingerprint

    def encode_fields(self, topic: Topic[Any], data: dict[str, Any]) -> tuple[bytes, str]:
        """Like :meth:`encode` for a record already in Avro form (see
        :meth:`AvroSerde.body_of`): the same bytes as encoding the model built from it."""
        serde, prefix = self._framing(topic)
        return prefix + serde.body_of(data), serde.fingerprint

    def framing(self, topic: Topic[Any]) -> tuple[bytes, str]:
        """The bytes before every Avro body written for ``topic`` and the schema's
        fingerprint: for writers that produce the body themselves (the audit's
        :class:`~mesh.serde.writer.RecordTemplate`)."""
        serde, prefix = self._framing(topic)
        return prefix, serde.fingerprint

    def _framing(self, topic: Topic[Any]) -> tuple[AvroSerde, bytes]:
        """The serde of ``topic``'s model and the bytes before an Avro body: the Confluent
        wire header when a registry gave the topic a schema id, else the single-object
        marker and fingerprint."""
        serde = self.serde(topic.model)
        schema_id = self._ids.get(topic.name)
        if schema_id is not None:
            return serde, b"\x00" + schema_id.to_bytes(4, "big")
        if self._registry_settings is not None:
            raise ConfigError(f"Topic {topic.name}: schema not registered yet; call "
                              "Codec.prepare() with the topic first.")
        return serde, serde.framing

    async def decode(self, topic: Topic[Any], data: bytes) -> BaseModel:
        """Decode a consumed value, whichever framing it has."""
        serde = self.serde(topic.model)
        framing = framing_of(data)
        if framing == "single-object":
            fp = data[2:10].hex()
            if fp == serde.fingerprint or fp in serde.legacy:  # legacy: the same encoding
                return serde.from_body(data[10:], serde.parsed)
            return self._resolve(topic, serde, data[10:], self._known(topic, serde, fp),
                                 f"writer schema {fp}")
        if framing == "confluent":
            schema_id = int.from_bytes(data[1:5], "big")
            writer = await self._writer(schema_id)
            if writer is serde.parsed:
                return serde.from_body(data[5:], writer)
            return self._resolve(topic, serde, data[5:], writer, f"schema id {schema_id}")
        raise DecodeError(f"Value of {len(data)} bytes on {topic.name} starts with "
                          f"{data[:2].hex() or 'nothing'}: neither Avro single-object "
                          "encoding (c301) nor the Confluent wire format (00).")

    def _known(self, topic: Topic[Any], serde: AvroSerde, fp: str) -> Any:
        writer = self.history.get(fp)
        if writer is None:
            where = self.history.directory or "none configured"
            raise UnknownSchema(
                f"{topic.name}: writer schema fingerprint {fp} is neither "
                f"{serde.model.__name__}'s ({serde.fingerprint}) nor in the schema history "
                f"({where}). If the record was written with another version of the model, "
                "deploy the history `mesh schemas export` keeps in schemas/history with this "
                "service, or Codec.learn() the writer schema, or use a schema registry. The "
                "fingerprint covers the record's full name too: a producer that names it "
                f"other than {serde.parsed['name']} (its own namespace, or a mesh older "
                "than the naming rule of mesh.serde.avro.avro_name, which took the namespace "
                "from the Python module) writes another fingerprint. Otherwise the record "
                "was written with another topic's model.")
        return writer

    @staticmethod
    def _resolve(topic: Topic[Any], serde: AvroSerde, body: bytes, writer: Any,
                 origin: str) -> BaseModel:
        """Decode ``body``, written with ``writer``, as ``topic``'s model by Avro's rules."""
        reader = serde.parsed
        # Avro resolves named types by their unqualified name (or an alias): a namespace
        # change alone (records were once named by their Python module) still resolves.
        names = {_short(n) for n in (reader["name"], *reader.get("aliases", ()))}
        if not isinstance(writer, dict) or _short(str(writer.get("name"))) not in names:
            written = (f"record {_described(writer)}" if isinstance(writer, dict)
                       else f"the schema {writer!r}")
            raise UnknownSchema(f"{topic.name}: {origin} is {written}, not a version of "
                                f"the topic's record {_described(reader)}: the record is "
                                "not of this topic.")
        try:
            return serde.from_body(body, writer)
        except DecodeError as exc:
            if not isinstance(exc.__cause__, SchemaResolutionError):
                raise
            differ = "; ".join(schema_differences(writer, reader))
            raise DecodeError(
                f"{topic.name}: {origin} (record {_described(writer)}, another version of "
                f"{_described(reader)}) cannot be "
                f"read as the topic's ({serde.fingerprint}): {exc.__cause__}."
                + (f" Fields that differ: {differ}." if differ else "")
                + " Give a new field a default (or make it optional), or publish the "
                "changed model on a new topic.") from exc.__cause__

    async def _writer(self, schema_id: int) -> Any:
        writer = self._writers.get(schema_id)
        if writer is not None:
            return writer
        if self._registry_settings is None:
            raise UnknownSchema(f"Confluent schema id {schema_id} cannot be resolved: no "
                                "schema registry is configured (MESH_SCHEMA_REGISTRY__URL).")
        pending = self._fetching.get(schema_id)
        if pending is None:
            pending = self._fetching[schema_id] = asyncio.ensure_future(self._fetch(schema_id))
            pending.add_done_callback(lambda done: self._fetched(schema_id, done))
        # shielded: a waiter cancelled (its lane closed) leaves the fetch to the others
        return await asyncio.shield(pending)

    def _fetched(self, schema_id: int, done: asyncio.Future[Any]) -> None:
        """Forget the fetch (a failed one is tried again by the next input) and mark
        its error seen: every waiter may have gone."""
        self._fetching.pop(schema_id, None)
        if not done.cancelled():
            done.exception()

    async def _fetch(self, schema_id: int) -> Any:
        try:
            found = await self._registry().get_by_id(schema_id)
        except Exception as exc:
            raise TransportError(f"Fetching schema id {schema_id} failed: {exc}") from exc
        if found is None:
            raise UnknownSchema(f"Schema id {schema_id} is not in the registry.")
        raw = found.raw_schema
        writer = fastavro.parse_schema(json.loads(raw) if isinstance(raw, str) else raw)
        self._writers[schema_id] = writer
        return writer

    def _registry(self) -> Any:
        if self._client is None:
            from schema_registry.client import AsyncSchemaRegistryClient

            settings = self._registry_settings
            assert settings is not None and settings.url is not None
            url: Any = settings.url
            if settings.username:
                password = settings.password.get_secret_value() if settings.password else ""
                url = {"url": settings.url,
                       "basic.auth.credentials.source": "USER_INFO",
                       "basic.auth.user.info": f"{settings.username}:{password}"}
            self._client = AsyncSchemaRegistryClient(url)
        return self._client


def _short(name: str) -> str:
    return name.rsplit(".", 1)[-1]


def _described(schema: dict[str, Any]) -> str:
    """``Name (namespace ns)`` of a parsed named schema, for error messages."""
    namespace, _, short = str(schema.get("name")).rpartition(".")
    return f"{short} (namespace {namespace or 'none'})"
