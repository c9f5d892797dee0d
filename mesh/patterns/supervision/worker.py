"""The worker side of a supervised pool, and the protocol it shares with the supervisor.

Workers (:class:`WorkerService`) are replicas of one agent in one consumer group on the
task topic, so Kafka balances partitions and moves them off dead replicas. Each has a
worker id (``MESH_WORKER_ID`` or generated) and publishes its row (:class:`WorkerStatus`:
idle/busy/quarantined, the task in hand, consecutive failures, tasks done, throughput,
partitions) to a compacted status topic keyed by worker id: on a heartbeat timer and
after every task, with a :class:`TaskOutcome` event. A failed task is not dead-lettered
by the worker: its outcome carries the task, and the input is committed once that
outcome is acknowledged (nothing is lost).

**Quarantine is the worker's own act.** A worker whose ``max_failures``-th task in a row
fails stops taking work at once, without waiting for the supervisor: before its
handler returns it marks itself quarantined and holds (pauses) its partitions through
the runner (no further input is run; one that reaches the handler anyway is handed
back, not failed), and within one heartbeat calls
``AgentRunner.quarantine()``, which finishes the tasks in hand, commits and leaves the
task group (its partitions move to healthy replicas; the inputs it had fetched but not
started are redelivered to them). It keeps heartbeating as quarantined. So a worker
fails at most ``max_failures`` tasks in a row, plus the tasks whose handlers were
already running when the limit was reached: at most ``max_failures + concurrency - 1``
(``WorkerService(concurrency=1)`` by default: a worker takes one task at a time, as
the seed's workers do, and the pool scales by replicas; so exactly ``max_failures``).
A worker told on the control topic to quarantine does the same (the supervisor's
order: a worker with ``max_failures=None``, or a higher limit than the supervisor's).
Only a ``release`` command on the control topic re-admits it (failures start from 0).

The models and :class:`WorkerTopics` below are the pool's whole protocol; the
supervisor (:mod:`mesh.patterns.supervision.supervisor`) reads and writes the same topics.

Causation and trace context: outcomes and the status row after a task are caused by the
task and continue its trace. A row names the task in hand (id, correlation id,
``traceparent`` and event id), so a supervisor that finds the worker dead can report it
as an event of that task's workflow, caused by it. A heartbeat is the clock's own event:
it acts for no other event, so its causation is the timer's tick.

Example:
    >>> topics = WorkerTopics.named("jobs", job_topic)  # doctest: +SKIP
    >>> service = WorkerService(topics, summarise, produces=summaries)  # doctest: +SKIP
    >>> app = service.app  # mesh run mymod:app, once per replica  # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field

from mesh import envelope
from mesh.agent import Agent, App, Context
from mesh.errors import ConfigError
from mesh.runtime.runner import AgentRunner
from mesh.topic import Topic, TopicBundle

logger = logging.getLogger(__name__)

WORKER_ID_ENV = "MESH_WORKER_ID"
Status = Literal["idle", "busy", "quarantined", "dead"]
EventKind = Literal["worker_joined", "worker_failed", "worker_quarantined", "worker_released",
                    "worker_dead", "task_requeued", "task_recovered", "task_dead_lettered"]


class WorkerStatus(BaseModel):
    """One worker's row in the compacted status topic (key: worker id)."""

    worker_id: str
    instance: str = ""  # one per process start: tells a restart from a replay
    pid: int = 0
    host: str = ""
    status: Status = "idle"
    current_task: str | None = None
    current_correlation: str | None = None
    current_traceparent: str | None = None
    current_carried: dict[str, bytes] | None = None  # the task's tracestate and headers
    current_event_id: str | None = None  # of the task in hand: worker_dead names it
    consecutive_failures: int = 0
    tasks_done: int = 0
    tasks_failed: int = 0
    throughput: float = 0.0  # tasks done per second over the last window
    partitions: list[int] = Field(default_factory=list)  # of the task topic, held now
    last_error: str | None = None
    started_ms: int = 0
    heartbeat_ms: int = 0


class TaskOutcome(BaseModel):
    """What a worker did with one task; a failure carries the task (JSON) for requeue."""

    task_id: str
    worker_id: str
    instance: str
    ok: bool
    handed_back: bool = False  # taken while quarantining: returned, not a failure
    consecutive_failures: int = 0
    error: str | None = None
    task: Any = None
    duration_ms: int = 0
    at_ms: int = 0


class WorkerCommand(BaseModel):
    """A supervisor's order to one worker instance (or any instance, if blank)."""

    worker_id: str
    action: Literal["quarantine", "release"]
    instance: str = ""
    reason: str = ""
    at_ms: int = 0


