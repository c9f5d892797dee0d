"""The offline brain: deterministic work with no model and no network.

Research ranks corpus passages with BM25 (:mod:`agents.retriever`); analysis takes each
passage's topic sentence as a key point, picks out figures (dates, versions, codes,
counts) and groups passages into an outline by the section they come from; the code
sample is a template chosen by subject (:mod:`agents.sample`); writing composes
Markdown from the outline, fitted to the word count (whole passages first, then the
leading sentences of one more), citing each passage where it is used. The same input
always gives the same output.

Example:
    >>> import asyncio
    >>> from agents.retriever import Corpus
    >>> found = asyncio.run(OfflineBrain().research(
    ...     ["MCP servers"], k=3, search=lambda q, k: Corpus.default().search(q, k=k)))
    >>> len(found.passages), found.usage.brain
    (3, 'offline')
"""

from __future__ import annotations

import re

from agents.brain import (
    Analysis,
    CodeSample,
    Draft,
    Figure,
    Findings,
    KeyPoint,
    Search,
    Section,
    subject_of,
)
from agents.document import count_words, split_sentences
from agents.retriever import Passage
from agents.sample import template_for
from topics.writing import WritingRequest

RELEVANT = 0.1  # a hit scoring under this share of its query's best is off topic
_FIGURE = re.compile(r"(?<![\w.-])(\d{4}-\d{2}-\d{2}|-\d{5}|\d+(?:\.\d+)+|(?:19|20)\d{2}"
                     r"|\d+(?:\.\d+)?\s?(?:%|ms|MB|GB|KB|s)(?!\w))")
_NUMBER_WORDS = re.compile(r"\b(one|two|three|four|five|six|seven|eight|nine|ten)\b", re.I)


