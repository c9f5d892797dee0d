"""Diagnostic: the runtime's CPU per input without a broker (not a benchmark against a
baseline: chain.py is that). It separates what the mesh's runtime costs from what
aiokafka and the broker cost, and compares two checkouts of the mesh.

    .venv/bin/python bench/runtime_cpu.py [--mode processor|runner] [--no-audit]
                                          [--events N] [--rounds R] [--root PATH]

The inputs are the chain's: ``Ping`` events of 1 KiB padding on 64 keys, encoded and
given envelope headers the way ``mesh emit`` does, prepared before the clock starts.
The handler returns ``payload.model_copy()``.

* ``processor``: ``AgentRunner._take`` (rate limit and holds, then
  ``RecordProcessor.process``: decode, handler, outputs, audit, metrics' observers) for
  each record in turn; the producer's acks are done at once.
* ``runner``: ``AgentRunner.run`` on a consumer that hands out the records in polls of
  125 per partition (4 partitions), with the poll loop, the lanes and per-key workers,
  the acks (futures resolved on the next loop turn, as a client's would be), settling
  and commits. The clock runs from the start until every input is handled.

It prints the CPU time (``time.process_time``) per input of each round and the
least of them (the least disturbed by other work on the machine). ``--root`` imports
the mesh from another checkout (``git worktree add /tmp/before <commit>``), to compare
two commits alternately on the same machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path
from typing import Any

parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
parser.add_argument("--mode", choices=("processor", "runner"), default="runner")
parser.add_argument("--no-audit", action="store_true", help="MESH_AUDIT__ENABLED=false")
parser.add_argument("--events", type=int, default=10_000)
parser.add_argument("--rounds", type=int, default=3)
ROOT = Path(__file__).resolve().parent.parent
parser.add_argument("--root", type=Path, default=ROOT, help="the checkout whose mesh is measured")
args = parser.parse_args()
os.environ["MESH_AUDIT__ENABLED"] = "false" if args.no_audit else "true"
sys.path.insert(0, str(args.root.resolve()))

import mesh.runtime.runner as runner_module  # noqa: E402
from mesh import Agent, MeshSettings, Topic  # noqa: E402
from mesh.kafka.base import Acks, OutRecord, Partition, Record  # noqa: E402
from mesh.kafka.murmur import partition_for  # noqa: E402
from mesh.runtime.audit import audit_topic  # noqa: E402
from mesh.runtime.emitter import Emitter  # noqa: E402
from mesh.runtime.runner import AgentRunner  # noqa: E402
from mesh.serde.codec import Codec  # noqa: E402

sys.path.append(str(ROOT))  # after --root's: the mesh above stays the one measured
from bench.chain import Ping, passthrough  # noqa: E402  (the chain's event and handler)

PARTITIONS = 4
POLL = 125  # records per partition and poll


class Sent:
    """What an ack resolves to (the fields the lanes read of aiokafka's metadata)."""

    def __init__(self, partition: int, offset: int) -> None:
        self.partition, self.offset = partition, offset


class Producer:
    """Acks every record on the next loop turn, as a client's futures resolve later."""

    def __init__(self, *, at_once: bool) -> None:
        self.at_once = at_once
        self.sent = 0

    async def send(self, record: OutRecord) -> asyncio.Future[Sent]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Sent] = loop.create_future()
        if self.at_once:
            future.set_result(Sent(0, self.sent))
        else:
            loop.call_soon(future.set_result, Sent(0, self.sent))
        self.sent += 1
        return future

    async def send_many(self, records: Any) -> Acks:
        return Acks([await self.send(r) for r in records])

    async def send_all(self, records: Any) -> list[tuple[int, int]]:
        return await (await self.send_many(records)).wait()


