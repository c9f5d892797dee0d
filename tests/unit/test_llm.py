"""LLM agents through the real runtime (InMemoryMesh), with pydantic-ai models that
never leave the process (FunctionModel, TestModel; real model requests are refused)."""

from __future__ import annotations

import doctest
import json
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_ai.exceptions import (
    ConcurrencyLimitExceeded,
    ModelAuthenticationError,
    ModelConnectionError,
    ModelHTTPError,
    ModelQuotaExceededError,
    ModelRateLimitError,
    ModelRequestTimeout,
    RunTimedOut,
    UnexpectedModelBehavior,
    UsageLimitExceeded,
)
from pydantic_ai.messages import ModelMessage, ModelResponse, ToolCallPart, UserPromptPart
from pydantic_ai.models import override_allow_model_requests
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.test import TestModel
from pydantic_ai.usage import RequestUsage, UsageLimits

from mesh import ConfigError, Context, MeshSettings, Topic, derive_event_id
from mesh.envelope import Envelope
from mesh.errors import BreakerOpen
from mesh.llm import LLMAgent, LLMError, LLMMetrics, classify, llm_agent
from mesh.resilience.breaker import BreakerPolicy, BreakerRegistry, CircuitBreaker, breaker_topics
from mesh.runtime.retry import RETRY_ERROR
from mesh.testing import InMemoryMesh


class Question(BaseModel):
    qid: str
    text: str


class Answer(BaseModel):
    qid: str
    text: str


class Refusal(BaseModel):
    qid: str
    reason: str


class Draft(BaseModel):
    text: str


questions = Topic("llmu.questions", Question, key="qid", partitions=2)
answers = Topic("llmu.answers", Answer, key="qid", partitions=2)
refusals = Topic("llmu.refusals", Refusal, key="qid", partitions=2)
SECRET = "sk-test-NEVER-IN-EVENTS"
ModelFn = Callable[[list[ModelMessage], AgentInfo], ModelResponse]


@pytest.fixture(autouse=True)
def no_real_model_requests() -> Iterator[None]:
    with override_allow_model_requests(False):
        yield


def prompt_of(messages: list[ModelMessage]) -> str:
    for message in messages:
        for part in getattr(message, "parts", ()):
            if isinstance(part, UserPromptPart) and isinstance(part.content, str):
                return part.content
    raise AssertionError("no user prompt")


def call(info: AgentInfo, tool: str | None = None, **args: Any) -> ModelResponse:
    """A response calling output tool ``tool`` (default: the only one) with ``args``,
    reporting 100 input and 20 output tokens."""
    name = tool or info.output_tools[0].name
    return ModelResponse(parts=[ToolCallPart(name, json.dumps(args))],
                         usage=RequestUsage(input_tokens=100, output_tokens=20))


def answering(calls: list[str] | None = None) -> ModelFn:
    """A model answering the question in the prompt with its text in capitals."""

    def answer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        prompt = prompt_of(messages)
        if calls is not None:
            calls.append(prompt)
        question = Question.model_validate_json(prompt.split("\n", 1)[1])
        return call(info, qid=question.qid, text=question.text.upper())

    return answer


def failing_first(error: Exception, calls: list[str]) -> ModelFn:
    """Raises ``error`` on the first call, then answers."""
    answer = answering()

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls.append(prompt_of(messages))
        if len(calls) == 1:
            raise error
        return answer(messages, info)

    return model


def build(model: Any, **kwargs: Any) -> LLMAgent:
    kwargs.setdefault("produces", answers)
    return llm_agent("answerer", consumes=questions, model=model,
                     instructions="Answer briefly.", **kwargs)


def stats_of(agent: LLMAgent) -> tuple[int, int, int, int, int]:
    s = agent.stats
    return s.runs, s.failures, s.requests, s.input_tokens, s.output_tokens


def all_bytes(mesh: InMemoryMesh, *topics: str) -> bytes:
    """Every key, value and header of ``topics``, concatenated."""
    return b"".join((r.key or b"") + (r.value or b"") + b"".join(v for _, v in r.headers)
                    for name in topics for r in mesh.records(name))


