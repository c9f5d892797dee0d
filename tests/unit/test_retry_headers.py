"""The lanes' questions to a record's retry headers (asked of every record taken)."""

from __future__ import annotations

from mesh.kafka.base import Record
from mesh.runtime import retry


def _record(*headers: tuple[str, bytes]) -> Record:
    return Record("shop.orders.retry.1", 0, 7, b"k", b"v", headers, 0)


def test_due_time_and_group_come_from_the_last_header_of_each_name() -> None:
    """Pass: a record without retry headers is due now and for every group; with them,
    the last value of each name counts (as headers_of, a dict, keeps it), the other
    headers (even undecodable ones) do not matter."""
    plain = _record(("mesh-event-id", b"e1"), ("binary", b"\xff\xfe"))
    assert retry.due_ms(plain) == 0 and retry.is_for(plain, "billing")
    scheduled = _record((retry.RETRY_DUE, b"100"), (retry.RETRY_GROUP, b"old"),
                        ("binary", b"\xff"), (retry.RETRY_DUE, b"250"),
                        (retry.RETRY_GROUP, b"billing"))
    assert retry.due_ms(scheduled) == 250 == int(retry.headers_of(scheduled)[retry.RETRY_DUE])
    assert retry.is_for(scheduled, "billing") and not retry.is_for(scheduled, "shipping")
    assert retry.due_ms(_record((retry.RETRY_DUE, b""))) == 0
