"""The demo mesh: researcher -> writer -> editor, and a fact checker beside the writer.

Agent names (and so consumer groups, metric labels, audit records) start with ``demo-``:
the reference writing mesh beside it in this package has a researcher and a writer of
its own. The writer and the fact checker both consume ``demo.findings``, each in its own
consumer group, so each sees every event: fan-out by wiring alone. The agents are
rule-based so the demo runs anywhere with no model or network; an LLM-backed agent has
the same shape (an async handler from payload to payload).

Run one agent as its own service::

    mesh run agents.demo:writer

or all of them in one process::

    mesh dev agents.demo:app
"""

from __future__ import annotations

from mesh import App, Context, agent
from topics.demo import (
    Article,
    Draft,
    FactCheck,
    Findings,
    ResearchRequest,
    articles,
    drafts,
    fact_checks,
    findings,
    requests,
)


@agent(consumes=requests, produces=findings, name="demo-researcher")
async def researcher(request: ResearchRequest, ctx: Context) -> Findings:
    """Gathers facts about the subject."""
    words = request.subject.split()
    facts = [f"{request.subject} has {len(words)} key term(s)"]
    facts += [f"'{w}' is relevant to a {request.audience} audience" for w in words]
    ctx.logger.info("researched %r", request.subject)
    return Findings(request_id=request.request_id, subject=request.subject, facts=facts,
                    sources=[f"kb://{w.lower()}" for w in words])


@agent(consumes=findings, produces=drafts, name="demo-writer")
async def writer(found: Findings, ctx: Context) -> Draft:
    """Turns findings into a draft."""
    body = " ".join(f"{fact}." for fact in found.facts)
    return Draft(request_id=found.request_id, title=f"On {found.subject}", body=body)


@agent(consumes=drafts, produces=articles, name="demo-editor")
async def editor(draft: Draft, ctx: Context) -> Article:
    """Polishes the draft into the final article."""
    body = draft.body[0].upper() + draft.body[1:] if draft.body else draft.body
    return Article(request_id=draft.request_id, title=draft.title.title(), body=body,
                   word_count=len(body.split()))


@agent(consumes=findings, produces=fact_checks, name="demo-fact-checker")
async def fact_checker(found: Findings, ctx: Context) -> FactCheck:
    """Checks every finding has a source (fan-out branch, its own consumer group)."""
    flagged = [f for f in found.facts if not found.sources]
    return FactCheck(request_id=found.request_id, checked=len(found.facts), flagged=flagged)


# requests come from outside (mesh emit, an Emitter); articles and fact checks are read
# outside (mesh tap, a UI): declared, so `mesh graph --strict` passes
app = App("demo", agents=[researcher, writer, editor, fact_checker], sources=[requests],
          sinks=[articles, fact_checks])
