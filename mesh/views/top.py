"""``mesh top``: a live terminal dashboard of the mesh, refreshed every second.

It follows the audit topic from a recent window (the last ``--since`` seconds, at most
``--backlog`` records per partition: never a week of audit from the beginning) and
scrapes each ``--metrics`` target every refresh. The numbers come from
:mod:`mesh.views.stats`; this module reads, scrapes and draws:

* a table of agents: replicas, events/s in and out, success rate, average and p50/p99 handling
  time, retries and dead letters over the window (audit); consumer lag, in-flight
  inputs and held state (metrics); the last error;
* a panel of circuit breakers (``mesh_breaker_state``) and fallbacks;
* a panel of the last failures (retries and dead letters) with where they happened.

A target that does not answer shows as down, never as a crash. ``frames=N`` prints N
frames to the console instead of a live view (``mesh top --once`` for scripts and
tests); Ctrl-C or SIGTERM stops it cleanly.

Example:
    >>> run(settings, TopOptions(metrics=("127.0.0.1:9101",), frames=1),
    ...     Console())  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import signal
import time
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.panel import Panel
from rich.table import Table
from rich.text import Text

from mesh.config import MeshSettings
from mesh.errors import MeshError, TransportError
from mesh.kafka.base import Record
from mesh.kafka.reader import TopicReader
from mesh.runtime.audit import AuditEvent, audit_topic
from mesh.serde.codec import Codec
from mesh.views.stats import (
    AgentGauges,
    AgentStats,
    AuditWindow,
    BreakerView,
    Failure,
    Scrape,
    breakers_of,
    gauges_by_agent,
    matches,
)

logger = logging.getLogger(__name__)

SCRAPE_TIMEOUT_S = 2.0
CATCH_UP_TIMEOUT_S = 60.0
POLL_S = 0.2  # longest audit poll: how fast a stop is seen


@dataclass(frozen=True, slots=True)
class TopOptions:
    """What ``mesh top`` shows and how often. ``frames``: None for a live view until
    stopped, N to print N frames (one every ``interval_s``) and return."""

    metrics: tuple[str, ...] = ()
    agents: tuple[str, ...] = ()  # glob patterns
    interval_s: float = 1.0
    window_s: float = 60.0
    since_s: float | None = None  # how far back to start reading (at most the window)
    frames: int | None = None
    backlog: int = 20_000  # records per audit partition read at most on start

    def __post_init__(self) -> None:
        for name in ("interval_s", "window_s"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be positive seconds.")
        if self.since_s is not None and self.since_s < 0:
            raise ValueError(f"since_s={self.since_s!r}: must be >= 0 seconds back.")
        if self.frames is not None and self.frames < 1:
            raise ValueError(f"frames={self.frames!r}: print at least 1 frame, or None "
                             "for a live view.")
        if self.backlog < 0:
            raise ValueError(f"backlog={self.backlog!r}: records per partition, >= 0.")


def metrics_url(target: str) -> str:
    """``host:port`` as ``http://host:port/metrics``; full URLs unchanged.

    Example:
        >>> metrics_url("127.0.0.1:9101")
        'http://127.0.0.1:9101/metrics'
    """
    return target if "://" in target else f"http://{target}/metrics"


def scrape(url: str, *, timeout: float = SCRAPE_TIMEOUT_S) -> Scrape:
    """One target's samples, or a down :class:`Scrape` saying why (never raises)."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as answer:
            text = answer.read().decode()
    except (OSError, ValueError, http.client.HTTPException) as exc:
        reason = getattr(exc, "reason", None) or exc
        return Scrape(url, error=f"{type(exc).__name__}: {reason}")
    return Scrape.parse(url, text)


async def scrape_all(urls: Sequence[str], *, timeout: float) -> list[Scrape]:
    """Every target at once (in threads: urllib blocks)."""
    return list(await asyncio.gather(*(asyncio.to_thread(scrape, u, timeout=timeout)
                                       for u in urls)))


@dataclass(frozen=True, slots=True)
class Frame:
    """Everything one refresh draws."""

    now_ms: int
    window_s: float
    agents: list[AgentStats]
    gauges: dict[str, AgentGauges]
    down: set[str]  # agents last served by a target that is down now
    breakers: list[BreakerView]
    failures: list[Failure]
    scrapes: list[Scrape]
    audit: str  # what was read of the audit topic, or why nothing


