"""Benchmark: the emit path (``mesh.Emitter``, what ``mesh emit`` runs) vs. a raw
aiokafka producer sending the same payloads.

    .venv/bin/python bench/emit.py [--events N] [--size BYTES] [--batch B]
                                   [--runs emitter,emitter-noaudit,raw,raw-audit]
                                   [--repeat R]
                                   [--broker embedded|apache] [--nodes N] [--profile]

N ``Ping`` payloads (pydantic models, built before the clock starts) are produced to a
fresh topic per run, B per call, each call waiting until the broker acknowledged its
records:

* emitter: ``Emitter.emit(topic, payloads)`` (validation against the topic's model,
  Avro single-object encoding, envelope headers, one ``produced`` audit record per event
  on ``mesh.audit``), the mesh's producer.
* emitter-noaudit: the same with ``MESH_AUDIT__ENABLED=false``.
* raw: ``AIOKafkaProducer.send(topic, payload.model_dump_json().encode(), key=...)`` for
  each payload, then the call's acks gathered. Same producer settings as the mesh
  (``bench/chain.py``'s ``producer_kwargs``).
* raw-audit (a floor, not in the default runs): raw, and each payload also sends one
  record the size of the emitter's ``produced`` audit record (a real one, encoded once
  before the clock starts), keyed by an id made before the clock starts, to a topic
  laid out as ``mesh.audit``: the record per event that the audit adds, without
  building it.
* raw-records (a floor, not in the default runs): the raw producer sending exactly the
  records the emitter produces (Avro values with the envelope's seven headers, and each
  event's ``produced`` audit record, to a topic laid out as ``mesh.audit``), built by
  an ``Emitter`` before the clock starts: the wire's share of the emit path, the
  building set aside.

Time runs from the first call to the last acknowledgement. After each run a group-less
reader checks the topic holds all N ids (nothing lost). With ``--repeat R`` the runs
alternate R times and each ratio is reported per round, so the machine's load affects
both sides alike. Results go to ``bench/results/emit-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import dataclasses
import io
import json
import logging
import os
import platform
import pstats
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import aiokafka  # noqa: E402
from aiokafka import AIOKafkaProducer  # noqa: E402

from bench.chain import (  # noqa: E402
    KEYS,
    CpuMeter,
    Ping,
    audit_like_topic,
    producer_kwargs,
    start_broker,
    timestamps,
)
from mesh import Emitter, MeshSettings, Topic, apply_topics  # noqa: E402
from mesh.envelope import now_ms  # noqa: E402
from mesh.kafka.base import OutRecord  # noqa: E402
from mesh.runtime.audit import PRODUCED, AuditEvent, audit_record, audit_topic  # noqa: E402
from mesh.serde.codec import Codec  # noqa: E402

RESULTS = ROOT / "bench" / "results"
RUNS = ("emitter", "emitter-noaudit", "raw", "raw-audit", "raw-records")
DEFAULT_RUNS = ("emitter", "emitter-noaudit", "raw")

log = logging.getLogger("bench.emit")


@dataclasses.dataclass
class RunResult:
    name: str
    round: int
    events: int
    elapsed_s: float
    per_s: float
    client_cpu_us_per_event: float | None
    load_before: float


def payloads(n: int, size: int) -> list[Ping]:
    """The N events every run sends (the same models for each)."""
    pad = "x" * size
    return [Ping(id=i, key=f"k{i % KEYS}", sent_at_ns=time.time_ns(), pad=pad)
            for i in range(n)]


def chunks(items: list[Ping], size: int) -> list[list[Ping]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


async def timed(name: str, round_: int, n: int, send: Callable[[], Awaitable[None]],
                pids: list[int], profiler: cProfile.Profile | None) -> RunResult:
    """Run ``send`` once under the clock, the CPU meter and (optionally) the profiler."""
    load = os.getloadavg()[0]
    cpu = CpuMeter(pids)
    cpu.start()
    if profiler is not None:
        profiler.enable()
    start = time.perf_counter()
    try:
        await send()
    finally:
        elapsed = time.perf_counter() - start
        if profiler is not None:
            profiler.disable()
        cpu.stop()
    per_event = None if cpu.client_s is None else cpu.client_s / n * 1e6
    return RunResult(name, round_, n, elapsed, n / elapsed, per_event, load)


async def run_emitter(settings: MeshSettings, name: str, round_: int, events: list[Ping],
                      args: argparse.Namespace, pids: list[int],
                      profiler: cProfile.Profile | None) -> RunResult:
    if name == "emitter-noaudit":
        settings = settings.model_copy(update={
            "audit": settings.audit.model_copy(update={"enabled": False})})
    topic = Topic(f"bench-{uuid.uuid4().hex[:8]}-emit", Ping, key="key",
                  partitions=args.partitions, dead_letters=False)
    await apply_topics(settings.kafka, [topic])
    async with Emitter(settings, source="bench") as emitter:
        await emitter.emit(topic, events[:1])  # schemas prepared, connections made

        async def send() -> None:
            for chunk in chunks(events, args.batch):
                await emitter.emit(topic, chunk)

        result = await timed(name, round_, len(events), send, pids, profiler)
    serde = Codec().serde(Ping)
    await check(settings, topic.name, args, lambda v: (serde.decode(v).id, 0))  # type: ignore[attr-defined]
    return result


async def emitted_records(settings: MeshSettings, topic: Topic[Ping], events: list[Ping],
                          batch: int) -> list[list[OutRecord]]:
    """Per emit call, the records ``Emitter.emit`` would produce for ``events`` on
    ``topic`` (its audit records on a topic laid out as ``mesh.audit``)."""
    target = await audit_like_topic(settings, f"{topic.name}.audit")
    calls = []
    async with Emitter(settings, source="bench") as emitter:  # its producer sends nothing
        await emitter.codec.prepare([topic, audit_topic])
        for chunk in chunks(events, batch):
            built = [emitter.record(topic, ping) for ping in chunk]
            audits = emitter.auditor.produced([(env, record) for record, env in built],
                                              at_ms=now_ms())
            calls.append([record for record, _ in built]
                         + [a._replace(topic=target.name) for a in audits])
    return calls


async def run_raw(settings: MeshSettings, round_: int, events: list[Ping],
                  args: argparse.Namespace, pids: list[int], name: str = "raw"
                  ) -> RunResult:
    """The raw producer; ``raw-audit`` and ``raw-records``: the floors (see the
    module's doc)."""
    audit = name == "raw-audit"
    topic = Topic(f"bench-{uuid.uuid4().hex[:8]}-raw", Ping, key="key",
                  partitions=args.partitions, dead_letters=False)
    await apply_topics(settings.kafka, [topic])
    extra = await audit_like(settings, topic) if audit else None
    keys = [str(uuid.uuid4()).encode() for _ in events] if audit else []
    calls = (await emitted_records(settings, topic, events, args.batch)
             if name == "raw-records" else [])
    producer = AIOKafkaProducer(**producer_kwargs(settings.kafka))
    await producer.start()
    try:
        if calls:  # connections made, metadata known: as the emitter's first call does
            first = calls[0][0]
            await producer.send_and_wait(first.topic, first.value, key=first.key,
                                         headers=list(first.headers))
        else:
            await producer.send_and_wait(topic.name, events[0].model_dump_json().encode(),
                                         key=events[0].key.encode())

        async def send_records() -> None:
            for records in calls:
                await asyncio.gather(*[await producer.send(r.topic, r.value, key=r.key,
                                                           headers=list(r.headers))
                                       for r in records])

        async def send() -> None:
            for first in range(0, len(events), args.batch):
                acks = []
                for i in range(first, min(len(events), first + args.batch)):
                    p = events[i]
                    acks.append(await producer.send(topic.name, p.model_dump_json().encode(),
                                                    key=p.key.encode()))
                    if extra is not None:
                        acks.append(await producer.send(extra.topic, extra.value, key=keys[i],
                                                        headers=list(extra.headers)))
                await asyncio.gather(*acks)

        result = await timed(name, round_, len(events), send_records if calls else send,
                             pids, None)
    finally:
        await producer.stop()
    if calls:
        serde = Codec().serde(Ping)
        await check(settings, topic.name, args, lambda v: (serde.decode(v).id, 0))  # type: ignore[attr-defined]
    else:
        await check(settings, topic.name, args, lambda v: (json.loads(v)["id"], 0))
    return result


async def audit_like(settings: MeshSettings, topic: Topic[Ping]) -> OutRecord:
    """A ``produced`` audit record such as the emitter writes for one event on
    ``topic``, to a fresh topic laid out as ``mesh.audit``."""
    target = await audit_like_topic(settings, f"{topic.name}.audit")
    trace = f"00-{uuid.uuid4().hex}-{uuid.uuid4().hex[:16]}-01"
    return audit_record(Codec(settings.schema_registry), AuditEvent(
        kind=PRODUCED, agent="bench", topic=topic.name, event_id=str(uuid.uuid4()),
        correlation_id=str(uuid.uuid4()), traceparent=trace, attempt=1, size=1_100,
        details={"replica": f"{platform.node()}:{os.getpid()}"}),
        source="bench")._replace(topic=target.name, key=None)  # keyed per event


async def check(settings: MeshSettings, topic: str, args: argparse.Namespace,
                decode: Callable[[bytes], tuple[int, int]]) -> None:
    """Every id is on the topic (raises BenchError within 60 s otherwise)."""
    await timestamps(settings.kafka, topic, args.partitions, args.events, decode, timeout=60)


def print_profile(profiler: cProfile.Profile, path: Path) -> None:
    profiler.dump_stats(path)
    for key in ("tottime", "cumulative"):
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).strip_dirs().sort_stats(key).print_stats(25)
        print(f"\n--- emitter runs' profile, by {key} (full stats: {path}) ---")
        print("\n".join(out.getvalue().splitlines()[4:]))


