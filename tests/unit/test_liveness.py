"""The broker watch tells a cluster failing over from a cluster that is gone."""

from __future__ import annotations

from typing import Any

import pytest

from mesh import MeshSettings
from mesh.errors import BrokerLost, TransportError
from mesh.runtime.liveness import BrokerWatch, Lasting


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class FakeAdmin:
    """Answers with the queued results in turn (an exception is raised)."""

    def __init__(self, *answers: Any) -> None:
        self.answers = list(answers)

    async def cluster_id(self) -> str | None:
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer  # type: ignore[no-any-return]


class Runner:
    def __init__(self) -> None:
        self.behind = False

    def check_log_ends(self) -> None:
        if self.behind:
            raise BrokerLost("t[0] ends at offset 5, but agent a has handled it up to 9")


def watch(runner: Runner, clock: Clock, servers: str = "a:1,b:2,c:3") -> BrokerWatch:
    settings = MeshSettings().with_bootstrap(servers)
    found = BrokerWatch(settings, [runner])  # type: ignore[list-item]
    found.cluster_id = "c1"
    found._silent = Lasting(30.0, clock=clock)
    found._behind = Lasting(30.0, clock=clock)
    return found


def test_lasting_counts_only_an_unbroken_stretch() -> None:
    clock = Clock()
    gap = Lasting(10.0, clock=clock)
    assert not gap.seen()
    clock.now = 9.0
    gap.cleared()
    clock.now = 15.0
    assert not gap.seen()
    clock.now = 25.0
    assert gap.seen() and gap.held_for() == 10.0


async def test_one_dead_broker_of_three_is_not_a_lost_cluster() -> None:
    """Pass: the first broker asked is down, another answers: no loss, no silence."""
    clock, runner = Clock(), Runner()
    found = watch(runner, clock)
    await found.check(FakeAdmin(TransportError("node 1 refused"), "c1"))  # type: ignore[arg-type]
    assert found._silent.since is None


async def test_no_broker_answering_for_the_timeout_is_loss() -> None:
    clock, runner = Clock(), Runner()
    found = watch(runner, clock)
    down = [TransportError("refused")] * 4
    await found.check(FakeAdmin(*down))  # type: ignore[arg-type]
    clock.now = 31.0
    with pytest.raises(BrokerLost, match="No broker at a:1,b:2,c:3 answered for 31 s"):
        await found.check(FakeAdmin(*down))  # type: ignore[arg-type]


async def test_another_cluster_id_is_loss_at_once() -> None:
    clock, runner = Clock(), Runner()
    with pytest.raises(BrokerLost, match="is now cluster 'c2'"):
        await watch(runner, clock).check(FakeAdmin("c2"))  # type: ignore[arg-type]


async def test_a_log_end_behind_the_handled_offset_during_a_leader_change_is_not_loss() -> None:
    """Pass: a new leader's high watermark below what was handled, for less than the
    timeout, then caught up: no loss. Lasting past the timeout: loss."""
    clock, runner = Clock(), Runner()
    found = watch(runner, clock)
    runner.behind = True
    await found.check(FakeAdmin("c1"))  # type: ignore[arg-type]
    clock.now = 5.0
    runner.behind = False
    await found.check(FakeAdmin("c1"))  # type: ignore[arg-type]
    runner.behind = True
    clock.now = 10.0
    await found.check(FakeAdmin("c1"))  # type: ignore[arg-type]
    clock.now = 41.0
    with pytest.raises(BrokerLost, match="ends at offset 5.*for 31 s"):
        await found.check(FakeAdmin("c1"))  # type: ignore[arg-type]
