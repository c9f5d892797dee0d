"""Plan signing: the coordinator signs the work it hands out, specialists check it.

Anyone who can produce to a specialist's task topic could otherwise make it do any
work. With a plan key (``MESH_SECURITY__PLAN_KEY``, the same secret on the coordinator
and on every specialist) the coordinator signs every :class:`StepTask` it dispatches
and every plan version it publishes, with HMAC-SHA256 over a canonical serialization;
a specialist runs a task only if its signature checks. A task that does not check
raises :class:`~mesh.errors.SignatureInvalid` (never retriable): the runtime sends it to
the task topic's dead-letter topic, the specialist does not run the work and does not
answer for it, and it goes on with the next task.

What a signature covers: every field except ``signature`` itself, under a tag naming
what is signed (so a plan's signature is no task's signature). For a task that is the
task id, workflow id, step id, dispatch id, specialist, plan version, input and the
results of its dependencies (context): a signature cannot be moved to another
workflow, step, specialist or input, and a signed task is refused on another
specialist's topic. What it does not cover: the same signed task produced again (the
mesh delivers at least once anyway; the coordinator applies one result per dispatch),
Kafka headers, and the workflows, results and events topics. Restrict who may produce
to the mesh's topics with Kafka ACLs as well.

Without a key the mesh runs *unsigned*: a specialist runs whatever reaches its task
topic. That is insecure outside a closed development setup; a coordinator or
specialist running unsigned logs a warning once, when it handles its first input.

Canonical form: the JSON of ``[tag, fields]`` with sorted keys, no whitespace, ASCII
only, and non-JSON values written as ``str(value)`` — what the Avro serde does with
free-form values, so a task signs the same before and after its trip through Kafka.
The key is a :class:`~pydantic.SecretStr`, unwrapped only to compute a MAC: it is never
in a log, an event, an error or a repr, and an error never shows the signature the
content should have had (that would sign forgeries for whoever reads the dead letters).

Example:
    >>> from pydantic import SecretStr
    >>> signer = PlanSigner(SecretStr("a random secret of 32 bytes or more"))
    >>> task = signer.sign_task(StepTask(task_id="w1/write", workflow_id="w1",
    ...     step_id="write", dispatch_id="w1/write/v1", specialist="writer", plan_version=1))
    >>> signer.verify_task(task, specialist="writer")  # checks: returns None
    >>> signer.verify_task(task.model_copy(update={"workflow_id": "w2"}),
    ...                    specialist="writer")  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    mesh.errors.SignatureInvalid: Task 'w1/write' (dispatch 'w1/write/v1') has a signature ...
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Literal

from pydantic import BaseModel, SecretStr

from mesh.agent import Context
from mesh.errors import ConfigError, SignatureInvalid
from mesh.patterns.delegation.plan import Plan, StepTask

logger = logging.getLogger(__name__)

SCHEME = "hmac-sha256"
TASK_TAG = "mesh.step-task/v1"
PLAN_TAG = "mesh.plan/v1"
KEY_SETTING = "MESH_SECURITY__PLAN_KEY"
MIN_KEY_CHARS = 32  # HMAC-SHA256 wants a key of 32 bytes; shorter ones can be guessed

Role = Literal["coordinator", "specialist"]


def canonical(tag: str, content: BaseModel) -> bytes:
    """The bytes signed for ``content``: every field but ``signature``, under ``tag``.

    Example:
        >>> canonical("t", Plan(steps=[], workflow_id="w"))[:40]
        b'["t",{"author":"planner","reason":"initi'
    """
    fields = content.model_dump(exclude={"signature"})
    text = json.dumps([tag, fields], default=str, sort_keys=True, separators=(",", ":"),
                      ensure_ascii=True)
    return text.encode("ascii")


@dataclass(frozen=True, slots=True)
class PlanSigner:
    """Signs and checks tasks and plans with one HMAC-SHA256 key.

    Args:
        key: the plan key (``MeshSettings().security.plan_key``); not empty.
    """

    key: SecretStr = field(repr=False)

    def __post_init__(self) -> None:
        if not self.key.get_secret_value().strip():
            raise ConfigError(f"{KEY_SETTING} is set but empty: an empty HMAC key signs "
                              "nothing. Set it to a random secret of at least "
                              f"{MIN_KEY_CHARS} characters on the coordinator and every "
                              "specialist, or unset it to run unsigned (insecure).")

    def sign(self, tag: str, content: BaseModel) -> str:
        """The signature of ``content`` under ``tag``: ``hmac-sha256:<64 hex digits>``."""
        mac = hmac.new(self.key.get_secret_value().encode(), canonical(tag, content),
                       hashlib.sha256)
        return f"{SCHEME}:{mac.hexdigest()}"

    def matches(self, tag: str, content: BaseModel, signature: str) -> bool:
        """Whether ``signature`` is this key's signature of ``content`` (constant time)."""
        return hmac.compare_digest(self.sign(tag, content).encode(),
                                   signature.encode("utf-8", "replace"))

    def sign_task(self, task: StepTask) -> StepTask:
        """``task`` with its signature set."""
        return task.model_copy(update={"signature": self.sign(TASK_TAG, task)})

    def sign_plan(self, plan: Plan) -> Plan:
        """``plan`` with its signature set."""
        return plan.model_copy(update={"signature": self.sign(PLAN_TAG, plan)})

    def verify_task(self, task: StepTask, *, specialist: str) -> None:
        """Raise :class:`SignatureInvalid` unless ``task`` is signed with this key, is
        unaltered, and is for ``specialist`` (the one checking it)."""
        what = f"Task {task.task_id!r} (dispatch {task.dispatch_id!r})"
        if not task.signature:
            raise SignatureInvalid(
                f"{what} is not signed, but specialist {specialist!r} runs only signed "
                f"tasks ({KEY_SETTING} is set): it was not dispatched by a coordinator "
                "holding the plan key, so its work is not done. If your coordinator "
                f"dispatched it, set {KEY_SETTING} on the coordinator to the specialists' "
                "key.")
        if not self.matches(TASK_TAG, task, task.signature):
            raise SignatureInvalid(
                f"{what} has a signature that does not match its content: it was altered "
                "after signing, signed for another task, or signed with another key, so "
                f"its work is not done. If your coordinator dispatched it, set {KEY_SETTING} "
                "to the same value on the coordinator and on every specialist.")
        if task.specialist != specialist:
            raise SignatureInvalid(
                f"{what} is signed for specialist {task.specialist!r} but reached "
                f"specialist {specialist!r}: a signed task runs only where it was "
                "dispatched, so its work is not done. Check who produced it to this "
                "specialist's task topic.")

    def verify_plan(self, plan: Plan) -> None:
        """Raise :class:`SignatureInvalid` unless ``plan`` is signed with this key and
        unaltered (for tools reading the plans topic)."""
        what = f"Plan v{plan.version} of workflow {plan.workflow_id!r}"
        if not plan.signature:
            raise SignatureInvalid(f"{what} is not signed: it was not published by a "
                                   f"coordinator holding the plan key. Set {KEY_SETTING} on "
                                   "the coordinator.")
        if not self.matches(PLAN_TAG, plan, plan.signature):
            raise SignatureInvalid(f"{what} has a signature that does not match its "
                                   "content: it was altered, or signed with another key. "
                                   f"Use the coordinator's {KEY_SETTING}.")