class SupervisorEvent(BaseModel):
    """A supervisor decision, for taps and dashboards; keyed by worker or task id."""

    kind: EventKind
    subject: str
    worker_id: str | None = None
    task_id: str | None = None
    failures: int = 0
    detail: str = ""
    at_ms: int = 0


class WorkerView(BaseModel):
    """The supervisor's judgement of one worker (its compacted state).

    ``last`` is the row it judged from, ``last_event_id`` the event id of the status
    record that row came from (what the supervisor's timer names as the cause of a dead
    row).
    """

    worker_id: str
    instance: str
    state: Literal["alive", "failed", "quarantined", "dead"] = "alive"
    last_heartbeat_ms: int = 0
    last: WorkerStatus | None = None
    last_event_id: str | None = None


class TaskRetry(BaseModel):
    """A failed task waiting for (or on) its next attempt (the supervisor's state).

    ``outcome_event_id``, ``traceparent`` and ``carried`` are those of the latest failed
    outcome counted: the supervisor's timer republishes the task (or gives up on it) on
    behalf of that outcome, in its trace, with its headers and naming it as the cause.
    """

    task_id: str
    correlation_id: str
    traceparent: str | None = None  # of the latest failed outcome: the requeue continues it
    carried: dict[str, bytes] | None = None  # its tracestate and headers, carried on too
    outcome_event_id: str | None = None  # the same outcome's: the requeue's cause
    task: Any = None
    failures: int = 0
    attempts: int = 0
    failed_on: list[str] = Field(default_factory=list)
    errors: list[str] = Field(default_factory=list)
    due_at_ms: int | None = None  # None: republished, waiting for its outcome
    counted: list[str] = Field(default_factory=list)  # outcome event ids (replays)


class DeadTask(BaseModel):
    """A task given up on, with every worker that failed it and why."""

    task_id: str
    task: Any = None
    failures: int
    attempts: int
    failed_on: list[str]
    errors: list[str]
    reason: str


@dataclass(frozen=True, slots=True)
class WorkerTopics(TopicBundle):
    """The topics of one supervised pool; build them with :meth:`named`."""

    tasks: Topic[Any]
    status: Topic[WorkerStatus]
    outcomes: Topic[TaskOutcome]
    control: Topic[WorkerCommand]
    events: Topic[SupervisorEvent]
    views: Topic[WorkerView]
    retries: Topic[TaskRetry]
    dead: Topic[DeadTask]

    def __post_init__(self) -> None:
        if self.tasks.key is None:
            raise ConfigError(f"Task topic {self.tasks.name!r} has no key field: workers "
                              "name tasks by it. Declare the topic with key='<id field>'.")

    @classmethod
    def named(cls, prefix: str, tasks: Topic[Any], *, partitions: int = 3) -> WorkerTopics:
        """The pool's topics named ``<prefix>.status``, ``.outcomes``, ``.control``,
        ``.events``, ``.supervision``, ``.retries``, ``.dead`` around ``tasks``.

        Example:
            >>> topics = WorkerTopics.named("jobs", job_topic)  # doctest: +SKIP
            >>> topics.status.name  # doctest: +SKIP
            'jobs.status'
        """
        def topic(name: str, model: type[BaseModel], key: str,
                  compacted: bool = False) -> Topic[Any]:
            return Topic(f"{prefix}.{name}", model, key=key, partitions=partitions,
                         compacted=compacted)

        return cls(
            tasks, topic("status", WorkerStatus, "worker_id", True),
            topic("outcomes", TaskOutcome, "task_id"),
            topic("control", WorkerCommand, "worker_id"),
            topic("events", SupervisorEvent, "subject"),
            topic("supervision", WorkerView, "worker_id", True),
            topic("retries", TaskRetry, "task_id", True), topic("dead", DeadTask, "task_id"))

    def all(self) -> list[Topic[Any]]:
        """Every topic of the pool, for ``apply_topics``."""
        return [self.tasks, self.status, self.outcomes, self.control, self.events,
                self.views, self.retries, self.dead]


TaskFunction = Callable[[Any, Context], Awaitable[Any]]


