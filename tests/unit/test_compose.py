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
