"""A routine rolling stop: SIGTERM one replica, then the other while it is in the
rebalance the first one caused. Both stop quietly: exit 0, no traceback, no assignment
taken by a runner that is stopping."""

from __future__ import annotations

import time
from pathlib import Path

from mesh import Codec, apply_topics
from tests.apps.stages import build
from tests.conftest import BrokerUnderTest
from tests.support import AgentProcess, encode, inject, make_items


def _wait_for_line(path: Path, text: str, *, after: int = 0, timeout: float = 60) -> int:
    """Wait until ``path`` has ``text`` past byte ``after``; returns where it ends."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        content = path.read_bytes()
        found = content.find(text.encode(), after)
        if found >= 0:
            return found + len(text)
        time.sleep(0.05)  # polling a log file written by another process
    raise AssertionError(f"{path.name} has no {text!r} after {timeout:.0f} s:\n"
                         f"{path.read_text()[-2000:]}")


async def test_sigterm_during_the_rebalance_of_a_rolling_stop_is_quiet(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path) -> None:
    """Pass: two replicas of stage1 share its partitions; the first gets SIGTERM, and as
    soon as the second logs the revoke of that rebalance it gets SIGTERM too: both exit
    0 and neither log has a traceback or a failed rebalance listener (a stopping runner
    takes no assignment)."""
    app = build(prefix, partitions=4)
    settings = broker.settings()
    await apply_topics(settings.kafka, app.topics.values())
    source = app.agents[0].consumes[0]
    await inject(settings, [encode(Codec(), source, i) for i in make_items(4, 5)])
    logs = [tmp_path / "first.log", tmp_path / "second.log"]
    files = [path.open("wb") for path in logs]
    replicas = [AgentProcess(broker, "tests.apps.stages:stage1", prefix=prefix, log=f)
                for f in files]
    codes = []
    try:
        replicas[0].start()
        _wait_for_line(logs[0], "assigned")
        replicas[1].start()
        _wait_for_line(logs[1], "assigned")
        settled = _wait_for_line(logs[0], "revoked")  # the rebalance the second caused
        _wait_for_line(logs[0], "assigned", after=settled)
        mark = logs[1].stat().st_size
        codes.append(replicas[0].terminate())
        _wait_for_line(logs[1], "revoked", after=mark)
        codes.append(replicas[1].terminate())
    finally:
        for replica in replicas:
            if replica.alive():
                replica.terminate()
        for f in files:
            f.close()
    texts = [path.read_text() for path in logs]
    assert codes == [0, 0], texts[1][-3000:]
    for text in texts:
        assert "Traceback" not in text, text[-3000:]
        assert "failed on partition assignment" not in text, text[-3000:]


async def test_sigterm_while_a_replica_is_still_starting_is_a_clean_stop(
        broker: BrokerUnderTest, prefix: str, tmp_path: Path) -> None:
    """Pass: a replica that gets SIGTERM while it is still importing its agent (a 2 s
    import; before it consumed anything) exits 0 without a traceback: a rolling restart
    that reaches a replica still starting is not a failure (it exited 143 before)."""
    await apply_topics(broker.settings().kafka, build(prefix, partitions=4).topics.values())
    log_path = tmp_path / "starting.log"
    with log_path.open("wb") as log:
        replica = AgentProcess(broker, "tests.apps.slow_start:agent", prefix=prefix,
                               log=log, env={"MESH_TEST_PARTITIONS": "4"})
        replica.start()
        code = replica.terminate()  # sent once the process catches SIGTERM
    text = log_path.read_text()
    assert code == 0, text
    assert "Traceback" not in text, text
    assert "running" not in text, "the stop was meant to reach it while starting"
