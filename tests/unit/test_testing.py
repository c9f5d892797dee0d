"""mesh.testing.InMemoryMesh: users' agents through the real runtime code, no broker."""

from __future__ import annotations

import time

import pytest
from pydantic import BaseModel

from examples.chain_fanout import app as demo_app
from mesh import (
    Agent,
    BreakerOpen,
    Context,
    HandlerError,
    Held,
    RetryPolicy,
    Topic,
    derive_event_id,
)
from mesh.errors import ConfigError
from mesh.kafka.base import OutRecord
from mesh.kafka.murmur import partition_for
from mesh.patterns.chain import Chain
from mesh.patterns.gather import Gather, GatherTopics, branch
from mesh.resilience.breaker import BreakerPolicy, CircuitBreaker
from mesh.runtime import retry
from mesh.runtime.audit import audit_topic, expand
from mesh.testing import DrainLimitReached, InMemoryMesh, InMemoryTopics
from topics.demo import (
    ResearchRequest,
    articles,
    drafts,
    fact_checks,
    findings,
    requests,
)


class Order(BaseModel):
    order_id: str
    sku: str = "apple"
    text: str = ""


class Receipt(BaseModel):
    order_id: str
    note: str


class Count(BaseModel):
    sku: str
    n: int


class Tick(BaseModel):
    at_ms: int


orders = Topic("tk.orders", Order, key="order_id", partitions=3)
receipts = Topic("tk.receipts", Receipt, key="order_id", partitions=3)
counts = Topic("tk.counts", Count, key="sku", compacted=True)
ticks = Topic("tk.ticks", Tick)


def receipt_agent(name: str, *, fail: dict[str, BaseException] | None = None,
                  retry_policy: RetryPolicy | None = None,
                  seen: list[tuple[str, int]] | None = None) -> Agent[Order]:
    """An agent answering each order with a receipt; ``fail[text]`` is raised on the
    first attempt for an order with that text (every attempt for "poison")."""
    async def handle(order: Order, ctx: Context) -> Receipt:
        if seen is not None:
            seen.append((order.order_id, ctx.attempt))
        error = (fail or {}).get(order.text)
        if error is not None and (ctx.attempt == 1 or order.text == "poison"):
            raise error
        return Receipt(order_id=order.order_id, note=f"{name} #{ctx.attempt}")

    return Agent(name, consumes=orders, produces=receipts, handler=handle,
                 retry=retry_policy)


async def test_demo_request_comes_out_as_article_and_fact_check_with_derived_ids() -> None:
    async with InMemoryMesh(demo_app) as mesh:
        sent = await mesh.emit(requests, ResearchRequest(request_id="r1",
                                                         subject="kafka streams"))
        assert await mesh.drain() == 4  # researcher, writer, fact checker, editor

        [article] = mesh.events(articles)
        [check] = mesh.events(fact_checks)
        [found] = mesh.events(findings)
        [draft] = mesh.events(drafts)
    assert article.payload.title == "On Kafka Streams"
    assert check.payload.checked == 3 and check.payload.flagged == []
    assert {e.correlation_id for e in (found, draft, article, check)} == {sent.correlation_id}
    assert found.event_id == derive_event_id("demo-researcher", sent.event_id, 0)
    assert draft.event_id == derive_event_id("demo-writer", found.event_id, 0)
    assert article.event_id == derive_event_id("demo-editor", draft.event_id, 0)
    assert check.event_id == derive_event_id("demo-fact-checker", found.event_id, 0)
    assert (article.causation_id, article.source) == (draft.event_id, "demo-editor")
    trace_id = sent.traceparent.split("-")[1]
    assert all(e.traceparent.split("-")[1] == trace_id for e in (found, draft, article, check))


async def test_every_handling_and_output_is_audited_like_production() -> None:
    async with InMemoryMesh(demo_app) as mesh:
        sent = await mesh.emit(requests, ResearchRequest(request_id="r2", subject="x"))
        await mesh.drain()
        records = mesh.payloads(audit_topic)
    assert len(records) == 5  # the emit's, then one per input handled (with its outputs)
    audit = [one for record in records for one in expand(record)]  # type: ignore[arg-type]
    consumed = sorted((a.agent, a.outcome) for a in audit if a.kind == "consumed")
    assert consumed == [("demo-editor", "ok"), ("demo-fact-checker", "ok"),
                        ("demo-researcher", "ok"), ("demo-writer", "ok")]
    produced = [a for a in audit if a.kind == "produced"]
    assert len(produced) == 5  # the emit and one output per agent
    assert {a.correlation_id for a in audit} == {sent.correlation_id}