class Consumer:
    """Hands out prepared polls, then nothing; commits are accepted."""

    def __init__(self, polls: list[dict[Partition, list[Record]]], topic: str) -> None:
        self.polls = list(polls)
        self.owned = {Partition(topic, p) for p in range(PARTITIONS)}
        self.on_assigned: Any = None
        self._paused: set[Partition] = set()

    async def start(self) -> None:
        """Nothing to connect."""

    async def stop(self) -> None:
        """Nothing to leave."""

    def subscribe(self, topics: Any, *, on_assigned: Any, on_revoked: Any) -> None:
        self.on_assigned = on_assigned

    async def getmany(self, *, timeout_ms: int, max_records: int) -> dict[Partition, list[Record]]:
        if self.on_assigned is not None:
            assigned, self.on_assigned = self.on_assigned, None
            await assigned(sorted(self.owned))
        await asyncio.sleep(0)
        if self.polls:
            return self.polls.pop(0)
        await asyncio.sleep(0.001)
        return {}

    def partition_count(self, topic: str) -> int:
        return PARTITIONS

    def assignment(self) -> set[Partition]:
        return set(self.owned)

    def paused(self) -> set[Partition]:
        return set(self._paused)

    def pause(self, partitions: Any) -> None:
        self._paused |= set(partitions)

    def resume(self, partitions: Any) -> None:
        self._paused -= set(partitions)

    async def commit(self, offsets: Any) -> None:
        """Accepted."""

    def highwater(self, partition: Partition) -> int | None:
        return None


async def records(settings: MeshSettings, codec: Codec, source: Topic[Any],
                  n: int) -> dict[int, list[Record]]:
    """N input records per partition, as ``mesh emit`` builds them."""
    emitter = Emitter(settings, source="bench", producer=Producer(at_once=True),  # type: ignore[arg-type]
                      codec=codec)
    per: dict[int, list[Record]] = {p: [] for p in range(PARTITIONS)}
    for i in range(n):
        out, _ = emitter.record(source, Ping(id=i, key=f"k{i % 64}", sent_at_ns=time.time_ns(),
                                             pad="x" * 1024))
        assert out.key is not None
        p = partition_for(out.key, PARTITIONS)
        per[p].append(Record(source.name, p, len(per[p]), out.key, out.value, out.headers, 0))
    return per


async def one_round() -> float:
    settings = MeshSettings()
    source = Topic("in", Ping, key="key", partitions=PARTITIONS)
    sink = Topic("out", Ping, key="key", partitions=PARTITIONS)
    agent = Agent("stage", consumes=source, produces=sink, handler=passthrough)
    codec = Codec(settings.schema_registry)
    await codec.prepare([source, sink, audit_topic])
    per = await records(settings, codec, source, args.events)
    if args.mode == "processor":
        runner = AgentRunner(agent, settings, producer=Producer(at_once=True),  # type: ignore[arg-type]
                             codec=codec)
        inputs = [r for p in sorted(per) for r in per[p]]
        started = time.process_time()
        for record in inputs:
            await runner._take(record)
        return (time.process_time() - started) / args.events * 1e6
    polls = [{Partition(source.name, p): recs[i:i + POLL] for p, recs in per.items()
              if recs[i:i + POLL]} for i in range(0, max(map(len, per.values())), POLL)]
    consumer = Consumer(polls, source.name)
    runner_module.Consumer = lambda *a, **k: consumer  # type: ignore[assignment,misc]
    runner = AgentRunner(agent, settings, producer=Producer(at_once=False),  # type: ignore[arg-type]
                         codec=codec)
    stop = asyncio.Event()
    started = time.process_time()
    task = asyncio.create_task(runner.run(stop))
    async with asyncio.timeout(300):
        while runner.handled < args.events:
            if task.done():
                task.result()  # the runner failed: say why
                raise RuntimeError("the runner stopped before handling every input")
            await asyncio.sleep(0.005)
    cpu = (time.process_time() - started) / args.events * 1e6
    stop.set()
    await task
    return cpu


def main() -> None:
    rounds = [asyncio.run(one_round()) for _ in range(args.rounds)]
    print(f"{args.root} mode={args.mode} audit={not args.no_audit}: least "
          f"{min(rounds):.1f} µs of CPU per input; rounds "
          f"{', '.join(f'{r:.1f}' for r in rounds)}")


if __name__ == "__main__":
    main()
