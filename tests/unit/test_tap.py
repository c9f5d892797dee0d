"""What `mesh tap` shows of one record (mesh.cli.events), without a broker."""

from __future__ import annotations

import json

import pytest
from pydantic import BaseModel

from mesh import Codec, Topic
from mesh.cli.events import _describe, _print_record
from mesh.kafka.base import Record


class Row(BaseModel):
    row_id: str
    carried: dict[str, bytes] | None = None


ROWS = Topic("tap.rows", Row, key="row_id")


async def test_a_row_keeping_header_bytes_that_are_not_utf8_is_shown_not_a_crash(
        capsys: pytest.CaptureFixture[str]) -> None:
    """Pass: a state row that kept a foreign header whose value is not UTF-8 (a
    pattern keeps an input's headers to carry them on) is tapped like any record: its
    payload shown, the bytes as bytes, and a JSON line that parses; a UTF-8 one as
    text."""
    codec = Codec()
    await codec.prepare([ROWS])
    rows = [Row(row_id="w1", carried={"tenant": b"\xff\xfeacme"}),
            Row(row_id="w2", carried={"tenant": b"acme"})]
    shown = []
    for offset, row in enumerate(rows):
        value, _ = codec.encode(ROWS, row)
        record = Record(ROWS.name, 0, offset, row.row_id.encode(), value, (), 0)
        info = await _describe(record, {ROWS.name: ROWS}, codec)
        _print_record(info, as_json=True)
        shown.append(json.loads(capsys.readouterr().out))
    assert [s["payload"]["carried"]["tenant"] for s in shown] == [
        str(b"\xff\xfeacme"), "acme"]
    assert "error" not in shown[0]
