"""Benchmark: slow handlers (an LLM call's shape) through the mesh, Faust and raw aiokafka.

    .venv/bin/python bench/slow.py [--requests N] [--delay S] [--partitions P]
                                   [--keys K] [--runs SPEC,...] [--partition-requests M]
                                   [--broker embedded|apache] [--exactly-once]

One agent answers requests: its handler awaits ``--delay`` seconds (0.5) and returns a
reply. N requests (1,000) on K keys (64) over P partitions (4) are injected at once and
the run ends when every reply has arrived at a group-less sink on the replies topic.
Every run uses the same broker (started here on a loopback port, stopped by pid) and
this process, with fresh topics. A run is ``system:ordering:concurrency``:

* ``mesh:key:64``: ``Agent(concurrency=64, ordering="key")``; ``mesh:partition``: the
  same agent with ``ordering="partition"`` (one input at a time per partition);
  ``mesh:none:256``: no order at all.
* ``raw:key:64``: raw aiokafka, an ``asyncio.Semaphore(64)`` around the handler and one
  queue per (partition, key) so that a key's requests run one after another;
  ``raw:none:256``: a task per record. Both commit only over the finished prefix of each
  partition (the output acknowledged), like the mesh.
* ``faust:none:64``: a faust-streaming agent with ``concurrency=64`` (Faust keeps no
  per-key order with concurrency > 1: its actors share the partition's stream).

``--exactly-once`` (Apache Kafka only) runs the mesh agents exactly-once (their replies
in Kafka transactions) and every sink reads ``read_committed``: a reply counts once its
transaction committed.

Every run checks its counts (every request's reply arrives; duplicates are counted) and,
where it promises per-key order, that no two requests of a key overlapped in the handler
and that each key's replies arrive in request order. Wall time runs from the first
request sent to the last reply received. Results are printed and written to
``bench/results/slow-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import logging
import os
import platform
import sys
import time
import uuid
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiokafka  # noqa: E402
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition  # noqa: E402
from pydantic import BaseModel  # noqa: E402

from bench.chain import (  # noqa: E402
    ASSIGN_TIMEOUT_S,
    MAX_RECORDS,
    POLL_MS,
    BenchError,
    CpuMeter,
    _Assigned,
    consumer_kwargs,
    producer_kwargs,
    race,
)
from mesh import (  # noqa: E402
    Agent,
    ApacheKafka,
    Codec,
    Context,
    EmbeddedBroker,
    Envelope,
    Mesh,
    MeshSettings,
    Topic,
    apply_topics,
)
from mesh.config import KafkaSettings  # noqa: E402
from mesh.kafka.base import OutRecord  # noqa: E402
from mesh.kafka.transport import Producer  # noqa: E402

RESULTS = ROOT / "bench" / "results"
DEFAULT_RUNS = ("mesh:key:64,mesh:key:16,mesh:partition,raw:key:64,raw:key:16,"
                "faust:none:64,faust:none:16,mesh:none:256,raw:none:256")
COMMIT_INTERVAL_S = 0.2  # the raw runs' commit cadence (the mesh's commit_interval_ms)

log = logging.getLogger("bench.slow")


class Request(BaseModel):
    """One request to the slow agent; ``seq`` numbers the requests of one key."""

    id: int
    key: str
    seq: int


class Reply(BaseModel):
    """The agent's answer to one request."""

    id: int
    key: str
    seq: int


@dataclasses.dataclass(frozen=True)
class Spec:
    """One run: which system, which ordering it keeps, how many handlers at once."""

    system: str  # mesh | raw | faust
    ordering: str  # key | partition | none
    concurrency: int

    @property
    def name(self) -> str:
        if self.ordering == "partition":
            return f"{self.system}:partition"
        return f"{self.system}:{self.ordering}:{self.concurrency}"

    @property
    def keeps_key_order(self) -> bool:
        return self.ordering in ("key", "partition")