async def test_poison_input_goes_to_dead_letter_with_the_real_headers() -> None:
    agent = receipt_agent("biller", fail={"poison": ValueError("cannot bill poison")})
    async with InMemoryMesh(agent) as mesh:
        bad = await mesh.emit(orders, Order(order_id="o1", text="poison"))
        await mesh.emit(orders, Order(order_id="o2"))
        await mesh.drain()

        [letter] = mesh.dead_letters(orders)
        [original] = [r for r in mesh.records(orders) if r.key == b"o1"]
        receipts_out = mesh.payloads(receipts)
    assert (letter.origin_topic, letter.origin_partition, letter.origin_offset) == (
        "tk.orders", original.partition, original.offset)
    assert (letter.error_class, letter.error, letter.attempts, letter.agent) == (
        "ValueError", "cannot bill poison", 3, "biller")  # retried: any exception is
    assert letter.event_id == bad.event_id
    assert letter.record.value == original.value and letter.record.key == b"o1"
    assert [r.order_id for r in receipts_out] == ["o2"]  # the partition moved on


async def test_undecodable_bytes_go_to_dead_letter_and_the_agent_goes_on() -> None:
    async with InMemoryMesh(receipt_agent("biller")) as mesh:
        await mesh.send(OutRecord(orders.name, b"\x01not avro", b"o9"))
        await mesh.emit(orders, Order(order_id="o9"))
        await mesh.drain()
        [letter] = mesh.dead_letters(orders.dlq_name)
        assert letter.error_class == "DecodeError"
        assert [r.order_id for r in mesh.payloads(receipts)] == ["o9"]


async def test_retriable_failure_goes_to_retry_topic_then_succeeds() -> None:
    seen: list[tuple[str, int]] = []
    flaky = receipt_agent("biller", fail={"flaky": TimeoutError("pricing timed out")},
                          seen=seen)
    other = receipt_agent("archiver")  # the same topic in another group: no retries for it
    async with InMemoryMesh([flaky, other], fast_retries=True) as mesh:
        await mesh.emit(orders, Order(order_id="o1", text="flaky"))
        await mesh.drain()

        [scheduled] = mesh.records("tk.orders.retry.1")
        headers = retry.headers_of(scheduled)
        notes = sorted(r.note for r in mesh.payloads(receipts))
        letters = mesh.dead_letters(orders)
    assert headers[retry.RETRY_GROUP] == "biller" and headers["mesh-attempt"] == "2"
    assert "TimeoutError: pricing timed out" in headers[retry.RETRY_ERROR]
    assert seen == [("o1", 1), ("o1", 2)]
    assert notes == ["archiver #1", "biller #2"]
    assert letters == []


async def test_retries_wait_until_due_without_fast_retries() -> None:
    seen: list[tuple[str, int]] = []
    agent = receipt_agent("biller", fail={"flaky": ConnectionError("down")}, seen=seen,
                          retry_policy=RetryPolicy(attempts=2, base_ms=30))
    async with InMemoryMesh(agent) as mesh:
        await mesh.emit(orders, Order(order_id="o1", text="flaky"))
        await mesh.drain()
        [scheduled] = mesh.records("tk.orders.retry.1")
        [receipt] = mesh.records(receipts)
    assert seen == [("o1", 1), ("o1", 2)]
    assert receipt.timestamp_ms >= retry.due_ms(scheduled)


async def test_retries_run_out_into_dead_letter_after_on_failure() -> None:
    failed: list[str] = []

    async def always(order: Order, ctx: Context) -> Receipt:
        raise HandlerError("pricing down", retriable=True)

    async def on_failure(order: Order, ctx: Context, error: BaseException) -> None:
        failed.append(f"{order.order_id}: {error}")
        ctx.emit(receipts, Receipt(order_id=order.order_id, note="failed"))

    agent = Agent("biller", consumes=orders, produces=receipts, handler=always,
                  on_failure=on_failure, retry=RetryPolicy(attempts=3))
    async with InMemoryMesh(agent, fast_retries=True) as mesh:
        await mesh.emit(orders, Order(order_id="o1"))
        await mesh.drain()
        [letter] = mesh.dead_letters(orders)
        assert [r.note for r in mesh.payloads(receipts)] == ["failed"]
        assert len(mesh.records("tk.orders.retry.1")) == len(
            mesh.records("tk.orders.retry.2")) == 1
    assert (letter.attempts, letter.error_class, letter.origin_topic) == (
        3, "HandlerError", "tk.orders")
    assert failed == ["o1: pricing down"]


