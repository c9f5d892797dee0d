"""LLM agents: a pydantic-ai agent behind a mesh agent, with typed, validated outputs.

An :class:`LLMAgent` is an ordinary mesh agent whose handler asks a model. For each
input it builds a prompt (``prompt(payload, ctx)``; by default the payload as JSON under
its model's name), runs a `pydantic-ai <https://ai.pydantic.dev>`_ agent whose
``output_type`` is the produced topic's model, and returns the validated output, which
the runtime routes to that topic like any handler's return value (derived event ids,
correlation and trace carried on, committed after the broker acknowledges it).

The model is anything pydantic-ai takes: a ``Model`` or a name (``"openai:gpt-4o"``,
``"anthropic:claude-sonnet-4-0"``, ``"test"``). Provider SDKs come with pydantic-ai's
extras (``pip install 'pydantic-ai-slim[openai]'``); their keys come from the
provider's usual environment variables (``OPENAI_API_KEY``, ...) and are never logged,
put in errors or in events. A model name is resolved when the agent starts (a missing
SDK or key stops the agent at startup, not at its first input), so importing an app
(``mesh graph``, ``mesh topics apply``) needs neither.

**Errors** keep the mesh's resilience working for model calls (:func:`classify`): rate
limits (429), 5xx, timeouts and connection failures raise a retriable :class:`LLMError`
(retry topics, then the dead-letter topic); output that still fails validation after
pydantic-ai's own output retries, other 4xx (bad request, credentials, unknown model,
context window, exhausted quota) and usage limits raise a non-retriable one (the
dead-letter topic at once). The error names the agent, the model and the cause: never
the prompt, the provider's response body or a key (pydantic-ai's exception is kept as
``LLMError.original``, not chained, so no traceback prints it either). Errors of the
agent's own code (a prompt function, a tool) pass through unchanged.

**Breaker**: with ``breaker=`` every run goes through a
:class:`~mesh.resilience.breaker.CircuitBreaker` (one you pass, or one by name from a
:class:`~mesh.resilience.breaker.BreakerRegistry`): retriable failures count, so an
outage opens it and the agent holds its partitions (nothing is dead-lettered) until it
half-opens; a 400 means the provider answered, and does not count.

**Settings**: :func:`model_from_settings` builds the model a deployment names in
``MESH_LLM__MODEL`` (``MESH_LLM__BASE_URL`` for an OpenAI-compatible endpoint: vLLM,
Ollama, LM Studio; ``MESH_LLM__API_KEY`` as a secret), or returns ``None`` when none is
configured, so an agent can fall back to work without a model.

**Usage**: each run's requests and tokens (also of failed runs: they were spent) are
added to the agent's :class:`LLMStats`, which :class:`LLMMetrics` serves on ``/metrics``
(the metrics given as ``metrics=``, else the host's from the agent's start).

The module is over 500 lines on purpose: it is the one place that imports pydantic-ai
(an optional extra, refused with the install command when missing), so the agent, the
mapping of pydantic-ai's errors onto retriable and not, and the model built from the
settings stay together rather than each module repeating the guarded import.

Example:
    >>> from pydantic import BaseModel
    >>> class Article(BaseModel):
    ...     article_id: str
    ...     text: str
    >>> class Summary(BaseModel):
    ...     article_id: str
    ...     summary: str
    >>> summariser = llm_agent(
    ...     "summariser", consumes=Topic("llm.articles", Article, key="article_id"),
    ...     produces=Topic("llm.summaries", Summary, key="article_id"), model="test",
    ...     instructions="Summarise the article in one sentence.")
    >>> summariser.model_label, [t.name for t in summariser.produces]
    ('test', ['llm.summaries'])
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, cast

from prometheus_client.core import CounterMetricFamily
from pydantic import BaseModel, ValidationError

from mesh.agent import Agent, Context
from mesh.config import LlmSettings, MeshSettings
from mesh.errors import ConfigError, HandlerError, MeshError
from mesh.policy import RetryPolicy
from mesh.resilience.breaker import BreakerPolicy, BreakerRegistry, CircuitBreaker
from mesh.runtime.metrics import Members, MeshMetrics, host_metrics
from mesh.topic import Topic

try:
    from pydantic_ai import Agent as ModelAgent
    from pydantic_ai import exceptions as pai
    from pydantic_ai.models import Model, infer_model
    from pydantic_ai.providers import Provider, infer_provider, infer_provider_class
    from pydantic_ai.settings import ModelSettings
    from pydantic_ai.usage import RunUsage, UsageLimits
except ImportError as missing:  # an optional extra
    raise ImportError("mesh.llm needs pydantic-ai: pip install 'kafka-agent-mesh[llm]', plus "
                      "the provider's extra (e.g. 'pydantic-ai-slim[openai]').") from missing

__all__ = ["LLMAgent", "LLMError", "LLMMetrics", "LLMStats", "classify", "default_prompt",
           "llm", "llm_agent", "model_from_settings"]

logger = logging.getLogger(__name__)

Prompt = Callable[[Any, Context], "str | Awaitable[str]"]
Reply = Callable[[Any, Any, Context], Any]


class LLMError(HandlerError):
    """A model run failed; ``retriable`` says whether another attempt may succeed.

    Attributes:
        agent: the mesh agent.
        model: the model's label (``provider:name``).
        cause: what went wrong, in a few words (``rate limited``, ``output invalid``).
        status: the provider's HTTP status, if it answered with one.
        original: pydantic-ai's exception, for code that inspects it. It is not the
            ``__cause__``, so tracebacks never print it (its message holds the
            provider's response body).

    Example:
        >>> LLMError("Answer failed", agent="a", model="test", cause="rate limited",
        ...          retriable=True).retriable
        True
    """

    def __init__(self, message: str, *, agent: str, model: str, cause: str,
                 status: int | None = None, retriable: bool = False) -> None:
        super().__init__(message, retriable=retriable)
        self.agent, self.model, self.cause, self.status = agent, model, cause, status
        self.original: BaseException | None = None


class LLMStats:
    """What one LLM agent spent in this process, for ``/metrics``: runs, failed runs,
    model requests and tokens (failed runs included). Counts are of handler runs: an
    input handled again (a retry, a redelivery after a crash) counts again.

    Example:
        >>> LLMStats("summariser", "test").requests
        0
    """

    def __init__(self, agent: str, model: str) -> None:
        self.agent, self.model = agent, model
        self.runs = 0
        self.failures = 0
        self.requests = 0
        self.input_tokens = 0
        self.output_tokens = 0

    def add(self, usage: RunUsage, *, failed: bool) -> None:
        """Count one run and what it used."""
        self.runs += 1
        self.failures += int(failed)
        self.requests += usage.requests
        self.input_tokens += usage.input_tokens
        self.output_tokens += usage.output_tokens


class LLMMetrics(Members[LLMStats]):
    """The LLM agents reported by one metrics registry (a part, see
    :meth:`mesh.runtime.metrics.MeshMetrics.part`), read when Prometheus scrapes:
    ``mesh_llm_tokens_total{agent,kind}`` (input, output), ``mesh_llm_requests_total
    {agent}`` and ``mesh_llm_runs_total{agent,outcome}`` (ok, failed), summed over the
    agents of one name."""

    def collect(self) -> Iterator[Any]:
        tokens = CounterMetricFamily("mesh_llm_tokens", "Tokens of LLM agents' model runs "
                                     "(failed runs included), by kind", labels=["agent", "kind"])
        requests = CounterMetricFamily("mesh_llm_requests", "Model requests of LLM agents "
                                       "that got a response", labels=["agent"])
        runs = CounterMetricFamily("mesh_llm_runs", "Model runs of LLM agents, by outcome "
                                   "(ok, failed)", labels=["agent", "outcome"])
        totals: dict[str, list[int]] = {}
        for stats in self.snapshot():
            total = totals.setdefault(stats.agent, [0, 0, 0, 0, 0])
            for i, count in enumerate((stats.input_tokens, stats.output_tokens,
                                       stats.requests, stats.runs, stats.failures)):
                total[i] += count
        for agent, (tokens_in, tokens_out, requested, ran, failed) in sorted(totals.items()):
            tokens.add_metric([agent, "input"], tokens_in)
            tokens.add_metric([agent, "output"], tokens_out)
            requests.add_metric([agent], requested)
            runs.add_metric([agent, "ok"], ran - failed)
            runs.add_metric([agent, "failed"], failed)
        yield from (tokens, requests, runs)


@dataclass(frozen=True, slots=True)
class _Cause:
    kind: type[BaseException]
    what: str
    retriable: bool
    fix: str


# Most specific first: the first match wins (pydantic-ai's categories subclass each other).
_CAUSES = (
    _Cause(pai.ModelQuotaExceededError, "quota or billing exhausted", False,
           "top up the account or raise its quota, then replay the dead letters"),
    _Cause(pai.ModelRateLimitError, "rate limited", True, ""),
    _Cause(pai.ModelUnavailableError, "provider unavailable", True, ""),
    _Cause(pai.ModelServerError, "provider server error", True, ""),
    _Cause(pai.ModelConnectionError, "connection failed", True, ""),
    _Cause(pai.ModelRequestTimeout, "request timed out", True, ""),
    _Cause(pai.ModelContextWindowExceededError, "input exceeds the context window", False,
           "shorten the prompt or use a model with a larger context window"),
    _Cause(pai.ModelAuthenticationError, "credentials refused", False,
           "check MESH_LLM__API_KEY or the provider's key variable (e.g. "
           "OPENAI_API_KEY) and its access"),
    _Cause(pai.ModelNotFoundError, "model not found", False, "fix the model name"),
    _Cause(pai.ModelRequestRejectedError, "request rejected", False,
           "the same request fails the same way: fix the prompt or the model settings"),
    _Cause(pai.ContentFilterError, "content filter triggered", False,
           "the provider refuses this input; handle it without the model"),
    _Cause(pai.OutputTokenLimitExceeded, "output token limit reached", False,
           "raise max_tokens in model_settings or ask for a shorter output"),
    _Cause(pai.UnexpectedModelBehavior, "output invalid", False,
           "fix the instructions or the output model, or allow more output retries "
           "(retries=)"),
    _Cause(pai.UsageLimitExceeded, "usage limit exceeded", False,
           "raise usage_limits= or shorten the input"),
    _Cause(pai.ConcurrencyLimitExceeded, "too many concurrent runs", True, ""),
    _Cause(TimeoutError, "run timed out", True, ""),  # pydantic-ai's RunTimedOut
    _Cause(pai.UserError, "pydantic-ai refused the configuration", False,
           "fix the agent's pydantic-ai settings"),
)


def classify(error: BaseException) -> tuple[bool, str, str]:
    """Whether a pydantic-ai error is worth another attempt, what it was in a few words
    (with the HTTP status and the provider's error code, never the body), and the fix.

    An HTTP error without a category is retriable for 408, 429 and 5xx; a provider error
    with neither a category nor a status is taken as transient (retriable).

    Example:
        >>> classify(pai.ModelHTTPError(503, "gpt-4o", body="..."))[:2]
        (True, 'provider server error (HTTP 503)')
        >>> classify(pai.ModelHTTPError(400, "gpt-4o", body="..."))[:2]
        (False, 'request rejected (HTTP 400)')
    """
    status = getattr(error, "status_code", None)
    code = getattr(error, "provider_error_code", None)
    tags = ", ".join(str(t) for t in (f"HTTP {status}" if status else None, code) if t)
    for cause in _CAUSES:
        if isinstance(error, cause.kind):
            return cause.retriable, f"{cause.what} ({tags})" if tags else cause.what, cause.fix
    if status is not None:
        retriable = status in (408, 429) or status >= 500
        what = {408: "request timed out", 429: "rate limited"}.get(
            status, "provider server error" if status >= 500 else "request rejected")
        return retriable, f"{what} ({tags})", "" if retriable else (
            "the same request fails the same way: fix the prompt or the model settings")
    if isinstance(error, pai.ModelAPIError):
        return True, "provider error" + (f" ({tags})" if tags else ""), ""
    return False, type(error).__name__, ""


def _detail(error: BaseException) -> str:
    """What pydantic-ai said, without a response body or input values: its message for
    output and usage errors, and the fields that failed validation."""
    if not isinstance(error, pai.UnexpectedModelBehavior | pai.UsageLimitExceeded):
        return ""
    text = error.message.split(". Consider raising")[0][:200]  # drop the docs hint
    cause = error.__cause__
    if isinstance(cause, ValidationError):
        fields = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'output'}: {e['type']}"
                           for e in cause.errors(include_input=False)[:5])
        text += f": {fields}"
    return text


def default_prompt(payload: BaseModel, ctx: Context | None = None) -> str:
    """The payload as JSON, under its model's name: the default prompt.

    Example:
        >>> class Question(BaseModel):
        ...     text: str
        >>> print(default_prompt(Question(text="Why?")))
        Question (JSON):
        {"text":"Why?"}
    """
    return f"{type(payload).__name__} (JSON):\n{payload.model_dump_json()}"


class LLMAgent(Agent[Any]):
    """A mesh agent whose handler runs a pydantic-ai agent; see the module docstring.

    Args:
        name, consumes, produces, retry, group, description: as for
            :class:`~mesh.agent.Agent`.
        model: a pydantic-ai ``Model`` or model name (``"openai:gpt-4o"``, ``"test"``).
        instructions: the system instructions (pydantic-ai ``instructions``).
        prompt: ``(payload, ctx) -> str`` (or awaitable): the user prompt of one input
            (default :func:`default_prompt`).
        output: what the model must return (pydantic-ai ``output_type``); default: the
            produced topic's model (several produced topics: the model chooses one).
        reply: ``(payload, output, ctx) -> payload(s)`` building what the agent
            produces from the model's output (e.g. copying the input's id into it);
            default: the output itself.
        breaker: a :class:`CircuitBreaker`, or a breaker name in ``breakers`` (created
            with ``breaker_policy`` on first use), guarding every model run.
        usage_limits: pydantic-ai ``UsageLimits`` of one run (exceeded: dead letter).
        timeout: seconds one run may take (exceeded: retriable).
        metrics: where :attr:`stats` are served (default: the host's, from
            :meth:`on_start`).
        **model_agent: more pydantic-ai ``Agent`` arguments (``model_settings``,
            ``retries``, ``tools``, ...); tools get the mesh ``Context`` as ``ctx.deps``.
    """

    def __init__(self, name: str, *, consumes: Topic[Any] | Sequence[Topic[Any]],
                 produces: Topic[Any] | Sequence[Topic[Any]], model: Model | str,
                 instructions: Any, prompt: Prompt | None = None, output: Any = None,
                 reply: Reply | None = None, retry: RetryPolicy | None = None,
                 group: str | None = None, description: str = "",
                 breaker: CircuitBreaker | str | None = None,
                 breakers: BreakerRegistry | None = None,
                 breaker_policy: BreakerPolicy | None = None,
                 usage_limits: UsageLimits | None = None, timeout: float | None = None,
                 metrics: MeshMetrics | None = None, **model_agent: Any) -> None:
        super().__init__(name, consumes=consumes, produces=produces, group=group,
                         description=description, retry=retry)
        self.model = model
        self.model_label = model if isinstance(model, str) else model.model_id
        self.prompt: Prompt = prompt or default_prompt
        self.output = output if output is not None else _default_output(self)
        self.reply = reply
        self.usage_limits, self.timeout = usage_limits, timeout
        self.breaker, self._breakers, self._policy = _check_breaker(
            name, breaker, breakers, breaker_policy)
        if reply is None:
            _check_routable(self, self.output)
        self.model_agent = cast("ModelAgent[Context, Any]", ModelAgent(
            model, output_type=self.output, instructions=instructions, name=name,
            defer_model_check=True, **model_agent))
        self.stats = LLMStats(name, self.model_label)
        self._metrics = metrics
        if metrics is not None:
            metrics.part(LLMMetrics).add(self.stats)
        self._resolved: Model | None = model if isinstance(model, Model) else None
        self._settings: Any = None

    async def on_start(self, settings: Any) -> None:
        """Resolve the model (its SDK and key must be there), start the breaker and
        report :attr:`stats` (to the host's metrics unless given others)."""
        self._settings = settings
        metrics = self._metrics or host_metrics()
        if metrics is not None:
            metrics.part(LLMMetrics).add(self.stats)
        self._model()
        if isinstance(self.breaker, CircuitBreaker):
            await self.breaker.start()
        elif self.breaker is not None and self._breakers is not None:
            await self._breakers.get(self.breaker, settings, self._policy)

    async def handle(self, payload: Any, ctx: Context) -> Any:
        """Prompt the model with ``payload``; return its validated output (or what
        ``reply`` builds from it). Model errors raise :class:`LLMError`."""
        text = await _maybe(self.prompt(payload, ctx))
        breaker = await self._breaker(ctx)
        if breaker is None:
            output = await self._run(text, ctx)
        else:
            async with breaker.guard(correlation_id=ctx.correlation_id):
                output = await self._run(text, ctx)
        return output if self.reply is None else await _maybe(self.reply(payload, output, ctx))

    async def _run(self, text: str, ctx: Context) -> Any:
        model, usage, failed = self._model(), RunUsage(), True
        try:
            result = await self.model_agent.run(
                text, deps=ctx, model=model, usage=usage,
                usage_limits=self.usage_limits, timeout=self.timeout)
            failed = False
            return result.output
        except MeshError:
            raise  # the mesh's own (a tool's Held, a forged task): not the model's
        except (pai.AgentRunError, pai.UserError, TimeoutError) as exc:
            # Not chained: a traceback (a log, a trace span's exception event) would print
            # the provider's error, whose body may echo the prompt or part of a key.
            raise self._error(exc) from None
        finally:
            self.stats.add(usage, failed=failed)
            logger.debug("agent %s: model %s, %d request(s), %d input / %d output tokens%s",
                         self.name, self.model_label, usage.requests, usage.input_tokens,
                         usage.output_tokens, " (failed)" if failed else "")

    def _error(self, error: BaseException) -> LLMError:
        retriable, cause, fix = classify(error)
        detail = _detail(error)
        verdict = "retriable" if retriable else f"not retriable: {fix or 'see the cause'}"
        found = LLMError(
            f"LLM agent {self.name!r} (model {self.model_label!r}): {cause}"
            f"{f': {detail}' if detail else ''}. {verdict[0].upper()}{verdict[1:]}.",
            agent=self.name, model=self.model_label, cause=cause.split(" (")[0],
            status=getattr(error, "status_code", None), retriable=retriable)
        found.original = error
        return found

    def _model(self) -> Model:
        if self._resolved is None:
            try:
                self._resolved = infer_model(self.model)
            except (ImportError, pai.UserError, ValueError) as exc:
                raise ConfigError(
                    f"LLM agent {self.name!r}: model {self.model_label!r} cannot be used: "
                    f"{exc} Install the provider's extra (e.g. 'pydantic-ai-slim[openai]') "
                    "and set its API key variable.") from exc
        return self._resolved

    async def _breaker(self, ctx: Context) -> CircuitBreaker | None:
        if self.breaker is None or isinstance(self.breaker, CircuitBreaker):
            return self.breaker
        assert self._breakers is not None  # checked in __init__
        settings = self._settings or getattr(ctx.runner, "settings", None)
        if settings is None:
            raise ConfigError(f"LLM agent {self.name!r}: breaker {self.breaker!r} comes from a "
                              "registry, which needs the mesh settings: start the agent "
                              "(on_start) before handling.")
        return await self._breakers.get(self.breaker, settings, self._policy)


def llm_agent(name: str, *, consumes: Topic[Any] | Sequence[Topic[Any]],
              produces: Topic[Any] | Sequence[Topic[Any]], model: Model | str,
              instructions: Any, prompt: Prompt | None = None, output: Any = None,
              retry: RetryPolicy | None = None, group: str | None = None,
              description: str = "", **kwargs: Any) -> LLMAgent:
    """Declare an LLM agent (see :class:`LLMAgent` for every argument).

    Example:
        >>> class Ticket(BaseModel):
        ...     ticket_id: str
        ...     text: str
        >>> class Triage(BaseModel):
        ...     ticket_id: str
        ...     severity: int
        >>> triage = llm_agent("triage", consumes=Topic("llm.tickets", Ticket),
        ...                    produces=Topic("llm.triage", Triage), model="test",
        ...                    instructions="Rate the severity from 1 to 5.")
        >>> triage.output.__name__
        'Triage'
    """
    return LLMAgent(name, consumes=consumes, produces=produces, model=model,
                    instructions=instructions, prompt=prompt, output=output, retry=retry,
                    group=group, description=description, **kwargs)


def llm(*, consumes: Topic[Any] | Sequence[Topic[Any]],
        produces: Topic[Any] | Sequence[Topic[Any]], model: Model | str, instructions: Any,
        name: str | None = None, **kwargs: Any) -> Callable[[Prompt], LLMAgent]:
    """Declare an LLM agent from its prompt function ``(payload, ctx) -> str``: the
    agent is named after the function and described by its docstring.

    Example:
        >>> class Doc(BaseModel):
        ...     doc_id: str
        ...     text: str
        >>> @llm(consumes=Topic("llm.docs", Doc), produces=Topic("llm.titled", Doc),
        ...      model="test", instructions="Give the document a title.")
        ... def titler(doc: Doc, ctx: Context) -> str:
        ...     '''Titles documents.'''
        ...     return doc.text
        >>> titler.name, titler.description
        ('titler', 'Titles documents.')
    """

    def wrap(prompt: Prompt) -> LLMAgent:
        return LLMAgent(name or str(getattr(prompt, "__name__", "llm")), consumes=consumes,
                        produces=produces, model=model, instructions=instructions,
                        prompt=prompt, description=(prompt.__doc__ or "").strip(), **kwargs)

    return wrap


def model_from_settings(settings: MeshSettings | LlmSettings | None = None) -> Model | None:
    """The pydantic-ai model the deployment configured (``MESH_LLM__*``), or ``None``.

    ``None`` when ``MESH_LLM__MODEL`` is unset: the caller runs without a model (offline).
    Otherwise the model is built by pydantic-ai, with no request sent:

    * ``MESH_LLM__MODEL``: ``provider:name`` as pydantic-ai names it
      (``openai:gpt-4o-mini``, ``anthropic:claude-sonnet-4-0``, ``ollama:llama3.2``,
      ``test``); a name without a provider is taken as ``openai:`` when a base URL is set.
    * ``MESH_LLM__BASE_URL``: the provider's endpoint. With ``openai:`` (or no prefix) the
      model speaks chat completions to it, which every OpenAI-compatible server (vLLM,
      Ollama, LM Studio, gateways) serves; ``ollama:``, ``vllm:``, ``anthropic:``... get
      their own provider at that URL.
    * ``MESH_LLM__API_KEY``: the key, unwrapped here only and handed to the provider's
      client; never in a repr, log, error or event. Unset: the provider's usual variable
      (``OPENAI_API_KEY``, ...), or none for a local endpoint.
    * ``timeout_s``, ``max_tokens``, ``max_retries`` become the model's default
      ``ModelSettings`` (``max_retries`` 0 by default: a 429 or 5xx raises at once and the
      mesh retries through its retry topics).

    Args:
        settings: the mesh settings or their ``llm`` part; default: read from the
            environment (``MeshSettings()``).

    Returns:
        The model, to pass as ``llm_agent(..., model=...)``; ``None`` without one.

    Raises:
        ConfigError: the model cannot be built (an unknown provider, its SDK missing,
            no key), naming the setting and the fix, never the key.

    Example:
        >>> model_from_settings(LlmSettings()) is None
        True
        >>> model = model_from_settings(LlmSettings(
        ...     model="llama3.2", base_url="http://127.0.0.1:11434/v1", api_key="sk-..."))
        >>> model.model_id, model.base_url, model.settings["max_retries"]
        ('openai:llama3.2', 'http://127.0.0.1:11434/v1/', 0)
    """
    llm_settings = _llm_settings(settings)
    if llm_settings.model is None:
        return None
    name = llm_settings.model
    provider_name, model_name = _split(name, with_base_url=llm_settings.base_url is not None)
    arguments: dict[str, str] = {}
    if llm_settings.base_url is not None:
        arguments["base_url"] = llm_settings.base_url
    if llm_settings.api_key is not None:
        arguments["api_key"] = llm_settings.api_key.get_secret_value()
    spec = f"{provider_name}:{model_name}" if provider_name else name
    try:
        model = infer_model(spec, provider_factory=(
            _provider_factory(arguments) if arguments else infer_provider))
    except (ImportError, pai.UserError, ValueError, TypeError) as exc:
        # The provider's message names its variable or extra; it never holds the key.
        raise ConfigError(
            f"MESH_LLM__MODEL={name!r} cannot be used: {str(exc).rstrip('. ')}. "
            "Install the provider's extra (e.g. 'pydantic-ai-slim[openai]'), set "
            "MESH_LLM__API_KEY or the provider's key variable, or fix the name "
            "(provider:model, e.g. openai:gpt-4o-mini).") from None
    model_settings = ModelSettings(timeout=llm_settings.timeout_s,
                                   max_retries=llm_settings.max_retries)
    if llm_settings.max_tokens is not None:
        model_settings["max_tokens"] = llm_settings.max_tokens
    # infer_model takes no settings: these become the model's defaults, as the model
    # classes' own settings= argument would make them (a run's settings still win).
    model._settings = {**(model.settings or {}), **model_settings}
    logger.debug("LLM model %s from the settings (base URL %s, key %s)", model.model_id,
                 llm_settings.base_url or "the provider's",
                 "set" if llm_settings.api_key is not None else "from the environment")
    return model


def _split(name: str, *, with_base_url: bool) -> tuple[str, str]:
    """``provider:model`` as pydantic-ai splits it; with a base URL, a name without a
    known provider (``llama3.2:8b``) and ``openai:`` mean chat completions, which
    OpenAI-compatible servers speak (``openai:`` alone would be OpenAI's Responses API)."""
    provider_name, _, model_name = name.partition(":")
    if not model_name:
        provider_name, model_name = "", name
    if with_base_url:
        if provider_name and provider_name != "test":
            try:
                infer_provider_class(provider_name)
            except ValueError:  # not a provider: part of the served model's name
                provider_name, model_name = "", name
        if provider_name in ("", "openai"):
            provider_name = "openai-chat"
    return provider_name, model_name


def _llm_settings(settings: MeshSettings | LlmSettings | None) -> LlmSettings:
    if settings is None:
        return MeshSettings().llm
    return settings if isinstance(settings, LlmSettings) else settings.llm


def _provider_factory(arguments: dict[str, str]) -> Callable[[str], Provider[Any]]:
    def build(provider_name: str) -> Provider[Any]:
        try:
            return infer_provider_class(provider_name)(**arguments)
        except TypeError:  # the provider takes no base_url/api_key (bedrock, vertex, ...)
            given = " and ".join(f"MESH_LLM__{a.upper()}" for a in arguments)
            raise ConfigError(
                f"MESH_LLM__MODEL provider {provider_name!r} takes no {given}: unset "
                "it and configure the provider through its own variables, or use "
                "openai:<model> for an OpenAI-compatible endpoint.") from None
    return build


async def _maybe(value: Any) -> Any:
    return await value if inspect.isawaitable(value) else value


def _default_output(agent: Agent[Any]) -> Any:
    models = list(dict.fromkeys(t.model for t in agent.produces))
    if not models:
        raise ConfigError(f"LLM agent {agent.name!r} produces nothing: pass produces=<Topic> "
                          "(its model is what the model must return).")
    return models[0] if len(models) == 1 else models


def _check_routable(agent: Agent[Any], output: Any) -> None:
    """Without ``reply``, the output goes to the produced topic carrying its type: each
    output type must be the model of exactly one produced topic."""
    types = output if isinstance(output, list | tuple) else [output]
    for each in types:
        if not isinstance(each, type):
            continue  # a pydantic-ai output marker (NativeOutput, ...): checked per output
        carriers = [t.name for t in agent.produces if issubclass(each, t.model)]
        if len(carriers) != 1:
            produced = ", ".join(f"{t.name} ({t.model.__name__})" for t in agent.produces)
            raise ConfigError(
                f"LLM agent {agent.name!r}: output {each.__name__} is carried by "
                f"{len(carriers)} of its produced topics ({produced}), not one. Pass reply= "
                "to build the produced payload from the model's output.")


def _check_breaker(name: str, breaker: CircuitBreaker | str | None,
                   breakers: BreakerRegistry | None, policy: BreakerPolicy | None
                   ) -> tuple[CircuitBreaker | str | None, BreakerRegistry | None,
                              BreakerPolicy | None]:
    if isinstance(breaker, str) and breakers is None:
        raise ConfigError(f"LLM agent {name!r}: breaker={breaker!r} names a breaker but no "
                          "registry holds it: pass breakers=BreakerRegistry(...) too, or a "
                          "CircuitBreaker.")
    if isinstance(breaker, CircuitBreaker) and (breakers is not None or policy is not None):
        raise ConfigError(f"LLM agent {name!r}: breaker= is a CircuitBreaker, which has its "
                          "own policy and state: drop breakers= and breaker_policy=.")
    if breaker is None and (breakers is not None or policy is not None):
        raise ConfigError(f"LLM agent {name!r}: breakers= or breaker_policy= without "
                          "breaker=<name>: name the breaker that guards the model.")
    return breaker, breakers, policy