def parse_spec(text: str) -> Spec:
    parts = text.strip().split(":")
    system = parts[0]
    ordering = parts[1] if len(parts) > 1 else "key"
    concurrency = int(parts[2]) if len(parts) > 2 else 16
    allowed = {"mesh": ("key", "partition", "none"), "raw": ("key", "none"),
               "faust": ("none",)}
    if system not in allowed or ordering not in allowed[system] or concurrency < 1:
        raise SystemExit(f"--runs: {text!r} is not system:ordering:concurrency with one of "
                         f"{allowed} and concurrency >= 1 (e.g. mesh:key:64, raw:none:256).")
    return Spec(system, ordering, concurrency)


class Probe:
    """Wraps the simulated LLM call: counts calls, the peak of calls in flight, and
    requests of one key that overlap or start out of their order."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.calls = 0
        self.in_flight = 0
        self.peak = 0
        self.overlaps = 0  # a request started while another of its key was in the handler
        self.out_of_order = 0  # a request started before an earlier one of its key
        self._running: dict[str, int] = {}
        self._next_seq: dict[str, int] = {}

    async def call(self, key: str, seq: int) -> None:
        if self._running.get(key):
            self.overlaps += 1
        if seq < self._next_seq.get(key, 0):
            self.out_of_order += 1
        self._next_seq[key] = max(self._next_seq.get(key, 0), seq + 1)
        self._running[key] = self._running.get(key, 0) + 1
        self.calls += 1
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            await asyncio.sleep(self.delay)  # the LLM call's shape: waiting, no CPU
        finally:
            self.in_flight -= 1
            self._running[key] -= 1


@dataclasses.dataclass
class Collected:
    last_ns: int
    duplicates: int
    order_errors: int  # a key's reply arrived after a later one of the same key


class Sink:
    """A group-less consumer of every partition of the replies topic, from the start."""

    def __init__(self, kafka: KafkaSettings, topic: str, partitions: int,
                 decode: Callable[[bytes], tuple[int, str, int]]) -> None:
        kwargs = consumer_kwargs(kafka)
        for key in ("session_timeout_ms", "heartbeat_interval_ms", "max_poll_interval_ms"):
            kwargs.pop(key)
        self._consumer = AIOKafkaConsumer(group_id=None, **kwargs)  # kwargs: isolation too
        self._parts = [TopicPartition(topic, p) for p in range(partitions)]
        self._decode = decode

    async def start(self) -> None:
        await self._consumer.start()
        self._consumer.assign(self._parts)
        await self._consumer.seek_to_beginning(*self._parts)

    async def stop(self) -> None:
        await self._consumer.stop()

    async def collect(self, n: int) -> Collected:
        """Read until ``n`` distinct request ids have a reply."""
        seen: set[int] = set()
        last_seq: dict[str, int] = {}
        duplicates = order_errors = last_ns = 0
        while len(seen) < n:
            batches = await self._consumer.getmany(timeout_ms=POLL_MS, max_records=10_000)
            now = time.time_ns()
            for msgs in batches.values():  # each partition's replies in offset order
                for m in msgs:
                    ident, key, seq = self._decode(m.value)
                    if ident in seen:
                        duplicates += 1
                        continue
                    seen.add(ident)
                    last_ns = now
                    if seq < last_seq.get(key, -1):
                        order_errors += 1
                    last_seq[key] = max(seq, last_seq.get(key, -1))
        return Collected(last_ns, duplicates, order_errors)


@dataclasses.dataclass
class RunResult:
    name: str
    requests: int
    wall_s: float
    per_s: float
    inject_s: float
    duplicates: int
    handler_calls: int
    peak_in_flight: int
    mean_in_flight: float  # requests x delay / wall: how much waiting overlapped
    key_overlaps: int
    key_order_errors: int
    floor_s: float  # the shortest possible wall time for this run's order and concurrency
    load_before: float
    load_after: float
    client_cpu_s: float | None
    broker_cpu_s: float | None


def requests_of(n: int, keys: int) -> list[Request]:
    return [Request(id=i, key=f"k{i % keys}", seq=i // keys) for i in range(n)]


def floor_s(spec: Spec, requests: list[Request], partitions_of: dict[str, int],
            delay: float) -> float:
    """The shortest wall time the handler's waiting allows for this run: the most
    requests any one order lane holds (a key, or a partition) and the concurrency."""
    lanes: dict[Any, int] = {}
    for r in requests:
        lane = {"key": r.key, "partition": partitions_of.get(r.key), "none": r.id}
        lanes[lane[spec.ordering]] = lanes.get(lane[spec.ordering], 0) + 1
    serial = max(lanes.values()) * delay
    return max(serial, -(-len(requests) // spec.concurrency) * delay)


def murmur2_partitions(keys: list[str], partitions: int) -> dict[str, int]:
    from aiokafka.partitioner import murmur2

    return {k: (murmur2(k.encode()) & 0x7FFFFFFF) % partitions for k in keys}


# --------------------------------------------------------------------------- runs


async def measure(name: str, spec: Spec, args: argparse.Namespace, requests: list[Request],
                  broker_pid: int | None, inject: Callable[[], Any], sink: Sink,
                  watched: list[asyncio.Task[Any]], probe: Probe) -> RunResult:
    """Inject every request, wait for every reply; the common part of all runs."""
    cpu = CpuMeter(broker_pid)
    load_before = os.getloadavg()[0]
    cpu.start()
    start_ns = time.time_ns()
    collecting = asyncio.create_task(sink.collect(len(requests)), name="sink")
    try:
        inject_start = time.perf_counter()
        await race(inject(), [*watched, collecting], timeout=args.timeout, what="injection")
        inject_s = time.perf_counter() - inject_start
        got: Collected = await race(collecting, watched, timeout=args.timeout,
                                    what=f"{len(requests)} replies at the sink")
    finally:
        collecting.cancel()
        await asyncio.gather(collecting, return_exceptions=True)
    cpu.stop()
    wall = (got.last_ns - start_ns) / 1e9
    return RunResult(
        name=name, requests=len(requests), wall_s=wall, per_s=len(requests) / wall,
        inject_s=inject_s, duplicates=got.duplicates, handler_calls=probe.calls,
        peak_in_flight=probe.peak, mean_in_flight=len(requests) * args.delay / wall,
        key_overlaps=probe.overlaps + probe.out_of_order, key_order_errors=got.order_errors,
        floor_s=0.0, load_before=load_before, load_after=os.getloadavg()[0],
        client_cpu_s=cpu.client_s, broker_cpu_s=cpu.broker_s)


async def run_mesh(settings: MeshSettings, spec: Spec, args: argparse.Namespace,
                   requests: list[Request], broker_pid: int | None) -> RunResult:
    prefix = f"slow-{uuid.uuid4().hex[:8]}-mesh-{spec.ordering}"
    source = Topic(f"{prefix}.requests", Request, key="key", partitions=args.partitions)
    target = Topic(f"{prefix}.replies", Reply, key="key", partitions=args.partitions)
    await apply_topics(settings.kafka, [source, target])
    probe = Probe(args.delay)

    async def answer(request: Request, ctx: Context) -> Reply:
        await probe.call(request.key, request.seq)
        return Reply(id=request.id, key=request.key, seq=request.seq)

    agent = Agent(f"{prefix}-agent", consumes=source, produces=target, handler=answer,
                  concurrency=spec.concurrency, ordering=spec.ordering,  # type: ignore[arg-type]
                  exactly_once=args.exactly_once)
    mesh = Mesh(settings, [agent])
    codec = Codec(settings.schema_registry)
    await codec.prepare([source, target])
    serde = codec.serde(Reply)

    def decode(value: bytes) -> tuple[int, str, int]:
        reply = serde.decode(value)
        assert isinstance(reply, Reply)
        return reply.id, reply.key, reply.seq

    sink = Sink(settings.kafka, target.name, args.partitions, decode)
    injector = Producer(settings.kafka)
    mesh_task = asyncio.create_task(mesh.run(), name="mesh")

    async def inject() -> None:  # what `mesh emit` does (see bench/chain.py)
        for first in range(0, len(requests), args.inject_batch):
            records = []
            for request in requests[first:first + args.inject_batch]:
                env = Envelope.new(request, source="bench", key=source.key_of(request))
                value, fingerprint = codec.encode(source, request)
                env = env.with_payload(request, schema=fingerprint)
                records.append(OutRecord(source.name, value, env.key, tuple(env.headers())))
            await injector.send_all(records)

    try:
        await injector.start()
        await sink.start()
        await race(mesh.wait_assigned(ASSIGN_TIMEOUT_S), [mesh_task],
                   timeout=ASSIGN_TIMEOUT_S + 5, what="the mesh agent's assignment")
        result = await measure(spec.name, spec, args, requests, broker_pid, inject, sink,
                               [mesh_task], probe)
    finally:
        mesh.stop_event.set()
        await asyncio.wait([mesh_task], timeout=60)
        await sink.stop()
        await injector.stop()
    if not mesh_task.done():
        raise BenchError("The mesh did not stop within 60 s.")
    if not mesh_task.cancelled() and mesh_task.exception() is not None:
        raise BenchError(f"The mesh failed: {mesh_task.exception()!r}")
    dead = sum(r.dead_lettered for r in mesh.runners)
    if dead:
        raise BenchError(f"{spec.name}: {dead} requests were dead-lettered.")
    return result


class RawAgent:
    """The slow agent on raw aiokafka: poll, hand each record to the queue of its key
    (``ordered``) or to a task of its own, at most ``concurrency`` handlers at once
    (a semaphore); produce the reply; commit each partition over the prefix of records
    whose replies are acknowledged. No flow control: the benchmark's N fit in memory."""

    def __init__(self, kafka: KafkaSettings, group: str, source: str, target: str,
                 spec: Spec, probe: Probe) -> None:
        self.consumer = AIOKafkaConsumer(group_id=group, **consumer_kwargs(kafka))
        self.producer = AIOKafkaProducer(**producer_kwargs(kafka))
        self.source, self.target = source, target
        self.ordered = spec.ordering == "key"
        self.slots = asyncio.Semaphore(spec.concurrency)
        self.probe = probe
        self.listener = _Assigned()
        # per partition: offset -> the reply's ack (None while handled), in offset order
        self.pending: dict[TopicPartition, dict[int, asyncio.Future[Any] | None]] = {}
        self.queues: dict[Any, deque[Any]] = {}
        self.committed: dict[TopicPartition, int] = {}

    async def start(self) -> None:
        await self.producer.start()
        await self.consumer.start()
        self.consumer.subscribe([self.source], listener=self.listener)

    async def stop(self) -> None:
        await self.consumer.stop()
        await self.producer.stop()

    async def run(self, stop: asyncio.Event) -> None:
        async with asyncio.TaskGroup() as workers:
            next_commit = 0.0
            while not stop.is_set():
                batches = await self.consumer.getmany(timeout_ms=POLL_MS,
                                                      max_records=MAX_RECORDS)
                for tp, msgs in batches.items():
                    pending = self.pending.setdefault(tp, {})
                    for m in msgs:
                        pending[m.offset] = None
                        lane = (tp, m.key) if self.ordered else (tp, m.offset)
                        if lane in self.queues:
                            self.queues[lane].append(m)
                        else:
                            self.queues[lane] = deque([m])
                            workers.create_task(self._work(lane))
                if time.monotonic() >= next_commit:
                    await self._commit()
                    next_commit = time.monotonic() + COMMIT_INTERVAL_S
        await self._commit()

    async def _work(self, lane: Any) -> None:
        queue = self.queues[lane]
        while queue:
            m = queue[0]
            async with self.slots:
                doc = json.loads(m.value)
                await self.probe.call(doc["key"], doc["seq"])
                reply = {"id": doc["id"], "key": doc["key"], "seq": doc["seq"]}
                ack = await self.producer.send(self.target, json.dumps(reply).encode(),
                                               key=m.key)
            queue.popleft()
            self.pending[lane[0]][m.offset] = ack
        del self.queues[lane]

    async def _commit(self) -> None:
        due = {}
        for tp, pending in self.pending.items():
            done = None
            while pending:
                offset, ack = next(iter(pending.items()))
                if ack is None or not ack.done():
                    break
                ack.result()  # a failed produce fails the run
                del pending[offset]
                done = offset + 1
            if done is not None:
                due[tp] = done
        if due:
            await self.consumer.commit(due)
            self.committed.update(due)


