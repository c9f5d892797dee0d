"""Human approval of delegated steps: a step waits for a person's yes or no.

A :class:`~mesh.patterns.delegation.plan.PlanStep` with ``approval=True`` is not dispatched when
it becomes ready. The coordinator records the wait in the workflow's state (the
compacted workflows topic, so a coordinator killed -9 and restarted still waits) and
publishes an :class:`ApprovalRequest` to ``<prefix>.approvals`` (keyed by workflow id)
for people and tools to see. A :class:`Decision` produced to ``<prefix>.decisions``
(keyed by workflow id, co-partitioned with the state; ``mesh approve WORKFLOW STEP
[--by NAME]`` and ``mesh reject WORKFLOW STEP --reason TEXT`` send one) resumes it:

* approved: the step is dispatched (``StepApproved``, then ``StepDispatched``);
* rejected: the workflow fails cleanly (``StepRejected``, ``WorkflowFailed``, a failed
  outcome naming the step, who rejected it and why, with the partial results);
* no decision by the deadline (``PlanStep.approval_timeout_s``, else
  ``Coordinator(approval_timeout_s=)``, one hour by default): rejected by default. The
  coordinator's timer appends a ``deadline`` marker to the decisions topic; the
  handler applies it like a person's decision, so every change of a workflow's state
  is made by one input, in its partition's order, and is replayed the same way after a
  crash (the coordinator's wall-time budget uses the same marker, kind ``wall_time``).

A decision for a step that is not waiting (decided already, a typo, a finished workflow)
changes nothing and is reported as a ``DecisionIgnored`` event.

**Authentication.** With a plan key (``MESH_SECURITY__PLAN_KEY``) the coordinator
applies only decisions signed with it (HMAC-SHA256 under the tag
``mesh.decision/v1``, :func:`sign_decision`); ``mesh approve``/``mesh reject`` sign with
the key of their environment. An unsigned or forged decision is dead-lettered
(``SignatureInvalid``) with a ``DecisionIgnored`` event and changes nothing. The
timer's markers need no signature: the coordinator checks the deadline or wall time
itself before applying one. Without a key, anyone who can produce to the decisions
topic can approve: restrict it with Kafka ACLs.

Example:
    >>> d = Decision(workflow_id="w1", step_id="publish", approved=False, by="ana",
    ...              reason="not for this audience")
    >>> d.verdict()
    'rejected by ana: not for this audience'
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any, Literal

from pydantic import BaseModel, Field

from mesh.config import MeshSettings
from mesh.envelope import Envelope
from mesh.errors import ConfigError, SignatureInvalid
from mesh.patterns.delegation.signing import KEY_SETTING, PlanSigner
from mesh.runtime.emitter import Emitter
from mesh.topic import Topic

DECISION_TAG = "mesh.decision/v1"
DEFAULT_TIMEOUT_S = 3600.0

DecisionKind = Literal["decision", "deadline", "wall_time"]


class ApprovalRequest(BaseModel):
    """A step waiting for a person: what it would do, and until when one may decide."""

    workflow_id: str
    step_id: str
    specialist: str
    plan_version: int
    input: dict[str, Any] = Field(default_factory=dict)
    requested_at_ms: int = 0
    deadline_at_ms: int = 0
    message: str = ""


class Decision(BaseModel):
    """An answer to an :class:`ApprovalRequest` (``kind="decision"``), or one of the
    coordinator's timer markers (``"deadline"``: a step's approval deadline passed;
    ``"wall_time"``: the workflow's wall-time budget, ``step_id`` empty)."""

    workflow_id: str
    step_id: str = ""
    approved: bool = False
    by: str = ""
    reason: str = ""
    kind: DecisionKind = "decision"
    signature: str = ""

    def verdict(self) -> str:
        """How the decision reads in events and errors."""
        said = "approved" if self.approved else "rejected"
        who = f" by {self.by}" if self.by else ""
        return f"{said}{who}" + (f": {self.reason}" if self.reason else "")


class ApprovalState(BaseModel):
    """A step's approval in the workflow state; ``caused_by`` is the position of the
    input that requested it (its request is re-sent if that input is redelivered)."""

    status: Literal["waiting", "approved", "rejected"]
    caused_by: str
    requested_at_ms: int
    deadline_at_ms: int
    by: str | None = None
    reason: str | None = None


def sign_decision(signer: PlanSigner, decision: Decision) -> Decision:
    """``decision`` signed with the plan key."""
    return decision.model_copy(update={"signature": signer.sign(DECISION_TAG, decision)})


def verify_decision(signer: PlanSigner, decision: Decision) -> None:
    """Raise :class:`SignatureInvalid` unless ``decision`` is signed with this key."""
    what = (f"Decision on step {decision.step_id!r} of workflow {decision.workflow_id!r} "
            f"({decision.verdict()})")
    if not decision.signature:
        raise SignatureInvalid(f"{what} is not signed, but the coordinator applies only "
                               f"signed decisions ({KEY_SETTING} is set). Send it with "
                               f"`mesh approve`/`mesh reject` where {KEY_SETTING} is set.")
    if not signer.matches(DECISION_TAG, decision, decision.signature):
        raise SignatureInvalid(f"{what} has a signature that does not match its content: "
                               "altered, or signed with another key. Sign it with the "
                               f"coordinator's {KEY_SETTING}.")


def decision_topic(declared: Iterable[Topic[Any]], name: str | None = None) -> Topic[Decision]:
    """The decisions topic among ``declared``: the one called ``name`` (or
    ``<name>.decisions``: a mesh's prefix will do), else the only topic carrying
    :class:`Decision`."""
    found = [t for t in declared if t.model is Decision]
    if name is not None:
        found = [t for t in found if t.name in (name, f"{name}.decisions")]
    if len(found) != 1:
        names = ", ".join(sorted(t.name for t in declared if t.model is Decision)) or "none"
        wanted = f"called {name!r} " if name else ""
        raise ConfigError(f"Expected one decisions topic {wanted}among the declared topics, "
                          f"found {len(found)} (decisions topics: {names}). Name the module "
                          "declaring it with -t/--topics, and the topic with --topic when "
                          "there are several.")
    return found[0]


async def send_decision(settings: MeshSettings, topic: Topic[Decision],
                        decision: Decision) -> Envelope[Any]:
    """Produce ``decision`` to ``topic``, signed when ``settings`` hold a plan key (what
    ``mesh approve`` and ``mesh reject`` do).

    Example:
        >>> await send_decision(MeshSettings(), topics.decisions, Decision(
        ...     workflow_id="w1", step_id="publish", approved=True, by="ana"))  # doctest: +SKIP
    """
    key = settings.security.plan_key
    if key is not None:
        decision = sign_decision(PlanSigner(key), decision)
    async with Emitter(settings, source="mesh-decision") as emitter:
        (env,) = await emitter.emit(topic, [decision])
    return env
