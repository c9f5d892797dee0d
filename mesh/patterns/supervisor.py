"""Supervisor with workers: replicas share a consumer group, a supervisor watches them.

* **Workers** (:class:`WorkerService`) are replicas of one agent in one consumer group
  on the task topic, so Kafka balances partitions and moves them off dead replicas.
  Each has a worker id (``MESH_WORKER_ID`` or generated) and publishes its row
  (:class:`WorkerStatus`: idle/busy/quarantined, task in hand, consecutive failures,
  tasks done, throughput, partitions) to a compacted status topic keyed by worker id:
  on a heartbeat timer and after every task, with a :class:`TaskOutcome` event.
  A failed task is not dead-lettered by the worker: its outcome carries the task, and
  the input is committed once that outcome is acknowledged (nothing is lost).
* **The supervisor** (:class:`Supervisor`, one replica) consumes statuses and outcomes.
  A worker reaching ``max_failures`` consecutive failures is told on the control topic
  to stop taking work; it calls ``AgentRunner.quarantine()`` (finishes the task in hand,
  commits, leaves the group: its partitions move to healthy replicas) and keeps
  heartbeating as quarantined. A failed task waits in the supervisor's compacted
  retries table until its retry-after time, then is republished with a key chosen to
  land on a partition a healthy worker holds that has not failed it. A task that failed
  on ``max_task_workers`` different workers (or ``max_task_attempts`` times) goes to the
  dead-task topic. A worker whose heartbeats stop for ``dead_after_s`` is marked dead.
* Every decision is a :class:`SupervisorEvent` on the events topic, carrying the task's
  correlation id where there is one (``mesh tap <prefix>.events``).
* Trace context: the retries table keeps the failed task's ``traceparent``, so a task
  the timer republishes (and its dead-task record) stays in the task's trace; a worker's
  row names the traceparent of the task in hand, so ``worker_dead`` is in that trace.

This module is longer than the house limit (about 650 lines): the worker, the
supervisor and the ``mesh workers`` table share one protocol (the models below). It
would split cleanly into ``worker.py`` (models, topics, :class:`WorkerService`) and
``supervisor.py`` (:class:`Supervisor`, partition keys, the table).

Example:
    >>> topics = worker_topics("jobs", tasks=job_topic)  # doctest: +SKIP
    >>> service = WorkerService(topics, summarise, produces=summaries)  # doctest: +SKIP
    >>> supervisor = Supervisor(topics, SupervisorPolicy(max_failures=3))  # doctest: +SKIP
    >>> # mesh run mymod:service.app (per replica) and mesh run mymod:supervisor.agent
"""

from __future__ import annotations

import logging
import os
import socket
import time
import uuid
import zlib
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationError
from rich.table import Table

from mesh import envelope
from mesh.agent import Agent, App, Context
from mesh.codec import Codec
from mesh.config import KafkaSettings
from mesh.errors import ConfigError
from mesh.runtime import AgentRunner
from mesh.state import CompactedTable
from mesh.topic import Topic

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
    """The supervisor's judgement of one worker (its compacted state)."""

    worker_id: str
    instance: str
    state: Literal["alive", "failed", "quarantined", "dead"] = "alive"
    last_heartbeat_ms: int = 0
    last: WorkerStatus | None = None


class TaskRetry(BaseModel):
    """A failed task waiting for (or on) its next attempt (the supervisor's state)."""

    task_id: str
    correlation_id: str
    traceparent: str | None = None  # of the failed task: the requeue continues it
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
class WorkerTopics:
    """The topics of one supervised pool; build them with :func:`worker_topics`."""

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

    @property
    def all(self) -> list[Topic[Any]]:
        """Every topic of the pool, for ``apply_topics``."""
        return [self.tasks, self.status, self.outcomes, self.control, self.events,
                self.views, self.retries, self.dead]


