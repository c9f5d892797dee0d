"""Plan signing on a real broker: with MESH_SECURITY__PLAN_KEY set, a specialist runs
only tasks the coordinator signed; forged tasks go to the dead-letter topic unrun."""

from __future__ import annotations

import logging
import secrets
from pathlib import Path
from typing import Any

import pytest
from pydantic import SecretStr

from mesh import Codec, Envelope, Mesh, MeshSettings, apply_topics
from mesh.config import SecuritySettings
from mesh.kafka.base import OutRecord, Record
from mesh.patterns.delegation.plan import Plan, StepResult, StepTask
from mesh.patterns.delegation.signing import PlanSigner
from mesh.runtime.dead_letter import DLQ_AGENT, DLQ_ERROR, DLQ_ERROR_CLASS
from tests.apps.delegation import Job, build, outcomes_of, request_records
from tests.conftest import BrokerUnderTest
from tests.support import AgentProcess, event_id, inject, read_all, wait_for_count

pytestmark = pytest.mark.broker_agnostic

NOT_SIGNED = "is not signed, but specialist 'writer' runs only signed tasks"
NO_MATCH = "has a signature that does not match its content"
MISROUTED = "is signed for specialist 'researcher' but reached specialist 'writer'"


def keyed(settings: MeshSettings, key: str) -> MeshSettings:
    return settings.model_copy(update={"security": SecuritySettings(plan_key=SecretStr(key))})


def forged_record(codec: Codec, topic: Any, task: StepTask, *, key: bytes) -> OutRecord:
    """A task produced straight to a task topic by someone who is not the coordinator."""
    env = Envelope.new(task, source="forger", key=key)
    value, fingerprint = codec.encode(topic, task)
    return OutRecord(topic.name, value, key,
                     tuple(env.with_payload(task, schema=fingerprint).headers()))


async def decoded(settings: MeshSettings, codec: Codec, topic: Any) -> list[tuple[Any, Record]]:
    records = sorted(await read_all(settings, [topic.name]), key=lambda r: (r.partition, r.offset))
    return [(await codec.decode(topic, r.value or b""), r) for r in records]


def raw(record: Record) -> bytes:
    return (record.value or b"") + b"".join(k.encode() + bytes(v) for k, v in record.headers)


