"""Parallel fan-out / fan-in: a research question goes to three researchers, a gather
merges what they found.

The web, database and documents researchers are rule-based (no network): each is a
plain function turned into a branch agent with its own consumer group on
``research.requests``. The database has no table for some subjects and fails; the
documents researcher is slow on archive questions. The gather (rule all, deadline 10 s,
overridden to 2 s by one question) emits one merged result per question to
``research.merged``: successes, failures with agent and error, and who timed out.

Run: ``.venv/bin/python -m examples.gather`` (starts its own embedded broker).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from rich.console import Console

from mesh import Codec, EmbeddedBroker, Emitter, Mesh, MeshSettings, apply_topics
from mesh.kafka.reader import TopicReader
from mesh.patterns.gather import Gather, Merged, branch
from topics.gather import ResearchQuestion, research

console = Console()
PAGES = {"kafka": ["Consumer groups split partitions among members (kafka.apache.org)"],
         "quantum": ["Surface codes protect logical qubits (arxiv.org)"],
         "compacted": ["Compaction keeps the last value per key (confluent.io)"]}
TABLES = {"kafka": ["consumer_groups: 12 rows"], "compacted": ["changelog_topics: 4 rows"]}
DOCUMENTS = {"kafka": ["Runbook: rebalancing after a broker restart"],
             "compacted": ["Archive memo 2019: state stores on compacted topics"]}


def subjects(question: ResearchQuestion) -> list[str]:
    return [s for s in PAGES if s in question.text.lower()]


def search_web(question: ResearchQuestion) -> dict[str, Any]:
    findings = [f for s in subjects(question) for f in PAGES[s]]
    return {"findings": findings, "sources": ["web"] if findings else []}


def query_database(question: ResearchQuestion) -> dict[str, Any]:
    missing = [s for s in subjects(question) if s not in TABLES]
    if missing:
        raise LookupError(f"no table for subject {missing[0]!r}")
    return {"findings": [f for s in subjects(question) for f in TABLES[s]],
            "sources": ["warehouse"]}


async def read_documents(question: ResearchQuestion) -> dict[str, Any]:
    if "archive" in question.text.lower():
        await asyncio.sleep(3)  # the archive is slow: past this question's 2 s deadline
    return {"findings": [f for s in subjects(question) for f in DOCUMENTS.get(s, [])],
            "sources": ["documents"]}


def merge_research(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Combine research from several sources (the seed article's merger)."""
    sources = sorted({s for r in results for s in r["sources"]})
    return {"combined_findings": [f for r in results for f in r["findings"]],
            "total_sources": len(sources), "sources": sources}


web = branch("web", search_web, topics=research)
database = branch("database", query_database, topics=research)
documents = branch("documents", read_documents, topics=research)
fan_in = Gather("research-gather", topics=research, branches=[web, database, documents],
                rule="all", deadline_s=10, deadline_of=lambda q: q.deadline_s,
                merger=merge_research, check_every_s=0.2)
QUESTIONS = [
    ResearchQuestion(question_id="q1", text="How do Kafka consumer groups balance load?"),
    ResearchQuestion(question_id="q2", text="What is quantum error correction?"),
    ResearchQuestion(question_id="q3", text="What does the archive say about compacted "
                                            "topics?", deadline_s=2),
]


async def ask(settings: MeshSettings) -> None:
    async with Emitter(settings, source="example") as emitter:
        for question in QUESTIONS:  # each question is its own workflow
            await emitter.emit(research.requests, [question], key=question.question_id.encode(),
                               correlation_id=question.question_id)


async def collect(settings: MeshSettings, timeout: float = 60.0) -> dict[str, Merged]:
    codec, found = Codec(), {}
    deadline = time.monotonic() + timeout
    async with TopicReader(settings.kafka, [research.merged.name]) as reader:
        async for record in reader.follow(idle_timeout=timeout):
            merged = await codec.decode(research.merged, record.value or b"")
            assert isinstance(merged, Merged)
            found[merged.correlation_id] = merged
            if len(found) == len(QUESTIONS) or time.monotonic() > deadline:
                break
    return found


def show(found: dict[str, Merged]) -> None:
    for question in QUESTIONS:
        merged = found.get(question.question_id)
        console.rule(f"{question.question_id}: {question.text}")
        if merged is None:
            console.print("[red]no merged result arrived[/red]")
            continue
        output = merged.merged_output or {}
        verdict = "[green]success[/green]" if merged.success else "[red]not successful[/red]"
        console.print(f"{verdict} ({merged.outcome}, rule {merged.rule}); answered by "
                      f"{', '.join(merged.successes)}; {output.get('total_sources')} sources")
        for finding in output.get("combined_findings", []):
            console.print(f"  - {finding}")
        for failure in merged.failures:
            console.print(f"  [red]failed[/red] {failure.agent}: {failure.error_class}: "
                          f"{failure.error}")
        for agent in merged.timed_out:
            console.print(f"  [yellow]timed out[/yellow] {agent}")


def as_expected(found: dict[str, Merged]) -> bool:
    q1, q2, q3 = (found.get(q.question_id) for q in QUESTIONS)
    return bool(q1 and q1.success and len(q1.successes) == 3
                and q2 and not q2.success and [f.agent for f in q2.failures] == ["database"]
                and q3 and q3.outcome == "timed_out" and q3.timed_out == ["documents"])


async def run(bootstrap: str) -> int:
    settings = MeshSettings().with_bootstrap(bootstrap, embedded=True)
    await apply_topics(settings.kafka, research.all())
    async with Mesh(settings, [web, database, documents, fan_in]) as mesh:
        await mesh.wait_assigned()
        console.print("agents: web, database, documents (fan-out), research-gather (fan-in)")
        await ask(settings)
        console.print(f"asked {len(QUESTIONS)} questions on {research.requests.name}")
        found = await collect(settings)
    show(found)
    return 0 if as_expected(found) else 1


def main() -> int:
    with EmbeddedBroker() as broker:
        console.print(f"embedded broker on {broker.bootstrap}")
        return asyncio.run(run(broker.bootstrap))


if __name__ == "__main__":
    raise SystemExit(main())
