"""The fan-in (mesh.patterns.gather) on a real broker: rules, deadlines, failures, late
parts, mergers, retention, parts before their request, and fan-out branches.

One mesh runs a gather per behaviour on shared request and parts topics (each gather
has its own state topic); tests inject requests and parts directly, so they choose who
answers, how and in which order.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from mesh import Codec, Mesh, Topic, apply_topics
from mesh.envelope import derive_event_id
from mesh.errors import ConfigError, HandlerError
from mesh.patterns.gather import (
    Gather,
    GatherRule,
    GatherState,
    GatherTopics,
    Part,
    branch,
    concat,
)
from mesh.state import CompactedTable
from tests.apps.gather import Ask, GatherWatch, part_record, request_record, topics_for
from tests.conftest import BrokerUnderTest
from tests.support import inject, read_all

BRANCHES = ["a", "b", "c"]


def confident(result: Any) -> bool:
    return float(result.get("score", 0)) >= 0.5


def total(results: list[Any]) -> dict[str, Any]:
    return {"total": sum(r["score"] for r in results), "count": len(results)}


def broken(results: list[Any]) -> Any:
    raise ValueError("cannot merge")


GATHERS: dict[str, dict[str, Any]] = {
    "all": {}, "any": {"rule": "any"}, "two": {"rule": GatherRule.k_of_n(2)},
    "valid": {"rule": GatherRule.first_valid(confident)}, "quick": {"deadline_s": 1.5},
    "custom": {"merger": total}, "broken": {"merger": broken}, "short": {"retention_s": 1.0},
}


@dataclass
class Rig:
    """The running gathers, their topics and a watch on their output."""

    mesh: Mesh
    shared: GatherTopics
    watch: GatherWatch
    codec: Codec

    async def ask(self, cid: str, **fields: Any) -> None:
        await inject(self.mesh.settings, [request_record(
            self.codec, self.shared, Ask(request_id=cid, question=cid, **fields))])

    async def part(self, cid: str, agent: str, *, error: str | None = None,
                   **result: Any) -> None:
        part = Part(correlation_id=cid, agent=agent, ok=error is None,
                    result=result or None, error=error, error_class="ValueError"
                    if error else None)
        await inject(self.mesh.settings, [part_record(self.codec, self.shared, part)])

    async def asked(self, cid: str, *gathers: str, **fields: Any) -> None:
        """Send the request and wait until ``gathers`` have started it."""
        await self.ask(cid, **fields)
        for name in gathers:
            await self.watch.event(name, cid, "started")

    def table(self, gather: str) -> Any:
        """The gather's state table, as its runner holds it."""
        runner = next(r for r in self.mesh.runners if r.agent.name == gather)
        [table] = runner.tables.values()
        return table


def cid() -> str:
    return f"c-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
async def rig(broker: BrokerUnderTest) -> AsyncIterator[Rig]:
    prefix = f"t{uuid.uuid4().hex[:10]}"
    shared = topics_for(prefix)
    gathers = []
    for name, options in GATHERS.items():
        topics = GatherTopics(shared.requests, shared.parts, shared.merged, shared.events,
                              Topic(f"{prefix}.state-{name}", GatherState,
                                    key="correlation_id", compacted=True))
        gathers.append(Gather(name, topics=topics, group=f"{prefix}-{name}",
                              branches=lambda ask: ask.branches or BRANCHES,
                              deadline_of=lambda ask: ask.deadline_s, check_every_s=0.2,
                              **{"deadline_s": 600.0, **options}))
    settings = broker.settings()
    await apply_topics(settings.kafka, [t for g in gathers for t in g.topics.all()])
    async with Mesh(settings, gathers) as mesh, GatherWatch(settings, shared) as watch:
        await mesh.wait_assigned()
        yield Rig(mesh, shared, watch, Codec())


