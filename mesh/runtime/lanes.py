"""Lanes: order, flow control and offsets of the partitions a replica holds.

Each assigned partition has a *lane*: the records fetched for it, taken in offset order
by one task, and the offsets of the inputs in hand. What the lanes promise (the
at-least-once half of the delivery contract that is about partitions and offsets):

* Records of one partition are taken in order by that partition's lane and queued per
  order key (``Agent(ordering=)``: the record key by default, the partition, or none):
  one key's inputs one at a time, in order; other keys and other partitions
  concurrently, up to ``Agent(concurrency=)`` handlers at once per replica. A lane has
  at most that many workers; each serves a key's queue to its end, then the next key
  that waits for a worker.
* A partition's committed offset advances only to the lowest input not yet finished
  (handled, and every output acknowledged); at most ``runtime.max_uncommitted`` inputs
  are taken past it.
* An input's offset is committed only after every output it produced has been
  acknowledged by the broker; auto-commit is never used.
* The poll loop never waits for handlers: a busy partition is paused (and resumed
  when its lane drains), so a handler slower than ``max.poll.interval.ms`` does not
  make the consumer drop out of its group.
* Latency: records a poll brings are handed to their workers in the poll itself
  (:meth:`Lanes.feed`); the lane's task takes only what had to wait (a hold, a retry's
  time, a full window, the state restore), so a record costs no extra loop turn.
* On revoke, lanes of the revoked partitions finish the record in hand and their
  offsets are committed before the partitions move.

The runner (:mod:`mesh.runtime.runner`) feeds the lanes what it polls and opens and
closes them on rebalance; what happens to one record is :mod:`mesh.runtime.process`'s.
The exactly-once lanes (:mod:`mesh.runtime.transactions`) replace :meth:`Lanes.drain`,
:meth:`Lanes.commit` and the hand-out on feed: a lane there handles its records in
transactions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict, deque
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from mesh.agent import Agent
from mesh.config import MeshSettings
from mesh.envelope import now_ms
from mesh.errors import CommitFailed
from mesh.kafka.base import Acks, Partition, Record
from mesh.kafka.transport import Consumer
from mesh.runtime import retry

if TYPE_CHECKING:
    from mesh.runtime.runner import Deadline

logger = logging.getLogger(__name__)

# Handle one record (under a handler slot): its outputs' acks, or None when it is held
# (the runner holds the agent; the lane hands the same record over again later).
Handle = Callable[[Record], Awaitable[Acks | None]]
# Start a task in the runner's task group.
Spawn = Callable[[Coroutine[Any, Any, None], str], asyncio.Task[None]]


@dataclass(slots=True)
class Lane:
    """The records of one partition: taken in offset order by one task, queued per key
    (per partition, or per record, as the agent's ordering says) and handled by workers
    that each serve one key's queue at a time."""

    partition: Partition
    backlog: deque[Record] = field(default_factory=deque)
    wakeup: asyncio.Event = field(default_factory=asyncio.Event)
    # offset -> the acks of its outputs once handled (None while its handler runs), in
    # offset order: ``done`` advances over the front while it is acknowledged. Ordered
    # dict: its first key is found at once, a dict's after the deleted entries before it
    # (up to the window's size; the front is looked at for every input).
    pending: OrderedDict[int, Acks | None] = field(default_factory=OrderedDict)
    keys: dict[Any, deque[Record]] = field(default_factory=dict)  # waiting, per key
    # keys with a queue and no worker yet (the lane has its cap of workers), in the
    # order they came: a worker that empties its key's queue takes the next
    unserved: deque[Any] = field(default_factory=deque)
    serving: int = 0  # workers that have not returned (the tasks end a step later)
    workers: set[asyncio.Task[None]] = field(default_factory=set)
    halted: asyncio.Event = field(default_factory=asyncio.Event)  # set when it stops
    done: int | None = None  # next offset to commit
    watched: int | None = None  # the front input whose acks wake the lane's task
    committed: int | None = None
    stopping: bool = False
    task: asyncio.Task[None] | None = None

    async def wait_until(self, until: float) -> None:
        """Wait until ``until`` (epoch seconds) or until the lane is stopped."""
        while not self.stopping and (remaining := until - time.time()) > 0:
            self.wakeup.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.wakeup.wait(), timeout=min(remaining, 1.0))

    async def settle(self, *, wait: bool) -> None:
        """Advance ``done`` over the front of the lane's inputs while they are handled
        and acknowledged (with ``wait``, waiting for the acks of handled ones). An input
        still being handled stops it there. A failed ack raises ``TransportError``."""
        while self.pending:
            offset = next(iter(self.pending))
            acks = self.pending[offset]
            if acks is None:
                return
            if acks.done():
                acks.check()
            elif wait:
                await acks.wait()
            else:
                return
            del self.pending[offset]
            self.done = offset + 1


