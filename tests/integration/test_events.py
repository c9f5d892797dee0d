"""Event-driven agents on a real broker: listeners of event types, the content flow,
publishing from outside, and `mesh tap` following the events."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import subprocess
import time
from collections import Counter, defaultdict
from typing import Any

import fastavro
import pytest
from fastavro.schema import fingerprint, to_parsing_canonical_form
from pydantic import BaseModel

from examples.events import EXPECTED, MAX_REVISIONS, REQUESTS
from mesh import Codec, Context, Envelope, Mesh, MeshSettings, apply_topics
from mesh.envelope import record_event_id
from mesh.errors import ConfigError
from mesh.kafka.base import OutRecord, Record
from mesh.kafka.transport import Producer
from mesh.patterns.events import EventBus, EventContext, ListenerFailed
from mesh.runtime.dead_letter import DLQ_AGENT
from mesh.serde.history import render
from tests.apps.events import build
from tests.conftest import ROOT, BrokerUnderTest
from tests.support import event_id, read_all, wait_for_count


class Ping(BaseModel):
    n: int
    text: str = ""


class Pong(BaseModel):
    n: int


class Noise(BaseModel):
    n: int


def small_bus(prefix: str) -> EventBus:
    """Three types, keyed by correlation id (no key field)."""
    return EventBus(f"{prefix}.ev", {"ping": Ping, "pong": Pong, "noise": Noise},
                    partitions=2, agent_prefix=f"{prefix}-")


class Seen:
    """What an in-process listener received, by event id (delivery is at-least-once)."""

    def __init__(self) -> None:
        self.events: dict[str, tuple[str | None, Any, str]] = {}
        self._changed = asyncio.Event()

    def add(self, ctx: EventContext, payload: Any) -> None:
        self.events.setdefault(ctx.event_id, (ctx.event_type, payload, ctx.correlation_id))
        self._changed.set()

    async def reach(self, count: int, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.events) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{len(self.events)} of {count} events after {timeout} s")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 1.0))


async def test_listener_receives_only_the_types_it_subscribes_to(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: a listener of ping+pong gets the 4 pings and the 4 pongs emitted in a handler
    (with the ping's correlation id), never the 4 noise events; the noise listener gets
    exactly those."""
    bus, collected, noise = small_bus(prefix), Seen(), Seen()

    @bus.on("ping", emits=["pong"])
    async def pinger(event: Ping, ctx: EventContext) -> None:
        ctx.emit("pong", Pong(n=event.n))

    @bus.on("ping", "pong")
    async def collector(event: Ping | Pong, ctx: EventContext) -> None:
        collected.add(ctx, event)

    @bus.on("noise")
    async def noise_sink(event: Noise, ctx: EventContext) -> None:
        noise.add(ctx, event)

    settings = broker.settings()
    await apply_topics(settings.kafka, bus.topics.values())
    async with Mesh(settings, bus.listeners) as mesh:
        await mesh.wait_assigned()
        async with bus.publisher(settings) as events:
            pings = [await events.publish("ping", Ping(n=n)) for n in range(4)]
            for n in range(4):
                await events.publish("noise", Noise(n=n))
        await noise.reach(4)
        await collected.reach(8)
    got = list(collected.events.values())
    assert Counter(t for t, _, _ in got) == {"ping": 4, "pong": 4}
    assert all(type(p) is {"ping": Ping, "pong": Pong}[t] for t, p, _ in got)
    sent = {env.payload.n: env.correlation_id for env in pings}  # type: ignore[attr-defined]
    assert {p.n: c for t, p, c in got if t == "ping"} == sent
    assert {p.n: c for t, p, c in got if t == "pong"} == sent
    assert sorted((t, p.n) for t, p, _ in noise.events.values()) == [
        ("noise", n) for n in range(4)]


