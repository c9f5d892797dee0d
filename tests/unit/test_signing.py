"""Plan signing: HMAC over the canonical form of tasks and plans, checked by specialists;
the coordinator's and specialist's use of it, and the key kept out of every message."""

from __future__ import annotations

import datetime as dt
import hashlib
import hmac
import logging
from types import SimpleNamespace
from typing import Any

import pytest
from pydantic import SecretStr

from mesh import Codec, Envelope
from mesh.agent import Context
from mesh.config import KafkaSettings, MeshSettings, SecuritySettings
from mesh.errors import ConfigError, SignatureInvalid
from mesh.patterns.delegation.coordinator import Specialist
from mesh.patterns.delegation.plan import Plan, PlanStep, StepTask
from mesh.patterns.delegation.signing import (
    PLAN_TAG,
    TASK_TAG,
    PlanKey,
    PlanSigner,
    canonical,
)
from mesh.state import CompactedTable
from tests.apps.delegation import Job, build

KEY = "unit-plan-key-0123456789abcdef-0123456789"
signer = PlanSigner(SecretStr(KEY))


def task(**changes: Any) -> StepTask:
    fields: dict[str, Any] = dict(
        task_id="w1/write", workflow_id="w1", step_id="write", dispatch_id="w1/write/v2",
        specialist="writer", plan_version=2, input={"subject": "kafka", "words": 300},
        context={"analyse": {"claims": ["a", "b"]}})
    return StepTask(**{**fields, **changes})


def rejection(candidate: StepTask, *, by: PlanSigner = signer,
              specialist: str = "writer") -> str:
    with pytest.raises(SignatureInvalid) as caught:
        by.verify_task(candidate, specialist=specialist)
    assert not caught.value.retriable
    return str(caught.value)


def test_a_signed_task_verifies_and_its_signature_is_hmac_sha256_of_the_canonical_form(
        ) -> None:
    signed = signer.sign_task(task())
    signer.verify_task(signed, specialist="writer")
    expected = hmac.new(KEY.encode(), canonical(TASK_TAG, task()), hashlib.sha256).hexdigest()
    assert signed.signature == f"hmac-sha256:{expected}"


def test_the_canonical_form_is_sorted_compact_json_of_every_field_but_the_signature() -> None:
    assert canonical(TASK_TAG, task(signature="anything")) == (
        b'["mesh.step-task/v1",{"context":{"analyse":{"claims":["a","b"]}},'
        b'"dispatch_id":"w1/write/v2","input":{"subject":"kafka","words":300},'
        b'"plan_version":2,"specialist":"writer","step_id":"write","task_id":"w1/write",'
        b'"workflow_id":"w1"}]')
    reordered = task(input={"words": 300, "subject": "kafka"})  # insertion order differs
    assert canonical(TASK_TAG, reordered) == canonical(TASK_TAG, task())
    assert signer.sign_task(reordered).signature == signer.sign_task(task()).signature


@pytest.mark.parametrize("change", [
    {"input": {"subject": "kafka", "words": 301}},
    {"context": {"analyse": {"claims": ["a", "forged"]}}},
    {"step_id": "publish"},
    {"dispatch_id": "w1/write/v3"},
    {"plan_version": 3},
    {"task_id": "w1/other"},
])
def test_a_signed_task_altered_in_any_field_is_refused(change: dict[str, Any]) -> None:
    altered = signer.sign_task(task()).model_copy(update=change)
    message = rejection(altered)
    assert message.startswith("Task ")
    assert "has a signature that does not match its content" in message
    assert "set MESH_SECURITY__PLAN_KEY to the same value on the coordinator" in message


def test_a_signature_moved_onto_another_workflow_is_refused() -> None:
    legit = signer.sign_task(task())
    replayed = task(workflow_id="victim", task_id="victim/write",
                    dispatch_id="victim/write/v2", signature=legit.signature)
    assert "does not match its content" in rejection(replayed)


def test_a_task_signed_with_another_key_is_refused() -> None:
    forged = PlanSigner(SecretStr("an attacker's guess at the key, long enough")).sign_task(
        task())
    assert "does not match its content" in rejection(forged)


