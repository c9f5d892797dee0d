"""Benchmark: how long a stage's partitions go unhandled when a replica dies or stops.

    .venv/bin/python bench/recovery.py [--broker apache|embedded] [--nodes N] [--runs R]
                                       [--scenarios cold,kill9,kill9-static,sigterm,...]

One stage (``in -> stage -> out``, 4 partitions, 2 keys on each) runs as real ``mesh run``
processes under a steady load (one record per key every 50 ms). Each output carries the
pid of the replica that handled it; a group-less reader follows ``out`` and stamps
each arrival. Scenarios (each repeated ``--runs`` times):

* ``cold``: a replica starts with no earlier member: start to first output (process
  start, imports, topic check, group join). The floor of every other figure.
* ``kill9`` / ``kill9-static``: the only replica is killed -9 and a new one started at
  once (dynamic membership / the same ``MESH_KAFKA__GROUP_INSTANCE_ID``): kill to the
  new replica's first output.
* ``sigterm`` / ``sigterm-static``: one of two replicas is stopped with SIGTERM: per
  partition it held, SIGTERM to the other replica's first output there (the max is
  reported: how long its partitions sat idle).
* ``restart-static``: the only replica with a static id is stopped with SIGTERM and
  started again at once (a rolling deploy): SIGTERM to the new replica's first output.

Results are printed and written to ``bench/results/recovery-<timestamp>.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from pydantic import BaseModel  # noqa: E402

from mesh import Agent, ApacheKafka, Codec, EmbeddedBroker, Envelope, MeshSettings, Topic  # noqa: E402
from mesh.kafka.base import OutRecord  # noqa: E402
from mesh.kafka.murmur import partition_for  # noqa: E402
from mesh.kafka.provision import apply_topics  # noqa: E402
from mesh.kafka.reader import TopicReader  # noqa: E402
from mesh.kafka.transport import Producer  # noqa: E402
from mesh.runtime.audit import audit_topic  # noqa: E402

PARTITIONS = 4
PER_PARTITION = 2  # keys per partition: every partition is busy, so every move shows
TICK_S = 0.05
WAIT_S = 120.0


def _keys() -> list[str]:
    chosen: dict[int, list[str]] = {p: [] for p in range(PARTITIONS)}
    n = 0
    while any(len(keys) < PER_PARTITION for keys in chosen.values()):
        key = f"k{n}"
        keys = chosen[partition_for(key.encode(), PARTITIONS)]
        if len(keys) < PER_PARTITION:
            keys.append(key)
        n += 1
    return [k for keys in chosen.values() for k in keys]


KEYS = _keys()


class Tick(BaseModel):
    """One input; the stage stamps the pid of the replica that handled it."""

    key: str
    seq: int
    pid: int = 0


def topics(prefix: str) -> tuple[Topic[Tick], Topic[Tick]]:
    return (Topic(f"{prefix}.in", Tick, key="key", partitions=PARTITIONS),
            Topic(f"{prefix}.out", Tick, key="key", partitions=PARTITIONS))


async def _handle(tick: Tick, ctx: Any) -> Tick:
    return tick.model_copy(update={"pid": os.getpid()})


_PREFIX = os.environ.get("BENCH_RECOVERY_PREFIX", "recovery")
stage = Agent(f"{_PREFIX}-stage", consumes=topics(_PREFIX)[0], produces=topics(_PREFIX)[1],
              handler=_handle)


@dataclass
class Arrival:
    at: float
    partition: int
    pid: int


class Outputs:
    """Follows ``out`` and keeps every arrival; waits on a condition with a deadline."""

    def __init__(self, settings: MeshSettings, topic: Topic[Tick], codec: Codec) -> None:
        self.settings, self.topic, self.codec = settings, topic, codec
        self.seen: list[Arrival] = []
        self.changed = asyncio.Event()

    async def run(self) -> None:
        async with TopicReader(self.settings.kafka, [self.topic.name]) as reader:
            await reader.seek_to_end()
            async for record in reader.follow():
                tick = await self.codec.decode(self.topic, record.value or b"")
                assert isinstance(tick, Tick)
                self.seen.append(Arrival(time.monotonic(), record.partition, tick.pid))
                self.changed.set()

    async def first(self, check: Callable[[Arrival], bool], after: float,
                    what: str) -> float:
        deadline = time.monotonic() + WAIT_S
        start = 0
        while True:
            for arrival in self.seen[start:]:
                if arrival.at > after and check(arrival):
                    return arrival.at
            start = len(self.seen)
            if time.monotonic() > deadline:
                raise TimeoutError(f"not seen within {WAIT_S:.0f} s: {what}")
            self.changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), 1.0)

    def partitions_of(self, pid: int, since: float) -> set[int]:
        return {a.partition for a in self.seen if a.pid == pid and a.at >= since}


class Replicas:
    """``mesh run bench.recovery:stage`` processes; stopped only by their pids."""

    def __init__(self, env: dict[str, str], log: Path) -> None:
        self.env, self.log = env, log.open("ab")
        self.running: list[subprocess.Popen[bytes]] = []
        self.failed: list[str] = []

    def start(self, **extra: str) -> subprocess.Popen[bytes]:
        process = subprocess.Popen([sys.executable, "-m", "mesh.cli", "run",
                                    "bench.recovery:stage"], env={**self.env, **extra},
                                   cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT)
        self.running.append(process)
        return process

    def kill9(self, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
        self.running.remove(process)

    async def terminate(self, process: subprocess.Popen[bytes]) -> None:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(process.wait, 90)
        self.running.remove(process)
        if code != 0:  # reported, not fatal: the figures still stand
            self.failed.append(f"pid {process.pid} exited {code} on SIGTERM")
            logging.warning("replica pid %d exited %d on SIGTERM; see %s", process.pid,
                            code, self.log.name)

    def stop_all(self) -> None:
        for process in list(self.running):
            process.send_signal(signal.SIGTERM)
        for process in self.running:
            try:
                process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(timeout=30)
        self.running.clear()
        self.log.close()


async def _load(settings: MeshSettings, topic: Topic[Tick], codec: Codec,
                stop: asyncio.Event) -> None:
    """One record per key every tick until ``stop``."""
    async with Producer(settings.kafka) as producer:
        seq = 0
        while not stop.is_set():
            records = []
            for key in KEYS:
                tick = Tick(key=key, seq=seq)
                value, fingerprint = codec.encode(topic, tick)
                env = Envelope.new(tick, source="bench", key=topic.key_of(tick))
                headers = env.with_payload(tick, schema=fingerprint).headers()
                records.append(OutRecord(topic.name, value, env.key, tuple(headers)))
            await producer.send_all(records)
            seq += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), TICK_S)


async def scenario(name: str, replicas: Replicas, out: Outputs) -> float:
    """One run of scenario ``name``: seconds its partitions went unhandled."""
    static = {"MESH_KAFKA__GROUP_INSTANCE_ID": f"replica-{uuid.uuid4().hex[:6]}"}
    if name == "cold":
        t0 = time.monotonic()
        a = replicas.start()
        done = await out.first(lambda x: x.pid == a.pid, t0, "a cold replica's output")
        await replicas.terminate(a)
        return done - t0
    if name in ("kill9", "kill9-static", "restart-static"):
        env = static if name != "kill9" else {}
        a = replicas.start(**env)
        await out.first(lambda x: x.pid == a.pid, 0, "the first replica's output")
        t0 = time.monotonic()
        if name == "restart-static":
            replicas.running.remove(a)  # stopped below without waiting: a deploy's restart
            a.send_signal(signal.SIGTERM)
            waiting = asyncio.create_task(asyncio.to_thread(a.wait, 90))
        else:
            replicas.kill9(a)
        b = replicas.start(**env)
        done = await out.first(lambda x: x.pid == b.pid, t0, "the new replica's output")
        if name == "restart-static":
            await waiting
        await replicas.terminate(b)
        return done - t0
    if name in ("sigterm", "sigterm-static"):
        env_a = static if name == "sigterm-static" else {}
        env_b = ({"MESH_KAFKA__GROUP_INSTANCE_ID": static["MESH_KAFKA__GROUP_INSTANCE_ID"] + "b"}
                 if env_a else {})
        a = replicas.start(**env_a)
        b = replicas.start(**env_b)
        t = await out.first(lambda x: x.pid == a.pid, 0, "replica a's output")
        t = await out.first(lambda x: x.pid == b.pid, t, "replica b's output")
        settle = await out.first(lambda x: x.pid == a.pid, t + 1.0, "a after the split")
        held = out.partitions_of(a.pid, settle)
        t0 = time.monotonic()
        stopping = asyncio.create_task(replicas.terminate(a))
        moved = [await out.first(lambda x, p=p: x.pid == b.pid and x.partition == p, t0,
                                 f"partition {p} on replica b") for p in sorted(held)]
        await stopping
        await replicas.terminate(b)
        return max(moved) - t0
    raise ValueError(f"unknown scenario {name!r}")


@contextlib.contextmanager
def broker(kind: str, nodes: int) -> Iterator[tuple[str, bool]]:
    if kind == "apache":
        with ApacheKafka(nodes, heap="384m") as kafka:
            yield kafka.bootstrap, False
    else:
        with EmbeddedBroker() as embedded:
            yield embedded.bootstrap, True


async def run(args: argparse.Namespace, bootstrap: str, embedded: bool) -> dict[str, Any]:
    prefix = f"recovery-{uuid.uuid4().hex[:8]}"
    settings = MeshSettings().with_bootstrap(bootstrap, embedded=embedded)
    source, sink = topics(prefix)
    await apply_topics(settings.kafka, [source, sink, audit_topic])
    codec = Codec()
    await codec.prepare([source, sink])
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update({"MESH_KAFKA__BOOTSTRAP_SERVERS": bootstrap,
                "MESH_KAFKA__PROFILE": "embedded" if embedded else "kafka",
                "MESH_METRICS__ENABLED": "false", "BENCH_RECOVERY_PREFIX": prefix,
                "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"})
    results_dir = ROOT / "bench" / "results"
    results_dir.mkdir(exist_ok=True)
    replicas = Replicas(env, results_dir / f"recovery-{prefix}.log")
    out = Outputs(settings, sink, codec)
    stop = asyncio.Event()
    figures: dict[str, list[float]] = {}
    async with asyncio.TaskGroup() as tasks:
        following = tasks.create_task(out.run())
        loading = tasks.create_task(_load(settings, source, codec, stop))
        try:
            for name in args.scenarios.split(","):
                figures[name] = []
                for _ in range(args.runs):
                    figures[name].append(round(await scenario(name, replicas, out), 2))
                    print(f"{name}: {figures[name][-1]:.2f} s", flush=True)
        finally:
            stop.set()
            await loading
            following.cancel()
            await asyncio.to_thread(replicas.stop_all)
    return {"broker": args.broker, "nodes": args.nodes,
            "group_timings": settings.kafka.group_timings(),
            "load_average": os.getloadavg(), "unclean_exits": replicas.failed,
            "figures": {k: {"runs": v, "median": statistics.median(v)}
                        for k, v in figures.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--broker", choices=("apache", "embedded"), default="apache")
    parser.add_argument("--nodes", type=int, default=1)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--scenarios", default="cold,kill9,kill9-static,sigterm,"
                        "sigterm-static,restart-static")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with broker(args.broker, args.nodes) as (bootstrap, embedded):
        report = asyncio.run(run(args, bootstrap, embedded))
    report["command"] = " ".join(sys.argv)
    path = ROOT / "bench" / "results" / f"recovery-{time.strftime('%Y%m%d-%H%M%S')}.json"
    path.write_text(json.dumps(report, indent=2))
    for name, figure in report["figures"].items():
        print(f"{name:15} median {figure['median']:6.2f} s  runs {figure['runs']}")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
