"""The broker every integration test runs on, and helpers to drive the mesh.

* default: the embedded broker (Tansu), one per test session, on a free loopback port;
* ``MESH_KAFKA__BOOTSTRAP_SERVERS``: any running cluster;
* ``MESH_TEST_KAFKA=apache``: a three-node Apache Kafka cluster (KRaft, from its jars:
  ``MESH_KAFKA_HOME`` or Maven Central; replication factor 3, ``min.insync.replicas=2``).
  Without Java or Maven this fails, it does not skip;
* ``MESH_TEST_KAFKA=docker``: Apache Kafka through testcontainers (skipped with the
  reason when no Docker engine answers).

With pytest-xdist (``-n N``, as ``make test`` runs) each worker is a pytest session of
its own: each starts its own embedded broker, but the three-node Apache Kafka cluster
(three JVMs) is started once, by the controller, and handed to every worker.

Each test gets its own topic prefix, so tests sharing the broker never meet.
"""

from __future__ import annotations

import asyncio
import os
import sys
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import pytest

from mesh import ApacheKafka, EmbeddedBroker, MeshSettings
from mesh.errors import BrokerUnavailable
from mesh.kafka.provision import apply_topics
from mesh.runtime.audit import audit_topic

ROOT = Path(__file__).resolve().parent.parent
SHARED_BOOTSTRAP = "mesh_apache_bootstrap"  # the controller's cluster, in workerinput
_CLUSTER = pytest.StashKey[ApacheKafka]()


@dataclass(frozen=True)
class BrokerUnderTest:
    """Where the tests' broker listens, and whether it is the embedded one."""

    bootstrap: str
    embedded: bool
    kind: str

    def settings(self, **runtime: object) -> MeshSettings:
        base = MeshSettings().with_bootstrap(self.bootstrap, embedded=self.embedded)
        if runtime:
            base = base.model_copy(
                update={"runtime": base.runtime.model_copy(update=runtime)})
        return base

    def env(self, **extra: str) -> dict[str, str]:
        """Environment for a `mesh` subprocess pointed at this broker."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
        env.update({
            "MESH_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap,
            "MESH_KAFKA__PROFILE": "embedded" if self.embedded else "kafka",
            "PYTHONPATH": str(ROOT),
            "PYTHONUNBUFFERED": "1",
            "MESH_METRICS__HOST": "127.0.0.1",  # tests listen on loopback only
        })
        env.update(extra)
        return env


def _docker_kafka() -> Iterator[BrokerUnderTest]:
    try:
        import docker

        docker.from_env().ping()
    except Exception as exc:  # no engine, no socket, no permission
        pytest.skip(f"MESH_TEST_KAFKA=docker but no Docker engine answers: {exc}")
    try:
        from testcontainers.community.kafka import KafkaContainer
    except ImportError:  # testcontainers < 4.10 keeps it here
        from testcontainers.kafka import KafkaContainer

    with KafkaContainer().with_kraft() as kafka:
        yield BrokerUnderTest(kafka.get_bootstrap_server(), False, "apache-kafka")


def _start_apache_cluster(fail: Callable[[str], NoReturn]) -> ApacheKafka:
    """The three-node cluster of ``MESH_TEST_KAFKA=apache``. Asked for explicitly: a
    missing Java or Maven is a failure with the fix (``fail``), not a skip."""
    kafka = ApacheKafka(nodes=3)
    try:
        kafka.start()
    except BrokerUnavailable as exc:
        fail(f"MESH_TEST_KAFKA=apache but Apache Kafka did not start: {exc}")
    return kafka


def _apache_kafka() -> Iterator[BrokerUnderTest]:
    kafka = _start_apache_cluster(lambda reason: pytest.fail(reason, pytrace=False))
    try:
        yield BrokerUnderTest(kafka.bootstrap, False, "apache-kafka")
    finally:
        kafka.stop()


def _shares_apache_cluster(config: pytest.Config) -> bool:
    """True in the pytest-xdist controller of a ``MESH_TEST_KAFKA=apache`` run."""
    return (os.environ.get("MESH_TEST_KAFKA") == "apache"
            and not os.environ.get("MESH_KAFKA__BOOTSTRAP_SERVERS")
            and config.pluginmanager.has_plugin("dsession"))


@pytest.hookimpl(tryfirst=True)
def pytest_sessionstart(session: pytest.Session) -> None:
    """Under pytest-xdist, start the Apache Kafka cluster once, before the workers."""
    if _shares_apache_cluster(session.config):
        kafka = _start_apache_cluster(lambda reason: pytest.exit(reason, returncode=1))
        session.config.stash[_CLUSTER] = kafka
        _with_mesh_topics(BrokerUnderTest(kafka.bootstrap, False, "apache-kafka"))


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node: Any) -> None:
    """Hand the controller's cluster to each pytest-xdist worker."""
    kafka = node.config.stash.get(_CLUSTER, None)
    if kafka is not None:
        node.workerinput[SHARED_BOOTSTRAP] = kafka.bootstrap


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop the controller's cluster (every JVM, by pid) once the workers are done."""
    kafka = session.config.stash.get(_CLUSTER, None)
    if kafka is not None:
        kafka.stop()


