"""Benchmark: a three-stage pass-through chain through the mesh vs. raw aiokafka.

    .venv/bin/python bench/chain.py [--events N] [--size BYTES] [--runs mesh,raw]
                                    [--partitions P] [--rate EVENTS_PER_S] [--profile]
                                    [--broker embedded|apache] [--nodes N] [--processes]
                                    [--loop-lag]

All runs share one broker (the embedded Tansu broker, or Apache Kafka started from its
jars; loopback only, stopped by pid) and this process (with ``--processes`` each stage
runs in a process of its own, as agents are deployed), and use fresh topics of the same
partition count::

    in -> [stage A] -> ab -> [stage B] -> bc -> [stage C] -> out

* mesh: three ``Agent`` s in one ``Mesh`` (one consumer group each, the mesh's shared
  producer, Avro single-object values and mesh headers). Each handler returns a copy
  of its input. Events are injected with the mesh's codec and envelope headers.
* mesh-eos: the mesh run exactly-once (``runtime.exactly_once``: Kafka transactions of
  a consumed partition's inputs, their outputs and offsets; ``--broker apache`` only),
  every consumer and the sink reading committed records only.
* raw: the same chain written directly with aiokafka: per stage an
  ``AIOKafkaConsumer`` in its own group (manual commits) and an ``AIOKafkaProducer``;
  consume a batch -> ``json.loads`` -> produce ``json.dumps`` -> wait for all acks ->
  commit. Same client settings as the mesh (group timings and fetch wait of the
  broker's settings profile, acks=all, idempotence, linger, batch size, fetch sizes).

The sink of each run is a group-less consumer on ``out``; an event's latency is its
arrival time at the sink (wall clock, ns) minus the ``sent_at_ns`` stamped when it was
created for injection; throughput is N / (last arrival - first stamp). All agents are
assigned before injection starts, so group joins are not measured.

With ``--rate`` (paced, e.g. 200 events/s: queues stay empty) each run also measures
the latency of each hop: the Kafka timestamp of a stage's output record minus that of
its input record (both stamped by the producing client when it is sent), read back
from the four topics once the sink has everything, the same way for every run.
Results are printed and written to ``bench/results/chain-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import dataclasses
import io
import json
import logging
import multiprocessing
import os
import platform
import pstats
import resource
import signal
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiokafka  # noqa: E402
import confluent_kafka  # noqa: E402
from aiokafka import (  # noqa: E402
    AIOKafkaConsumer,
    AIOKafkaProducer,
    ConsumerRebalanceListener,
    TopicPartition,
)
from pydantic import BaseModel  # noqa: E402

from mesh import (  # noqa: E402
    Agent,
    ApacheKafka,
    Codec,
    Context,
    EmbeddedBroker,
    Emitter,
    Mesh,
    MeshSettings,
    RetryPolicy,
    Topic,
    apply_topics,
)
from mesh.agent import Ordering  # noqa: E402
from mesh.config import KafkaSettings  # noqa: E402
from mesh.envelope import CORRELATION_ID  # noqa: E402
from mesh.kafka.base import Acks, OutRecord  # noqa: E402
from mesh.kafka.transport import MAX_REQUEST_BYTES, Producer  # noqa: E402
from mesh.runtime.audit import (  # noqa: E402
    CONSUMED,
    OK,
    AuditEvent,
    AuditOutput,
    audit_record,
    audit_topic,
)

RESULTS = ROOT / "bench" / "results"
KEYS = 64  # distinct record keys, spread over the partitions
MESH_RUNS = ("mesh", "mesh-noaudit", "mesh-blocking", "mesh-partition", "mesh-eos")
RDKAFKA_RUNS = ("rdkafka", "rdkafka-avro-audit")  # the raw stages on librdkafka
RAW_RUNS = ("raw", "raw-shared", "raw-avro", "raw-avro-audit", *RDKAFKA_RUNS)
COMPARED = (*MESH_RUNS, "raw-shared", "raw-avro", "raw-avro-audit", *RDKAFKA_RUNS)  # over raw
HOPS = (("in", "ab"), ("ab", "bc"), ("bc", "out"))  # each stage's input and output topic
STAGES = (("a", "in", "ab"), ("b", "ab", "bc"), ("c", "bc", "out"))  # name, source, target
ASSIGN_TIMEOUT_S = 60.0
STAGE_MAX_S = 3600.0  # a stage process ends after this even if never told to
POLL_MS = 200  # the mesh's own poll timeout (runtime.AgentRunner._poll)
MAX_RECORDS = 500  # the mesh's default runtime.max_records_per_poll

log = logging.getLogger("bench.chain")


class Ping(BaseModel):
    """One benchmark event."""

    id: int
    key: str
    sent_at_ns: int
    pad: str


@dataclasses.dataclass
class Arrival:
    id: int
    sent_at_ns: int
    recv_ns: int


@dataclasses.dataclass
class RunResult:
    name: str
    events: int
    duplicates: int
    inject_s: float
    elapsed_s: float
    throughput: float
    latency_ms: dict[str, float]
    extra: dict[str, Any]
    hop_ms: dict[str, dict[str, float]] = dataclasses.field(default_factory=dict)


class BenchError(RuntimeError):
    """The benchmark could not complete (missing events, a stage died, a timeout)."""


# --------------------------------------------------------------------------- helpers


def consumer_kwargs(kafka: KafkaSettings) -> dict[str, Any]:
    """The consumer settings the mesh's transport.Consumer uses, for raw clients."""
    return dict(**kafka.client_kwargs(), enable_auto_commit=False,
                auto_offset_reset="earliest", isolation_level=kafka.isolation_level,
                max_poll_interval_ms=kafka.max_poll_interval_ms,
                fetch_max_bytes=64 * 1024 * 1024, max_partition_fetch_bytes=MAX_REQUEST_BYTES,
                **kafka.group_timings())


def producer_kwargs(kafka: KafkaSettings) -> dict[str, Any]:
    """The producer settings the mesh's transport.Producer uses, for raw clients."""
    return dict(**kafka.client_kwargs(), acks=-1 if kafka.acks == "all" else int(kafka.acks),
                enable_idempotence=kafka.idempotent_producer, linger_ms=kafka.linger_ms,
                max_batch_size=kafka.max_batch_size, max_request_size=MAX_REQUEST_BYTES)


async def schedule(n: int, size: int, rate: float) -> AsyncIterator[range]:
    """The ids to inject, in chunks of ``size``; with ``rate`` > 0, each chunk is released
    at its due time (a fixed schedule of rate events/s), otherwise as fast as acked."""
    if rate > 0:
        size = max(1, min(size, int(rate / 50)))  # a chunk about every 20 ms
    start = time.monotonic()
    for first in range(0, n, size):
        if rate > 0:
            delay = start + first / rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)  # pacing the injection schedule, not a wait
        yield range(first, min(n, first + size))