class Dashboard:
    """The state behind the frames: the audit window and the latest scrapes. It
    remembers which agents each target served, so they show as down when it stops
    answering.

    Example:
        >>> dash = Dashboard(AuditWindow(60, origin_ms=0))
        >>> dash.update([Scrape("http://127.0.0.1:9101/metrics", error="refused")])
        >>> dash.frame(now_ms=1_000).agents
        []
    """

    def __init__(self, window: AuditWindow) -> None:
        self.window = window
        self.scrapes: list[Scrape] = []
        self.audit_error: str | None = None
        self.undecodable = 0
        self._served: dict[str, set[str]] = {}  # url -> agents it served when last up

    def add(self, event: AuditEvent) -> None:
        self.window.add(event)

    def update(self, scrapes: list[Scrape]) -> None:
        self.scrapes = scrapes
        for s in scrapes:
            if s.up:
                self._served[s.url] = s.agents()

    def frame(self, now_ms: int) -> Frame:
        patterns = self.window.patterns
        gauges = gauges_by_agent(self.scrapes, patterns)
        down = {a for s in self.scrapes if not s.up for a in self._served.get(s.url, ())
                if matches(a, patterns)} - gauges.keys()
        breakers = breakers_of(self.scrapes)  # named by downstream, not by agent
        if self.audit_error:
            audit = f"{audit_topic.name} unavailable: {self.audit_error}"
        else:
            audit = (f"{audit_topic.name}: {self.window.added} events since "
                     f"{_clock(self.window.origin_ms)}")
            if self.undecodable:
                audit += f", {self.undecodable} undecodable"
        return Frame(now_ms, self.window.window_ms / 1000, self.window.stats(now_ms), gauges,
                     down, breakers, self.window.failures(), self.scrapes, audit)


def run(settings: MeshSettings, options: TopOptions, console: Console) -> None:
    """Run the dashboard until stopped (live) or for ``options.frames`` frames."""
    with contextlib.suppress(KeyboardInterrupt):  # before the loop owns SIGINT
        asyncio.run(_run(settings, options, console))


async def _run(settings: MeshSettings, options: TopOptions, console: Console) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    # older events than the window are never shown, so there is no point reading them
    since_s = min(options.window_s, options.window_s if options.since_s is None
                  else options.since_s)
    dash = Dashboard(AuditWindow(options.window_s, origin_ms=_now_ms() - int(since_s * 1000),
                                 agents=options.agents))
    urls = [metrics_url(t) for t in options.metrics]
    async with contextlib.AsyncExitStack() as stack:
        reader = await _open_audit(settings, dash, stack)
        feed = AuditFeed(reader, Codec(settings.schema_registry), dash, stop)
        await feed.catch_up(options.backlog)
        if options.frames is not None:
            await _frames(dash, feed, urls, options, lambda r: console.print(r))
            return
        with Live(console=console, auto_refresh=False, screen=False) as live:
            await _frames(dash, feed, urls, options,
                          lambda r: live.update(r, refresh=True))


async def _frames(dash: Dashboard, feed: AuditFeed, urls: list[str], options: TopOptions,
                  show: Callable[[RenderableType], object]) -> None:
    shown = 0
    while not feed.stop.is_set() and (options.frames is None or shown < options.frames):
        if shown:
            await feed.follow(options.interval_s)
        dash.update(await scrape_all(urls, timeout=min(SCRAPE_TIMEOUT_S, options.interval_s)))
        show(render(dash.frame(_now_ms())))
        shown += 1


async def _open_audit(settings: MeshSettings, dash: Dashboard,
                      stack: contextlib.AsyncExitStack) -> TopicReader | None:
    try:
        return await stack.enter_async_context(TopicReader(settings.kafka,
                                                           [audit_topic.name]))
    except TransportError as exc:  # metrics alone are still worth showing
        logger.warning("not reading the audit topic: %s", exc)
        dash.audit_error = str(exc)
        return None


class AuditFeed:
    """Audit records into a :class:`Dashboard`: a catch-up from the last ``backlog``
    records of each partition, then a bounded follow per frame that returns at once
    when ``stop`` is set. ``reader`` None (the audit topic is unreadable) feeds nothing.

    Example:
        >>> feed = AuditFeed(reader, Codec(), dash, asyncio.Event())  # doctest: +SKIP
        >>> await feed.catch_up(backlog=1000); await feed.follow(1.0)  # doctest: +SKIP
    """

    def __init__(self, reader: TopicReader | None, codec: Codec, dash: Dashboard,
                 stop: asyncio.Event) -> None:
        self.reader, self.codec, self.dash, self.stop = reader, codec, dash, stop

    async def catch_up(self, backlog: int) -> None:
        """Read the last ``backlog`` records of each partition up to the current end."""
        if self.reader is None:
            return
        ends = await self.reader.seek_to_last(backlog)
        deadline = time.monotonic() + CATCH_UP_TIMEOUT_S
        while not self.stop.is_set() and not await self.reader.caught_up(ends):
            if time.monotonic() > deadline:
                logger.warning("audit catch-up not done after %.0f s: showing what was read",
                               CATCH_UP_TIMEOUT_S)
                return
            await self._add(await self.reader.poll(POLL_S))

    async def follow(self, seconds: float) -> None:
        """Take audit records for ``seconds`` (less if stopped)."""
        deadline = time.monotonic() + seconds
        while not self.stop.is_set() and (left := deadline - time.monotonic()) > 0:
            if self.reader is None:
                await _wait(self.stop.wait(), min(left, POLL_S))
            else:
                await self._add(await self.reader.poll(min(left, POLL_S)))

    async def _add(self, records: list[Record]) -> None:
        for record in records:
            try:
                event = await self.codec.decode(audit_topic, record.value or b"")
            except MeshError as exc:
                self.dash.undecodable += 1
                logger.debug("undecodable audit record %s[%d]@%d: %s", record.topic,
                             record.partition, record.offset, exc)
                continue
            if isinstance(event, AuditEvent):
                self.dash.add(event)


