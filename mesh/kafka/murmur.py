"""Kafka's default partitioner hash, murmur2, as fast as pure Python gets it.

aiokafka's ``murmur2`` (the Java client's ``Utils.murmur2``, ported byte by byte) builds
every 4-byte word from four indexings and masks, about 6 µs for a 36-byte key (a UUID
correlation id, the audit topic's key). Here the words come from one
``struct.unpack_from``, the constants are locals and each step masks once: about
half of that. The result is
aiokafka's for every input (tests/unit/test_murmur.py), so keys land where every Kafka
client puts them.

Example:
    >>> murmur2(b"21")
    3321034988
    >>> (murmur2(b"21") & 0x7FFFFFFF) % 3  # the partition of key "21" of 3
    0
"""

from __future__ import annotations

import functools
import random
import struct

_SEED = 0x9747B28C
_M = 0x5BD1E995
_MASK = 0xFFFFFFFF
_WORDS: dict[int, struct.Struct] = {}  # little-endian 32-bit words, by count


def murmur2(data: bytes) -> int:
    """The unsigned 32-bit murmur2 hash of ``data`` (what aiokafka's gives)."""
    length = len(data)
    count = length >> 2
    words = _WORDS.get(count)
    if words is None:
        words = _WORDS[count] = struct.Struct(f"<{count}I")
    m, mask = _M, _MASK  # locals: the loop reads them twice per word
    h = _SEED ^ length
    for k in words.unpack_from(data):
        k = (k * m) & mask
        h = ((h * m) & mask) ^ (((k ^ (k >> 24)) * m) & mask)
    rest = length & 3
    if rest:
        tail = count << 2
        if rest == 3:
            h ^= data[tail + 2] << 16
        if rest >= 2:
            h ^= data[tail + 1] << 8
        h = ((h ^ data[tail]) * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    return h ^ (h >> 15)


@functools.lru_cache(maxsize=65_536)
def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives a record keyed ``key``.

    Remembered for the last 65,536 keys: murmur2 is pure Python (above, about 3 µs
    a key, half of aiokafka's) and a mesh sends the same keys over and over.
    """
    return int((murmur2(key) & 0x7FFFFFFF) % partitions)


def default_partitioner(key: bytes | None, all_partitions: list[int], available: list[int]) -> int:
    """aiokafka's default partitioner (murmur2 of the key; a random partition for no
    key) with :func:`partition_for`'s memory."""
    if key is None:
        return random.choice(available or all_partitions)
    return all_partitions[partition_for(key, len(all_partitions))]
