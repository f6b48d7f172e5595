"""The runner's librdkafka adapter (confluent-kafka) against the real broker.

It must give the runner exactly what the aiokafka adapter gives: every message once, in offset order,
with its topic, partition, offset, key and value, across pauses and seeks; explicit commits the group
keeps; the assigned/revoked hooks on a rebalance, with a revocation waiting for the runner; and no
deadlock when the runner polls while holding back a hook (a flush retried in place).
"""

from __future__ import annotations

import asyncio
import logging
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from scopewatch.stack import proc
from scopewatch.stack.kafka import KafkaBroker, create_topics
from stream_jobs.kafka_adapter import LeanRecord
from stream_jobs.rdkafka_adapter import RdKafkaConsumer
from stream_jobs.runner import TP

pytestmark = pytest.mark.integration

Row = tuple[str, int, int, bytes | None, bytes | None]


class Hooks:
    """The runner's hooks as the sink uses them: an assignment looks up the committed offsets, a revocation
    waits for the batch in flight (``gate``) and commits it (``commit_on_revoke``)."""

    def __init__(self, adapter: RdKafkaConsumer | None = None) -> None:
        self.adapter = adapter
        self.events: list[tuple[str, set[TP]]] = []
        self.gate: asyncio.Event | None = None
        self.commit_on_revoke: int | None = None
        self.seen_committed: dict[TP, int | None] = {}

    async def assigned(self, tps: set[TP]) -> None:
        if self.adapter is not None:
            for tp in sorted(tps):
                self.seen_committed[tp] = await self.adapter.committed(tp)
        self.events.append(("assigned", tps))

    async def revoked(self, tps: set[TP]) -> None:
        if self.gate is not None and tps:
            await self.gate.wait()
        if self.adapter is not None and self.commit_on_revoke is not None and tps:
            await self.adapter.commit({tp: self.commit_on_revoke for tp in tps})
        self.events.append(("revoked", tps))


async def _produce(bootstrap: str, topic: str, partitions: int = 2, per: int = 700) -> int:
    sent = 0
    for compression in (None, "gzip"):
        producer = AIOKafkaProducer(bootstrap_servers=bootstrap, compression_type=compression, linger_ms=20)
        await producer.start()
        try:
            futures = []
            for i in range(per):
                key = None if i % 7 == 0 else f"k{i}".encode()
                value = None if i % 50 == 3 and key is not None else f"{compression}-{i}-".encode() * (1 + i % 5)
                futures.append(await producer.send(topic, value, key=key, partition=i % partitions))
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


def _rows(batch: object) -> list[Row]:
    assert isinstance(batch, dict)
    out: list[Row] = []
    for tp, records in batch.items():
        for r in records:
            assert type(r) is LeanRecord and (r.topic, r.partition) == tp
            out.append((r.topic, r.partition, r.offset, r.key, r.value))
    return out


