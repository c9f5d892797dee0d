"""docker-compose.yml runs the Apache Kafka version the tests run on."""

from __future__ import annotations

from pathlib import Path

import yaml

from mesh.kafka.jars import KAFKA_VERSION

ROOT = Path(__file__).resolve().parents[2]


def test_compose_kafka_image_is_the_tested_version() -> None:
    """Pass: the kafka service's image is apache/kafka:<mesh.kafka.jars.KAFKA_VERSION>."""
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    assert services["kafka"]["image"] == f"apache/kafka:{KAFKA_VERSION}"


def test_compose_runs_every_agent_of_the_reference_mesh_and_prometheus_scrapes_them() -> None:
    """Pass: one service per agent of agents/ (the writing mesh `make demo` runs), each
    `mesh run agents.<module>:agent` of a module that exists, and ops/prometheus.yml
    scrapes exactly those services."""
    from agents.app import AGENTS

    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    runs = {name: s["command"] for name, s in services.items()
            if s.get("command", [None, None])[:2] == ["mesh", "run"]}
    modules = {m.__name__.removeprefix("agents."): m for m in AGENTS.values()}
    assert runs == {name: ["mesh", "run", f"agents.{name}:agent"] for name in modules}
    scrape = yaml.safe_load((ROOT / "ops" / "prometheus.yml").read_text())
    targets = scrape["scrape_configs"][0]["static_configs"][0]["targets"]
    assert sorted(targets) == sorted(f"{name}:9464" for name in runs)
