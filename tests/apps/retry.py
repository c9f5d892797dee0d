"""An agent with non-blocking retries through retry topics, for `mesh run`.

``text == "flaky"``: a TimeoutError on the first attempt; ``"down"``: a TimeoutError
on every attempt. The retry delay comes from ``MESH_TEST_RETRY_BASE_MS``.
"""

from __future__ import annotations

import os

from mesh import Agent, Context, Topic
from mesh.policy import RetryPolicy
from tests.apps.stages import Item


def build(prefix: str, *, base_ms: int = 200, attempts: int = 3) -> Agent[Item]:
    inbox = Topic(f"{prefix}.in", Item, key="key", partitions=2)
    out = Topic(f"{prefix}.out", Item, key="key", partitions=2)

    async def handle(item: Item, ctx: Context) -> Item:
        if item.text == "down" or (item.text == "flaky" and ctx.attempt == 1):
            raise TimeoutError(f"downstream timed out on {item.source_id}")
        return item.model_copy(update={"hops": [f"attempt={ctx.attempt}"]})

    return Agent(f"{prefix}-retrier", consumes=inbox, produces=out, handler=handle,
                 retry=RetryPolicy(attempts=attempts, base_ms=base_ms, factor=2.0))


PREFIX = os.environ.get("MESH_TEST_PREFIX", "retry")
agent = build(PREFIX, base_ms=int(os.environ.get("MESH_TEST_RETRY_BASE_MS", "200")))
