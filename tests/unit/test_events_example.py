"""The event-driven example's writer drafts from the reference mesh's corpus."""

from __future__ import annotations

from agents.retriever import Corpus
from examples.events import REQUESTS, review, write


def test_each_covered_point_is_a_cited_passage_of_the_corpus() -> None:
    """Pass: a first draft of r2 (3 points) covers the first two, each as a paragraph
    quoting a passage of agents/corpus/ that the researcher's search finds for the
    subject and the point, with its source; the revision answering the reviewer's notes
    adds the third. Fail: filler text, a passage from nowhere, a point lost."""
    request = REQUESTS[1]
    passages = {c.text for c in Corpus.default().chunks}
    first = write(request, 0, [], [])
    subject, *paragraphs = first.body.split("\n\n")
    assert subject == request.subject and first.covered == request.must_cover[:2]
    for point, text in zip(first.covered, paragraphs, strict=True):
        assert text.startswith(f"On {point}: ")
        quoted, _, cited = text.removeprefix(f"On {point}: ").rpartition(" (")
        assert quoted in passages and cited.endswith("\u201d)")
    missing = review(request, first)
    assert missing == request.must_cover[2:]
    second = write(request, 1, first.covered, missing)
    assert second.covered == request.must_cover and review(request, second) == []
