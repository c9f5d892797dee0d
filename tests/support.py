"""Helpers the integration and fault tests share: inject events, read topics back,
build the checker's history."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Self

from mesh import Codec, Envelope, MeshSettings, Topic
from mesh.kafka.base import OutRecord, Record
from mesh.kafka.reader import TopicReader
from mesh.kafka.transport import Producer
from mesh.runtime.dead_letter import DLQ_TOPIC
from mesh.testing.checker import Applied, DeadLettered, History, Injected, Logged
from tests.apps.stages import Item

ROOT = Path(__file__).resolve().parent.parent


def make_items(keys: int, per_key: int, *, bad: Iterable[tuple[int, int]] = ()) -> list[Item]:
    """``keys`` x ``per_key`` items, interleaved by key; (key, seq) in ``bad`` are poison."""
    poison = set(bad)
    return [Item(key=f"k{k}", seq=s, source_id=str(uuid.uuid4()),
                 text="poison" if (k, s) in poison else f"item {k}/{s}")
            for s in range(per_key) for k in range(keys)]


def encode(codec: Codec, topic: Topic[Any], item: Item) -> OutRecord:
    """The record an existing system would produce for ``item`` (event id = source id)."""
    env = Envelope(item, item.source_id, item.source_id, source="test",
                   key=topic.key_of(item))
    value, fingerprint = codec.encode(topic, item)
    headers = env.with_payload(item, schema=fingerprint).headers()
    return OutRecord(topic.name, value, env.key, tuple(headers))


async def inject(settings: MeshSettings, records: Sequence[OutRecord],
                 batch: int = 500) -> list[tuple[int, int]]:
    """Produce ``records`` in batches, wait for every acknowledgement; returns each
    record's (partition, offset)."""
    positions: list[tuple[int, int]] = []
    async with Producer(settings.kafka) as producer:
        for start in range(0, len(records), batch):
            positions += await producer.send_all(records[start:start + batch])
    return positions


async def read_all(settings: MeshSettings, topics: Sequence[str]) -> list[Record]:
    """Every record of ``topics``, from the beginning to the end as of now."""
    async with TopicReader(settings.kafka, topics) as reader:
        return await reader.read_to_end(timeout=120)


