"""Testing tools: :class:`InMemoryMesh` (the kit: users' agents through the real
runtime code, no broker) and :mod:`.checker` (the delivery oracle the fault tests
use). :class:`InMemoryProducer` is the in-memory side of the producer seam
(:mod:`mesh.kafka.memory`)."""

from mesh.kafka.memory import InMemoryProducer
from mesh.testing.kit import DrainLimitReached, InMemoryMesh
from mesh.testing.log import InMemoryTopics

__all__ = ["DrainLimitReached", "InMemoryMesh", "InMemoryProducer", "InMemoryTopics"]