def test_an_unsigned_task_is_refused_naming_the_setting_that_fixes_it() -> None:
    assert rejection(task()) == (
        "Task 'w1/write' (dispatch 'w1/write/v2') is not signed, but specialist 'writer' "
        "runs only signed tasks (MESH_SECURITY__PLAN_KEY is set): it was not dispatched by "
        "a coordinator holding the plan key, so its work is not done. If your coordinator "
        "dispatched it, set MESH_SECURITY__PLAN_KEY on the coordinator to the specialists' "
        "key.")


def test_garbage_signatures_are_refused_not_crashed_on() -> None:
    for garbage in ("hmac-sha256:zz", "sha1:abc", "\u00e9\u00e9", "x" * 500):
        assert "does not match" in rejection(task(signature=garbage))


def test_a_signed_task_for_another_specialist_is_refused_on_this_one() -> None:
    researcher_task = signer.sign_task(task(specialist="researcher"))
    signer.verify_task(researcher_task, specialist="researcher")
    assert "is signed for specialist 'researcher' but reached specialist 'writer'" in (
        rejection(researcher_task, specialist="writer"))


async def test_a_task_signs_the_same_after_a_trip_through_avro() -> None:
    """Free-form values (datetimes, tuples, unicode, floats) travel as JSON strings: the
    specialist recomputes the same canonical form from what it decodes."""
    topics = build("unit").topics
    awkward = task(input={"when": dt.datetime(2024, 5, 1, 12, 30), "pair": (1, 2.5),
                          "text": "na\u00efve \u2603", "ratio": 0.1, "none": None,
                          "nested": {"b": [1, {"z": 1, "a": 2}], "a": True}})
    signed = signer.sign_task(awkward)
    codec = Codec()
    value, _ = codec.encode(topics.tasks["writer"], signed)
    received = await codec.decode(topics.tasks["writer"], value)
    assert isinstance(received, StepTask) and received.input != awkward.input  # changed form
    signer.verify_task(received, specialist="writer")


def test_plans_are_signed_and_checked_and_a_plan_signature_is_no_task_signature() -> None:
    plan = Plan(steps=[PlanStep(id="a", specialist="writer", input={"x": 1})],
                workflow_id="w1", version=2, reason="revised", author="reviewer")
    signed = signer.sign_plan(plan)
    signer.verify_plan(signed)
    for change in ({"version": 3}, {"workflow_id": "w2"}, {"steps": [
            PlanStep(id="a", specialist="writer", input={"x": 2})]}):
        with pytest.raises(SignatureInvalid, match="does not match its content"):
            signer.verify_plan(signed.model_copy(update=change))
    with pytest.raises(SignatureInvalid, match="Plan v2 of workflow 'w1' is not signed"):
        signer.verify_plan(plan)
    assert signer.sign(TASK_TAG, plan) != signer.sign(PLAN_TAG, plan)


def test_the_key_is_never_in_a_repr_an_error_or_the_expected_signature() -> None:
    key = PlanKey("writer", "specialist", key=SecretStr(KEY))
    assert KEY not in repr(signer) and KEY not in repr(key) and KEY not in str(signer)
    forged = task(signature="hmac-sha256:" + "0" * 64)
    message = rejection(forged)
    assert KEY not in message
    assert signer.sign_task(task()).signature.split(":")[1] not in message  # no oracle


def test_an_empty_key_is_a_config_error_not_a_silent_unsigned_mode() -> None:
    with pytest.raises(ConfigError, match="MESH_SECURITY__PLAN_KEY is set but empty"):
        PlanSigner(SecretStr("  "))


def test_the_key_comes_from_the_runners_settings_unless_given_and_unsigned_warns_once(
        caplog: pytest.LogCaptureFixture) -> None:
    settings = MeshSettings().model_copy(
        update={"security": SecuritySettings(plan_key=SecretStr(KEY))})
    caplog.set_level(logging.WARNING, logger="mesh.patterns.delegation.signing")
    from_settings = PlanKey("writer", "specialist", key=None).signer(settings)
    assert from_settings is not None
    from_settings.verify_task(signer.sign_task(task()), specialist="writer")
    explicit = PlanKey("writer", "specialist", key=SecretStr("x" * 40)).signer(settings)
    assert explicit is not None and explicit.sign_task(task()) != signer.sign_task(task())
    assert caplog.records == []  # long keys: nothing to warn about

    unsigned = PlanKey("writer", "specialist", key=None)
    assert unsigned.signer(None) is None and unsigned.signer(MeshSettings()) is None
    assert [r.getMessage() for r in caplog.records] == [
        "specialist writer runs UNSIGNED (MESH_SECURITY__PLAN_KEY is not set): it runs any "
        "task produced to its task topic, by anyone. Insecure: set MESH_SECURITY__PLAN_KEY "
        "to the coordinator's key."]
    caplog.clear()
    PlanKey("boss", "coordinator", key=SecretStr("tiny-key")).signer(None)
    assert "coordinator boss: the plan key is shorter than 32 characters" in caplog.text
    assert "tiny-key" not in caplog.text


