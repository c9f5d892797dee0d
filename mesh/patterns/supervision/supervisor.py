"""Supervisor with workers: replicas share a consumer group, a supervisor watches them.

* **Workers** (:class:`WorkerService`, in :mod:`mesh.patterns.supervision.worker` with the models
  and topics the pool shares) are replicas of one agent in one consumer group on the
  task topic; each publishes its row (:class:`WorkerStatus`) to a compacted status topic
  on a heartbeat timer and after every task, with a :class:`TaskOutcome` event.
* **The supervisor** (:class:`Supervisor`, one replica) consumes statuses and outcomes.
  A worker reaching ``max_failures`` consecutive failures stops taking work by itself
  (the moment its handler sees the limit: see :mod:`mesh.patterns.supervision.worker` for the
  bound) and calls ``AgentRunner.quarantine()`` (finishes the tasks in hand, commits,
  leaves the group: its partitions move to healthy replicas) and keeps heartbeating as
  quarantined. The supervisor is the fleet-wide view: it records the failure and the
  quarantine as events, and orders a worker that has not quarantined itself to do so
  (a ``quarantine`` command on the control topic). Only a ``release`` command on the
  control topic re-admits a worker (``mesh emit <prefix>.control
  '{"worker_id": "w3", "action": "release"}'``); the supervisor records it as
  ``worker_released``. A failed task waits in the supervisor's compacted
  retries table until its retry-after time, then is republished with a key chosen to
  land on a partition a healthy worker holds that has not failed it. A task that failed
  on ``max_task_workers`` different workers (or ``max_task_attempts`` times) goes to the
  dead-task topic. A worker whose heartbeats stop for ``dead_after_s`` is marked dead.
* Every decision is a :class:`SupervisorEvent` on the events topic, carrying the task's
  correlation id where there is one (``mesh tap <prefix>.events``); ``mesh workers``
  shows the status table (:mod:`mesh.views.workers`).

**Causation and trace context.** A decision the supervisor takes while handling an
outcome or a status is caused by it and continues its trace. What its timer emits acts
for a record it kept, and names that record in ``mesh-causation`` (never the timer's
tick, which is in no topic) and continues its trace:

* a requeued task, and a task given up on from the timer (its dead task and
  ``task_dead_lettered``): the latest failed outcome of the task (the retries table
  keeps its event id and traceparent), so causation reads task -> failed outcome ->
  requeued task -> failed outcome -> dead task;
* ``worker_dead``: the task the worker had in hand (its row names it), in that task's
  workflow; with no task in hand, the last heartbeat heard;
* the worker's row marked dead: the last heartbeat heard.

Everything the pool defines is importable from here: the worker side is re-exported
from :mod:`mesh.patterns.supervision.worker`.

Example:
    >>> topics = WorkerTopics.named("jobs", job_topic)  # doctest: +SKIP
    >>> service = WorkerService(topics, summarise, produces=summaries)  # doctest: +SKIP
    >>> supervisor = Supervisor(topics, SupervisorPolicy(max_failures=3))  # doctest: +SKIP
    >>> # mesh run mymod:service.app (per replica) and mesh run mymod:supervisor.agent
"""

from __future__ import annotations

import logging
import time
import zlib
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from mesh import envelope
from mesh.agent import Agent, Context
from mesh.errors import ConfigError
from mesh.kafka.murmur import partition_for
from mesh.patterns.supervision.worker import (
    WORKER_ID_ENV,
    DeadTask,
    EventKind,
    Status,
    SupervisorEvent,
    TaskFunction,
    TaskOutcome,
    TaskRetry,
    WorkerCommand,
    WorkerService,
    WorkerStatus,
    WorkerTopics,
    WorkerView,
    worker,
)

__all__ = [
    "WORKER_ID_ENV",
    "DeadTask",
    "EventKind",
    "Status",
    "Supervisor",
    "SupervisorEvent",
    "SupervisorPolicy",
    "TaskFunction",
    "TaskOutcome",
    "TaskRetry",
    "WorkerCommand",
    "WorkerService",
    "WorkerStatus",
    "WorkerTopics",
    "WorkerView",
    "key_for_partition",
    "partition_of",
    "worker",
]

