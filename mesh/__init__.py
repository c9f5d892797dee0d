"""Kafka agent mesh: AI agents as independent stream processors on typed Kafka topics.

Example:
    >>> from mesh import App, Context, Topic, agent  # the public API
"""

from __future__ import annotations

from mesh.agent import Agent, App, Context, agent
from mesh.kafka.apache import ApacheKafka
from mesh.serde.codec import Codec
from mesh.config import MeshSettings
from mesh.kafka.embedded import EmbeddedBroker
from mesh.runtime.emitter import Emitter
from mesh.envelope import Envelope, derive_event_id
from mesh.errors import (
    BreakerOpen,
    BrokerLost,
    ConfigError,
    DecodeError,
    HandlerError,
    Held,
    InputError,
    MeshError,
    PayloadInvalid,
    PayloadTooLarge,
    SignatureInvalid,
    TransportError,
)
from mesh.runtime.host import Mesh
from mesh.kafka.provision import apply_topics
from mesh.policy import RetryPolicy
from mesh.runtime.runner import AgentRunner, Outcome
from mesh.serde.avro import AvroSerde
from mesh.state import CompactedTable
from mesh.topic import Topic

__all__ = [
    "Agent",
    "AgentRunner",
    "ApacheKafka",
    "App",
    "AvroSerde",
    "BreakerOpen",
    "BrokerLost",
    "Codec",
    "CompactedTable",
    "ConfigError",
    "Context",
    "DecodeError",
    "EmbeddedBroker",
    "Emitter",
    "Envelope",
    "HandlerError",
    "Held",
    "InputError",
    "Mesh",
    "MeshError",
    "MeshSettings",
    "Outcome",
    "PayloadInvalid",
    "PayloadTooLarge",
    "RetryPolicy",
    "SignatureInvalid",
    "Topic",
    "TransportError",
    "agent",
    "apply_topics",
    "derive_event_id",
]
