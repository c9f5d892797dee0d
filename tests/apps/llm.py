"""An LLM agent for `mesh run`: it summarises articles, with a model that never leaves
the process.

Topics are named from ``MESH_TEST_PREFIX``; ``LLM_TEST_MODEL`` picks the model:

* ``function`` (default): a pydantic-ai ``FunctionModel`` that reads the article from
  the prompt (the default prompt: the payload as JSON) and answers with its first
  sentence and its word count, copying the article id as a model would;
* ``flaky``: the same, but the first call for each article answers HTTP 503 (a
  retriable error: the input goes through the retry topic, the next attempt succeeds);
* ``test``: pydantic-ai's ``TestModel`` (schema-valid made-up output).

Model requests to real providers are switched off (``ALLOW_MODEL_REQUESTS = False``).
"""

from __future__ import annotations

import json
import os
import threading

from pydantic import BaseModel
from pydantic_ai import models
from pydantic_ai.exceptions import ModelHTTPError
from pydantic_ai.messages import ModelMessage, ModelResponse, ToolCallPart, UserPromptPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.test import TestModel

from mesh import Topic
from mesh.llm import LLMAgent, llm_agent
from mesh.policy import RetryPolicy

models.ALLOW_MODEL_REQUESTS = False


class Article(BaseModel):
    """An article to summarise."""

    article_id: str
    title: str
    text: str


class Summary(BaseModel):
    """What the model returns: a one-sentence summary and the article's length."""

    article_id: str
    summary: str
    words: int


_FAILED: set[str] = set()  # articles the flaky model already failed once
_LOCK = threading.Lock()


def _article_of(messages: list[ModelMessage]) -> Article:
    """The article in the run's user prompt (``Article (JSON):\\n{...}``)."""
    for message in messages:
        for part in getattr(message, "parts", ()):
            if isinstance(part, UserPromptPart) and isinstance(part.content, str):
                return Article.model_validate_json(part.content.split("\n", 1)[1])
    raise AssertionError("no user prompt in the run's messages")


def summarise(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    article = _article_of(messages)
    first = article.text.split(".")[0].strip() + "."
    args = {"article_id": article.article_id, "summary": first,
            "words": len(article.text.split())}
    return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, json.dumps(args))])


def flaky(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    article = _article_of(messages)
    with _LOCK:
        first_call = article.article_id not in _FAILED
        _FAILED.add(article.article_id)
    if first_call:
        raise ModelHTTPError(503, "flaky", body={"error": "overloaded, try again"})
    return summarise(messages, info)


def model_named(name: str) -> models.Model:
    if name == "function":
        return FunctionModel(summarise, model_name="summarise")
    if name == "flaky":
        return FunctionModel(flaky, model_name="flaky")
    if name == "test":
        return TestModel()
    raise ValueError(f"LLM_TEST_MODEL={name!r}: choose function, flaky or test.")


def topics_of(prefix: str) -> tuple[Topic[Article], Topic[Summary]]:
    return (Topic(f"{prefix}.articles", Article, key="article_id", partitions=2),
            Topic(f"{prefix}.summaries", Summary, key="article_id", partitions=2))


def build(prefix: str, model: str = "function") -> LLMAgent:
    articles, summaries = topics_of(prefix)
    return llm_agent(f"{prefix}-summariser", consumes=articles, produces=summaries,
                     model=model_named(model), retry=RetryPolicy(attempts=3, base_ms=100),
                     instructions="Summarise the article in one sentence and count its "
                                  "words. Keep its article_id.")


PREFIX = os.environ.get("MESH_TEST_PREFIX", "llm")
agent = build(PREFIX, os.environ.get("LLM_TEST_MODEL", "function"))
