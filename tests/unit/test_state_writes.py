"""State writes: one record per table and key for each input (crash safety)."""

from __future__ import annotations

from collections import Counter

from pydantic import BaseModel

from mesh import Agent, Context, Topic
from mesh.patterns.gather import Gather, GatherState, GatherTopics, branch
from mesh.testing.kit import InMemoryMesh


class Ask(BaseModel):
    ask_id: str


async def test_each_input_of_the_gather_writes_its_state_row_at_most_once() -> None:
    """Pass: the parts lane's four inputs of one request (request marker, two parts,
    the merged marker) write the row four times: the part that completes the request
    writes the done row alone, with no pending row before it. Two writes of one input
    may go in two produce requests; a crash between their acks left a pending row that
    the redelivery (already applied, by event id) never completed: in the Apache-session
    kill test, merged once, pending for ever."""
    topics = GatherTopics.named("tk.once", Ask, key="ask_id")
    alpha = branch("alpha", lambda ask: {"by": "alpha"}, topics=topics)
    beta = branch("beta", lambda ask: {"by": "beta"}, topics=topics)
    fan_in = Gather("once-gather", topics=topics, branches=[alpha, beta])
    async with InMemoryMesh([alpha, beta, fan_in]) as mesh:
        await mesh.emit(topics.requests, Ask(ask_id="a1"))
        await mesh.drain()
        rows = mesh.payloads(topics.state)
        [merged] = mesh.payloads(topics.merged)
    assert merged.success and sorted(merged.successes) == ["alpha", "beta"]
    assert all(isinstance(row, GatherState) for row in rows)
    assert len(rows) == 4, [(r.status, [p.agent for p in r.received]) for r in rows]
    assert Counter(r.status for r in rows) == {"pending": 2, "done": 2}
    assert rows[-1].status == "done" and rows[-1].merged is None  # read back: shrunk


class Count(BaseModel):
    n: int


async def test_a_key_written_twice_by_one_input_is_produced_once_with_its_last_value() -> None:
    """Pass: a handler that puts key "a" twice and "b" once produces two state records,
    "a" with its last value: the table and the log never differ by an intermediate
    value that a crash between two produce requests could leave behind."""
    asks = Topic("tk.twice.asks", Ask, key="ask_id")
    counts = Topic("tk.twice.counts", Count, compacted=True)

    async def handle(ask: Ask, ctx: Context) -> None:
        ctx.put(counts, "a", Count(n=1))
        ctx.put(counts, "b", Count(n=5))
        ctx.put(counts, "a", Count(n=2))

    agent = Agent("twice", consumes=asks, state=[counts], handler=handle)
    async with InMemoryMesh(agent) as mesh:
        await mesh.emit(asks, Ask(ask_id="x"))
        await mesh.drain()
        written = [(r.key, mesh.payloads(counts)[i]) for i, r in
                   enumerate(mesh.records(counts))]
        table = mesh.table(counts)
    assert written == [(b"a", Count(n=2)), (b"b", Count(n=5))]
    assert dict(table.items()) == {"a": Count(n=2), "b": Count(n=5)}
