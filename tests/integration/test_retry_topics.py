"""Non-blocking retries through `<topic>.retry.<n>` on a real broker."""

from __future__ import annotations

from mesh import Agent, Codec, Context, Mesh, Topic, apply_topics
from mesh.envelope import ATTEMPT
from mesh.kafka.base import OutRecord
from mesh.policy import RetryPolicy
from mesh.runtime.dead_letter import DLQ_ATTEMPTS, DLQ_ERROR_CLASS, DLQ_OFFSET, DLQ_TOPIC
from mesh.runtime.retry import FIRST_FAILURE, LAST_FAILURE, RETRY_DUE, headers_of
from mesh.testing.checker import check
from tests.apps.retry import build
from tests.apps.stages import Item
from tests.conftest import BrokerUnderTest
from tests.support import encode, event_id, history, inject, make_items, read_all, wait_for_count


async def test_retriable_failures_go_through_retry_topics_without_blocking_the_partition(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: flaky items (fail once) are retried through `in.retry.1` and succeed on
    attempt 2, after good items produced behind them on the same partition (the
    partition was not blocked); items failing every time go to `in.dlq` after exactly
    3 attempts with first/last failure times and their original position; nothing is
    lost or duplicated, and order breaks only where a retried item came back late."""
    agent = build(prefix, base_ms=300)
    source, sink = agent.consumes[0], agent.produces[0]
    settings = broker.settings()
    await apply_topics(settings.kafka, agent.all_topics)
    assert [t.name for t in agent.retry_topics] == [f"{source.name}.retry.1",
                                                   f"{source.name}.retry.2"]
    codec = Codec()
    items = make_items(keys=2, per_key=6)
    flaky = {i.source_id for i in items[:2]}
    down = {i.source_id for i in items[2:4]}
    items = [i.model_copy(update={"text": "flaky" if i.source_id in flaky else
                                  "down" if i.source_id in down else i.text}) for i in items]
    async with Mesh(settings, [agent]) as mesh:
        await mesh.wait_assigned()
        positions = await inject(settings, [encode(codec, source, i) for i in items])
        outputs = await wait_for_count(settings, [sink.name], len(items) - len(down))
        await wait_for_count(settings, [source.dlq_name], len(down))
    decoded = [await codec.decode(sink, r.value or b"") for r in outputs]
    order = [o.source_id for o in decoded]  # type: ignore[attr-defined]
    for item in decoded:
        expected = "attempt=2" if item.source_id in flaky else "attempt=1"  # type: ignore[attr-defined]
        assert item.hops == [expected]  # type: ignore[attr-defined]
    good_after = [i.source_id for i in items[4:]]
    assert max(order.index(s) for s in good_after) < min(order.index(s) for s in flaky)
    retried = await read_all(settings, [t.name for t in agent.retry_topics])
    assert len(retried) == len(flaky) + 2 * len(down)  # tiers 1 and 2 for the down ones
    # Each retry is due its policy's delay after the failure that scheduled it (no jitter
    # here). The record's own timestamp is not a reference: under load its send can
    # trail the failure by more than the delay (a loaded CI run on Apache Kafka had it).
    due_of = {}
    for record in retried:
        headers = headers_of(record)
        failed_attempt = int(headers[ATTEMPT]) - 1
        assert (int(headers[RETRY_DUE]) - int(headers[LAST_FAILURE])
                == agent.retry.delay_ms(failed_attempt) == 300 * 2 ** (failed_attempt - 1))
        due_of[event_id(record)] = int(headers[RETRY_DUE])
    # ...and no retry was handled before it was due: the output it made was written later
    for record, item in zip(outputs, decoded, strict=True):
        if item.source_id in flaky:  # type: ignore[attr-defined]
            assert record.timestamp_ms >= due_of[item.source_id]  # type: ignore[attr-defined]
    dead = await read_all(settings, [source.dlq_name])
    by_id = {i.source_id: n for n, i in enumerate(items)}
    for record in dead:
        headers = {k: v.decode() for k, v in record.headers}
        assert headers[DLQ_ATTEMPTS] == "3" and headers[DLQ_ERROR_CLASS] == "TimeoutError"
        assert headers[DLQ_TOPIC] == source.name
        n = by_id[headers["mesh-event-id"]]
        assert int(headers[DLQ_OFFSET]) == positions[n][1]
        assert int(headers[FIRST_FAILURE]) < int(headers[LAST_FAILURE])
    report = check(await history(settings, codec, items, sink=sink, dlq=[source],
                                 bad_ids=down))
    # Non-blocking retries trade per-key order for a flowing partition (documented):
    # the only order violations are the retried items arriving after later ones.
    assert not (report.lost or report.sink_duplicates or report.unexpected_dead_letters
                or report.missing_dead_letters or report.applied_bad), report.summary()
    seq_of = {i.source_id: (i.key, i.seq) for i in items}
    assert {(v.key, v.seq) for v in report.order_violations} <= {seq_of[s] for s in flaky}
    assert mesh.runners[0].retried == len(flaky) + 2 * len(down)


async def test_a_plain_exception_is_retried_by_default_and_retry_on_narrows_it(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: an untyped RuntimeError on the first attempt is retried (the seed's rule:
    any exception but an input error) and the item comes out on attempt 2, nothing
    dead-lettered; the same agent with ``retry_on=(TimeoutError,)`` dead-letters it
    after its single attempt; undecodable bytes are never retried."""
    def build_plain(name: str, policy: RetryPolicy) -> Agent[Item]:
        inbox = Topic(f"{prefix}.{name}.in", Item, key="key", partitions=1)
        out = Topic(f"{prefix}.{name}.out", Item, key="key", partitions=1)

        async def handle(item: Item, ctx: Context) -> Item:
            if ctx.attempt == 1:
                raise RuntimeError(f"connection reset while handling {item.source_id}")
            return item.model_copy(update={"hops": [f"attempt={ctx.attempt}"]})

        return Agent(f"{prefix}-{name}", consumes=inbox, produces=out, handler=handle,
                     retry=policy)

    default = build_plain("default", RetryPolicy(base_ms=100))
    narrow = build_plain("narrow", RetryPolicy(base_ms=100, retry_on=(TimeoutError,)))
    settings = broker.settings()
    await apply_topics(settings.kafka, [*default.all_topics, *narrow.all_topics])
    codec = Codec()
    items = make_items(keys=1, per_key=2)
    async with Mesh(settings, [default, narrow]) as mesh:
        await mesh.wait_assigned()
        for agent in (default, narrow):
            await inject(settings, [encode(codec, agent.consumes[0], i) for i in items]
                         + [OutRecord(agent.consumes[0].name, b"\x00garbage", b"k0")])
        outputs = await wait_for_count(settings, [default.produces[0].name], len(items))
        await wait_for_count(settings, [default.consumes[0].dlq_name], 1, distinct=False)
        dead = await wait_for_count(settings, [narrow.consumes[0].dlq_name], len(items) + 1,
                                    distinct=False)
    hops = [(await codec.decode(default.produces[0], r.value or b"")).hops  # type: ignore[attr-defined]
            for r in outputs]
    assert hops == [["attempt=2"]] * len(items)
    classes = sorted(dict(r.headers)[DLQ_ERROR_CLASS].decode() for r in dead)
    assert classes == ["RuntimeError", "RuntimeError", "UnknownSchema"]
    assert all(dict(r.headers)[DLQ_ATTEMPTS] == b"1" for r in dead)
    retried = await read_all(settings, [t.name for t in default.retry_topics])
    assert len(retried) == len(items)  # the garbage was not retried
    assert mesh.runners[1].retried == 0