async def test_forged_tasks_are_dead_lettered_unrun_and_the_specialist_keeps_working(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    """Pass: the coordinator (in-process, key in its settings) and the writer (a `mesh
    run` process, key from MESH_SECURITY__PLAN_KEY) complete a workflow with signed
    tasks and plans. Five forged tasks produced to the writer's task topic (unsigned,
    signed with another key, a real signature moved onto another workflow, a real task
    with its input altered, a real researcher task sent to the writer) each land in the
    topic's .dlq as SignatureInvalid with a message naming the fix; the writer answers
    none of them (no result for their dispatch ids), keeps its pid, and runs the next
    real workflow's write task, which sits behind them on the same partition. The key
    appears in no record of any of the mesh's topics, no log line and no process output."""
    key = secrets.token_urlsafe(32)
    signer = PlanSigner(SecretStr(key))
    app = build(prefix)
    topics, codec = app.topics, Codec()
    settings = keyed(broker.settings(), key)
    caplog.set_level(logging.DEBUG, logger="mesh")
    await apply_topics(settings.kafka, topics.all())
    log_path = tmp_path / "writer.log"
    log = log_path.open("wb")
    writer = AgentProcess(broker, "tests.apps.signing:writer", prefix=prefix, log=log,
                          env={"MESH_SECURITY__PLAN_KEY": key}).start()
    in_process = [app.coordinator, *(s for s in app.specialists if s.name != "writer")]
    try:
        async with Mesh(settings, in_process) as mesh:
            await mesh.wait_assigned()
            first, _ = request_records(codec, topics, [Job(workflow_id="first")])
            await inject(settings, first)
            assert (await outcomes_of(settings, codec, topics, {"first"}))["first"].success
            real = {t.step_id: t for topic in topics.tasks.values()
                    for t, _ in await decoded(settings, codec, topic)}
            forged = forgeries(real, signer_of_another_key=PlanSigner(SecretStr(
                secrets.token_urlsafe(32))))
            # keyed like the next workflow's write task: on its partition, ahead of it
            await inject(settings, [forged_record(codec, topics.tasks["writer"], task,
                                                  key=b"second/write")
                                    for task in forged.values()])
            second, _ = request_records(codec, topics, [Job(workflow_id="second")])
            await inject(settings, second)
            outcome = (await outcomes_of(settings, codec, topics, {"second"}))["second"]
            dead = await wait_for_count(settings, [topics.tasks["writer"].dlq_name],
                                        len(forged))
        assert outcome.success, outcome.error
        assert writer.alive()
    finally:
        code = writer.terminate()
        log.close()
    assert code == 0, log_path.read_text()

    # every forged task is in the dead-letter topic, refused for the reason it deserves
    by_event = {event_id(r): r for r in dead}
    assert len(by_event) == len(forged)
    injected = [r for t, r in await decoded(settings, codec, topics.tasks["writer"])
                if dict(r.headers)["mesh-source"] == b"forger"]
    reasons = {}
    for record in injected:
        letter = dict(by_event[event_id(record)].headers)
        assert letter[DLQ_ERROR_CLASS] == b"SignatureInvalid"
        assert letter[DLQ_AGENT] == b"writer"
        task = await codec.decode(topics.tasks["writer"], record.value or b"")
        assert isinstance(task, StepTask)
        reasons[task.dispatch_id] = letter[DLQ_ERROR].decode()
    assert set(reasons) == {t.dispatch_id for t in forged.values()}
    expected = {"unsigned": NOT_SIGNED, "other-key": NO_MATCH, "replayed": NO_MATCH,
                "altered": NO_MATCH, "misrouted": MISROUTED}
    for name, fragment in expected.items():
        message = reasons[forged[name].dispatch_id]
        assert fragment in message, (name, message)
        if fragment != MISROUTED:
            assert "MESH_SECURITY__PLAN_KEY" in message

    # the writer ran only the coordinator's signed tasks: one result per real dispatch
    results = [r for r, _ in await decoded(settings, codec, topics.results)]
    assert all(isinstance(r, StepResult) and r.ok for r in results)
    dispatched = [t.dispatch_id for topic in topics.tasks.values()
                  for t, r in await decoded(settings, codec, topic)
                  if dict(r.headers)["mesh-source"] != b"forger"]
    assert len(dispatched) == 10  # 5 steps (plan v2) of each workflow
    assert sorted(r.dispatch_id for r in results) == sorted(dispatched)
    assert {r.dispatch_id for r in results if r.specialist == "writer"} == {
        "first/write/v2", "second/write/v2"}
    for task, record in await decoded(settings, codec, topics.tasks["writer"]):
        if dict(record.headers)["mesh-source"] != b"forger":
            signer.verify_task(task, specialist="writer")
    plans = [p for p, _ in await decoded(settings, codec, topics.plans)]
    assert sorted((p.workflow_id, p.version) for p in plans) == [
        ("first", 1), ("first", 2), ("second", 1), ("second", 2)]
    for plan in plans:
        assert isinstance(plan, Plan)
        signer.verify_plan(plan)

    # the key is nowhere: not in a record, a log line, or the writer's output
    everything = await read_all(settings, [t.name for t in topics.all()]
                                + [topics.tasks["writer"].dlq_name])
    assert everything and not [r.topic for r in everything if key.encode() in raw(r)]
    output = log_path.read_text()
    assert "SignatureInvalid" in output and "runs UNSIGNED" not in output
    assert key not in output
    assert "runs UNSIGNED" not in caplog.text and caplog.text  # keyed, and logs captured
    assert key not in caplog.text


def forgeries(real: dict[str, StepTask], *, signer_of_another_key: PlanSigner
              ) -> dict[str, StepTask]:
    """Tasks a producer without the key could write to the writer's task topic, each
    with a dispatch id of its own; ``real`` are the first workflow's tasks by step."""
    write, research = real["write"], real["research-a"]
    second = dict(task_id="second/write", workflow_id="second", step_id="write",
                  specialist="writer", plan_version=2, input={"subject": "forged"})
    return {
        "unsigned": StepTask(dispatch_id="forged/unsigned", **second),
        "other-key": signer_of_another_key.sign_task(
            StepTask(dispatch_id="forged/other-key", **second)),
        "replayed": StepTask(dispatch_id="forged/replayed", signature=write.signature,
                             **{**second, "input": write.input}),
        "altered": write.model_copy(update={"dispatch_id": "forged/altered",
                                            "input": {"subject": "forged"}}),
        "misrouted": research,  # signed, unaltered, but the researcher's
    }
