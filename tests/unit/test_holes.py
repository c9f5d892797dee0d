"""mesh.kafka.holes finds the records a delivery jumped over and where to read again; a
hole that never fills is read past after HOLE_WAIT, with an error naming its offsets."""

from __future__ import annotations

import logging
from typing import NamedTuple

import pytest

from mesh.kafka import holes as holes_module
from mesh.kafka.holes import HOLE_WAIT, Holes


class At(NamedTuple):
    offset: int


def at(*offsets: int) -> list[At]:
    return [At(o) for o in offsets]


def test_dense_deliveries_pass_and_a_skip_at_the_start_or_inside_is_cut_and_read_again(
        ) -> None:
    holes = Holes()
    assert holes.cut("p", at(0, 1, 2)) is None  # unknown start: the first delivery's
    assert holes.cut("p", at(3)) is None
    assert holes.cut("p", at(6, 7)) == 0  # 4..5 skipped before the delivery
    assert holes.resume_at("p") == 4
    assert holes.cut("p", at(4, 6, 7)) == 1  # 5 skipped inside it
    assert holes.resume_at("p") == 5
    assert holes.cut("p", at(5, 6, 7)) is None
    assert holes.cut("q", at(9, 10)) is None  # partitions are apart
    assert holes.cut("p", at(8)) is None


def test_a_seek_sets_the_start_a_rewind_is_accepted_and_a_rebalance_forgets() -> None:
    holes = Holes()
    holes.expect("p", 40)
    assert holes.known("p")
    assert holes.cut("p", at(42)) == 0 and holes.resume_at("p") == 40
    assert holes.cut("p", at(10, 11)) is None  # lower than expected: sought back
    assert holes.cut("p", at(12)) is None
    holes.forget(["p"])
    assert not holes.known("p")
    assert holes.cut("p", at(500)) is None  # a new owner's start is whatever comes


def test_a_hole_that_stays_is_read_past_after_the_wait_with_an_error(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    now = [1000.0]
    monkeypatch.setattr(holes_module.time, "monotonic", lambda: now[0])
    holes = Holes()
    holes.expect("p", 7)
    assert holes.cut("p", at(9, 10)) == 0
    now[0] += HOLE_WAIT / 2
    assert holes.cut("p", at(9, 10)) == 0  # still waiting for 7..8
    assert holes.cut("p", at(7, 9)) == 1  # 7 came; the wait for 8 starts now
    now[0] += HOLE_WAIT * 0.9
    assert holes.cut("p", at(9, 10)) == 0
    with caplog.at_level(logging.ERROR, logger="mesh.kafka.holes"):
        now[0] += HOLE_WAIT * 0.2
        assert holes.cut("p", at(9, 10)) is None  # 8 never came: read past it
    assert "offsets 8..8 were still not readable" in caplog.text
    assert holes.cut("p", at(11)) is None