logger = logging.getLogger(__name__)


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
        self._heard: dict[str, str] = {}  # worker id -> the event id of its latest row
        self._judge_from: float | None = None

    async def _handle(self, payload: Any, ctx: Context) -> None:
        # No awaits below: each handler reads and stages table writes atomically.
        if isinstance(payload, WorkerStatus):
            self._on_status(payload, ctx)
        elif isinstance(payload, TaskOutcome):
            self._on_outcome(payload, ctx)

    def _event(self, ctx: Context, kind: EventKind, *, worker_id: str | None = None,
               task_id: str | None = None, correlation: str | None = None,
               failures: int = 0, detail: str = "", traceparent: str | None = None,
               carried: dict[str, bytes] | None = None, causation: str | None = None) -> None:
        """Emit a decision; from the timer, ``traceparent``, ``carried`` and ``causation``
        name the kept record it acts for (a handler's decisions are caused by its input)."""
        logger.info("supervisor: %s worker=%s task=%s %s", kind, worker_id, task_id, detail)
        ctx.emit(self.topics.events, SupervisorEvent(
            kind=kind, subject=worker_id or task_id or "", worker_id=worker_id,
            task_id=task_id, failures=failures, detail=detail, at_ms=envelope.now_ms()),
            correlation_id=correlation, traceparent=traceparent, carried=carried,
            causation_id=causation)

    def _on_status(self, status: WorkerStatus, ctx: Context) -> None:
        if status.status == "dead":  # our own mark, read back
            return
        known = self.latest.get(status.worker_id)
        if known is None or status.heartbeat_ms > known.heartbeat_ms:
            self.latest[status.worker_id] = status
            self._heard[status.worker_id] = ctx.event_id
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
            ctx.put(self.topics.views, status.worker_id, view.model_copy(update={
                "last_heartbeat_ms": status.heartbeat_ms, "last": status,
                "last_event_id": ctx.event_id}))

    def _judge(self, ctx: Context, view: WorkerView, failures: int,
               status: WorkerStatus | None, correlation: str | None = None) -> WorkerView:
        """The view after what a status (or an outcome, without one) says.

        Whichever of a worker's outcome and its quarantined row arrives first, a worker
        at the limit gets one ``worker_failed`` and then one ``worker_quarantined``.
        """
        wid = view.worker_id
        if view.state == "alive" and failures >= self.policy.max_failures:
            reason = f"{failures} consecutive failures (limit {self.policy.max_failures})"
            row = status or self.latest.get(wid)
            if row is not None and row.instance == view.instance \
                    and row.status == "quarantined":
                detail = reason + ": it quarantined itself"
            else:  # not known to have stopped (its row may be on the way): order it;
                # a worker that already quarantined itself ignores the order
                ctx.emit(self.topics.control, WorkerCommand(
                    worker_id=wid, action="quarantine", instance=view.instance, reason=reason,
                    at_ms=envelope.now_ms()), correlation_id=correlation)
                detail = reason + ": quarantine ordered"
            self._event(ctx, "worker_failed", worker_id=wid, failures=failures,
                        correlation=correlation, detail=detail)
            view = view.model_copy(update={"state": "failed"})
        if status is not None and status.status == "quarantined" and view.state != "quarantined":
            self._event(ctx, "worker_quarantined", worker_id=wid, failures=failures,
                        detail="stopped taking work and left the task group; heartbeats go on")
            return view.model_copy(update={"state": "quarantined"})
        if status is not None and status.status != "quarantined" and view.state == "quarantined":
            self._event(ctx, "worker_released", worker_id=wid)
            return view.model_copy(update={"state": "alive"})
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
        retry = retry or TaskRetry(task_id=outcome.task_id, correlation_id=ctx.correlation_id)
        if ctx.event_id in retry.counted:
            return  # this outcome was counted before a restart
        failed = not outcome.handed_back
        failed_on = retry.failed_on + ([outcome.worker_id] if failed and
                                       outcome.worker_id not in retry.failed_on else [])
        retry = retry.model_copy(update={
            "task": outcome.task if outcome.task is not None else retry.task,
            "failures": retry.failures + int(failed), "attempts": retry.attempts + 1,
            "failed_on": failed_on, "counted": [*retry.counted, ctx.event_id][-20:],
            "traceparent": ctx.traceparent, "carried": ctx.carried,
            "outcome_event_id": ctx.event_id,
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
                 worker_id: str | None, *, timer: bool = False) -> None:
        """Dead-letter the task; from the ``timer``, on behalf of its latest failed
        outcome (its trace and event id, kept in ``retry``)."""
        trace, carried, cause = ((retry.traceparent, retry.carried, retry.outcome_event_id)
                                 if timer else (None, None, None))
        ctx.emit(self.topics.dead, DeadTask(
            task_id=retry.task_id, task=retry.task, failures=retry.failures,
            attempts=retry.attempts, failed_on=retry.failed_on, errors=retry.errors,
            reason=reason), correlation_id=retry.correlation_id, traceparent=trace,
            carried=carried, causation_id=cause)
        ctx.delete(self.topics.retries, retry.task_id)
        self._event(ctx, "task_dead_lettered", worker_id=worker_id, task_id=retry.task_id,
                    correlation=retry.correlation_id, failures=retry.failures, detail=reason,
                    traceparent=trace, carried=carried, causation=cause)

    def _resubmit(self, ctx: Context, tid: str, retry: TaskRetry, views: Any) -> None:
        try:
            task = self.topics.tasks.model.model_validate(retry.task)
        except ValidationError as exc:  # the task model changed under it
            name = self.topics.tasks.model.__name__
            self._give_up(ctx, retry, f"not a {name} any more: {exc}"[:1000], None,
                          timer=True)
            return
        key = key_for_partition(tid, self._target(tid, retry, views),
                                self.topics.tasks.partitions)
        # From the timer, on behalf of the latest failed outcome: its trace, its id.
        ctx.emit(self.topics.tasks, task, key=key, correlation_id=retry.correlation_id,
                 traceparent=retry.traceparent, carried=retry.carried,
                 causation_id=retry.outcome_event_id)
        ctx.put(self.topics.retries, tid, retry.model_copy(update={"due_at_ms": None}))

    def _mark_dead(self, ctx: Context, view: WorkerView, last: WorkerStatus | None,
                   heard: int, now: int) -> None:
        wid = view.worker_id
        row = (last or WorkerStatus(worker_id=wid, instance=view.instance)).model_copy(
            update={"status": "dead", "partitions": []})
        heartbeat = self._heard.get(wid, view.last_event_id)  # the record ``last`` is from
        ctx.put(self.topics.views, wid, view.model_copy(update={
            "state": "dead", "last_heartbeat_ms": heard, "last": row,
            "last_event_id": heartbeat}))
        ctx.emit(self.topics.status, row, causation_id=heartbeat)
        self.latest[wid] = row
        # For the task in hand (in its workflow and trace), else for the last heartbeat.
        self._event(ctx, "worker_dead", worker_id=wid, task_id=row.current_task,
                    correlation=row.current_correlation, traceparent=row.current_traceparent,
                    carried=row.current_carried, causation=row.current_event_id or heartbeat,
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


def partition_of(key: bytes, partitions: int) -> int:
    """The partition the default partitioner sends ``key`` to."""
    return partition_for(key, partitions)


def key_for_partition(task_id: str, partition: int | None, partitions: int) -> bytes:
    """A record key for ``task_id`` that lands on ``partition``: the id itself, else
    ``<id>~<n>`` for the first ``n`` that does (workers name tasks by the payload's
    field, not the key). With no partition wanted, the id itself."""
    for n in range(64 * partitions if partition is not None else 1):
        key = (task_id if n == 0 else f"{task_id}~{n}").encode()
        if partition is None or partition_of(key, partitions) == partition:
            return key
    return task_id.encode()
