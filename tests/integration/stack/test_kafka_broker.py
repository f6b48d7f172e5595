"""Integration tests: a real single-node Kafka broker (KRaft) started from Maven jars.

Needs java and mvn (jars are cached in $SCOPEWATCH_CACHE_DIR or ~/.cache/scopewatch).
One broker is shared by the tests of this module and always stopped in teardown.
"""

from __future__ import annotations

import asyncio
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from scopewatch.stack import proc
from scopewatch.stack.kafka import (
    BrokerFailed,
    KafkaBroker,
    KafkaConfig,
    PortInUse,
    create_topics,
    default_cache_dir,
    ensure_kafka_jars,
    list_topics,
    start_broker,
)
from support.procs import gone

pytestmark = [
    pytest.mark.integration,
    pytest.mark.timeout(180),
]


def _processes_mentioning(text: str) -> list[int]:
    """Live (non-zombie) pids whose command line contains ``text``."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline and not gone(int(entry.name)):
            found.append(int(entry.name))
    return found


def _two_free_ports() -> tuple[int, int]:
    a = proc.free_port()
    b = proc.free_port()
    while b == a:
        b = proc.free_port()
    return a, b


async def _produce(bootstrap: str, topic: str, value: bytes) -> None:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, value, key=b"k")
    finally:
        await producer.stop()


async def _consume_all(bootstrap: str, topic: str, partitions: int, timeout: float = 20.0) -> list[bytes]:
    """All values currently in ``topic`` (from the beginning, no consumer group)."""
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        values: list[bytes] = []
        while True:
            positions = [await consumer.position(tp) for tp in tps]
            if all(pos >= end[tp] for pos, tp in zip(positions, tps, strict=True)):
                break
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out reading {topic}: {values}")
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                values.extend(r.value for r in records if r.value is not None)
        return values
    finally:
        await consumer.stop()


@pytest.fixture(scope="module")
def libs() -> Path:
    return ensure_kafka_jars(default_cache_dir())


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, libs: Path) -> Iterator[KafkaBroker]:
    home = tmp_path_factory.mktemp("kafka-home")
    port, controller_port = _two_free_ports()
    started = time.monotonic()
    b = start_broker(home, default_cache_dir(), port=port, controller_port=controller_port)
    print(f"\nkafka broker ready in {time.monotonic() - started:.1f}s (format + start)")
    try:
        yield b
    finally:
        b.stop()


def test_broker_comes_up_from_nothing(broker: KafkaBroker) -> None:
    status = broker.status()
    assert status["running"] is True
    assert status["bootstrap"] == broker.config.bootstrap
    assert status["cluster_id"] and len(status["cluster_id"]) == 22
    record = broker.running_record()
    assert record is not None and record.pid == status["pid"]
    assert "kafka.Kafka" in record.argv
    assert "Kafka Server started" in broker.server_log.read_text()
    assert (broker.data_dir / "meta.properties").is_file()
    # Listens on loopback only.
    assert not proc.port_is_free("127.0.0.1", broker.config.port)
    # start() on a running home is a no-op returning the same pid.
    assert broker.start() == record.pid


def test_create_topics_is_idempotent(broker: KafkaBroker) -> None:
    bs = broker.config.bootstrap
    names = [f"sw-{uuid.uuid4().hex[:8]}", f"sw-{uuid.uuid4().hex[:8]}"]
    created = asyncio.run(create_topics(bs, names, partitions=3, configs={"retention.ms": "3600000"}))
    assert sorted(created) == sorted(names)
    assert asyncio.run(create_topics(bs, names, partitions=3)) == []
    extra = f"sw-{uuid.uuid4().hex[:8]}"
    assert asyncio.run(create_topics(bs, [*names, extra], partitions=1)) == [extra]
    topics = asyncio.run(list_topics(bs))
    assert set(names) | {extra} <= topics


async def _configs(bootstrap: str, names: list[str]) -> dict[str, dict[str, tuple[str | None, bool]]]:
    from aiokafka.admin import AIOKafkaAdminClient

    from stream_jobs.runtime.kafka_admin import topic_configs

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        return await topic_configs(admin, names)
    finally:
        await admin.close()


def test_the_policy_topic_is_kept_forever_when_created_and_when_it_already_existed(broker: KafkaBroker) -> None:
    """consent.policies is state: a time-retained policy version would make grants fail closed after a restart."""
    from schemas import Topics

    bs = broker.config.bootstrap
    fresh = Topics.with_prefix(f"t{uuid.uuid4().hex[:6]}.")
    asyncio.run(create_topics(bs, fresh.all(), 1, per_topic=fresh.configs()))
    got = asyncio.run(_configs(bs, [fresh.policies, fresh.grants]))
    assert got[fresh.policies]["retention.ms"] == ("-1", True)
    assert got[fresh.policies]["retention.bytes"] == ("-1", True)
    assert got[fresh.policies]["cleanup.policy"][0] == "delete"
    assert got[fresh.grants]["retention.ms"][1] is False  # other topics keep the broker's default

    # an existing deployment whose policy topic was created with the broker's 7-day retention
    old = Topics.with_prefix(f"t{uuid.uuid4().hex[:6]}.")
    asyncio.run(create_topics(bs, [old.policies], 1, configs={"max.message.bytes": "2000000"}))
    assert asyncio.run(_configs(bs, [old.policies]))[old.policies]["retention.ms"][1] is False
    assert asyncio.run(create_topics(bs, old.all(), 1, per_topic=old.configs())) != []
    got = asyncio.run(_configs(bs, [old.policies]))[old.policies]
    assert got["retention.ms"] == ("-1", True)
    assert got["max.message.bytes"] == ("2000000", True)  # the operator's own setting is kept


def test_produce_and_consume_one_message(broker: KafkaBroker) -> None:
    bs = broker.config.bootstrap
    topic = f"sw-pc-{uuid.uuid4().hex[:8]}"
    asyncio.run(create_topics(bs, [topic], partitions=1))
    asyncio.run(_produce(bs, topic, b"hello scopewatch"))
    assert asyncio.run(_consume_all(bs, topic, 1)) == [b"hello scopewatch"]


def test_port_in_use(tmp_path: Path, libs: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        taken = sock.getsockname()[1]
        for cfg, setting in (
            (
                KafkaConfig(tmp_path / "a", port=taken, controller_port=proc.free_port()),
                "KafkaConfig.port",
            ),
            (
                KafkaConfig(tmp_path / "b", port=proc.free_port(), controller_port=taken),
                "KafkaConfig.controller_port",
            ),
        ):
            b = KafkaBroker(cfg, libs)
            b.write_config()
            with pytest.raises(PortInUse) as info:
                b.start()
            assert info.value.port == taken
            assert str(taken) in str(info.value) and setting in str(info.value)
            assert b.running_record() is None


def test_broker_failed_on_corrupt_server_properties(tmp_path: Path, libs: Path) -> None:
    port, controller_port = _two_free_ports()
    b = KafkaBroker(KafkaConfig(tmp_path / "k", port=port, controller_port=controller_port), libs)
    b.write_config()
    b.format()
    with b.properties_path.open("a") as fh:
        fh.write("num.network.threads=not-a-number\n")
    b.start()
    try:
        with pytest.raises(BrokerFailed) as info:
            b.wait_ready(timeout=60)
    finally:
        b.stop()
    msg = str(info.value)
    assert "exited during startup" in msg
    assert "--- log tail ---" in msg and "num.network.threads" in msg
    assert info.value.log_tail


def test_broker_failed_on_bad_heap(tmp_path: Path) -> None:
    port, controller_port = _two_free_ports()
    with pytest.raises(BrokerFailed) as info:
        start_broker(tmp_path / "k", default_cache_dir(), port, controller_port, heap="lots", timeout=60)
    msg = str(info.value)
    assert "exited during startup" in msg
    assert "Invalid maximum heap size" in msg  # JVM's own complaint, from the console log
    assert _processes_mentioning(str(tmp_path / "k")) == []


def test_stop_leaves_nothing_and_restart_resumes(broker: KafkaBroker) -> None:
    bs = broker.config.bootstrap
    topic = f"sw-resume-{uuid.uuid4().hex[:8]}"
    asyncio.run(create_topics(bs, [topic], partitions=2))
    asyncio.run(_produce(bs, topic, b"survives restart"))
    record = broker.running_record()
    assert record is not None
    cluster_id = broker.cluster_id()

    started = time.monotonic()
    assert broker.stop() is True
    print(f"\nkafka broker stopped in {time.monotonic() - started:.1f}s")
    assert gone(record.pid)
    assert not proc.is_running(record)
    assert _processes_mentioning(str(broker.home)) == []
    assert not broker.pid_path.exists()
    assert broker.status()["running"] is False
    assert broker.stop() is False
    assert proc.port_is_free("127.0.0.1", broker.config.port)

    started = time.monotonic()
    resumed = start_broker(broker.home, default_cache_dir(), broker.config.port, broker.config.controller_port)
    print(f"kafka broker resumed in {time.monotonic() - started:.1f}s")
    new_record = resumed.running_record()
    assert new_record is not None and new_record.pid != record.pid
    assert resumed.cluster_id() == cluster_id
    assert topic in asyncio.run(list_topics(bs))
    assert asyncio.run(create_topics(bs, [topic], partitions=2)) == []
    assert asyncio.run(_consume_all(bs, topic, 2)) == [b"survives restart"]