async def _wait(awaitable: Awaitable[object], timeout: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(awaitable, timeout)


def render(frame: Frame) -> RenderableType:
    """The dashboard: a header, the agents table, breakers, recent failures.

    Example:
        >>> Console(record=True).print(render(dash.frame(now_ms)))  # doctest: +SKIP
    """
    return Group(_header(frame), _agents_table(frame), _breakers_panel(frame),
                 _failures_panel(frame))


def _header(frame: Frame) -> Text:
    up = sum(s.up for s in frame.scrapes)
    targets = f"{up}/{len(frame.scrapes)} targets up" if frame.scrapes else "none (--metrics)"
    text = Text.assemble(("mesh top", "bold"), f"  {_clock(frame.now_ms)}  window "
                         f"{frame.window_s:g} s  |  {frame.audit}  |  metrics: {targets}")
    for s in frame.scrapes:
        if not s.up:
            text.append(f"\n  down: {s.url} ({s.error})", style="red")
    return text


_COLUMNS = ("agent", "replicas", "in/s", "out/s", "handled", "ok %", "avg ms", "p50 ms",
            "p99 ms",
            "retries", "dead", "lag", "in flight", "state", "last error")


def _agents_table(frame: Frame) -> Table:
    table = Table(title="agents", title_justify="left", expand=False)
    for column in _COLUMNS:  # when narrow, only the last error wraps: names stay whole
        table.add_column(column, justify="left" if column in ("agent", "state", "last error")
                         else "right", max_width=32 if column == "last error" else None,
                         no_wrap=column != "last error")
    stats = {s.agent: s for s in frame.agents}
    for name in sorted(stats.keys() | frame.gauges.keys() | frame.down):
        table.add_row(name, *_cells(stats.get(name), frame.gauges.get(name),
                                    name in frame.down))
    if not table.rows:
        table.add_row("(no agents: no audit events in the window and no metrics)",
                      *[""] * (len(_COLUMNS) - 1))
    return table


def _cells(s: AgentStats | None, g: AgentGauges | None, down: bool) -> list[str | Text]:
    replicas = max(s.replicas if s else 0, g.targets if g else 0)
    audit: list[str | Text] = ["-"] * 9
    if s is not None:
        audit = [f"{s.rate:.1f}", f"{s.produced_rate:.1f}", str(s.consumed),
                 _num(None if s.success_rate is None else 100 * s.success_rate),
                 _num(s.avg_ms), _num(s.p50_ms), _num(s.p99_ms), str(s.retries),
                 Text(str(s.dead_letters), style="red" if s.dead_letters else "")]
    gauges: list[str | Text] = ["-", "-"]
    if g is not None:
        gauges = [Text(f"{g.lag:g}", style="yellow" if g.lag else ""), f"{g.in_flight:g}"]
    state = (Text("held", style="yellow") if g and g.holding else
             Text("up", style="green") if g else
             Text("down", style="red") if down else Text("-"))
    error = Text(_short(s.last_error or "", 32), style="red") if s else Text("")
    return [str(replicas) if replicas else "-", *audit, *gauges, state, error]


def _breakers_panel(frame: Frame) -> Panel:
    fallbacks = ", ".join(f"{g.agent} {g.fallbacks:g}" for g in frame.gauges.values()
                          if g.fallbacks)
    if not frame.breakers and not fallbacks:
        return Panel("no breaker metrics on the scraped targets", title="breakers")
    table = Table("breaker", "state", "transitions", "rejections", "targets", box=None)
    for breaker in frame.breakers:
        style = {"open": "bold red", "half_open": "yellow"}.get(breaker.state, "green")
        table.add_row(breaker.name, Text(breaker.state, style=style),
                      f"{breaker.transitions:g}",
                      f"{breaker.rejections:g}", str(breaker.targets))
    return Panel(Group(table, Text(f"fallbacks: {fallbacks or 'none'}")), title="breakers")


def _failures_panel(frame: Frame) -> Panel:
    if not frame.failures:
        return Panel("none", title="recent failures (retries, dead letters)")
    table = Table.grid(padding=(0, 2))
    for f in frame.failures:
        table.add_row(_clock(f.at_ms), f.agent,
                      Text(f.outcome, style="red" if f.outcome == "dead_letter" else "yellow"),
                      f.where, f"attempt {f.attempt}" if f.attempt else "", _short(f.error, 160))
    return Panel(table, title="recent failures (retries, dead letters)")


def _short(text: str, width: int) -> str:
    """``text`` on one line, cut to ``width`` characters."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[:width - 1] + "…"


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _clock(at_ms: int) -> str:
    return datetime.fromtimestamp(at_ms / 1000).strftime("%H:%M:%S")


def _now_ms() -> int:
    return int(time.time() * 1000)
