"""The `mesh` command driven the way a user types it: one subprocess per command.

Every command runs as ``python -m mesh.cli ...`` in the repository, pointed at the
session's broker, with ``MESH_TEST_PREFIX`` set so the topics it finds in
:mod:`tests.apps.cli_topics` (and ``tests.apps.stages``) are this test's own. Long
running commands (``run``, ``dev``, ``tap``, ``broker``) are stopped by their pid;
waits are on output lines, exit codes or topic contents, each with a deadline.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fastavro
import pytest
from pydantic import ValidationError

from mesh import Codec, Topic
from mesh.config import KafkaSettings
from mesh.kafka.admin import Admin
from mesh.kafka.base import OutRecord, Record, TopicSpec
from mesh.kafka.provision import apply_topics, wait_visible
from mesh.kafka.transport import Producer
from mesh.runtime.dead_letter import DLQ_AGENT, DLQ_ERROR_CLASS, DLQ_TOPIC
from tests.apps.stages import Item
from tests.conftest import ROOT, BrokerUnderTest
from tests.support import AgentProcess, event_id, make_items, read_all, wait_for_count

TOPICS = "tests.apps.cli_topics"
CHAIN_TOPICS = ("in", "a", "b", "out", "fan1", "fan2")  # as tests.apps.stages.build names them
DECLARED = (*CHAIN_TOPICS, "retained")  # everything tests.apps.cli_topics declares
CLI_TIMEOUT_S = 60.0
# Variables that change how rich renders for a pipe; CI rarely sets them, so neither do we.
RENDERING_VARIABLES = ("COLUMNS", "LINES", "FORCE_COLOR", "TTY_COMPATIBLE", "TTY_INTERACTIVE")


# --- running commands -------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Cli:
    """The `mesh` command with one environment; every call is a subprocess with a timeout."""

    argv: tuple[str, ...]
    env: dict[str, str]

    def with_env(self, **extra: str) -> Cli:
        return dataclasses.replace(self, env={**self.env, **extra})

    async def __call__(self, *args: str, stdin: str | None = None,
                       timeout: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run, [*self.argv, *args], input=stdin, env=self.env, cwd=ROOT,
            capture_output=True, text=True, timeout=timeout)

    async def ok(self, *args: str, stdin: str | None = None) -> str:
        """Run, require exit code 0, return stdout."""
        result = await self(*args, stdin=stdin)
        assert result.returncode == 0, _explain(result)
        return result.stdout

    @contextmanager
    def spawn(self, *args: str) -> Iterator[Spawned]:
        """Start a long-running command; kill it by pid if the test leaves it running."""
        process = Spawned([*self.argv, *args], self.env)
        try:
            yield process
        finally:
            process.kill()


class Spawned:
    """A `mesh` subprocess whose output lines are collected by two threads, so a test
    can wait for a line (or for the exit) with a deadline instead of sleeping."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.process = subprocess.Popen(argv, env=env, cwd=ROOT, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.stdout: list[str] = []
        self.stderr: list[str] = []
        self._changed = threading.Condition()
        self._open = 2
        self._threads = [threading.Thread(target=self._pump, args=(stream, lines), daemon=True)
                         for stream, lines in ((self.process.stdout, self.stdout),
                                               (self.process.stderr, self.stderr))]
        for thread in self._threads:
            thread.start()

    def _pump(self, stream: Any, lines: list[str]) -> None:
        for line in stream:
            with self._changed:
                lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._open -= 1
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(["--- stdout", *self.stdout, "--- stderr", *self.stderr])

    async def line(self, pattern: str, *, stream: str = "stderr",
                   timeout: float = CLI_TIMEOUT_S) -> re.Match[str]:
        """The first line of ``stream`` matching ``pattern``, waiting up to ``timeout`` s."""
        return await asyncio.to_thread(self._line, re.compile(pattern),
                                       getattr(self, stream), timeout)

    def _line(self, regex: re.Pattern[str], lines: list[str], timeout: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in lines:
                    if match := regex.search(line):
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._open:
                    break
                self._changed.wait(remaining)
        raise AssertionError(f"no line matching {regex.pattern!r} within {timeout:.0f} s "
                             f"(exit code {self.process.poll()}):\n{self.output}")

    async def exited(self, timeout: float) -> bool:
        """Whether the process exits within ``timeout`` s."""
        try:
            await asyncio.to_thread(self.process.wait, timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    async def finish(self, timeout: float = CLI_TIMEOUT_S) -> int:
        """The exit code, once the process has ended by itself and its output is read."""
        assert await self.exited(timeout), f"still running after {timeout:.0f} s:\n{self.output}"
        for thread in self._threads:
            await asyncio.to_thread(thread.join, timeout)
        return self.process.returncode

    async def terminate(self, timeout: float = CLI_TIMEOUT_S) -> int:
        """SIGTERM (by pid) and the exit code."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        return await self.finish(timeout)

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=30)


@contextmanager
def agent_process(broker: BrokerUnderTest, target: str, *, prefix: str,
                  log: Path) -> Iterator[AgentProcess]:
    """`mesh run target` writing to ``log``; SIGTERMed (by pid) if the test leaves it up."""
    with log.open("ab") as sink:
        agent = AgentProcess(broker, target, prefix=prefix, log=sink).start()
        try:
            yield agent
        finally:
            if agent.alive():
                agent.terminate()


def _explain(result: subprocess.CompletedProcess[str]) -> str:
    return (f"{' '.join(result.args[2:])} exited {result.returncode}\n--- stdout\n"
            f"{result.stdout}--- stderr\n{result.stderr}")


def _flat(text: str) -> str:
    """``text`` with every run of whitespace as one space (rich wraps long lines)."""
    return " ".join(text.split())


# --- what the commands print ------------------------------------------------------


def _changes(stdout: str) -> dict[str, tuple[str, str]]:
    """`topics apply` output: topic -> (action, detail)."""
    found = {}
    for line in stdout.splitlines():
        match = re.fullmatch(r"(created|unchanged|drift)\s+(\S+)(?:\s+\((.*)\))?", line)
        assert match, f"unexpected line from topics apply: {line!r}"
        found[match[2]] = (match[1], match[3] or "")
    return found


def _table(stdout: str) -> dict[str, list[str]]:
    """`topics list` rows in a pipe (tab-separated): topic -> [partitions, model, key,
    configs]."""
    lines = stdout.splitlines()
    assert lines and lines[0].split("\t") == ["topic", "partitions", "model", "key", "configs"]
    return {cells[0]: cells[1:] for cells in (line.split("\t") for line in lines[1:])}


def _json_lines(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.strip()]


def _names(prefix: str, *short: str) -> set[str]:
    return {f"{prefix}.{name}" for name in short}


async def _emit(cli: Cli, topic: str, items: list[Item]) -> list[str]:
    """`mesh emit topic -` with ``items`` as JSON lines; the printed event ids, in order."""
    stdin = "".join(item.model_dump_json() + "\n" for item in items)
    printed = _json_lines(await cli.ok("emit", topic, "-", "-t", TOPICS, stdin=stdin))
    assert [p["topic"] for p in printed] == [topic] * len(items), printed
    return [p["event_id"] for p in printed]


async def _payload(record: Record) -> Item:
    """The decoded payload of a record of one of the chain's topics."""
    item = await Codec().decode(Topic(record.topic, Item), record.value or b"")
    assert isinstance(item, Item)
    return item


async def _describe(broker: BrokerUnderTest, names: set[str]) -> dict[str, TopicSpec]:
    async with Admin(broker.settings().kafka) as admin:
        return await admin.describe(sorted(names))


def _gone(pid: int) -> bool:
    """Whether ``pid`` has exited (a zombie counts: it no longer runs)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _pydantic_error(raw: str) -> str:
    """What pydantic says about ``raw`` as an ``Item``."""
    try:
        Item.model_validate_json(raw)
    except ValidationError as exc:
        return str(exc)
    raise AssertionError(f"{raw} is valid")


def _stop_orphan(pid: int, binary: Path) -> None:
    """SIGKILL ``pid`` if it is still the fake broker this test started."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:
        return
    if str(binary).encode() in cmdline and not _gone(pid):
        os.kill(pid, signal.SIGKILL)


# --- 1. topics apply / list -------------------------------------------------------


async def test_topics_apply_creates_declared_topics_with_dead_letters_then_changes_nothing(
        cli: Cli, broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: the first run creates every declared topic and its .dlq with the declared
    partitions; the second prints only `unchanged`, exits 0 and leaves the broker as it
    was."""
    declared = _names(prefix, *DECLARED)
    expected = declared | {f"{name}.dlq" for name in declared}

    first = _changes(await cli.ok("topics", "apply", "-t", TOPICS))
    audit = first.pop("mesh.audit")  # the mesh's own audit topic is always declared
    assert audit[0] in ("created", "unchanged")  # another test may have created it

    assert set(first) == expected
    assert {action for action, _ in first.values()} == {"created"}
    assert first[f"{prefix}.in"][1] == "4 partitions"
    before = await _describe(broker, expected)
    assert {name: spec.partitions for name, spec in before.items()} == {
        name: 2 if ".retained" in name else 4 for name in expected}
    assert before[f"{prefix}.retained"].configs["retention.ms"] == "3600000"

    second = _changes(await cli.ok("topics", "apply", "-t", TOPICS))

    assert second == {name: ("unchanged", "") for name in expected | {"mesh.audit"}}
    assert await _describe(broker, expected) == before


async def test_topics_list_shows_partitions_models_and_configs(cli: Cli, prefix: str) -> None:
    """Pass: every declared topic is listed with its partitions, payload model and key;
    dead-letter topics have no model; the declared config is shown."""
    await cli.ok("topics", "apply", "-t", TOPICS)

    rows = _table(await cli.ok("topics", "list", "-t", TOPICS))

    for name in CHAIN_TOPICS:
        assert rows[f"{prefix}.{name}"][:3] == ["4", "Item", "key"]
        assert rows[f"{prefix}.{name}.dlq"][:3] == ["4", "-", "-"]
    assert rows[f"{prefix}.retained"][:3] == ["2", "Item", "key"]
    assert "retention.ms=3600000" in rows[f"{prefix}.retained"][3]  # Kafka lists defaults too


async def test_topics_list_in_a_pipe_prints_long_topic_names_whole(
        cli: Cli, prefix: str) -> None:
    """Pass: topic names that do not fit 80 columns are still printed whole."""
    long_prefix = f"{prefix}-{'x' * 50}"
    cli = cli.with_env(MESH_TEST_PREFIX=long_prefix)
    await cli.ok("topics", "apply", "-t", TOPICS)

    rows = _table(await cli.ok("topics", "list", "-t", TOPICS))

    assert _names(long_prefix, *DECLARED) <= set(rows), sorted(rows)


async def test_topics_apply_reports_drift_naming_the_setting_and_exits_3(
        cli: Cli, broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: a topic that exists with other partitions, and one without its declared
    config, are reported as drift naming the setting, declared and actual values; the
    exit code is 3; the drifting topics are left as they are; the rest is created."""
    async with Admin(broker.settings().kafka) as admin:
        await admin.create_topic(TopicSpec(f"{prefix}.in", 2))
        await admin.create_topic(TopicSpec(f"{prefix}.retained", 2))
        await wait_visible(admin, [TopicSpec(f"{prefix}.in", 2),
                                   TopicSpec(f"{prefix}.retained", 2)])

    result = await cli("topics", "apply", "-t", TOPICS)

    assert result.returncode == 3, _explain(result)
    changes = _changes(result.stdout)
    assert changes[f"{prefix}.in"] == ("drift", "partitions: declared 4, broker 2")
    action, detail = changes[f"{prefix}.retained"]
    assert action == "drift" and detail.startswith("retention.ms: declared 3600000, broker ")
    assert {name for name, (action, _) in changes.items() if action == "drift"} == _names(
        prefix, "in", "retained")
    assert changes[f"{prefix}.a"] == ("created", "4 partitions")
    found = await _describe(broker, _names(prefix, "in", "retained"))
    assert found[f"{prefix}.in"].partitions == 2
    assert (found[f"{prefix}.retained"].configs or {}).get("retention.ms") != "3600000"


# --- 2. emit ----------------------------------------------------------------------


async def test_emit_produces_a_validated_event_with_mesh_headers(
        cli: Cli, broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: `emit` prints the event and correlation ids; the topic then holds exactly
    that event: same payload, key from the key field, headers with the printed event
    id, source `emit` and the payload schema's fingerprint."""
    await cli.ok("topics", "apply", "-t", TOPICS)
    topic = f"{prefix}.in"
    item = Item(key="k7", seq=3, source_id="s-1", text="hello", hops=["x"])

    printed = _json_lines(await cli.ok("emit", topic, item.model_dump_json(), "-t", TOPICS))

    assert len(printed) == 1
    assert printed[0]["topic"] == topic
    assert printed[0]["correlation_id"] == printed[0]["event_id"]  # a new workflow
    [record] = await read_all(broker.settings(), [topic])
    assert await _payload(record) == item
    assert record.key == b"k7"
    headers = {k: v.decode() for k, v in record.headers}
    assert headers["mesh-event-id"] == printed[0]["event_id"]
    assert headers["mesh-correlation"] == printed[0]["correlation_id"]
    assert headers["mesh-source"] == "emit"
    assert headers["mesh-schema"] == Codec().serde(Item).fingerprint


async def test_emit_with_dash_reads_json_lines_from_stdin(
        cli: Cli, broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: three JSON lines on stdin (and a blank one) become three events, one
    printed line each, in order per key."""
    await cli.ok("topics", "apply", "-t", TOPICS)
    topic = f"{prefix}.in"
    items = [Item(key="k1", seq=n, source_id=f"s{n}") for n in range(3)]
    stdin = "\n".join([items[0].model_dump_json(), "", items[1].model_dump_json(),
                       items[2].model_dump_json()]) + "\n"

    printed = _json_lines(await cli.ok("emit", topic, "-", "-t", TOPICS, stdin=stdin))

    ids = [p["event_id"] for p in printed]
    assert len(set(ids)) == 3
    records = sorted(await read_all(broker.settings(), [topic]), key=lambda r: r.offset)
    assert [event_id(r) for r in records] == ids
    assert [await _payload(r) for r in records] == items


async def test_emit_of_json_the_model_rejects_exits_2_with_the_error_and_produces_nothing(
        cli: Cli, broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: a payload failing validation exits 2 with pydantic's message naming the
    field; on stdin one bad line among good ones produces none of them."""
    await cli.ok("topics", "apply", "-t", TOPICS)
    topic = f"{prefix}.in"
    good = Item(key="k1", seq=1, source_id="s1").model_dump_json()

    single = await cli("emit", topic, '{"key": "k1", "seq": "x", "source_id": "s1"}',
                       "-t", TOPICS)
    batch = await cli("emit", topic, "-", "-t", TOPICS,
                      stdin=f"{good}\n{{\"key\": \"k2\"}}\n{good}\n")

    for result in (single, batch):
        assert result.returncode == 2, _explain(result)
        assert result.stdout == ""
        assert re.search(r"\d validation errors? for Item", _flat(result.stderr))
    assert "seq Input should be a valid integer" in _flat(single.stderr)
    assert "seq Field required" in _flat(batch.stderr)
    assert await read_all(broker.settings(), [topic]) == []


@pytest.mark.parametrize("raw", [
    '{"key": "k1", "seq": "x", "source_id": "s1"}',
    '{"seq": 1, "source_id": "[/b]"}',
], ids=["detail-in-brackets", "closing-tag-in-input"])
async def test_emit_prints_the_validation_error_verbatim(
        cli: Cli, prefix: str, raw: str) -> None:
    """Pass: exit 2 and pydantic's whole message, with the rejected input, on stderr."""
    await cli.ok("topics", "apply", "-t", TOPICS)

    result = await cli("emit", f"{prefix}.in", raw, "-t", TOPICS)

    assert result.returncode == 2, _explain(result)
    assert _flat(_pydantic_error(raw)) in _flat(result.stderr)


async def test_emit_to_an_undeclared_topic_exits_2_naming_topic_and_modules(
        cli: Cli, prefix: str) -> None:
    """Pass: exit 2, nothing printed on stdout, stderr names the topic and where it
    was looked for."""
    result = await cli("emit", f"{prefix}.nowhere", '{"key": "k"}', "-t", TOPICS)

    assert result.returncode == 2, _explain(result)
    assert result.stdout == ""
    message = _flat(result.stderr.replace("│", " "))
    assert f"Topic '{prefix}.nowhere' is not declared in ['{TOPICS}']" in message


async def test_emit_to_a_declared_topic_missing_on_the_broker_exits_1_and_creates_nothing(
        cli: Cli, broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: before `mesh topics apply`, emitting to a declared topic exits 1 naming the
    topic and `mesh topics apply`, prints no event id, and leaves the topic uncreated
    (a first write would have Apache Kafka auto-create it with its default partitions)."""
    result = await cli("emit", f"{prefix}.in", '{"key": "k", "seq": 1, "source_id": "s"}',
                       "-t", TOPICS)

    assert result.returncode == 1, _explain(result)
    assert result.stdout == ""
    message = _flat(result.stderr.replace("│", " "))
    assert f"Topic '{prefix}.in' does not exist on the broker" in message, message
    assert "mesh topics apply" in message
    async with Admin(broker.settings().kafka) as admin:
        assert f"{prefix}.in" not in await admin.list_topics()


# --- 3. tap -----------------------------------------------------------------------


async def test_tap_json_from_the_beginning_prints_each_event_with_position_and_payload(
        cli: Cli, broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: one JSON line per event: topic, partition and offset as on the broker,
    the mesh headers and the decoded payload; it ends by itself (--no-follow)."""
    await cli.ok("topics", "apply", "-t", TOPICS)
    topic = f"{prefix}.in"
    items = make_items(keys=3, per_key=2)
    ids = await _emit(cli, topic, items)

    shown = _json_lines(await cli.ok("tap", topic, "--from-beginning", "--json",
                                     "--no-follow", "-t", TOPICS))

    by_id = {line["headers"]["mesh-event-id"]: line for line in shown}
    assert len(shown) == len(items) and set(by_id) == set(ids)
    on_broker = {event_id(r): r for r in await read_all(broker.settings(), [topic])}
    for eid, item in zip(ids, items, strict=True):
        line, record = by_id[eid], on_broker[eid]
        assert (line["topic"], line["partition"], line["offset"]) == (
            topic, record.partition, record.offset)
        assert line["key"] == item.key
        assert line["headers"]["mesh-source"] == "emit"
        assert line["headers"]["mesh-correlation"] == eid
        assert line["payload"] == item.model_dump(mode="json")


async def test_tap_from_now_prints_only_events_emitted_after_it_started(
        cli: Cli, prefix: str) -> None:
    """Pass: `tap --limit 2` (no --from-beginning) skips the events already in the
    topic, also on the partition the new ones go to, prints the first two emitted
    after it started, in order, and exits 0.

    `tap` prints nothing when it is ready, so events are emitted one at a time until
    it has printed two; it must print two consecutive ones and none of the old."""
    await cli.ok("topics", "apply", "-t", TOPICS)
    topic = f"{prefix}.in"
    old = set(await _emit(cli, topic, make_items(keys=4, per_key=3)))
    emitted: list[str] = []
    deadline = time.monotonic() + 90

    with cli.spawn("tap", topic, "--json", "--limit", "2", "-t", TOPICS) as tap:
        while not await tap.exited(timeout=1.0):
            assert time.monotonic() < deadline, f"tap printed too little:\n{tap.output}"
            probe = Item(key="k0", seq=100 + len(emitted), source_id=f"new{len(emitted)}")
            emitted += await _emit(cli, topic, [probe])  # k0: a partition with old events
        code = await tap.finish()

    assert code == 0, tap.output
    shown = [line["headers"]["mesh-event-id"] for line in _json_lines("\n".join(tap.stdout))]
    assert not set(shown) & old, "tap printed events from before it started"
    assert len(shown) == 2 and shown[0] in emitted, tap.output
    start = emitted.index(shown[0])
    assert emitted[start:start + 2] == shown


async def test_tap_of_a_dead_letter_topic_shows_why_instead_of_a_payload(
        cli: Cli, broker: BrokerUnderTest, prefix: str, tmp_path: Path) -> None:
    """Pass: garbage produced to stage1's input while `mesh run` runs is dead-lettered;
    tapping `<in>.dlq` shows it with the original topic, error class and agent, and
    the decode error where the payload would be (as text and as JSON)."""
    await cli.ok("topics", "apply", "-t", TOPICS)
    source, dlq = f"{prefix}.in", f"{prefix}.in.dlq"
    garbage = OutRecord(source, b"\x17\x99not avro at all", b"k1",
                        (("mesh-event-id", b"garbage-1"),))
    with agent_process(broker, "tests.apps.stages:stage1", prefix=prefix,
                       log=tmp_path / "stage1.log") as agent:
        async with Producer(broker.settings().kafka) as producer:
            await producer.send_all([garbage])
        await wait_for_count(broker.settings(), [dlq], 1, timeout=60)
        assert await asyncio.to_thread(agent.terminate) == 0

    text = await cli.ok("tap", dlq, "--from-beginning", "--no-follow", "-t", TOPICS)
    [as_json] = _json_lines(await cli.ok("tap", dlq, "--from-beginning", "--no-follow",
                                         "--json", "-t", TOPICS))

    header, body = text.splitlines()
    assert header.startswith(f"{dlq}[") and "event=garbage-1" in header
    for expected in (f"topic='{source}'", "error-class='DecodeError'",
                     f"agent='{prefix}-stage1'", "attempts='1'"):
        assert expected in header, header
    assert body.strip().startswith("<DecodeError: ") and "neither Avro" in body
    assert "payload" not in as_json and as_json["error"].startswith("DecodeError: ")
    assert as_json["headers"][DLQ_TOPIC] == source
    assert as_json["headers"][DLQ_ERROR_CLASS] == "DecodeError"
    assert as_json["headers"][DLQ_AGENT] == f"{prefix}-stage1"


# --- 4. run -----------------------------------------------------------------------


async def test_run_moves_emitted_events_on_stops_cleanly_and_resumes_without_repeats(
        cli: Cli, broker: BrokerUnderTest, prefix: str, tmp_path: Path) -> None:
    """Pass: events from `mesh emit` come out of `mesh run tests.apps.stages:stage1` on
    the next topic, one per input; SIGTERM exits 0 and logs a clean stop; a restarted
    agent handles only the new events (as many records on the output as distinct ids)."""
    applied = _changes(await cli.ok("topics", "apply", "--app", "tests.apps.stages:app"))
    assert applied[f"{prefix}.in"][0] == applied[f"{prefix}.a"][0] == "created"
    source, target = f"{prefix}.in", f"{prefix}.a"
    settings = broker.settings()
    log = tmp_path / "stage1.log"

    with agent_process(broker, "tests.apps.stages:stage1", prefix=prefix, log=log) as agent:
        first = await _emit(cli, source, make_items(keys=8, per_key=1))
        outputs = await wait_for_count(settings, [target], len(first), timeout=60)
        code = await asyncio.to_thread(agent.terminate)
    assert code == 0, log.read_text()
    assert f"stopped {prefix}-stage1 cleanly" in log.read_text()
    causes = {dict(r.headers)["mesh-causation"].decode() for r in outputs}
    assert causes == set(first)

    # The same keys again, so every partition with old inputs gets new ones after them.
    with agent_process(broker, "tests.apps.stages:stage1", prefix=prefix, log=log) as agent:
        second = await _emit(cli, source, make_items(keys=8, per_key=1))
        await wait_for_count(settings, [target], len(first) + len(second), timeout=60)
        assert await asyncio.to_thread(agent.terminate) == 0, log.read_text()

    ids = [event_id(r) for r in await read_all(settings, [target])]
    assert len(ids) == len(set(ids)) == len(first) + len(second)


# --- 5. dev -----------------------------------------------------------------------


async def test_dev_runs_the_whole_chain_in_one_process_and_stops_on_sigterm(
        cli: Cli, broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: `mesh dev tests.apps.stages:chain` creates the chain's topics itself, events
    emitted to `<prefix>.in` reach `<prefix>.out` through all three stages, and SIGTERM
    makes it exit 0 after a clean stop."""
    with cli.spawn("dev", "tests.apps.stages:chain") as dev:
        await dev.line(rf"running {prefix}-stage1, {prefix}-stage2, {prefix}-stage3")
        # "running" comes once its topics exist: an emit right after it never makes a
        # broker auto-create the input topic (Apache Kafka would, with 1 partition)
        chain = {f"{prefix}.{name}" for name in ("in", "a", "b", "out")}
        described = await _describe(broker, chain)
        assert {name: spec.partitions for name, spec in described.items()} == dict.fromkeys(
            chain, 4)
        items = make_items(keys=4, per_key=2)
        ids = await _emit(cli, f"{prefix}.in", items)
        # It failed twice in make test's loaded Apache session, nothing through in 180 s:
        # "running" came before the topics were created, the emit made Apache Kafka
        # auto-create `in` with 1 partition and `mesh dev` waited for 4 until it died.
        # A failure shows what the process logged.
        try:
            outputs = await wait_for_count(broker.settings(), [f"{prefix}.out"], len(ids),
                                           timeout=180)
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{dev.output}") from None
        code = await dev.terminate()

    assert code == 0, dev.output
    stopped = f"stopped {prefix}-stage1, {prefix}-stage2, {prefix}-stage3 cleanly"
    assert any(stopped in line for line in dev.stderr), dev.output
    done = [await _payload(r) for r in outputs]
    assert sorted(d.source_id for d in done) == sorted(i.source_id for i in items)
    assert {tuple(d.hops) for d in done} == {("stage1", "stage2", "stage3")}
    assert {dict(r.headers)["mesh-correlation"].decode() for r in outputs} == set(ids)


# --- 6. broker --------------------------------------------------------------------


async def test_broker_prints_its_address_answers_metadata_and_stops_on_sigterm(
        cli: Cli) -> None:
    """Pass: `mesh broker --port 0` prints `MESH_KAFKA__BOOTSTRAP_SERVERS=127.0.0.1:PORT`;
    a client creates and lists a topic there; SIGTERM makes it exit 0 with the broker
    process gone and the port closed."""
    with cli.spawn("broker", "--port", "0") as process:
        address = await process.line(r"^MESH_KAFKA__BOOTSTRAP_SERVERS=(127\.0\.0\.1:(\d+))$",
                                     stream="stdout")
        child = await process.line(rf"embedded broker pid (\d+) on {re.escape(address[1])}")
        async with Admin(KafkaSettings(bootstrap_servers=address[1])) as admin:
            await admin.create_topic(TopicSpec("cli.probe", 1))
            assert "cli.probe" in await admin.list_topics()
        code = await process.terminate()

    assert code == 0, process.output
    assert _gone(int(child[1])), f"broker pid {child[1]} still runs after `mesh broker` exited"
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", int(address[2])), timeout=5).close()


async def test_broker_sigterm_while_starting_leaves_no_broker_process(
        cli: Cli, tmp_path: Path) -> None:
    """Pass: SIGTERM while the broker starts (a fake broker binary that never listens)
    ends `mesh broker` and the broker process it started."""
    fake = tmp_path / "fake-tansu"
    fake.write_text(f"#!{sys.executable}\n# A broker that never answers: waits for a signal.\n"
                    "import signal\nsignal.pause()\n")
    fake.chmod(0o755)
    with cli.with_env(MESH_TANSU_BIN=str(fake)).spawn("broker", "--port", "0") as process:
        child = int((await process.line(r"embedded broker pid (\d+)"))[1])
        try:
            await process.terminate()
            gone = _gone(child)
        finally:
            _stop_orphan(child, fake)
    assert gone, f"the broker process {child} outlived `mesh broker`"


# --- 7. schemas -------------------------------------------------------------------


async def test_schemas_export_writes_one_parsable_avsc_per_declared_topic(
        cli: Cli, prefix: str, tmp_path: Path) -> None:
    """Pass: one `<topic>.avsc` per declared topic (none for .dlq), each a schema
    fastavro parses, each reported on stdout; `schemas check` then passes."""
    out = tmp_path / "schemas"

    stdout = await cli.ok("schemas", "export", "--out", str(out), "-t", TOPICS)

    files = sorted(out.glob("*.avsc"))
    assert {f.name for f in files} == {f"{name}.avsc" for name in _names(prefix, *DECLARED)} | {
        "mesh.audit.avsc"}
    assert stdout.splitlines() == [f"wrote {f}" for f in files]
    for path in files:
        schema = fastavro.parse_schema(json.loads(path.read_text()))
        assert schema["name"].endswith("AuditEvent" if path.name == "mesh.audit.avsc"
                                       else "Item")
    checked = await cli.ok("schemas", "check", "--out", str(out), "-t", TOPICS)
    assert "match the models" in checked


async def test_schemas_check_exits_1_naming_the_edited_file(
        cli: Cli, prefix: str, tmp_path: Path) -> None:
    """Pass: after one exported file is edited, `schemas check` exits 1 and names that
    file (and only that one) as differing from the model."""
    out = tmp_path / "schemas"
    await cli.ok("schemas", "export", "--out", str(out), "-t", TOPICS)
    edited = out / f"{prefix}.a.avsc"
    edited.write_text(edited.read_text().replace('"seq"', '"sequence"'))

    result = await cli("schemas", "check", "--out", str(out), "-t", TOPICS)

    assert result.returncode == 1, _explain(result)
    # rich folds lines at 80 columns in a pipe (see the next test): join them to read.
    message = result.stderr.replace("\n", "")
    assert f"drift: {edited} differs from the model" in message
    assert message.count("differs from the model") == 1


async def test_schemas_check_prints_each_drifting_path_on_one_line(
        cli: Cli, prefix: str, tmp_path: Path) -> None:
    """Pass: the drift line holds the whole path of the edited file."""
    out = tmp_path / "a-directory-whose-name-makes-the-path-longer-than-80-columns" / "schemas"
    await cli.ok("schemas", "export", "--out", str(out), "-t", TOPICS)
    edited = out / f"{prefix}.a.avsc"
    edited.write_text(edited.read_text().replace('"seq"', '"sequence"'))

    result = await cli("schemas", "check", "--out", str(out), "-t", TOPICS)

    assert result.returncode == 1, _explain(result)
    assert any(str(edited) in line for line in result.stderr.splitlines()), result.stderr


async def test_run_without_its_topics_fails_naming_them_and_creates_nothing(
        cli: Cli, broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: `mesh run` of an agent whose topics were never applied exits 1 naming the
    missing topics and `mesh topics apply`, and the broker did not auto-create them; with
    the topics applied with another partition count it names the difference too."""
    failed = await cli("run", "tests.apps.stages:stage1")
    assert failed.returncode == 1, _explain(failed)
    assert f"{prefix}.in" in failed.stderr and "mesh topics apply" in failed.stderr
    assert "TopicDrift" in failed.stderr and "Traceback" not in failed.stderr
    async with Admin(broker.settings().kafka) as admin:
        assert not [t for t in await admin.list_topics() if t.startswith(f"{prefix}.in")]
    await apply_topics(broker.settings().kafka, [Topic(f"{prefix}.in", Item, partitions=1)])
    differs = await cli("run", "tests.apps.stages:stage1")
    assert differs.returncode == 1, _explain(differs)
    assert "partitions differ" in differs.stderr and f"{prefix}.in (declared" in differs.stderr


async def test_emit_with_a_registry_does_not_log_its_http_calls(
        cli: Cli, broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: `mesh emit` through a Confluent-compatible registry (a real HTTP server on
    loopback) registers the schema and produces the wire format, and its stderr holds
    none of the HTTP client's per-request INFO lines."""
    from tests.unit.test_codec import FakeSchemaRegistry

    await cli.ok("topics", "apply", "-t", TOPICS)
    item = Item(key="k1", seq=1, source_id="s-1")
    env = {k: v for k, v in cli.env.items() if k.lower() not in ("http_proxy", "all_proxy")}
    with FakeSchemaRegistry() as registry:
        done = await dataclasses.replace(cli, env=env).with_env(
            MESH_SCHEMA_REGISTRY__URL=registry.url, MESH_LOG_LEVEL="INFO",
            MESH_AUDIT__ENABLED="false")(  # the session's audit topic stays registry-free
            "emit", f"{prefix}.in", item.model_dump_json(), "-t", TOPICS)
    assert done.returncode == 0, _explain(done)
    assert "HTTP Request" not in done.stderr and "httpx" not in done.stderr, done.stderr
    [record] = await read_all(broker.settings(), [f"{prefix}.in"])
    assert (record.value or b"")[:1] == b"\x00"  # the Confluent wire format: it registered