def json_decode(value: bytes) -> tuple[int, str, int]:
    doc = json.loads(value)
    return doc["id"], doc["key"], doc["seq"]


def json_injector(producer: AIOKafkaProducer, topic: str, requests: list[Request],
                  batch: int) -> Callable[[], Any]:
    async def inject() -> None:
        for first in range(0, len(requests), batch):
            acks = [await producer.send(topic, r.model_dump_json().encode(),
                                        key=r.key.encode())
                    for r in requests[first:first + batch]]
            await asyncio.gather(*acks)
    return inject


async def plain_topics(settings: MeshSettings, prefix: str,
                       partitions: int) -> tuple[str, str]:
    topics = [Topic(f"{prefix}.{name}", model, key="key", partitions=partitions,
                    dead_letters=False)
              for name, model in (("requests", Request), ("replies", Reply))]
    await apply_topics(settings.kafka, topics)
    return topics[0].name, topics[1].name


async def run_raw(settings: MeshSettings, spec: Spec, args: argparse.Namespace,
                  requests: list[Request], broker_pid: int | None) -> RunResult:
    prefix = f"slow-{uuid.uuid4().hex[:8]}-raw-{spec.ordering}"
    source, target = await plain_topics(settings, prefix, args.partitions)
    probe = Probe(args.delay)
    agent = RawAgent(settings.kafka, f"{prefix}-agent", source, target, spec, probe)
    sink = Sink(settings.kafka, target, args.partitions, json_decode)
    injector = AIOKafkaProducer(**producer_kwargs(settings.kafka))
    stop = asyncio.Event()
    task: asyncio.Task[None] | None = None
    try:
        await injector.start()
        await sink.start()
        await agent.start()
        task = asyncio.create_task(agent.run(stop), name="raw agent")
        await race(agent.listener.event.wait(), [task], timeout=ASSIGN_TIMEOUT_S,
                   what="the raw agent's assignment")
        return await measure(spec.name, spec, args, requests, broker_pid,
                             json_injector(injector, source, requests, args.inject_batch),
                             sink, [task], probe)
    finally:
        stop.set()
        if task is not None:
            await asyncio.wait([task], timeout=60)
        await agent.stop()
        await sink.stop()
        await injector.stop()
        if task is not None and task.done() and not task.cancelled() and task.exception():
            raise BenchError(f"The raw agent failed: {task.exception()!r}")