# The coordinator and specialists with a key (no broker: contexts as the runtime makes them)

def keyed_context(agent: Any, payload: Any, *, topic: str, tables: dict[str, Any] | None = None,
                  key: str | None = KEY) -> Context:
    security = SecuritySettings(plan_key=SecretStr(key) if key else None)
    runner = SimpleNamespace(settings=MeshSettings().model_copy(update={"security": security}))
    event = Envelope(payload, "e1", "corr", topic=topic, partition=0, offset=1)
    return Context(agent, event, tables=tables, runner=runner)


async def test_a_keyed_coordinator_signs_every_task_and_plan_it_sends() -> None:
    app = build("unit")
    table = CompactedTable(app.topics.workflows, KafkaSettings(), Codec())
    ctx = keyed_context(app.coordinator, Job(workflow_id="w1"),
                        topic=app.topics.requests.name, tables={table.topic.name: table})
    await app.coordinator.handle(Job(workflow_id="w1"), ctx)
    sent = [e.payload for e in ctx.outputs]
    tasks = [p for p in sent if isinstance(p, StepTask)]
    plans = [p for p in sent if isinstance(p, Plan)]
    assert [t.step_id for t in tasks] == ["research-a", "research-b"] and len(plans) == 1
    for one in tasks:
        signer.verify_task(one, specialist="researcher")
    signer.verify_plan(plans[0])
    (_, _, state, _), = ctx.staged
    assert state.plan == plans[0]  # the state keeps the signed plan it published


async def test_a_keyed_specialist_never_runs_a_forged_task_and_answers_nothing_for_it(
        ) -> None:
    topics = build("unit").topics
    ran: list[str] = []

    async def work(one: StepTask, ctx: Context) -> dict[str, Any]:
        ran.append(one.task_id)
        return {"done": one.step_id}

    writer = Specialist("writer", topics=topics, handler=work)
    topic = topics.tasks["writer"].name
    forged = task(workflow_id="victim", task_id="victim/write")
    ctx = keyed_context(writer, forged, topic=topic)
    with pytest.raises(SignatureInvalid) as caught:
        await writer.handle(forged, ctx)
    await writer.on_failure(forged, ctx, caught.value)  # what the runtime does next
    assert ran == [] and ctx.outputs == []
    good = signer.sign_task(task())
    result = await writer.handle(good, keyed_context(writer, good, topic=topic))
    assert ran == ["w1/write"] and result.ok and result.dispatch_id == "w1/write/v2"
    # without a key the same specialist runs anything (unsigned mode)
    await writer.handle(forged, keyed_context(writer, forged, topic=topic, key=None))
    assert ran == ["w1/write", "victim/write"]


async def test_coordinator_and_specialist_check_their_key_when_started(
        caplog: pytest.LogCaptureFixture) -> None:
    """Pass: starting them (what the runner does before any input) warns about running
    unsigned at once, and an empty key fails the start instead of the first input."""
    caplog.set_level(logging.WARNING, logger="mesh.patterns.delegation.signing")
    app = build("start")

    async def work(task: StepTask, ctx: Context) -> dict[str, Any]:
        return {}

    writer = Specialist("writer", topics=app.topics, handler=work)
    await writer.on_start(MeshSettings())
    await app.coordinator.on_start(MeshSettings())
    assert [r.getMessage().split(" (")[0] for r in caplog.records] == [
        "specialist writer runs UNSIGNED", "coordinator start-coordinator runs UNSIGNED"]
    empty = MeshSettings(security=SecuritySettings(plan_key=SecretStr("")))
    with pytest.raises(ConfigError):
        await Specialist("writer", topics=app.topics, handler=work).on_start(empty)