async def until(check: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    """Wait on a condition of in-process state (tables), with a deadline."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"not within {timeout:.0f} s: {what}"
        await asyncio.sleep(0.05)


async def test_all_waits_for_every_branch_and_concatenates_in_arrival_order(rig: Rig) -> None:
    """Pass: rule all completes once a, b and c answered; merged_output concatenates the
    results in arrival order; success; the tap saw started, 3 parts, completed; the done
    marker drops the merged event once it was read back from the merged topic."""
    c = cid()
    await rig.asked(c, "all")
    for n, agent in enumerate(["b", "a"]):
        await rig.part(c, agent, score=n)
        await rig.watch.event("all", c, "part_received", agent=agent)
    assert not rig.watch.merged.get(("all", c))
    await rig.part(c, "c", score=2)
    merged = await rig.watch.merged_of("all", c)
    assert merged.success and merged.outcome == "completed" and merged.rule == "all"
    assert merged.successes == ["b", "a", "c"] and not merged.failures and not merged.timed_out
    assert merged.merged_output == [{"score": 0}, {"score": 1}, {"score": 2}]
    assert merged.individual_results == [{"score": 0}, {"score": 1}, {"score": 2}]
    await rig.watch.event("all", c, "completed")  # events topic: maybe a fetch after merged
    kinds = rig.watch.kinds("all", c)
    assert kinds.count("part_received") == 3 and kinds[0] == "started" and "completed" in kinds
    table = rig.table("all")
    await until(lambda: table.get(c) is not None and table.get(c).merged is None,
                "done marker shrunk after the merged event was read back")
    assert table.get(c).status == "done" and table.get(c).answered == ["b", "a", "c"]


async def test_all_lists_failures_with_agent_and_error_and_fails(rig: Rig) -> None:
    """Pass: a failed branch is listed with its agent, error and class, the others are
    merged, and success is false (the seed: success means no failures)."""
    c = cid()
    await rig.asked(c, "all")
    await rig.part(c, "a", score=1)
    await rig.part(c, "b", error="search API said no")
    await rig.part(c, "c", score=3)
    merged = await rig.watch.merged_of("all", c)
    assert not merged.success and merged.outcome == "completed"
    assert [(f.agent, f.error, f.error_class) for f in merged.failures] == [
        ("b", "search API said no", "ValueError")]
    assert merged.successes == ["a", "c"] and merged.merged_output == [{"score": 1}, {"score": 3}]


async def test_any_completes_on_the_first_success_not_on_a_failure(rig: Rig) -> None:
    """Pass: a failure alone does not complete rule any; the first success does, with
    the earlier failure listed; when every branch fails, it completes unsuccessfully."""
    c = cid()
    await rig.asked(c, "any")
    await rig.part(c, "a", error="down")
    await rig.watch.event("any", c, "part_received", agent="a")
    assert not rig.watch.merged.get(("any", c))
    await rig.part(c, "b", score=1)
    merged = await rig.watch.merged_of("any", c)
    assert merged.success and merged.successes == ["b"] and merged.rule == "any"
    assert [f.agent for f in merged.failures] == ["a"] and not merged.timed_out
    lost = cid()
    await rig.asked(lost, "any", branches=["a", "b"])
    await rig.part(lost, "a", error="down")
    await rig.part(lost, "b", error="down too")
    merged = await rig.watch.merged_of("any", lost)
    assert not merged.success and [f.agent for f in merged.failures] == ["a", "b"]


async def test_k_of_n_completes_at_k_successes_or_when_k_is_out_of_reach(rig: Rig) -> None:
    """Pass: 2 of 3 completes at the second success (a failure in between is listed);
    with two failures it completes at once, unsuccessfully, without waiting for c."""
    c = cid()
    await rig.asked(c, "two")
    await rig.part(c, "a", score=1)
    await rig.part(c, "b", error="nope")
    await rig.watch.event("two", c, "part_received", agent="b")
    assert not rig.watch.merged.get(("two", c))
    await rig.part(c, "c", score=2)
    merged = await rig.watch.merged_of("two", c)
    assert merged.success and merged.rule == "2 of 3" and merged.successes == ["a", "c"]
    assert [f.agent for f in merged.failures] == ["b"]
    out = cid()
    await rig.asked(out, "two")
    await rig.part(out, "a", error="x")
    await rig.part(out, "b", error="y")
    merged = await rig.watch.merged_of("two", out)
    assert not merged.success and not merged.successes and not merged.timed_out
    assert [f.agent for f in merged.failures] == ["a", "b"]


async def test_first_valid_skips_results_the_validator_rejects(rig: Rig) -> None:
    """Pass: a result the validator rejects is listed as a failure ("rejected by
    confident"); the first accepted one completes the request with its result only."""
    c = cid()
    await rig.asked(c, "valid")
    await rig.part(c, "a", score=0.2)
    await rig.watch.event("valid", c, "part_received", agent="a")
    assert not rig.watch.merged.get(("valid", c))
    await rig.part(c, "b", score=0.9)
    merged = await rig.watch.merged_of("valid", c)
    assert merged.success and merged.rule == "first_valid"
    assert merged.successes == ["b"] and merged.merged_output == [{"score": 0.9}]
    assert [(f.agent, f.error, f.error_class) for f in merged.failures] == [
        ("a", "rejected by confident", "Rejected")]


async def test_deadline_of_the_request_lists_the_agents_that_did_not_answer(rig: Rig) -> None:
    """Pass: with a 1 s deadline on the request (the gather's default is 600 s), the
    gather emits what it has: a's result, b's failure, c timed out; success false.
    (The parts go first so that they are in the log before any deadline marker.)"""
    c = cid()
    await rig.part(c, "a", score=1)
    await rig.part(c, "b", error="broken")
    await rig.ask(c, deadline_s=1.0)
    merged = await rig.watch.merged_of("all", c)
    assert merged.outcome == "timed_out" and not merged.success
    assert merged.timed_out == ["c"] and merged.successes == ["a"]
    assert [f.agent for f in merged.failures] == ["b"]
    # the event goes to another topic than the merged one: it may come a fetch later
    await rig.watch.event("all", c, "timed_out")


async def test_default_deadline_of_the_builder_times_out_silent_branches(rig: Rig) -> None:
    """Pass: the quick gather's default deadline (1.5 s) ends a request only a answers;
    b and c are listed as timed out."""
    c = cid()
    await rig.part(c, "a", score=1)
    await rig.ask(c)
    merged = await rig.watch.merged_of("quick", c)
    assert merged.outcome == "timed_out" and merged.timed_out == ["b", "c"]
    assert merged.successes == ["a"] and not merged.success


async def test_late_part_is_counted_and_ignored_without_a_second_merged_event(
        rig: Rig) -> None:
    """Pass: after rule any completed on a, b's part is a late_part event, counted in the
    done marker; the merged topic holds exactly one merged event for the request."""
    c = cid()
    await rig.asked(c, "any")
    await rig.part(c, "a", score=1)
    first = await rig.watch.merged_of("any", c)
    await rig.part(c, "b", score=2)
    await rig.part(c, "b", score=2)  # the same branch twice: counted once
    await rig.watch.event("any", c, "late_part", agent="b")
    table = rig.table("any")
    await until(lambda: table.get(c) is not None and table.get(c).late == ["b"], "late count")
    records = await read_all(rig.mesh.settings, [rig.shared.merged.name])
    ours = [r for r in records if r.key == c.encode()
            and (await rig.codec.decode(rig.shared.merged, r.value or b"")).gather == "any"]
    assert len({dict(r.headers)["mesh-event-id"] for r in ours}) == 1
    assert len(rig.watch.merged[("any", c)]) == 1 and first.successes == ["a"]


async def test_part_before_its_request_waits_for_the_request(rig: Rig) -> None:
    """Pass: parts that arrive before their request are kept (no merged event yet); the
    request completes them at once; a part of a branch the request does not expect is
    ignored, visibly."""
    c = cid()
    for agent in ("a", "b", "z"):
        await rig.part(c, agent, score=1)
        await rig.watch.event("all", c, "part_received", agent=agent)
    assert not rig.watch.merged.get(("all", c))
    await rig.ask(c, branches=["a", "b"])
    merged = await rig.watch.merged_of("all", c)
    assert merged.success and merged.successes == ["a", "b"]
    await rig.watch.event("all", c, "part_ignored", agent="z")


async def test_custom_merger_builds_the_output_and_a_failing_one_is_listed(rig: Rig) -> None:
    """Pass: the custom merger's output is merged_output; a merger that raises leaves
    merged_output empty, lists the gather itself as failed with the error, success
    false."""
    c = cid()
    await rig.asked(c, "custom", "broken")
    for agent, score in (("a", 1), ("b", 2), ("c", 4)):
        await rig.part(c, agent, score=score)
    merged = await rig.watch.merged_of("custom", c)
    assert merged.success and merged.merged_output == {"total": 7, "count": 3}
    bad = await rig.watch.merged_of("broken", c)
    assert not bad.success and bad.merged_output is None and len(bad.successes) == 3
    assert [(f.agent, f.error) for f in bad.failures] == [
        ("broken", "merger broken failed: cannot merge")]


async def test_done_markers_and_orphan_parts_are_tombstoned_after_retention(
        rig: Rig) -> None:
    """Pass: with retention 1 s, a completed request's done marker and a part whose
    request never came are deleted (expired events; tombstones on the state topic)."""
    done, orphan = cid(), cid()
    await rig.asked(done, "short", branches=["a"])
    await rig.part(done, "a", score=1)
    await rig.part(orphan, "b", score=1)
    await rig.watch.merged_of("short", done)
    for c in (done, orphan):
        await rig.watch.event("short", c, "expired")
    table = rig.table("short")
    await until(lambda: done not in table and orphan not in table, "rows deleted")
    records = await read_all(rig.mesh.settings, [table.topic.name])
    last = {r.key: r.value for r in sorted(records, key=lambda r: r.offset)}
    assert last[done.encode()] is None and last[orphan.encode()] is None
    rebuilt = CompactedTable(table.topic, rig.mesh.settings.kafka, Codec())
    await rebuilt.restore()
    assert done not in rebuilt and orphan not in rebuilt


async def test_branches_turn_worker_results_and_failures_into_parts(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: three branches from plain functions answer each request with deterministic
    part ids; an error the worker says not to retry (HandlerError(retriable=False)) is a
    failure part (agent, error, class) and no dead letter; any other error, retried
    until the attempts run out, is a failure part too (and the request is dead-lettered
    for that branch); the gather lists both."""
    topics = topics_for(prefix)

    def web(ask: Ask) -> dict[str, Any]:
        return {"findings": [f"web on {ask.question}"]}

    async def db(ask: Ask) -> list[str]:
        if "bad" in ask.question:
            raise HandlerError(f"no table for {ask.question!r}", retriable=False)
        return [f"row for {ask.question}"]

    def net(ask: Ask) -> str:
        if "outage" in ask.question:
            raise ConnectionError("upstream unreachable")
        return "ok"

    branches = [branch(n, f, topics=topics, group=f"{prefix}-{n}")
                for n, f in (("web", web), ("db", db), ("net", net))]
    fan_in = Gather("fan-in", topics=topics, branches=branches, group=f"{prefix}-fan-in")
    settings = broker.settings()
    await apply_topics(settings.kafka, topics.all())
    codec = Codec()
    asks = [Ask(request_id=f"{prefix}-{q}", question=q) for q in ("good", "bad", "outage")]
    records = [request_record(codec, topics, a) for a in asks]
    async with Mesh(settings, [*branches, fan_in]) as mesh, GatherWatch(settings, topics) as w:
        await mesh.wait_assigned()
        await inject(settings, records)
        good, bad, outage = [await w.merged_of("fan-in", a.request_id) for a in asks]
    assert good.success and dict(zip(good.successes, good.individual_results, strict=True)) == {
        "web": {"findings": ["web on good"]}, "db": ["row for good"], "net": "ok"}
    assert sorted(map(str, good.merged_output)) == sorted(  # concat flattens db's list
        ["{'findings': ['web on good']}", "row for good", "ok"])
    assert [(f.agent, f.error_class) for f in bad.failures] == [("db", "HandlerError")]
    assert "no table for 'bad'" in bad.failures[0].error and not bad.success
    assert [(f.agent, f.error, f.error_class) for f in outage.failures] == [
        ("net", "upstream unreachable", "ConnectionError")]
    dead = await read_all(settings, [topics.requests.dlq_name])
    assert [dict(r.headers)["mesh-dlq-agent"] for r in dead] == [b"net"]
    parts = [r for r in await read_all(settings, [topics.parts.name])
             if dict(r.headers)["mesh-source"] == b"web"]
    request_ids = {dict(r.headers)["mesh-correlation"]: dict(r.headers)["mesh-event-id"]
                   for r in records}
    assert {dict(r.headers)["mesh-event-id"].decode() for r in parts} == {
        derive_event_id("web", eid.decode(), 0) for eid in request_ids.values()}


def test_rule_and_builder_errors_name_the_value_and_the_fix(prefix: str) -> None:
    """Pass: impossible rules and wiring fail at declaration with a clear message."""
    topics = topics_for(prefix)
    with pytest.raises(ConfigError, match="first_valid"):
        GatherRule("first_valid")
    with pytest.raises(ConfigError, match="k >= 1"):
        GatherRule.k_of_n(0)
    with pytest.raises(ConfigError, match="k at most"):
        Gather("g", topics=topics, branches=["a"], rule=GatherRule.k_of_n(2))
    wrong = GatherTopics(topics.requests, topics.parts, topics.merged, topics.events,
                         Topic(f"{prefix}.s", GatherState, key=None, compacted=True))
    with pytest.raises(ConfigError, match="keyed by 'correlation_id'"):
        Gather("g", topics=wrong, branches=["a"])
    assert concat([[1], 2, [3, 4]]) == [1, 2, 3, 4]