async def test_gather_merges_branches_and_lists_failures() -> None:
    topics = GatherTopics.named("tk.research", Order, key="order_id")

    def lookup(order: Order) -> dict[str, str]:
        raise LookupError(f"no table for {order.sku}")

    web = branch("web", lambda order: {"found": order.sku}, topics=topics)
    db = branch("db", lookup, topics=topics)
    fan_in = Gather("research-gather", topics=topics, branches=[web, db])
    async with InMemoryMesh([web, db, fan_in]) as mesh:
        sent = await mesh.emit(topics.requests, Order(order_id="q1", sku="pears"))
        await mesh.drain()
        [merged] = mesh.events(topics.merged)
    assert merged.correlation_id == sent.correlation_id
    assert merged.payload.outcome == "completed" and merged.payload.success is False
    assert merged.payload.successes == ["web"]
    assert merged.payload.individual_results == [{"found": "pears"}]
    assert [(f.agent, f.error_class) for f in merged.payload.failures] == [("db", "LookupError")]


async def test_gather_deadline_through_a_timer_lists_the_silent_branch() -> None:
    topics = GatherTopics.named("tk.deadline", Order, key="order_id")
    web = branch("web", lambda order: {"found": order.sku}, topics=topics)
    fan_in = Gather("deadline-gather", topics=topics, branches=[web, "absent"],
                    deadline_of=lambda order: 0.0)  # due at once: no waiting in the test
    async with InMemoryMesh([web, fan_in]) as mesh:
        await mesh.emit(topics.requests, Order(order_id="q1"))
        await mesh.drain()
        assert mesh.payloads(topics.merged) == []
        assert await mesh.run_timers(fan_in) == 1
        await mesh.drain()
        [merged] = mesh.payloads(topics.merged)
        row = mesh.table(topics.state).get(merged.correlation_id)
    assert (merged.outcome, merged.timed_out, merged.successes) == (
        "timed_out", ["absent"], ["web"])
    assert row is not None and row.status == "done"


async def test_chain_completes_and_a_failing_step_reports_chain_failed() -> None:
    async def research(order: Order, ctx: Context) -> dict[str, str]:
        if order.text == "poison":
            raise ValueError("no sources")
        return {"facts": order.sku}

    async def summarise(found: dict[str, str], ctx: Context) -> str:
        return f"about {found['facts']}"

    chain = Chain("tk.notes", [research, summarise], key="order_id")
    async with InMemoryMesh(chain.app) as mesh:
        await mesh.emit(chain.source, Order(order_id="n1", sku="plums"))
        await mesh.emit(chain.source, Order(order_id="n2", text="poison"))
        await mesh.drain()
        [done] = mesh.payloads(chain.completed)
        [failed] = mesh.payloads(chain.failed)
        [letter] = mesh.dead_letters(chain.source)
    assert (done.key, done.result) == ("n1", "about plums")
    assert (failed.key, failed.failed_step, failed.error_class) == ("n2", 0, "ValueError")
    assert letter.error == "no sources"


async def test_state_written_with_put_is_read_with_get_and_dropped_on_failure() -> None:
    async def count(order: Order, ctx: Context) -> Receipt:
        seen = ctx.get(counts, order.sku)
        ctx.put(counts, order.sku, Count(sku=order.sku, n=(seen.n if seen else 0) + 1))
        if order.text == "poison":
            raise ValueError("after the write")  # the staged write must be dropped
        now = ctx.get(counts, order.sku)  # sees the handler's own staged write
        return Receipt(order_id=order.order_id, note=f"#{now.n if now else 0}")

    agent = Agent("counter", consumes=orders, produces=receipts, handler=count,
                  state=[counts])
    async with InMemoryMesh(agent) as mesh:
        await mesh.seed(counts, "apple", Count(sku="apple", n=10))
        for n, text in enumerate(["", "", "poison", "", ""]):
            await mesh.emit(orders, Order(order_id=f"o{n}", text=text))
        await mesh.emit(orders, Order(order_id="p", sku="pear"))
        await mesh.drain()
        table = mesh.table(counts)
        stored = mesh.payloads(counts)
        notes = [r.note for r in mesh.payloads(receipts)]
    assert table.get("apple") == Count(sku="apple", n=14)
    assert table.get("pear") == Count(sku="pear", n=1)
    assert sorted(notes) == ["#1", "#11", "#12", "#13", "#14"]
    assert [c.n for c in stored if c.sku == "apple"] == [10, 11, 12, 13, 14]


async def test_timer_runs_once_when_asked_and_its_output_is_delivered() -> None:
    heard: list[int] = []

    async def hear(tick: Tick, ctx: Context) -> None:
        heard.append(tick.at_ms)

    clock = Agent("clock", consumes=orders, produces=ticks)

    @clock.every(60.0)
    async def beat(ctx: Context) -> None:
        assert ctx.owns(orders, 2)  # the fake replica owns every partition
        ctx.emit(ticks, Tick(at_ms=42))

    listener = Agent("listener", consumes=ticks, handler=hear)
    async with InMemoryMesh([clock, listener]) as mesh:
        assert await mesh.run_timers("clock") == 1
        await mesh.drain()
        [event] = mesh.events(ticks)
    assert heard == [42]
    assert event.source == "clock"


