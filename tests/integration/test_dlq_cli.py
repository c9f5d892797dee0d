"""`mesh dlq list/show/replay`, driven as subprocesses the way a user types them."""

from __future__ import annotations

import json
import subprocess
import sys

from mesh import Codec, Mesh, Topic, apply_topics
from mesh.kafka.base import OutRecord
from mesh.runtime.audit import audit_topic
from tests.apps.stages import build
from tests.conftest import ROOT, BrokerUnderTest
from tests.support import encode, inject, make_items, read_all, wait_for_count


def mesh(broker: BrokerUnderTest, prefix: str, *args: str) -> str:
    extra = ["-t", "tests.apps.cli_topics"] if args[:2] == ("dlq", "show") else []
    done = subprocess.run([sys.executable, "-m", "mesh.cli", *args, *extra],
                          env=broker.env(MESH_TEST_PREFIX=prefix), cwd=ROOT,
                          capture_output=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout.decode()


async def test_dlq_list_show_and_replay_keep_event_ids_and_audit_the_replay(
        broker: BrokerUnderTest, prefix: str) -> None:
    """Pass: `list` shows both dead letters with origin and error class; `--where`
    filters; `show` decodes the poison item's payload; `replay --where
    error_class=ValueError --to T` republishes only that one to T with its original
    event id, and mesh.audit records the replay."""
    app = build(prefix)
    stage1 = app.agents[0]
    source, sink = stage1.consumes[0], stage1.produces[0]
    settings = broker.settings()
    await apply_topics(settings.kafka, [source, sink, audit_topic])
    codec = Codec()
    items = make_items(keys=1, per_key=3, bad=[(0, 1)])
    poison = items[1]
    garbage = OutRecord(source.name, b"\x01\x02garbage", b"k0", (("mesh-event-id", b"g-1"),))
    async with Mesh(settings, [stage1]) as running:
        await running.wait_assigned()
        await inject(settings, [encode(codec, source, i) for i in items] + [garbage])
        await wait_for_count(settings, [source.dlq_name], 2)

    listed = [json.loads(line) for line in
              mesh(broker, prefix, "dlq", "list", source.name, "--json").splitlines()]
    assert sorted(d["error_class"] for d in listed) == ["DecodeError", "ValueError"]
    assert {d["origin_topic"] for d in listed} == {source.name}
    only = mesh(broker, prefix, "dlq", "list", source.name, "--where", "error_class=ValueError")
    assert len(only.splitlines()) == 1 and "ValueError" in only

    decoded = [json.loads(line) for line in mesh(
        broker, prefix, "dlq", "list", source.name, "--json", "-t", "tests.apps.cli_topics"
    ).splitlines()]
    assert {d["error_class"]: d.get("payload", {}).get("source_id") for d in decoded} == {
        "ValueError": poison.source_id, "DecodeError": None}
    assert next(d for d in decoded if d["error_class"] == "DecodeError")["error"]
    refused = subprocess.run(
        [sys.executable, "-m", "mesh.cli", "dlq", "replay", source.name, "--to", "nowhere",
         "-t", "tests.apps.cli_topics"], env=broker.env(MESH_TEST_PREFIX=prefix), cwd=ROOT,
        capture_output=True, timeout=120, check=False)
    assert refused.returncode == 2 and b"not declared" in refused.stderr

    poison_letter = next(d for d in listed if d["error_class"] == "ValueError")
    shown = json.loads(mesh(broker, prefix, "dlq", "show", source.dlq_name,
                            str(poison_letter["offset"]), "--partition",
                            str(poison_letter["partition"])))
    assert shown["payload"]["source_id"] == poison.source_id
    assert shown["dead_letter"]["error_class"] == "ValueError"

    target = f"{prefix}.replayed"
    await apply_topics(settings.kafka, [Topic(target, source.model)])
    report = mesh(broker, prefix, "dlq", "replay", source.name, "--where",
                  "error_class=ValueError", "--to", target)
    assert report.startswith("replayed 1 of 2 dead letters to " + target)
    replayed = await read_all(settings, [target])
    assert len(replayed) == 1
    headers = dict(replayed[0].headers)
    assert headers["mesh-event-id"].decode() == poison.source_id
    assert "mesh-dlq-error" not in headers and headers["mesh-replayed-from"]
    assert (await codec.decode(source, replayed[0].value or b"")).source_id == poison.source_id  # type: ignore[attr-defined]
    audits = [await codec.decode(audit_topic, r.value or b"")
              for r in await read_all(settings, [audit_topic.name])]
    about = [a for a in audits if a.event_id == poison.source_id]  # type: ignore[attr-defined]
    # the agent audited the failure, the replay command the replay
    # (a plain exception: retried twice through the retry topics, then dead-lettered)
    assert [a.outcome for a in about if a.kind == "consumed"  # type: ignore[attr-defined]
            ] == ["retry", "retry", "dead_letter"]
    mine = [a for a in about if a.kind == "dlq_replayed"]  # type: ignore[attr-defined]
    assert len(mine) == 1 and mine[0].outcome == "replayed"  # type: ignore[attr-defined]
    assert mine[0].details["to"] == target  # type: ignore[attr-defined]