async def test_two_listeners_of_one_type_each_get_every_event(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: two listeners of ping (two consumer groups) each get all 10 pings."""
    bus, first, second = small_bus(prefix), Seen(), Seen()

    @bus.on("ping")
    async def audit(event: Ping, ctx: EventContext) -> None:
        first.add(ctx, event)

    @bus.on("ping")
    async def dashboard(event: Ping, ctx: EventContext) -> None:
        second.add(ctx, event)

    assert audit.group != dashboard.group
    settings = broker.settings()
    await apply_topics(settings.kafka, bus.topics.values())
    async with Mesh(settings, bus.listeners) as mesh:
        await mesh.wait_assigned()
        async with bus.publisher(settings) as events:
            sent = {(await events.publish("ping", Ping(n=n))).event_id for n in range(10)}
        await first.reach(10)
        await second.reach(10)
    assert set(first.events) == set(second.events) == sent


async def run_content_flow(broker: BrokerUnderTest, prefix: str,
                           requests: list[Any]) -> tuple[EventBus, dict[str, str]]:
    """Run the content listeners, publish ``requests`` as a CMS would, wait until each
    has a final event; returns the bus and each request's correlation id."""
    bus, agents = build(prefix)
    settings = broker.settings()
    await apply_topics(settings.kafka, bus.topics.values())
    final = [bus.topic("content_published").name, bus.topic("content_rejected_final").name]
    async with Mesh(settings, agents) as mesh:
        await mesh.wait_assigned()
        async with bus.publisher(settings, source="cms") as events:
            correlations = {r.request_id: (await events.publish("content_requested", r))
                            .correlation_id for r in requests}
        await wait_for_count(settings, final, len(requests))
    return bus, correlations


async def decoded(settings: MeshSettings, bus: EventBus
                  ) -> list[tuple[str, Any, dict[str, str], Record]]:
    """Every event on the bus: (type, payload, headers, record)."""
    codec, out = Codec(), []
    for record in await read_all(settings, [t.name for t in bus.topics.values()]):
        kind = bus.type_of(record.topic)
        assert kind is not None
        payload = await codec.decode(bus.topic(kind), record.value or b"")
        out.append((kind, payload, {k: v.decode() for k, v in record.headers}, record))
    return out


async def test_content_flow_ends_published_or_rejected_with_bounded_revisions(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: each of the 5 requests ends in exactly one final event, the expected one;
    drafts are revisions 0..k with k <= MAX_REVISIONS (k = the expected count); every
    event carries its request's correlation id and is caused by an event of the same
    workflow; nothing failed or went to a dead-letter topic."""
    bus, correlations = await run_content_flow(broker, prefix, REQUESTS)
    settings = broker.settings()
    events = await decoded(settings, bus)
    unique = {h["mesh-event-id"]: (t, p, h) for t, p, h, _ in events}
    by_request: dict[str, list[tuple[str, Any, dict[str, str]]]] = defaultdict(list)
    for kind, payload, headers in unique.values():
        assert kind != "listener_failed", payload
        by_request[payload.request_id].append((kind, payload, headers))
    ids_of = {rid: {h["mesh-event-id"] for *_, h in items} for rid, items in by_request.items()}
    for rid, (outcome, revisions) in EXPECTED.items():
        items = by_request[rid]
        kinds = Counter(kind for kind, _, _ in items)
        final = [p for k, p, _ in items if k in ("content_published", "content_rejected_final")]
        assert len(final) == 1, (rid, kinds)
        assert (("published" if kinds["content_published"] else "rejected"), final[0].revisions
                ) == (outcome, revisions), rid
        drafts = sorted(p.draft.revision for k, p, _ in items if k == "content_created")
        assert drafts == list(range(revisions + 1)) and revisions <= MAX_REVISIONS, (rid, drafts)
        assert kinds["content_rejected"] == revisions, (rid, kinds)  # one per revision
        assert kinds["content_requested"] == 1 and kinds["content_reviewed"] == revisions + 1
        for kind, _, headers in items:
            assert headers["mesh-correlation"] == correlations[rid], (rid, kind)
            if kind != "content_requested":
                assert headers["mesh-causation"] in ids_of[rid], (rid, kind)
    dead = await read_all(settings, [t.dlq_name for t in bus.topics.values()])
    assert dead == []


async def test_publish_from_an_existing_system_reaches_listeners(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: pings from bus.publish (a model; a dict) and from a client holding only the
    .avsc (single-object bytes, no mesh headers) all reach the listener; the given
    correlation id (else the event id) is carried into its pongs, and records are keyed
    by correlation id."""
    bus, seen = small_bus(prefix), Seen()

    @bus.on("ping", emits=["pong"])
    async def echo(event: Ping, ctx: EventContext) -> Pong:
        seen.add(ctx, event)
        return Pong(n=event.n)

    settings, pings = broker.settings(), bus.topic("ping")
    await apply_topics(settings.kafka, bus.topics.values())
    schema = fastavro.parse_schema(json.loads(render(pings)))
    body = io.BytesIO()
    fastavro.schemaless_writer(body, schema, {"n": 3, "text": "from a non-mesh client"})
    raw = (b"\xc3\x01" + bytes.fromhex(fingerprint(to_parsing_canonical_form(schema),
                                                   "CRC-64-AVRO")) + body.getvalue())
    async with Mesh(settings, bus.listeners) as mesh:
        await mesh.wait_assigned()
        codec = Codec()
        async with Producer(settings.kafka) as producer:
            first = await bus.publish("ping", Ping(n=1), producer=producer, codec=codec,
                                      correlation_id="order-42", source="billing")
            second = await bus.publish("ping", {"n": 2}, producer=producer, codec=codec)
            await producer.send_all([OutRecord(pings.name, raw, b"legacy-3")])
        await seen.reach(3)
        pongs = await wait_for_count(settings, [bus.topic("pong").name], 3)
    ping_records = {(await codec.decode(pings, r.value or b"")).n: r  # type: ignore[attr-defined]
                    for r in await read_all(settings, [pings.name])}
    legacy = ping_records[3]
    expected = {1: "order-42", 2: second.event_id,
                3: record_event_id(pings.name, legacy.partition, legacy.offset)}
    assert {p.n: c for _, p, c in seen.events.values()} == expected
    assert ping_records[1].key == b"order-42" and second.correlation_id == second.event_id
    assert dict(ping_records[1].headers)["mesh-source"] == b"billing"
    assert first.correlation_id == "order-42"
    pong_topic = bus.topic("pong")
    got = {(await codec.decode(pong_topic, r.value or b"")).n:  # type: ignore[attr-defined]
           (dict(r.headers)["mesh-correlation"].decode(), r.key) for r in pongs}
    assert got == {n: (c, c.encode()) for n, c in expected.items()}


async def test_a_failing_listener_reports_listener_failed_and_others_go_on(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: a listener raising on one ping emits one listener_failed (naming it, the
    type, the error, with the ping's correlation id) and dead-letters that ping; the
    other listener of ping gets all three."""
    bus, sturdy_seen = small_bus(prefix), Seen()

    @bus.on("ping")
    async def fragile(event: Ping, ctx: EventContext) -> None:
        if event.text == "poison":
            raise ValueError(f"cannot handle ping {event.n}")

    @bus.on("ping")
    async def sturdy(event: Ping, ctx: EventContext) -> None:
        sturdy_seen.add(ctx, event)

    settings = broker.settings()
    await apply_topics(settings.kafka, bus.topics.values())
    async with Mesh(settings, bus.listeners) as mesh:
        await mesh.wait_assigned()
        async with bus.publisher(settings) as events:
            await events.publish("ping", Ping(n=0))
            bad = await events.publish("ping", Ping(n=1, text="poison"), correlation_id="bad-1")
            await events.publish("ping", Ping(n=2))
        failures = await wait_for_count(settings, [bus.topic("listener_failed").name], 1)
        await sturdy_seen.reach(3)
    failure = await Codec().decode(bus.topic("listener_failed"), failures[0].value or b"")
    assert failure == ListenerFailed(listener=f"{prefix}-fragile", event_type="ping",
                                     event_id=bad.event_id, error_class="ValueError",
                                     error="cannot handle ping 1")
    assert dict(failures[0].headers)["mesh-correlation"] == b"bad-1"
    dead = await read_all(settings, [bus.topic("ping").dlq_name])
    assert [event_id(r) for r in dead] == [bad.event_id]
    assert dict(dead[0].headers)[DLQ_AGENT] == f"{prefix}-fragile".encode()


async def test_mesh_tap_follows_the_content_events(
        broker: BrokerUnderTest, prefix: str, mesh_cli: list[str]) -> None:
    """Pass: `mesh tap <created> <published> <rejected_final> --from-beginning --no-follow
    --json` decodes every event (Avro, per-type schema) with its correlation header: r2's
    drafts 0..1 then published, r4's drafts 0..2 then rejected for good."""
    requests = [r for r in REQUESTS if r.request_id in ("r2", "r4")]
    bus, correlations = await run_content_flow(broker, prefix, requests)
    topics = [bus.topic(t).name for t in
              ("content_created", "content_published", "content_rejected_final")]
    result = await asyncio.to_thread(
        subprocess.run, [*mesh_cli, "tap", *topics, "--from-beginning", "--no-follow",
                         "--json", "-t", "tests.apps.events"],
        env=broker.env(MESH_TEST_PREFIX=prefix), cwd=ROOT, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    assert all("payload" in line for line in lines), [line.get("error") for line in lines]
    unique = {line["headers"]["mesh-event-id"]: line for line in lines}.values()
    seen: dict[tuple[str, str], list[Any]] = defaultdict(list)
    for line in unique:
        kind = bus.type_of(line["topic"])
        payload = line["payload"]
        assert line["headers"]["mesh-correlation"] == correlations[payload["request_id"]]
        seen[(payload["request_id"], kind or "?")].append(
            payload["draft"]["revision"] if kind == "content_created" else payload["revisions"])
    assert {k: sorted(v) for k, v in seen.items()} == {
        ("r2", "content_created"): [0, 1], ("r2", "content_published"): [1],
        ("r4", "content_created"): [0, 1, 2], ("r4", "content_rejected_final"): [2]}


def test_declaration_errors_name_the_value_and_the_fix() -> None:
    """Pass: unknown types, a missing key field, the reserved type name and undeclared
    emits are refused with messages naming the value and the fix."""
    bus = small_bus("decl")
    with pytest.raises(ConfigError, match="Unknown event type 'pang'.*known are"):
        bus.on("pang")
    with pytest.raises(ConfigError, match="Noise has no field 'request_id'"):
        EventBus("x", {"noise": Noise}, key="request_id")
    with pytest.raises(ConfigError, match="reserved"):
        EventBus("x", {"listener_failed": Noise})
    with pytest.raises(ConfigError, match="carries Ping, but a Pong"):
        bus.payload("ping", Pong(n=1))

    @bus.on("ping")
    async def mute(event: Ping, ctx: EventContext) -> None:
        ctx.emit("pong", Pong(n=event.n))

    with pytest.raises(ConfigError, match="already has a listener named 'decl-mute'"):
        bus.on("pong", name="mute")(mute.handle)
    ctx = Context(mute, Envelope(Ping(n=1), "e1", "c1", topic=bus.topic("ping").name))
    with pytest.raises(ConfigError, match="emits 'pong', which it does not declare.*emits="):
        EventContext(bus, ctx, ()).emit("pong", Pong(n=1))
