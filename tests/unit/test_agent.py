"""Unit tests for mesh.agent: declaration, output routing, Context.emit and App."""

from __future__ import annotations

import pytest
from pydantic import BaseModel

from mesh.agent import Agent, App, Context, agent
from mesh.envelope import Envelope
from mesh.errors import ConfigError
from mesh.kafka.base import Record
from mesh.policy import RetryPolicy
from mesh.runtime.process import Outputs
from mesh.runtime.retry import retry_record
from mesh.serde.codec import Codec
from mesh.topic import Topic


class Question(BaseModel):
    qid: str
    text: str


class Answer(BaseModel):
    qid: str
    text: str


class Note(BaseModel):
    text: str


questions = Topic("qa.questions", Question, key="qid")
answers = Topic("qa.answers", Answer, key="qid")
notes = Topic("qa.notes", Note)  # no key field
archive = Topic("qa.archive", Answer, key="qid")  # same model as answers


@agent(consumes=questions, produces=[answers, notes])
async def answerer(question: Question, ctx: Context) -> Answer:
    """Answers questions."""
    return Answer(qid=question.qid, text=question.text.upper())


def _ctx(owner: Agent[Question] = answerer, key: bytes | None = b"input-key") -> Context:
    event = Envelope.new(Question(qid="q1", text="hi"), source="test", key=key)
    return Context(owner, event)


async def test_decorator_builds_an_agent_named_after_the_handler() -> None:
    assert (answerer.name, answerer.group) == ("answerer", "answerer")
    assert answerer.consumes == (questions,) and answerer.produces == (answers, notes)
    assert answerer.description == "Answers questions."
    assert await answerer.handle(Question(qid="q1", text="hi"), _ctx()) == Answer(
        qid="q1", text="HI")


def test_decorator_takes_an_explicit_name_and_group() -> None:
    built = agent(consumes=questions, name="bot", group="bots")(answerer.handle)

    assert (built.name, built.group) == ("bot", "bots")


def test_outputs_of_routes_each_payload_to_the_topic_of_its_model() -> None:
    routed = answerer.outputs_of([Answer(qid="q1", text="a"), Note(text="n")])

    assert routed == [(answers, Answer(qid="q1", text="a")), (notes, Note(text="n"))]
    assert answerer.outputs_of(None) == []
    assert answerer.outputs_of(Note(text="n")) == [(notes, Note(text="n"))]


def test_outputs_of_a_model_no_produced_topic_carries_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="returned a Question, but no produced topic"):
        answerer.outputs_of(Question(qid="q1", text="hi"))


def test_outputs_of_a_model_several_produced_topics_carry_raises_config_error() -> None:
    both = Agent("both", consumes=questions, produces=[answers, archive])

    with pytest.raises(ConfigError, match="several produced topics carry it; use ctx.emit"):
        both.outputs_of(Answer(qid="q1", text="a"))


def test_emit_to_an_undeclared_topic_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="'qa.archive', which it does not declare"):
        _ctx().emit(archive, Answer(qid="q1", text="a"))


def test_emit_of_the_wrong_payload_type_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="carries Answer, but Note was emitted"):
        _ctx().emit(answers, Note(text="n"))  # type: ignore[arg-type]


def test_emit_key_defaults_to_the_topic_key_field_else_the_input_key() -> None:
    ctx = _ctx()

    ctx.emit(answers, Answer(qid="q7", text="a"))
    ctx.emit(notes, Note(text="n"))
    ctx.emit(answers, Answer(qid="q7", text="a"), key="explicit")

    assert [o.key for o in ctx.outputs] == [b"q7", b"input-key", b"explicit"]


def test_app_rejects_two_agents_with_one_name() -> None:
    app = App("qa", agents=[answerer])

    with pytest.raises(ConfigError, match="already has an agent named 'answerer'"):
        app.add(Agent("answerer", consumes=notes))


def test_app_topics_collects_consumed_produced_and_extra_topics() -> None:
    extra = Topic("qa.audit", Note)
    app = App("qa", agents=[answerer], topics=[extra])

    @app.agent(consumes=answers, produces=archive)
    async def archiver(answer: Answer, ctx: Context) -> Answer:
        return answer

    assert [a.name for a in app.agents] == ["answerer", "archiver"]
    declared = {"qa.audit": extra, "qa.questions": questions, "qa.answers": answers,
                "qa.notes": notes, "qa.archive": archive}
    assert {n: t for n, t in app.topics.items() if n in declared} == declared
    # and the retry tiers of every consumed topic (the default policy: 3 attempts)
    assert sorted(set(app.topics) - set(declared)) == [
        "qa.answers.retry.1", "qa.answers.retry.2",
        "qa.questions.retry.1", "qa.questions.retry.2"]


def test_default_retry_policy_retries_through_tiers_with_the_origins_partitions() -> None:
    wide = Topic("qa.wide", Question, key="qid", partitions=6)
    default = Agent("d", consumes=wide, handler=answerer.handle)
    assert default.retry == RetryPolicy() and not default.retry.blocking
    assert [(t.name, t.partitions, t.key, t.model) for t in default.retry_topics] == [
        ("qa.wide.retry.1", 6, "qid", Question), ("qa.wide.retry.2", 6, "qid", Question)]
    assert all(not t.dead_letters for t in default.retry_topics)
    ordered = Agent("o", consumes=wide, handler=answerer.handle,
                    retry=RetryPolicy(blocking=True))
    assert ordered.retry_topics == ()
    assert Agent("n", consumes=wide, handler=answerer.handle,
                 retry=RetryPolicy(attempts=1)).retry_topics == ()


