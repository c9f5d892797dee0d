"""Unit tests for mesh.testing.checker, the pure delivery checker."""

from __future__ import annotations

import pytest

from mesh.testing.checker import (
    Applied,
    DeadLettered,
    History,
    Injected,
    Logged,
    OrderViolation,
    Report,
    check,
)


def _inj(n: int, key: str = "k", seq: int | None = None, bad: bool = False) -> Injected:
    return Injected(f"in-{n}", key, n if seq is None else seq, bad)


def _app(n: int, key: str = "k", seq: int | None = None, out: str | None = None) -> Applied:
    return Applied(out or f"out-{n}", f"in-{n}", key, n if seq is None else seq)


def _log(n: int, offset: int, topic: str = "out", partition: int = 0) -> Logged:
    return Logged(topic, partition, offset, f"out-{n}", f"in-{n}")


def test_clean_run_is_ok() -> None:
    history = History(
        injected=[_inj(0), _inj(1), _inj(2), _inj(3, bad=True)],
        applied=[_app(0), _app(1), _app(2)],
        logged=[_log(0, 0), _log(1, 1), _log(2, 2)],
        dead_letters=[DeadLettered("in-3")],
    )
    report = check(history)
    assert report == Report()
    assert report.ok and report.ok_exactly_once
    assert report.summary() == "delivery check: ok"


def test_lost_input_is_reported() -> None:
    history = History(injected=[_inj(0), _inj(1), _inj(2)], applied=[_app(0), _app(1)])
    report = check(history)
    assert report.lost == ("in-2",)
    assert report.order_violations == ()
    assert not report.ok


def test_sink_duplicate_is_reported() -> None:
    history = History(injected=[_inj(0), _inj(1)], applied=[_app(0), _app(1), _app(1)])
    report = check(history)
    assert report.sink_duplicates == ("out-1",)
    assert not report.ok


def test_log_duplicates_are_flagged_but_allowed_at_least_once() -> None:
    history = History(
        injected=[_inj(0), _inj(1)],
        applied=[_app(0), _app(1)],
        logged=[_log(0, 0), _log(1, 1), _log(1, 2)],
    )
    report = check(history)
    assert report.log_duplicates == ("out-1",)
    assert report.ok
    assert not report.ok_exactly_once
    assert "out-1" in report.summary()


def test_same_output_id_in_two_topics_is_a_log_duplicate() -> None:
    history = History(
        injected=[_inj(0)], applied=[_app(0)],
        logged=[_log(0, 5, topic="a"), _log(0, 5, topic="b")],
    )
    assert check(history).log_duplicates == ("out-0",)


def test_log_record_read_twice_at_same_position_is_not_a_duplicate() -> None:
    history = History(
        injected=[_inj(0)], applied=[_app(0)], logged=[_log(0, 7), _log(0, 7)],
    )
    report = check(history)
    assert report.log_duplicates == ()
    assert report.ok_exactly_once


def test_order_reversal_per_key_is_a_violation() -> None:
    history = History(
        injected=[_inj(0), _inj(1), _inj(2, key="other", seq=0)],
        applied=[_app(1), _app(2, key="other", seq=0), _app(0)],
    )
    report = check(history)
    assert report.order_violations == (OrderViolation("k", previous_seq=1, seq=0),)
    assert not report.ok


def test_interleaved_keys_in_per_key_order_are_fine() -> None:
    history = History(
        injected=[_inj(0, "a", 0), _inj(1, "b", 0), _inj(2, "a", 1), _inj(3, "b", 1)],
        applied=[_app(1, "b", 0), _app(0, "a", 0), _app(3, "b", 1), _app(2, "a", 1)],
    )
    assert check(history).ok


def test_equal_seq_from_different_sources_is_a_violation() -> None:
    history = History(
        injected=[_inj(0, "a", 0), _inj(1, "b", 0)],
        applied=[Applied("out-0", "in-0", "k", 4), Applied("out-1", "in-1", "k", 4)],
    )
    assert check(history).order_violations == (OrderViolation("k", 4, 4),)


