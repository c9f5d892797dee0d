"""The admin client: creates and describes topics, and tells the cluster's id, each
partition's leader and which partitions are under-replicated (what provisioning, the
broker watch and the brokers' readiness checks ask).
"""

from __future__ import annotations

from collections.abc import Sequence

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import KafkaError, TopicAlreadyExistsError
from aiokafka.protocol.metadata import MetadataRequest

from mesh.config import KafkaSettings
from mesh.errors import TransportError
from mesh.kafka.base import Partition, TopicSpec, transport_error
from mesh.kafka.transport import Client


class Admin(Client):
    """Creates and describes topics."""

    _role = "admin client"

    def __init__(self, settings: KafkaSettings) -> None:
        super().__init__()
        self._client = AIOKafkaAdminClient(**settings.client_kwargs())

    async def _close(self) -> None:
        await self._client.close()

    async def list_topics(self) -> list[str]:
        return sorted(await self._client.list_topics())

    async def cluster_id(self) -> str | None:
        """The id of the cluster the bootstrap servers belong to (None if the broker
        does not say). Raises ``TransportError`` when no broker answers."""
        try:
            described = await self._client.describe_cluster()
        except KafkaError as exc:
            raise transport_error(exc, "Describing the cluster") from exc
        found = described.get("cluster_id")
        return None if found is None else str(found)

    async def leaders(self, topic: str) -> dict[int, int]:
        """The leader node id of each of ``topic``'s partitions that has one."""
        described = await self._client.describe_topics([topic])
        return {p["partition"]: p["leader"] for t in described if not t["error_code"]
                for p in t["partitions"] if p["leader"] >= 0}

    async def leaders_per_broker(self, topics: Sequence[str],
                                 ) -> dict[int, dict[str, dict[int, int]]]:
        """What each broker of the cluster answers for :meth:`leaders` of each of
        ``topics`` (those it knows), by broker id.

        A created topic reaches each broker's metadata at its own moment, and a client's
        metadata request goes to any one broker: only every broker showing it means the
        next client, whichever broker it asks, finds it.
        """
        brokers = (await self._client.describe_cluster()).get("brokers") or ()
        request = MetadataRequest(list(topics))
        views = {}
        for broker in brokers:
            # aiokafka's admin client has no public request to one chosen broker
            answer = await self._client._send_request_to_node(broker["node_id"], request)
            views[broker["node_id"]] = {
                t["topic"]: {p["partition"]: p["leader"] for p in t["partitions"]
                             if p["leader"] >= 0}
                for t in answer.to_object()["topics"] if not t["error_code"]}
        return views

    async def under_replicated(self, topics: Sequence[str]) -> list[Partition]:
        """The partitions of ``topics`` with fewer in-sync replicas than replicas, or no
        leader (a rolling restart waits for none before stopping the next broker)."""
        described = await self._client.describe_topics(list(topics))
        return [Partition(t["topic"], p["partition"]) for t in described
                for p in t["partitions"]
                if t["error_code"] or p["leader"] < 0 or len(p["isr"]) < len(p["replicas"])]

    async def create_topic(self, spec: TopicSpec) -> bool:
        """Create ``spec``; False if it already existed."""
        replication = spec.replication
        if replication is None:  # aiokafka's CreateTopics (v3) cannot ask for the default
            brokers = (await self._client.describe_cluster()).get("brokers") or ()
            replication = max(1, min(3, len(brokers)))
        topic = NewTopic(spec.name, spec.partitions, replication,
                         topic_configs=dict(spec.configs or {}))
        try:
            response = await self._client.create_topics([topic])
        except TopicAlreadyExistsError:
            return False
        for name, code, *_ in getattr(response, "topic_errors", ()):
            if code == TopicAlreadyExistsError.errno:
                return False
            if code:
                raise TransportError(f"Creating topic {name} failed with error code {code}.")
        return True

    async def describe(self, names: Sequence[str]) -> dict[str, TopicSpec]:
        """Partitions and configs of the named topics that exist."""
        found: dict[str, TopicSpec] = {}
        # Describing a missing topic auto-creates it on some brokers: ask only for existing.
        existing = set(await self._client.list_topics())
        names = [n for n in names if n in existing]
        if not names:
            return found
        described = await self._client.describe_topics(list(names))
        counts = {t["topic"]: len(t["partitions"]) for t in described if not t["error_code"]}
        if not counts:
            return found
        resources = [ConfigResource(ConfigResourceType.TOPIC, n) for n in counts]
        responses = await self._client.describe_configs(resources)
        configs: dict[str, dict[str, str]] = {n: {} for n in counts}
        for response in responses:
            for _code, _msg, _type, name, entries in response.resources:
                configs.setdefault(name, {}).update(
                    {e[0]: e[1] for e in entries if e[1] is not None})
        for name, count in counts.items():
            found[name] = TopicSpec(name, count, configs=configs.get(name, {}))
        return found