def test_retry_record_keeps_the_input_partition_and_schedules_the_next_tier() -> None:
    record = Record("qa.wide", 5, 42, b"k", b"v", (("mesh-attempt", b"1"),), 0)
    out = retry_record(record, TimeoutError("slow"), policy=RetryPolicy(base_ms=1000),
                       attempt=1, group="g")
    assert (out.topic, out.partition, out.key, out.value) == ("qa.wide.retry.1", 5, b"k", b"v")
    headers = dict(out.headers)
    assert headers["mesh-attempt"] == b"2" and headers["mesh-retry-group"] == b"g"
    assert headers["mesh-retry-origin"] == b"qa.wide[5]@42"
    again = retry_record(Record(out.topic, 5, 7, b"k", b"v", out.headers, 0),
                         TimeoutError("slow"), policy=RetryPolicy(base_ms=1000),
                         attempt=2, group="g")
    assert (again.topic, again.partition) == ("qa.wide.retry.2", 5)
    assert dict(again.headers)["mesh-retry-origin"] == b"qa.wide[5]@42"


def test_agent_consuming_nothing_raises_config_error() -> None:
    with pytest.raises(ConfigError, match="consumes nothing"):
        Agent("idle", consumes=[])


def test_emit_can_name_another_cause_trace_and_correlation_than_the_input() -> None:
    """A timer answering for a request it kept emits with the request's ids."""
    from mesh.envelope import child_traceparent, new_traceparent
    from mesh.runtime.process import Outputs
    from mesh.serde.codec import Codec

    ctx = _ctx()
    kept = new_traceparent()
    ctx.emit(answers, Answer(qid="q1", text="late"), correlation_id="wf-9",
             traceparent=kept, causation_id="request-1")
    ctx.emit(answers, Answer(qid="q2", text="now"))
    [(late, _), (now, _)] = Outputs(Codec(), 1 << 20).emitted(answerer, ctx.event, ctx)
    assert (late.correlation_id, late.causation_id) == ("wf-9", "request-1")
    assert late.traceparent == child_traceparent(kept, late.event_id)
    assert (now.correlation_id, now.causation_id) == (ctx.event.correlation_id,
                                                      ctx.event.event_id)


def test_decorator_takes_every_option_agent_takes() -> None:
    """The README's `@agent(..., retry=..., state=[...])` must not raise TypeError."""
    import inspect

    options = set(inspect.signature(Agent.__init__).parameters) - {"self", "handler"}
    assert options <= set(inspect.signature(agent).parameters)
    counts = Topic("qa.counts", Note, key="text", compacted=True)
    policy = RetryPolicy(attempts=5, blocking=True)

    @agent(consumes=questions, produces=answers, retry=policy, state=[counts],
           description="counts", propagate_headers=["tenant"])
    async def counter(question: Question, ctx: Context) -> None:
        """Docstring loses to the explicit description."""

    assert (counter.retry, counter.state, counter.description) == (policy, (counts,), "counts")
    assert counter.propagate_headers == frozenset({"tenant"})


def test_carried_headers_kept_and_emitted_later_continue_that_trace_with_them() -> None:
    """Pass: an input with a tracestate and two foreign headers, to an agent that
    propagates only ``tenant``: ``ctx.carried`` is its tracestate and tenant. Emitted
    later from another event (a timer's, with no headers) with the kept traceparent and
    carried headers, the output is in the kept trace with that tracestate and tenant;
    ``headers=`` still sets one over them; without ``carried`` a timer's output has none."""
    kept_trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    tenanted = Agent("tenanted", consumes=questions, produces=[answers], handler=answerer,
                     propagate_headers=["tenant"])
    event = Envelope(Question(qid="q1", text="hi"), "e1", "c1", traceparent=kept_trace,
                     tracestate="vendor=1", extra_headers=(("tenant", b"acme"),
                                                           ("debug", b"yes")))
    kept = Context(tenanted, event).carried
    assert kept == {"tracestate": b"vendor=1", "tenant": b"acme"}

    tick = Envelope(None, "tick-1", "tick-1", source="tenanted")
    ctx = Context(tenanted, tick)
    ctx.emit(answers, Answer(qid="q1", text="a"), traceparent=kept_trace, carried=kept)
    ctx.emit(answers, Answer(qid="q1", text="b"), traceparent=kept_trace, carried=kept,
             headers={"tenant": "other"})
    ctx.emit(answers, Answer(qid="q1", text="c"), traceparent=kept_trace)
    out = [child for child, _ in Outputs(Codec(), 1 << 20).emitted(tenanted, tick, ctx)]
    assert [o.traceparent.split("-")[1] for o in out] == [kept_trace.split("-")[1]] * 3
    assert [o.tracestate for o in out] == ["vendor=1", "vendor=1", None]
    assert [dict(o.extra_headers) for o in out] == [
        {"tenant": b"acme"}, {"tenant": b"other"}, {}]
