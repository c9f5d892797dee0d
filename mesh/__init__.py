"""Kafka agent mesh: AI agents as independent stream processors on typed Kafka topics.

The patterns (:mod:`mesh.patterns`) are exported too, imported on first use: ``import
mesh`` (every ``mesh run`` and CLI command) does not build every pattern's models, and
no pattern module, which imports the layers below it, is imported while this package
itself is half initialised.

Example:
    >>> from mesh import App, Context, Topic, agent  # the public API
    >>> from mesh import Chain, Gather, GatherTopics  # the patterns
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mesh.agent import Agent, App, Context, agent
from mesh.config import MeshSettings
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
from mesh.kafka.apache import ApacheKafka
from mesh.kafka.embedded import EmbeddedBroker
from mesh.kafka.provision import apply_topics
from mesh.policy import RetryPolicy
from mesh.runtime.emitter import Emitter
from mesh.runtime.host import Mesh
from mesh.runtime.runner import AgentRunner, Outcome
from mesh.serde.avro import AvroSerde
from mesh.serde.codec import Codec
from mesh.state import CompactedTable
from mesh.topic import Topic, TopicBundle

if TYPE_CHECKING:
    from mesh.patterns.chain import Chain
    from mesh.patterns.delegation.coordinator import Coordinator, DelegationTopics, Specialist
    from mesh.patterns.events import EventBus, EventContext
    from mesh.patterns.gather import Gather, GatherRule, GatherTopics
    from mesh.patterns.pipeline import Pipeline, PipelineTopics, Stage
    from mesh.patterns.supervision.supervisor import Supervisor, SupervisorPolicy
    from mesh.patterns.supervision.worker import WorkerService, WorkerTopics

_PATTERNS = {  # exported name -> the module that defines it
    "Chain": "mesh.patterns.chain",
    "Coordinator": "mesh.patterns.delegation.coordinator",
    "DelegationTopics": "mesh.patterns.delegation.coordinator",
    "Specialist": "mesh.patterns.delegation.coordinator",
    "EventBus": "mesh.patterns.events",
    "EventContext": "mesh.patterns.events",
    "Gather": "mesh.patterns.gather",
    "GatherRule": "mesh.patterns.gather",
    "GatherTopics": "mesh.patterns.gather",
    "Pipeline": "mesh.patterns.pipeline",
    "PipelineTopics": "mesh.patterns.pipeline",
    "Stage": "mesh.patterns.pipeline",
    "Supervisor": "mesh.patterns.supervision.supervisor",
    "SupervisorPolicy": "mesh.patterns.supervision.supervisor",
    "WorkerService": "mesh.patterns.supervision.worker",
    "WorkerTopics": "mesh.patterns.supervision.worker",
}


def __getattr__(name: str) -> Any:
    """A pattern's class, imported from its module on first use (PEP 562)."""
    module = _PATTERNS.get(name)
    if module is None:
        raise AttributeError(f"module 'mesh' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


__all__ = [
    "Agent",
    "AgentRunner",
    "ApacheKafka",
    "App",
    "AvroSerde",
    "BreakerOpen",
    "BrokerLost",
    "Chain",
    "Codec",
    "CompactedTable",
    "ConfigError",
    "Context",
    "Coordinator",
    "DecodeError",
    "DelegationTopics",
    "EmbeddedBroker",
    "Emitter",
    "Envelope",
    "EventBus",
    "EventContext",
    "Gather",
    "GatherRule",
    "GatherTopics",
    "HandlerError",
    "Held",
    "InputError",
    "Mesh",
    "MeshError",
    "MeshSettings",
    "Outcome",
    "PayloadInvalid",
    "PayloadTooLarge",
    "Pipeline",
    "PipelineTopics",
    "RetryPolicy",
    "SignatureInvalid",
    "Specialist",
    "Stage",
    "Supervisor",
    "SupervisorPolicy",
    "Topic",
    "TopicBundle",
    "TransportError",
    "WorkerService",
    "WorkerTopics",
    "agent",
    "apply_topics",
    "derive_event_id",
]