@pytest.fixture(scope="session")
def broker(request: pytest.FixtureRequest) -> Iterator[BrokerUnderTest]:
    """The session's broker (see the module docstring for the choices)."""
    configured = os.environ.get("MESH_KAFKA__BOOTSTRAP_SERVERS")
    shared = getattr(request.config, "workerinput", {}).get(SHARED_BOOTSTRAP)
    if shared:  # its mesh topics were applied by the controller
        yield BrokerUnderTest(shared, False, "apache-kafka")
    elif configured:
        yield _with_mesh_topics(BrokerUnderTest(configured, False, "configured"))
    elif os.environ.get("MESH_TEST_KAFKA") == "docker":
        for kafka in _docker_kafka():
            yield _with_mesh_topics(kafka)
    elif os.environ.get("MESH_TEST_KAFKA") == "apache":
        for kafka in _apache_kafka():
            yield _with_mesh_topics(kafka)
    else:
        with EmbeddedBroker() as embedded:
            yield _with_mesh_topics(BrokerUnderTest(embedded.bootstrap, True, "embedded"))


def _with_mesh_topics(broker: BrokerUnderTest) -> BrokerUnderTest:
    """Create the mesh's own topics (the audit topic every agent writes to) as
    `mesh topics apply` would, instead of letting a first write auto-create them.
    In a thread: the tests' event loop is not running yet and must not be replaced."""
    settings = broker.settings()
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, apply_topics(settings.kafka, [audit_topic])).result()
    return broker


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> Iterator[str]:
    """A topic prefix unique to this test.

    On a broker that keeps what it is given (Apache Kafka, not the memory-only embedded
    one) the test's topics are deleted after it: a three-node cluster holding every
    topic of a session (inputs, retry tiers, dead letters, tables) spends CPU on them
    even while idle (figures in tests/README.md)."""
    name = f"t{uuid.uuid4().hex[:10]}"
    broker = request.getfixturevalue("broker") if "broker" in request.fixturenames else None
    yield name
    if broker is not None and not broker.embedded:
        _delete_topics(broker.bootstrap, name)


def _delete_topics(bootstrap: str, prefix: str) -> None:
    """Delete the topics named ``prefix...``; a failure is reported, not raised (the
    test has passed or failed on its own account by now)."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    try:
        names = [t for t in admin.list_topics(timeout=30).topics if t.startswith(prefix)]
        if names:
            for future in admin.delete_topics(names, operation_timeout=30).values():
                future.result(timeout=60)
    except Exception as exc:
        sys.stderr.write(f"conftest: deleting the topics {prefix}* failed: {exc!r}\n")


@pytest.fixture
def mesh_cli() -> list[str]:
    """The argv prefix that runs the `mesh` command of this environment."""
    return [sys.executable, "-m", "mesh.cli"]


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--broker-tests-only", action="store_true",
        help="deselect tests that use neither the session's broker (fixture `broker`) nor "
             "Apache Kafka (marker `apache`): a second session on another broker runs only "
             "the tests that broker can change (make test, see tests/README.md)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        path = str(item.path)
        if "/integration/" in path:
            item.add_marker(pytest.mark.integration)
        if "/faults/" in path:
            item.add_marker(pytest.mark.faults)
    if config.getoption("--broker-tests-only"):
        kept = [i for i in items if "broker" in getattr(i, "fixturenames", ())
                or i.get_closest_marker("apache") is not None]
        dropped = [i for i in items if i not in kept]
        if dropped:
            config.hook.pytest_deselected(items=dropped)
        items[:] = kept
