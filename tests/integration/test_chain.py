"""The sequential chain pattern (mesh.patterns.chain) on a real broker: what a finished
chain carries, what a failed one reports, and that other keys keep flowing."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any

from pydantic import BaseModel

from mesh import Agent, Codec, Context, Envelope, Mesh, apply_topics
from mesh.kafka.base import OutRecord, Record
from mesh.patterns.chain import Chain, ChainCompleted, ChainHistory
from mesh.topic import Topic
from tests.conftest import BrokerUnderTest
from tests.support import inject, read_all, wait_for_count


class Request(BaseModel):
    request_id: str
    seq: int
    subject: str


class Research(BaseModel):
    request_id: str
    seq: int
    facts: list[str]


class Analysis(BaseModel):
    request_id: str
    seq: int
    insight: str


class Review(BaseModel):
    request_id: str
    seq: int
    verdict: str


def build(prefix: str, attempts: Counter[str]) -> Chain:
    """research -> analyse -> review; "poison" fails analyse (not retriable),
    "slowpoke" times out in review on every attempt (retriable, so retried first)."""

    async def research(req: Request, ctx: Context) -> Research:
        return Research(request_id=req.request_id, seq=req.seq,
                        facts=[f"{req.subject} fact {n}" for n in range(2)])

    async def analyse(found: Research, ctx: Context) -> Analysis:
        if any("poison" in f for f in found.facts):
            raise ValueError(f"cannot analyse poisoned findings of {found.request_id}")
        return Analysis(request_id=found.request_id, seq=found.seq,
                        insight=f"{len(found.facts)} facts")

    async def review(analysis: Analysis, ctx: Context) -> Review:
        attempts[ctx.correlation_id] += 1
        if analysis.insight.startswith("2") and analysis.seq == 99:
            raise TimeoutError("reviewer did not answer")
        return Review(request_id=analysis.request_id, seq=analysis.seq,
                      verdict=f"ok: {analysis.insight}")

    return Chain(prefix, [research, analyse, review], key="request_id", partitions=3)


def requests_for(keys: int, per_key: int) -> list[Request]:
    return [Request(request_id=f"k{k}", seq=s, subject=f"subject {k}/{s}")
            for s in range(per_key) for k in range(keys)]


def encode(codec: Codec, topic: Topic[Any], req: Request) -> tuple[OutRecord, str]:
    env = Envelope.new(req, source="test", key=topic.key_of(req))
    value, fingerprint = codec.encode(topic, req)
    headers = env.with_payload(req, schema=fingerprint).headers()
    return OutRecord(topic.name, value, env.key, tuple(headers)), env.correlation_id


def correlation(record: Record) -> str:
    return dict(record.headers)["mesh-correlation"].decode()


async def decoded(codec: Codec, topic: Topic[Any], records: list[Record]) -> list[Any]:
    ordered = sorted(records, key=lambda r: (r.partition, r.offset))
    return [await codec.decode(topic, r.value or b"") for r in ordered]


def assert_key_order(done: list[ChainCompleted], chain: Chain) -> None:
    seqs: dict[str, list[int]] = defaultdict(list)
    for item in done:  # already in (partition, offset) order; a key sits in one partition
        seqs[item.key].append(chain.output(item.outputs, 0).seq)
    for key, seen in seqs.items():
        assert seen == sorted(seen), f"key {key} out of order: {seen}"


async def test_completed_chain_carries_every_step_output_in_order_with_step_events(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: every request ends as one ChainCompleted whose outputs are steps 0, 1, 2 in
    order (typed back into Research, Analysis, Review), with the request's correlation
    id; per key, completions come in request order; each request has started and
    finished events for all three steps."""
    chain = build(prefix, Counter())
    settings = broker.settings()
    await apply_topics(settings.kafka, chain.topics)
    codec = Codec()
    reqs = requests_for(keys=4, per_key=6)
    sent = [encode(codec, chain.source, r) for r in reqs]
    async with Mesh(settings, chain.agents) as mesh:
        await mesh.wait_assigned()
        await inject(settings, [record for record, _ in sent])
        records = await wait_for_count(settings, [chain.completed.name], len(reqs))
    done = await decoded(codec, chain.completed, records)
    assert sorted(d.correlation_id for d in done) == sorted(c for _, c in sent)
    assert all(correlation(r) == codec_done.correlation_id
               for r, codec_done in zip(sorted(records, key=lambda r: (r.partition, r.offset)),
                                        done, strict=True))
    for item in done:
        assert [o.index for o in item.outputs] == [0, 1, 2]
        assert [o.agent for o in item.outputs] == [f"{prefix}.{s}"
                                                   for s in ("research", "analyse", "review")]
        research, analysis, review = (chain.output(item.outputs, i) for i in range(3))
        assert isinstance(research, Research) and research.request_id == item.key
        assert analysis == Analysis(request_id=item.key, seq=research.seq, insight="2 facts")
        assert review.verdict == "ok: 2 facts" and item.result == review.model_dump()
        assert item.input["seq"] == research.seq
    assert_key_order(done, chain)
    events = await decoded(codec, chain.events, await read_all(settings, [chain.events.name]))
    seen = Counter((e.correlation_id, e.step, e.status) for e in events)
    for _, corr in sent:
        for step in range(3):
            assert seen[(corr, step, "started")] >= 1 and seen[(corr, step, "finished")] >= 1
    assert not [e for e in events if e.status == "failed"]


