"""Delivery checker: a pure function judging one recorded test history.

In the spirit of Jepsen's Kafka checker, the test records what it injected
(and the broker acknowledged), what the sinks applied, what the output topics
hold after drain and what ended in dead-letter topics; :func:`check` turns that
into a :class:`Report` of every delivery anomaly. No I/O happens here.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, fields

__all__ = ["Applied", "DeadLettered", "History", "Injected", "Logged", "OrderViolation",
           "Report", "check"]

_SHOWN = 5  # offending ids named per kind in Report.summary()


def _need_id(owner: str, name: str, value: object, *, empty_ok: bool = False) -> None:
    if not isinstance(value, str) or not (value or empty_ok):
        raise ValueError(f"{owner}.{name} must be a {'' if empty_ok else 'non-empty '}string, "
                         f"got {value!r}; pass the value exactly as carried by the event "
                         "(decoded).")


def _need_count(owner: str, name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{owner}.{name} must be an int >= 0, got {value!r}; "
                         f"pass the value recorded from the producer/consumer, not a placeholder.")


@dataclass(frozen=True, slots=True)
class Injected:
    """An input the test produced and the broker acknowledged.

    Example:
        >>> Injected("in-7", key="order-1", seq=3, bad=True).bad
        True
    """

    event_id: str
    key: str
    seq: int
    bad: bool = False

    def __post_init__(self) -> None:
        _need_id("Injected", "event_id", self.event_id)
        _need_id("Injected", "key", self.key, empty_ok=True)
        _need_count("Injected", "seq", self.seq)


@dataclass(frozen=True, slots=True)
class Applied:
    """One application of an output at a sink, in the sink's apply order.

    Example:
        >>> Applied("out-1", source_id="in-1", key="k", seq=0).source_id
        'in-1'
    """

    event_id: str
    source_id: str
    key: str
    seq: int

    def __post_init__(self) -> None:
        _need_id("Applied", "event_id", self.event_id)
        _need_id("Applied", "source_id", self.source_id)
        _need_id("Applied", "key", self.key, empty_ok=True)
        _need_count("Applied", "seq", self.seq)


@dataclass(frozen=True, slots=True)
class Logged:
    """One record read back from an output topic after drain.

    Example:
        >>> Logged("out", partition=0, offset=12, event_id="out-1", source_id="in-1").offset
        12
    """

    topic: str
    partition: int
    offset: int
    event_id: str
    source_id: str

    def __post_init__(self) -> None:
        _need_id("Logged", "topic", self.topic)
        _need_count("Logged", "partition", self.partition)
        _need_count("Logged", "offset", self.offset)
        _need_id("Logged", "event_id", self.event_id)
        _need_id("Logged", "source_id", self.source_id)


@dataclass(frozen=True, slots=True)
class DeadLettered:
    """One dead-letter record, naming the injected input it holds.

    Example:
        >>> DeadLettered("in-7").source_id
        'in-7'
    """

    source_id: str

    def __post_init__(self) -> None:
        _need_id("DeadLettered", "source_id", self.source_id)


@dataclass(frozen=True, slots=True)
class History:
    """Everything observed during one run; sequences are stored as tuples.

    Raises:
        ValueError: if two injections share an event id or a (key, seq) pair.

    Example:
        >>> History(injected=[Injected("in-1", "k", 0)], applied=[]).injected
        (Injected(event_id='in-1', key='k', seq=0, bad=False),)
    """

    injected: Sequence[Injected]
    applied: Sequence[Applied]
    logged: Sequence[Logged] = ()
    dead_letters: Sequence[DeadLettered] = ()

    def __post_init__(self) -> None:
        for name, kind in (("injected", Injected), ("applied", Applied),
                           ("logged", Logged), ("dead_letters", DeadLettered)):
            items = tuple(getattr(self, name))
            for item in items:
                if not isinstance(item, kind):
                    raise TypeError(f"History.{name} must hold {kind.__name__} records, got "
                                    f"{item!r}; wrap raw observations in {kind.__name__}(...).")
            object.__setattr__(self, name, items)
        ids: set[str] = set()
        slots: dict[tuple[str, int], str] = {}
        for inj in self.injected:
            if inj.event_id in ids:
                raise ValueError(
                    f"History.injected has event id {inj.event_id!r} twice; ids must be "
                    "unique or the check is meaningless: give every injection a fresh id.")
            ids.add(inj.event_id)
            other = slots.setdefault((inj.key, inj.seq), inj.event_id)
            if other != inj.event_id:
                raise ValueError(f"History.injected has (key={inj.key!r}, seq={inj.seq}) for both "
                                 f"{other!r} and {inj.event_id!r}; seq must be unique per key — "
                                 f"number each key's injections with a per-key counter.")


@dataclass(frozen=True, slots=True)
class OrderViolation:
    """Two consecutive applications for ``key`` whose seqs are out of order.

    Example:
        >>> str(OrderViolation("k", previous_seq=3, seq=1))
        'k:3->1'
    """

    key: str
    previous_seq: int
    seq: int

    def __post_init__(self) -> None:
        _need_id("OrderViolation", "key", self.key, empty_ok=True)
        _need_count("OrderViolation", "previous_seq", self.previous_seq)
        _need_count("OrderViolation", "seq", self.seq)

    def __str__(self) -> str:
        return f"{self.key}:{self.previous_seq}->{self.seq}"


@dataclass(frozen=True, slots=True)
class Report:
    """The anomalies found by :func:`check`; every id tuple is sorted.

    Example:
        >>> Report(lost=("in-2",)).ok
        False
    """

    lost: tuple[str, ...] = ()
    sink_duplicates: tuple[str, ...] = ()
    log_duplicates: tuple[str, ...] = ()
    order_violations: tuple[OrderViolation, ...] = ()
    unexpected_dead_letters: tuple[str, ...] = ()
    missing_dead_letters: tuple[str, ...] = ()
    unknown_outputs: tuple[str, ...] = ()
    applied_bad: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:
        """True iff at-least-once delivery held (log duplicates are tolerated)."""
        return not (self.lost or self.sink_duplicates or self.order_violations
                    or self.unexpected_dead_letters or self.missing_dead_letters
                    or self.unknown_outputs or self.applied_bad)

    @property
    def ok_exactly_once(self) -> bool:
        """True iff :attr:`ok` and no output id was written to the log twice."""
        return self.ok and not self.log_duplicates

    def summary(self) -> str:
        """Return a short multi-line description, naming the first offending ids.

        Example:
            >>> print(Report(lost=("in-2",)).summary().splitlines()[1])
            lost: 1 [in-2]
        """
        verdict = "ok" if self.ok_exactly_once else "ok (at-least-once)" if self.ok else "FAILED"
        lines = [f"delivery check: {verdict}"]
        for field in fields(self):
            found = [str(x) for x in getattr(self, field.name)]
            if found:
                more = f", +{len(found) - _SHOWN} more" if len(found) > _SHOWN else ""
                lines.append(f"{field.name.replace('_', ' ')}: {len(found)} "
                             f"[{', '.join(found[:_SHOWN])}{more}]")
        return "\n".join(lines)


def _repeated(ids: Iterable[str]) -> tuple[str, ...]:
    return tuple(sorted(i for i, n in Counter(ids).items() if n > 1))


def _order_violations(history: History, dead: set[str]) -> tuple[OrderViolation, ...]:
    by_slot = {(i.key, i.seq): i.event_id for i in history.injected}
    last: dict[str, Applied] = {}
    found: list[OrderViolation] = []
    for app in history.applied:
        prev = last.get(app.key)
        last[app.key] = app
        if prev is None or prev.source_id == app.source_id:
            continue  # first for the key, or fan-out/replay of the same input
        gap_explained = all(by_slot.get((app.key, s)) in dead
                            for s in range(prev.seq + 1, app.seq))
        if app.seq <= prev.seq or not gap_explained:
            found.append(OrderViolation(app.key, prev.seq, app.seq))
    return tuple(found)


def check(history: History) -> Report:
    """Judge one history and return every delivery anomaly found.

    Order is checked per key over consecutive applications of *different*
    inputs: seqs must strictly increase, and a skipped seq is tolerated only if
    it belongs to an injected input of that key found in the dead letters.
    Inputs missing before the first or after the last application of a key
    show up in ``lost`` rather than as order violations.

    Args:
        history: What the run injected, applied, logged and dead-lettered.

    Returns:
        A :class:`Report`; ``report.ok`` is the at-least-once verdict.

    Example:
        >>> h = History(injected=[Injected("in-1", "k", 0), Injected("in-2", "k", 1)],
        ...             applied=[Applied("out-2", "in-2", "k", 1)])
        >>> check(h).lost
        ('in-1',)
    """
    injected = {i.event_id: i for i in history.injected}
    dead = {d.source_id for d in history.dead_letters}
    reached = {a.source_id for a in history.applied}
    positions = {(r.topic, r.partition, r.offset, r.event_id) for r in history.logged}
    return Report(
        lost=tuple(sorted(i for i, inj in injected.items()
                          if not inj.bad and i not in reached and i not in dead)),
        sink_duplicates=_repeated(a.event_id for a in history.applied),
        log_duplicates=_repeated(p[3] for p in positions),
        order_violations=_order_violations(history, dead),
        unexpected_dead_letters=tuple(sorted(
            s for s in dead if s not in injected or not injected[s].bad)),
        missing_dead_letters=tuple(sorted(
            i for i, inj in injected.items() if inj.bad and i not in dead)),
        unknown_outputs=tuple(sorted({a.event_id for a in history.applied
                                      if a.source_id not in injected})),
        applied_bad=tuple(sorted(s for s in reached if s in injected and injected[s].bad)),
    )
