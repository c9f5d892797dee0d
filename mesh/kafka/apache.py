"""Apache Kafka in KRaft mode on loopback, from its jars: no Docker.

The broker comes from, in order: ``MESH_KAFKA_HOME`` (an unpacked Apache Kafka
distribution: its ``libs/*.jar``), or ``org.apache.kafka:kafka_2.13`` resolved with Maven
from Maven Central into ``~/.cache/kafka-agent-mesh/kafka-<version>/`` on first use
(later starts reuse the cache and need no network). It needs Java 17 (``JAVA_HOME`` or
``java`` on PATH) and, without ``MESH_KAFKA_HOME``, Maven (``mvn``).

Each node is a combined broker+controller JVM with static controller quorum voters. One
node is a development broker; three make a cluster with replication factor 3 and
``min.insync.replicas=2``, so failover, the idempotent producer and transactions are real.

Example:
    >>> with ApacheKafka(nodes=3) as kafka:  # doctest: +SKIP
    ...     print(kafka.bootstrap)
    127.0.0.1:40123,127.0.0.1:40125,127.0.0.1:40127
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from mesh.errors import BrokerUnavailable
from mesh.kafka.embedded import free_port
from mesh.kafka.jars import KAFKA_VERSION, java_binary, kafka_classpath, tail_of

logger = logging.getLogger(__name__)

T = TypeVar("T")

START_TIMEOUT_S = 120.0  # three JVMs on two cores start in about 15 s; CI machines vary
STOP_TIMEOUT_S = 20.0  # a clean shutdown hands leadership over; then SIGKILL
HEAP = "512m"

_LOG4J2 = """\
rootLogger.level=INFO
rootLogger.appenderRef.out.ref=OUT
appender.out.type=Console
appender.out.name=OUT
appender.out.layout.type=PatternLayout
appender.out.layout.pattern=[%d] %p %m (%c)%n
logger.state.name=state.change.logger
logger.state.level=WARN
"""


def new_cluster_id() -> str:
    """A random KRaft cluster id (a base64 UUID, never starting with ``-``)."""
    while True:
        found = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
        if not found.startswith("-"):
            return found


@dataclass(slots=True)
class _Node:
    node_id: int
    port: int
    controller_port: int
    home: Path
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        return self.home / "kafka.log"

    @property
    def properties(self) -> Path:
        return self.home / "server.properties"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None


class ApacheKafka:
    """Starts Apache Kafka (KRaft, combined broker+controller nodes) on free loopback
    ports and stops every JVM it started by pid.

    Usable as a sync or async context manager; ``start()``/``stop()`` are safe to call
    twice. Readiness is a metadata request answered by every node, not a sleep. Data
    lives in a temporary folder removed at stop, unless ``data`` is given (then it is
    kept, and a later start on it reuses the cluster). Each JVM's output goes to
    ``<data>/node-<id>/kafka.log``.

    Args:
        nodes: 1 for development; 3 for a cluster (replication factor 3,
            ``min.insync.replicas=2``, the quorum on all three).
        data: a folder to keep the cluster in (created if missing).
        version: the Apache Kafka version to resolve from Maven Central (ignored with
            ``MESH_KAFKA_HOME``; ``MESH_KAFKA_VERSION`` overrides the default).
        heap: the JVM heap of each node (``-Xmx``).
    """

    def __init__(self, nodes: int = 1, *, data: str | Path | None = None,
                 version: str | None = None, heap: str = HEAP) -> None:
        if nodes < 1:
            raise ValueError(f"nodes={nodes}: a cluster needs at least 1 node.")
        self.version = version or os.environ.get("MESH_KAFKA_VERSION") or KAFKA_VERSION
        self.heap = heap
        self._keep = data is not None
        self._data = Path(data).resolve() if data is not None else None
        ports: set[int] = set()
        while len(ports) < 2 * nodes:
            ports.add(free_port())
        pairs = sorted(ports)
        self._nodes = {i: _Node(i, pairs[2 * (i - 1)], pairs[2 * i - 1], Path())
                       for i in range(1, nodes + 1)}
        self._classpath: str | None = None
        self.cluster_id: str | None = None
        self._started = False

    @property
    def nodes(self) -> int:
        return len(self._nodes)

    @property
    def bootstrap(self) -> str:
        """``host:port,...`` of every node, for ``MESH_KAFKA__BOOTSTRAP_SERVERS``."""
        return ",".join(n.bootstrap for n in self._nodes.values())

    @property
    def data(self) -> Path | None:
        """The folder holding the nodes' data and logs (None before start)."""
        return self._data

    @property
    def node_pids(self) -> dict[int, int]:
        """The pid of each running node, by node id."""
        return {i: n.process.pid for i, n in self._nodes.items()
                if n.process is not None and n.alive()}

    def node_bootstrap(self, node_id: int) -> str:
        """``host:port`` of one node."""
        return self._node(node_id).bootstrap

    def log_of(self, node_id: int) -> Path:
        """The file the node's JVM writes its output to."""
        return self._node(node_id).log

    def start(self) -> None:
        """Format storage (first time only), start every node, wait until all answer."""
        if self._started:
            return
        self._started = True
        try:
            self._classpath = kafka_classpath(self.version)
            java = java_binary()
            if self._data is None:
                self._data = Path(tempfile.mkdtemp(prefix="mesh-kafka-"))
            self._data.mkdir(parents=True, exist_ok=True)
            self.cluster_id = self._load_cluster_id()
            (self._data / "log4j2.properties").write_text(_LOG4J2)
            for node in self._nodes.values():
                node.home = self._data / f"node-{node.node_id}"
                node.home.mkdir(exist_ok=True)
                node.properties.write_text(self._server_properties(node))
            self._format(java)
            for node in self._nodes.values():
                self._spawn(java, node)
            self._wait_ready(list(self._nodes.values()))
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """Stop every node we started (SIGTERM, then SIGKILL after a bound), by pid;
        remove the data unless it was given."""
        if not self._started:
            return
        self._started = False
        _terminate([n.process for n in self._nodes.values() if n.process is not None])
        for node in self._nodes.values():
            node.process = None
        if not self._keep and self._data is not None:
            shutil.rmtree(self._data, ignore_errors=True)
            self._data = None

    def kill(self, node_id: int, sig: int = signal.SIGKILL) -> None:
        """Send ``sig`` to one node (by pid); for SIGKILL, wait until it is gone."""
        node = self._node(node_id)
        if node.process is None or not node.alive():
            raise ValueError(f"Node {node_id} is not running: start or restart it first.")
        node.process.send_signal(sig)
        if sig == signal.SIGKILL:
            node.process.wait(timeout=STOP_TIMEOUT_S)

    def restart(self, node_id: int) -> None:
        """Stop one node if it runs (SIGTERM, then SIGKILL), start it again on the same
        ports and data, and wait until it answers."""
        node = self._node(node_id)
        if not self._started:
            raise ValueError("The cluster is not started: call start() first.")
        if node.process is not None:
            _terminate([node.process])
        self._spawn(java_binary(), node)
        self._wait_ready([node])

    def leader_of(self, topic: str, partition: int) -> int | None:
        """The node id leading ``topic``'s ``partition`` (None while it has no leader)."""
        from mesh.config import KafkaSettings
        from mesh.kafka.admin import Admin

        async def ask() -> int | None:
            async with Admin(KafkaSettings(bootstrap_servers=self.bootstrap,
                                           request_timeout_ms=5_000)) as admin:
                return (await admin.leaders(topic)).get(partition)

        return _run_in_thread(ask)

    def _node(self, node_id: int) -> _Node:
        try:
            return self._nodes[node_id]
        except KeyError:
            raise ValueError(f"No node {node_id}: the nodes are "
                             f"{', '.join(map(str, self._nodes))}.") from None

    def _load_cluster_id(self) -> str:
        assert self._data is not None
        stored = self._data / "cluster.id"
        if stored.exists():
            return stored.read_text().strip()
        found = new_cluster_id()
        stored.write_text(found + "\n")
        return found

    def _server_properties(self, node: _Node) -> str:
        n = self.nodes
        voters = ",".join(f"{x.node_id}@127.0.0.1:{x.controller_port}"
                          for x in self._nodes.values())
        replicas, min_isr = min(n, 3), min(n, 2)
        settings = {
            "process.roles": "broker,controller",
            "node.id": node.node_id,
            "controller.quorum.voters": voters,
            "listeners": f"PLAINTEXT://127.0.0.1:{node.port},"
                         f"CONTROLLER://127.0.0.1:{node.controller_port}",
            "advertised.listeners": f"PLAINTEXT://127.0.0.1:{node.port}",
            "controller.listener.names": "CONTROLLER",
            "inter.broker.listener.name": "PLAINTEXT",
            "listener.security.protocol.map": "PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT",
            "log.dirs": node.home / "data",
            "default.replication.factor": replicas,
            "min.insync.replicas": min_isr,
            "offsets.topic.replication.factor": replicas,
            "transaction.state.log.replication.factor": replicas,
            "transaction.state.log.min.isr": min_isr,
            "share.coordinator.state.topic.replication.factor": replicas,
            "share.coordinator.state.topic.min.isr": min_isr,
            "group.initial.rebalance.delay.ms": 0,
            # small segments and a small cleaner buffer: a test cluster, not a data centre
            "log.segment.bytes": 16 * 1024 * 1024,
            "log.cleaner.dedupe.buffer.size": 16 * 1024 * 1024,
            # the cleaner looks for dirty logs every second, not every 15 s: compaction
            # (state tables, checkpoints) is seen within a test's bounds
            "log.cleaner.backoff.ms": 1000,
            "num.partitions": 1,
        }
        return "".join(f"{k}={v}\n" for k, v in settings.items())

    def _jvm(self, java: str) -> list[str]:
        assert self._classpath is not None and self._data is not None
        # KAFKA_OPTS: extra JVM options, as Kafka's own scripts take them (e.g. a C1-only
        # JIT: half the start-up CPU, more CPU later; tests/README.md has the figures)
        return [java, f"-Xmx{self.heap}", "-Xms64m", "-XX:+UseG1GC",
                "-XX:MaxGCPauseMillis=20", "-XX:+ExitOnOutOfMemoryError",
                "-Djava.awt.headless=true",
                f"-Dlog4j2.configurationFile={self._data / 'log4j2.properties'}",
                *shlex.split(os.environ.get("KAFKA_OPTS", "")),
                "-cp", self._classpath]

    def _format(self, java: str) -> None:
        """Format every node's storage with the cluster id, in parallel (an existing
        formatted folder of the same cluster is kept)."""
        assert self.cluster_id is not None
        running = []
        for node in self._nodes.values():
            out = (node.home / "format.log").open("wb")
            command = [*self._jvm(java), "kafka.tools.StorageTool", "format",
                       "--ignore-formatted", "-t", self.cluster_id, "-c", str(node.properties)]
            running.append((node, out, subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)))
        failed: list[str] = []
        try:
            for node, out, process in running:
                try:
                    code = process.wait(timeout=START_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    code = -1
                out.close()
                if code != 0:
                    failed.append(f"node {node.node_id} (exit {code}, output in "
                                  f"{node.home / 'format.log'}: "
                                  f"{tail_of(node.home / 'format.log', 300)})")
        finally:
            _terminate([p for _, _, p in running])
        if failed:
            raise BrokerUnavailable(
                f"Formatting Apache Kafka storage for cluster {self.cluster_id} failed: "
                + "; ".join(failed))

    def _spawn(self, java: str, node: _Node) -> None:
        with node.log.open("ab") as out:  # the child keeps its own descriptor
            node.process = subprocess.Popen(
                [*self._jvm(java), "kafka.Kafka", str(node.properties)],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)  # Ctrl-C reaches us, and we stop it by pid
        logger.info("Apache Kafka node %d pid %d on %s (log %s)", node.node_id,
                    node.process.pid, node.bootstrap, node.log)

    def _wait_ready(self, nodes: list[_Node]) -> None:
        _run_in_thread(lambda: _wait_ready(nodes, self.cluster_id))

    def __enter__(self) -> ApacheKafka:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    async def __aenter__(self) -> ApacheKafka:
        await asyncio.to_thread(self.start)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await asyncio.to_thread(self.stop)


def _terminate(processes: list[subprocess.Popen[bytes]]) -> None:
    """SIGTERM each running process, wait for all within the bound, SIGKILL the rest."""
    for process in processes:
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT_S
    for process in processes:
        try:
            process.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            logger.warning("pid %d did not stop within %.0f s of SIGTERM: SIGKILL",
                           process.pid, STOP_TIMEOUT_S)
            process.kill()
            process.wait(timeout=10)


def _run_in_thread(make: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on its own loop in a thread, so callers work whether or not they
    are inside a running event loop."""
    result: list[T] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            result.append(asyncio.run(make()))
        except BaseException as exc:  # handed to the caller's thread
            errors.append(exc)

    # a daemon: a SIGTERM or Ctrl-C in the caller must not wait for the probe's deadline
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join()
    if errors:
        raise errors[0]
    return result[0]


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


async def _wait_ready(nodes: list[_Node], cluster_id: str | None) -> None:
    """Until each node answers a metadata request as ``cluster_id`` (a broker opens its
    client listener once it is registered and unfenced)."""
    from mesh.config import KafkaSettings
    from mesh.kafka.admin import Admin

    deadline = time.monotonic() + START_TIMEOUT_S
    waiting = {n.node_id: n for n in nodes}
    last: Exception | None = None
    while waiting and time.monotonic() < deadline:
        for node in list(waiting.values()):
            if not node.alive():
                code = None if node.process is None else node.process.returncode
                raise BrokerUnavailable(
                    f"Apache Kafka node {node.node_id} exited with {code} while starting; "
                    f"its log is {node.log}: {tail_of(node.log)}")
            if not _port_open(node.port):
                continue
            try:
                async with Admin(KafkaSettings(bootstrap_servers=node.bootstrap,
                                               request_timeout_ms=2_000)) as admin:
                    await admin.list_topics()
                    answered = await admin.cluster_id()
            except Exception as exc:  # not serving yet
                last = exc
                continue
            if cluster_id is not None and answered != cluster_id:
                raise BrokerUnavailable(
                    f"{node.bootstrap} answered as cluster {answered!r}, not {cluster_id!r}: "
                    "another broker took the port. Start again (new free ports).")
            del waiting[node.node_id]
        if waiting:
            await asyncio.sleep(0.2)  # poll interval, bounded by the deadline
    if waiting:
        logs = ", ".join(str(n.log) for n in waiting.values())
        raise BrokerUnavailable(
            f"Apache Kafka node(s) {', '.join(map(str, waiting))} did not answer a metadata "
            f"request within {START_TIMEOUT_S:.0f} s ({last}); logs: {logs}")