async def test_typed_output_reaches_the_produced_topic_with_derived_ids() -> None:
    """Pass: the model gets the instructions and the default prompt (the payload as JSON
    under its model's name); its validated Answer is on the answers topic with the id
    derived from (agent, input event id, 0), the input's correlation id as correlation,
    the input's event id as causation and the qid as key; one run of one request and
    its tokens are counted."""
    prompts: list[str] = []
    seen: list[str | None] = []
    answer = answering(prompts)

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        seen.append(info.instructions)
        return answer(messages, info)

    agent = build(FunctionModel(model))
    async with InMemoryMesh(agent) as mesh:
        sent = await mesh.emit(questions, Question(qid="q1", text="why kafka?"))
        await mesh.drain()
        [event] = mesh.events(answers)
    assert event.payload == Answer(qid="q1", text="WHY KAFKA?")
    assert event.event_id == derive_event_id("answerer", sent.event_id, 0)
    assert (event.correlation_id, event.causation_id) == (sent.correlation_id, sent.event_id)
    assert event.key == b"q1"
    assert prompts == ['Question (JSON):\n{"qid":"q1","text":"why kafka?"}']
    assert seen == ["Answer briefly."]
    assert stats_of(agent) == (1, 0, 1, 100, 20)


async def test_reply_builds_the_produced_payload_from_an_output_of_another_model() -> None:
    """Pass: with output=Draft (what the model writes) and reply= (copying the input's
    qid), TestModel's Draft becomes an Answer on the answers topic; an async prompt
    function's text is what the model got."""
    model = TestModel(custom_output_args={"text": "it streams"})

    async def ask(question: Question, ctx: Context) -> str:
        return f"Answer {question.text} (attempt {ctx.attempt})"

    def reply(question: Question, draft: Draft, ctx: Context) -> Answer:
        return Answer(qid=question.qid, text=draft.text)

    agent = build(model, output=Draft, reply=reply, prompt=ask)
    async with InMemoryMesh(agent) as mesh:
        await mesh.emit(questions, Question(qid="q7", text="what is kafka?"))
        await mesh.drain()
        assert mesh.payloads(answers) == [Answer(qid="q7", text="it streams")]
    assert model.last_model_request_parameters is not None
    assert [t.name for t in model.last_model_request_parameters.output_tools] == [
        "final_result"]