class OfflineBrain:
    """See the module docstring."""

    label = "offline"

    async def research(self, queries: list[str], *, k: int, search: Search,
                       exclude: frozenset[str] = frozenset()) -> Findings:
        # a follow-up search (something excluded) takes every hit: the best are known
        share = 0.0 if exclude else RELEVANT
        seen, found = set(exclude), []
        per_query = max(2, -(-k // max(1, len(queries))))
        for query in queries:
            hits = search(query, per_query + len(seen))
            best = hits[0].score if hits else 0.0
            kept = [h for h in hits if h.id not in seen and h.score >= share * best]
            for hit in kept[:per_query]:
                seen.add(hit.id)
                found.append(hit)
        return Findings(queries=queries, passages=found[:k])

    async def analyse(self, request: WritingRequest, passages: list[Passage]) -> Analysis:
        subject = subject_of(request.task)
        ranked = _numbered(passages, request.requirements.must_cover)
        points, figures, seen_values = [], [], set()
        for p in ranked:
            sentences = split_sentences(p.text)
            topic = next((s for s in sentences if len(s.split()) >= 8), sentences[0])
            if len(points) < 6:
                points.append(KeyPoint(text=topic, cite=p.n))
            for sentence in sentences:
                for value in _FIGURE.findall(sentence):
                    if value not in seen_values and len(figures) < 6:
                        seen_values.add(value)
                        figures.append(Figure(value=value.strip(), context=sentence, cite=p.n))
        return Analysis(subject=subject, passages=ranked, key_points=points, figures=figures,
                        outline=_outline(ranked))

    async def code(self, request: WritingRequest, analysis: Analysis) -> CodeSample:
        filename, code, explanation = template_for(
            analysis.subject, [p.text for p in analysis.key_points])
        return CodeSample(filename=filename, code=code, explanation=explanation)

    async def write(self, request: WritingRequest, analysis: Analysis,
                    code: CodeSample | None, feedback: list[str]) -> Draft:
        return compose(request, analysis, code, feedback)


def _numbered(passages: list[Passage], must_cover: list[str]) -> list[Passage]:
    """Passages without duplicates, those covering a required term first, then in the
    order found (the first search's best first); numbered from 1 in that order."""
    unique = list({p.id: p for p in passages}.values())
    terms = [t.lower() for t in must_cover]
    covering = [p for p in unique if any(t in p.text.lower() for t in terms)]
    ranked = covering + [p for p in unique if p not in covering]
    return [p.model_copy(update={"n": n}) for n, p in enumerate(ranked, 1)]


def _outline(passages: list[Passage]) -> list[Section]:
    sections: dict[str, list[int]] = {}
    for p in passages:
        title = "Overview" if p.section == p.title else p.section
        sections.setdefault(title, []).append(p.n)
    return [Section(title=title, cites=cites) for title, cites in sections.items()]


def _title(request: WritingRequest, subject: str) -> str:
    audience = request.requirements.audience
    what = "a practical guide" if request.requirements.include_code else "an overview"
    return f"{subject[:1].upper()}{subject[1:]}: {what} for {audience}"


def compose(request: WritingRequest, analysis: Analysis, code: CodeSample | None,
            feedback: list[str]) -> Draft:
    """The document: introduction, key takeaways, the outline's sections fitted to the
    word count, facts and figures, the worked example, a conclusion, references."""
    target = request.requirements.word_count
    if any("too long" in f.lower() for f in feedback):
        target = int(target * 0.97)
    by_n = {p.n: p for p in analysis.passages}
    frame = _frame(request, analysis, code)
    budget = target - count_words("\n".join(frame.values()))
    chosen = _fit(analysis, budget)
    order: list[int] = []  # citation numbers by first use: renumbered 1, 2, 3...
    body = []
    for section in analysis.outline:
        paragraphs = [(n, chosen[n]) for n in section.cites if n in chosen]
        if paragraphs:
            body.append(f"## {section.title}\n\n" + "\n\n".join(
                f"{text} [{n}]" for n, text in paragraphs))
    parts = [frame["title"], frame["intro"], frame["takeaways"], *body, frame["figures"],
             frame["example"], frame["conclusion"]]
    text = "\n\n".join(p for p in parts if p)
    pieces = re.split(r"(^```.*?^```[ \t]*$)", text, flags=re.M | re.S)  # code stays as is
    text = "".join(piece if piece.startswith("```") else re.sub(
        r"\[(\d+)\]", lambda m: f"[{_renumber(int(m.group(1)), order)}]", piece)
        for piece in pieces)
    refs = [f"[{i}] {by_n[n].title}, “{by_n[n].section}” ({by_n[n].source})"
            for i, n in enumerate(order, 1)]
    markdown = text + "\n\n## References\n\n" + "\n".join(refs) + "\n"
    return Draft(title=frame["title"].lstrip("# "), markdown=markdown,
                 words=count_words(markdown))


def _renumber(n: int, order: list[int]) -> int:
    if n not in order:
        order.append(n)
    return order.index(n) + 1


def _frame(request: WritingRequest, analysis: Analysis, code: CodeSample | None
           ) -> dict[str, str]:
    """Everything but the body sections (their words count against the budget)."""
    req, subject = request.requirements, analysis.subject
    titles = [s.title for s in analysis.outline if s.title != "Overview"][:4]
    first = analysis.key_points[0] if analysis.key_points else None
    lead = f" {first.text} [{first.cite}]" if first else ""
    plan = "; ".join(_lower_first(t) for t in titles) or "the essentials"
    example = "; and a small working example" if code is not None else ""
    frame = {
        "title": f"# {_title(request, subject)}",
        "intro": f"This post explains {subject} for {req.audience}.{lead} The sections "
                 f"below cover {plan}{example}. Every statement cites the passage it "
                 "comes from, listed in the references at the end, so you can check it "
                 "against its source.",
        "takeaways": "## Key takeaways\n\n" + "\n".join(
            f"- {p.text} [{p.cite}]" for p in analysis.key_points[:4]),
        "figures": "",
        "example": "",
        "conclusion": f"## Conclusion\n\nWorking with {subject} comes down to a few "
                      f"well-defined pieces: {plan}. Start from those concepts, try a small "
                      "example like the one in this post, and test it before you rely on it. "
                      "The references below point to the passages this post draws on.",
    }
    if analysis.figures:
        frame["figures"] = "## Facts and figures\n\n" + "\n".join(
            f"- **{f.value}**: {f.context} [{f.cite}]" for f in analysis.figures[:5])
    if code is not None:
        ran = (f"\n\nRunning `python {code.filename}` prints:\n\n```text\n"
               f"{code.stdout.rstrip()}\n```") if code.stdout else ""
        frame["example"] = (f"## A worked example\n\n{code.explanation}\n\n"
                            f"```{code.language}\n{code.code.rstrip()}\n```{ran}")
    return frame


def _lower_first(title: str) -> str:
    """``What MCP is`` -> ``what MCP is`` (an acronym keeps its capitals)."""
    return title[:1].lower() + title[1:] if title[1:2].islower() else title


def _fit(analysis: Analysis, budget: int) -> dict[int, str]:
    """Which passages (by number) go into the body and with what text, so the body has
    about ``budget`` words: whole passages in rank order while they fit, then the leading
    sentences of the best passage left out."""
    chosen: dict[int, str] = {}
    used = 0
    left = []
    for p in analysis.passages:
        words = count_words(p.text)
        if used + words <= budget:
            chosen[p.n], used = p.text, used + words
        else:
            left.append(p)
    for p in left:
        gap = budget - used
        if gap < 12:
            break
        lead = []
        for sentence in split_sentences(p.text):
            if count_words(" ".join([*lead, sentence])) > gap:
                break
            lead.append(sentence)
        if lead:
            chosen[p.n] = " ".join(lead)
            used += count_words(chosen[p.n])
    return chosen
