"""The offline brain: deterministic work with no model and no network.

Research ranks corpus passages with BM25 (:mod:`agents.retriever`), the hits of several
queries (a subject's parts) taken in turn; analysis takes each passage's sentence most
on the subject as a key point, picks out figures (dates, versions, codes, counts) and
groups passages into an outline by the section they come from; the code sample is a
template chosen by subject (:mod:`agents.sample`); writing composes Markdown from the
outline, fitted to the word count (:func:`compose`: a frame sized to the length, whole
passages first, then leading sentences, measured and refitted), citing each passage
where it is used: every sentence is a passage's, nothing is padding. The same input
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
from agents.document import citations, count_words, split_sentences
from agents.retriever import Passage, tokens
from agents.sample import template_for
from topics.writing import WritingRequest

RELEVANT = 0.1  # a hit scoring under this share of its query's best is off topic
KEY_POINTS, FIGURES = 10, 8  # at most, for the writer to choose from
LONGEST = 60  # words: a longer "sentence" (a run-on list) is no key point or figure
# A sentence opening with a word that points back needs the one before it to make sense.
_ANAPHORA = re.compile(r"(?:it|its|this|that|these|those|they|their|them|such|both|here|"
                       r"there|he|she|we|our|the latter|the former)\b", re.I)
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
        per_query = max(2, -(-k // max(1, len(queries))))
        lists = []
        for query in queries:
            hits = search(query, per_query + len(exclude) + k)
            best = hits[0].score if hits else 0.0
            lists.append([h for h in hits if h.id not in exclude and h.score >= share * best])
        # the queries' hits in turn (a subject's parts alike near the top), once each
        seen, found = set(exclude), []
        for rank in range(max((len(hits) for hits in lists), default=0)):
            for hits in lists:
                if rank < len(hits) and hits[rank].id not in seen:
                    seen.add(hits[rank].id)
                    found.append(hits[rank])
        return Findings(queries=queries, passages=found[:k])

    async def analyse(self, request: WritingRequest, passages: list[Passage]) -> Analysis:
        subject = subject_of(request.task)
        ranked = _numbered(passages, request.requirements.must_cover)
        points: list[KeyPoint] = []
        seen_values: set[str] = set()
        about = set(tokens(subject))
        facts: list[tuple[int, int, Figure]] = []  # (-relevance, order, figure)
        for p in ranked:
            sentences = split_sentences(p.text)
            readable = [s for s in sentences if _readable(s)]
            on_subject = [len(about & set(tokens(s))) for s in readable]
            if readable and len(points) < KEY_POINTS:  # the sentence most on the subject
                # that reads alone: "It sits between them" needs the sentence before it
                i = max(range(len(readable)), key=lambda i: (
                    not _ANAPHORA.match(readable[i]), on_subject[i], -i))
                points.append(KeyPoint(text=readable[i], cite=p.n))
            for sentence, relevance in zip(readable, on_subject, strict=True):
                for value in _FIGURE.findall(sentence):
                    if value not in seen_values:
                        seen_values.add(value)
                        facts.append((-relevance, len(facts),
                                      Figure(value=value.strip(), context=sentence, cite=p.n)))
        figures = [f for *_, f in sorted(facts, key=lambda t: (t[0], t[1]))[:FIGURES]]
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


TAKEAWAYS = (2, KEY_POINTS)  # bullets of the key takeaways, fewest and most
FACTS = (0, FIGURES)  # bullets of the facts and figures


def compose(request: WritingRequest, analysis: Analysis, code: CodeSample | None,
            feedback: list[str]) -> Draft:
    """The document: introduction, key takeaways, the outline's sections fitted to the
    word count, facts and figures, the worked example, a conclusion, references.

    The length is fitted, not hoped for: the frame (introduction, takeaways, figures,
    conclusion) is sized to the target (fewer bullets for a short piece), the body takes
    whole passages in rank order, then the leading sentences of others, and the draft
    is measured and refitted until it is within a few per cent of the target. When the
    passages run out, the frame takes more of the key points and figures (each a
    sentence of a passage, cited); a draft still short uses all the material found."""
    target = request.requirements.word_count
    if any("too long" in f.lower() for f in feedback):
        target = int(target * 0.97)
    takeaways = min(TAKEAWAYS[1], max(TAKEAWAYS[0], target // 250))
    figures = min(FACTS[1], max(FACTS[0], target // 400))
    lead = target >= 450
    spread = max(30, target // 8)  # words per passage when a short piece cites several
    best: Draft | None = None
    for sizes in ((takeaways, figures, None), (takeaways, figures, spread),
                  (TAKEAWAYS[1], FACTS[1], None), (TAKEAWAYS[0], 0, None),
                  (TAKEAWAYS[0], 0, spread)):
        draft = _fitted(request, analysis, code, target, *sizes, lead=lead)
        if best is None or _rank(draft, target) < _rank(best, target):
            best = draft
        if _rank(best, target)[:2] == (False, False):
            break
    assert best is not None
    return best


def _rank(draft: Draft, target: int) -> tuple[bool, bool, int]:
    """How good a draft's fit is, best lowest: fewer than three passages cited, more
    than 4 % off the target, the words off."""
    gap = abs(target - draft.words)
    return len(citations(draft.markdown)) < 3, gap > target * 0.04, gap


def _fitted(request: WritingRequest, analysis: Analysis, code: CodeSample | None,
            target: int, takeaways: int, figures: int, most: int | None, *, lead: bool
            ) -> Draft:
    """The draft with this frame whose body is refitted until its length is near
    ``target`` (headings and sentences cut whole make the count move)."""
    frame = _frame(request, analysis, code, takeaways, figures, lead=lead)
    budget = target - count_words("\n".join(frame.values()))
    draft, tried = _assemble(analysis, frame, _fit(analysis, budget, most)), {budget}
    for _ in range(8):
        gap = target - draft.words
        if abs(gap) <= target * 0.02 or budget + gap in tried:
            break
        budget += gap
        tried.add(budget)
        better = _assemble(analysis, frame, _fit(analysis, budget, most))
        if _rank(better, target) < _rank(draft, target):
            draft = better
    if _rank(draft, target)[:2] != (False, False):  # the steps oscillate: scan around it
        first, step = min(tried), max(4, target // 50)
        for budget in range(first - target // 4, max(tried) + target // 4, step):
            better = _assemble(analysis, frame, _fit(analysis, budget, most))
            if _rank(better, target) < _rank(draft, target):
                draft = better
    return draft


def _assemble(analysis: Analysis, frame: dict[str, str], chosen: dict[int, str]) -> Draft:
    """The Markdown of ``frame`` around the body (``chosen`` passages under their
    outline's sections), citations renumbered by first use, the references listed."""
    by_n = {p.n: p for p in analysis.passages}
    order: list[int] = []  # citation numbers by first use: renumbered 1, 2, 3...
    body, titles = [], []
    for section in analysis.outline:
        paragraphs = [(n, chosen[n]) for n in section.cites if n in chosen]
        if paragraphs:
            body.append(f"## {section.title}\n\n" + "\n\n".join(
                f"{text} [{n}]" for n, text in paragraphs))
            titles += [section.title] if section.title != "Overview" else []
    parts = [frame["title"], frame["intro"], frame["takeaways"], *body, frame["figures"],
             frame["example"], frame["conclusion"]]
    covered = "; ".join(_lower_first(t) for t in titles[:4]) or "the essentials"
    text = "\n\n".join(p for p in parts if p).replace(_PLAN, covered)
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


_PLAN = "\x00sections\x00"
_BRIEFING = re.compile(r"manager|executive|leader|decision|business|non-technical|stakeholder",
                       re.I)


def _frame(request: WritingRequest, analysis: Analysis, code: CodeSample | None,
           takeaways: int = 4, figures: int = 5, *, lead: bool = True) -> dict[str, str]:
    """Everything but the body sections (their words count against the budget):
    ``takeaways`` key points and ``figures`` facts at most, the introduction with the
    first key point when ``lead``; worded for the audience (a briefing for managers,
    a post for developers and other readers)."""
    req, subject = request.requirements, analysis.subject
    first = _opening(analysis) if lead else None
    opening = f" {first.text} [{first.cite}]" if first else ""
    plan = _PLAN  # the sections the body has, once fitted (see _assemble)
    example = "; and a small working example" if code is not None else ""
    briefing = bool(_BRIEFING.search(req.audience))
    kind = "briefing" if briefing else "post"
    closing = ("Use them to ask the right questions of the teams that build and run it, "
               "and to weigh what it costs against what it gives." if briefing else
               "Start from those concepts, try a small example like the one in this post, "
               "and test it before you rely on it." if code is not None else
               "Start from those concepts, try them on a small case of your own, and test "
               "it before you rely on it.")
    frame = {
        "title": f"# {_title(request, subject)}",
        "intro": f"This {kind} explains {subject} for {req.audience}.{opening} The sections "
                 f"below cover {plan}{example}. Every statement cites the passage it "
                 "comes from, listed in the references at the end, so you can check it "
                 "against its source.",
        "takeaways": "## Key takeaways\n\n" + "\n".join(  # the lead is not repeated
            f"- {p.text} [{p.cite}]" for p in analysis.key_points[bool(first):][:takeaways]),
        "figures": "",
        "example": "",
        "conclusion": f"## Conclusion\n\nWorking with {subject} comes down to a few "
                      f"well-defined pieces: {plan}. {closing} The references below point "
                      f"to the passages this {kind} draws on.",
    }
    if analysis.figures and figures:
        frame["figures"] = "## Facts and figures\n\n" + "\n".join(
            f"- **{f.value}**: {f.context} [{f.cite}]" for f in analysis.figures[:figures])
    if code is not None:
        ran = (f"\n\nRunning `python {code.filename}` prints:\n\n```text\n"
               f"{code.stdout.rstrip()}\n```") if code.stdout else ""
        frame["example"] = (f"## A worked example\n\n{code.explanation}\n\n"
                            f"```{code.language}\n{code.code.rstrip()}\n```{ran}")
    return frame


def _opening(analysis: Analysis) -> KeyPoint | None:
    """The introduction's statement: the first sentence of the best passage, which
    usually says what the subject is, when it reads alone; else the first key point."""
    for passage in analysis.passages[:1]:
        for sentence in split_sentences(passage.text)[:1]:
            if _readable(sentence) and not _ANAPHORA.match(sentence):
                return KeyPoint(text=sentence, cite=passage.n)
    return analysis.key_points[0] if analysis.key_points else None


def _readable(sentence: str) -> bool:
    """Long enough to say something, short enough to be one statement."""
    return 8 <= len(sentence.split()) <= LONGEST


def _lower_first(title: str) -> str:
    """``What MCP is`` -> ``what MCP is`` (an acronym keeps its capitals)."""
    return title[:1].lower() + title[1:] if title[1:2].islower() else title


def _fit(analysis: Analysis, budget: int, most: int | None = None) -> dict[int, str]:
    """Which passages (by number) go into the body and with what text, so the body has
    about ``budget`` words: whole passages (or, with ``most``, their leading sentences
    up to ``most`` words) in rank order while they fit, then the leading sentences of
    the best passages left out."""
    chosen: dict[int, str] = {}
    used = 0
    left = []
    for p in analysis.passages:
        text = p.text if most is None else _leading(p.text, most)
        words = count_words(text)
        if text and used + words <= budget:
            chosen[p.n], used = text, used + words
        else:
            left.append(p)
    for p in left:
        gap = budget - used
        if gap < 12:
            break
        lead = _leading(p.text, gap)
        if lead:
            chosen[p.n] = lead
            used += count_words(lead)
    return chosen


def _leading(text: str, words: int) -> str:
    """The leading sentences of ``text`` that fit in ``words`` ("" when the first does
    not)."""
    lead: list[str] = []
    for sentence in split_sentences(text):
        if count_words(" ".join([*lead, sentence])) > words:
            break
        lead.append(sentence)
    return " ".join(lead)
