"""``mesh trace``'s picture of a :class:`~mesh.views.trace.Trace`: a rich tree, one
branch per event, each handling and attempt with its outcome, duration and error.
"""

from __future__ import annotations

from collections.abc import Mapping

from rich.text import Text
from rich.tree import Tree

from mesh.runtime.audit import DEAD_LETTER, OK, RETRY
from mesh.views.trace import REDELIVERY, REPLAY, Attempt, Handling, Trace, TraceNode

_OUTCOME_STYLE = {OK: "green", RETRY: "yellow", DEAD_LETTER: "bold red"}
_ERROR_CHARS = 160  # in the tree; --json keeps the whole error


def render_trace(trace: Trace, models: Mapping[str, str] | None = None) -> Tree:
    """The trace as a rich tree: the workflow's wall time at the top, then each event
    (``topic [evt 1a2b3c4d…] ← producer @ +N ms``) with, under it, each agent that
    consumed it (``→ agent: ok 12.3 ms (+5 ms)``; with several attempts one line each
    under it) and, under that agent, the events it produced from it. ``models`` (topic
    name -> payload model name, from the declarations ``mesh trace -t`` names) labels
    each topic with what it carries.

    Example:
        >>> Console().print(render_trace(trace))  # doctest: +SKIP
    """
    counts = trace.counts()
    head = Text.assemble((f"trace {trace.correlation_id}", "bold"),
                         f": {_duration(trace.wall_ms)} wall time, {counts['events']} "
                         f"event(s), {counts['handlings']} handling(s)")
    for name, one in (("retries", "retry"), ("dead_letters", "dead letter"),
                      ("redeliveries", "redelivery")):
        if counts[name]:
            many = name.replace("_", " ")
            head.append(f", {counts[name]} {one if counts[name] == 1 else many}",
                        "red" if name == "dead_letters" else "yellow")
    tree = Tree(head)
    for root in trace.roots:
        _render_node(tree, root, trace.start_ms, models or {})
    return tree


def _render_node(parent: Tree, node: TraceNode, start: int, models: Mapping[str, str]) -> None:
    label = Text.assemble((node.topic or "?", "bold cyan"))
    model = models.get(node.topic) if node.topic is not None else None
    if model is not None:
        label.append(f" ({model})", "cyan")
    label.append(f" [evt {_short(node.event_id)}] ")
    if node.producer is None:
        label.append("← ? (its production is not in the audit)", "dim")
    else:
        label.append(f"← {node.producer}")
    label.append(f" @ +{node.at_ms - start} ms")
    if node.size is not None:
        label.append(f", {node.size} B", "dim")
    if node.produced > 1:
        label.append(f" (produced {node.produced} times: at-least-once redelivery)", "yellow")
    if not node.cause_in_audit:
        label.append(f" (cause {_short(node.causation_id or '?')} not in the audit)", "dim")
    branch = parent.add(label)
    for note in node.notes:
        details = ", ".join(f"{k}={v}" for k, v in sorted(note.details.items()))
        branch.add(Text(f"↺ {note.kind}" + (f" by {note.agent}" if note.agent else "")
                        + (f" ({details})" if details else "") + f" @ +{note.at_ms - start} ms",
                        "magenta"))
    placed: set[str] = set()
    for handling in node.handlings:
        under = branch.add(_handling_label(handling, node, start))
        if len(handling.attempts) > 1:
            for attempt in handling.attempts:
                under.add(_attempt_label(Text(f"#{attempt.attempt} "), attempt, node, start))
        for child in node.children:
            if child.producer == handling.agent and child.event_id not in placed:
                placed.add(child.event_id)
                _render_node(under, child, start, models)
    for child in node.children:
        if child.event_id not in placed:
            _render_node(branch, child, start, models)


def _handling_label(handling: Handling, node: TraceNode, start: int) -> Text:
    """One line per agent: the attempt itself, or with several attempts the final
    outcome and how many (each attempt then on a line of its own under it)."""
    label = Text(f"→ {handling.agent}: ")
    if len(handling.attempts) == 1:
        only = handling.attempts[0]
        if only.attempt > 1:  # retried in place, or arrived from a retry topic
            label.append(f"#{only.attempt} ")
        return _attempt_label(label, only, node, start)
    label.append(handling.outcome, _OUTCOME_STYLE.get(handling.outcome, "white"))
    first, last = handling.attempts[0], handling.attempts[-1]
    label.append(f" after {len(handling.attempts)} consumptions "
                 f"(+{first.at_ms - start} ms … +{last.at_ms - start} ms)")
    return label


def _attempt_label(label: Text, attempt: Attempt, node: TraceNode, start: int) -> Text:
    label.append(attempt.outcome, _OUTCOME_STYLE.get(attempt.outcome, "white"))
    if attempt.duration_ms is not None:
        label.append(f" {attempt.duration_ms:.1f} ms")
    label.append(f" (+{attempt.at_ms - start} ms)")
    if attempt.topic and attempt.topic != node.topic:
        label.append(f" via {attempt.topic}", "dim")
    if attempt.delivery in (REDELIVERY, REPLAY):
        label.append(f" [{attempt.delivery}]", "yellow")
    if attempt.error_class or attempt.error:
        error = f"{attempt.error_class or 'error'}: {attempt.error or ''}".rstrip(": ")
        if len(error) > _ERROR_CHARS:
            error = error[:_ERROR_CHARS - 1] + "…"
        label.append(f" {error}", "red")
    return label


def _short(event_id: str) -> str:
    return event_id if len(event_id) <= 8 else event_id[:8] + "…"


def _duration(ms: float) -> str:
    return f"{ms / 1000:.2f} s" if ms >= 10_000 else f"{ms:.1f} ms"