def test_gap_explained_by_dead_letter_is_fine() -> None:
    history = History(
        injected=[_inj(0), _inj(1, bad=True), _inj(2, bad=True), _inj(3)],
        applied=[_app(0), _app(3)],
        dead_letters=[DeadLettered("in-1"), DeadLettered("in-2")],
    )
    report = check(history)
    assert report.order_violations == ()
    assert report.ok


def test_gap_not_explained_is_a_violation() -> None:
    history = History(
        injected=[_inj(0), _inj(1, bad=True), _inj(2), _inj(3)],
        applied=[_app(0), _app(3)],
        dead_letters=[DeadLettered("in-1")],
    )
    report = check(history)
    assert report.order_violations == (OrderViolation("k", previous_seq=0, seq=3),)
    assert report.lost == ("in-2",)


def test_gap_over_a_seq_never_injected_is_a_violation() -> None:
    history = History(injected=[_inj(0), _inj(2)], applied=[_app(0), _app(2)])
    assert check(history).order_violations == (OrderViolation("k", 0, 2),)


def test_bad_input_missing_from_dead_letters_is_reported() -> None:
    history = History(injected=[_inj(0), _inj(1, bad=True)], applied=[_app(0)])
    report = check(history)
    assert report.missing_dead_letters == ("in-1",)
    assert report.lost == ()
    assert not report.ok


def test_good_input_in_dead_letters_is_unexpected() -> None:
    history = History(
        injected=[_inj(0), _inj(1)], applied=[_app(0)],
        dead_letters=[DeadLettered("in-1"), DeadLettered("in-1")],
    )
    report = check(history)
    assert report.unexpected_dead_letters == ("in-1",)
    assert report.lost == ()
    assert not report.ok


def test_dead_letter_for_uninjected_input_is_unexpected() -> None:
    history = History(injected=[_inj(0)], applied=[_app(0)], dead_letters=[DeadLettered("ghost")])
    assert check(history).unexpected_dead_letters == ("ghost",)


def test_output_with_unknown_source_is_reported() -> None:
    history = History(
        injected=[_inj(0)], applied=[_app(0), Applied("out-x", "never-sent", "z", 0)],
    )
    report = check(history)
    assert report.unknown_outputs == ("out-x",)
    assert not report.ok


def test_bad_input_that_reached_the_sink_is_reported() -> None:
    history = History(
        injected=[_inj(0), _inj(1, bad=True)], applied=[_app(0), _app(1)],
        dead_letters=[DeadLettered("in-1")],
    )
    report = check(history)
    assert report.applied_bad == ("in-1",)
    assert report.unexpected_dead_letters == ()
    assert not report.ok


def test_fan_out_of_several_outputs_per_input_is_fine() -> None:
    history = History(
        injected=[_inj(0), _inj(1)],
        applied=[_app(0, out="out-0a"), _app(0, out="out-0b"),
                 _app(1, out="out-1a"), _app(1, out="out-1b"), _app(1, out="out-1c")],
        logged=[Logged("out", 0, i, e, s) for i, (e, s) in enumerate(
            [("out-0a", "in-0"), ("out-0b", "in-0"), ("out-1a", "in-1")])],
    )
    report = check(history)
    assert report.ok_exactly_once, report.summary()


def test_fan_out_interleaved_with_a_later_input_is_a_violation() -> None:
    history = History(
        injected=[_inj(0), _inj(1)],
        applied=[_app(0, out="out-0a"), _app(1), _app(0, out="out-0b")],
    )
    assert check(history).order_violations == (OrderViolation("k", 1, 0),)


def test_duplicate_injected_id_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"'in-0' twice.*unique.*fresh id"):
        History(injected=[_inj(0), Injected("in-0", "other", 5)], applied=[])


def test_duplicate_key_seq_pair_is_rejected() -> None:
    with pytest.raises(ValueError, match=r"key='k', seq=3.*'a'.*'b'.*per-key counter"):
        History(injected=[Injected("a", "k", 3), Injected("b", "k", 3)], applied=[])


