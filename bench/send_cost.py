"""Diagnostic: the producing process's CPU per record, the mesh's producer against raw
aiokafka's ``send`` per record, side by side on one broker.

    .venv/bin/python bench/send_cost.py [--records N] [--rounds R] [--size BYTES]
                                        [--broker embedded|apache]

Each round sends N keyed records of ``--size`` bytes with the mesh's envelope-sized
headers to a topic of 4 partitions, one call per record, then waits for all acks; once
through ``AIOKafkaProducer.send`` (the raw baseline, with the mesh's producer settings:
acks=all, linger 5 ms, 256 KiB batches) and once through the mesh's
``mesh.kafka.transport.Producer`` (records gathered per partition into aiokafka
batches). It prints the CPU time (``time.process_time``: this process, aiokafka's
sender task included) per record of each, the ratio, and checks every record landed.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from aiokafka import AIOKafkaProducer

from bench.chain import Ping, producer_kwargs, start_broker
from mesh import apply_topics
from mesh.kafka.base import Acks, OutRecord
from mesh.kafka.reader import TopicReader
from mesh.kafka.transport import Producer
from mesh.topic import Topic

PARTITIONS = 4


async def raw_round(producer: AIOKafkaProducer, records: list[OutRecord]) -> float:
    start = time.process_time()
    acks = [await producer.send(r.topic, r.value, key=r.key, headers=list(r.headers))
            for r in records]
    await Acks(acks).wait()
    return time.process_time() - start


async def mesh_round(producer: Producer, records: list[OutRecord]) -> float:
    start = time.process_time()
    acks = [await producer.send(r) for r in records]
    await Acks(acks).wait()
    return time.process_time() - start


async def main(args: argparse.Namespace) -> int:
    async with start_broker(args) as (settings, _):
        raw_topic = Topic("bench.send.raw", Ping, partitions=PARTITIONS)
        mesh_topic = Topic("bench.send.mesh", Ping, partitions=PARTITIONS)
        await apply_topics(settings.kafka, [raw_topic, mesh_topic])
        headers = (("mesh-event-id", os.urandom(16).hex().encode()),
                   ("mesh-correlation", os.urandom(16).hex().encode()),
                   ("traceparent", f"00-{os.urandom(16).hex()}-{os.urandom(8).hex()}-01".encode()),
                   ("mesh-source", b"bench"), ("mesh-attempt", b"1"))
        value = os.urandom(args.size)
        keys = [f"k{i % 64}".encode() for i in range(args.records)]
        raw = [OutRecord(raw_topic.name, value, k, headers) for k in keys]
        gathered = [OutRecord(mesh_topic.name, value, k, headers) for k in keys]
        raw_s: list[float] = []
        mesh_s: list[float] = []
        raw_producer = AIOKafkaProducer(**producer_kwargs(settings.kafka))
        await raw_producer.start()
        try:
            async with Producer(settings.kafka) as producer:
                for _ in range(args.rounds):  # alternated, so both see the same machine
                    raw_s.append(await raw_round(raw_producer, raw))
                    mesh_s.append(await mesh_round(producer, gathered))
        finally:
            await raw_producer.stop()
        async with TopicReader(settings.kafka, [raw_topic.name, mesh_topic.name]) as reader:
            landed = await reader.read_to_end(timeout=120)
        expected = args.records * args.rounds
        counts = {t: sum(1 for r in landed if r.topic == t)
                  for t in (raw_topic.name, mesh_topic.name)}
        per = 1e6 / args.records
        print(f"load average {os.getloadavg()[0]:.2f}; {args.records} records of "
              f"{args.size} B per round; landed {counts} (expected {expected} each)")
        print("raw aiokafka send: " + ", ".join(f"{s * per:.1f}" for s in raw_s)
              + f" µs/record; least {min(raw_s) * per:.1f}")
        print("mesh Producer:     " + ", ".join(f"{s * per:.1f}" for s in mesh_s)
              + f" µs/record; least {min(mesh_s) * per:.1f}")
        print(f"mesh/raw CPU per record: {min(mesh_s) / min(raw_s):.2f}x (least of each)")
        return 0 if set(counts.values()) == {expected} else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--broker", choices=("embedded", "apache"), default="embedded")
    parser.add_argument("--nodes", type=int, default=1, help="Apache Kafka nodes")
    sys.exit(asyncio.run(main(parser.parse_args())))
