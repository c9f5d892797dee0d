"""`mesh top` as a user runs it: one frame (`--once`) of known audit events and of a
running agent's /metrics, and the live view on a terminal stopped with Ctrl-C.

mesh.audit is shared by every test on the broker, so each test names its agents with
its own prefix and shows only those (`--agent PREFIX-*`).
"""

from __future__ import annotations

import asyncio
import fcntl
import os
import pty
import signal
import struct
import subprocess
import termios
import threading
import time
from pathlib import Path

from mesh import Codec, apply_topics
from mesh.config import AuditSettings
from mesh.kafka.admin import Admin
from mesh.kafka.base import OutRecord, TopicSpec
from mesh.kafka.embedded import free_port
from mesh.kafka.provision import wait_visible
from mesh.kafka.reader import TopicReader
from mesh.runtime.audit import AuditEvent, Auditor, audit_topic
from mesh.views.stats import AuditWindow
from mesh.views.top import AuditFeed, Dashboard, scrape
from tests.apps.stages import build
from tests.conftest import ROOT, BrokerUnderTest
from tests.integration.test_cli import Cli
from tests.support import AgentProcess, encode, inject, make_items, wait_for_count


def row_of(stdout: str, agent: str) -> list[str]:
    """The cells of ``agent``'s row in the agents table."""
    rows = [line for line in stdout.splitlines() if line.startswith(f"│ {agent} ")]
    assert len(rows) == 1, f"expected one row for {agent}:\n{stdout}"
    return [cell.strip() for cell in rows[0].strip("│").split("│")]


def consumed(agent: str, at_ms: int, i: int, outcome: str, duration_ms: float) -> AuditEvent:
    failed = outcome != "ok"
    return AuditEvent(kind="consumed", agent=agent, at_ms=at_ms, topic="orders", partition=0,
                      offset=i, event_id=f"e{i}", correlation_id=f"c{i}", outcome=outcome,
                      duration_ms=duration_ms, attempt=1,
                      error_class="ValueError" if failed else None,
                      error=f"poison item {i}" if failed else None)


async def test_once_counts_each_agents_audit_events_over_the_last_minute(
        broker: BrokerUnderTest, prefix: str, cli: Cli) -> None:
    """Pass: for writer's 20 inputs of the last 20 s (18 ok, 1 retried, 1 dead-lettered,
    taking 1..20 ms) and 18 outputs, plus one input 10 minutes old, `mesh top --once`
    shows 20 handled, 0.3/s in and out, 90.0 % ok, average 10.5, p50 10.0 and p99 20.0
    ms, 1 retry,
    1 dead letter and the last error; reader's 6 inputs are its own row; another test's
    agent is filtered out; the metrics target that does not answer shows as down."""
    settings = broker.settings()
    await apply_topics(settings.kafka, [audit_topic])
    writer, reader, stranger = f"{prefix}-writer", f"{prefix}-reader", f"x{prefix}-writer"
    now = int(time.time() * 1000)
    outcomes = ["ok"] * 18 + ["retry", "dead_letter"]
    events = [consumed(writer, now - 20_000 + i * 1_000, i, o, i + 1)
              for i, o in enumerate(outcomes)]
    events += [AuditEvent(kind="produced", agent=writer, at_ms=now - 19_000 + i * 1_000,
                          topic="invoices", event_id=f"o{i}", correlation_id=f"c{i}")
               for i in range(18)]
    events += [consumed(reader, now - 5_000 + i, 100 + i, "ok", 3.0) for i in range(6)]
    events.append(consumed(writer, now - 600_000, 999, "dead_letter", 5.0))  # too old
    events.append(consumed(stranger, now - 1_000, 1000, "ok", 5.0))
    auditor = Auditor(Codec(), AuditSettings(), source="test")
    await inject(settings, [auditor.record(e) for e in events])
    dead = f"http://127.0.0.1:{free_port()}/metrics"

    out = await cli.ok("top", "--once", "--agent", f"{prefix}-*", "--metrics", dead)

    row = row_of(out, writer)
    assert row[:-1] == [
        writer, "-", "0.3", "0.3", "20", "90.0", "10.5", "10.0", "20.0", "1", "1", "-", "-",
        "-"]
    assert row[-1].startswith("ValueError: poison")  # the rest may wrap to the next line
    assert row_of(out, reader) == [
        reader, "-", "0.1", "0.0", "6", "100.0", "3.0", "3.0", "3.0", "0", "0", "-", "-", "-",
        ""]
    assert stranger not in out
    assert f"down: {dead}" in out
    assert "metrics: 0/1 targets up" in out