class LoopLag:
    """Stalls of this process's event loop during a run (``--loop-lag``): a task that
    sleeps ``TICK_S`` at a time notes each wake-up more than ``THRESHOLD_S`` late, so a
    tail of slow hops can be told apart from a busy process. Stage processes
    (``--processes``) are not watched."""

    TICK_S = 0.005
    THRESHOLD_S = 0.03

    def __init__(self) -> None:
        self.stalls_ms: list[float] = []
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self.stalls_ms = []
        self._task = asyncio.create_task(self._watch(), name="loop lag")

    async def stop(self) -> list[float]:
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task])
        return self.stalls_ms

    async def _watch(self) -> None:
        while True:  # until stop() cancels it, at the end of the run
            due = time.monotonic() + self.TICK_S
            await asyncio.sleep(self.TICK_S)
            late = time.monotonic() - due
            if late > self.THRESHOLD_S:
                self.stalls_ms.append(round(late * 1000, 1))


class CpuMeter:
    """CPU seconds used by this process (with the stage processes of ``--processes``,
    added by :meth:`add_stages`) and by the broker processes between start and stop
    (``broker_pid``: one pid, several, or None)."""

    def __init__(self, broker_pid: int | Iterable[int] | None) -> None:
        self._pids = ([] if broker_pid is None else [broker_pid] if isinstance(broker_pid, int)
                      else list(broker_pid))
        self._stages: list[int] = []
        self._t0: tuple[float, float | None] = (0.0, None)
        self.client_s: float | None = None
        self.broker_s: float | None = None

    def add_stages(self, pids: Iterable[int]) -> None:
        self._stages.extend(pids)

    @staticmethod
    def _proc(pids: Iterable[int]) -> float:
        """User+system CPU seconds of processes ``pids`` so far (from /proc)."""
        total = 0
        for pid in pids:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += int(fields[11]) + int(fields[12])
        return total / os.sysconf("SC_CLK_TCK")

    def _broker(self) -> float | None:
        if not self._pids:
            return None
        try:
            return self._proc(self._pids)
        except (OSError, ValueError, IndexError):
            return None

    def _client(self) -> float:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return usage.ru_utime + usage.ru_stime + self._proc(self._stages)

    def start(self) -> None:
        self._t0 = (self._client(), self._broker())

    def stop(self) -> None:
        self.client_s = self._client() - self._t0[0]
        broker = self._broker()
        if broker is not None and self._t0[1] is not None:
            self.broker_s = broker - self._t0[1]


def make_ping(i: int, pad: str) -> Ping:
    return Ping(id=i, key=f"k{i % KEYS}", sent_at_ns=time.time_ns(), pad=pad)