def worker_topics(prefix: str, tasks: Topic[Any], *, partitions: int = 3) -> WorkerTopics:
    """The pool's topics named ``<prefix>.status``, ``.outcomes``, ``.control``,
    ``.events``, ``.supervision``, ``.retries``, ``.dead`` around ``tasks``.

    Example:
        >>> topics = worker_topics("jobs", job_topic)  # doctest: +SKIP
        >>> topics.status.name  # doctest: +SKIP
        'jobs.status'
    """
    def topic(name: str, model: type[BaseModel], key: str, compacted: bool = False) -> Topic[Any]:
        return Topic(f"{prefix}.{name}", model, key=key, partitions=partitions,
                     compacted=compacted)

    return WorkerTopics(
        tasks, topic("status", WorkerStatus, "worker_id", True),
        topic("outcomes", TaskOutcome, "task_id"), topic("control", WorkerCommand, "worker_id"),
        topic("events", SupervisorEvent, "subject"),
        topic("supervision", WorkerView, "worker_id", True),
        topic("retries", TaskRetry, "task_id", True), topic("dead", DeadTask, "task_id"))


TaskFunction = Callable[[Any, Context], Awaitable[Any]]


class WorkerService:
    """One worker replica: the task agent (group ``name``, by default
    ``<task topic>-worker``, shared by the replicas) and its control listener (a group
    of its own, ``<name>.control.<worker id>``), deployed together as ``app``.

    The task function's return value goes to ``produces`` as with any agent. An
    exception is a failed task: its outputs are dropped, the outcome (with the task) is
    produced and the input committed; the supervisor decides about a retry. Handlers
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
                 window_s: float = 60.0) -> None:
        self.topics = topics
        name = name or f"{topics.tasks.name}-worker"  # the group: one per pool
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.worker_id = (worker_id or os.environ.get(WORKER_ID_ENV)
                          or f"{self.host}-{self.pid}-{uuid.uuid4().hex[:4]}")
        self.instance = uuid.uuid4().hex[:12]
        self.started_ms = envelope.now_ms()
        self._task, self._window_s = task, window_s
        self._done_at: deque[float] = deque()
        # event id -> (task id, correlation id, traceparent)
        self._in_hand: dict[str, tuple[str, str, str]] = {}
        self.runner: AgentRunner | None = None
        self.quarantined = False
        self.consecutive_failures = self.tasks_done = self.tasks_failed = 0
        self.last_error: str | None = None
        extra = [produces] if isinstance(produces, Topic) else list(produces)
        self.worker = Agent(name, consumes=topics.tasks,
                            produces=[*extra, topics.status, topics.outcomes],
                            handler=self._handle, description=f"worker {self.worker_id}")
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
        task_id, correlation, trace = next(reversed(self._in_hand.values()),
                                           (None, None, None))
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
            consecutive_failures=self.consecutive_failures, tasks_done=self.tasks_done,
            tasks_failed=self.tasks_failed, throughput=round(len(self._done_at) / elapsed, 3),
            partitions=partitions, last_error=self.last_error, started_ms=self.started_ms,
            heartbeat_ms=envelope.now_ms())

    async def quarantine(self, reason: str = "") -> None:
        """Stop taking work: leave the task group (partitions move to healthy replicas);
        heartbeats go on. Tasks that arrive meanwhile are handed back, not failed."""
        if self.quarantined:
            return
        self.quarantined = True
        logger.warning("worker %s quarantined: %s", self.worker_id, reason or "ordered")
        if self.runner is None:
            logger.error("worker %s has no runner yet; handing tasks back until it has",
                         self.worker_id)
            return
        await self.runner.quarantine()

    def release(self) -> None:
        """Take work again (an operator's decision); failures start from zero."""
        if self.quarantined:
            self.quarantined, self.consecutive_failures = False, 0
            if self.runner is not None:
                self.runner.release()
            logger.info("worker %s released", self.worker_id)

    async def _heartbeat(self, ctx: Context) -> None:
        if self.runner is None:
            self.runner = ctx.runner
            if self.runner is not None and self.quarantined:
                await self.runner.quarantine()  # ordered before the runner was known
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
        if self.quarantined:
            self._report(ctx, payload, task_id, 0.0, handed_back=True,
                         error="worker quarantined: task handed back")
            return None
        self._in_hand[ctx.event_id] = (task_id, ctx.correlation_id, ctx.traceparent)
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


@dataclass(frozen=True, slots=True)
class SupervisorPolicy:
    """When the supervisor acts. Delays double per failure, up to the maximum."""

    max_failures: int = 3
    dead_after_s: float = 10.0
    check_every_s: float = 0.5
    requeue_delay_s: float = 1.0
    requeue_delay_max_s: float = 30.0
    max_task_workers: int = 3
    max_task_attempts: int = 10

    def __post_init__(self) -> None:
        for name in ("max_failures", "dead_after_s", "check_every_s", "max_task_workers",
                     "max_task_attempts"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"SupervisorPolicy.{name}={getattr(self, name)} must be "
                                  "positive: set it above 0.")


class Supervisor:
    """The supervisor service: ``agent`` consumes statuses and outcomes, keeps worker
    views and pending retries in compacted topics, and acts on a timer.

    Run one replica (its timer decides for the whole pool). After a restart it rebuilds
    both tables and waits ``dead_after_s`` before judging heartbeats.

    Example:
        >>> supervisor = Supervisor(topics, SupervisorPolicy(max_failures=3))  # doctest: +SKIP
        >>> async with Mesh(settings, [supervisor.agent]): ...  # doctest: +SKIP
    """

    def __init__(self, topics: WorkerTopics, policy: SupervisorPolicy | None = None, *,
                 name: str | None = None) -> None:
        self.topics, self.policy = topics, policy or SupervisorPolicy()
        name = name or f"{topics.tasks.name}-supervisor"
        self.agent: Agent[Any] = Agent(name, consumes=[topics.status, topics.outcomes],
                           produces=[topics.tasks, topics.control, topics.events, topics.dead,
                                     topics.status],
                           handler=self._handle, state=[topics.views, topics.retries],
                           description="supervises the workers of " + topics.tasks.name)
        self.agent.every(self.policy.check_every_s)(self._tick)
        self.latest: dict[str, WorkerStatus] = {}  # newest heartbeat per worker
        self._judge_from: float | None = None

    async def _handle(self, payload: Any, ctx: Context) -> None:
        # No awaits below: each handler reads and stages table writes atomically.
        if isinstance(payload, WorkerStatus):
            self._on_status(payload, ctx)
        elif isinstance(payload, TaskOutcome):
            self._on_outcome(payload, ctx)

    def _event(self, ctx: Context, kind: EventKind, *, worker_id: str | None = None,
               task_id: str | None = None, correlation: str | None = None,
               failures: int = 0, detail: str = "", traceparent: str | None = None) -> None:
        """Emit a decision; from the timer, ``traceparent`` puts it in the task's trace
        (a handler's decisions continue the trace of its input)."""
        logger.info("supervisor: %s worker=%s task=%s %s", kind, worker_id, task_id, detail)
        ctx.emit(self.topics.events, SupervisorEvent(
            kind=kind, subject=worker_id or task_id or "", worker_id=worker_id,
            task_id=task_id, failures=failures, detail=detail, at_ms=envelope.now_ms()),
            correlation_id=correlation, traceparent=traceparent)

    def _on_status(self, status: WorkerStatus, ctx: Context) -> None:
        if status.status == "dead":  # our own mark, read back
            return
        known = self.latest.get(status.worker_id)
        if known is None or status.heartbeat_ms > known.heartbeat_ms:
            self.latest[status.worker_id] = status
        view = ctx.get(self.topics.views, status.worker_id)
        if view is not None and view.state == "dead" and view.instance == status.instance \
                and status.heartbeat_ms <= view.last_heartbeat_ms:
            return  # an old heartbeat replayed: the worker is still dead
        before = view
        if view is None or view.instance != status.instance or view.state == "dead":
            view = WorkerView(worker_id=status.worker_id, instance=status.instance)
            self._event(ctx, "worker_joined", worker_id=status.worker_id,
                        detail=f"pid {status.pid} on {status.host}")
        view = self._judge(ctx, view, status.consecutive_failures, status)
        # Heartbeats live in memory; the table gets one when the view changes, or when
        # the stored one is a third of dead_after_s old (a restart judges from it).
        if before is None or view.instance != before.instance or view.state != before.state \
                or status.heartbeat_ms - before.last_heartbeat_ms > self.policy.dead_after_s * 333:
            ctx.put(self.topics.views, status.worker_id, view.model_copy(
                update={"last_heartbeat_ms": status.heartbeat_ms, "last": status}))

    def _judge(self, ctx: Context, view: WorkerView, failures: int,
               status: WorkerStatus | None, correlation: str | None = None) -> WorkerView:
        """The view after what a status (or an outcome, without one) says."""
        wid = view.worker_id
        if status is not None and status.status == "quarantined" and view.state != "quarantined":
            self._event(ctx, "worker_quarantined", worker_id=wid, failures=failures,
                        detail="left the task group; heartbeats go on")
            return view.model_copy(update={"state": "quarantined"})
        if status is not None and status.status != "quarantined" and view.state == "quarantined":
            self._event(ctx, "worker_released", worker_id=wid)
            return view.model_copy(update={"state": "alive"})
        if view.state == "alive" and failures >= self.policy.max_failures:
            reason = f"{failures} consecutive failures (limit {self.policy.max_failures})"
            ctx.emit(self.topics.control, WorkerCommand(
                worker_id=wid, action="quarantine", instance=view.instance, reason=reason,
                at_ms=envelope.now_ms()), correlation_id=correlation)
            self._event(ctx, "worker_failed", worker_id=wid, failures=failures,
                        correlation=correlation, detail=reason + ": told to quarantine")
            return view.model_copy(update={"state": "failed"})
        return view

    def _on_outcome(self, outcome: TaskOutcome, ctx: Context) -> None:
        view = ctx.get(self.topics.views, outcome.worker_id)
        if view is not None and view.instance == outcome.instance:
            judged = self._judge(ctx, view, outcome.consecutive_failures, None,
                                 ctx.correlation_id)
            if judged is not view:
                ctx.put(self.topics.views, outcome.worker_id, judged)
        retry = ctx.get(self.topics.retries, outcome.task_id)
        if outcome.ok:
            if retry is not None:
                ctx.delete(self.topics.retries, outcome.task_id)
                self._event(ctx, "task_recovered", worker_id=outcome.worker_id,
                            task_id=outcome.task_id, correlation=ctx.correlation_id,
                            failures=retry.failures, detail=f"after {retry.attempts} requeue(s)")
            return
        self._requeue(outcome, retry, ctx)

    def _requeue(self, outcome: TaskOutcome, retry: TaskRetry | None, ctx: Context) -> None:
        retry = retry or TaskRetry(task_id=outcome.task_id, correlation_id=ctx.correlation_id,
                                   traceparent=ctx.traceparent)
        if ctx.event_id in retry.counted:
            return  # this outcome was counted before a restart
        failed = not outcome.handed_back
        failed_on = retry.failed_on + ([outcome.worker_id] if failed and
                                       outcome.worker_id not in retry.failed_on else [])
        retry = retry.model_copy(update={
            "task": outcome.task if outcome.task is not None else retry.task,
            "failures": retry.failures + int(failed), "attempts": retry.attempts + 1,
            "failed_on": failed_on, "counted": [*retry.counted, ctx.event_id][-20:],
            "errors": ([*retry.errors, f"{outcome.worker_id}: {outcome.error}"][-5:]
                       if failed else retry.errors)})
        policy, tid, cid = self.policy, outcome.task_id, retry.correlation_id
        reason = (f"failed on {len(failed_on)} workers (limit {policy.max_task_workers})"
                  if len(failed_on) >= policy.max_task_workers else
                  f"{retry.attempts} attempts (limit {policy.max_task_attempts})"
                  if retry.attempts >= policy.max_task_attempts else
                  "no task in its outcome" if retry.task is None else None)
        if reason is not None:
            self._give_up(ctx, retry, reason, outcome.worker_id)
            return
        delay = min(policy.requeue_delay_max_s,
                    policy.requeue_delay_s * 2 ** max(0, retry.failures - 1))
        ctx.put(self.topics.retries, tid,
                retry.model_copy(update={"due_at_ms": envelope.now_ms() + int(delay * 1000)}))
        why = outcome.error or "failed"
        self._event(ctx, "task_requeued", worker_id=outcome.worker_id, task_id=tid,
                    correlation=cid, failures=retry.failures,
                    detail=f"{why}; retry in {delay:.1f} s, avoiding {', '.join(failed_on)}")

    async def _tick(self, ctx: Context) -> None:
        if not ctx.assigned:  # tables are rebuilt on assignment: judge only after it
            self._judge_from = None
            return
        if self._judge_from is None:
            self._judge_from = time.monotonic() + self.policy.dead_after_s
        now = envelope.now_ms()
        views = ctx.table(self.topics.views)
        if time.monotonic() >= self._judge_from:
            for wid, view in list(views.items()):
                last = self.latest.get(wid) or view.last
                heard = max(view.last_heartbeat_ms, last.heartbeat_ms if last else 0)
                if view.state != "dead" and now - heard > self.policy.dead_after_s * 1000:
                    self._mark_dead(ctx, view, last, heard, now)
        for tid, retry in list(ctx.table(self.topics.retries).items()):
            if retry.due_at_ms is not None and retry.due_at_ms <= now:
                self._resubmit(ctx, tid, retry, views)

    def _give_up(self, ctx: Context, retry: TaskRetry, reason: str,
                 worker_id: str | None, *, traceparent: str | None = None) -> None:
        ctx.emit(self.topics.dead, DeadTask(
            task_id=retry.task_id, task=retry.task, failures=retry.failures,
            attempts=retry.attempts, failed_on=retry.failed_on, errors=retry.errors,
            reason=reason), correlation_id=retry.correlation_id, traceparent=traceparent)
        ctx.delete(self.topics.retries, retry.task_id)
        self._event(ctx, "task_dead_lettered", worker_id=worker_id, task_id=retry.task_id,
                    correlation=retry.correlation_id, failures=retry.failures, detail=reason,
                    traceparent=traceparent)

    def _resubmit(self, ctx: Context, tid: str, retry: TaskRetry, views: Any) -> None:
        try:
            task = self.topics.tasks.model.model_validate(retry.task)
        except ValidationError as exc:  # the task model changed under it
            name = self.topics.tasks.model.__name__
            self._give_up(ctx, retry, f"not a {name} any more: {exc}"[:1000], None,
                          traceparent=retry.traceparent)
            return
        key = key_for_partition(tid, self._target(tid, retry, views),
                                self.topics.tasks.partitions)
        # From the timer: the republished task continues the failed task's trace.
        ctx.emit(self.topics.tasks, task, key=key, correlation_id=retry.correlation_id,
                 traceparent=retry.traceparent)
        ctx.put(self.topics.retries, tid, retry.model_copy(update={"due_at_ms": None}))

    def _mark_dead(self, ctx: Context, view: WorkerView, last: WorkerStatus | None,
                   heard: int, now: int) -> None:
        wid = view.worker_id
        row = (last or WorkerStatus(worker_id=wid, instance=view.instance)).model_copy(
            update={"status": "dead", "partitions": []})
        ctx.put(self.topics.views, wid, view.model_copy(
            update={"state": "dead", "last_heartbeat_ms": heard, "last": row}))
        ctx.emit(self.topics.status, row)
        self.latest[wid] = row
        self._event(ctx, "worker_dead", worker_id=wid, task_id=row.current_task,
                    correlation=row.current_correlation, traceparent=row.current_traceparent,
                    detail=f"no heartbeat for {(now - heard) / 1000:.1f} s "
                           f"(pid {row.pid} on {row.host}); Kafka moves its partitions")

    def _target(self, task_id: str, retry: TaskRetry, views: Any) -> int | None:
        """A partition held by a healthy worker that has not failed this task."""
        owners = {}
        for wid, view in views.items():
            status = self.latest.get(wid) or view.last
            if view.state == "alive" and status is not None and status.status != "quarantined":
                owners[wid] = status.partitions
        candidates = sorted({p for wid, parts in owners.items() if wid not in retry.failed_on
                             for p in parts})
        if not candidates:
            return None
        return candidates[zlib.crc32(f"{task_id}/{retry.attempts}".encode()) % len(candidates)]


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash, as the default partitioner of every Kafka client uses it."""
    m, length = 0x5BD1E995, len(data)
    h = (0x9747B28C ^ length) & 0xFFFFFFFF
    for i in range(0, length - length % 4, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * m) & 0xFFFFFFFF
        k = ((k ^ (k >> 24)) * m) & 0xFFFFFFFF
        h = ((h * m) & 0xFFFFFFFF) ^ k
    tail = data[length - length % 4:]
    if tail:
        for index in range(len(tail) - 1, -1, -1):
            h ^= tail[index] << (8 * index)
        h = (h * m) & 0xFFFFFFFF
    h = ((h ^ (h >> 13)) * m) & 0xFFFFFFFF
    return h ^ (h >> 15)


def partition_of(key: bytes, partitions: int) -> int:
    """The partition the default partitioner sends ``key`` to."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def key_for_partition(task_id: str, partition: int | None, partitions: int) -> bytes:
    """A record key for ``task_id`` that lands on ``partition``: the id itself, else
    ``<id>~<n>`` for the first ``n`` that does (workers name tasks by the payload's
    field, not the key). With no partition wanted, the id itself."""
    for n in range(64 * partitions if partition is not None else 1):
        key = (task_id if n == 0 else f"{task_id}~{n}").encode()
        if partition is None or partition_of(key, partitions) == partition:
            return key
    return task_id.encode()


STATUS_STYLE = {"idle": "green", "busy": "cyan", "quarantined": "yellow", "dead": "red"}


def render_workers(rows: Iterable[WorkerStatus], *, now_ms: int | None = None,
                   stale_after_s: float = 10.0) -> Table:
    """The ``mesh workers`` table: one row per worker, heartbeat ages from ``now_ms``;
    a live worker's heartbeat older than ``stale_after_s`` is flagged.

    Example:
        >>> rows = await load_workers(settings.kafka, topics.status)  # doctest: +SKIP
        >>> Console().print(render_workers(rows))  # doctest: +SKIP
    """
    now = envelope.now_ms() if now_ms is None else now_ms
    table = Table(title="Workers")
    for column, right in (("worker", False), ("status", False), ("task", False),
                          ("fails", True), ("done", True), ("per s", True),
                          ("partitions", False), ("heartbeat", True)):
        table.add_column(column, justify="right" if right else "left", no_wrap=True)
    for row in sorted(rows, key=lambda r: r.worker_id):
        age = max(0.0, (now - row.heartbeat_ms) / 1000)
        stale = row.status != "dead" and age > stale_after_s
        table.add_row(
            row.worker_id, f"[{STATUS_STYLE.get(row.status, 'white')}]{row.status}[/]",
            row.current_task or "-", str(row.consecutive_failures), str(row.tasks_done),
            f"{row.throughput:.2f}", ",".join(map(str, row.partitions)) or "-",
            f"[red]{age:.1f}s ago, stale[/]" if stale else f"{age:.1f}s ago")
    return table


async def load_workers(settings: KafkaSettings, status: Topic[WorkerStatus], *,
                       codec: Codec | None = None) -> list[WorkerStatus]:
    """Every worker's latest row, read from the compacted status topic."""
    table = CompactedTable(status, settings, codec or Codec())
    await table.restore()
    return [row for _, row in table.items()]