class WorkerService:
    """One worker replica: the task agent (group ``name``, by default
    ``<task topic>-worker``, shared by the replicas) and its control listener (a group
    of its own, ``<name>.control.<worker id>``), deployed together as ``app``.

    The task function's return value goes to ``produces`` as with any agent. An
    exception is a failed task: its outputs are dropped, the outcome (with the task) is
    produced and the input committed; the supervisor decides about a retry. After
    ``max_failures`` failures in a row (default 3, as ``SupervisorPolicy``; use the same
    value) the worker quarantines itself (see the module docstring for the bound on
    the tasks it fails). Handlers
    must be idempotent: a replay after a crash runs the task again. Give each replica a
    stable ``MESH_WORKER_ID`` (a pod name): a generated one leaves a control group
    behind per process start.

    Example:
        >>> async def summarise(job: Job, ctx: Context) -> Summary: ...  # doctest: +SKIP
        >>> service = WorkerService(topics, summarise, produces=summaries)  # doctest: +SKIP
        >>> app = service.app  # mesh run mymod:app, once per replica  # doctest: +SKIP
    """

    def __init__(self, topics: WorkerTopics, task: TaskFunction, *,
                 produces: Topic[Any] | Sequence[Topic[Any]] = (), name: str | None = None,
                 worker_id: str | None = None, heartbeat_s: float = 1.0,
                 window_s: float = 60.0, max_failures: int | None = 3,
                 concurrency: int = 1) -> None:
        if max_failures is not None and max_failures <= 0:
            raise ConfigError(f"WorkerService max_failures={max_failures} must be positive: "
                              "set it to the supervisor's SupervisorPolicy.max_failures, or "
                              "None to leave quarantine to the supervisor.")
        self.topics, self.max_failures = topics, max_failures
        self._heartbeat_s = heartbeat_s
        name = name or f"{topics.tasks.name}-worker"  # the group: one per pool
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.worker_id = (worker_id or os.environ.get(WORKER_ID_ENV)
                          or f"{self.host}-{self.pid}-{uuid.uuid4().hex[:4]}")
        self.instance = uuid.uuid4().hex[:12]
        self.started_ms = envelope.now_ms()
        self._task, self._window_s = task, window_s
        self._done_at: deque[float] = deque()
        # event id of the task -> (task id, correlation id, traceparent, carried)
        self._in_hand: dict[str, tuple[str, str, str, dict[str, bytes]]] = {}
        self.runner: AgentRunner | None = None
        self.quarantined = False
        self.consecutive_failures = self.tasks_done = self.tasks_failed = 0
        self.last_error: str | None = None
        extra = [produces] if isinstance(produces, Topic) else list(produces)
        self.worker = Agent(name, consumes=topics.tasks,
                            produces=[*extra, topics.status, topics.outcomes],
                            handler=self._handle, description=f"worker {self.worker_id}",
                            concurrency=concurrency)
        self.worker.every(heartbeat_s)(self._heartbeat)
        self.control = Agent(f"{name}-control", consumes=topics.control,
                             produces=[topics.status], handler=self._command,
                             group=f"{name}.control.{self.worker_id}")
        self.app = App(name, agents=[self.worker, self.control])

    def bind(self, runner: AgentRunner) -> None:
        """Use ``runner`` to quarantine (found by itself on the first heartbeat)."""
        self.runner = runner

    def status(self) -> WorkerStatus:
        """This replica's row as of now."""
        event_id = next(reversed(self._in_hand), None)
        task_id, correlation, trace, carried = (self._in_hand[event_id] if event_id is not None
                                                else (None, None, None, None))
        now = time.monotonic()
        while self._done_at and now - self._done_at[0] > self._window_s:
            self._done_at.popleft()
        elapsed = min(self._window_s, max(1e-3, (envelope.now_ms() - self.started_ms) / 1000))
        partitions = sorted(p for t, p in self.runner.assignment()
                            if t == self.topics.tasks.name) if self.runner else []
        return WorkerStatus(
            worker_id=self.worker_id, instance=self.instance, pid=self.pid, host=self.host,
            status="quarantined" if self.quarantined else "busy" if self._in_hand else "idle",
            current_task=task_id, current_correlation=correlation, current_traceparent=trace,
            current_carried=carried, current_event_id=event_id,
            consecutive_failures=self.consecutive_failures, tasks_done=self.tasks_done,
            tasks_failed=self.tasks_failed, throughput=round(len(self._done_at) / elapsed, 3),
            partitions=partitions, last_error=self.last_error, started_ms=self.started_ms,
            heartbeat_ms=envelope.now_ms())

    async def quarantine(self, reason: str = "") -> None:
        """Stop taking work: leave the task group (partitions move to healthy replicas);
        heartbeats go on. Tasks that arrive meanwhile are handed back, not failed.

        Call it from outside the task handler (the control listener, the heartbeat):
        the runner waits for the task lanes, the handler's own included."""
        self._stop_taking_work(reason or "ordered")
        if self.runner is None:
            logger.error("worker %s has no runner yet; handing tasks back until it has",
                         self.worker_id)
            return
        await self._leave_group()

    def release(self) -> None:
        """Take work again (the supervisor's or an operator's decision, as a ``release``
        command on the control topic); failures start from zero."""
        if self.quarantined:
            self.quarantined, self.consecutive_failures = False, 0
            if self.runner is not None:
                self.runner.end_hold()
                self.runner.release()
            logger.info("worker %s released", self.worker_id)

    def _stop_taking_work(self, reason: str) -> None:
        """Quarantined from now on: no input is run any more (each is handed back), and
        the runner's partitions are held until the group is left. No awaits: the task
        handler calls it before it returns."""
        if self.quarantined:
            return
        self.quarantined = True
        logger.warning("worker %s quarantined: %s", self.worker_id, reason)
        if self.runner is not None:
            # Bounded: if leaving never happens, the hold ends and inputs are handed back.
            self.runner.hold(time.time() + max(30.0, 10 * self._heartbeat_s))

    async def _leave_group(self) -> None:
        assert self.runner is not None
        await self.runner.quarantine()  # a no-op once the runner has left
        self.runner.end_hold()  # its lanes are closed: nothing is held any more

    async def _heartbeat(self, ctx: Context) -> None:
        self.runner = self.runner or ctx.runner
        if self.runner is not None and self.quarantined and not self.runner.quarantined:
            await self._leave_group()  # quarantined by itself (or before the runner was known)
        ctx.emit(self.topics.status, self.status())

    async def _command(self, command: WorkerCommand, ctx: Context) -> None:
        if command.worker_id != self.worker_id or command.instance not in ("", self.instance):
            return
        if command.action == "quarantine":
            await self.quarantine(command.reason)
        else:
            self.release()
        ctx.emit(self.topics.status, self.status())

    async def _handle(self, payload: Any, ctx: Context) -> Any:
        task_id = str(getattr(payload, self.topics.tasks.key or ""))
        self.runner = self.runner or ctx.runner
        if self.quarantined:
            self._report(ctx, payload, task_id, 0.0, handed_back=True,
                         error="worker quarantined: task handed back")
            return None
        self._in_hand[ctx.event_id] = (task_id, ctx.correlation_id, ctx.traceparent,
                                       ctx.carried)
        started = time.monotonic()
        try:
            result = await self._task(payload, ctx)
        except Exception as exc:  # a failed task: reported, requeued by the supervisor
            ctx.outputs.clear()
            ctx.staged.clear()
            self.consecutive_failures += 1
            self.tasks_failed += 1
            self.last_error = f"{type(exc).__name__}: {exc}"[:500]
            logger.warning("worker %s: task %s failed (%d in a row): %s", self.worker_id,
                           task_id, self.consecutive_failures, self.last_error)
            self._in_hand.pop(ctx.event_id, None)  # the row reported with it: not in hand
            if self.max_failures is not None and self.consecutive_failures >= self.max_failures:
                self._stop_taking_work(f"{self.consecutive_failures} consecutive failures "
                                       f"(limit {self.max_failures})")
            self._report(ctx, payload, task_id, started, error=self.last_error)
            return None
        finally:
            self._in_hand.pop(ctx.event_id, None)
        self.consecutive_failures = 0
        self.tasks_done += 1
        self._done_at.append(time.monotonic())
        self._report(ctx, payload, task_id, started)
        return result

    def _report(self, ctx: Context, payload: Any, task_id: str, started: float, *,
                error: str | None = None, handed_back: bool = False) -> None:
        ok = error is None
        ctx.emit(self.topics.outcomes, TaskOutcome(
            task_id=task_id, worker_id=self.worker_id, instance=self.instance, ok=ok,
            handed_back=handed_back, consecutive_failures=self.consecutive_failures,
            error=error, task=None if ok else payload.model_dump(mode="json"),
            duration_ms=int((time.monotonic() - started) * 1000) if started else 0,
            at_ms=envelope.now_ms()))
        ctx.emit(self.topics.status, self.status())


def worker(topics: WorkerTopics, *, produces: Topic[Any] | Sequence[Topic[Any]] = (),
           name: str | None = None, **options: Any) -> Callable[[TaskFunction], WorkerService]:
    """Build a :class:`WorkerService` from a task function (a decorator).

    Example:
        >>> @worker(topics, produces=summaries)  # doctest: +SKIP
        ... async def summariser(job: Job, ctx: Context) -> Summary: ...
        >>> app = summariser.app  # doctest: +SKIP
    """
    return lambda task: WorkerService(topics, task, produces=produces, name=name, **options)
