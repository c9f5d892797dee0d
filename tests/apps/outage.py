"""An agent that calls an HTTP downstream for every item through a circuit breaker.

Topics are named from ``MESH_TEST_PREFIX``; the downstream URL is ``OUTAGE_URL``. The
source topic has one partition and retries are blocking (in place), so calls are
sequential, the test can bound them and per-key order holds: with the default retry
topics, the failures before the breaker opens would be retried from a retry topic after
later inputs of the same key.
A 5xx answer or a connection failure is a retriable failure (it counts for the breaker);
when the breaker is open the handler raises ``BreakerOpen`` and the runtime holds the
input. The breaker comes from a module-level registry, started on first use.
"""

from __future__ import annotations

import asyncio
import os
import urllib.error
import urllib.request

from mesh import Agent, Context, Topic
from mesh.policy import RetryPolicy
from mesh.resilience.breaker import BreakerPolicy, BreakerRegistry, breaker_topics
from tests.apps.stages import Item

PREFIX = os.environ.get("MESH_TEST_PREFIX", "outage")
URL = os.environ.get("OUTAGE_URL", "http://127.0.0.1:9/")
POLICY = BreakerPolicy(failure_threshold=3, reset_timeout=2.0, half_open_probes=1)
RETRY = RetryPolicy(attempts=5, base_ms=50, blocking=True)


def topics_of(prefix: str) -> tuple[Topic[Item], Topic[Item]]:
    """The source and sink topics for ``prefix`` (the breaker topics: breaker_topics)."""
    return (Topic(f"{prefix}.calls", Item, key="key", partitions=1),
            Topic(f"{prefix}.called", Item, key="key", partitions=1))


source, sink = topics_of(PREFIX)
breakers = BreakerRegistry(breaker_topics(PREFIX))


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return int(response.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except urllib.error.URLError as exc:
        raise ConnectionError(f"{url}: {exc.reason}") from exc


async def call_downstream(item: Item) -> None:
    status = await asyncio.to_thread(_get, f"{URL}?id={item.source_id}")
    if status >= 500:
        raise ConnectionError(f"downstream answered {status} for {item.source_id}")


async def handle(item: Item, ctx: Context) -> Item:
    breaker = await breakers.get("downstream", ctx.runner.settings, POLICY)
    async with breaker.guard(correlation_id=ctx.correlation_id):
        await call_downstream(item)
    return item.model_copy(update={"hops": [*item.hops, "called"]})


agent = Agent(f"{PREFIX}-caller", consumes=source, produces=sink, handler=handle,
              retry=RETRY)
