"""The committed Avro schemas: ``schemas/<topic>.avsc``, one per declared topic.

They are what other clients need to produce to or consume from mesh topics: a
single-object encoded value names its schema by fingerprint, and the fingerprint is
that of the ``.avsc`` file's canonical form. ``mesh schemas check`` fails when they
drift from the payload models, so CI catches a model change that was not exported.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from mesh.serde import AvroSerde
from mesh.topic import Topic


def render(topic: Topic[Any]) -> str:
    """The ``.avsc`` text of ``topic``'s value schema."""
    return json.dumps(AvroSerde.for_model(topic.model).schema, indent=2) + "\n"


def export_schemas(topics: Iterable[Topic[Any]], directory: Path) -> list[Path]:
    """Write every topic's schema; returns the files written."""
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for topic in sorted(topics, key=lambda t: t.name):
        path = directory / f"{topic.name}.avsc"
        path.write_text(render(topic))
        written.append(path)
    return written


def check_schemas(topics: Iterable[Topic[Any]], directory: Path) -> list[str]:
    """What differs between the models and the committed files (empty: all match)."""
    problems = []
    expected = {f"{t.name}.avsc": render(t) for t in topics}
    for name, text in sorted(expected.items()):
        path = directory / name
        if not path.exists():
            problems.append(f"{path} is missing")
        elif json.loads(path.read_text()) != json.loads(text):
            problems.append(f"{path} differs from the model")
    for path in sorted(directory.glob("*.avsc")):
        if path.name not in expected:
            problems.append(f"{path} has no declared topic")
    return problems
