"""Our murmur2 equals Kafka's (aiokafka's port of the Java client's) on every length and byte."""

from __future__ import annotations

import random

from aiokafka.partitioner import murmur2

from schemas.topics import murmur2_fast, partition_for


def test_murmur2_fast_equals_kafkas_murmur2() -> None:
    rng = random.Random(16)
    for length in range(70):
        for _ in range(50):
            data = bytes(rng.getrandbits(8) for _ in range(length))
            assert murmur2_fast(data) == murmur2(data), data
    for data in (b"", b"\xff" * 9, b"acme/user@example.com/agent"):
        assert murmur2_fast(data) == murmur2(data)


def test_partition_for_is_kafkas_default_partitioner() -> None:
    # known values of the Java client's partitioner (murmur2, positive, modulo)
    for key in (b"a", b"session-1", b"acme/alice/claude"):
        assert partition_for(key, 7) == (murmur2(key) & 0x7FFFFFFF) % 7
