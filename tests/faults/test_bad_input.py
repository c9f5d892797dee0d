"""Bad input, property-based: hypothesis draws batches of random bytes, truncated Avro,
wrong-schema payloads, oversize payloads and missing / malformed headers; all of them,
interleaved with good items, go to one running `mesh run tests.apps.stages:stage1`.

Every record is accounted for: in the sink or in ``<topic>.dlq`` (with the expected error
class), never both, never neither. Headers are optional: missing ones are defaulted (the
event id derived from topic/partition/offset) and malformed ones (not UTF-8, not a
number, null, a traceparent that is not W3C) are ignored and replaced, so every such
record must reach the sink; only the value can send a record to the dead letters. A
truncated prefix that still decodes into a valid Item is accepted only if the
sink has it (in practice it never happens: the decoder must consume every byte).
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mesh import Codec, apply_topics
from mesh.envelope import ATTEMPT, EVENT_ID, MESH_HEADERS, PRODUCED_AT, TRACEPARENT
from mesh.kafka.base import OutRecord
from mesh.resilience.fallback import FallbackAttempt
from mesh.runtime.dead_letter import (
    DLQ_AGENT,
    DLQ_ERROR,
    DLQ_ERROR_CLASS,
    DLQ_OFFSET,
    DLQ_PARTITION,
    DLQ_TOPIC,
)
from mesh.serde.avro import AvroSerde
from mesh.testing.checker import Injected, check
from mesh.topic import Topic
from tests.apps.stages import Item, Other, build
from tests.conftest import BrokerUnderTest
from tests.support import (
    AgentProcess,
    encode,
    history,
    inject,
    make_items,
    read_all,
    wait_for_count,
)

LIMIT = 2048  # MESH_RUNTIME__MAX_MESSAGE_BYTES of the agent under test
KEYS = [b"k0", b"k1", b"k2"]  # the good items' keys: bad records share their partitions
DECODE = frozenset({"DecodeError", "UnknownSchema"})


@dataclass(frozen=True, slots=True)
class Bad:
    """One generated record and what may become of it."""

    kind: str
    value: bytes
    key: bytes
    headers: tuple[tuple[str, bytes | None], ...]
    expected: frozenset[str]  # acceptable dead-letter error classes
    item: Item | None = None  # the Item it carries, if it may reach the sink
    sink_ok: bool = False  # may (or, with no expected class, must) reach the sink


def _item(text: str = "") -> Item:
    return Item(key=f"x{uuid.uuid4().hex[:12]}", seq=0, source_id=str(uuid.uuid4()), text=text)


def _headers(codec: Codec, topic: Topic[Any], item: Item) -> list[tuple[str, bytes | None]]:
    return list(encode(codec, topic, item).headers)


def _plain(kind: str, value: bytes, key: bytes, expected: frozenset[str]) -> Bad:
    return Bad(kind, value, key, ((EVENT_ID, str(uuid.uuid4()).encode()),), expected)


def strategies(codec: Codec, topic: Topic[Any]) -> dict[str, st.SearchStrategy[Bad]]:
    """One strategy per kind of bad input, for records on ``topic``."""
    keys = st.sampled_from(KEYS)
    texts = st.text(max_size=40)

    def truncated(item: Item, cut: float, key: bytes) -> Bad:
        value = codec.encode(topic, item)[0]
        headers = tuple(_headers(codec, topic, item))
        return Bad("truncated", value[:int(len(value) * cut)], key, headers, DECODE, item,
                   sink_ok=True)

    def wrong_schema(payload: Any, key: bytes) -> Bad:
        return _plain("wrong-schema", AvroSerde.for_model(type(payload)).encode(payload), key,
                      frozenset({"UnknownSchema"}))

    def oversize(extra: int, key: bytes) -> Bad:
        item = _item("x" * (LIMIT + extra))
        return Bad("oversize", codec.encode(topic, item)[0], key,
                   tuple(_headers(codec, topic, item)), frozenset({"PayloadTooLarge"}))

    def malformed(text: str, name: str, bad: bytes | None, key: bytes) -> Bad:
        item = _item(text)
        headers = (*[(k, v) for k, v in _headers(codec, topic, item) if k != name], (name, bad))
        # optional headers: a malformed one is ignored and replaced, the value is good,
        # so the event is handled (only the value may send it to the dead-letter topic)
        return Bad(f"header {name}", codec.encode(topic, item)[0], key, headers,
                   frozenset(), item, sink_ok=True)

    def missing(text: str, drop: set[str], key: bytes) -> Bad:
        item = _item(text)
        headers = tuple((k, v) for k, v in _headers(codec, topic, item) if k not in drop)
        return Bad("missing headers", codec.encode(topic, item)[0], key, headers,
                   frozenset(), item, sink_ok=True)

    not_int = st.text(min_size=1, max_size=12).map(lambda t: f"x{t}".encode())
    not_utf8 = st.binary(max_size=10).map(lambda b: b"\xff" + b)
    not_trace = st.text(max_size=60).map(lambda t: f"zz{t}")  # W3C starts with 2 hex
    other_headers = st.sampled_from([h for h in MESH_HEADERS if h != EVENT_ID])
    bad_header = st.one_of(
        st.tuples(st.sampled_from([ATTEMPT, PRODUCED_AT]), not_int),
        st.tuples(other_headers, not_utf8),
        st.tuples(st.just(TRACEPARENT), not_trace.map(str.encode)),
        st.tuples(other_headers, st.none()))
    return {
        "random": st.builds(lambda v, k: _plain("random", v, k, DECODE),
                            st.binary(max_size=300), keys),
        "truncated": st.builds(truncated, st.builds(_item, texts),
                               st.floats(0, 1, exclude_max=True), keys),
        "wrong-schema": st.builds(wrong_schema, st.one_of(
            st.builds(Other, name=texts, size=st.floats(allow_nan=False)),
            st.builds(FallbackAttempt, level=st.integers(-5, 5), handler=texts,
                      error_class=texts, error=texts)), keys),
        "oversize": st.builds(oversize, st.integers(1, LIMIT), keys),
        "oversize-random": st.builds(
            lambda v, k: _plain("oversize-random", v, k, frozenset({"PayloadTooLarge"})),
            st.binary(min_size=LIMIT + 1, max_size=LIMIT + 300), keys),
        "malformed header": st.builds(lambda t, h, k: malformed(t, *h, k), texts, bad_header,
                                      keys),
        "missing headers": st.builds(missing, texts, st.sets(st.sampled_from(MESH_HEADERS)),
                                     keys),
    }


def generate(codec: Codec, topic: Topic[Any], batches: int) -> list[Bad]:
    """``batches`` hypothesis batches, each with every kind at least once."""
    kinds = strategies(codec, topic)
    drawn: list[Bad] = []

    @settings(max_examples=batches, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(st.tuples(*kinds.values()), st.lists(st.one_of(*kinds.values()), max_size=6))
    def collect(each: tuple[Bad, ...], more: list[Bad]) -> None:
        drawn.extend([*each, *more])

    collect()
    return drawn


async def test_random_bad_input_is_dead_lettered_and_the_agent_goes_on(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path) -> None:
    """Pass: every generated record is in the sink or in `<in>.dlq` (never both, never
    neither), each dead letter with the expected error class, a message and its origin;
    records with missing headers reach the sink; the agent keeps its pid and exits 0 on
    SIGTERM; every good item (10 of them after all bad ones) is handled (checker ok)."""
    stage1 = build(prefix).agents[0]
    source, sink = stage1.consumes[0], stage1.produces[0]
    settings_ = broker.settings(max_message_bytes=LIMIT)
    await apply_topics(settings_.kafka, [source, sink])
    codec = Codec()
    bad = generate(codec, source, batches=10)
    items = make_items(keys=3, per_key=10)
    good = [encode(codec, source, i) for i in items]
    bad_records = [OutRecord(source.name, b.value, b.key, b.headers)  # type: ignore[arg-type]
                   for b in bad]
    stream: list[OutRecord] = []
    for index, record in enumerate(bad_records):  # interleaved with the first 20 good ones
        stream += good[index * 20 // len(bad):(index + 1) * 20 // len(bad)] + [record]
    stream += good[20:]
    log = (tmp_path / "agent.log").open("wb")
    proc = AgentProcess(broker, "tests.apps.stages:stage1", prefix=prefix, log=log,
                        env={"MESH_RUNTIME__MAX_MESSAGE_BYTES": str(LIMIT)}).start()
    pid = proc.pid
    try:
        positions = await inject(settings_, stream)
        await wait_for_count(settings_, [sink.name, source.dlq_name], len(stream), timeout=120)
        assert proc.alive() and proc.pid == pid
    finally:
        code = proc.terminate()
        log.close()
    assert code == 0, (tmp_path / "agent.log").read_text()[-3000:]

    sunk = {(await codec.decode(sink, r.value or b"")).source_id  # type: ignore[attr-defined]
            for r in await read_all(settings_, [sink.name])}
    dead = {(int(h[DLQ_PARTITION]), int(h[DLQ_OFFSET])): h for h in (
        {k: (v or b"").decode(errors="replace") for k, v in r.headers}
        for r in await read_all(settings_, [source.dlq_name]))}
    sink_items, dead_ids = [], []
    for b, record in zip(bad, bad_records, strict=True):
        where = positions[stream.index(record)]
        in_sink = b.item is not None and b.item.source_id in sunk
        letter = dead.get(where)
        assert in_sink != (letter is not None), (b.kind, b.headers, b.value[:60], in_sink)
        if in_sink:
            assert b.sink_ok, (b.kind, b.value[:40])
            sink_items.append(b.item)
            continue
        assert b.expected, f"{b.kind} must reach the sink, got {letter}"
        assert letter[DLQ_ERROR_CLASS] in b.expected, (b.kind, letter[DLQ_ERROR_CLASS],
                                                       letter[DLQ_ERROR])
        assert letter[DLQ_ERROR] and letter[DLQ_TOPIC] == source.name
        assert letter[DLQ_AGENT] == stage1.name
        dead_ids.append(letter[EVENT_ID])
    assert len(dead) == len(dead_ids)  # nothing else was dead-lettered
    extra = [Injected(eid, f"bad{n}", 0, bad=True) for n, eid in enumerate(dead_ids)]
    report = check(await history(settings_, codec, [*items, *sink_items], sink=sink,
                                 dlq=[source], extra=extra))
    assert report.ok, report.summary()
