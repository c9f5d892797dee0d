"""apply_topics waits for created topics to be led on every broker: wait_visible on a
fake admin."""

from __future__ import annotations

import pytest

from mesh.errors import TransportError
from mesh.kafka import provision
from mesh.kafka.base import TopicSpec


class LaggingAdmin:
    """Answers like a 3-broker cluster where broker 3 learns a new topic late: its first
    ``lag`` answers lack it, then it shows ``led`` partitions led; brokers 1 and 2 show
    all ``partitions`` led from the start."""

    def __init__(self, lag: int, led: int, partitions: int) -> None:
        self.lag, self.led, self.partitions, self.asked = lag, led, partitions, 0

    async def leaders_per_broker(self, topics: list[str]) -> dict[int, dict[str, dict[int, int]]]:
        self.asked += 1
        every = {t: dict.fromkeys(range(self.partitions), 1) for t in topics}
        late = {} if self.asked <= self.lag else {
            t: dict.fromkeys(range(self.led), 1) for t in topics}
        return {1: every, 2: every, 3: late}


async def test_waits_until_every_broker_shows_every_partition_led() -> None:
    """Pass: brokers 1 and 2 show the topic at once, broker 3 only after 5 answers:
    wait_visible returns on the first answer where all three show all 3 partitions led."""
    admin = LaggingAdmin(lag=5, led=3, partitions=3)
    await provision.wait_visible(admin, [TopicSpec("shop.orders", 3)])  # type: ignore[arg-type]
    assert admin.asked == 6


async def test_a_broker_short_of_leaders_past_the_deadline_is_an_error_naming_it() -> None:
    """Pass: broker 3 shows 2 of 3 partitions led until the deadline: TransportError
    names the topic, the broker, the count and the fix."""
    admin = LaggingAdmin(lag=0, led=2, partitions=3)
    with pytest.raises(TransportError) as raised:
        await provision.wait_visible(admin, [TopicSpec("shop.orders", 3)],  # type: ignore[arg-type]
                                     timeout=0.2)
    assert "shop.orders (partitions led: 2 of 3 on broker 3)" in str(raised.value)
    assert "mesh topics apply" in str(raised.value)


async def test_nothing_created_asks_nothing() -> None:
    admin = LaggingAdmin(lag=0, led=0, partitions=0)
    await provision.wait_visible(admin, [])  # type: ignore[arg-type]
    assert admin.asked == 0