async def test_the_feed_reads_the_last_backlog_records_of_each_partition_then_follows(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: on an audit topic with 8 inputs of one agent in partition 0 (3 old
    dead letters, then 5 ok) and 3 of another in partition 1, a catch-up with backlog 5
    counts exactly the last 5 of partition 0 (all ok) and the 3 of partition 1; then
    following picks up 2 inputs produced afterwards, and nothing else."""
    settings = broker.settings()
    topic = f"{prefix}.audit"
    async with Admin(settings.kafka) as admin:
        assert await admin.create_topic(TopicSpec(topic, 2))
        await wait_visible(admin, [TopicSpec(topic, 2)])
    first, second = f"{prefix}-first", f"{prefix}-second"
    now = int(time.time() * 1000)
    codec = Codec()

    def records(agent: str, partition: int, outcomes: list[str]) -> list[OutRecord]:
        return [OutRecord(topic, codec.encode(audit_topic, consumed(
            agent, now - 10_000 + i, i, outcome, 1.0))[0], partition=partition)
            for i, outcome in enumerate(outcomes)]

    await inject(settings, records(first, 0, ["dead_letter"] * 3 + ["ok"] * 5)
                 + records(second, 1, ["ok"] * 3))
    window = AuditWindow(60, origin_ms=now - 60_000)
    async with TopicReader(settings.kafka, [topic]) as reader:
        feed = AuditFeed(reader, codec, Dashboard(window), asyncio.Event())

        await feed.catch_up(backlog=5)

        counted = {s.agent: (s.consumed, s.ok, s.dead_letters) for s in window.stats(now)}
        assert counted == {first: (5, 5, 0), second: (3, 3, 0)}
        await inject(settings, records(second, 1, ["retry", "ok"]))
        deadline = time.monotonic() + 60
        while window.added < 10:
            assert time.monotonic() < deadline, f"{window.added} audit events after 60 s"
            await feed.follow(0.5)
    counted = {s.agent: (s.consumed, s.ok, s.retries) for s in window.stats(now)}
    assert counted == {first: (5, 5, 0), second: (5, 4, 1)}


async def run_stage(broker: BrokerUnderTest, prefix: str, log: Path, *, good: int,
                    poison: int) -> tuple[str, AgentProcess, int]:
    """`mesh run` of the chain's first stage with /metrics on a free port, after it has
    handled ``good`` items and dead-lettered ``poison`` ones and its lag is back to 0;
    returns the agent's name, its process and the port."""
    stage1 = build(prefix).agents[0]
    source, sink = stage1.consumes[0], stage1.produces[0]
    settings = broker.settings()
    await apply_topics(settings.kafka, [source, sink, audit_topic])
    port = free_port()
    proc = AgentProcess(broker, "tests.apps.stages:stage1", prefix=prefix, log=log.open("wb"),
                        env={"MESH_METRICS__PORT": str(port)}).start()
    items = make_items(keys=1, per_key=good + poison, bad=[(0, s) for s in range(poison)])
    codec = Codec()
    await inject(settings, [encode(codec, source, i) for i in items])
    await wait_for_count(settings, [sink.name], good)
    if poison:
        await wait_for_count(settings, [source.dlq_name], poison)
    deadline = time.monotonic() + 60
    while True:  # the lag gauge follows the commits: wait for 0 on every partition
        samples = scrape(f"http://127.0.0.1:{port}/metrics").samples
        lags = [s.value for s in samples if s.name == "mesh_consumer_lag_events"]
        if lags and not any(lags):
            return stage1.name, proc, port
        assert time.monotonic() < deadline, f"lag {lags} not 0 after 60 s"
        await asyncio.sleep(0.2)  # poll interval of the scrape, bounded by the deadline


async def test_once_shows_a_running_agents_replicas_lag_and_state_from_metrics(
        broker: BrokerUnderTest, prefix: str, cli: Cli, tmp_path: Path) -> None:
    """Pass: with a `mesh run` agent done with its 10 items, `mesh top --once` scraping
    it and a port where nothing listens shows the agent's row with 1 replica, lag 0,
    0 in flight and state up, and the other target as down (exit code 0)."""
    agent, proc, port = await run_stage(broker, prefix, tmp_path / "agent.log", good=10,
                                        poison=0)
    dead = f"http://127.0.0.1:{free_port()}/metrics"
    try:
        out = await cli.ok("top", "--once", "--agent", agent, "--metrics", f"127.0.0.1:{port}",
                           "--metrics", dead)
    finally:
        assert proc.terminate() == 0
    row = row_of(out, agent)
    assert row[1] == "1"
    assert row[11:14] == ["0", "0", "up"]
    assert "metrics: 1/2 targets up" in out
    assert f"down: {dead}" in out


async def test_once_counts_what_a_running_agent_audited(
        broker: BrokerUnderTest, prefix: str, cli: Cli, tmp_path: Path) -> None:
    """Pass: a `mesh run` agent that handled 10 good and 2 poison items (each tried 3
    times: a plain exception is retried) shows 16 handled, 62.5 % ok, 4 retries, 2 dead
    letters, its ValueError as last error, and both dead letters in the recent
    failures."""
    agent, proc, port = await run_stage(broker, prefix, tmp_path / "agent.log", good=10,
                                        poison=2)
    try:
        out = await cli.ok("top", "--once", "--agent", agent, "--metrics", f"127.0.0.1:{port}")
    finally:
        assert proc.terminate() == 0
    row = row_of(out, agent)
    assert row[4:6] == ["16", "62.5"]
    assert row[9:11] == ["4", "2"]
    assert row[14].startswith("ValueError")
    assert out.count(f"{agent}  dead_letter") == 2


def on_terminal(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[bytes], int]:
    """``argv`` started on a new 200x50 pseudo-terminal; the process and the pty's
    master side (to read the screen from)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
    process = subprocess.Popen(argv, env=env, cwd=ROOT, stdin=slave, stdout=slave,
                               stderr=slave)
    os.close(slave)
    return process, master


def _read_all(fd: int, into: bytearray, lock: threading.Lock) -> None:
    """Drain a pty until the other side closes (so the child never blocks writing)."""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # EIO: the child closed its side
            return
        if not chunk:
            return
        with lock:
            into.extend(chunk)


async def test_live_view_redraws_on_a_terminal_and_ctrl_c_exits_0(
        broker: BrokerUnderTest, prefix: str, cli: Cli) -> None:
    """Pass: on a terminal, `mesh top` draws a frame at least twice (every 0.2 s), and
    SIGINT (Ctrl-C) ends it with exit code 0 within 30 s."""
    await apply_topics(broker.settings().kafka, [audit_topic])
    process, master = on_terminal([*cli.argv, "top", "--interval", "0.2", "--agent",
                                   f"{prefix}-*"], cli.env)
    screen, lock = bytearray(), threading.Lock()
    reader = threading.Thread(target=_read_all, args=(master, screen, lock), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 60
        while True:
            with lock:
                frames = screen.count(b"mesh top")
            if frames >= 2:
                break
            assert process.poll() is None, f"exited {process.returncode}: {screen.decode()}"
            assert time.monotonic() < deadline, f"{frames} frame(s) in 60 s: {screen.decode()}"
            await asyncio.sleep(0.1)  # poll interval of the screen, bounded by the deadline
        os.kill(process.pid, signal.SIGINT)
        code = await asyncio.to_thread(process.wait, 30)
    finally:
        if process.poll() is None:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(timeout=30)
        reader.join(timeout=10)
        os.close(master)
    assert code == 0, screen.decode(errors="replace")
    assert b"Traceback" not in screen
