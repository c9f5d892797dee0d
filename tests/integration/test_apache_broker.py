"""Apache Kafka (KRaft) from its jars on loopback: ``ApacheKafka`` and ``mesh broker --kafka``.

These tests start real JVMs. They need Java 17 and Maven (or ``MESH_KAFKA_HOME``); when
either is missing they fail with the fix, never skip. The first run resolves the broker
from Maven Central into the cache; later runs are offline.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import socket
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from mesh import ApacheKafka
from mesh.config import KafkaSettings
from mesh.errors import BrokerUnavailable
from mesh.kafka.admin import Admin
from mesh.kafka.base import OutRecord, Partition, Record, TopicSpec
from mesh.kafka.provision import wait_visible
from mesh.kafka.transport import Consumer, Producer
from tests.integration.test_cli import Cli

pytestmark = pytest.mark.apache

READ_TIMEOUT_S = 60.0


@pytest.fixture(scope="module")
async def kafka() -> AsyncIterator[ApacheKafka]:
    """One single-node Apache Kafka for the module's quick tests."""
    async with ApacheKafka() as started:
        yield started


def _settings(bootstrap: str) -> KafkaSettings:
    return KafkaSettings(bootstrap_servers=bootstrap, profile="kafka")


async def _consume(settings: KafkaSettings, topic: str, count: int, *,
                   group: str) -> list[Record]:
    """``count`` records of ``topic`` read in consumer group ``group`` (then committed)."""
    records: list[Record] = []

    async def nothing(_: list[Partition]) -> None:
        return None

    async with Consumer(settings, group_id=group) as consumer:
        consumer.subscribe([topic], on_assigned=nothing, on_revoked=nothing)
        deadline = time.monotonic() + READ_TIMEOUT_S
        while len(records) < count and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=500, max_records=500)).values():
                records += batch
        ends = {p: consumer.highwater(p) for p in consumer.assignment()}
        await consumer.commit({Partition(topic, r.partition): r.offset + 1 for r in records})
    assert len(records) == count, f"read {len(records)} of {count} records from {topic}"
    assert sum(e or 0 for e in ends.values()) == count, f"high watermarks {ends}"
    return records


async def test_single_node_produces_and_consumes_keyed_records_in_order(
        kafka: ApacheKafka, prefix: str) -> None:
    """Pass: 60 keyed records through the mesh Producer come back through a group
    Consumer, in order per key, with headers, and the high watermarks add up to 60."""
    settings = _settings(kafka.bootstrap)
    topic = f"{prefix}.apache"
    async with Admin(settings) as admin:
        assert await admin.create_topic(TopicSpec(topic, 3))
    sent = [OutRecord(topic, f"{i}".encode(), key=f"k{i % 4}".encode(),
                      headers=(("n", f"{i}".encode()),)) for i in range(60)]
    async with Producer(settings) as producer:
        await producer.send_all(sent)

    got = await _consume(settings, topic, 60, group=f"{prefix}.g")

    by_key: dict[bytes | None, list[int]] = {}
    for record in sorted(got, key=lambda r: (r.partition, r.offset)):
        assert record.value is not None
        assert dict(record.headers)["n"] == record.value
        by_key.setdefault(record.key, []).append(int(record.value))
    assert by_key == {f"k{k}".encode(): list(range(k, 60, 4)) for k in range(4)}


async def test_a_kept_data_folder_survives_a_stop_and_keeps_topics_and_records(
        tmp_path: Path, prefix: str) -> None:
    """Pass: a cluster started on ``data=`` keeps its cluster id, topics and records
    across a stop and a new start (on new ports), and its JVM log is in the folder."""
    topic = f"{prefix}.kept"
    first = ApacheKafka(data=tmp_path / "kafka")
    async with first:
        async with Admin(_settings(first.bootstrap)) as admin:
            await admin.create_topic(TopicSpec(topic, 1))
        async with Producer(_settings(first.bootstrap)) as producer:
            await producer.send_all([OutRecord(topic, b"kept")])
    assert (tmp_path / "kafka" / "node-1" / "kafka.log").stat().st_size > 0

    second = ApacheKafka(data=tmp_path / "kafka")
    async with second:
        assert second.cluster_id == first.cluster_id
        [record] = await _consume(_settings(second.bootstrap), topic, 1, group=f"{prefix}.g")
    assert record.value == b"kept"


