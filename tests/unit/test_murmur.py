"""mesh.kafka.murmur gives aiokafka's murmur2 for every key: keys must land where
every Kafka client puts them."""

from __future__ import annotations

import uuid

from aiokafka.partitioner import murmur2 as aiokafkas
from hypothesis import given, settings
from hypothesis import strategies as st

from mesh.kafka.murmur import murmur2


@settings(max_examples=500, deadline=None)
@given(data=st.binary(max_size=80))
def test_murmur2_is_aiokafkas(data: bytes) -> None:
    assert murmur2(data) == aiokafkas(data)


def test_murmur2_of_every_length_and_typical_keys() -> None:
    keys = [bytes(range(n)) for n in range(40)] + [b"\xff" * n for n in range(9)]
    keys += [str(uuid.uuid4()).encode() for _ in range(200)] + [b"k1", b"21", b""]
    for key in keys:
        assert murmur2(key) == aiokafkas(key), key
    assert murmur2(bytearray(b"abcde")) == aiokafkas(b"abcde")
