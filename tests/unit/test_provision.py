"""apply_topics waits for created topics to be led everywhere: wait_visible on a fake admin."""

from __future__ import annotations

import pytest

from mesh.errors import TransportError
from mesh.kafka import provision
from mesh.kafka.base import TopicSpec


class LaggingAdmin:
    """Answers like a cluster whose brokers learn a new topic late: the first ``lag``
    metadata answers lack it, then each shows its partitions led (``led`` of them)."""

    def __init__(self, lag: int, led: int) -> None:
        self.lag, self.led, self.asked = lag, led, 0

    async def leaders(self, topic: str) -> dict[int, int]:
        self.asked += 1
        return {} if self.asked <= self.lag else dict.fromkeys(range(self.led), 1)


async def test_waits_until_several_answers_in_a_row_show_every_partition_led() -> None:
    """Pass: 5 answers without the topic, then it is led: wait_visible returns only
    after VISIBLE_CONFIRMATIONS answers showing all 3 partitions led."""
    admin = LaggingAdmin(lag=5, led=3)
    await provision.wait_visible(admin, [TopicSpec("shop.orders", 3)])  # type: ignore[arg-type]
    assert admin.asked == 5 + provision.VISIBLE_CONFIRMATIONS


async def test_a_partition_without_leader_past_the_deadline_is_an_error_naming_it() -> None:
    """Pass: 2 of 3 partitions led until the deadline: TransportError names the topic,
    the count and the fix."""
    admin = LaggingAdmin(lag=0, led=2)
    with pytest.raises(TransportError) as raised:
        await provision.wait_visible(admin, [TopicSpec("shop.orders", 3)],  # type: ignore[arg-type]
                                     timeout=0.2)
    assert "shop.orders (2 of 3 partitions led)" in str(raised.value)
    assert "mesh topics apply" in str(raised.value)


async def test_nothing_created_asks_nothing() -> None:
    admin = LaggingAdmin(lag=0, led=0)
    await provision.wait_visible(admin, [])  # type: ignore[arg-type]
    assert admin.asked == 0
