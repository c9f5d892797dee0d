"""Topic-aware encoding: which framing to write, and decoding whichever arrives.

Without a schema registry every event is written in Avro single-object encoding.
With ``MESH_SCHEMA_REGISTRY__URL`` set, the value schema of each topic is registered
under ``<topic>-value`` (Confluent's TopicNameStrategy) and events are written in the
Confluent wire format. Both framings are always accepted on read; a Confluent schema id
that is not cached is fetched from the registry once.
"""

from __future__ import annotations

import json
import logging
from typing import Any

import fastavro
from pydantic import BaseModel

from mesh.config import SchemaRegistrySettings
from mesh.errors import ConfigError, DecodeError, TransportError, UnknownSchema
from mesh.serde import AvroSerde, framing_of
from mesh.topic import Topic

logger = logging.getLogger(__name__)


class Codec:
    """Encodes payloads for topics and decodes consumed values, in either framing.

    Example:
        >>> codec = Codec()
        >>> data, fingerprint = codec.encode(orders, Order(order_id="o1"))  # doctest: +SKIP
        >>> await codec.decode(orders, data)  # doctest: +SKIP
        Order(order_id='o1')
    """

    def __init__(self, registry: SchemaRegistrySettings | None = None) -> None:
        self._serdes: dict[type[BaseModel], AvroSerde] = {}
        self._ids: dict[str, int] = {}  # topic -> registered schema id of its value schema
        self._writers: dict[int, Any] = {}  # registry id -> parsed writer schema
        self._registry_settings = registry if registry and registry.url else None
        self._client: Any = None

    @property
    def uses_registry(self) -> bool:
        return self._registry_settings is not None

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
        serde = self.serde(topic.model)
        schema_id = self._ids.get(topic.name)
        if self._registry_settings is not None and schema_id is None:
            raise ConfigError(f"Topic {topic.name}: schema not registered yet; call "
                              "Codec.prepare() with the topic first.")
        if schema_id is None:
            return serde.encode(payload), serde.fingerprint
        return b"\x00" + schema_id.to_bytes(4, "big") + serde.body(payload), serde.fingerprint

    async def decode(self, topic: Topic[Any], data: bytes) -> BaseModel:
        """Decode a consumed value, whichever framing it has."""
        serde = self.serde(topic.model)
        framing = framing_of(data)
        if framing == "single-object":
            return serde.decode(data)
        if framing == "confluent":
            schema_id = int.from_bytes(data[1:5], "big")
            return serde.from_body(data[5:], await self._writer(schema_id))
        raise DecodeError(f"Value of {len(data)} bytes on {topic.name} starts with "
                          f"{data[:2].hex() or 'nothing'}: neither Avro single-object "
                          "encoding (c301) nor the Confluent wire format (00).")

    async def _writer(self, schema_id: int) -> Any:
        writer = self._writers.get(schema_id)
        if writer is not None:
            return writer
        if self._registry_settings is None:
            raise UnknownSchema(f"Confluent schema id {schema_id} cannot be resolved: no "
                                "schema registry is configured (MESH_SCHEMA_REGISTRY__URL).")
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
