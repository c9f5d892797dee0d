"""The LLM path over real HTTP: pydantic-ai's OpenAI client, configured by
``MESH_LLM__*``, talks to a chat-completions server on loopback that this test starts
(stdlib ``http.server`` in a thread: real sockets, scripted answers), inside a mesh agent
on the broker."""

from __future__ import annotations

import json
import logging
import threading
import traceback
from collections import Counter
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
from pydantic import BaseModel
from pydantic_ai.models import override_allow_model_requests

from mesh import Codec, Emitter, Mesh, MeshSettings, Topic, apply_topics
from mesh.llm import LLMAgent, llm_agent, model_from_settings
from mesh.policy import RetryPolicy
from mesh.runtime.audit import audit_topic
from mesh.runtime.dead_letter import DeadLetter
from mesh.runtime.retry import RETRY_ERROR
from tests.conftest import BrokerUnderTest
from tests.support import event_id, read_all, wait_for_count

pytestmark = pytest.mark.broker_agnostic

KEY = "sk-loopback-7c1e5f0a9b2d4e6f"
PASSAGE = "Kafka orders records per partition."


class Question(BaseModel):
    qid: str
    text: str


class Answer(BaseModel):
    qid: str
    text: str


SEARCHES: list[str] = []


def search(query: str) -> str:
    """Search the knowledge base; returns the best passage."""
    SEARCHES.append(query)
    return PASSAGE


