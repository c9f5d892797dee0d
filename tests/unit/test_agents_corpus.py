"""The corpus says where its texts come from in front matter, and that never reaches a
document: no passage, no section, no reference carries the provenance notes ("Written
for this repository...", "public domain"), and the seed's document still has its
length. No broker: the offline brain does the plan's research, analysis, code and
writing in process."""

from __future__ import annotations

from pathlib import Path

from agents.brain import subject_of
from agents.coordinator import plan
from agents.document import count_words, sections
from agents.offline import OfflineBrain
from agents.retriever import Corpus, Passage
from agents.reviewer import review_draft
from agents.sample import run
from topics.writing import WritingRequest

SEED = WritingRequest.model_validate({
    "workflow_id": "wf-corpus", "task": "Create a technical blog post about MCP servers",
    "requirements": {"word_count": 2000, "include_code": True, "audience": "developers"}})
PROVENANCE = ("written for this repository", "public domain", "provenance")


async def seed_document() -> str:
    """The document the offline mesh writes for the seed: each research step of the
    first plan (its queries, k, subject), then analysis, the sample (run), the draft."""
    offline, corpus = OfflineBrain(), Corpus.default()
    passages: list[Passage] = []
    for step in (await plan(SEED)).steps:
        if step.specialist != "researcher":
            continue
        about = step.input.get("about", "")
        found = await offline.research(
            step.input["queries"], k=step.input["k"],
            search=lambda q, k, about=about: corpus.search(q, k=k, about=about),
            exclude=frozenset(p.id for p in passages))
        passages += found.passages
    analysis = await offline.analyse(SEED, passages)
    sample = await offline.code(SEED, analysis)
    sample = sample.model_copy(update={"stdout": run(sample.code).stdout})
    return (await offline.write(SEED, analysis, sample, [])).markdown


async def test_the_seed_document_has_no_provenance_text_and_its_word_count() -> None:
    """Pass: the seed's document holds none of the corpus files' provenance notes (in its
    sections, facts or references), has no "Overview" section made of them, is 2000
    words within 10 % and is approved by the reviewer.
    Fail: a preamble indexed as a passage ("Written for this repository's reference
    mesh...; dedicated to the public domain") shows up, or the document got short."""
    markdown = await seed_document()
    assert subject_of(SEED.task) == "MCP servers"
    for text in PROVENANCE:
        assert text not in markdown.lower(), text
    assert "Overview" not in sections(markdown)
    assert "“Notes on MCP servers”" not in markdown  # a reference to the file's preamble
    assert 1800 <= count_words(markdown) <= 2200, count_words(markdown)
    verdict = await review_draft(SEED, markdown, round_=1)
    assert verdict.approved, verdict.feedback


def test_no_passage_of_the_shipped_corpus_is_provenance() -> None:
    """Pass: no passage of agents/corpus/ carries a provenance note; the MCP notes'
    passages all sit in a section of their own (none titled by the file alone).
    Fail: the front matter or a preamble paragraph is indexed."""
    chunks = Corpus.default().chunks
    assert chunks
    for chunk in chunks:
        assert not any(t in chunk.text.lower() for t in PROVENANCE), (chunk.id, chunk.text)
    mcp = [c for c in chunks if c.source.endswith("mcp-servers.md")]
    assert mcp and all(c.section != c.title for c in mcp), [c.id for c in mcp]


def test_front_matter_and_comments_are_not_indexed(tmp_path: Path) -> None:
    """Pass: in a corpus file with front matter (between --- lines) and an HTML comment,
    only the section's paragraph is a passage; its text is found by a search, the front
    matter's and the comment's words are not.
    Fail: either becomes a passage or is found."""
    body = ("Kafka consumer groups share the partitions of a topic among their members, "
            "so each record is handled by one member of the group while other groups "
            "read the same records independently of each other.")
    (tmp_path / "groups.md").write_text(
        "---\nprovenance: >-\n  Written for a test of this repository and dedicated to the "
        "public domain,\n  with enough words in it to make a passage of its own if it "
        "were indexed at all.\nlicense: CC0\n---\n\n# Consumer groups\n\n<!-- Notes for "
        "maintainers: this comment is long enough to\nbe a passage of twenty five words "
        "or more if the indexer kept it, which it must not do. -->\n\n## Sharing "
        f"partitions\n\n{body}\n", encoding="utf-8")
    corpus = Corpus(tmp_path)
    assert [(c.title, c.section, c.text) for c in corpus.chunks] == [
        ("Consumer groups", "Sharing partitions", body)]
    assert corpus.search("partitions consumer groups", k=3)
    assert corpus.search("provenance public domain license maintainers comment", k=3) == []


async def test_the_seed_document_opens_with_what_mcp_is_and_its_takeaways_read_alone() -> None:
    """Pass: the introduction states what MCP is (the best passage's first sentence) and
    no key takeaway opens with a word pointing back at a sentence the reader never saw
    ("It sits between them", "MCP turns that into..." as an opener of the post).
    Fail: a takeaway or the opening statement needs the sentence before it."""
    markdown = await seed_document()
    intro = markdown.split("\n\n")[1]
    assert "The Model Context Protocol (MCP) is an open protocol" in intro, intro
    takeaways = markdown.split("## Key takeaways\n\n", 1)[1].split("\n\n", 1)[0]
    bullets = [line.removeprefix("- ") for line in takeaways.splitlines()]
    assert len(bullets) >= 3
    pointing_back = ("it", "its", "this", "that", "these", "those", "they", "their", "such")
    for bullet in bullets:
        assert bullet.split()[0].lower().strip(",:") not in pointing_back, bullet