async def test_three_nodes_replicate_and_keep_acks_all_through_a_leader_kill(
        prefix: str) -> None:
    """Pass: on three nodes (RF 3, min.insync.replicas 2) a topic's partition leader is
    killed with SIGKILL; acks=all produces still succeed on the other two, every record
    is read back, and the killed node restarts on its ports and rejoins."""
    async with ApacheKafka(nodes=3) as cluster:
        settings = _settings(cluster.bootstrap)
        topic = f"{prefix}.replicated"
        async with Admin(settings) as admin:
            await admin.create_topic(TopicSpec(topic, 1, 3))
            await wait_visible(admin, [TopicSpec(topic, 1, 3)])  # every broker knows it
            described = await admin.describe([topic])
        assert described[topic].configs is not None
        assert described[topic].configs["min.insync.replicas"] == "2"
        async with Producer(settings) as producer:
            await producer.send_all([OutRecord(topic, b"before", partition=0)])
            leader = await asyncio.to_thread(cluster.leader_of, topic, 0)
            assert leader in cluster.node_pids
            killed = cluster.node_pids[leader]

            cluster.kill(leader, signal.SIGKILL)
            assert leader not in cluster.node_pids and _gone(killed)
            await producer.send_all([OutRecord(topic, b"after", partition=0)])

        new_leader = await asyncio.to_thread(cluster.leader_of, topic, 0)
        assert new_leader not in (None, leader)
        await asyncio.to_thread(cluster.restart, leader)
        assert sorted(cluster.node_pids) == [1, 2, 3]
        got = await _consume(settings, topic, 2, group=f"{prefix}.g")
        pids = [killed, *cluster.node_pids.values()]
    assert [r.value for r in got] == [b"before", b"after"]
    assert all(_gone(pid) for pid in pids), "a node outlived the cluster's stop"


async def test_mesh_broker_kafka_prints_its_address_and_stops_its_jvms_on_sigterm(
        cli: Cli, tmp_path: Path) -> None:
    """Pass: `mesh broker --kafka --data DIR` prints `MESH_KAFKA__BOOTSTRAP_SERVERS=...`,
    answers a metadata request there, and on SIGTERM exits 0 with every JVM it started
    gone and its port closed; DIR keeps the node's log."""
    with cli.spawn("broker", "--kafka", "--data", str(tmp_path)) as process:
        pids: list[int] = []
        try:
            address = await process.line(
                r"^MESH_KAFKA__BOOTSTRAP_SERVERS=(127\.0\.0\.1:(\d+))$", stream="stdout",
                timeout=180)
            started = await process.line(r"Apache Kafka \S+, 1 node\(s\), pids ([\d, ]+),")
            pids = [int(p) for p in re.findall(r"\d+", started[1])]
            assert pids and all(_parent(p) == process.process.pid for p in pids), pids
            async with Admin(_settings(address[1])) as admin:
                await admin.create_topic(TopicSpec("cli.probe", 1))
                assert "cli.probe" in await admin.list_topics()

            code = await process.terminate()
            stopped = {p: _gone(p) for p in pids}
        finally:
            _kill_leftover_jvms(pids)
    assert code == 0, process.output
    assert all(stopped.values()), f"JVMs still running after `mesh broker --kafka`: {stopped}"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(address[2])), timeout=5).close()
    assert (tmp_path / "node-1" / "kafka.log").stat().st_size > 0


def test_kafka_home_without_broker_jars_is_refused_with_the_fix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pass: ``MESH_KAFKA_HOME`` pointing at a folder without ``libs/kafka_2.13-*.jar``
    fails at start, naming the folder and the fix, and leaves no process behind."""
    monkeypatch.setenv("MESH_KAFKA_HOME", str(tmp_path))
    kafka = ApacheKafka()
    with pytest.raises(BrokerUnavailable, match=re.escape(str(tmp_path)) + ".*unpacked"):
        kafka.start()
    assert kafka.node_pids == {}


def test_missing_java_is_refused_with_the_fix(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pass: without ``java`` on PATH (and no JAVA_HOME) start fails saying what to
    install, instead of a bare FileNotFoundError."""
    monkeypatch.delenv("JAVA_HOME", raising=False)
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(BrokerUnavailable, match=r"Java 17.*JAVA_HOME"):
        ApacheKafka().start()


def test_kafka_profile_keeps_kafkas_timings_and_any_fetch_wait() -> None:
    """Pass: the kafka profile accepts fetch_max_wait_ms=0 (Apache Kafka's fetches wake
    on data) and passes it through; the embedded profile still refuses under 50."""
    kafka = KafkaSettings(bootstrap_servers="127.0.0.1:9092", fetch_max_wait_ms=0)
    assert not kafka.embedded_profile
    assert kafka.group_timings()["fetch_max_wait_ms"] == 0
    with pytest.raises(ValueError, match="fetch_max_wait_ms=10 with the embedded profile"):
        KafkaSettings(fetch_max_wait_ms=10)


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie counts: it no longer runs)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _parent(pid: int) -> int:
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def _kill_leftover_jvms(pids: list[int]) -> None:
    """SIGKILL the JVMs the test's `mesh broker` started, if they outlived it (checked
    by their command line, so a reused pid is never hit)."""
    for pid in pids:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):  # already gone
            if b"kafka.Kafka" in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGKILL)
