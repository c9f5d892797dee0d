"""Headers on a real broker: only the value can dead-letter an event; malformed optional
headers are replaced and counted; tracestate and a producer's own headers travel on."""

from __future__ import annotations

from mesh import Agent, Codec, Context, Mesh, Topic, apply_topics
from mesh.envelope import ATTEMPT, TRACEPARENT, TRACESTATE
from mesh.kafka.base import OutRecord
from tests.apps.stages import Item
from tests.conftest import BrokerUnderTest
from tests.support import encode, inject, make_items, read_all, wait_for_count

TRACE = "00-0af7651916cd43dd8448eb211c902ab7-b7ad6b7169203331-01"


def _build(prefix: str) -> Agent[Item]:
    inbox = Topic(f"{prefix}.in", Item, key="key", partitions=2)
    out = Topic(f"{prefix}.out", Item, key="key", partitions=2)

    async def handle(item: Item, ctx: Context) -> Item | None:
        if item.text == "override":  # an output's own header wins over the carried one
            ctx.emit(out, item.model_copy(update={"hops": ["override"]}),
                     headers={"tenant": "other", "route": "b"})
            return None
        return item.model_copy(update={"hops": [ctx.headers.get("tenant", b"-").decode()]})

    return Agent(f"{prefix}-stage", consumes=inbox, produces=out, handler=handle)


def _with(record: OutRecord, *extra: tuple[str, bytes | None]) -> OutRecord:
    kept = tuple(h for h in record.headers if h[0] not in {name for name, _ in extra})
    return OutRecord(record.topic, record.value, record.key,
                     kept + extra)  # type: ignore[arg-type]  # a null header value is legal


async def test_malformed_optional_headers_are_replaced_and_foreign_ones_travel_on(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: records with a malformed attempt, a null attempt, a traceparent that is not
    W3C (with a tracestate) are handled, not dead-lettered, and counted; a valid
    traceparent's tracestate and the producer's `tenant` header reach the output; an
    invalid traceparent gets a new trace without its tracestate; emit(headers=)
    overrides the carried header."""
    agent = _build(prefix)
    source, sink = agent.consumes[0], agent.produces[0]
    settings = broker.settings()
    await apply_topics(settings.kafka, agent.all_topics)
    codec = Codec()
    items = make_items(keys=1, per_key=5)
    items[4] = items[4].model_copy(update={"text": "override"})
    plain = [encode(codec, source, i) for i in items]
    tenant = ("tenant", b"acme")
    sent = [
        _with(plain[0], (ATTEMPT, b"one"), tenant),
        _with(plain[1], (ATTEMPT, None), tenant),
        _with(plain[2], (TRACEPARENT, b"not-a-trace"), (TRACESTATE, b"v=1"), tenant),
        _with(plain[3], (TRACEPARENT, TRACE.encode()), (TRACESTATE, b"v=2"), tenant),
        _with(plain[4], tenant),
    ]
    async with Mesh(settings, [agent]) as mesh:
        await mesh.wait_assigned()
        await inject(settings, sent)
        outputs = await wait_for_count(settings, [sink.name], len(items))
        runner = mesh.runners[0]
    assert await read_all(settings, [source.dlq_name]) == []
    assert runner.dead_lettered == 0 and runner.invalid_headers == 3
    by_source = {}
    for record in outputs:
        item = await codec.decode(sink, record.value or b"")
        by_source[item.source_id] = (item, dict(record.headers))  # type: ignore[attr-defined]
    ids = [i.source_id for i in items]
    for n in range(4):
        item, headers = by_source[ids[n]]
        assert item.hops == ["acme"] and headers["tenant"] == b"acme"
    _, broken = by_source[ids[2]]
    assert TRACESTATE not in broken and b"0af7651916cd43dd" not in broken[TRACEPARENT]
    _, traced = by_source[ids[3]]
    assert traced[TRACESTATE] == b"v=2"
    assert traced[TRACEPARENT].split(b"-")[1] == TRACE.split("-")[1].encode()
    overridden, headers = by_source[ids[4]]
    assert overridden.hops == ["override"]
    assert (headers["tenant"], headers["route"]) == (b"other", b"b")


async def test_propagate_headers_chooses_which_foreign_headers_travel(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: with propagate_headers=["tenant"] only `tenant` reaches the output; with
    False none does; the handler still sees both on ctx.headers."""
    seen: list[dict[str, bytes]] = []

    def build(name: str, rule: bool | list[str]) -> Agent[Item]:
        inbox = Topic(f"{prefix}.{name}.in", Item, key="key", partitions=1)
        out = Topic(f"{prefix}.{name}.out", Item, key="key", partitions=1)

        async def handle(item: Item, ctx: Context) -> Item:
            seen.append(ctx.headers)
            return item

        return Agent(f"{prefix}-{name}", consumes=inbox, produces=out, handler=handle,
                     propagate_headers=rule)

    some, none = build("some", ["tenant"]), build("none", False)
    settings = broker.settings()
    await apply_topics(settings.kafka, [*some.all_topics, *none.all_topics])
    codec = Codec()
    item = make_items(keys=1, per_key=1)[0]
    async with Mesh(settings, [some, none]) as mesh:
        await mesh.wait_assigned()
        await inject(settings, [_with(encode(codec, a.consumes[0], item), ("tenant", b"acme"),
                                      ("x-debug", b"1")) for a in (some, none)])
        kept = await wait_for_count(settings, [some.produces[0].name], 1)
        dropped = await wait_for_count(settings, [none.produces[0].name], 1)
    assert dict(kept[0].headers).get("tenant") == b"acme"
    assert "x-debug" not in dict(kept[0].headers)
    assert not {"tenant", "x-debug"} & set(dict(dropped[0].headers))
    assert all(h == {"tenant": b"acme", "x-debug": b"1"} for h in seen) and len(seen) == 2