async def _wait_assigned(adapter: RdKafkaConsumer, count: int, timeout: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while len(adapter.assignment()) < count:
        assert asyncio.get_running_loop().time() < deadline, "no assignment"
        _rows(await adapter.getmany(200, 1))  # nothing is read before the seek below wants it


def test_every_message_once_in_order_across_pauses_and_seeks(kafka_broker: KafkaBroker) -> None:
    bootstrap = kafka_broker.config.bootstrap
    topic = f"rdk-{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        await create_topics(bootstrap, [topic], 2)
        n = await _produce(bootstrap, topic)
        plain = await _plain(bootstrap, topic, n)
        hooks = Hooks()
        adapter = RdKafkaConsumer(bootstrap, f"rdk-{uuid.uuid4().hex[:8]}", [topic])
        await adapter.start(hooks)
        try:
            await _wait_assigned(adapter, 2)
            for tp in adapter.assignment():
                adapter.seek(tp, 0)  # at once after the assignment (what a redo at start does)
            out: list[Row] = []
            rounds = 0
            while len(out) < n:
                rounds += 1
                out += _rows(await adapter.getmany(2000, 37))
                if rounds % 6 == 5:  # a pause: nothing comes; after it, reading goes on where it stopped
                    tps = adapter.assignment()
                    adapter.pause(tps)
                    assert _rows(await adapter.getmany(300, 37)) == []
                    adapter.resume(tps)
            assert len(out) == n and sorted(out) == sorted(plain)
            for partition in (0, 1):
                offsets = [r[2] for r in out if r[1] == partition]
                assert offsets == list(range(len(offsets))), "each partition once, in offset order"
            # seek back: read again from there
            adapter.seek((topic, 1), 100)
            again: list[Row] = []
            while len(again) < 10:
                again += _rows(await adapter.getmany(2000, 10))
            by_offset = {(r[1], r[2]): r for r in plain}
            assert again[:10] == [by_offset[(1, o)] for o in range(100, 110)]
            # explicit commits, read back
            await adapter.commit({(topic, 0): 5, (topic, 1): 110})
            assert await adapter.committed((topic, 0)) == 5
            assert await adapter.committed((topic, 1)) == 110
            lag = await adapter.lag()
            assert lag[topic] == n - 5 - 110
        finally:
            await adapter.stop()
        assert hooks.events[0] == ("assigned", {(topic, 0), (topic, 1)})
        assert hooks.events[-1] == ("revoked", {(topic, 0), (topic, 1)}), "close() hands the partitions back"

    asyncio.run(scenario())


def test_a_second_member_takes_partitions_and_the_revocation_waits_for_the_runner(kafka_broker: KafkaBroker) -> None:
    """The first member's revocation hook is held (as the runner's is while a batch flushes): its getmany
    returns nothing instead of deadlocking; once the hook may go on, it commits (from inside librdkafka's
    callback), and the group settles on disjoint halves whose new owner resumes from that commit."""
    bootstrap = kafka_broker.config.bootstrap
    topic = f"rdk-{uuid.uuid4().hex[:8]}"
    group = f"rdk-{uuid.uuid4().hex[:8]}"

    async def scenario() -> None:
        await create_topics(bootstrap, [topic], 4)
        first = RdKafkaConsumer(bootstrap, group, [topic], session_timeout=10)
        second = RdKafkaConsumer(bootstrap, group, [topic], session_timeout=10)
        first_hooks, second_hooks = Hooks(first), Hooks(second)
        await first.start(first_hooks)
        try:
            await _wait_assigned(first, 4)
            assert first_hooks.seen_committed == {(topic, p): None for p in range(4)}
            first_hooks.gate = asyncio.Event()
            first_hooks.commit_on_revoke = 0
            await second.start(second_hooks)
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            held_polls = 0
            while not any(kind == "revoked" for kind, _ in first_hooks.events):
                assert loop.time() < deadline, "never revoked"
                polls = asyncio.gather(first.getmany(100, 10), second.getmany(100, 10))
                started = loop.time()
                await polls
                assert loop.time() - started < 5, "getmany must not wait for a held hook"
                if first.assignment() and len(first_hooks.events) == 1:
                    held_polls += 1
                    if held_polls >= 3:
                        first_hooks.gate.set()  # the "batch in flight" committed: the hook goes on
            assert held_polls >= 3
            while len(first.assignment()) + len(second.assignment()) < 4 or not (
                first.assignment() and second.assignment()
            ):
                assert loop.time() < deadline, "the group never settled"
                await asyncio.gather(first.getmany(100, 10), second.getmany(100, 10))
            assert not first.assignment() & second.assignment()
            assert first.assignment() | second.assignment() == {(topic, p) for p in range(4)}
            assert ("revoked", {(topic, p) for p in range(4)}) in first_hooks.events
            assert second_hooks.events[-1] == ("assigned", second.assignment())
            # the revocation's commit landed before the partitions moved: the new owner sees it
            assert {second_hooks.seen_committed[tp] for tp in second.assignment()} == {0}
        finally:
            await asyncio.gather(first.stop(), second.stop())

    asyncio.run(scenario())


def test_library_logs_go_through_python_logging(caplog: pytest.LogCaptureFixture) -> None:
    """No broker on this port: librdkafka's complaint arrives as a record of the ``librdkafka`` logger."""
    port = proc.free_port()

    async def scenario() -> None:
        adapter = RdKafkaConsumer(f"127.0.0.1:{port}", "nobody", ["nothing"])
        await adapter.start(Hooks())
        try:
            deadline = asyncio.get_running_loop().time() + 20
            while not any(r.name == "librdkafka" for r in caplog.records):
                assert asyncio.get_running_loop().time() < deadline, "no library log record"
                assert await adapter.getmany(200, 10) == {}
        finally:
            await adapter.stop()

    with caplog.at_level(logging.INFO):
        asyncio.run(scenario())
    record = next(r for r in caplog.records if r.name == "librdkafka")
    assert record.levelno >= logging.INFO and str(port) in record.getMessage()
    assert record.msg == "FAIL [%s] %s", "the facility is in the format: the repeat filter limits each on its own"
