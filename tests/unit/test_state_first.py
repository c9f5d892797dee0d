"""An agent with ``state_first`` sends an input's outputs only once its state writes are
acknowledged (the coordinator: a person must not see an approval request whose workflow
state a crash could still lose)."""

from __future__ import annotations

import asyncio
from typing import Any

from pydantic import BaseModel

from mesh import Agent, Context, MeshSettings, RetryPolicy, Topic
from mesh.envelope import Envelope
from mesh.kafka.base import Acks, OutRecord, Record
from mesh.patterns.delegation.coordinator import Coordinator
from mesh.runtime.process import RecordProcessor
from mesh.serde.codec import Codec
from mesh.state import CompactedTable


class Ask(BaseModel):
    ask_id: str


class Row(BaseModel):
    ask_id: str
    seen: int


asks = Topic("sf.asks", Ask, key="ask_id")
rows = Topic("sf.rows", Row, key="ask_id", compacted=True)
answers = Topic("sf.answers", Ask, key="ask_id")


async def remember_and_answer(ask: Ask, ctx: Context) -> Ask:
    ctx.put(rows, ask.ask_id, Row(ask_id=ask.ask_id, seen=1))
    return ask


class Broker:
    """A send whose acks resolve when the test says: what went out, in which call."""

    def __init__(self) -> None:
        self.calls: list[list[str]] = []
        self.acks: list[list[asyncio.Future[Any]]] = []

    async def send(self, record: Record, records: list[OutRecord]) -> Acks:
        loop = asyncio.get_running_loop()
        self.calls.append([r.topic for r in records])
        futures: list[asyncio.Future[Any]] = [loop.create_future() for _ in records]
        self.acks.append(futures)
        return Acks(futures)  # type: ignore[arg-type]

    def ack(self, call: int, error: Exception | None = None) -> None:
        for offset, future in enumerate(self.acks[call]):
            if error is None:
                future.set_result(type("Meta", (), {"partition": 0, "offset": offset})())
            else:
                future.set_exception(error)


async def fail(ask: Ask, ctx: Context) -> None:
    raise ValueError("no answer")


async def remember_the_failure(ask: Ask, ctx: Context, error: BaseException) -> None:
    ctx.put(rows, ask.ask_id, Row(ask_id=ask.ask_id, seen=0))
    ctx.emit(answers, ask)


async def processor(state_first: bool, *, failing: bool = False
                    ) -> tuple[RecordProcessor, Broker, Record]:
    settings = MeshSettings()
    codec = Codec()
    await codec.prepare([asks, rows, answers])
    if failing:  # fails for good at once; its failure handler writes state and emits
        agent = Agent("sf", consumes=asks, produces=answers, state=[rows], handler=fail,
                      on_failure=remember_the_failure, retry=RetryPolicy(attempts=1))
    else:
        agent = Agent("sf", consumes=asks, produces=answers, state=[rows],
                      handler=remember_and_answer)
    table: CompactedTable[Row] = CompactedTable(rows, settings.kafka, codec)
    broker = Broker()

    def context(event: Envelope[Any]) -> Context:
        return Context(agent, event, tables={rows.name: table})

    value, _ = codec.encode(asks, Ask(ask_id="a1"))
    record = Record(asks.name, 0, 7, b"a1", value, (), 0)
    return (RecordProcessor(agent, settings, codec=codec, send=broker.send,
                            context=context, state_first=state_first), broker, record)


async def test_outputs_are_sent_only_after_the_state_write_is_acknowledged() -> None:
    """Pass: the state row goes out alone; the answer and the audit record follow only
    once the broker acknowledged it, and the input's acks cover both sends."""
    proc, broker, record = await processor(state_first=True)
    handling = asyncio.ensure_future(proc.process(record))
    for _ in range(20):  # bounded: the handler and the state send take a few loop turns
        await asyncio.sleep(0)
    assert broker.calls == [[rows.name]]
    assert not handling.done()
    broker.ack(0)
    acks = await asyncio.wait_for(handling, 5)
    assert broker.calls == [[rows.name], [answers.name, "mesh.audit"]]
    assert not acks.done()  # the answer's acks are part of the input's
    broker.ack(1)
    assert len(await acks.wait()) == 3


async def test_a_failed_state_write_sends_nothing_it_caused() -> None:
    """Pass: when the state write fails, the answer is never sent, and the input's acks
    fail (its offset is not committed: the input is handled again)."""
    proc, broker, record = await processor(state_first=True)
    handling = asyncio.ensure_future(proc.process(record))
    for _ in range(20):
        await asyncio.sleep(0)
    broker.ack(0, error=RuntimeError("NotEnoughReplicas"))
    acks = await asyncio.wait_for(handling, 5)
    assert broker.calls == [[rows.name]]
    assert acks.done()
    try:
        acks.check()
    except Exception as exc:  # the mesh's TransportError, naming the broker's error
        assert "NotEnoughReplicas" in str(exc)
    else:
        raise AssertionError("the failed state write's acks did not fail")


async def test_a_failure_handlers_outputs_and_dead_letter_wait_for_its_state_write() -> None:
    """Pass: an input that fails for good, whose failure handler writes state and
    emits: the state row goes out alone; the output, the audit record and the dead
    letter follow once the broker acknowledged it."""
    proc, broker, record = await processor(state_first=True, failing=True)
    handling = asyncio.ensure_future(proc.process(record))
    for _ in range(20):
        await asyncio.sleep(0)
    assert broker.calls == [[rows.name]]
    assert not handling.done()
    broker.ack(0)
    await asyncio.wait_for(handling, 5)
    assert broker.calls == [[rows.name], [answers.name, "mesh.audit", asks.dlq_name]]


async def test_without_state_first_everything_goes_in_one_send() -> None:
    """Pass: other agents send outputs, state and audit together (one round trip)."""
    proc, broker, record = await processor(state_first=False)
    await asyncio.wait_for(proc.process(record), 5)
    assert broker.calls == [[answers.name, rows.name, "mesh.audit"]]


def test_the_coordinator_writes_its_state_first() -> None:
    assert Coordinator.state_first and not Agent.state_first