async def run_faust(settings: MeshSettings, spec: Spec, args: argparse.Namespace,
                    requests: list[Request], broker_pid: int | None) -> RunResult:
    try:
        import faust
    except ImportError as exc:
        raise BenchError("faust runs need faust-streaming: .venv/bin/pip install -e "
                         "'.[bench]' (or leave faust out of --runs).") from exc
    prefix = f"slow-{uuid.uuid4().hex[:8]}-faust"
    source, target = await plain_topics(settings, prefix, args.partitions)
    timings = settings.kafka.group_timings()
    app = faust.App(
        f"{prefix}-agent",
        broker=[f"kafka://{s}" for s in settings.kafka.bootstrap_servers.split(",")],
        store="memory://", web_enabled=False, topic_partitions=args.partitions,
        topic_allow_declare=False, topic_disable_leader=True,
        consumer_auto_offset_reset="earliest", producer_acks=-1,
        broker_session_timeout=timings["session_timeout_ms"] / 1000,
        broker_heartbeat_interval=timings["heartbeat_interval_ms"] / 1000)
    requests_topic = app.topic(source, key_serializer="raw", value_serializer="raw")
    replies_topic = app.topic(target, key_serializer="raw", value_serializer="raw")
    probe = Probe(args.delay)
    assigned = asyncio.Event()

    async def on_rebalanced(sender: Any, **kwargs: Any) -> None:
        if app.consumer.assignment():
            assigned.set()

    app.on_rebalance_complete.connect(on_rebalanced)

    async def answer(stream: Any) -> None:
        async for value in stream:
            doc = json.loads(value)
            await probe.call(doc["key"], doc["seq"])
            reply = {"id": doc["id"], "key": doc["key"], "seq": doc["seq"]}
            await replies_topic.send(key=doc["key"].encode(), value=json.dumps(reply).encode())

    app.agent(requests_topic, name=f"{prefix}.answer", concurrency=spec.concurrency)(answer)
    sink = Sink(settings.kafka, target, args.partitions, json_decode)
    injector = AIOKafkaProducer(**producer_kwargs(settings.kafka))
    try:
        await injector.start()
        await sink.start()
        await asyncio.wait_for(app.start(), ASSIGN_TIMEOUT_S)
        await asyncio.wait_for(assigned.wait(), ASSIGN_TIMEOUT_S)
        return await measure(spec.name, spec, args, requests, broker_pid,
                             json_injector(injector, source, requests, args.inject_batch),
                             sink, [], probe)
    finally:
        await asyncio.wait_for(app.stop(), 60)
        await sink.stop()
        await injector.stop()