async def test_step_failing_for_good_emits_one_chain_failed_with_partial_results(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: the request that fails at step 2 (analyse) gives exactly one ChainFailed
    naming step index 1 and its agent, the error, and step 0's output as partial
    results, and nothing on the completed topic; one timing out in review on every
    attempt fails after exactly 3 attempts with partial results of steps 0 and 1;
    every other request (also later ones of the same keys) completes, in key order."""
    attempts: Counter[str] = Counter()
    chain = build(prefix, attempts)
    settings = broker.settings()
    await apply_topics(settings.kafka, chain.topics)
    codec = Codec()
    reqs = requests_for(keys=3, per_key=5)
    poison = Request(request_id="k1", seq=2, subject="poison")
    slow = Request(request_id="k2", seq=99, subject="slow")
    reqs = [poison if (r.request_id, r.seq) == ("k1", 2) else r for r in reqs]
    reqs.insert(7, slow)
    sent = [encode(codec, chain.source, r) for r in reqs]
    corr = {(r.request_id, r.seq): c for r, (_, c) in zip(reqs, sent, strict=True)}
    async with Mesh(settings, chain.agents) as mesh:
        await mesh.wait_assigned()
        await inject(settings, [record for record, _ in sent])
        completed = await wait_for_count(settings, [chain.completed.name], len(reqs) - 2)
        failures = await wait_for_count(settings, [chain.failed.name], 2)
    done = await decoded(codec, chain.completed, completed)
    assert {d.correlation_id for d in done} == {c for _, c in sent} - {
        corr[("k1", 2)], corr[("k2", 99)]}
    assert_key_order(done, chain)
    failed = {f.correlation_id: f for f in await decoded(codec, chain.failed, failures)}
    assert len(failures) == 2 and set(failed) == {corr[("k1", 2)], corr[("k2", 99)]}

    bad = failed[corr[("k1", 2)]]
    assert (bad.failed_step, bad.failed_step_name, bad.failed_agent) == (
        1, "analyse", f"{prefix}.analyse")
    assert bad.error_class == "ValueError" and "cannot analyse poisoned" in bad.error
    assert [o.index for o in bad.partial_results] == [0]
    assert chain.output(bad.partial_results, 0) == Research(
        request_id="k1", seq=2, facts=["poison fact 0", "poison fact 1"])
    assert bad.input == poison.model_dump() and bad.key == "k1"

    timed_out = failed[corr[("k2", 99)]]
    assert (timed_out.failed_step, timed_out.error_class) == (2, "TimeoutError")
    assert [o.index for o in timed_out.partial_results] == [0, 1]
    assert attempts[corr[("k2", 99)]] == 3

    finals = await read_all(settings, [chain.completed.name])
    assert not {correlation(r) for r in finals} & set(failed)
    events = await decoded(codec, chain.events, await read_all(settings, [chain.events.name]))
    failed_events = [(e.correlation_id, e.step, e.agent) for e in events if e.status == "failed"]
    assert sorted(failed_events) == sorted([(corr[("k1", 2)], 1, f"{prefix}.analyse"),
                                            (corr[("k2", 99)], 2, f"{prefix}.review")])
    assert len(await read_all(settings, [chain.hops[0].dlq_name])) == 1
    assert len(await read_all(settings, [chain.hops[1].dlq_name])) == 1


async def test_chain_of_agents_uses_their_handlers_and_models(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: agents declared for plain wiring become chain steps (their handlers run,
    their topics' models type the outputs) and the chain completes."""
    from examples.chain_fanout import editor, researcher, writer
    from topics.demo import Article, ResearchRequest

    chain = Chain(prefix, [researcher, writer, editor], key="request_id", partitions=2)
    assert chain.source.model is ResearchRequest
    settings = broker.settings()
    await apply_topics(settings.kafka, chain.topics)
    codec = Codec()
    req = ResearchRequest(request_id="r1", subject="compacted topics")
    env = Envelope.new(req, source="test", key=b"r1")
    value, fingerprint = codec.encode(chain.source, req)
    async with Mesh(settings, chain.agents) as mesh:
        await mesh.wait_assigned()
        await inject(settings, [OutRecord(chain.source.name, value, b"r1",
                                          tuple(env.with_payload(req, fingerprint).headers()))])
        records = await wait_for_count(settings, [chain.completed.name], 1)
    (done,) = await decoded(codec, chain.completed, records)
    article = chain.output(done.outputs, 2)
    assert isinstance(article, Article) and article.title == "On Compacted Topics"
    assert [o.model for o in done.outputs] == ["Findings", "Draft", "Article"]
    assert done.correlation_id == env.correlation_id


async def test_a_step_taking_a_third_argument_sees_every_earlier_output(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: the last step of research -> analyse -> review takes a ChainHistory and
    reads the chain's input, the research two steps back (typed as Research, by name
    and by index), the previous output, and the seed's accumulated dict (the input's
    fields, step_0_output, step_1_output, previous_output); the two-argument steps run
    as before."""
    seen: list[ChainHistory] = []

    async def research(req: Request, ctx: Context) -> Research:
        return Research(request_id=req.request_id, seq=req.seq, facts=[req.subject])

    async def analyse(found: Research, ctx: Context) -> Analysis:
        return Analysis(request_id=found.request_id, seq=found.seq, insight="1 fact")

    async def review(analysis: Analysis, ctx: Context, history: ChainHistory) -> Review:
        seen.append(history)
        found = history.output("research")
        assert isinstance(found, Research) and history.output(0) == found
        return Review(request_id=analysis.request_id, seq=analysis.seq,
                      verdict=f"{analysis.insight} on {found.facts[0]} "
                              f"(asked: {history.input['subject']})")

    chain = Chain(prefix, [research, analyse, review], key="request_id", partitions=2)
    settings, codec = broker.settings(), Codec()
    await apply_topics(settings.kafka, chain.topics)
    req = Request(request_id="k1", seq=0, subject="compaction")
    record, _ = encode(codec, chain.source, req)
    async with Mesh(settings, chain.agents) as mesh:
        await mesh.wait_assigned()
        await inject(settings, [record])
        records = await wait_for_count(settings, [chain.completed.name], 1)
    (done,) = await decoded(codec, chain.completed, records)
    assert chain.output(done.outputs, 2).verdict == "1 fact on compaction (asked: compaction)"
    history = seen[-1]
    assert [o.step for o in history.outputs] == ["research", "analyse"]
    assert history.previous_output == {"request_id": "k1", "seq": 0, "insight": "1 fact"}
    assert history.as_dict() == {
        "request_id": "k1", "seq": 0, "subject": "compaction",
        "step_0_output": {"request_id": "k1", "seq": 0, "facts": ["compaction"]},
        "step_1_output": history.previous_output, "previous_output": history.previous_output}


class Reviewer(Agent[Analysis]):
    """An agent overriding handle(): its history comes from its context too."""

    seen: list[ChainHistory]

    async def handle(self, payload: Analysis, ctx: Context) -> Review:
        history = ChainHistory.of(ctx)
        self.seen.append(history)
        found = history.output("research")
        return Review(request_id=payload.request_id, seq=payload.seq,
                      verdict=f"{payload.insight} on {found.facts[0]} "
                              f"(asked: {history.input['subject']}; "
                              f"saw {', '.join(o.step for o in history.outputs)})")


async def test_an_agent_step_reads_every_earlier_output_from_its_context(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: in research -> analyser -> reviewer, where analyser (handler=) and reviewer
    (a subclass overriding handle) are Agents with (payload, ctx) handlers,
    ChainHistory.of(ctx) gives the reviewer the chain's input, the research two steps
    back (typed as Research, by name and by index), the analysis as previous output and
    the seed's accumulated dict (the input's fields, step_0_output, step_1_output,
    previous_output), and gives the analyser step 0's output only; the completed event
    carries the verdict the reviewer built from them."""
    analysed_by: list[ChainHistory] = []

    async def research(req: Request, ctx: Context) -> Research:
        return Research(request_id=req.request_id, seq=req.seq, facts=[req.subject])

    async def analyse(found: Research, ctx: Context) -> Analysis:
        analysed_by.append(ChainHistory.of(ctx))
        return Analysis(request_id=found.request_id, seq=found.seq, insight="1 fact")

    researched = Topic(f"{prefix}.researched", Research)
    analysed = Topic(f"{prefix}.analysed", Analysis)
    analyser = Agent("analyser", consumes=researched, produces=analysed, handler=analyse)
    reviewer = Reviewer("reviewer", consumes=analysed,
                        produces=Topic(f"{prefix}.reviewed", Review))
    reviewer.seen = []
    chain = Chain(prefix, [research, analyser, reviewer], key="request_id", partitions=2)
    settings, codec = broker.settings(), Codec()
    await apply_topics(settings.kafka, chain.topics)
    record, _ = encode(codec, chain.source, Request(request_id="k1", seq=0, subject="acls"))
    async with Mesh(settings, chain.agents) as mesh:
        await mesh.wait_assigned()
        await inject(settings, [record])
        ends = await wait_for_count(settings, [chain.completed.name, chain.failed.name], 1)
    failed = [r for r in ends if r.topic == chain.failed.name]
    assert not failed, (await decoded(codec, chain.failed, failed))[0].error
    (done,) = await decoded(codec, chain.completed, ends)
    assert [o.agent for o in done.outputs] == [
        f"{prefix}.research", f"{prefix}.analyser", f"{prefix}.reviewer"]
    assert chain.output(done.outputs, 2).verdict == (
        "1 fact on acls (asked: acls; saw research, analyser)")
    history = reviewer.seen[-1]
    research_out = {"request_id": "k1", "seq": 0, "facts": ["acls"]}
    analysis_out = {"request_id": "k1", "seq": 0, "insight": "1 fact"}
    assert history.output("research") == history.output(0) == Research.model_validate(research_out)
    assert history.output("analyser") == Analysis.model_validate(analysis_out)
    assert history.previous_output == analysis_out
    assert history.as_dict() == {
        "request_id": "k1", "seq": 0, "subject": "acls", "step_0_output": research_out,
        "step_1_output": analysis_out, "previous_output": analysis_out}
    assert [o.step for o in analysed_by[-1].outputs] == ["research"]
    assert analysed_by[-1].as_dict() == {
        "request_id": "k1", "seq": 0, "subject": "acls", "step_0_output": research_out,
        "previous_output": research_out}
