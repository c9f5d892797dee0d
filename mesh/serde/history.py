"""The committed Avro schemas: ``schemas/<topic>.avsc`` and the schema history.

``schemas/<topic>.avsc`` holds each declared topic's current value schema: what other
clients need to produce to or consume from mesh topics. A single-object encoded value
names its schema by fingerprint, the fingerprint of the ``.avsc`` file's canonical form.

``schemas/history/<fingerprint>.avsc`` holds every writer schema the project ever
exported, the current ones included: append-only, never pruned. A consumer that meets a
fingerprint other than its model's looks the writer schema up there and resolves it
against its model by Avro's rules, so records written before a compatible model change
(compacted state, events in flight during an upgrade) still decode. This is Avro's
``SchemaStore`` for single-object encoding, kept in files beside the code.

``mesh schemas check`` fails when the files drift from the payload models or when a
current schema is missing from the history, so CI catches a change that was not exported.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fastavro
from fastavro.schema import SchemaParseException

from mesh.serde.avro import AvroSerde
from mesh.serde.compare import schema_fingerprint
from mesh.topic import Topic

logger = logging.getLogger(__name__)

HISTORY = "history"  # the history's directory, inside the schemas directory
_FINGERPRINT = re.compile(r"^[0-9a-f]{16}$")
# what json.loads + fastavro.parse_schema raise for a file that is not an Avro schema
_NOT_A_SCHEMA = (ValueError, TypeError, KeyError, AttributeError, SchemaParseException)


class SchemaHistory:
    """Writer schemas by fingerprint: the files of a history directory, plus any learned.

    A file is read the first time its fingerprint is asked for, then kept; a file whose
    content does not have the fingerprint of its name is ignored (with an error logged
    once) and reported by ``mesh schemas check``. Nothing is cached for a fingerprint that is
    not found, so a history deployed later is seen, and random bytes cannot grow memory.

    Example:
        >>> history = SchemaHistory(Path("schemas/history"))
        >>> fp = history.learn({"type": "record", "name": "Old", "fields": []})
        >>> history.get(fp)["name"]
        'Old'
    """

    def __init__(self, directory: Path | None = None) -> None:
        self.directory = directory.absolute() if directory is not None else None
        self._known: dict[str, Any] = {}
        self._broken: set[str] = set()  # files already reported: logged once each

    def learn(self, schema: dict[str, Any] | str) -> str:
        """Know ``schema`` (JSON text or its dict) as a writer schema; its fingerprint."""
        parsed = fastavro.parse_schema(json.loads(schema) if isinstance(schema, str) else schema)
        fp = schema_fingerprint(parsed)
        self._known.setdefault(fp, parsed)
        return fp

    def get(self, fp: str) -> Any | None:
        """The parsed writer schema of fingerprint ``fp`` (16 hex digits), or None."""
        found = self._known.get(fp)
        if (found is not None or self.directory is None or fp in self._broken
                or not _FINGERPRINT.match(fp)):
            return found
        path = self.directory / f"{fp}.avsc"
        if not path.is_file():
            return None
        try:
            parsed = fastavro.parse_schema(json.loads(path.read_text()))
        except (OSError, *_NOT_A_SCHEMA) as exc:
            logger.error("Schema history file %s is unreadable: %s", path, exc)
            self._broken.add(fp)
            return None
        if schema_fingerprint(parsed) != fp:
            logger.error("Schema history file %s holds schema %s, not %s: ignored; run "
                         "`mesh schemas check`.", path, schema_fingerprint(parsed), fp)
            self._broken.add(fp)
            return None
        self._known[fp] = parsed
        return parsed


def remember(schema: dict[str, Any], directory: Path) -> Path | None:
    """Add ``schema`` to the history in ``directory`` unless its fingerprint is there
    already (append-only: an existing file is never rewritten); the file written, or None.

    Example:
        >>> remember({"type": "record", "name": "O", "fields": []}, Path("schemas/history"))
        ... # doctest: +SKIP
        PosixPath('schemas/history/....avsc')
    """
    path = directory / f"{schema_fingerprint(fastavro.parse_schema(schema))}.avsc"
    if path.exists():
        return None
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(_text(schema))
    return path


def render(topic: Topic[Any]) -> str:
    """The ``.avsc`` text of ``topic``'s value schema."""
    return _text(AvroSerde.for_model(topic.model).schema)


def _text(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2) + "\n"


@dataclass(frozen=True, slots=True)
class Export:
    """What :func:`export_schemas` wrote: the topic files and the new history files."""

    schemas: list[Path] = field(default_factory=list)
    history: list[Path] = field(default_factory=list)


def export_schemas(topics: Iterable[Topic[Any]], directory: Path) -> Export:
    """Write every topic's schema, and keep each schema it replaces and each current one
    in ``directory/history`` (never deleting from it)."""
    directory.mkdir(parents=True, exist_ok=True)
    history, done = directory / HISTORY, Export()
    for topic in sorted(topics, key=lambda t: t.name):
        path = directory / f"{topic.name}.avsc"
        schema = AvroSerde.for_model(topic.model).schema
        if path.exists():
            _remember_file(path, history, done.history)
        kept = remember(schema, history)
        if kept is not None:
            done.history.append(kept)
        path.write_text(_text(schema))
        done.schemas.append(path)
    return done


def _remember_file(path: Path, history: Path, kept: list[Path]) -> None:
    try:
        previous = json.loads(path.read_text())
        written = remember(previous, history)
    except _NOT_A_SCHEMA as exc:
        logger.warning("%s is not an Avro schema (%s): not kept in the history", path, exc)
        return
    if written is not None:
        kept.append(written)


def check_schemas(topics: Iterable[Topic[Any]], directory: Path) -> list[str]:
    """What differs between the models and the committed files (empty: all match): a
    missing or different ``.avsc``, one without a topic, a current schema missing from
    the history, a history file that is not the schema its name says."""
    problems = []
    history = directory / HISTORY
    expected = {f"{t.name}.avsc": AvroSerde.for_model(t.model) for t in topics}
    for name, serde in sorted(expected.items()):
        path = directory / name
        if not path.exists():
            problems.append(f"{path} is missing")
        elif json.loads(path.read_text()) != json.loads(_text(serde.schema)):
            problems.append(f"{path} differs from the model")
        if not (history / f"{serde.fingerprint}.avsc").exists():
            problems.append(f"{history / serde.fingerprint}.avsc is missing: the history "
                            f"lacks the current schema of {name.removesuffix('.avsc')}")
    for path in sorted(directory.glob("*.avsc")):
        if path.name not in expected:
            problems.append(f"{path} has no declared topic")
    for path in sorted(history.glob("*.avsc")):
        try:
            fp = schema_fingerprint(fastavro.parse_schema(json.loads(path.read_text())))
        except _NOT_A_SCHEMA as exc:
            problems.append(f"{path} is not an Avro schema: {exc}")
            continue
        if path.stem != fp:
            problems.append(f"{path} holds schema {fp}: rename it to {fp}.avsc")
    return problems
