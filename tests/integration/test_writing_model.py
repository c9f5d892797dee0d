"""The writing mesh's model brain over real HTTP: ``MESH_LLM__MODEL``, ``__BASE_URL`` and
``__API_KEY`` point pydantic-ai's OpenAI client at a chat-completions server on loopback
that this test starts (the one of test_llm_openai.py, with answers scripted for the
researcher's search tool, the analyst's notes, the coder's sample and the writer's
Markdown), so the brain's prompts, tools, structured outputs, usage and errors go
through the real client code; then the mesh's services on that model: a workflow whose
writer is rate-limited once completes through the mesh's retry, and one is stopped by a
token budget. The server answers as ``gpt-4o-mini`` (a model pydantic-ai prices), so
every usage carries the cost of its tokens."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import traceback
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from pydantic_ai.messages import ModelResponse, TextPart
from pydantic_ai.models import override_allow_model_requests
from pydantic_ai.usage import RequestUsage

from agents.app import AGENTS, app
from agents.brain import Brain, brain
from agents.model_brain import ModelBrain
from agents.retriever import Corpus, Passage
from agents.step import report
from mesh import Codec
from mesh.config import MeshSettings
from mesh.kafka.base import Record
from mesh.kafka.provision import apply_topics
from mesh.llm import LLMError
from mesh.patterns.delegation.coordinator import WorkflowEvent
from mesh.patterns.delegation.specialist import Specialist
from mesh.runtime.audit import CONSUMED, OK, RETRY, AuditEvent, audit_topic
from tests.conftest import BrokerUnderTest
from tests.integration.test_llm_openai import KEY, ChatServer, _completion
from tests.integration.test_writing import submit
from tests.support import AgentProcess, read_all
from topics.writing import WritingRequest, writing

pytestmark = pytest.mark.broker_agnostic

MODEL = "gpt-4o-mini"  # what the server says answered: a model genai-prices knows
# what one scripted answer (50 tokens in, 10 out) costs, as pydantic-ai prices it
PER_CALL = float(ModelResponse(parts=[TextPart("")], model_name=MODEL, usage=RequestUsage(
    input_tokens=50, output_tokens=10)).cost().total_price)

REQUEST = WritingRequest.model_validate({
    "workflow_id": "wf-model", "task": "Write an overview on MCP servers",
    "requirements": {"word_count": 300, "include_code": True, "audience": "developers"}})
MARKDOWN = ("# MCP servers\n\n## What they are\n\nServers expose tools [1].\n\n"
            "## How they talk\n\nJSON-RPC over stdio [2].\n\n## References\n\n[1] a\n[2] b\n")
# the writer's answer to a request of 100 words: 96 words, three sections, three
# citations listed in the references, so the reviewer approves it
DOCUMENT = (
    "# MCP servers for developers\n\n## What they are\n\nAn MCP server is a program that "
    "exposes tools, resources and prompts to an AI application through one open protocol, "
    "so a connector written once works with every client that speaks it [1].\n\n"
    "## How they talk\n\nClient and server exchange JSON-RPC 2.0 messages over stdio or "
    "Streamable HTTP, and a session starts with an initialize handshake that agrees on a "
    "protocol version [2].\n\n## Why it matters\n\nWith M applications and N systems, MCP "
    "turns M times N pieces of glue code into M plus N, which is why hosts adopt it [3]."
    "\n\n## References\n\n[1] What MCP is\n[2] Transports\n[3] Hosts, clients and "
    "servers\n")


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content)
    return content or ""


def _answer(text: str) -> dict[str, Any]:
    """A chat completion answering in plain text (a ``str`` output)."""
    return {"id": "chatcmpl-scripted", "object": "chat.completion", "created": 1_700_000_000,
            "model": MODEL, "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 10, "total_tokens": 60}}


class WritingServer(ChatServer):
    """Scripted by what the brain asks (its instructions and tools): research calls
    ``search_corpus`` once, then keeps the ids the tool returned; analysis answers notes
    citing passage 1 and 2 (``[bad]`` in the task: a citation of passage 99, which the
    brain refuses); code answers a one-line program (``[bad]``: an invalid one, no code,
    a number for a filename); writing answers :data:`DOCUMENT` when asked for 100 words,
    else :data:`MARKDOWN` (``[busy]`` in the task: 429, the body echoing the
    Authorization header). A kind of request (research, analyse, code, write; or
    research-final, research's request after its tool call) in ``busy_once`` gets that
    429 on its first request only, as a rate limit that clears.
    Every answer says :data:`MODEL` answered it. A request without ``Bearer <KEY>`` gets
    a 401."""

    def __init__(self) -> None:
        super().__init__()
        self.busy_once: set[str] = set()
        self.refused: list[str] = []  # the kinds of request answered 429 once

    def answer(self, path: str, auth: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        status, answer = self._reply(path, auth, body)
        if status == 200:
            answer["model"] = MODEL
        return status, answer

    def _reply(self, path: str, auth: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        messages = body["messages"]
        said = " ".join(_text(m.get("content")) for m in messages
                        if m["role"] in ("system", "user"))
        tools = [t["function"]["name"] for t in body.get("tools", ())]
        kind = ("research" if "search_corpus" in tools else
                "analyse" if "Extract up to 6 key points" in said else
                "code" if "self-contained Python" in said else "write")
        answered_tool = kind == "research" and any(m["role"] == "tool" for m in messages)
        stage = "research-final" if answered_tool else kind  # research's second request
        with self.lock:
            self.requests.append((path, auth, said[:40]))
            busy = (next((s for s in (kind, stage) if s in self.busy_once), None)
                    if kind not in self.refused and stage not in self.refused else None)
            if busy:
                self.refused.append(busy)
        if auth != f"Bearer {KEY}":
            return 401, {"error": {"message": "Incorrect API key provided",
                                   "type": "invalid_request_error", "code": "invalid_api_key"}}
        if busy or ("[busy]" in said and kind == "write"):
            return 429, {"error": {"message": f"Rate limit reached for {auth}",
                                   "type": "requests", "code": "rate_limit_exceeded"}}
        if kind == "research":
            results = [json.loads(_text(m["content"])) for m in messages if m["role"] == "tool"]
            if not results:
                return 200, _completion("search_corpus", {"query": "MCP servers", "k": 4})
            return 200, _completion("final_result",
                                    {"response": [p["id"] for p in results[0][:2]]})
        if kind == "analyse":
            cite = 99 if "[bad]" in said else 2
            return 200, _completion("final_result", {
                "key_points": [{"text": "MCP servers expose tools.", "cite": 1}],
                "figures": [{"value": "2024", "context": "released in 2024", "cite": cite}],
                "outline": [{"title": "What they are", "cites": [1]},
                            {"title": "How they talk", "cites": [2]}]})
        if kind == "code" and "[bad]" in said:
            return 200, _completion("final_result", {"filename": 5})
        if kind == "code":
            return 200, _completion("final_result", {
                "filename": "hello.py", "code": "print('hello from MCP')",
                "explanation": "prints a greeting"})
        if "document of 100 words" in said:
            return 200, _answer(DOCUMENT)
        return 200, _answer(MARKDOWN)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[WritingServer]:
    chat = WritingServer()
    thread = threading.Thread(target=chat.serve_forever, name="writing-chat", daemon=True)
    thread.start()
    monkeypatch.setenv("MESH_LLM__MODEL", f"openai:{MODEL}")
    monkeypatch.setenv("MESH_LLM__BASE_URL", chat.base_url)
    monkeypatch.setenv("MESH_LLM__API_KEY", KEY)
    try:
        with override_allow_model_requests(True):
            yield chat
    finally:
        chat.shutdown()
        chat.server_close()
        thread.join(timeout=10)


def search(query: str, k: int) -> list[Passage]:
    return Corpus.default().search(query, k=k, about="MCP servers")


def model_brain() -> Brain:
    chosen = brain(MeshSettings())
    assert isinstance(chosen, ModelBrain), chosen
    return chosen


def assert_no_key(caplog: pytest.LogCaptureFixture, *texts: str) -> None:
    assert caplog.records and KEY not in caplog.text
    assert all(KEY not in "".join(traceback.format_exception(*r.exc_info))
               for r in caplog.records if r.exc_info)
    assert all(KEY not in text for text in texts)


async def test_the_model_brain_researches_with_a_tool_call_analyses_codes_and_writes(
        server: WritingServer, caplog: pytest.LogCaptureFixture) -> None:
    """Pass: the settings choose the model brain; the researcher's search is a tool call
    whose passages the model keeps (2 requests, 120 tokens); the analysis, the sample and
    the draft are the model's (one request each), counted in their usage, each with the
    cost of its tokens at gpt-4o-mini's price (more than 0); every request reached
    /v1/chat/completions with the key; the key is in no log line nor output.
    Fail: a cost of 0 (the answers' model not priced) or not the sum of the requests."""
    caplog.set_level(logging.DEBUG)
    chosen = model_brain()
    assert chosen.label == f"model openai:{MODEL}"
    found = await chosen.research(["MCP servers"], k=3, search=search)
    expected = [p.id for p in search("MCP servers", 4)[:2]]
    assert [p.id for p in found.passages] == expected
    assert (found.usage.calls, found.usage.tokens, found.usage.fallback) == (2, 120, False)
    assert PER_CALL > 0 and found.usage.cost == pytest.approx(2 * PER_CALL)
    analysis = await chosen.analyse(REQUEST, found.passages)
    assert [p.text for p in analysis.key_points] == ["MCP servers expose tools."]
    assert [s.title for s in analysis.outline] == ["What they are", "How they talk"]
    assert (analysis.usage.calls, analysis.usage.fallback) == (1, False)
    sample = await chosen.code(REQUEST, analysis)
    assert sample.code == "print('hello from MCP')" and sample.usage.calls == 1
    draft = await chosen.write(REQUEST, analysis, sample, ["cite more"])
    assert draft.markdown == MARKDOWN and draft.title == "MCP servers"
    assert draft.usage.brain == chosen.label
    assert (draft.usage.calls, draft.usage.tokens) == (1, 60)
    assert analysis.usage.cost == sample.usage.cost == draft.usage.cost == pytest.approx(
        PER_CALL)
    assert len(server.requests) == 5
    assert {(path, auth) for path, auth, _ in server.requests} == {
        ("/v1/chat/completions", f"Bearer {KEY}")}
    assert_no_key(caplog, found.model_dump_json(), analysis.model_dump_json(),
                  draft.model_dump_json())


async def test_a_429_is_a_retriable_error_without_the_key_and_bad_notes_fall_back(
        server: WritingServer, caplog: pytest.LogCaptureFixture) -> None:
    """Pass: a 429 (whose body echoes the Authorization header) raises a retriable
    LLMError naming the rate limit, not the key (the mesh retries the step); notes citing
    a passage that does not exist are refused and the offline brain does the analysis,
    marked ``fallback`` with the model's call (and its cost) counted; a code sample that
    stays invalid through pydantic-ai's two output retries is the offline brain's, marked
    too, with the cost of its three answers."""
    caplog.set_level(logging.DEBUG)
    chosen = model_brain()
    found = await chosen.research(["MCP servers"], k=3, search=search)
    busy = REQUEST.model_copy(update={"task": "Write an overview on MCP servers [busy]"})
    analysis = await chosen.analyse(REQUEST, found.passages)
    with pytest.raises(LLMError) as raised:
        await chosen.write(busy, analysis, None, [])
    assert raised.value.retriable and "429" in str(raised.value)
    bad = REQUEST.model_copy(update={"task": "Write an overview on MCP servers [bad]"})
    fallen = await chosen.analyse(bad, found.passages)
    assert fallen.usage.fallback and fallen.usage.calls == 1
    assert fallen.usage.cost == pytest.approx(PER_CALL)  # a failed run's answers cost too
    assert fallen.usage.brain == chosen.label
    assert fallen.key_points and fallen.outline  # the offline brain's work
    sample = await chosen.code(bad, fallen)  # its subject says [bad]
    assert sample.usage.fallback and sample.usage.calls == 3  # asked twice more
    assert sample.usage.cost == pytest.approx(3 * PER_CALL)
    assert sample.code.strip() and sample.code != "print('hello from MCP')"
    assert_no_key(caplog, str(raised.value), repr(raised.value),
                  "".join(traceback.format_exception(raised.value)))


async def test_a_rate_limited_step_is_retried_by_the_mesh_and_the_workflow_completes(
        broker: BrokerUnderTest, server: WritingServer, tmp_path: Path) -> None:
    """Pass: the coordinator, researcher, analyst, writer and reviewer as `mesh run`
    services on the model; the write step's first model request gets a 429 (the body
    echoing the Authorization header), its second an answer: the writer's first attempt
    fails as a retriable LLMError, the mesh retries it through writing.tasks.writer.retry.1
    (the audit shows attempt 1 retried, attempt 2 ok) and the workflow completes, `mesh
    submit` exiting 0 with the reviewer's approval of the model's document; the usage is
    the 4 answered requests (research 2, analyse 1, write 1; the refused one cost
    nothing) with their cost (more than 0), on the outcome and on the write step's
    StepCompleted event; the key is in no record (events, outcomes, tasks, results, retry
    topics, audit), no `mesh submit` output and no service's log.
    Fail: the workflow fails on the 429, the step ran once, a cost of 0, the key shown."""
    server.busy_once = {"write"}
    names = ("coordinator", "researcher", "analyst", "writer", "reviewer")
    code, outcome, events, codes, logs = await run_services(
        broker, server, tmp_path, names, {
            "workflow_id": "wf-model-429", "task": "Write an overview on MCP servers",
            "requirements": {"word_count": 100, "audience": "developers"}},
        MESH_AUDIT__PAYLOADS="true")
    assert code == 0, events[-3000:]
    assert server.refused == ["write"]
    final = outcome["final_output"]
    assert final["approved"] and final["markdown"] == DOCUMENT, final.get("checks")
    assert list(outcome["step_results"]) == ["research", "analyse", "write", "review"]
    assert outcome["usage"] == {"tokens": 240, "calls": 4, "cost": pytest.approx(4 * PER_CALL)}
    assert outcome["usage"]["cost"] > 0
    assert outcome["step_results"]["write"]["usage"]["cost"] == pytest.approx(PER_CALL)
    assert codes == [0] * len(names)
    records = await read_all(broker.settings(), [*app.topics, audit_topic.name])
    codec = Codec()
    attempts = []
    for record in records:
        if record.topic != audit_topic.name:
            continue
        audit = await codec.decode(audit_topic, record.value or b"")
        assert isinstance(audit, AuditEvent)
        task = json.loads(audit.payload) if audit.kind == CONSUMED and audit.payload else {}
        if (audit.topic or "").startswith(writing.tasks["writer"].name) and task.get(
                "workflow_id") == "wf-model-429" and task.get("step_id") == "write":
            attempts.append((audit.topic, audit.attempt, audit.outcome))
            assert audit.outcome != RETRY or "429" in (audit.error or ""), audit.error
            if audit.outcome == OK:  # the attempt's usage, in the audit record's details
                assert (audit.details["tokens"], audit.details["calls"]) == ("60", "1")
                assert float(audit.details["cost"]) == pytest.approx(PER_CALL)
    assert attempts == [(writing.tasks["writer"].name, 1, RETRY),
                        (f"{writing.tasks['writer'].name}.retry.1", 2, OK)], attempts
    completed = [await codec.decode(writing.events, r.value or b"") for r in records
                 if r.topic == writing.events.name and r.key == b"wf-model-429"]
    write = [e for e in completed if isinstance(e, WorkflowEvent)
             and e.kind == "StepCompleted" and e.step_id == "write"]
    assert len(write) == 1 and write[0].usage is not None, completed
    assert (write[0].usage.calls, write[0].usage.tokens) == (1, 60)
    assert write[0].usage.cost == pytest.approx(PER_CALL)
    assert any(r.key == b"wf-model-429" for r in records)
    assert_key_nowhere(records, logs.values())
    assert KEY not in events and KEY not in json.dumps(outcome)


async def test_answers_paid_for_by_an_attempt_that_then_failed_are_charged(
        server: WritingServer) -> None:
    """Pass: the researcher's step on the model: its tool call is answered (60 tokens),
    the request after it gets a 429: the attempt fails as a retriable LLMError, and what
    the answered request cost is charged to the step all the same (the attempt's audit
    details, the usage kept for the step's result, the specialist's metrics); the next
    attempt's three answers add to it. Fail: the answered request's cost lost with the
    attempt (a budget that never sees it)."""
    from mesh import Context, Envelope
    from mesh.patterns.delegation.plan import StepTask

    server.busy_once = {"research-final"}
    chosen = model_brain()

    async def research(task: StepTask, ctx: Context) -> dict[str, Any]:
        found = await chosen.research(["MCP servers"], k=3, search=search)
        report(found.usage)
        return {"ids": [p.id for p in found.passages]}

    agent = Specialist("researcher", topics=writing, handler=research,
                       group="charged-researcher")
    task = StepTask(task_id="w/research", workflow_id="w", step_id="research",
                    dispatch_id="w/research/v1", specialist="researcher", plan_version=1)
    first = Context(agent, Envelope(task, "e1", "c1", topic=writing.tasks["researcher"].name))
    with pytest.raises(LLMError) as raised:
        await agent.handle(task, first)
    assert raised.value.retriable and server.refused == ["research-final"]
    assert first.details is not None
    assert (first.details["tokens"], first.details["calls"]) == ("60", "1")
    assert float(first.details["cost"]) == pytest.approx(PER_CALL)
    second = Context(agent, Envelope(task, "e1", "c1", topic=writing.tasks["researcher"].name,
                                     attempt=2))
    result = await agent.handle(task, second)
    assert result.ok and result.usage is not None
    assert (result.usage.tokens, result.usage.calls) == (180, 3)  # 1 + 2 answers
    assert result.usage.cost == pytest.approx(3 * PER_CALL)
    assert (agent.usage_stats.tokens, agent.usage_stats.calls) == (180, 3)


async def test_the_mesh_on_a_model_stops_at_its_token_budget_and_never_shows_the_key(
        broker: BrokerUnderTest, server: WritingServer, tmp_path: Path) -> None:
    """Pass: the coordinator and the researcher as `mesh run` services with
    MESH_LLM__MODEL/BASE_URL/API_KEY set; a request with a 100-token budget: the research
    step (a tool call, 2 model calls, 120 tokens, reported by the researcher) goes over
    it, so the workflow stops with BudgetExceeded before the analysis, `mesh submit`
    exits 1 and the outcome names the token limit, with the research kept and its cost
    (two answers at gpt-4o-mini's price) in the usage; the key is in no record of the
    mesh's topics or the audit, and in no service's log."""
    code, outcome, events, codes, logs = await run_services(
        broker, server, tmp_path, ("coordinator", "researcher"), {
            "workflow_id": "wf-model-budget", "task": "Write an overview on MCP servers",
            "requirements": {"word_count": 600}, "budget": {"tokens": 100}})
    assert code == 1, events[-3000:]
    assert outcome["budget_exceeded"] == {"limit": "tokens", "used": 120.0,
                                          "allowed": 100.0, "steps_remained": False}
    assert outcome["usage"] == {"tokens": 120, "calls": 2, "cost": pytest.approx(2 * PER_CALL)}
    assert outcome["usage"]["cost"] > 0
    assert list(outcome["step_results"]) == ["research"]
    research = outcome["step_results"]["research"]["usage"]
    assert research["brain"] == f"model openai:{MODEL}"
    assert research["cost"] == pytest.approx(2 * PER_CALL)
    assert "BudgetExceeded" in events and "StepDispatched analyse" not in events
    assert codes == [0, 0]
    records = await read_all(broker.settings(), [*app.topics, audit_topic.name])
    assert any(r.key == b"wf-model-budget" for r in records)
    assert_key_nowhere(records, logs.values())


async def run_services(broker: BrokerUnderTest, server: WritingServer, tmp_path: Path,
                       names: Sequence[str], request: dict[str, Any], **env: str
                       ) -> tuple[int, dict[str, Any], str, list[int], dict[str, Path]]:
    """Start ``names`` as `mesh run` services on the loopback model (each logging to a
    file), submit ``request`` and follow it, stop the services: `mesh submit`'s exit
    code, outcome and events, the services' exit codes and their logs."""
    await apply_topics(broker.settings().kafka, [*app.topics.values(), audit_topic])
    env = {"MESH_LLM__MODEL": f"openai:{MODEL}", "MESH_LLM__BASE_URL": server.base_url,
           "MESH_LLM__API_KEY": KEY, "MESH_LOG_LEVEL": "INFO", **env}
    logs = {name: tmp_path / f"{name}.log" for name in names}
    services = [AgentProcess(broker, f"{AGENTS[name].__name__}:agent", prefix="writing",
                             log=path.open("wb"), env=env).start()
                for name, path in logs.items()]
    try:
        code, outcome, events = await asyncio.to_thread(submit, broker, request, 120.0)
    finally:
        codes = [proc.terminate() for proc in services]
    return code, outcome, events, codes, logs


def assert_key_nowhere(records: Sequence[Record], logs: Iterable[Path]) -> None:
    """The API key is in no record (key, value, headers) and no service's log."""
    for record in records:
        raw = (record.key or b"") + (record.value or b"") + b"".join(
            v for _, v in record.headers)
        assert KEY.encode() not in raw, f"the key is in a record of {record.topic}"
    for path in logs:
        assert KEY not in path.read_text(errors="replace"), path.name
