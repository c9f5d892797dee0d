"""Apache Kafka's broker jars: from ``MESH_KAFKA_HOME`` (an unpacked distribution) or
resolved with Maven from Maven Central into a cache on first use (later uses need no
network), and the Java that runs them. :mod:`mesh.kafka.apache` starts the nodes.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import subprocess
from pathlib import Path

from mesh.errors import BrokerUnavailable

logger = logging.getLogger(__name__)

# The newest on Maven Central; aiokafka 0.14 works with it (produce, fetch, groups,
# idempotence, transactions, read_committed; checked with 4.1.1 too).
KAFKA_VERSION = "4.4.0"
RESOLVE_TIMEOUT_S = 600.0

# SLF4J 1.7 (what the broker logs through) bound to log4j2, which Kafka 4 ships with.
_LOG_BINDING = ("org.apache.logging.log4j", "log4j-slf4j-impl", "2.24.3")


def java_binary() -> str:
    """``$JAVA_HOME/bin/java`` or ``java`` on PATH."""
    home = os.environ.get("JAVA_HOME")
    if home and os.access(Path(home, "bin", "java"), os.X_OK):
        return str(Path(home, "bin", "java"))
    found = shutil.which("java")
    if found is None:
        raise BrokerUnavailable(
            "Apache Kafka needs Java 17 or later and no `java` is on PATH (JAVA_HOME is "
            f"{home!r}). Install a JDK (e.g. apt-get install openjdk-17-jre-headless) or set "
            "JAVA_HOME.")
    return found


def cache_dir() -> Path:
    """Where resolved broker jars are kept: ``$XDG_CACHE_HOME/kafka-agent-mesh``."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "kafka-agent-mesh"


def kafka_classpath(version: str = KAFKA_VERSION) -> str:
    """The broker's classpath: ``MESH_KAFKA_HOME/libs/*``, else the Maven-resolved jars."""
    home = os.environ.get("MESH_KAFKA_HOME")
    if home:
        libs = Path(home) / "libs"
        if not any(libs.glob("kafka_2.13-*.jar")):
            raise BrokerUnavailable(
                f"MESH_KAFKA_HOME={home!r} has no libs/kafka_2.13-*.jar: point it at an "
                "unpacked Apache Kafka distribution, or unset it to resolve the broker with "
                "Maven.")
        return f"{libs}/*"
    return f"{resolve_jars(version)}/*"


def resolve_jars(version: str = KAFKA_VERSION) -> Path:
    """Resolve ``kafka_2.13:<version>`` and its runtime dependencies with Maven into the
    cache (once; later calls are offline) and return the folder of jars."""
    root = cache_dir() / f"kafka-{version}"
    libs = root / "libs"
    if (root / "complete").exists():
        return libs
    root.mkdir(parents=True, exist_ok=True)
    with (root / ".lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # two processes resolving at once share one result
        if not (root / "complete").exists():
            _maven_copy(version, root)
    return libs


def _maven_copy(version: str, root: Path) -> None:
    mvn = shutil.which("mvn")
    if mvn is None:
        raise BrokerUnavailable(
            f"Apache Kafka {version} is not in {root} and `mvn` is not on PATH to resolve it "
            "from Maven Central. Install Maven (apt-get install maven), or set MESH_KAFKA_HOME "
            "to an unpacked Apache Kafka distribution.")
    group, artifact, binding_version = _LOG_BINDING
    (root / "pom.xml").write_text(f"""\
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>kafka-agent-mesh</groupId><artifactId>apache-kafka</artifactId>
  <version>{version}</version><packaging>pom</packaging>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>{version}</version></dependency>
    <dependency><groupId>{group}</groupId><artifactId>{artifact}</artifactId>
      <version>{binding_version}</version></dependency>
  </dependencies>
</project>
""")
    staging = root / "libs.partial"
    shutil.rmtree(staging, ignore_errors=True)
    log = root / "mvn.log"
    logger.info("resolving Apache Kafka %s with Maven into %s", version, root)
    with log.open("wb") as out:
        try:
            done = subprocess.run(
                [mvn, "-B", "-q", "-f", str(root / "pom.xml"), "dependency:copy-dependencies",
                 f"-DoutputDirectory={staging}", "-DincludeScope=runtime"],
                stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                timeout=RESOLVE_TIMEOUT_S, check=False)
        except subprocess.TimeoutExpired as exc:
            raise BrokerUnavailable(
                f"Maven did not resolve Apache Kafka {version} within {RESOLVE_TIMEOUT_S:.0f} "
                f"s; its output is in {log}. Check the network to Maven Central.") from exc
    if done.returncode != 0 or not any(staging.glob("kafka_2.13-*.jar")):
        raise BrokerUnavailable(
            f"Maven could not resolve org.apache.kafka:kafka_2.13:{version} (exit "
            f"{done.returncode}); its output is in {log}: {tail_of(log)}")
    libs = root / "libs"
    shutil.rmtree(libs, ignore_errors=True)
    staging.rename(libs)
    (root / "complete").write_text(version + "\n")


def tail_of(path: Path, chars: int = 800) -> str:
    """The last ``chars`` characters of a log file, for an error message ("" if unreadable)."""
    try:
        return path.read_text(errors="replace").strip()[-chars:]
    except OSError:
        return ""
