"""Plain agents for the runtime's tests (not the Chain pattern: that is
:mod:`mesh.patterns.chain`, tested in test_chain.py): three stages in sequence
(in -> a -> b -> out) and a fan-out pair on ``a``.

Each stage appends its name to ``hops``. A payload whose ``text`` is ``"poison"`` makes
a stage raise (not retriable), ``"flaky"`` raises a retriable error on the first
attempt; ``sleep_ms`` makes a stage slow.
"""

from __future__ import annotations

import asyncio
import os

from pydantic import BaseModel, Field

from mesh import Agent, App, Context, Topic


class Item(BaseModel):
    """One test event: a key, its per-key sequence number and the injected id."""

    key: str
    seq: int
    source_id: str
    text: str = ""
    sleep_ms: int = 0
    hops: list[str] = Field(default_factory=list)


class Other(BaseModel):
    """A payload of another schema, for wrong-schema tests."""

    name: str
    size: float


def build(prefix: str, partitions: int = 4) -> App:
    """The chain app with topics named ``<prefix>.*``."""
    topics = {name: Topic(f"{prefix}.{name}", Item, key="key", partitions=partitions)
              for name in ("in", "a", "b", "out", "fan1", "fan2")}

    def stage(name: str, source: str, target: str) -> Agent[Item]:
        async def handle(item: Item, ctx: Context) -> Item:
            if item.text == "poison":
                raise ValueError(f"stage {name} cannot handle poison item {item.source_id}")
            if item.text == "flaky" and ctx.attempt == 1 and name not in item.hops:
                raise TimeoutError("flaky downstream")
            if item.sleep_ms:
                await asyncio.sleep(item.sleep_ms / 1000)
            return item.model_copy(update={"hops": [*item.hops, name]})

        return Agent(f"{prefix}-{name}", consumes=topics[source], produces=topics[target],
                     handler=handle)

    return App(prefix, agents=[
        stage("stage1", "in", "a"), stage("stage2", "a", "b"), stage("stage3", "b", "out"),
        stage("fan1", "a", "fan1"), stage("fan2", "a", "fan2"),
    ])


PREFIX = os.environ.get("MESH_TEST_PREFIX", "chain")
# a test that builds the chain with other partition counts passes them to `mesh run` too
app = build(PREFIX, partitions=int(os.environ.get("MESH_TEST_PARTITIONS", "4")))
stage1, stage2, stage3, fan1, fan2 = app.agents
chain = App(PREFIX, agents=[stage1, stage2, stage3])
