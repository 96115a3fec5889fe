"""bus/kafka.py's key_partitioner: the partition aiokafka's DefaultPartitioner (Kafka's own
murmur2 rule) picks, so a conversation's records land where they always did."""

from __future__ import annotations

import random

from aiokafka.partitioner import DefaultPartitioner

from bus.kafka import key_partitioner


def test_a_keyed_record_goes_where_the_default_partitioner_sends_it() -> None:
    rng = random.Random(7)
    default = DefaultPartitioner()
    for n in (1, 2, 3, 6, 12, 64):
        parts = list(range(n))
        for _ in range(500):
            key = f"d:user_{rng.randrange(10**6)}:user_{rng.randrange(10**6)}".encode()
            assert key_partitioner(key, parts, parts) == default(key, parts, parts)
            assert key_partitioner(key, parts, parts) == default(key, parts, parts)  # kept hash


def test_a_record_without_a_key_goes_to_an_available_partition() -> None:
    assert {key_partitioner(None, [0, 1, 2, 3], [2]) for _ in range(20)} == {2}
    assert key_partitioner(None, [0, 1], []) in (0, 1)