class ChatServer(ThreadingHTTPServer):
    """An OpenAI chat-completions endpoint with scripted answers, by question id:

    * ``tool``: calls the agent's ``search`` tool, then answers with what it returned;
    * ``busy``: 429 on its first request (the body echoes the caller's Authorization
      header, as a careless proxy might), then answers;
    * ``bad``: always an answer that fails validation (a numeric qid, no text);
    * anything else: answers at once.

    A request without ``Authorization: Bearer <KEY>`` gets a 401.
    """

    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.lock = threading.Lock()
        self.requests: list[tuple[str, str, str]] = []  # path, authorization, qid
        self.calls: Counter[str] = Counter()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1"

    def answer(self, path: str, auth: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        question = _question_of(body["messages"])
        with self.lock:
            self.requests.append((path, auth, question.qid))
            self.calls[question.qid] += 1
            call = self.calls[question.qid]
        if path != "/v1/chat/completions":
            return 404, {"error": {"message": f"no route {path}", "type": "invalid_request"}}
        if auth != f"Bearer {KEY}":
            return 401, {"error": {"message": "Incorrect API key provided",
                                   "type": "invalid_request_error", "code": "invalid_api_key"}}
        output = next(t["function"]["name"] for t in body.get("tools", ())
                      if t["function"]["name"] != "search")
        if question.qid == "busy" and call == 1:
            return 429, {"error": {"message": f"Rate limit reached for {auth}",
                                   "type": "requests", "code": "rate_limit_exceeded"}}
        if question.qid == "bad":
            return 200, _completion(output, {"qid": 12345})
        if question.qid == "tool":
            results = [m["content"] for m in body["messages"] if m["role"] == "tool"]
            if not results:
                return 200, _completion("search", {"query": question.text})
            return 200, _completion(output, {"qid": question.qid,
                                             "text": f"found: {results[0]}"})
        return 200, _completion(output, {"qid": question.qid, "text": question.text.upper()})


class _Handler(BaseHTTPRequestHandler):
    server: ChatServer

    def do_POST(self) -> None:
        length = int(self.headers.get("Content-Length", "0"))
        body = json.loads(self.rfile.read(length))
        status, answer = self.server.answer(self.path, self.headers.get("Authorization", ""),
                                            body)
        data = json.dumps(answer).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if status == 429:
            self.send_header("Retry-After", "0")
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # the test reads the server's own record, not stderr


def _question_of(messages: list[dict[str, Any]]) -> Question:
    """The question in the run's user prompt (the default prompt: ``Question (JSON):``)."""
    for message in messages:
        content = message.get("content")
        if message["role"] == "user" and isinstance(content, list):
            content = "".join(p.get("text", "") for p in content)
        if message["role"] == "user" and isinstance(content, str) and "(JSON):" in content:
            return Question.model_validate_json(content.split("\n", 1)[1])
    raise AssertionError(f"no question in {messages}")


def _completion(tool: str, arguments: dict[str, Any]) -> dict[str, Any]:
    """A chat completion whose message calls ``tool`` with ``arguments``."""
    return {
        "id": "chatcmpl-scripted", "object": "chat.completion", "created": 1_700_000_000,
        "model": "scripted",
        "choices": [{"index": 0, "finish_reason": "tool_calls", "message": {
            "role": "assistant", "content": None,
            "tool_calls": [{"id": f"call-{tool}", "type": "function",
                            "function": {"name": tool, "arguments": json.dumps(arguments)}}],
        }}],
        "usage": {"prompt_tokens": 50, "completion_tokens": 10, "total_tokens": 60},
    }


@pytest.fixture
def chat_server() -> Iterator[ChatServer]:
    server = ChatServer()
    thread = threading.Thread(target=server.serve_forever, name="chat-server", daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


def build(prefix: str, settings: MeshSettings) -> LLMAgent:
    model = model_from_settings(settings)
    assert model is not None, "MESH_LLM__MODEL is set by the test"
    return llm_agent(
        f"{prefix}-answerer",
        consumes=Topic(f"{prefix}.questions", Question, key="qid", partitions=2),
        produces=Topic(f"{prefix}.answers", Answer, key="qid", partitions=2),
        model=model, tools=[search], retry=RetryPolicy(attempts=3, base_ms=100),
        instructions="Answer the question; search when you need to.")


async def test_an_openai_compatible_server_answers_with_a_tool_call_a_429_and_invalid_output(
        broker: BrokerUnderTest, prefix: str, chat_server: ChatServer,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """Pass, with MESH_LLM__MODEL/BASE_URL/API_KEY pointing at the loopback server:
    `tool` calls the agent's search tool and its answer carries the passage the tool
    returned; `busy` gets a 429 (no SDK retry: max_retries 0), goes once through
    <topic>.retry.1 and is answered on the next attempt; `bad` returns invalid output
    twice (pydantic-ai's output retry) and is dead-lettered at once as a non-retriable
    LLMError; every request reached /v1/chat/completions with `Bearer <key>`; the key
    is in no log line, no record of the answers, retry, dead-letter and audit topics
    and no error message, though the server echoed it in its 429 body."""
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("MESH_LLM__MODEL", "openai:scripted")
    monkeypatch.setenv("MESH_LLM__BASE_URL", chat_server.base_url)
    monkeypatch.setenv("MESH_LLM__API_KEY", KEY)
    SEARCHES.clear()
    settings = broker.settings()
    agent = build(prefix, settings)
    questions, answers = agent.consumes[0], agent.produces[0]
    await apply_topics(settings.kafka, agent.all_topics)
    asked = [Question(qid="tool", text="how does kafka order records?"),
             Question(qid="busy", text="are you there?"),
             Question(qid="bad", text="what is the answer?")]
    with override_allow_model_requests(True):  # tests/apps/llm.py turns them off
        async with Mesh(settings, [agent]) as mesh:
            await mesh.wait_assigned()
            async with Emitter(settings, source=f"{prefix}-test") as emitter:
                sent = await emitter.emit(questions, asked)
            out = await wait_for_count(settings, [answers.name], 2, timeout=60)
            letters = await wait_for_count(settings, [questions.dlq_name], 1, timeout=60)
            # A rebalance (heartbeats late on a loaded machine) may hand an input to the
            # model again before its offset was committed: at-least-once, not a bug.
            rebalanced = sum(runner.revocations for runner in mesh.runners)
    ids = {q.qid: e.event_id for q, e in zip(asked, sent, strict=True)}

    codec = Codec()
    got = {}
    for record in out:
        answer = await codec.decode(answers, record.value or b"")
        assert isinstance(answer, Answer)
        got[answer.qid] = answer
    assert got == {"tool": Answer(qid="tool", text=f"found: {PASSAGE}"),
                   "busy": Answer(qid="busy", text="ARE YOU THERE?")}
    retried = await read_all(settings, [f"{questions.name}.retry.1"])
    if rebalanced:  # each input was handled at least once, and nothing else was asked
        assert set(SEARCHES) == {"how does kafka order records?"}
        assert {event_id(r) for r in retried} == {ids["busy"]}
    else:
        assert SEARCHES == ["how does kafka order records?"]
        assert [event_id(r) for r in retried] == [ids["busy"]]
    retry_error = dict(retried[0].headers)[RETRY_ERROR].decode()
    assert "rate limited (HTTP 429" in retry_error and "Retriable" in retry_error

    assert {event_id(r) for r in letters} == {ids["bad"]}
    assert rebalanced or len(letters) == 1
    letter = DeadLetter.of(letters[0])
    assert (letter.error_class, letter.attempts) == ("LLMError", 1)
    assert "output invalid" in letter.error and "Not retriable" in letter.error
    assert "qid: string_type" in letter.error and "text: missing" in letter.error

    if rebalanced:
        assert chat_server.calls.keys() == {"tool", "busy", "bad"}
        assert all(calls >= 2 for calls in chat_server.calls.values()), chat_server.calls
    else:
        assert chat_server.calls == {"tool": 2, "busy": 2, "bad": 2}
    assert {(path, auth) for path, auth, _ in chat_server.requests} == {
        ("/v1/chat/completions", f"Bearer {KEY}")}

    records = await read_all(settings, [answers.name, f"{questions.name}.retry.1",
                                        questions.dlq_name, audit_topic.name])
    assert records
    for record in records:
        raw = (record.key or b"") + (record.value or b"") + b"".join(
            v for _, v in record.headers)
        assert KEY.encode() not in raw, f"the key is in a record of {record.topic}"
    assert KEY not in retry_error and KEY not in letter.error
    assert caplog.records and KEY not in caplog.text
    assert all(KEY not in "".join(traceback.format_exception(*r.exc_info))
               for r in caplog.records if r.exc_info)
    assert KEY not in repr(agent) and KEY not in repr(settings)
