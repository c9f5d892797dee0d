"""The JVM command line of ApacheKafka's nodes (no JVM started here)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mesh.kafka.apache import ApacheKafka


def test_kafka_opts_are_added_to_each_nodes_jvm_before_the_classpath(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pass: KAFKA_OPTS (Kafka's own scripts' variable for extra JVM options; make test
    may ask for a C1-only JIT) is split as a shell would and lands among the JVM options, after
    the launcher's own and before -cp; without it the command has no extra option."""
    kafka = ApacheKafka(nodes=1, heap="256m")
    kafka._classpath, kafka._data = "jars/*", tmp_path
    monkeypatch.delenv("KAFKA_OPTS", raising=False)
    plain = kafka._jvm("java")
    monkeypatch.setenv("KAFKA_OPTS", "-XX:TieredStopAtLevel=1 '-Dmesh.note=a b'")
    tuned = kafka._jvm("java")
    assert plain[:2] == tuned[:2] == ["java", "-Xmx256m"]
    assert tuned == [*plain[:-2], "-XX:TieredStopAtLevel=1", "-Dmesh.note=a b", "-cp", "jars/*"]