async def test_with_two_produced_topics_the_model_chooses_and_the_output_is_routed() -> None:
    """Pass: producing answers and refusals, the model is offered an output tool per
    model; its Refusal goes to the refusals topic and nothing to answers."""
    offered: list[list[str]] = []

    def refuse(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        names = [t.name for t in info.output_tools]
        offered.append(names)
        [tool] = [n for n in names if "Refusal" in n]
        return call(info, tool, qid="q2", reason="off topic")

    agent = build(FunctionModel(refuse), produces=[answers, refusals])
    async with InMemoryMesh(agent) as mesh:
        await mesh.emit(questions, Question(qid="q2", text="lottery numbers?"))
        await mesh.drain()
        assert mesh.payloads(refusals) == [Refusal(qid="q2", reason="off topic")]
        assert mesh.payloads(answers) == []
    assert len(offered) == 1 and len(offered[0]) == 2


@pytest.mark.parametrize("error", [
    ModelHTTPError(429, "m", body={"error": "slow down", "echo": SECRET}),
    ModelHTTPError(503, "m", body={"error": "down", "echo": SECRET}),
    ModelHTTPError.for_category(ModelRateLimitError, status_code=429, model_name="m",
                                body={"echo": SECRET}),
    ModelConnectionError("m", f"connection reset while sending {SECRET}", phase="write"),
], ids=["429", "503", "rate-limit-category", "connection"])
async def test_a_transient_model_error_goes_to_the_retry_topic_and_the_next_attempt_answers(
        error: Exception) -> None:
    """Pass: the first call fails with a retriable error: the input goes to
    <topic>.retry.1 with an error naming the agent, the model and the cause; the next
    attempt answers; nothing is dead-lettered; both runs are counted (one failed; the
    request that failed got no response, so pydantic-ai counts one request); no
    record anywhere (retry, answers, audit) holds the provider's response body."""
    calls: list[str] = []
    agent = build(FunctionModel(failing_first(error, calls), model_name="flaky-model"))
    async with InMemoryMesh(agent, fast_retries=True) as mesh:
        await mesh.emit(questions, Question(qid="q3", text="still there?"))
        await mesh.drain()
        [retried] = mesh.records(f"{questions.name}.retry.1")
        message = dict(retried.headers)[RETRY_ERROR].decode()
        assert mesh.payloads(answers) == [Answer(qid="q3", text="STILL THERE?")]
        assert mesh.dead_letters(questions) == []
        everything = all_bytes(mesh, f"{questions.name}.retry.1", answers.name, "mesh.audit")
    assert "'answerer'" in message and "function:flaky-model" in message
    assert "Retriable" in message
    assert len(calls) == 2
    assert SECRET.encode() not in everything
    assert stats_of(agent) == (2, 1, 1, 100, 20)


async def test_output_that_stays_invalid_is_dead_lettered_with_a_clear_error() -> None:
    """Pass: a model that keeps returning an Answer without text and a numeric qid
    exhausts pydantic-ai's output retry (2 calls) and the input goes to the dead-letter
    topic at once (attempt 1, no retry record) with an LLMError naming the agent, the
    model, 'output invalid' and the failing fields, but not the prompt or the model's
    values; the tokens of both requests are counted."""
    calls: list[str] = []

    def invalid(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls.append(prompt_of(messages))
        return call(info, qid=987654)

    agent = build(FunctionModel(invalid, model_name="sloppy"))
    async with InMemoryMesh(agent, fast_retries=True) as mesh:
        await mesh.emit(questions, Question(qid="q4", text="secret question"))
        await mesh.drain()
        [letter] = mesh.dead_letters(questions)
        assert mesh.records(f"{questions.name}.retry.1") == []
        assert mesh.payloads(answers) == []
    assert letter.error_class == "LLMError" and letter.attempts == 1
    assert letter.agent == "answerer"
    assert "'answerer'" in letter.error and "function:sloppy" in letter.error
    assert "output invalid" in letter.error
    assert "qid: string_type" in letter.error and "text: missing" in letter.error
    assert "Not retriable" in letter.error
    assert "secret question" not in letter.error and "987654" not in letter.error
    assert len(calls) == 2
    assert stats_of(agent) == (1, 1, 2, 200, 40)


@pytest.mark.parametrize(("error", "words"), [
    (ModelHTTPError(400, "m", body={"error": f"bad request: {SECRET}"}), "HTTP 400"),
    (ModelHTTPError.for_category(ModelAuthenticationError, status_code=401, model_name="m",
                                 body={"error": f"Incorrect API key {SECRET}"}),
     "credentials refused (HTTP 401)"),
    (ModelHTTPError.for_category(ModelQuotaExceededError, status_code=429, model_name="m",
                                 body={"error": "insufficient_quota"}),
     "quota or billing exhausted (HTTP 429)"),
], ids=["400", "401", "quota-429"])
async def test_a_rejected_request_is_dead_lettered_at_once(error: Exception,
                                                            words: str) -> None:
    """Pass: a 400, a 401 and an exhausted quota (a 429 that waiting does not fix) go
    to the dead-letter topic after one call, with no retry record, an error naming
    the cause and 'Not retriable', and never the body."""
    calls: list[str] = []
    agent = build(FunctionModel(failing_first(error, calls)))
    async with InMemoryMesh(agent, fast_retries=True) as mesh:
        await mesh.emit(questions, Question(qid="q5", text="hello"))
        await mesh.drain()
        [letter] = mesh.dead_letters(questions)
        assert mesh.records(f"{questions.name}.retry.1") == []
        everything = all_bytes(mesh, questions.dlq_name, "mesh.audit")
    assert len(calls) == 1 and letter.attempts == 1
    assert words in letter.error and "Not retriable" in letter.error
    assert SECRET.encode() not in everything


async def test_an_llm_error_keeps_pydantic_ais_error_out_of_its_traceback() -> None:
    """Pass: the LLMError a handler raises carries pydantic-ai's ModelHTTPError as
    ``original`` (status 401), but its formatted traceback (what a log line or a trace
    span's exception event would show) never holds the response body."""
    error = ModelHTTPError.for_category(ModelAuthenticationError, status_code=401,
                                        model_name="m", body={"error": f"bad key {SECRET}"})
    agent = build(FunctionModel(failing_first(error, [])))
    await agent.on_start(MeshSettings())  # what a runner does first: resolves the model
    event = Envelope.new(Question(qid="q8", text="hi"), source="test")
    with pytest.raises(LLMError) as raised:
        await agent.handle(event.payload, Context(agent, event))
    assert raised.value.original is error and raised.value.status == 401
    assert raised.value.cause == "credentials refused" and not raised.value.retriable
    assert SECRET not in "".join(traceback.format_exception(raised.value))


async def test_a_usage_limit_is_dead_lettered_and_its_tokens_counted() -> None:
    """Pass: with usage_limits allowing 5 output tokens, a response of 20 exceeds it:
    a dead letter saying 'usage limit exceeded', not retried; the tokens are counted."""
    agent = build(FunctionModel(answering()), usage_limits=UsageLimits(output_tokens_limit=5))
    async with InMemoryMesh(agent, fast_retries=True) as mesh:
        await mesh.emit(questions, Question(qid="q6", text="long answer please"))
        await mesh.drain()
        [letter] = mesh.dead_letters(questions)
    assert "usage limit exceeded" in letter.error and "output_tokens_limit" in letter.error
    assert "Consider raising" not in letter.error  # pydantic-ai's docs hint is dropped
    assert stats_of(agent) == (1, 1, 1, 100, 20)


async def test_repeated_503s_open_the_breaker_and_the_input_is_held_until_it_recovers() -> None:
    """Pass: with a breaker (3 failures) on a model answering 503, the third failing
    call opens it and its input is held (InMemoryMesh reports the hold, a BreakerOpen),
    nothing is dead-lettered and no further call reaches the model; once the model is
    back and the reset timeout has passed, the held input and the other one are
    answered through a probe that closes the breaker."""
    now = [time.time()]  # the breaker's clock; the runtime holds until its real time
    breaker = CircuitBreaker("llm-api", BreakerPolicy(failure_threshold=3, reset_timeout=30),
                             clock=lambda: now[0])
    down, calls = [True], [0]
    answer = answering()

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls[0] += 1
        if down[0]:
            raise ModelHTTPError(503, "m", body="overloaded")
        return answer(messages, info)

    agent = build(FunctionModel(model), breaker=breaker)
    async with InMemoryMesh(agent, fast_retries=True) as mesh:
        for qid in ("a1", "a2"):
            await mesh.emit(questions, Question(qid=qid, text=f"ask {qid}"))
        await mesh.drain()
        assert isinstance(mesh.held.get("answerer"), BreakerOpen)
        assert breaker.state == "open" and calls[0] == 3
        assert mesh.dead_letters(questions) == [] and mesh.payloads(answers) == []
        await mesh.drain()  # still held: nothing is handed over
        assert calls[0] == 3
        down[0], now[0] = False, now[0] + 31
        mesh.release_holds()
        await mesh.drain()
        assert sorted(a.qid for a in mesh.payloads(answers)) == ["a1", "a2"]
        assert mesh.dead_letters(questions) == [] and mesh.held == {}
    assert breaker.state == "closed" and breaker.transitions["closed"] == 1


async def test_a_rejected_request_does_not_count_for_the_breaker() -> None:
    """Pass: five 400s in a row (the provider answered) leave a threshold-2 breaker
    closed; each input is dead-lettered."""
    breaker = CircuitBreaker("llm-400", BreakerPolicy(failure_threshold=2))

    def reject(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        raise ModelHTTPError(400, "m", body="bad")

    agent = build(FunctionModel(reject), breaker=breaker)
    async with InMemoryMesh(agent) as mesh:
        for n in range(5):
            await mesh.emit(questions, Question(qid=f"r{n}", text="x"))
        await mesh.drain()
        assert len(mesh.dead_letters(questions)) == 5 and mesh.held == {}
    assert breaker.state == "closed"


@pytest.mark.parametrize(("error", "retriable", "words"), [
    (ModelHTTPError(429, "m"), True, "HTTP 429"),
    (ModelHTTPError(408, "m"), True, "HTTP 408"),
    (ModelHTTPError(500, "m"), True, "HTTP 500"),
    (ModelHTTPError(404, "m"), False, "HTTP 404"),
    (ModelHTTPError(422, "m"), False, "HTTP 422"),
    (ModelRequestTimeout("m", 30.0), True, "request timed out"),
    (RunTimedOut("run took too long"), True, "run timed out"),
    (ConcurrencyLimitExceeded("queue full"), True, "too many concurrent runs"),
    (UnexpectedModelBehavior("Exceeded maximum output retries (1)"), False, "output invalid"),
    (UsageLimitExceeded("Exceeded the request_limit of 1"), False, "usage limit exceeded"),
])
def test_classify_says_which_model_errors_are_worth_another_attempt(
        error: Exception, retriable: bool, words: str) -> None:
    found, cause, fix = classify(error)
    assert (found, words in cause) == (retriable, True)
    assert retriable or fix  # a final error says what to fix


def test_declarations_that_cannot_route_or_guard_are_refused() -> None:
    """Pass: an output no produced topic carries (without reply=), a breaker name
    without a registry, a policy without a breaker name and no produced topic are
    ConfigErrors naming the agent and the fix."""
    with pytest.raises(ConfigError, match=r"'answerer': output Draft .* Pass reply="):
        build("test", output=Draft)
    with pytest.raises(ConfigError, match=r"breaker='llm' .* pass breakers="):
        build("test", breaker="llm")
    with pytest.raises(ConfigError, match="without breaker=<name>"):
        build("test", breaker_policy=BreakerPolicy())
    with pytest.raises(ConfigError, match="produces nothing"):
        build("test", produces=[])
    # a breaker by name from a registry is accepted
    registry = BreakerRegistry(breaker_topics("llmu"))
    assert build("test", breaker="llm", breakers=registry).breaker == "llm"


async def test_a_model_whose_provider_is_missing_stops_the_agent_at_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Pass: declaring an agent on 'openai:gpt-4o' needs neither the SDK nor a key (an
    app can be imported by `mesh graph`); starting it raises a ConfigError naming the
    agent, the model and the extra to install."""
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    agent = build("openai:gpt-4o")
    with pytest.raises(ConfigError, match=r"'answerer': model 'openai:gpt-4o' .*pydantic-ai-"
                                          r"slim\[openai\]"):
        async with InMemoryMesh(agent):
            pass  # start() is what fails
    assert agent.stats.runs == 0


def test_module_docstring_examples_run() -> None:
    import mesh.llm

    failures, tried = doctest.testmod(mesh.llm, optionflags=doctest.ELLIPSIS)[:2]
    assert tried >= 8 and failures == 0


async def test_llm_usage_is_served_as_metrics() -> None:
    """Pass: /metrics (the MeshMetrics registry given to the agent) carries the agent's
    tokens by kind, its requests and its runs by outcome, summed over the agent's LLM
    stats; another registry (no host, nothing given) carries none of them."""
    from prometheus_client import CollectorRegistry, generate_latest

    from mesh.runtime.metrics import MeshMetrics

    metrics = MeshMetrics(CollectorRegistry())
    agent = llm_agent("metered", consumes=questions, produces=answers,
                      model=FunctionModel(answering()), instructions="Answer briefly.",
                      metrics=metrics)
    async with InMemoryMesh(agent) as mesh:
        await mesh.emit(questions, Question(qid="q1", text="a"))
        await mesh.emit(questions, Question(qid="q2", text="b"))
        await mesh.drain()
    text = generate_latest(metrics.registry).decode()
    other = MeshMetrics(CollectorRegistry())
    assert other.part(LLMMetrics).snapshot() == []
    runs, failures, requests, tokens_in, tokens_out = stats_of(agent)
    assert (runs, failures) == (2, 0)
    assert f'mesh_llm_tokens_total{{agent="metered",kind="input"}} {float(tokens_in)}' in text
    assert f'mesh_llm_tokens_total{{agent="metered",kind="output"}} {float(tokens_out)}' in text
    assert f'mesh_llm_requests_total{{agent="metered"}} {float(requests)}' in text
    assert 'mesh_llm_runs_total{agent="metered",outcome="ok"} 2.0' in text


KEY = "sk-mesh-unit-KEY-0123456789"


def test_llm_settings_come_from_the_environment_and_never_show_the_key(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Pass: MESH_LLM__MODEL/BASE_URL/API_KEY/TIMEOUT_S/MAX_TOKENS fill
    MeshSettings().llm; the key is a SecretStr whose value is the key, but no repr,
    str, JSON dump or validation error of the settings holds it."""
    from pydantic import ValidationError

    monkeypatch.setenv("MESH_LLM__MODEL", "openai:llama3.2")
    monkeypatch.setenv("MESH_LLM__BASE_URL", "http://127.0.0.1:11434/v1")
    monkeypatch.setenv("MESH_LLM__API_KEY", KEY)
    monkeypatch.setenv("MESH_LLM__TIMEOUT_S", "30")
    monkeypatch.setenv("MESH_LLM__MAX_TOKENS", "800")
    settings = MeshSettings()
    llm_settings = settings.llm
    assert (llm_settings.model, llm_settings.base_url) == (
        "openai:llama3.2", "http://127.0.0.1:11434/v1")
    assert llm_settings.api_key is not None and llm_settings.api_key.get_secret_value() == KEY
    assert (llm_settings.timeout_s, llm_settings.max_tokens, llm_settings.max_retries) == (
        30.0, 800, 0)
    shown = [repr(settings), str(settings), settings.model_dump_json(), repr(llm_settings),
             str(settings.model_dump())]
    assert all(KEY not in text for text in shown)
    monkeypatch.setenv("MESH_LLM__TIMEOUT_S", "-1")
    with pytest.raises(ValidationError) as invalid:
        MeshSettings()
    assert "timeout_s" in str(invalid.value) and KEY not in str(invalid.value)


@pytest.mark.parametrize(("env", "words"), [
    ({"MESH_LLM__API_KEY": KEY}, "MESH_LLM__MODEL is not"),
    ({"MESH_LLM__BASE_URL": "http://127.0.0.1:8000/v1"}, "MESH_LLM__MODEL is not"),
    ({"MESH_LLM__MODEL": "openai:m", "MESH_LLM__BASE_URL": f"http://u:{KEY}@h/v1"},
     "carries credentials"),
    ({"MESH_LLM__MODEL": "openai:m", "MESH_LLM__BASE_URL": "127.0.0.1:8000/v1"},
     "http:// or https://"),
], ids=["key-without-model", "url-without-model", "url-with-credentials", "url-no-scheme"])
def test_half_configured_llm_settings_are_refused_without_echoing_them(
        monkeypatch: pytest.MonkeyPatch, env: dict[str, str], words: str) -> None:
    """Pass: a key or a base URL without a model (the agents would silently run offline),
    a base URL carrying credentials or without a scheme: a validation error naming the
    variables and the fix, never the key."""
    from pydantic import ValidationError

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError) as invalid:
        MeshSettings()
    assert words in str(invalid.value) and KEY not in str(invalid.value)


def test_no_model_configured_means_no_model(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MESH_LLM__MODEL", raising=False)
    from mesh.config import LlmSettings
    from mesh.llm import model_from_settings

    assert model_from_settings() is None
    assert model_from_settings(MeshSettings()) is None
    assert model_from_settings(LlmSettings()) is None


def test_a_base_url_builds_an_openai_compatible_chat_model_with_the_key(
        caplog: pytest.LogCaptureFixture) -> None:
    """Pass: with a base URL, `openai:NAME`, a bare name (even with a colon, as Ollama's
    tags have) build pydantic-ai's chat-completions model on that URL with the key in
    its client, `ollama:NAME` pydantic-ai's Ollama model; timeout, max_tokens and
    max_retries (0: the mesh retries) are the model's settings; neither the model's
    repr nor the log holds the key."""
    import logging

    from pydantic_ai.models.ollama import OllamaModel
    from pydantic_ai.models.openai import OpenAIChatModel

    from mesh.config import LlmSettings
    from mesh.llm import model_from_settings

    caplog.set_level(logging.DEBUG)
    url = "http://127.0.0.1:8000/v1"
    built = {}
    for name in ("openai:llama3.2", "llama3.2:8b", "ollama:llama3.2"):
        built[name] = model_from_settings(LlmSettings(
            model=name, base_url=url, api_key=KEY, timeout_s=9, max_tokens=300))
    chat, tagged, ollama = built.values()
    assert isinstance(chat, OpenAIChatModel) and chat.model_name == "llama3.2"
    assert isinstance(tagged, OpenAIChatModel) and tagged.model_name == "llama3.2:8b"
    assert isinstance(ollama, OllamaModel)
    for model in built.values():
        assert model is not None and model.base_url == url + "/"
        assert model.settings == {"timeout": 9, "max_retries": 0, "max_tokens": 300}
        assert model.provider is not None and model.provider.client.api_key == KEY
        assert KEY not in repr(model) and KEY not in str(model)
    assert KEY not in caplog.text


def test_a_model_name_without_base_url_is_resolved_by_pydantic_ai(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Pass: `openai:gpt-4o-mini` with a key and no URL is pydantic-ai's own OpenAI model
    on OpenAI's URL with that key; without a key and no OPENAI_API_KEY, an unknown
    provider or one whose SDK is missing, a ConfigError names the setting and the fix
    (and never the key)."""
    from pydantic_ai.models.openai import OpenAIResponsesModel

    from mesh.config import LlmSettings
    from mesh.llm import model_from_settings

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    model = model_from_settings(LlmSettings(model="openai:gpt-4o-mini", api_key=KEY))
    assert isinstance(model, OpenAIResponsesModel) and model.model_id == "openai:gpt-4o-mini"
    assert model.provider is not None and model.provider.client.api_key == KEY
    assert model.base_url == "https://api.openai.com/v1/"
    with pytest.raises(ConfigError, match=r"MESH_LLM__MODEL='openai:gpt-4o-mini' .*"
                                          r"OPENAI_API_KEY.* set MESH_LLM__API_KEY"):
        model_from_settings(LlmSettings(model="openai:gpt-4o-mini"))
    with pytest.raises(ConfigError, match=r"'nope:x' cannot be used: Unknown (model|provider)"):
        model_from_settings(LlmSettings(model="nope:x", api_key=KEY))
    with pytest.raises(ConfigError) as refused:
        model_from_settings(LlmSettings(model="bedrock:claude", api_key=KEY))
    assert KEY not in str(refused.value)
    assert isinstance(model_from_settings(LlmSettings(model="test")), TestModel)


async def test_an_agent_on_the_configured_model_never_shows_the_key(
        caplog: pytest.LogCaptureFixture) -> None:
    """Pass: an LLM agent on a configured OpenAI-compatible model whose endpoint refuses
    the connection (nothing listens on the port) dead-letters nothing at first: the
    input goes to the retry topic with an error naming the agent, the model and
    'connection failed'; the key is in no record (retry, audit), no log line and no
    repr of the agent."""
    import logging

    from mesh.config import LlmSettings
    from mesh.kafka.embedded import free_port
    from mesh.llm import model_from_settings

    caplog.set_level(logging.DEBUG)
    model = model_from_settings(LlmSettings(
        model="openai:scripted", base_url=f"http://127.0.0.1:{free_port()}/v1",
        api_key=KEY, timeout_s=5))
    assert model is not None
    agent = build(model)
    with override_allow_model_requests(True):
        async with InMemoryMesh(agent, fast_retries=True) as mesh:
            await mesh.emit(questions, Question(qid="q9", text="anyone there?"))
            await mesh.drain()
            retried = mesh.records(f"{questions.name}.retry.1")
            everything = all_bytes(mesh, f"{questions.name}.retry.1", questions.dlq_name,
                                   "mesh.audit")
    assert retried
    message = dict(retried[0].headers)[RETRY_ERROR].decode()
    assert "'answerer'" in message and "openai:scripted" in message
    assert "connection failed" in message
    assert KEY.encode() not in everything
    assert KEY not in caplog.text and KEY not in repr(agent)
