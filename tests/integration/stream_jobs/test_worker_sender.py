"""The decision worker's output path against the real broker: each stage (and the tick timer)
collects into its own buffer and a flush waits for exactly its own messages.

With one buffer shared by both stages, stage 2's flush would send (and stage 1 would then ack its
events before) messages stage 1 had collected but whose acknowledgement stage 1 never awaited;
stage 1's own flush would then find nothing and return no changelog ends.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from integration.conftest import make_settings

from scopewatch.stack.kafka import KafkaBroker, create_topics
from stream_jobs.app import FETCH_MIN_BYTES, FETCH_WAIT_MS, BatchProducer, Sender, create_app

pytestmark = pytest.mark.integration


async def end_offsets(bootstrap: str, topic: str, partitions: int) -> dict[int, int]:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await consumer.start()
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        ends = await consumer.end_offsets(tps)
        return {tp.partition: end for tp, end in ends.items()}
    finally:
        await consumer.stop()


def test_each_sender_flushes_and_waits_for_its_own_messages_only(
    kafka_broker: KafkaBroker, cache_dir: Path, tmp_path: Path
) -> None:
    settings = make_settings(tmp_path, kafka_broker.config.bootstrap, cache_dir)
    bootstrap = settings.kafka_bootstrap
    one, two = f"{settings.worker_group}-a-changelog", f"{settings.worker_group}-b-changelog"

    async def scenario() -> None:
        await create_topics(bootstrap, [one, two], 2, configs={"cleanup.policy": "compact"})
        counters: Counter[str] = Counter()
        producer = BatchProducer(bootstrap, counters)
        first, second = Sender(producer, settings, counters), Sender(producer, settings, counters)
        try:
            for i in range(5):
                first.changelog(one, f"k{i}", b"v", 1)
            second.changelog(two, "k", b"v", 0)
            ends = await second.flush()
            assert ends == {(two, 0): 1}, "the second sender's flush carried only its own message"
            assert first.pending() == 5
            assert await end_offsets(bootstrap, one, 2) == {0: 0, 1: 0}, "nothing of the first is sent yet"
            ends = await first.flush()
            assert ends == {(one, 1): 5}, "the first sender's flush returns the ends of its own writes"
            assert first.pending() == 0
            assert await end_offsets(bootstrap, one, 2) == {0: 0, 1: 5}
            assert await first.flush() == {}
            assert counters["messages_sent"] == 6
            assert producer.sent_to == {one: 5, two: 1}  # the worker's stats: messages per topic
            assert counters["produce_flushes"] == 2 and counters["record_batches_sent"] == 2
        finally:
            await producer.stop()

    asyncio.run(scenario())


def test_the_worker_gives_each_stage_its_own_sender_over_one_producer(
    kafka_broker: KafkaBroker, cache_dir: Path, tmp_path: Path
) -> None:
    app = create_app(make_settings(tmp_path, kafka_broker.config.bootstrap, cache_dir))
    stage1, stage2 = app.scopewatch_stages  # type: ignore[attr-defined]
    assert stage1.sender is not stage2.sender
    assert stage1.sender.producer is stage2.sender.producer


def test_the_worker_consumer_fetches_wait_for_bytes_in_the_broker(
    kafka_broker: KafkaBroker, cache_dir: Path, tmp_path: Path
) -> None:
    """Faust's aiokafka consumer would fetch with aiokafka's 1-byte minimum (a request every few
    messages); the worker's waits for FETCH_MIN_BYTES or FETCH_WAIT_MS."""
    app = create_app(make_settings(tmp_path, kafka_broker.config.bootstrap, cache_dir))
    thread = app.consumer._new_consumer_thread()

    async def build() -> Any:  # aiokafka consumers are made inside a running loop
        return thread._create_worker_consumer(app.transport)

    aio = asyncio.run(build())
    assert (aio._fetch_min_bytes, aio._fetch_max_wait_ms) == (FETCH_MIN_BYTES, FETCH_WAIT_MS)
    assert FETCH_MIN_BYTES > 1
