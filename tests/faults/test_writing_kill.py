"""The writing mesh's writer (a `mesh run` process) killed -9 mid-step and restarted."""

from __future__ import annotations

import re
import time
from collections import Counter
from pathlib import Path

from agents.app import AGENTS, app
from mesh import Codec, Emitter, MeshSettings, apply_topics
from mesh.patterns.delegation.coordinator import WorkflowEvent, WorkflowOutcome
from mesh.kafka.reader import TopicReader
from tests.conftest import BrokerUnderTest
from tests.support import AgentProcess, read_all
from topics.writing import WritingRequest, writing

SEED = {"task": "Create a technical blog post about MCP servers",
        "requirements": {"word_count": 2000, "include_code": True, "audience": "developers"}}
DONE_BEFORE = ["research", "research-practice", "analyse", "code"]


def wait_for_line(path: Path, text: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if text in path.read_text(errors="replace"):
            return
        time.sleep(0.05)  # polling a log file: there is nothing to wait on
    raise AssertionError(f"{text!r} not in {path.name} after {timeout:.0f} s")


async def test_kill_9_of_the_writer_mid_step_completes_without_redoing_done_steps(
        broker: BrokerUnderTest, tmp_path: Path) -> None:
    """Pass: with every agent a `mesh run` process and the writer taking 3 s per step,
    the writer is killed -9 once it has started the write step (its log says so) and
    restarted. The workflow completes with an approved document; the steps done before
    the kill were dispatched once and completed once; the write step completed once
    (its task redelivered by Kafka to the new writer, not dispatched again); the new
    writer is another pid and every service exits 0 on SIGTERM."""
    settings, codec = broker.settings(), Codec()
    await apply_topics(settings.kafka, app.topics.values())
    logs = {name: tmp_path / f"{name}.log" for name in AGENTS}
    think = {"writer": {"AGENTS_THINK_S": "3"}}
    procs = {name: AgentProcess(broker, f"{module.__name__}:agent", prefix="writing",
                                log=logs[name].open("ab"), env=think.get(name)).start()
             for name, module in AGENTS.items()}
    request = WritingRequest.model_validate({**SEED, "workflow_id": f"wf-kill-{time.time_ns()}"})
    wf = request.workflow_id
    try:
        async with Emitter(settings, source="test") as emitter:
            await emitter.emit(writing.requests, [request])
        wait_for_line(logs["writer"], f"workflow {wf} step write: working")
        first = procs["writer"].pid
        procs["writer"].kill9()
        procs["writer"].start()
        outcome = await outcome_of(settings, codec, wf)
        assert procs["writer"].pid != first and procs["writer"].alive()
    finally:
        codes = {name: proc.terminate() for name, proc in procs.items()}
    assert codes == dict.fromkeys(procs, 0), codes
    assert outcome.success and outcome.final_output["approved"], outcome.error
    dispatched: Counter[str] = Counter()
    for topic in writing.tasks.values():
        for record in await read_all(settings, [topic.name]):
            task = await codec.decode(topic, record.value or b"")
            if task.workflow_id == wf:  # type: ignore[attr-defined]
                dispatched[task.step_id] += 1  # type: ignore[attr-defined]
    completed: Counter[str] = Counter()
    for record in await read_all(settings, [writing.events.name]):
        event = await codec.decode(writing.events, record.value or b"")
        assert isinstance(event, WorkflowEvent)
        if event.workflow_id == wf and event.kind == "StepCompleted" and event.step_id:
            completed[event.step_id] += 1
    steps = [*DONE_BEFORE, "write", "review"]
    assert dispatched == Counter(dict.fromkeys(steps, 1)), dispatched
    assert completed == Counter(dict.fromkeys(steps, 1)), completed
    # only the restarted writer finished the step (the first was killed while working)
    assert len(re.findall(r"step write: \d+ words", logs["writer"].read_text())) == 1


async def outcome_of(settings: MeshSettings, codec: Codec, wf: str, timeout: float = 150.0
                     ) -> WorkflowOutcome:
    deadline = time.monotonic() + timeout
    async with TopicReader(settings.kafka, [writing.outcomes.name]) as reader:
        async for record in reader.follow(idle_timeout=timeout):
            outcome = await codec.decode(writing.outcomes, record.value or b"")
            assert isinstance(outcome, WorkflowOutcome)
            if outcome.workflow_id == wf:
                return outcome
            if time.monotonic() > deadline:
                break
    raise AssertionError(f"no outcome for {wf} within {timeout:.0f} s")