@pytest.mark.parametrize(
    ("build", "pattern"),
    [
        (lambda: Injected("in-0", "k", -1), r"Injected\.seq must be an int >= 0, got -1"),
        (lambda: Applied("out", "in", "k", -2), r"Applied\.seq must be an int >= 0, got -2"),
        (lambda: Injected("", "k", 0), r"Injected\.event_id must be a non-empty string, got ''"),
        (lambda: Applied("", "in", "k", 0), r"Applied\.event_id must be a non-empty"),
        (lambda: Applied("out", "", "k", 0), r"Applied\.source_id must be a non-empty"),
        (lambda: DeadLettered(""), r"DeadLettered\.source_id must be a non-empty"),
        (lambda: Logged("t", -1, 0, "o", "i"), r"Logged\.partition must be an int >= 0, got -1"),
        (lambda: Logged("t", 0, -5, "o", "i"), r"Logged\.offset must be an int >= 0, got -5"),
        (lambda: Logged("t", 0, 0, "", "i"), r"Logged\.event_id must be a non-empty"),
    ],
)
def test_invalid_construction_raises_helpful_value_error(build, pattern) -> None:
    with pytest.raises(ValueError, match=pattern) as excinfo:
        build()
    assert "pass" in str(excinfo.value)  # every message suggests a fix


def test_history_rejects_records_of_the_wrong_type() -> None:
    with pytest.raises(TypeError, match=r"History\.applied must hold Applied records.*wrap"):
        History(injected=[_inj(0)], applied=[_inj(0)])  # type: ignore[list-item]


def test_order_violation_rejects_negative_seq() -> None:
    with pytest.raises(ValueError, match=r"OrderViolation\.previous_seq must be an int >= 0"):
        OrderViolation("k", previous_seq=-1, seq=0)


def test_history_stores_tuples() -> None:
    history = History(injected=[_inj(0)], applied=[_app(0)], logged=[_log(0, 0)],
                      dead_letters=[])
    assert isinstance(history.injected, tuple) and isinstance(history.applied, tuple)
    assert isinstance(history.logged, tuple) and isinstance(history.dead_letters, tuple)


def test_summary_names_the_offending_ids() -> None:
    history = History(
        injected=[_inj(n) for n in range(8)] + [_inj(9, key="b", seq=0, bad=True)],
        applied=[_app(7), _app(6), _app(6), Applied("out-x", "ghost", "z", 0)],
        dead_letters=[DeadLettered("in-0")],
    )
    text = check(history).summary()
    assert text.splitlines()[0] == "delivery check: FAILED"
    assert "lost: 5 [in-1, in-2, in-3, in-4, in-5]" in text
    assert "sink duplicates: 1 [out-6]" in text
    assert "order violations: 1 [k:7->6]" in text
    assert "unexpected dead letters: 1 [in-0]" in text
    assert "missing dead letters: 1 [in-9]" in text
    assert "unknown outputs: 1 [out-x]" in text


def test_summary_truncates_long_lists() -> None:
    report = Report(lost=tuple(f"in-{n}" for n in range(8)))
    assert "lost: 8 [in-0, in-1, in-2, in-3, in-4, +3 more]" in report.summary()


hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies


@st.composite
def _per_key_ordered_run(draw):
    """A history where the sink applies each input once, in per-key order."""
    keys = draw(st.lists(st.sampled_from(["a", "b", "c", "d"]), min_size=1, max_size=40))
    counters: dict[str, int] = {}
    applied = []
    for n, key in enumerate(keys):
        seq = counters[key] = counters.get(key, -1) + 1
        applied.append(Applied(f"out-{n}", f"in-{n}", key, seq))
    injected = [Injected(a.source_id, a.key, a.seq) for a in applied]
    return draw(st.permutations(injected)), applied


@hypothesis.settings(database=None)
@hypothesis.given(run=_per_key_ordered_run(), data=st.data())
def test_property_per_key_ordered_run_is_ok_and_any_removal_is_lost(run, data) -> None:
    injected, applied = run
    assert check(History(injected, applied)).ok
    drop = data.draw(st.integers(0, len(applied) - 1), label="dropped index")
    report = check(History(injected, applied[:drop] + applied[drop + 1:]))
    assert report.lost == (applied[drop].source_id,)