def summary(results: list[RunResult]) -> dict[str, Any]:
    """Per round, each emitter run's throughput over raw's; their median over rounds."""
    per_round: dict[str, list[float]] = {}
    for round_ in sorted({r.round for r in results}):
        of = {r.name: r for r in results if r.round == round_}
        if "raw" not in of:
            continue
        for name in ("emitter", "emitter-noaudit", "raw-audit", "raw-records"):
            if name in of:
                per_round.setdefault(name, []).append(of[name].per_s / of["raw"].per_s)
    return {f"{name}_over_raw": {"rounds": values,
                                 "median": sorted(values)[len(values) // 2]}
            for name, values in per_round.items()}


async def main(args: argparse.Namespace) -> int:
    runs = [r.strip() for r in args.runs.split(",") if r.strip()]
    if not runs or any(r not in RUNS for r in runs):
        raise SystemExit(f"--runs takes {', '.join(RUNS)}, got {args.runs!r}")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    profiler = cProfile.Profile() if args.profile else None
    events = payloads(args.events, args.size)
    results: list[RunResult] = []
    async with start_broker(args) as (settings, pids):
        print(f"{args.broker} broker (pids {pids}) on {settings.kafka.bootstrap_servers}; "
              f"{args.events} events of {args.size} B padding, {args.batch} per call, "
              f"{args.partitions} partitions; load average {os.getloadavg()[0]:.2f}",
              flush=True)
        for round_ in range(1, args.repeat + 1):
            for name in runs:
                if name.startswith("raw"):
                    r = await run_raw(settings, round_, events, args, pids, name)
                else:
                    r = await run_emitter(settings, name, round_, events, args, pids,
                                          profiler if name == "emitter" else None)
                results.append(r)
                print(f"  round {round_} {name:<16} {r.elapsed_s:6.2f} s {r.per_s:8.0f} "
                      f"events/s, client CPU {r.client_cpu_us_per_event or 0:5.0f} us/event "
                      f"(load before {r.load_before:.2f})", flush=True)
    ratio = summary(results)
    for name, figures in ratio.items():
        rounds = ", ".join(f"{v:.2f}" for v in figures["rounds"])
        print(f"{name}: median {figures['median']:.2f}x (rounds: {rounds})")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"emit-{stamp}.json"
    out.write_text(json.dumps({
        "timestamp": stamp,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "params": vars(args),
        "host": {"cpus": os.cpu_count(), "python": platform.python_version(),
                 "platform": platform.platform(), "aiokafka": aiokafka.__version__},
        "profiled": bool(args.profile),
        "producer": {"linger_ms": settings.kafka.linger_ms, "acks": settings.kafka.acks,
                     "idempotent": settings.kafka.idempotent_producer,
                     "max_batch_size": settings.kafka.max_batch_size},
        "runs": [dataclasses.asdict(r) for r in results],
        "ratios": ratio,
    }, indent=2) + "\n")
    print(f"results: {out.relative_to(ROOT)}")
    if profiler is not None:
        print("(the emitter runs were profiled: their figures include cProfile's overhead)")
        print_profile(profiler, RESULTS / f"emit-{stamp}-emitter.prof")
    return 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=20_000, help="events per run (N)")
    parser.add_argument("--size", type=int, default=1024, help="padding bytes per event")
    parser.add_argument("--batch", type=int, default=500,
                        help="events per emit call (each call waits for its acks)")
    parser.add_argument("--partitions", type=int, default=4, help="partitions of the topic")
    parser.add_argument("--runs", default=",".join(DEFAULT_RUNS),
                        help=f"which runs, in order, of {', '.join(RUNS)}")
    parser.add_argument("--repeat", type=int, default=1, help="rounds of all runs")
    parser.add_argument("--broker", choices=("embedded", "apache"), default="embedded",
                        help="embedded: Tansu; apache: Apache Kafka (KRaft) from its jars")
    parser.add_argument("--nodes", type=int, default=1, help="Apache Kafka nodes")
    parser.add_argument("--profile", action="store_true",
                        help="cProfile the emitter runs (audit on)")
    args = parser.parse_args(argv)
    if min(args.events, args.batch, args.partitions, args.repeat, args.nodes) < 1 or args.size < 0:
        parser.error("--events, --batch, --partitions, --repeat, --nodes must be >= 1, "
                     "--size >= 0")
    return args


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("BENCH_LOG_LEVEL", "WARNING"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(main(parse_args())))
