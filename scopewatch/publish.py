"""``scopewatch publish``: canonical JSONL events onto their Kafka topics, keyed, in file order."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterable

from aiokafka import AIOKafkaProducer

from schemas import Event, Topics, encode, key_for, topic_for
from scopewatch.jsonl import BadLine


async def publish_events(
    bootstrap: str, topics: Topics, items: Iterable[tuple[int, Event | BadLine]]
) -> tuple[Counter[str], list[BadLine]]:
    """Send every good event (one producer, so per-key order is file order); report bad lines."""
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    await producer.start()
    sent: Counter[str] = Counter()
    bad: list[BadLine] = []
    futures = []
    try:
        for _line_no, item in items:
            if isinstance(item, BadLine):
                bad.append(item)
                continue
            topic = topic_for(item, topics)
            futures.append(await producer.send(topic, value=encode(item), key=key_for(item).encode("utf-8")))
            sent[topic] += 1
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return sent, bad