async def test_drain_bound_names_the_loop() -> None:
    ping_topic = Topic("tk.ping", Order, key="order_id")
    pong_topic = Topic("tk.pong", Order, key="order_id")

    async def bounce(order: Order, ctx: Context) -> Order:
        return order

    ping = Agent("ping", consumes=ping_topic, produces=pong_topic, handler=bounce)
    pong = Agent("pong", consumes=pong_topic, produces=ping_topic, handler=bounce)
    async with InMemoryMesh([ping, pong]) as mesh:
        await mesh.emit(ping_topic, Order(order_id="o1"))
        with pytest.raises(DrainLimitReached, match=r"ping <- tk\.ping.*pong <- tk\.pong|"
                                                    r"pong <- tk\.pong.*ping <- tk\.ping"):
            await mesh.drain(max_steps=50)
        assert len(mesh.records(ping_topic)) + len(mesh.records(pong_topic)) == 51


async def test_held_input_stays_pending_until_the_hold_ends() -> None:
    calls: list[str] = []

    async def guarded(order: Order, ctx: Context) -> Receipt:
        calls.append(order.order_id)
        if len(calls) == 1:
            raise Held("pricing breaker open", until=time.time() + 3600)
        return Receipt(order_id=order.order_id, note="priced")

    agent = Agent("pricer", consumes=orders, produces=receipts, handler=guarded)
    async with InMemoryMesh(agent) as mesh:
        await mesh.emit(orders, Order(order_id="o1"))
        await mesh.drain()
        assert list(mesh.held) == ["pricer"] and "breaker open" in str(mesh.held["pricer"])
        assert [r.key for r in mesh.pending("pricer")] == [b"o1"]
        assert mesh.records(receipts) == [] and mesh.dead_letters(orders) == []

        mesh.release_holds()
        await mesh.drain()
        assert mesh.held == {} and mesh.pending() == []
        assert [r.note for r in mesh.payloads(receipts)] == ["priced"]
    assert calls == ["o1", "o1"]


async def test_open_local_breaker_holds_input_until_the_downstream_recovers() -> None:
    shift = [0.0]  # the breaker's clock runs ahead when the test says so
    breaker = CircuitBreaker("pricing", BreakerPolicy(failure_threshold=1, reset_timeout=30),
                             clock=lambda: time.time() + shift[0])
    down = [True]

    async def price(order: Order, ctx: Context) -> Receipt:
        async with breaker.guard(correlation_id=ctx.correlation_id):
            if down[0]:
                raise ConnectionError("pricing down")
        return Receipt(order_id=order.order_id, note="priced")

    agent = Agent("pricer", consumes=orders, produces=receipts, handler=price)
    async with InMemoryMesh(agent, fast_retries=True) as mesh:
        await mesh.emit(orders, Order(order_id="o1"))
        await mesh.drain()
        assert isinstance(mesh.held["pricer"], BreakerOpen)
        opened = breaker.state

        mesh.release_holds()  # the breaker is still open: held again, not dead-lettered
        await mesh.drain()
        assert "pricer" in mesh.held and breaker.rejected == 1

        down[0], shift[0] = False, 31.0  # recovered, and the reset timeout has passed
        mesh.release_holds()
        await mesh.drain()
        assert [r.note for r in mesh.payloads(receipts)] == ["priced"]
        assert (opened, breaker.state) == ("open", "closed")
        assert mesh.records("tk.orders.retry.1") == [] and mesh.dead_letters(orders) == []


def test_agents_sharing_a_group_are_refused() -> None:
    one = receipt_agent("a")
    two = Agent("b", consumes=orders, produces=receipts, group="a",
                handler=one.handle)
    with pytest.raises(ConfigError, match="share consumer group"):
        InMemoryMesh([one, two])


async def test_emitting_the_wrong_model_is_refused() -> None:
    async with InMemoryMesh(receipt_agent("biller")) as mesh:
        with pytest.raises(ConfigError, match="carries Order"):
            await mesh.emit(orders, Receipt(order_id="o1", note="x"))  # type: ignore[misc]


def test_in_memory_topics_partition_by_key_and_keep_explicit_partitions() -> None:
    topics = InMemoryTopics([orders])
    first = topics.append(OutRecord(orders.name, b"1", b"k"))
    again = topics.append(OutRecord(orders.name, b"2", b"k"))
    pinned = topics.append(OutRecord("tk.orders.retry.1", b"3", b"k", partition=2))
    assert first.partition == again.partition == partition_for(b"k", 3)
    assert (first.offset, again.offset) == (0, 1)
    assert (pinned.partition, pinned.offset) == (2, 0)
    with pytest.raises(ConfigError, match="names partition 3"):
        topics.append(OutRecord(orders.name, b"4", None, partition=3))