class PlanKey:
    """Which :class:`PlanSigner` an agent uses: its own ``key`` if given, else the plan
    key of the settings its runner runs with; None means unsigned (warned once).

    Resolved on the first input (the settings reach an agent with its runner), then
    cached for as long as the runner's settings object is the same.

    Example:
        >>> PlanKey("writer", "specialist", key=None).signer(None) is None  # warns once
        True
    """

    def __init__(self, agent: str, role: Role, *, key: SecretStr | None) -> None:
        self.agent, self.role, self._key = agent, role, key
        self._source: object = None
        self._signer: PlanSigner | None = None
        self._resolved = False
        self._warned = False

    def __repr__(self) -> str:
        return f"PlanKey({self.agent!r}, {self.role!r}, explicit={self._key is not None})"

    def for_context(self, ctx: Context) -> PlanSigner | None:
        """The signer for an input handled with ``ctx`` (None: unsigned)."""
        return self.signer(getattr(ctx.runner, "settings", None))

    def signer(self, settings: Any) -> PlanSigner | None:
        """The signer given the runner's ``settings`` (a MeshSettings, or None)."""
        if self._resolved and self._source is settings:
            return self._signer
        key = self._key
        if key is None and settings is not None:
            key = settings.security.plan_key
        self._signer = PlanSigner(key) if key is not None else None
        self._source, self._resolved = settings, True
        if not self._warned:
            self._warned = True
            self._warn(key)
        return self._signer

    def _warn(self, key: SecretStr | None) -> None:
        if key is None and self.role == "coordinator":
            logger.warning("coordinator %s runs UNSIGNED (%s is not set): its tasks and plans "
                           "carry no signature, and specialists holding a plan key will "
                           "dead-letter them. Insecure: set %s on the coordinator and every "
                           "specialist.", self.agent, KEY_SETTING, KEY_SETTING)
        elif key is None:
            logger.warning("specialist %s runs UNSIGNED (%s is not set): it runs any task "
                           "produced to its task topic, by anyone. Insecure: set %s to the "
                           "coordinator's key.", self.agent, KEY_SETTING, KEY_SETTING)
        elif len(key.get_secret_value()) < MIN_KEY_CHARS:
            logger.warning("%s %s: the plan key is shorter than %d characters and may be "
                           "guessed from a signed task; use a longer random secret.",
                           self.role, self.agent, MIN_KEY_CHARS)
