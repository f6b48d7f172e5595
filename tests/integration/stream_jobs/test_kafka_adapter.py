"""The runner's aiokafka adapter against the real broker: lean records (the sink's) are the same messages.

``KafkaConsumer(lean_records=True)`` swaps aiokafka's per-message ``ConsumerRecord`` for a
``LeanRecord`` tuple by walking the fetched record batches itself. The test reads the same messages
(several producer batches per partition, compressed and not, keys and null values) with a plain
aiokafka consumer and with the lean adapter, in small ``max_records`` slices so a slice ends in the
middle of a record batch, pausing now and then (which drops the fetched buffers, so the next fetch
starts where the slice left the position), then seeks back: every message comes once, in order, with the same
topic, partition, offset, key and value, and the positions the fetcher keeps stay right.
"""

from __future__ import annotations

import asyncio
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from scopewatch.stack.kafka import KafkaBroker, create_topics
from stream_jobs.kafka_adapter import KafkaConsumer, LeanRecord
from stream_jobs.runner import TP

pytestmark = pytest.mark.integration

Row = tuple[str, int, int, bytes | None, bytes | None]


class _NoHooks:
    async def assigned(self, tps: set[TP]) -> None:
        return None

    async def revoked(self, tps: set[TP]) -> None:
        return None


async def _produce(bootstrap: str, topic: str) -> int:
    sent = 0
    for compression in (None, "gzip"):
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, compression_type=compression, linger_ms=20)
        await producer.start()
        try:
            futures = []
            for i in range(700):
                key = None if i % 7 == 0 else f"k{i}".encode()
                value = None if i % 50 == 3 and key is not None else f"{compression}-{i}-".encode() * (1 + i % 5)
                futures.append(await producer.send(topic, value, key=key, partition=i % 2))
            await asyncio.gather(*futures)
            sent += len(futures)
        finally:
            await producer.stop()
    return sent


async def _plain(bootstrap: str, topic: str, n: int) -> list[Row]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    try:
        consumer.assign([TopicPartition(topic, 0), TopicPartition(topic, 1)])
        out: list[Row] = []
        while len(out) < n:
            for records in (await consumer.getmany(timeout_ms=2000)).values():
                out += [(r.topic, r.partition, r.offset, r.key, r.value) for r in records]
        return out
    finally:
        await consumer.stop()


async def _lean(bootstrap: str, topic: str, n: int) -> tuple[list[Row], int, list[Row]]:
    adapter = KafkaConsumer(bootstrap, f"lean-{uuid.uuid4().hex[:8]}", [topic], lean_records=True)
    await adapter.start(_NoHooks())
    try:
        out: list[Row] = []
        lean = rounds = 0
        while len(out) < n:
            rounds += 1
            await asyncio.sleep(0.05)  # let the fetcher buffer the next fetch (those buffers are made lean)
            for records in (await adapter.getmany(timeout_ms=2000, max_records=37)).values():
                lean += sum(type(r) is LeanRecord for r in records)
                out += [(r.topic, r.partition, r.offset, r.key, r.value) for r in records]
            if rounds % 6 == 5:
                # a pause drops the fetched buffers: the next fetch starts at the position the slice left
                tps = adapter.assignment()
                adapter.pause(tps)
                assert await adapter.getmany(timeout_ms=0, max_records=37) == {}
                adapter.resume(tps)
        adapter.seek((topic, 1), 100)
        again: list[Row] = []
        while len(again) < 10:
            for records in (await adapter.getmany(timeout_ms=2000, max_records=10)).values():
                again += [(r.topic, r.partition, r.offset, r.key, r.value) for r in records]
        return out, lean, again
    finally:
        await adapter.stop()


def test_lean_records_are_the_messages_aiokafka_gives(kafka_broker: KafkaBroker, tmp_path: Path) -> None:
    bootstrap = kafka_broker.config.bootstrap
    topic = f"lean-{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        await create_topics(bootstrap, [topic], 2)
        n = await _produce(bootstrap, topic)
        plain = await _plain(bootstrap, topic, n)
        lean, lean_count, again = await _lean(bootstrap, topic, n)
        assert len(lean) == n
        assert sorted(lean) == sorted(plain)
        for partition in (0, 1):
            offsets = [r[2] for r in lean if r[1] == partition]
            assert offsets == list(range(len(offsets))), "each partition once, in offset order"
        # buffers fetched while a getmany waits come as ConsumerRecords; those already buffered come lean
        assert lean_count >= n // 2, "buffered records took the lean path"
        by_offset = {(r[1], r[2]): r for r in plain}
        assert again[:10] == [by_offset[(1, o)] for o in range(100, 110)], "a seek re-reads from there"

    asyncio.run(scenario())
