"""The publisher's healthy path on a real broker: records go to the producer as record batches.

Per key the records arrive in publish order, each exactly once; a record too large for a batch
goes alone and arrives too; a record Kafka refuses is skipped with a loss record, and the records
around it still arrive.
"""

from __future__ import annotations

import asyncio
import uuid
from collections import defaultdict
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from collectors.publisher import BackgroundPublisher
from collectors.spool import SpoolConfig
from scopewatch.stack.kafka import KafkaBroker, create_topics

pytestmark = pytest.mark.integration


async def _read_all(bootstrap: str, topics: list[str], partitions: int) -> list[tuple[str, bytes, bytes]]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, auto_offset_reset="earliest")
    await consumer.start()
    try:
        tps = [TopicPartition(t, p) for t in topics for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        out: list[tuple[str, bytes, bytes]] = []
        while [tp for tp, end in ends.items() if await consumer.position(tp) < end]:
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                out += [(r.topic, r.key, r.value) for r in records if r.key is not None and r.value is not None]
        return out
    finally:
        await consumer.stop()


def test_batched_records_arrive_once_in_order_per_key_around_a_large_and_a_refused_one(
    kafka_broker: KafkaBroker, tmp_path: Path
) -> None:
    bootstrap = kafka_broker.config.bootstrap
    run = uuid.uuid4().hex[:8]
    topics, loss_topic = [f"pb{run}.calls", f"pb{run}.results"], f"pb{run}.dead"
    asyncio.run(create_topics(bootstrap, [*topics, loss_topic], 3))
    publisher = BackgroundPublisher(bootstrap, spool=SpoolConfig(tmp_path / "spool", loss_topic=loss_topic)).start()
    sent: list[tuple[str, bytes, bytes]] = []
    records = []
    for i in range(3000):
        topic, key = topics[i % 2], f"session-{i % 7}".encode()
        value = f"{i}:".encode() + (b"x" * (200 << 10) if i == 1234 else b"")  # larger than a record batch
        records.append((topic, key, value))
    refused = (topics[0], b"session-0", b"r" * (3 << 20))  # over the broker's message size limit
    for start in range(0, 3000, 250):
        chunk = records[start : start + 250]
        if start == 1500:
            chunk = [*chunk[:100], refused, *chunk[100:]]
        assert publisher.publish_many(chunk) == len(chunk)
        sent += [r for r in chunk if r is not refused]
    stats = publisher.close(timeout=60)
    assert (stats.sent, stats.lost_poison, stats.lost_at_close, stats.spooled_at_close) == (3000, 1, 0, 0)
    got = asyncio.run(_read_all(bootstrap, topics, 3))
    by_key: dict[tuple[str, bytes], list[bytes]] = defaultdict(list)
    for topic, key, value in sent:
        by_key[(topic, key)].append(value)
    arrived: dict[tuple[str, bytes], list[bytes]] = defaultdict(list)
    for topic, key, value in got:
        arrived[(topic, key)].append(value)
    assert arrived == by_key  # every record once, in publish order per key
    losses = asyncio.run(_read_all(bootstrap, [loss_topic], 3))
    assert len(losses) == 1
