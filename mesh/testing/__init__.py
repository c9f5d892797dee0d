"""Testing tools: :class:`InMemoryMesh` (the kit: users' agents through the real
runtime code, no broker) and :mod:`.checker` (the delivery oracle the fault tests
use)."""

from mesh.testing.kit import DrainLimitReached, InMemoryMesh, InMemoryProducer, InMemoryTopics

__all__ = ["DrainLimitReached", "InMemoryMesh", "InMemoryProducer", "InMemoryTopics"]
