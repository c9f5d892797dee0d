"""Losing the broker: an agent fails loudly, never retries silently forever or skips.

Each test starts its own embedded broker (the session's must survive) and stops it by
its pid; the agent is a real `mesh run` process.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from pathlib import Path

from mesh import Codec, EmbeddedBroker, apply_topics
from tests.apps.stages import build
from tests.conftest import BrokerUnderTest, _with_mesh_topics
from tests.support import AgentProcess, encode, inject, make_items, wait_for_count


async def _running_stage(prefix: str, tmp_path: Path, embedded: EmbeddedBroker,
                         *, slow: int = 0, **env: str) -> tuple[AgentProcess, Path]:
    """stage1 as a process on ``embedded``, having handled 20 events, then taken
    ``slow`` more whose handler takes 4 s each (fetched within the 2 s waited here)."""
    broker = _with_mesh_topics(BrokerUnderTest(embedded.bootstrap, True, "embedded"))
    app = build(prefix)
    stage1 = app.agents[0]
    settings = broker.settings()
    await apply_topics(settings.kafka, [stage1.consumes[0], stage1.produces[0]])
    path = tmp_path / "agent.log"
    agent = AgentProcess(broker, "tests.apps.stages:stage1", prefix=prefix,
                         log=path.open("wb"), env=env).start()
    codec = Codec()
    await inject(settings, [encode(codec, stage1.consumes[0], i)
                            for i in make_items(keys=4, per_key=5)])
    await wait_for_count(settings, [stage1.produces[0].name], 20)
    if slow:
        items = [item.model_copy(update={"sleep_ms": 4_000})
                 for item in make_items(keys=slow, per_key=1)]
        await inject(settings, [encode(codec, stage1.consumes[0], i) for i in items])
        await asyncio.sleep(2)  # fetched within a poll or two (the broker's fetch wait is 100 ms)
    return agent, path


def _exit_code(agent: AgentProcess, within: float) -> int:
    assert agent.process is not None
    try:
        return agent.process.wait(timeout=within)
    except subprocess.TimeoutExpired:
        agent.terminate()
        raise AssertionError(f"agent (pid {agent.pid}) still running {within:.0f} s after "
                             "its broker went away") from None


async def test_agent_whose_broker_dies_exits_non_zero_naming_the_broker(
        prefix: str, tmp_path: Path) -> None:
    """Pass: with its broker stopped, the agent notices within
    MESH_RUNTIME__BROKER_TIMEOUT_S, exits with a non-zero code by itself and says
    BrokerLost with the broker's address in its output."""
    embedded = EmbeddedBroker().__enter__()
    try:
        agent, log = await _running_stage(prefix, tmp_path, embedded,
                                          MESH_RUNTIME__BROKER_TIMEOUT_S="6")
    finally:
        embedded.stop()
    code = _exit_code(agent, within=120)
    output = log.read_text()
    assert code != 0, output
    assert "BrokerLost" in output and f"No broker at {embedded.bootstrap} answered" in output


async def test_agent_whose_memory_broker_restarts_empty_stops_instead_of_going_on(
        prefix: str, tmp_path: Path) -> None:
    """Pass: the embedded broker restarts on the same port with nothing in it (new
    cluster id, no committed offsets); the agent does not go on as if nothing happened:
    it exits non-zero saying the broker is another cluster (the unreachable limit is
    set far away, so only the restart can be what stopped it)."""
    embedded = EmbeddedBroker().__enter__()
    port = embedded.port
    try:
        agent, log = await _running_stage(prefix, tmp_path, embedded,
                                          MESH_RUNTIME__BROKER_TIMEOUT_S="600")
    finally:
        embedded.stop()
    restarted = EmbeddedBroker(port)
    with restarted:
        code = _exit_code(agent, within=120)
    output = log.read_text()
    assert code != 0, output
    assert "BrokerLost" in output and "is now cluster" in output


async def test_sigterm_stops_an_agent_whose_broker_is_gone(
        prefix: str, tmp_path: Path) -> None:
    """Pass: with the broker gone (and the unreachable limit far away), SIGTERM still
    stops the agent: every shutdown step that needs the broker is bounded."""
    embedded = EmbeddedBroker().__enter__()
    try:
        agent, log = await _running_stage(prefix, tmp_path, embedded,
                                          MESH_RUNTIME__BROKER_TIMEOUT_S="600",
                                          MESH_RUNTIME__SHUTDOWN_TIMEOUT_S="5")
    finally:
        embedded.stop()
    assert agent.alive(), log.read_text()
    agent.terminate(timeout=90)  # raises if SIGTERM is ignored


async def test_sigterm_with_a_broker_that_answers_nothing_stops_within_one_bound(
        prefix: str, tmp_path: Path) -> None:
    """Pass: inputs in flight, the broker frozen (SIGSTOP: its connections stay open and
    nothing answers, as in a network partition), their handlers finish, so their
    outputs wait for acks that do not come; SIGTERM: the agent exits with code 0 within
    MESH_RUNTIME__SHUTDOWN_TIMEOUT_S (6 s) plus its interpreter's exit. Its steps (the
    in-flight inputs, the commit, leaving the group, the producer's flush) share that
    bound; bounded one by one, they added up to twice the bound (15 s)."""
    embedded = EmbeddedBroker().__enter__()
    try:
        agent, log = await _running_stage(prefix, tmp_path, embedded, slow=4,
                                          MESH_RUNTIME__BROKER_TIMEOUT_S="600",
                                          MESH_RUNTIME__SHUTDOWN_TIMEOUT_S="6")
        assert embedded.pid is not None
        os.kill(embedded.pid, signal.SIGSTOP)
        try:
            await asyncio.sleep(3)  # the handlers finish (or are about to); outputs wait
            assert agent.alive(), log.read_text()
            began = time.monotonic()
            code = agent.terminate(timeout=90)
            took = time.monotonic() - began
        finally:
            os.kill(embedded.pid, signal.SIGCONT)
    finally:
        embedded.stop()
    output = log.read_text()
    assert "still busy" in output, output  # in flight (waiting for acks), then cancelled
    assert took < 6 + 4, f"stopped {took:.1f} s after SIGTERM\n{output}"
    assert code == 0, output  # a stop asked for, not a failure