# --------------------------------------------------------------------------- report


def print_table(results: list[RunResult]) -> None:
    print()
    print(f"{'run':<16} {'reqs':>5} {'wall s':>8} {'inject s':>8} {'req/s':>7} {'floor s':>8} "
          f"{'peak':>5} {'mean':>6} {'dups':>5} {'key order':>10} {'load':>11} "
          f"{'cpu s':>6}")
    for r in results:
        order = f"{r.key_overlaps}/{r.key_order_errors}"
        print(f"{r.name:<16} {r.requests:>5} {r.wall_s:>8.2f} {r.inject_s:>8.2f} {r.per_s:>7.1f} "
              f"{r.floor_s:>8.2f} {r.peak_in_flight:>5} {r.mean_in_flight:>6.1f} "
              f"{r.duplicates:>5} {order:>10} "
              f"{r.load_before:>5.1f}/{r.load_after:<5.1f} "
              f"{'-' if r.client_cpu_s is None else f'{r.client_cpu_s:.1f}':>6}")
    print("(wall: first request sent to last reply received; inject: sending all "
          "requests (part of wall); floor: the least the "
          "ordering and concurrency allow; peak/mean: handlers in flight; key order: "
          "overlapping or out-of-order starts / replies out of key order; load: 1-min "
          "load average before/after)")