async def race(main: Awaitable[Any], watched: Iterable[asyncio.Task[Any]], *, timeout: float,
               what: str) -> Any:
    """Await ``main``; fail as soon as a watched task ends (a stage died) or on timeout."""
    main_task = asyncio.ensure_future(main)
    watched = list(watched)
    try:
        done, _ = await asyncio.wait([main_task, *watched], timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if main_task in done:
            return main_task.result()
        for task in watched:
            if task in done:
                exc = task.exception()
                raise BenchError(f"{task.get_name()} ended while waiting for {what}: "
                                 f"{exc!r}") from exc
        raise BenchError(f"Timed out after {timeout:.0f} s waiting for {what}.")
    finally:
        if not main_task.done():
            main_task.cancel()
            await asyncio.gather(main_task, return_exceptions=True)


def percentiles(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

    return {"p50": pick(0.50), "p90": pick(0.90), "p99": pick(0.99), "max": ordered[-1],
            "mean": sum(ordered) / len(ordered)}


class Sink:
    """A group-less consumer of every partition of ``topic``, from the beginning.

    Arrival time is taken once per returned fetch batch (the moment this process got
    the records). Values are decoded only when the count says all may be there, so
    decoding stays out of the measured path as far as possible.
    """

    def __init__(self, kafka: KafkaSettings, topic: str, partitions: int,
                 decode: Callable[[bytes], tuple[int, int]]) -> None:
        kwargs = consumer_kwargs(kafka)
        for key in ("session_timeout_ms", "heartbeat_interval_ms", "max_poll_interval_ms"):
            kwargs.pop(key)
        self._consumer = AIOKafkaConsumer(group_id=None, **kwargs)
        self._parts = [TopicPartition(topic, p) for p in range(partitions)]
        self._decode = decode
        self.raw: list[tuple[int, bytes]] = []

    async def start(self) -> None:
        await self._consumer.start()
        self._consumer.assign(self._parts)
        await self._consumer.seek_to_beginning(*self._parts)

    async def stop(self) -> None:
        await self._consumer.stop()

    async def collect(self, n: int) -> tuple[list[Arrival], int]:
        """Read until ``n`` distinct ids arrived; (first arrival of each id, duplicates)."""
        seen: dict[int, Arrival] = {}
        decoded = duplicates = 0
        while len(seen) < n:
            batches = await self._consumer.getmany(timeout_ms=POLL_MS, max_records=10_000)
            now = time.time_ns()
            for msgs in batches.values():
                self.raw.extend((now, m.value) for m in msgs)
            if len(self.raw) < n:
                continue
            for recv_ns, value in self.raw[decoded:]:
                ident, sent = self._decode(value)
                if ident in seen:
                    duplicates += 1
                else:
                    seen[ident] = Arrival(ident, sent, recv_ns)
            decoded = len(self.raw)
        return list(seen.values()), duplicates


async def timestamps(kafka: KafkaSettings, topic: str, partitions: int, n: int,
                     decode: Callable[[bytes], tuple[int, int]], *,
                     timeout: float) -> dict[int, int]:
    """The Kafka timestamp (ms) of the first record of each id on ``topic``: all ``n``
    ids must be there (the topic was written before), within ``timeout`` seconds."""
    kwargs = consumer_kwargs(kafka)
    for key in ("session_timeout_ms", "heartbeat_interval_ms", "max_poll_interval_ms"):
        kwargs.pop(key)
    consumer = AIOKafkaConsumer(group_id=None, **kwargs)
    parts = [TopicPartition(topic, p) for p in range(partitions)]
    found: dict[int, int] = {}
    deadline = time.monotonic() + timeout
    await consumer.start()
    try:
        consumer.assign(parts)
        await consumer.seek_to_beginning(*parts)
        while len(found) < n:
            if time.monotonic() > deadline:
                raise BenchError(f"{topic}: {len(found)} of {n} ids after {timeout:.0f} s.")
            batches = await consumer.getmany(timeout_ms=POLL_MS, max_records=10_000)
            for msgs in batches.values():
                for m in msgs:
                    found.setdefault(decode(m.value)[0], m.timestamp)
    finally:
        await consumer.stop()
    return found


async def hop_latencies(kafka: KafkaSettings, topics: dict[str, str], partitions: int,
                        n: int, decode: Callable[[bytes], tuple[int, int]]
                        ) -> dict[str, dict[str, float]]:
    """Per hop (stage a, b, c, and all three pooled): the percentiles of an event's
    output timestamp minus its input timestamp, in ms (Kafka timestamps are whole ms)."""
    stamps = {name: await timestamps(kafka, topic, partitions, n, decode, timeout=60)
              for name, topic in topics.items()}
    out: dict[str, dict[str, float]] = {}
    pooled: list[float] = []
    for stage, (src, dst) in zip("abc", HOPS, strict=True):
        hops = [float(stamps[dst][i] - stamps[src][i]) for i in stamps[src]]
        out[stage] = percentiles(hops)
        pooled.extend(hops)
    out["hop"] = percentiles(pooled)
    return out


def summarise(name: str, n: int, arrivals: list[Arrival], duplicates: int, inject_s: float,
              cpu: CpuMeter, extra: dict[str, Any]) -> RunResult:
    first = min(a.sent_at_ns for a in arrivals)
    last = max(a.recv_ns for a in arrivals)
    elapsed = (last - first) / 1e9
    latencies = [(a.recv_ns - a.sent_at_ns) / 1e6 for a in arrivals]
    extra = {**extra, "client_cpu_s": cpu.client_s, "broker_cpu_s": cpu.broker_s,
             "client_cpu_us_per_event": None if cpu.client_s is None else cpu.client_s / n * 1e6,
             "broker_cpu_us_per_event": None if cpu.broker_s is None else cpu.broker_s / n * 1e6,
             # how much of the machine the run kept busy (client and broker CPU over the
             # run's time): a paced rate is "far below capacity" only when this is low
             "cores_busy": None if cpu.client_s is None else (
                 (cpu.client_s + (cpu.broker_s or 0.0)) / elapsed)}
    return RunResult(name, n, duplicates, inject_s, elapsed, n / elapsed,
                     percentiles(latencies), extra)


# --------------------------------------------------------------------------- mesh run


def chain_topics(prefix: str, partitions: int, *, dead_letters: bool = True
                 ) -> dict[str, Topic[Ping]]:
    """A run's four topics, keyed by the ``key`` field (the raw runs have no dead-letter
    topics: nothing of theirs writes one)."""
    return {name: Topic(f"{prefix}.{name}", Ping, key="key", partitions=partitions,
                        dead_letters=dead_letters) for name in ("in", "ab", "bc", "out")}


async def passthrough(payload: Ping, ctx: Context) -> Ping:
    return payload.model_copy()


def mesh_settings(run: str, settings: MeshSettings) -> MeshSettings:
    """The settings of mesh run ``run``: ``mesh-noaudit`` has the audit off, ``mesh-eos``
    runs its agents exactly-once (Kafka transactions) and reads, the sink too, committed
    records only."""
    if run == "mesh-noaudit":  # the cost of publishing to mesh.audit
        return settings.model_copy(update={
            "audit": settings.audit.model_copy(update={"enabled": False})})
    if run == "mesh-eos":  # the cost of exactly-once
        return settings.model_copy(update={
            "runtime": settings.runtime.model_copy(update={"exactly_once": True}),
            "kafka": settings.kafka.model_copy(update={"isolation_level": "read_committed"})})
    return settings


def mesh_agent(run: str, prefix: str, topics: dict[str, Topic[Ping]], name: str, source: str,
               target: str) -> Agent[Any]:
    """Stage ``name`` of mesh run ``run``, an agent passing ``source`` on to ``target``:
    ``mesh-blocking`` retries in place (no retry-tier topics to fetch), ``mesh-partition``
    handles one input at a time per partition."""
    retry = RetryPolicy(blocking=True) if run == "mesh-blocking" else None
    ordering: Ordering = "partition" if run == "mesh-partition" else "key"
    return Agent(f"{prefix}-{name}", consumes=topics[source], produces=topics[target],
                 handler=passthrough, retry=retry, ordering=ordering)


async def run_mesh(settings: MeshSettings, args: argparse.Namespace,
                   profiler: cProfile.Profile | None, cpu: CpuMeter, run: str = "mesh"
                   ) -> RunResult:
    """Mesh run ``run`` (``mesh``, ``mesh-noaudit``, ...; see :func:`mesh_settings` and
    :func:`mesh_agent`): its three agents in one ``Mesh`` here, or with ``--processes``
    each in a process of its own."""
    settings = mesh_settings(run, settings)
    prefix = f"bench-{uuid.uuid4().hex[:8]}-mesh"
    topics = chain_topics(prefix, args.partitions)
    await apply_topics(settings.kafka, topics.values())
    agents = [mesh_agent(run, prefix, topics, *stage) for stage in STAGES]
    processes = StageProcesses([StageSpec(run, *where(settings), prefix, *stage,
                                          args.partitions) for stage in STAGES]
                               ) if args.processes else None
    mesh = None if processes else Mesh(settings, agents)

    codec = Codec(settings.schema_registry)
    await codec.prepare([topics["in"]])
    serde = codec.serde(Ping)

    def decode(value: bytes) -> tuple[int, int]:
        ping = serde.decode(value)
        assert isinstance(ping, Ping)
        return ping.id, ping.sent_at_ns

    sink = Sink(settings.kafka, topics["out"].name, args.partitions, decode)
    injector = Producer(settings.kafka)
    emitter = Emitter(settings, source="bench", producer=injector, codec=codec)
    mesh_task = None if mesh is None else asyncio.create_task(mesh.run(), name="mesh")
    watched = [] if mesh_task is None else [mesh_task]
    try:
        await injector.start()
        await sink.start()
        if processes is not None:
            watched += await processes.start()
            cpu.add_stages(processes.pids)
        else:
            assert mesh is not None
            await race(mesh.wait_assigned(ASSIGN_TIMEOUT_S), watched,
                       timeout=ASSIGN_TIMEOUT_S + 5, what="the mesh agents' assignment")
        pad = "x" * args.size
        topic_in = topics["in"]

        async def inject() -> float:
            start = time.perf_counter()
            paced: list[Acks] = []  # paced: acks awaited at the end, the schedule kept
            async for chunk in schedule(args.events, args.inject_batch, args.rate):
                # each record built as `mesh emit` builds it (Emitter.record)
                acks = await injector.send_many(
                    [emitter.record(topic_in, make_ping(i, pad))[0] for i in chunk])
                if args.rate > 0:
                    paced.append(acks)
                else:
                    await acks.wait()
            for acks in paced:
                await acks.wait()
            return time.perf_counter() - start

        if profiler is not None:
            profiler.enable()
        cpu.start()
        collecting = asyncio.create_task(sink.collect(args.events), name="sink")
        inject_s = await race(inject(), [*watched, collecting], timeout=args.timeout,
                              what="injection")
        arrivals, duplicates = await race(collecting, watched, timeout=args.timeout,
                                          what=f"{args.events} events at the sink")
        cpu.stop()
        if profiler is not None:
            profiler.disable()
    finally:
        if profiler is not None:
            profiler.disable()
        if processes is not None:
            await processes.stop()
        if mesh is not None and mesh_task is not None:
            mesh.stop_event.set()
            await asyncio.wait([mesh_task], timeout=60)
        await sink.stop()
        await injector.stop()
    extra: dict[str, Any] = {"sink_records": len(sink.raw)}
    if processes is not None:
        extra["stage_exit_codes"] = processes.exit_codes
    else:
        assert mesh is not None and mesh_task is not None
        if not mesh_task.done():
            raise BenchError("The mesh did not stop within 60 s.")
        if not mesh_task.cancelled() and mesh_task.exception() is not None:
            raise BenchError(f"The mesh failed: {mesh_task.exception()!r}")
        extra.update(handled={r.agent.name: r.handled for r in mesh.runners},
                     dead_lettered=sum(r.dead_lettered for r in mesh.runners))
    result = summarise("mesh", args.events, arrivals, duplicates, inject_s, cpu, extra)
    if args.rate > 0:
        result.hop_ms = await hop_latencies(settings.kafka, {k: t.name for k, t in topics.items()},
                                            args.partitions, args.events, decode)
    return result


# --------------------------------------------------------------------------- raw run


class _Assigned(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self) -> None:
        self.event = asyncio.Event()

    async def on_partitions_revoked(self, revoked: Any) -> None:
        pass

    async def on_partitions_assigned(self, assigned: Any) -> None:
        if assigned:
            self.event.set()


class RawStage:
    """consume -> json.loads -> produce json.dumps -> await acks -> commit, per batch.

    With ``codec`` (the ``raw-avro`` run) each value is instead decoded and validated
    as the mesh decodes an input (Avro single-object encoding, the pydantic model), the
    model copied as the mesh's handler does, encoded again with the mesh's codec, and
    sent with the record's headers unread: the schema work alone, without the mesh's
    envelope, ids, lanes, retries, metrics or audit. With ``audit`` as well (the
    ``raw-avro-audit`` run) each input also sends that prebuilt audit record, keyed by
    the input's correlation id as the mesh keys its audit: the audit's record per input
    without building it."""

    def __init__(self, kafka: KafkaSettings, group: str, source: str, target: str,
                 producer: AIOKafkaProducer | None = None, *,
                 codec: tuple[Codec, Topic[Ping]] | None = None,
                 audit: OutRecord | None = None) -> None:
        self.consumer = AIOKafkaConsumer(group_id=group, **consumer_kwargs(kafka))
        self.producer = producer or AIOKafkaProducer(**producer_kwargs(kafka))
        self.own_producer = producer is None
        self.source, self.target, self.group = source, target, group
        self.codec, self.audit = codec, audit
        self.listener = _Assigned()
        self.handled = 0

    async def start(self) -> None:
        if self.own_producer:
            await self.producer.start()
        await self.consumer.start()
        self.consumer.subscribe([self.source], listener=self.listener)

    async def run(self, stop: asyncio.Event) -> None:
        consumer, producer, target = self.consumer, self.producer, self.target
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=POLL_MS, max_records=MAX_RECORDS)
            if not batches:
                continue
            acks = []
            offsets = {}
            for tp, msgs in batches.items():
                if self.codec is None:
                    for m in msgs:
                        doc = json.loads(m.value)
                        acks.append(await producer.send(target, json.dumps(doc).encode(),
                                                        key=m.key))
                else:
                    codec, topic = self.codec
                    for m in msgs:
                        ping = (await codec.decode(topic, m.value)).model_copy()
                        acks.append(await producer.send(target, codec.encode(topic, ping)[0],
                                                        key=m.key, headers=list(m.headers)))
                        if self.audit is not None:
                            audit = self.audit
                            correlation = next(v for k, v in m.headers if k == CORRELATION_ID)
                            acks.append(await producer.send(audit.topic, audit.value,
                                                            key=correlation,
                                                            headers=list(audit.headers)))
                offsets[tp] = msgs[-1].offset + 1
            await asyncio.gather(*acks)
            await consumer.commit(offsets)
            self.handled += len(acks)

    async def stop(self) -> None:
        await self.consumer.stop()
        if self.own_producer:
            await self.producer.stop()


def rdkafka_config(kafka: KafkaSettings) -> dict[str, Any]:
    """librdkafka's names for the settings ``consumer_kwargs`` and ``producer_kwargs``
    give aiokafka (fetch sizes left at librdkafka's defaults). Plaintext only: the
    benchmark runs on loopback."""
    if kafka.security_protocol != "PLAINTEXT":
        raise BenchError("the rdkafka runs take a PLAINTEXT broker only")
    timings = kafka.group_timings()
    return {"bootstrap.servers": kafka.bootstrap_servers, "client.id": kafka.client_id,
            "session.timeout.ms": timings["session_timeout_ms"],
            "heartbeat.interval.ms": timings["heartbeat_interval_ms"],
            "fetch.wait.max.ms": timings["fetch_max_wait_ms"],
            "max.poll.interval.ms": kafka.max_poll_interval_ms,
            "acks": -1 if kafka.acks == "all" else int(kafka.acks),
            "enable.idempotence": kafka.idempotent_producer, "linger.ms": kafka.linger_ms,
            "batch.size": kafka.max_batch_size,
            "partitioner": "murmur2_random",  # Java's (and the mesh's) partitioner
            "log_level": 4}  # warnings up: not each idle connection the broker closes


class RdStage:
    """``RawStage`` on librdkafka (confluent-kafka), the way its users write a stage:
    in a thread of its own, ``consume`` a batch (up to 500 records, 200 ms) ->
    ``produce`` each output (``json``, or with ``codec`` the schema work of ``raw-avro``
    and with ``audit`` its prebuilt audit record) -> ``flush`` (every ack) -> a
    synchronous commit of the batch's offsets. librdkafka fetches, batches, partitions
    and sends in its own threads, in C, outside the interpreter's lock: what moving the
    mesh's transport onto it could gain (bench/README.md)."""

    def __init__(self, kafka: KafkaSettings, group: str, source: str, target: str, *,
                 codec: tuple[Codec, Topic[Ping]] | None = None,
                 audit: OutRecord | None = None) -> None:
        config = rdkafka_config(kafka)
        producing = ("acks", "enable.idempotence", "linger.ms", "batch.size", "partitioner")
        self.consumer = confluent_kafka.Consumer(
            {k: v for k, v in config.items() if k not in producing}
            | {"group.id": group, "enable.auto.commit": False,
               "auto.offset.reset": "earliest"})
        self.producer = confluent_kafka.Producer(
            {k: config[k] for k in ("bootstrap.servers", "client.id", "log_level", *producing)})
        self.source, self.target, self.group = source, target, group
        self.codec, self.audit = codec, audit
        self.listener = _Assigned()
        self.handled = 0
        self.failed: list[str] = []  # delivery errors, from librdkafka's callbacks
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.consumer.subscribe([self.source], on_assign=self._assigned)

    def _assigned(self, consumer: Any, partitions: list[Any]) -> None:
        if partitions and self.loop is not None:
            self.loop.call_soon_threadsafe(self.listener.event.set)

    def _delivered(self, error: Any, message: Any) -> None:
        if error is not None:
            self.failed.append(str(error))

    async def run(self, stop: asyncio.Event) -> None:
        halt = threading.Event()
        watcher = asyncio.create_task(stop.wait())
        watcher.add_done_callback(lambda _: halt.set())
        try:
            await asyncio.to_thread(self._loop, halt)
        finally:
            watcher.cancel()

    def _loop(self, halt: threading.Event) -> None:
        consumer, producer, target = self.consumer, self.producer, self.target
        serde = None
        if self.codec is not None:  # raw-avro's schema work
            codec, topic = self.codec
            serde = codec.serde(Ping)
        while not halt.is_set():
            messages: list[Any] = consumer.consume(MAX_RECORDS, POLL_MS / 1000)
            if not messages:
                continue
            offsets: dict[tuple[str, int], int] = {}
            sent = 0
            for m in messages:
                if m.error() is not None:
                    raise BenchError(f"{self.group}: {m.error()}")
                if serde is None:
                    producer.produce(target, json.dumps(json.loads(m.value())).encode(),
                                     key=m.key(), on_delivery=self._delivered)
                else:
                    ping = serde.decode(m.value()).model_copy()
                    headers = m.headers() or []
                    producer.produce(target, codec.encode(topic, ping)[0], key=m.key(),
                                     headers=headers, on_delivery=self._delivered)
                    if self.audit is not None:
                        correlation = next(v for k, v in headers if k == CORRELATION_ID)
                        producer.produce(self.audit.topic, self.audit.value, key=correlation,
                                         headers=list(self.audit.headers),
                                         on_delivery=self._delivered)
                        sent += 1
                sent += 1
                offsets[(m.topic(), m.partition())] = m.offset() + 1
            if producer.flush(60) or self.failed:
                raise BenchError(f"{self.group}: outputs not acknowledged: {self.failed[:3]}")
            consumer.commit(offsets=[confluent_kafka.TopicPartition(t, p, o)
                                     for (t, p), o in offsets.items()], asynchronous=False)
            self.handled += sent

    async def stop(self) -> None:
        await asyncio.to_thread(self.consumer.close)
        await asyncio.to_thread(self.producer.flush, 30)


async def run_raw(settings: MeshSettings, args: argparse.Namespace, cpu: CpuMeter,
                  run: str = "raw") -> RunResult:
    """The raw chain, run ``run``. ``raw-shared``: its three stages produce through one
    producer, as a mesh's agents do (aiokafka keeps one produce request in flight per
    broker and producer, so the stages' outputs queue behind each other); ``raw-avro``:
    the stages decode, validate and encode as the mesh does (``RawStage``), and events
    are injected as ``mesh emit`` builds them; ``raw-avro-audit``: as ``raw-avro``, and
    each input also sends an audit record of the size of the mesh's, to a topic laid out
    as ``mesh.audit``. With ``--processes`` each stage runs in a process of its own."""
    rdkafka = run in RDKAFKA_RUNS
    shared = run == "raw-shared"
    avro, audit = run.endswith(("-avro", "-avro-audit")), run.endswith("-avro-audit")
    if rdkafka and args.processes:
        raise BenchError(f"{run} runs its stages in threads of this process only")
    prefix = f"bench-{uuid.uuid4().hex[:8]}-raw"
    topics = chain_topics(prefix, args.partitions, dead_letters=False)
    await apply_topics(settings.kafka, topics.values())
    kafka = settings.kafka
    one = AIOKafkaProducer(**producer_kwargs(kafka)) if shared else None
    codec = Codec(settings.schema_registry)
    await codec.prepare(list(topics.values()))
    emitter = Emitter(settings, source="bench", codec=codec) if avro else None
    audits = await raw_audits(settings, codec, prefix, topics) if audit else {}
    processes = StageProcesses([StageSpec(run, *where(settings), prefix, *stage,
                                          args.partitions, audits.get(stage[0]))
                                for stage in STAGES]) if args.processes else None
    stages: list[RawStage | RdStage] = [] if processes else [
        RdStage(kafka, f"{prefix}-{name}", topics[src].name, topics[dst].name,
                codec=(codec, topics[src]) if avro else None, audit=audits.get(name))
        if rdkafka else
        RawStage(kafka, f"{prefix}-{name}", topics[src].name, topics[dst].name, one,
                 codec=(codec, topics[src]) if avro else None, audit=audits.get(name))
        for name, src, dst in STAGES]
    serde = codec.serde(Ping)

    def decode(value: bytes) -> tuple[int, int]:
        if avro:
            ping = serde.decode(value)
            assert isinstance(ping, Ping)
            return ping.id, ping.sent_at_ns
        doc = json.loads(value)
        return doc["id"], doc["sent_at_ns"]

    sink = Sink(kafka, topics["out"].name, args.partitions, decode)
    injector = AIOKafkaProducer(**producer_kwargs(kafka))
    stop = asyncio.Event()
    tasks: list[asyncio.Task[None]] = []
    watched: list[asyncio.Task[None]] = []  # the stage processes' ends
    try:
        await injector.start()
        if emitter is not None:  # builds records only; entered so its producer is closed
            await emitter.__aenter__()
        await sink.start()
        if one is not None:
            await one.start()
        for stage in stages:
            await stage.start()
        tasks = [asyncio.create_task(s.run(stop), name=f"raw stage {s.group}") for s in stages]
        await race(asyncio.gather(*(s.listener.event.wait() for s in stages)), tasks,
                   timeout=ASSIGN_TIMEOUT_S, what="the raw stages' assignment")
        if processes is not None:
            watched = await processes.start()
            cpu.add_stages(processes.pids)
        pad = "x" * args.size
        source = topics["in"].name

        async def inject() -> float:
            start = time.perf_counter()
            paced: list[Any] = []  # paced: acks awaited at the end, the schedule kept
            async for chunk in schedule(args.events, args.inject_batch, args.rate):
                acks = []
                for i in chunk:
                    ping = make_ping(i, pad)
                    if emitter is None:
                        acks.append(await injector.send(source, ping.model_dump_json().encode(),
                                                        key=ping.key.encode()))
                    else:  # as `mesh emit` builds it, as the mesh run injects
                        out = emitter.record(topics["in"], ping)[0]
                        acks.append(await injector.send(source, out.value, key=out.key,
                                                        headers=list(out.headers)))
                if args.rate > 0:
                    paced.extend(acks)
                else:
                    await asyncio.gather(*acks)
            await asyncio.gather(*paced)
            return time.perf_counter() - start

        cpu.start()
        collecting = asyncio.create_task(sink.collect(args.events), name="sink")
        inject_s = await race(inject(), [*tasks, *watched, collecting], timeout=args.timeout,
                              what="injection")
        arrivals, duplicates = await race(collecting, [*tasks, *watched], timeout=args.timeout,
                                          what=f"{args.events} events at the sink")
        cpu.stop()
    finally:
        stop.set()
        if processes is not None:
            await processes.stop()
        if tasks:
            await asyncio.wait(tasks, timeout=60)
        for stage in stages:
            await stage.stop()
        if one is not None:
            await one.stop()
        await sink.stop()
        await injector.stop()
        if emitter is not None:
            await emitter.__aexit__(None, None, None)
    for task in tasks:
        if not task.done():
            raise BenchError(f"{task.get_name()} did not stop within 60 s.")
        if task.exception() is not None:
            raise BenchError(f"{task.get_name()} failed: {task.exception()!r}")
    extra: dict[str, Any] = {"handled": {s.group: s.handled for s in stages},
                             "sink_records": len(sink.raw)}
    if processes is not None:
        extra["stage_exit_codes"] = processes.exit_codes
    result = summarise("raw", args.events, arrivals, duplicates, inject_s, cpu, extra)
    if args.rate > 0:
        result.hop_ms = await hop_latencies(kafka, {k: t.name for k, t in topics.items()},
                                            args.partitions, args.events, decode)
    return result


async def raw_audits(settings: MeshSettings, codec: Codec, prefix: str,
                     topics: dict[str, Topic[Ping]]) -> dict[str, OutRecord]:
    """For each raw stage, an audit record such as the mesh's agent would write for one
    input with one output (the same fields, ids and sizes; built here once, not per
    input), to a fresh topic laid out as ``mesh.audit``."""
    target = await audit_like_topic(settings, f"{prefix}.audit")
    ids = [str(uuid.uuid4()) for _ in range(4)]
    trace = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
    out = {}
    for name, src, dst in STAGES:
        event = AuditEvent(
            kind=CONSUMED, agent=f"{prefix}-{name}", topic=topics[src].name, partition=0,
            offset=12_345, event_id=ids[0], correlation_id=ids[1], causation_id=ids[2],
            traceparent=trace, outcome=OK, duration_ms=0.123, attempt=1, size=1_100,
            details={"replica": f"{platform.node()}:{os.getpid()}"},
            outputs=[AuditOutput(event_id=ids[3], topic=topics[dst].name, size=1_100,
                                 traceparent=trace)])
        out[name] = audit_record(codec, event, source=f"{prefix}-{name}")._replace(
            topic=target.name, key=None)  # keyed per input by the stage
    return out


async def audit_like_topic(settings: MeshSettings, name: str) -> Topic[AuditEvent]:
    """A fresh topic ``name`` laid out as ``mesh.audit`` (created here), for the raw
    runs' stand-ins of audit records."""
    target = Topic(name, AuditEvent, key="correlation_id",
                   partitions=audit_topic.partitions, dead_letters=False)
    await apply_topics(settings.kafka, [target])
    return target


# --------------------------------------------------------------------------- --processes


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """One stage of run ``run`` (mesh or raw), for a process of its own."""

    run: str
    bootstrap: str
    embedded: bool  # the broker's settings profile
    prefix: str  # of the run's topics and groups
    name: str
    source: str  # topic names in the run's dict: "in", "ab", ...
    target: str
    partitions: int
    audit: OutRecord | None = None  # raw-avro-audit: the stage's audit record


def stage_main(spec: StageSpec, ready: Any) -> None:
    """A stage process: builds the stage, sends one message on ``ready`` (a pipe's end)
    once it is assigned, and runs until SIGTERM."""
    logging.basicConfig(level=os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
                        format=f"%(asctime)s %(levelname)s stage {spec.name}: %(message)s")
    asyncio.run(_stage(spec, ready))


async def _stage(spec: StageSpec, ready: Any) -> None:
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    settings = MeshSettings().with_bootstrap(spec.bootstrap, embedded=spec.embedded)
    if spec.run in MESH_RUNS:
        settings = mesh_settings(spec.run, settings)
        topics = chain_topics(spec.prefix, spec.partitions)
        mesh = Mesh(settings, [mesh_agent(spec.run, spec.prefix, topics, spec.name,
                                          spec.source, spec.target)])
        task = asyncio.create_task(mesh.run(), name=f"mesh stage {spec.name}")
        try:
            await race(mesh.wait_assigned(ASSIGN_TIMEOUT_S), [task],
                       timeout=ASSIGN_TIMEOUT_S + 5, what="the stage's assignment")
            ready.send("assigned")
            await race(stop.wait(), [task], timeout=STAGE_MAX_S, what="SIGTERM")
        finally:
            mesh.stop_event.set()
            await asyncio.wait([task], timeout=60)
        return
    raw = chain_topics(spec.prefix, spec.partitions, dead_letters=False)
    codec: tuple[Codec, Topic[Ping]] | None = None
    if spec.run.startswith("raw-avro"):
        mesh_codec = Codec(settings.schema_registry)
        await mesh_codec.prepare(list(raw.values()))
        codec = (mesh_codec, raw[spec.source])
    stage = RawStage(settings.kafka, f"{spec.prefix}-{spec.name}", raw[spec.source].name,
                     raw[spec.target].name, codec=codec, audit=spec.audit)
    await stage.start()
    task = asyncio.create_task(stage.run(stop), name=f"raw stage {spec.name}")
    try:
        await race(stage.listener.event.wait(), [task], timeout=ASSIGN_TIMEOUT_S,
                   what="the stage's assignment")
        ready.send("assigned")
        await race(stop.wait(), [task], timeout=STAGE_MAX_S, what="SIGTERM")
    finally:
        stop.set()
        await asyncio.wait([task], timeout=60)
        await stage.stop()


def where(settings: MeshSettings) -> tuple[str, bool]:
    """The broker a stage process reaches: its bootstrap servers and whether its settings
    profile is the embedded broker's."""
    assert settings.kafka.bootstrap_servers is not None  # start_broker set them
    return settings.kafka.bootstrap_servers, settings.kafka.embedded_profile


class StageProcesses:
    """A run's three stages, each in a process of its own (``--processes``): as agents
    are deployed, one service each, every stage with its own event loop. Started here
    and stopped by their pids (SIGTERM, then SIGKILL after 60 s)."""

    def __init__(self, specs: list[StageSpec]) -> None:
        context = multiprocessing.get_context("spawn")
        pipes = [context.Pipe(duplex=False) for _ in specs]
        self._ready = [reader for reader, _ in pipes]
        self._procs = [context.Process(target=stage_main, args=(spec, writer),
                                       name=f"stage {spec.name} ({spec.run})", daemon=True)
                       for spec, (_, writer) in zip(specs, pipes, strict=True)]
        self._watched: list[asyncio.Task[None]] = []

    @property
    def pids(self) -> list[int]:
        return [proc.pid for proc in self._procs if proc.pid is not None]

    @property
    def exit_codes(self) -> list[int | None]:
        return [proc.exitcode for proc in self._procs]

    async def start(self) -> list[asyncio.Task[None]]:
        """Start the stages; returns once every one is assigned, with a task per stage
        that fails when its process ends (to watch while the run goes on)."""
        for proc in self._procs:
            proc.start()
        self._watched = [asyncio.create_task(self._ended(proc), name=proc.name)
                         for proc in self._procs]
        for reader in self._ready:  # spawning imports the mesh: seconds, not minutes
            await race(_readable(reader.fileno()), self._watched,
                       timeout=ASSIGN_TIMEOUT_S + 30, what="the stage processes' assignment")
            reader.recv()
        return self._watched

    @staticmethod
    async def _ended(proc: multiprocessing.process.BaseProcess) -> None:
        await _readable(proc.sentinel)
        proc.join(timeout=5)  # it has ended: reaped at once, for its exit code
        raise BenchError(f"{proc.name} (pid {proc.pid}) exited with {proc.exitcode}")

    async def stop(self) -> None:
        for task in self._watched:  # the stages end now, as told
            task.cancel()
        await asyncio.gather(*self._watched, return_exceptions=True)
        for proc in self._procs:
            if proc.pid is not None and proc.is_alive():
                os.kill(proc.pid, signal.SIGTERM)
        for proc in self._procs:
            if proc.pid is None:
                continue
            try:
                await asyncio.wait_for(_readable(proc.sentinel), timeout=60)
            except TimeoutError:
                proc.kill()  # SIGKILL to our own child, by its pid
            proc.join(timeout=5)


async def _readable(fd: int) -> None:
    """Wait until ``fd`` is readable (a pipe with a message, a process's sentinel)."""
    loop = asyncio.get_running_loop()
    ready = loop.create_future()

    def readable() -> None:
        if not ready.done():
            ready.set_result(None)

    loop.add_reader(fd, readable)
    try:
        await ready
    finally:
        loop.remove_reader(fd)


# --------------------------------------------------------------------------- report


def print_table(results: dict[str, RunResult]) -> None:
    print()
    print(f"{'run':<14} {'events':>7} {'dups':>5} {'inject s':>9} {'elapsed s':>10} "
          f"{'events/s':>10} {'p50 ms':>9} {'p90 ms':>9} {'p99 ms':>9} {'max ms':>9} "
          f"{'cpu us/ev':>10} {'broker us/ev':>13}")
    for r in results.values():
        lat = r.latency_ms
        client = r.extra.get("client_cpu_us_per_event")
        broker = r.extra.get("broker_cpu_us_per_event")
        print(f"{r.name:<14} {r.events:>7} {r.duplicates:>5} {r.inject_s:>9.2f} "
              f"{r.elapsed_s:>10.2f} {r.throughput:>10.0f} {lat['p50']:>9.1f} "
              f"{lat['p90']:>9.1f} {lat['p99']:>9.1f} {lat['max']:>9.1f} "
              f"{'-' if client is None else f'{client:.0f}':>10} "
              f"{'-' if broker is None else f'{broker:.0f}':>13}")


def print_hops(results: dict[str, RunResult]) -> None:
    """Per-hop latency (paced runs): p50/p99 of each stage and of all hops pooled."""
    measured = [r for r in results.values() if r.hop_ms]
    if not measured:
        return
    print("\nper-hop latency, output timestamp - input timestamp (ms; p50 / p99):")
    print(f"{'run':<14}" + "".join(f"{'stage ' + h if h != 'hop' else 'all hops':>16}"
                                   for h in ("a", "b", "c", "hop")))
    for r in measured:
        print(f"{r.name:<14}" + "".join(f"{r.hop_ms[h]['p50']:>8.1f} /{r.hop_ms[h]['p99']:>6.1f}"
                                        for h in ("a", "b", "c", "hop")))


def ratios(results: dict[str, RunResult]) -> dict[str, float]:
    """mesh over raw, same run: throughput and latency ratios, and with per-hop figures
    the milliseconds a hop adds over raw's (``hop_p50_added_ms``...)."""
    if "raw" not in results:
        return {}
    raw = results["raw"]
    out: dict[str, float] = {}
    for name in COMPARED:
        if name not in results:
            continue
        run, tag = results[name], name.replace("-", "_")
        out[f"throughput_{tag}_over_raw"] = run.throughput / raw.throughput
        out[f"p50_{tag}_over_raw"] = run.latency_ms["p50"] / raw.latency_ms["p50"]
        out[f"p99_{tag}_over_raw"] = run.latency_ms["p99"] / raw.latency_ms["p99"]
        if run.hop_ms and raw.hop_ms:
            for q in ("p50", "p99"):
                out[f"hop_{q}_added_ms_{tag}"] = run.hop_ms["hop"][q] - raw.hop_ms["hop"][q]
    if "raw-avro" in results:  # the mesh's own cost, the schema work set aside
        for name in MESH_RUNS:
            if name in results:
                out[f"throughput_{name.replace('-', '_')}_over_raw_avro"] = (
                    results[name].throughput / results["raw-avro"].throughput)
    return out


def print_profile(profiler: cProfile.Profile, name: str, path: Path) -> None:
    profiler.dump_stats(path)
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(key).print_stats(25)
        print(f"\n--- {name} run profile, by {key} (full stats: {path}) ---")
        print("\n".join(out.getvalue().splitlines()[4:]))


async def main(args: argparse.Namespace) -> int:
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or any(r not in (*MESH_RUNS, *RAW_RUNS) for r in runs):
        raise SystemExit(f"--runs takes {', '.join((*MESH_RUNS, *RAW_RUNS))}, got "
                         f"{args.runs!r}")
    if "mesh-eos" in runs and args.broker == "embedded":
        raise SystemExit("mesh-eos needs Kafka transactions, which the embedded broker does "
                         "not have: run it with --broker apache")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    profilers = {name: cProfile.Profile() for name in runs
                 if args.profile and name in MESH_RUNS}
    results: dict[str, RunResult] = {}
    async with start_broker(args) as (settings, pids):
        print(f"{args.broker} broker (pids {pids}) on {settings.kafka.bootstrap_servers}; "
              f"{args.events} events of {args.size} B padding, {args.partitions} partitions, "
              f"{'rate ' + format(args.rate, 'g') + '/s' if args.rate else 'burst'}; "
              f"group timings {settings.kafka.group_timings()}", flush=True)
        if args.warmup:  # a JVM broker compiles its hot paths during the first minute
            print(f"warm-up: a raw run of {args.warmup} events, not reported ...", flush=True)
            await run_raw(settings, argparse.Namespace(**{**vars(args), "events": args.warmup}),
                          CpuMeter(None))
        for name in runs:
            load = os.getloadavg()[0]
            print(f"running {name} (load average {load:.2f}) ...", flush=True)
            cpu = CpuMeter(pids)
            profiler = profilers.get(name)
            lag = LoopLag() if args.loop_lag else None
            if lag is not None:
                lag.start()
            try:
                if name in MESH_RUNS:
                    results[name] = await run_mesh(settings, args, profiler, cpu, name)
                else:
                    results[name] = await run_raw(settings, args, cpu, name)
            finally:
                stalls = [] if lag is None else await lag.stop()
            r = results[name]
            r.name = name
            r.extra["load_average_before"] = load
            if lag is not None:
                r.extra["loop_stalls_ms"] = stalls
                print(f"  {name}: {len(stalls)} event-loop stalls over "
                      f"{LoopLag.THRESHOLD_S * 1000:.0f} ms in this process"
                      f"{f', the longest {max(stalls):.0f} ms' if stalls else ''}", flush=True)
            print(f"  {name}: {r.throughput:.0f} events/s, p50 {r.latency_ms['p50']:.1f} ms, "
                  f"p99 {r.latency_ms['p99']:.1f} ms; CPU per event: client "
                  f"{r.extra['client_cpu_us_per_event'] or 0:.0f} us, broker "
                  f"{r.extra['broker_cpu_us_per_event'] or 0:.0f} us; busy "
                  f"{r.extra['cores_busy'] or 0:.2f} of {os.cpu_count()} cores", flush=True)
    print_table(results)
    print_hops(results)
    rat = ratios(results)
    for name in COMPARED:
        tag = name.replace("-", "_")
        if f"throughput_{tag}_over_raw" in rat:
            print(f"\n{name}/raw: throughput {rat[f'throughput_{tag}_over_raw']:.2f}x, "
                  f"end-to-end p50 {rat[f'p50_{tag}_over_raw']:.2f}x, "
                  f"p99 {rat[f'p99_{tag}_over_raw']:.2f}x", end="")
            if f"hop_p50_added_ms_{tag}" in rat:
                print(f"; per hop {rat[f'hop_p50_added_ms_{tag}']:+.1f} ms at p50, "
                      f"{rat[f'hop_p99_added_ms_{tag}']:+.1f} ms at p99 over raw", end="")
            print()
    for name in MESH_RUNS:
        tag = name.replace("-", "_")
        if f"throughput_{tag}_over_raw_avro" in rat:
            print(f"{name}/raw-avro: throughput {rat[f'throughput_{tag}_over_raw_avro']:.2f}x")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"chain-{stamp}.json"
    document = {
        "timestamp": stamp,
        "broker": {"kind": args.broker, "nodes": args.nodes,
                   "profile": "embedded" if settings.kafka.embedded_profile else "kafka"},
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "params": vars(args),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "platform": platform.platform(), "aiokafka": aiokafka.__version__},
        "profiled": bool(args.profile),
        "group_timings": settings.kafka.group_timings(),
        "producer": {"linger_ms": settings.kafka.linger_ms, "acks": settings.kafka.acks,
                     "max_batch_size": settings.kafka.max_batch_size},
        "runtime": settings.runtime.model_dump(),
        "runs": {name: dataclasses.asdict(r) for name, r in results.items()},
        "ratios": rat,
    }
    out.write_text(json.dumps(document, indent=2) + "\n")
    print(f"\nresults: {out.relative_to(ROOT)}")
    for name, profiler in profilers.items():
        print(f"({name} was profiled: its numbers include cProfile's overhead)")
        print_profile(profiler, name, RESULTS / f"chain-{stamp}-{name}.prof")
    return 0