async def wait_for_count(settings: MeshSettings, topics: Sequence[str], count: int, *,
                         timeout: float = 120.0, distinct: bool = True) -> list[Record]:
    """Read ``topics`` until they hold ``count`` records (distinct event ids by default),
    failing after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    seen: dict[str, Record] = {}
    records: list[Record] = []
    async with TopicReader(settings.kafka, topics) as reader:
        async for record in reader.follow(idle_timeout=timeout):
            records.append(record)
            if distinct:  # raw foreign records (garbage) may carry no event id
                seen.setdefault(event_id(record), record)
            if (len(seen) if distinct else len(records)) >= count:
                return records
            if time.monotonic() > deadline:
                break
    raise AssertionError(f"{topics} held {len(seen)} distinct events of {count} expected "
                         f"after {timeout:.0f} s")


def event_id(record: Record) -> str:
    return dict(record.headers)["mesh-event-id"].decode()


async def history(settings: MeshSettings, codec: Codec, injected: Sequence[Item], *,
                  sink: Topic[Any], dlq: Sequence[Topic[Any]] = (),
                  bad_ids: Iterable[str] = (), extra: Sequence[Injected] = ()) -> History:
    """The checker's history: what was injected, what the (idempotent) sink applied,
    what the output topic logged, and what the dead-letter topics of ``dlq`` hold (by
    the event id header: the dead letters of a first stage are the injected records)."""
    bad = set(bad_ids)
    logged_records = await read_all(settings, [sink.name])
    applied, logged, seen = [], [], set()
    for record in sorted(logged_records, key=lambda r: (r.partition, r.offset)):
        item = await codec.decode(sink, record.value or b"")
        assert isinstance(item, Item)
        eid = event_id(record)
        logged.append(Logged(record.topic, record.partition, record.offset, eid,
                             item.source_id))
        if eid not in seen:  # the sink is idempotent by event id: that is the contract
            seen.add(eid)
            applied.append(Applied(eid, item.source_id, item.key, item.seq))
    dead = []
    for topic in dlq:
        for record in await read_all(settings, [topic.dlq_name]):
            assert dict(record.headers)[DLQ_TOPIC].decode() == topic.name
            dead.append(DeadLettered(event_id(record)))
    return History(
        injected=[Injected(i.source_id, i.key, i.seq, bad=i.source_id in bad)
                  for i in injected] + list(extra),
        applied=applied, logged=logged, dead_letters=dead)


class AgentProcess:
    """A `mesh run module:agent` subprocess the test started; stopped only by its pid."""

    def __init__(self, broker: Any, target: str, *, prefix: str, log: Any,
                 env: dict[str, str] | None = None) -> None:
        self.target = target
        self._args = [sys.executable, "-m", "mesh.cli", "run", target]
        self._env = broker.env(MESH_TEST_PREFIX=prefix, **(env or {}))
        self._log = log
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> AgentProcess:
        self.process = subprocess.Popen(self._args, env=self._env, cwd=ROOT,
                                        stdout=self._log, stderr=subprocess.STDOUT)
        return self

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def kill9(self) -> None:
        """SIGKILL: no cleanup, no commit, no leave-group."""
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; returns the exit code (0 is a clean stop)."""
        assert self.process is not None
        self._await_handler()
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            return self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=30)
            raise AssertionError(f"{self.target} (pid {self.pid}) ignored SIGTERM for "
                                 f"{timeout:.0f} s") from None

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def _await_handler(self, timeout: float = 30.0) -> None:
        """Wait (bounded) until the process catches SIGTERM: one SIGTERM'd while Python
        is still importing dies by the signal (-15), which is not the stop under test.
        Reads the caught-signal mask from /proc (Linux, where the suite runs)."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while self.process.poll() is None and time.monotonic() < deadline:
            try:
                with open(f"/proc/{self.process.pid}/status") as status:
                    caught = next(line for line in status if line.startswith("SigCgt:"))
            except (OSError, StopIteration):
                return
            if int(caught.split()[1], 16) & (1 << (signal.SIGTERM - 1)):
                return
            time.sleep(0.05)


class Follower:
    """Follows topics in the background and applies each record; tests wait on what
    arrived with :meth:`until`. Subclasses implement :meth:`apply`."""

    def __init__(self, settings: MeshSettings, topics: Sequence[str]) -> None:
        self._settings, self._topic_names = settings, list(topics)
        self._changed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Self:
        self._task = asyncio.create_task(self._follow())
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task

    async def _follow(self) -> None:
        async with TopicReader(self._settings.kafka, self._topic_names) as reader:
            async for record in reader.follow():
                await self.apply(record)
                self._changed.set()

    async def apply(self, record: Record) -> None:
        raise NotImplementedError

    async def until(self, check: Callable[[], bool], what: str, timeout: float = 120.0) -> None:
        """Wait until ``check()`` holds, or fail naming ``what`` after ``timeout`` s (or
        as soon as following failed)."""
        deadline = time.monotonic() + timeout
        while not check():
            remaining = deadline - time.monotonic()
            if remaining <= 0 or (self._task is not None and self._task.done()):
                raise AssertionError(f"not seen within {timeout:.0f} s: {what}")
            self._changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), timeout=min(remaining, 1.0))


class Progress(Follower):
    """Follows a topic in the background and counts distinct event ids."""

    def __init__(self, settings: MeshSettings, topic: str) -> None:
        super().__init__(settings, [topic])
        self.ids: set[str] = set()

    async def apply(self, record: Record) -> None:
        self.ids.add(event_id(record))

    async def reached(self, count: int, timeout: float = 120.0) -> None:
        """Wait until ``count`` distinct events were seen, or fail after ``timeout``."""
        await self.until(lambda: len(self.ids) >= count,
                         f"{self._topic_names[0]}: {count} events (seen {len(self.ids)})",
                         timeout)