class Lanes:
    """The lanes of the partitions a replica holds, and what they share: the handler
    slots (``Agent(concurrency=)`` across the replica), pausing, committing.

    Args:
        agent: the agent whose inputs they take (its group, ordering and concurrency).
        settings: the runtime's windows and the bound of a close.
        handle: handles one record; called under a slot.
        spawn: starts the lanes' tasks (in the runner's task group).
        ready: set while the agent's state tables are restored; lanes wait for it.
        held_until: until when the agent holds (epoch seconds; past: not held).

    Example:
        >>> lanes = Lanes(agent, settings, handle=handle, spawn=spawn, ready=ready,
        ...               held_until=lambda: 0.0)  # doctest: +SKIP
        >>> lanes.feed(partition, records)  # doctest: +SKIP
    """

    def __init__(self, agent: Agent[Any], settings: MeshSettings, *, handle: Handle,
                 spawn: Spawn, ready: asyncio.Event, held_until: Callable[[], float]) -> None:
        self.agent = agent
        self.settings = settings
        self.handle = handle
        self.spawn = spawn
        self.ready = ready
        self.held_until = held_until
        concurrency = agent.concurrency or settings.runtime.concurrency
        self.slots = asyncio.Semaphore(concurrency)
        # Workers per lane: no more than can run at once; further keys wait for one
        # (a task per key would cost a task and a semaphore waiter per input).
        self.max_workers = concurrency
        self.consumer: Consumer | None = None  # set by the runner while it runs
        self.deadline: Deadline | None = None  # the runner's shutdown bound
        self._lanes: dict[Partition, Lane] = {}
        self._partition_set: frozenset[Partition] | None = None  # of _lanes; None: to build again
        # One commit at a time (the poll loop's runs beside it, a close's may come
        # meanwhile): each reads the offsets when its turn comes, so none goes back.
        self._committing = asyncio.Lock()

    def partitions(self) -> list[Partition]:
        """The partitions that have a lane now."""
        return list(self._lanes)

    def partition_set(self) -> frozenset[Partition]:
        """The partitions that have a lane now, as a set (built again only after a lane
        opened or closed: every input's context gets it)."""
        if self._partition_set is None:
            self._partition_set = frozenset(self._lanes)
        return self._partition_set

    def __contains__(self, partition: object) -> bool:
        return partition in self._lanes

    def __getitem__(self, partition: Partition) -> Lane:
        return self._lanes[partition]

    @property
    def held(self) -> bool:
        return time.time() < self.held_until()

    @property
    def close_timeout(self) -> float:
        """How long closing lanes (or a commit) may take. Inside a rebalance callback,
        waiting past max.poll.interval.ms gets the member removed from the group: stay
        well below it."""
        poll_s = self.settings.kafka.max_poll_interval_ms / 1000
        left = self.deadline.left() if self.deadline is not None else float("inf")
        return min(self.settings.runtime.shutdown_timeout_s, poll_s / 2, left)

    def feed(self, partition: Partition, records: Sequence[Record]) -> None:
        """Hand the lane of ``partition`` (opened if need be) records just fetched."""
        lane = self._lanes.get(partition) or self.open(partition)
        lane.backlog.extend(records)
        self._hand_out(lane)  # now: waking the lane's task first would cost a loop turn
        lane.wakeup.set()

    def open(self, partition: Partition) -> Lane:
        """Open the lane of ``partition``: its task starts taking records."""
        lane = self._lanes[partition] = Lane(partition)
        self._partition_set = None
        lane.task = self.spawn(self.drain(lane), f"{self.agent.name}:{partition}")
        return lane

    def wake(self) -> None:
        """Wake every lane (the state tables are ready)."""
        for lane in self._lanes.values():
            lane.wakeup.set()

    async def close(self, partitions: Sequence[Partition]) -> None:
        """Stop the lanes: each finishes the record in hand (within a bound), its
        acknowledged offsets are committed, and it is gone, even if the commit fails."""
        lanes = [self._lanes[p] for p in partitions]
        try:
            for lane in lanes:
                lane.stopping = True
                lane.backlog.clear()  # uncommitted: redelivered to the next owner
                lane.keys.clear()
                lane.unserved.clear()
                lane.wakeup.set()
                lane.halted.set()
            tasks = [lane.task for lane in lanes if lane.task is not None]
            if tasks:
                bound = self.close_timeout
                if self.deadline is not None and self.deadline.started:
                    bound = min(bound, self.deadline.left() / 2)  # the rest: commit, leave
                _, late = await asyncio.wait(tasks, timeout=bound)
                for task in late:  # nothing past `done` is committed: cancelling is safe
                    logger.warning("agent %s: %s still busy after %.0f s, cancelled",
                                   self.agent.name, task.get_name(), bound)
                    task.cancel()
                late |= {w for lane in lanes for w in lane.workers}
                for task in late:
                    task.cancel()
                if late:
                    await asyncio.wait(late)
            await self.commit(lanes)
        finally:
            for lane in lanes:
                self._lanes.pop(lane.partition, None)
            self._partition_set = None

    def flow_control(self) -> None:
        """Pause every partition while the agent holds; otherwise pause the partitions
        whose backlog is a poll's worth and resume the ones whose backlog is empty."""
        consumer = self.consumer
        assert consumer is not None
        if self.held:
            if set(self._lanes) - consumer.paused():
                consumer.pause(set(self._lanes) - consumer.paused())
            return
        limit = self.settings.runtime.max_records_per_poll
        paused = consumer.paused()
        busy = {p for p, lane in self._lanes.items() if len(lane.backlog) >= limit}
        idle = {p for p, lane in self._lanes.items() if not lane.backlog}
        if busy - paused:
            consumer.pause(busy - paused)
        if idle & paused:
            consumer.resume(idle & paused)

    async def commit(self, lanes: Sequence[Lane] | None = None) -> None:
        """Commit each lane's ``done`` offset (every lane's by default) where it moved
        and the partition is still owned. A failed or unanswered commit is logged: the
        next owner (or the next commit) covers it."""
        async with self._committing:  # the lanes as they are when its turn comes
            await self._commit(list(self._lanes.values()) if lanes is None else lanes)

    async def _commit(self, lanes: Sequence[Lane]) -> None:
        if self.consumer is None:
            return
        owned = self.consumer.assignment()
        due = {lane.partition: lane.done for lane in lanes
               if lane.done is not None and lane.done != lane.committed
               and lane.partition in owned}
        if not due:
            return
        try:
            # Bounded: without a broker a commit would wait forever (the broker watch
            # stops the agent; a shutdown must not hang on it either).
            async with asyncio.timeout(self.close_timeout):
                await self.consumer.commit(due)
        except CommitFailed as exc:  # the group moved on; the new owner redelivers
            logger.warning("agent %s: commit of %s failed: %s", self.agent.name, due, exc)
            return
        except TimeoutError:
            logger.error("agent %s: commit of %s got no answer within %.0f s", self.agent.name,
                         due, self.close_timeout)
            return
        for lane in lanes:
            if lane.partition in due:
                lane.committed = due[lane.partition]

    def in_flight(self) -> int:
        """Inputs taken from Kafka whose outputs are not acknowledged yet."""
        return sum(len(lane.backlog) + len(lane.pending) for lane in self._lanes.values())

    def positions(self) -> list[tuple[Partition, int, int]]:
        """Per lane whose partition end a fetch reported: (partition, the end, the
        offset up to which inputs are handled)."""
        found = []
        for partition, lane in list(self._lanes.items()):
            end = self.consumer.highwater(partition) if self.consumer else None
            if end is not None:
                found.append((partition, end, max(lane.done or 0, lane.committed or 0)))
        return found

    async def drain(self, lane: Lane) -> None:
        """Take the lane's records in offset order and hand each to the worker of its key
        (:meth:`_work`): inputs of one key run one at a time, in order; other keys run
        concurrently, up to the agent's concurrency across the replica. ``done`` (the
        offset to commit) advances only over a prefix of inputs that are handled and
        whose outputs are all acknowledged; at most ``runtime.max_uncommitted`` inputs
        of the partition are taken past it."""
        try:
            while not lane.stopping:
                # Cleared before looking: new records, a finished input, an ack, the
                # restore or a stop that comes after this wakes the waits below.
                lane.wakeup.clear()
                await lane.settle(wait=False)
                until = self._hand_out(lane)
                await lane.settle(wait=False)  # over other groups' retries just passed
                self._watch(lane)
                if until is None:
                    await lane.wakeup.wait()
                else:
                    await lane.wait_until(until)
        finally:
            if lane.workers:  # each finishes the input in hand (bounded by close)
                await asyncio.wait(set(lane.workers))
            await lane.settle(wait=True)

    @staticmethod
    def _watch(lane: Lane) -> None:
        """Wake the lane's task when the acks of its front input resolve: ``done`` can
        advance only over the front, and a handled input wakes the lane only when it is
        the front (:meth:`_serve`), so the acks of the inputs behind it need no callback
        each (two per input: an output and its audit record)."""
        front = next(iter(lane.pending), None)
        if front is None or front == lane.watched:
            return
        acks = lane.pending[front]
        if acks is not None:  # handled: its acks are what holds ``done`` back
            lane.watched = front
            acks.when_done(lane.wakeup.set)

    def _hand_out(self, lane: Lane) -> float | None:
        """Hand the lane's records, in offset order, to their keys' workers until one
        must wait; then say until when (epoch seconds: a hold, a retry's time), or None
        for "until woken" (no records, state not restored, window full, stopping).
        Called by the lane's task and by :meth:`feed` as records arrive."""
        window = self.settings.runtime.max_uncommitted
        while lane.backlog and not lane.stopping and self.ready.is_set():
            if self.held:
                return self.held_until()
            record = lane.backlog[0]
            if not retry.is_for(record, self.agent.group):  # another group's retry
                lane.backlog.popleft()
                lane.pending[record.offset] = Acks([])  # done: nothing to wait for
                continue
            if retry.due_ms(record) > now_ms():  # a retry waits for its time
                return retry.due_ms(record) / 1000
            if len(lane.pending) >= window:  # the uncommitted window is full
                return None
            self._dispatch(lane, lane.backlog.popleft())
        return None

    def _order_key(self, record: Record) -> Any:
        """Inputs with equal order keys are handled one at a time, in offset order."""
        ordering = self.agent.ordering
        if ordering == "key":
            return record.key  # keyless inputs share one queue: their partition order
        return None if ordering == "partition" else record.offset

    def _dispatch(self, lane: Lane, record: Record) -> None:
        lane.pending[record.offset] = None
        key = self._order_key(record)
        queue = lane.keys.get(key)
        if queue is not None:  # its key's worker takes it after the ones before it
            queue.append(record)
            return
        lane.keys[key] = deque([record])
        if lane.serving >= self.max_workers:  # a worker takes the key when free
            lane.unserved.append(key)
            return
        lane.serving += 1
        worker = self.spawn(self._work(lane, key), f"{self.agent.name}:{lane.partition}:worker")
        lane.workers.add(worker)
        worker.add_done_callback(lane.workers.discard)

    async def _work(self, lane: Lane, key: Any) -> None:
        """Handle the inputs queued under ``key``, in order, until none is left; then
        those of the next key waiting for a worker, until no key waits."""
        try:
            while (queue := lane.keys.get(key)) is not None:  # None: the lane closed
                try:
                    await self._serve(lane, queue)
                finally:
                    if lane.keys.get(key) is queue:
                        del lane.keys[key]
                if lane.stopping or not lane.unserved:
                    return
                key = lane.unserved.popleft()
        finally:  # no await between the last look at `unserved` and this
            lane.serving -= 1

    async def _serve(self, lane: Lane, queue: deque[Record]) -> None:
        while queue and not lane.stopping:
            if self.held:
                await self._hold_off(lane)
                continue
            record = queue[0]
            async with self.slots:
                if lane.stopping:
                    break
                acks = await self.handle(record)
            if acks is None:  # held: keep the input, try it again after the hold
                continue
            queue.popleft()
            lane.pending[record.offset] = acks
            # the lane advances `done` over it once its outputs are acknowledged; its
            # task looks when the front is handled (and then watches the front's acks)
            if next(iter(lane.pending)) == record.offset:
                lane.wakeup.set()

    async def _hold_off(self, lane: Lane) -> None:
        """Wait while the agent holds (a breaker is open), at most a second at a time so
        that the hold's end and a stop are seen."""
        remaining = self.held_until() - time.time()
        if remaining > 0 and not lane.stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(lane.halted.wait(), timeout=min(remaining, 1.0))