@contextlib.asynccontextmanager
async def start_broker(args: argparse.Namespace
                       ) -> AsyncIterator[tuple[MeshSettings, list[int]]]:
    """The broker of ``--broker`` (started here, stopped by pid on the way out) and the
    settings to reach it: the embedded profile for Tansu, the kafka profile (fetches
    that wake on data, Kafka's group timings, the idempotent producer) for Apache Kafka.
    Yields the settings and the broker's pids (for its CPU)."""
    if args.broker == "embedded":
        async with EmbeddedBroker() as embedded:
            yield (MeshSettings().with_bootstrap(embedded.bootstrap, embedded=True),
                   [] if embedded.pid is None else [embedded.pid])
    else:
        async with ApacheKafka(nodes=args.nodes) as kafka:
            yield MeshSettings().with_bootstrap(kafka.bootstrap), list(kafka.node_pids.values())


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="events to inject (N)")
    parser.add_argument("--size", type=int, default=1024, help="padding bytes per event")
    parser.add_argument("--partitions", type=int, default=4, help="partitions per topic")
    parser.add_argument("--inject-batch", type=int, default=500,
                        help="records sent before waiting for their acks while injecting")
    parser.add_argument("--rate", type=float, default=0.0,
                        help="inject at this many events/s (0: as fast as acks allow)")
    parser.add_argument("--runs", default="mesh,mesh-noaudit,raw",
                        help="which runs, in order (mesh-noaudit: audit publishing off; "
                        "mesh-blocking: blocking retries, so no retry-tier topics; "
                        "mesh-partition: ordering='partition', one input at a time per partition; "
                        "mesh-eos: exactly-once (Kafka transactions, --broker apache only), "
                        "read committed to the sink; "
                        "raw-shared: the raw stages share one producer, as the mesh's agents; "
                        "raw-avro: the raw stages decode, validate and encode as the mesh; "
                        "raw-avro-audit: raw-avro plus one prebuilt audit record per input; "
                        "rdkafka, rdkafka-avro-audit: raw and raw-avro-audit with the stages "
                        "on librdkafka (confluent-kafka), each in a thread)")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds allowed for the sink to receive all N")
    parser.add_argument("--broker", choices=("embedded", "apache"), default="embedded",
                        help="embedded: Tansu; apache: Apache Kafka (KRaft) from its jars")
    parser.add_argument("--nodes", type=int, default=1,
                        help="Apache Kafka nodes (3: replication factor 3, min ISR 2)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="events of an unreported raw run first (warms a JVM broker)")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile each mesh run (injection to last arrival)")
    parser.add_argument("--loop-lag", action="store_true",
                        help="watch this process's event loop during each run and report "
                        "its stalls over 30 ms (a tail of slow hops, or a busy process?)")
    parser.add_argument("--processes", action="store_true",
                        help="each stage in a process of its own, as deployed (mesh and raw "
                        "alike); the injector and sink stay in this one")
    args = parser.parse_args(argv)
    if args.processes and (args.profile or "raw-shared" in args.runs):
        parser.error("--processes runs each stage alone: no --profile, no raw-shared")
    if (args.events < 1 or args.size < 0 or args.partitions < 1 or args.inject_batch < 1
            or args.nodes < 1):
        parser.error("--events, --partitions, --inject-batch and --nodes must be >= 1, "
                     "--size >= 0")
    if args.rate < 0:
        parser.error("--rate must be >= 0")
    if args.rate > 0 and args.events / args.rate > args.timeout * 0.8:
        parser.error(f"--events/--rate = {args.events / args.rate:.0f} s of injection does not "
                     f"fit in --timeout {args.timeout:.0f} s")
    return args


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(main(parse_args())))
