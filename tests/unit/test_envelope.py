"""Unit tests for mesh.envelope: event ids, headers and trace context."""

from __future__ import annotations

import re

import pytest

from mesh.envelope import (
    ATTEMPT,
    EVENT_ID,
    PRODUCED_AT,
    TRACEPARENT,
    TRACESTATE,
    Envelope,
    derive_event_id,
    is_traceparent,
    read_headers,
    record_event_id,
)
from mesh.errors import HeaderInvalid

TRACE = "00-0af7651916cd43dd8448eb211c902ab7-b7ad6b7169203331-01"
W3C = re.compile(r"^00-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def _read(headers: list[tuple[str, bytes]], offset: int = 42) -> Envelope[None]:
    return read_headers(headers, topic="shop.orders", partition=1, offset=offset)


def test_derived_event_id_is_deterministic() -> None:
    assert derive_event_id("writer", "e1", 0) == derive_event_id("writer", "e1", 0)


def test_derived_event_id_differs_per_agent_input_and_index() -> None:
    ids = {derive_event_id(agent, event, index)
           for agent in ("writer", "editor") for event in ("e1", "e2") for index in (0, 1)}

    assert len(ids) == 8


def test_headers_round_trip_every_field() -> None:
    sent = Envelope(None, "ev-1", "corr-1", causation_id="cause-1", traceparent=TRACE,
                    source="writer", attempt=3, schema="8f5c393f1ad57572",
                    produced_at_ms=1_700_000_000_123)

    got = read_headers(sent.headers(), topic="t", partition=2, offset=9, key=b"k")

    assert (got.event_id, got.correlation_id, got.causation_id, got.traceparent, got.source,
            got.attempt, got.schema, got.produced_at_ms) == (
        "ev-1", "corr-1", "cause-1", TRACE, "writer", 3, "8f5c393f1ad57572", 1_700_000_000_123)
    assert (got.key, got.topic, got.partition, got.offset) == (b"k", "t", 2, 9)


def test_missing_headers_get_defaults() -> None:
    got = _read([])

    assert got.event_id == record_event_id("shop.orders", 1, 42)
    assert got.correlation_id == got.event_id
    assert got.causation_id is None and got.schema is None
    assert got.attempt == 1 and got.source == "external"
    assert W3C.match(got.traceparent)


def test_event_id_of_a_record_without_one_is_stable_per_position() -> None:
    assert _read([]).event_id == _read([]).event_id
    assert _read([], offset=43).event_id != _read([]).event_id


def test_foreign_headers_are_kept_apart_from_the_mesh_ones() -> None:
    got = _read([("content-type", b"\xff\xfe"), (EVENT_ID, b"ev-9"), ("tenant", b"acme")])

    assert got.event_id == "ev-9"
    assert got.extra_headers == (("content-type", b"\xff\xfe"), ("tenant", b"acme"))
    assert ("tenant", b"acme") in got.headers()


@pytest.mark.parametrize(("name", "raw"), [
    (ATTEMPT, b"two"),
    (ATTEMPT, b"0"),
    (ATTEMPT, b"-1"),
    (PRODUCED_AT, b"yesterday"),
    (EVENT_ID, b"\xff\xfe"),
    (TRACEPARENT, "00-abc-def-01".encode()),
    (TRACEPARENT, TRACE.upper().encode()),
    (TRACEPARENT, TRACE[:-1].encode()),
    (TRACEPARENT, b"00-00000000000000000000000000000000-b7ad6b7169203331-01"),
    (TRACEPARENT, b"00-0af7651916cd43dd8448eb211c902ab7-0000000000000000-01"),
])
def test_malformed_optional_header_is_replaced_and_reported(name: str, raw: bytes) -> None:
    problems: list[str] = []
    good = _read([(TRACESTATE, b"vendor=1")])

    got = read_headers([(name, raw), (TRACESTATE, b"vendor=1")], topic="shop.orders",
                       partition=1, offset=42, problems=problems)

    assert len(problems) == 1 and problems[0].startswith(name)
    assert got.attempt == 1 and got.event_id == good.event_id
    assert W3C.match(got.traceparent) and got.traceparent.encode() != raw
    # W3C: an invalid traceparent starts a new trace and drops its tracestate
    assert got.tracestate == (None if name == TRACEPARENT else "vendor=1")


def test_malformed_header_without_a_problem_list_does_not_raise() -> None:
    assert _read([(ATTEMPT, b"two")]).attempt == 1


def test_child_carries_tracestate_and_the_given_extra_headers() -> None:
    parent = Envelope("in", "ev-1", "corr-1", traceparent=TRACE, tracestate="v=1",
                      extra_headers=(("tenant", b"acme"),))

    child = parent.child("out", agent="writer", index=0, key=None,
                         extra_headers=(("tenant", b"acme"),))

    assert child.tracestate == "v=1"
    assert dict(child.headers())["tenant"] == b"acme"
    assert dict(child.headers())[TRACESTATE] == b"v=1"


def test_child_keeps_trace_and_correlation_and_points_at_its_cause() -> None:
    parent = Envelope("in", "ev-1", "corr-1", traceparent=TRACE, attempt=2)

    child = parent.child("out", agent="writer", index=0, key=b"k")

    assert child.event_id == derive_event_id("writer", "ev-1", 0)
    assert child.correlation_id == "corr-1"
    assert child.causation_id == "ev-1"
    assert child.source == "writer" and child.attempt == 1 and child.key == b"k"
    assert child.traceparent.split("-")[1] == TRACE.split("-")[1]
    assert child.traceparent.split("-")[2] != TRACE.split("-")[2]
    assert W3C.match(child.traceparent)


def test_child_span_id_is_deterministic_per_output() -> None:
    parent = Envelope("in", "ev-1", "corr-1", traceparent=TRACE)

    first = parent.child("out", agent="writer", index=0, key=None)
    again = parent.child("out", agent="writer", index=0, key=None)
    second = parent.child("out", agent="writer", index=1, key=None)

    assert first.traceparent == again.traceparent
    assert first.traceparent != second.traceparent


def test_child_keeps_the_flags_and_an_invalid_parent_starts_a_new_trace() -> None:
    """The valid traceparent last seen is remembered by identity: a different,
    invalid one right after it is still refused."""
    unsampled = TRACE[:-2] + "00"
    kept = Envelope("in", "ev-1", "corr-1", traceparent=unsampled).child(
        "out", agent="writer", index=0, key=None)
    assert kept.traceparent.startswith(unsampled[:36]) and kept.traceparent.endswith("-00")

    for bad in ("00-" + "0" * 32 + "-b7ad6b7169203331-01", TRACE.upper(), TRACE[:-1]):
        assert is_traceparent(TRACE) and not is_traceparent(bad)
        fresh = Envelope("in", "ev-1", "corr-1", traceparent=bad).child(
            "out", agent="writer", index=0, key=None)
        assert W3C.match(fresh.traceparent)
        assert fresh.traceparent.split("-")[1] != bad.split("-")[1].lower()


def test_envelope_rejects_empty_ids_and_attempt_zero() -> None:
    with pytest.raises(HeaderInvalid):
        Envelope(None, "", "corr")
    with pytest.raises(HeaderInvalid):
        Envelope(None, "ev", "corr", attempt=0)