def time_for(r: RunResult, n: int) -> float:
    """Wall time for ``n`` requests at the run's rate (extrapolated when it ran fewer)."""
    return r.wall_s if r.requests == n else n / r.per_s


def ratios(results: list[RunResult], n: int) -> dict[str, float]:
    by_name = {r.name: r for r in results}
    out: dict[str, float] = {}
    for r in results:
        if not r.name.startswith("mesh:") or r.name == "mesh:partition":
            continue
        raw = by_name.get(r.name.replace("mesh:", "raw:", 1))
        if raw is not None:
            out[f"{r.name} / {raw.name} (time)"] = r.wall_s / raw.wall_s
        faust = by_name.get(f"faust:none:{r.name.rsplit(':', 1)[1]}")
        if faust is not None:
            out[f"{r.name} / {faust.name} (time)"] = r.wall_s / faust.wall_s
        slow = by_name.get("mesh:partition")
        if slow is not None:
            out[f"mesh:partition / {r.name} (speed-up)"] = time_for(slow, n) / r.wall_s
    return out


async def main(args: argparse.Namespace) -> int:
    specs = [parse_spec(s) for s in args.runs.split(",") if s.strip()]
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: list[RunResult] = []
    keys = [f"k{i}" for i in range(args.keys)]
    partitions_of = murmur2_partitions(keys, args.partitions)
    print(f"load average at start: {os.getloadavg()}", flush=True)
    broker: Any = EmbeddedBroker() if args.broker == "embedded" else ApacheKafka()
    async with broker:
        settings = MeshSettings().with_bootstrap(broker.bootstrap,
                                                 embedded=args.broker == "embedded")
        if args.exactly_once:
            kafka = settings.kafka.model_copy(update={"isolation_level": "read_committed"})
            settings = settings.model_copy(update={"kafka": kafka})
        broker_pid = broker.pid if args.broker == "embedded" else None
        eos = " (mesh exactly-once, sinks read_committed)" if args.exactly_once else ""
        print(f"{args.broker} broker on {broker.bootstrap}; {args.requests} requests{eos}, handler "
              f"{args.delay:g} s, {args.partitions} partitions, {args.keys} keys "
              f"(requests per partition: {sorted(per_partition(args, partitions_of))})",
              flush=True)
        for spec in specs:
            n = args.partition_requests if spec.ordering == "partition" else args.requests
            requests = requests_of(n, args.keys)
            print(f"running {spec.name} on {n} requests (load average "
                  f"{os.getloadavg()[0]:.2f}) ...", flush=True)
            run = {"mesh": run_mesh, "raw": run_raw, "faust": run_faust}[spec.system]
            r = await run(settings, spec, args, requests, broker_pid)
            r.floor_s = floor_s(spec, requests, partitions_of, args.delay)
            check(spec, r)
            results.append(r)
            extrapolated = (f"; {args.requests} would take {time_for(r, args.requests):.1f} s"
                            if n != args.requests else "")
            print(f"  {r.name}: {r.wall_s:.2f} s, {r.per_s:.1f} requests/s (floor "
                  f"{r.floor_s:.2f} s), peak {r.peak_in_flight} in flight{extrapolated}",
                  flush=True)
    print_table(results)
    rat = ratios(results, args.requests)
    if rat:
        print()
        for name, value in rat.items():
            print(f"{name:<52} {value:8.2f}x")
        if any(r.name == "mesh:partition" and r.requests != args.requests for r in results):
            print(f"(mesh:partition ran {args.partition_requests} requests: its time for "
                  f"{args.requests} is extrapolated at its measured rate)")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"slow-{stamp}.json"
    out.write_text(json.dumps({
        "timestamp": stamp, "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "params": vars(args),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "platform": platform.platform(), "aiokafka": aiokafka.__version__},
        "runtime": settings.runtime.model_dump(),
        "runs": [dataclasses.asdict(r) for r in results], "ratios": rat,
    }, indent=2) + "\n")
    print(f"\nresults: {out.relative_to(ROOT)}")
    return 0


