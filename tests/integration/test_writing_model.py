"""The writing mesh's model brain over real HTTP: ``MESH_LLM__MODEL``, ``__BASE_URL`` and
``__API_KEY`` point pydantic-ai's OpenAI client at a chat-completions server on loopback
that this test starts (the one of test_llm_openai.py, with answers scripted for the
researcher's search tool, the analyst's notes, the coder's sample and the writer's
Markdown), so the brain's prompts, tools, structured outputs, usage and errors go
through the real client code; then the mesh's services on that model, stopped by a
token budget."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import traceback
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic_ai.models import override_allow_model_requests

from agents.app import AGENTS, app
from agents.brain import Brain, brain
from agents.model_brain import ModelBrain
from agents.retriever import Corpus, Passage
from mesh.config import MeshSettings
from mesh.kafka.provision import apply_topics
from mesh.llm import LLMError
from mesh.runtime.audit import audit_topic
from tests.conftest import BrokerUnderTest
from tests.integration.test_llm_openai import KEY, ChatServer, _completion
from tests.integration.test_writing import submit
from tests.support import AgentProcess, read_all
from topics.writing import WritingRequest

pytestmark = pytest.mark.broker_agnostic

REQUEST = WritingRequest.model_validate({
    "workflow_id": "wf-model", "task": "Write an overview on MCP servers",
    "requirements": {"word_count": 300, "include_code": True, "audience": "developers"}})
MARKDOWN = ("# MCP servers\n\n## What they are\n\nServers expose tools [1].\n\n"
            "## How they talk\n\nJSON-RPC over stdio [2].\n\n## References\n\n[1] a\n[2] b\n")


def _text(content: Any) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content)
    return content or ""


def _answer(text: str) -> dict[str, Any]:
    """A chat completion answering in plain text (a ``str`` output)."""
    return {"id": "chatcmpl-scripted", "object": "chat.completion", "created": 1_700_000_000,
            "model": "scripted", "choices": [{"index": 0, "finish_reason": "stop", "message": {
                "role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 50, "completion_tokens": 10, "total_tokens": 60}}


class WritingServer(ChatServer):
    """Scripted by what the brain asks (its instructions and tools): research calls
    ``search_corpus`` once, then keeps the ids the tool returned; analysis answers notes
    citing passage 1 and 2 (``[bad]`` in the task: a citation of passage 99, which the
    brain refuses); code answers a one-line program (``[bad]``: an invalid one, no code,
    a number for a filename); writing answers :data:`MARKDOWN`
    (``[busy]`` in the task: 429, the body echoing the Authorization header). A request
    without ``Bearer <KEY>`` gets a 401."""

    def answer(self, path: str, auth: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        messages = body["messages"]
        said = " ".join(_text(m.get("content")) for m in messages
                        if m["role"] in ("system", "user"))
        tools = [t["function"]["name"] for t in body.get("tools", ())]
        with self.lock:
            self.requests.append((path, auth, said[:40]))
        if auth != f"Bearer {KEY}":
            return 401, {"error": {"message": "Incorrect API key provided",
                                   "type": "invalid_request_error", "code": "invalid_api_key"}}
        if "search_corpus" in tools:
            results = [json.loads(_text(m["content"])) for m in messages if m["role"] == "tool"]
            if not results:
                return 200, _completion("search_corpus", {"query": "MCP servers", "k": 4})
            return 200, _completion("final_result",
                                    {"response": [p["id"] for p in results[0][:2]]})
        if "Extract up to 6 key points" in said:
            cite = 99 if "[bad]" in said else 2
            return 200, _completion("final_result", {
                "key_points": [{"text": "MCP servers expose tools.", "cite": 1}],
                "figures": [{"value": "2024", "context": "released in 2024", "cite": cite}],
                "outline": [{"title": "What they are", "cites": [1]},
                            {"title": "How they talk", "cites": [2]}]})
        if "self-contained Python" in said and "[bad]" in said:
            return 200, _completion("final_result", {"filename": 5})
        if "self-contained Python" in said:
            return 200, _completion("final_result", {
                "filename": "hello.py", "code": "print('hello from MCP')",
                "explanation": "prints a greeting"})
        if "[busy]" in said:
            return 429, {"error": {"message": f"Rate limit reached for {auth}",
                                   "type": "requests", "code": "rate_limit_exceeded"}}
        return 200, _answer(MARKDOWN)


@pytest.fixture
def server(monkeypatch: pytest.MonkeyPatch) -> Iterator[WritingServer]:
    chat = WritingServer()
    thread = threading.Thread(target=chat.serve_forever, name="writing-chat", daemon=True)
    thread.start()
    monkeypatch.setenv("MESH_LLM__MODEL", "openai:scripted")
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
    the draft are the model's (one request each), counted in their usage; every request
    reached /v1/chat/completions with the key; the key is in no log line nor output."""
    caplog.set_level(logging.DEBUG)
    chosen = model_brain()
    assert chosen.label == "model openai:scripted"
    found = await chosen.research(["MCP servers"], k=3, search=search)
    expected = [p.id for p in search("MCP servers", 4)[:2]]
    assert [p.id for p in found.passages] == expected
    assert (found.usage.calls, found.usage.tokens, found.usage.fallback) == (2, 120, False)
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
    marked ``fallback`` with the model's call counted; a code sample that stays invalid
    through pydantic-ai's two output retries is the offline brain's, marked too."""
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
    assert fallen.usage.brain == chosen.label
    assert fallen.key_points and fallen.outline  # the offline brain's work
    sample = await chosen.code(bad, fallen)  # its subject says [bad]
    assert sample.usage.fallback and sample.usage.calls == 3  # asked twice more
    assert sample.code.strip() and sample.code != "print('hello from MCP')"
    assert_no_key(caplog, str(raised.value), repr(raised.value),
                  "".join(traceback.format_exception(raised.value)))


async def test_the_mesh_on_a_model_stops_at_its_token_budget_and_never_shows_the_key(
        broker: BrokerUnderTest, server: WritingServer, tmp_path: Path) -> None:
    """Pass: the coordinator and the researcher as `mesh run` services with
    MESH_LLM__MODEL/BASE_URL/API_KEY set; a request with a 100-token budget: the research
    step (a tool call, 2 model calls, 120 tokens, reported by the researcher) goes over
    it, so the workflow stops with BudgetExceeded before the analysis, `mesh submit`
    exits 1 and the outcome names the token limit, with the research kept; the key is in
    no record of the mesh's topics or the audit, and in no service's log."""
    await apply_topics(broker.settings().kafka, [*app.topics.values(), audit_topic])
    env = {"MESH_LLM__MODEL": "openai:scripted", "MESH_LLM__BASE_URL": server.base_url,
           "MESH_LLM__API_KEY": KEY, "MESH_LOG_LEVEL": "INFO"}
    logs = {name: tmp_path / f"{name}.log" for name in ("coordinator", "researcher")}
    services = [AgentProcess(broker, f"{AGENTS[name].__name__}:agent", prefix="writing",
                             log=path.open("wb"), env=env).start()
                for name, path in logs.items()]
    try:
        code, outcome, events = await asyncio.to_thread(submit, broker, {
            "workflow_id": "wf-model-budget", "task": "Write an overview on MCP servers",
            "requirements": {"word_count": 600}, "budget": {"tokens": 100}}, 120.0)
    finally:
        codes = [proc.terminate() for proc in services]
    assert code == 1, events[-3000:]
    assert outcome["budget_exceeded"] == {"limit": "tokens", "used": 120.0,
                                          "allowed": 100.0, "steps_remained": False}
    assert outcome["usage"] == {"tokens": 120, "calls": 2, "cost": 0.0}
    assert list(outcome["step_results"]) == ["research"]
    assert outcome["step_results"]["research"]["usage"]["brain"] == "model openai:scripted"
    assert "BudgetExceeded" in events and "StepDispatched analyse" not in events
    assert codes == [0, 0]
    records = await read_all(broker.settings(), [*app.topics, audit_topic.name])
    assert any(r.key == b"wf-model-budget" for r in records)
    for record in records:
        raw = (record.key or b"") + (record.value or b"") + b"".join(
            v for _, v in record.headers)
        assert KEY.encode() not in raw, f"the key is in a record of {record.topic}"
    for path in logs.values():
        assert KEY not in path.read_text(errors="replace"), path.name
