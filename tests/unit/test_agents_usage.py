"""What a writing step's model calls cost, without a broker: pydantic-ai's prices for a
model it knows, 0 for one it does not, and the specialist reporting tokens, calls and
cost to the coordinator."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic_ai.messages import ModelRequest, ModelResponse, TextPart, UserPromptPart
from pydantic_ai.usage import RequestUsage

import agents.step
from agents.brain import Usage
from agents.model_brain import cost_of


def answer(model: str | None, input_tokens: int = 1_000, output_tokens: int = 100
           ) -> ModelResponse:
    return ModelResponse(parts=[TextPart("hi")], model_name=model, usage=RequestUsage(
        input_tokens=input_tokens, output_tokens=output_tokens))


def test_cost_is_the_sum_of_the_priced_answers_and_0_for_a_model_without_a_price() -> None:
    """Pass: two gpt-4o-mini answers cost twice one (0.15 USD per million input tokens,
    0.60 per million output), the request between them nothing; an unknown model, an
    answer without a model name cost 0 without raising.
    Fail: a cost of 0 for a known model, or an exception for an unknown one."""
    one = cost_of([answer("gpt-4o-mini")])
    assert one == pytest.approx(1_000 * 0.15e-6 + 100 * 0.60e-6)
    asked = ModelRequest(parts=[UserPromptPart("write")])
    assert cost_of([asked, answer("gpt-4o-mini"), asked, answer("gpt-4o-mini")]) == (
        pytest.approx(2 * one))
    assert cost_of([answer("my-local-llama"), answer(None), asked]) == 0.0
    assert cost_of([answer("my-local-llama"), answer("gpt-4o-mini")]) == pytest.approx(one)


def test_report_passes_tokens_calls_and_cost_to_the_coordinator(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Pass: a step's usage goes to record_usage with its cost; an offline step (no
    calls, no tokens, no cost) records nothing.
    Fail: the cost is dropped."""
    recorded: list[dict[str, Any]] = []
    monkeypatch.setattr(agents.step, "record_usage",
                        lambda **kw: recorded.append(kw) or True)
    agents.step.report(Usage(brain="model", calls=2, input_tokens=100, output_tokens=20,
                             cost=0.000027))
    agents.step.report(Usage())
    assert recorded == [{"tokens": 120, "calls": 2, "cost": 0.000027}]
