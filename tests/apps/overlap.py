"""A slow exactly-once agent for `mesh run` that reports its own concurrency.

``slow`` (``<prefix>.in`` -> ``<prefix>.out``, 4 partitions, exactly-once, concurrency
16, ordering by key) waits ``sleep_ms`` per item and appends to its ``hops``
``running=N`` (its calls in flight in this process when the call started, itself
included) and ``key_running=M`` (the same, for the item's key): what a test reads back
to show that calls overlapped, never two of one key.
"""

from __future__ import annotations

import asyncio
import os
from collections import Counter

from mesh import Agent, Context, Topic
from tests.apps.stages import Item

CONCURRENCY = 16
_running: Counter[str] = Counter()  # calls in flight per key


async def handle(item: Item, ctx: Context) -> Item:
    _running[item.key] += 1
    hops = [f"running={sum(_running.values())}", f"key_running={_running[item.key]}"]
    try:
        await asyncio.sleep(item.sleep_ms / 1000)  # an LLM call's shape: waiting
    finally:
        _running[item.key] -= 1
    return item.model_copy(update={"hops": hops})


def build(prefix: str) -> Agent[Item]:
    """The agent with topics named ``<prefix>.*``."""
    inbox = Topic(f"{prefix}.in", Item, key="key", partitions=4)
    out = Topic(f"{prefix}.out", Item, key="key", partitions=4)
    return Agent(f"{prefix}-slow", consumes=inbox, produces=out, handler=handle,
                 exactly_once=True, concurrency=CONCURRENCY, ordering="key")


slow = build(os.environ.get("MESH_TEST_PREFIX", "overlap"))