def per_partition(args: argparse.Namespace, partitions_of: dict[str, int]) -> list[int]:
    counts = [0] * args.partitions
    for r in requests_of(args.requests, args.keys):
        counts[partitions_of[r.key]] += 1
    return counts


def check(spec: Spec, r: RunResult) -> None:
    """Nothing lost (the sink waited for every id), every request handled, and per-key
    order wherever the run promises it."""
    if r.handler_calls < r.requests:
        raise BenchError(f"{spec.name}: {r.handler_calls} handler calls for {r.requests} "
                         "requests.")
    if spec.keeps_key_order and (r.key_overlaps or r.key_order_errors):
        raise BenchError(f"{spec.name} promises per-key order but {r.key_overlaps} requests "
                         f"started out of key order and {r.key_order_errors} replies arrived "
                         "out of key order.")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000, help="requests per run (N)")
    parser.add_argument("--delay", type=float, default=0.5, help="handler wait, seconds")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument("--keys", type=int, default=64, help="distinct request keys")
    parser.add_argument("--runs", default=DEFAULT_RUNS,
                        help="system:ordering:concurrency,... (mesh|raw|faust; key|partition"
                             "|none)")
    parser.add_argument("--partition-requests", type=int, default=100,
                        help="requests for mesh:partition (one at a time per partition: "
                             "N x delay / partitions; its time for N is extrapolated)")
    parser.add_argument("--inject-batch", type=int, default=500)
    parser.add_argument("--broker", choices=("embedded", "apache"), default="embedded",
                        help="embedded: Tansu; apache: one Apache Kafka KRaft node from "
                             "its jars (Java 17, Maven)")
    parser.add_argument("--exactly-once", action="store_true",
                        help="mesh agents exactly-once (needs --broker apache); sinks read "
                             "read_committed")
    parser.add_argument("--timeout", type=float, default=300.0,
                        help="seconds allowed for one run's replies")
    args = parser.parse_args(argv)
    if min(args.requests, args.partitions, args.keys, args.partition_requests,
           args.inject_batch) < 1 or args.delay < 0:
        parser.error("counts must be >= 1 and --delay >= 0")
    if args.exactly_once and args.broker != "apache":
        parser.error("--exactly-once needs Kafka transactions: --broker apache")
    return args


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(main(parse_args())))
