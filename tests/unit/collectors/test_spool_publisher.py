"""The publisher's spool path with no broker at all: spooling, adoption, full spool, loss records."""

from __future__ import annotations

import base64
import json
import logging
import threading
import time
from pathlib import Path

import pytest

from collectors.publisher import BackgroundPublisher, PublisherError
from collectors.spool import KIND_EVENT, KIND_LOSS, SpoolConfig, inspect_spool, read_pending
from schemas import DeadLetter, decode

NOWHERE = "127.0.0.1:9"  # nothing listens on the discard port: connection refused


@pytest.fixture(autouse=True)
def _quiet_kafka() -> None:
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


@pytest.fixture(autouse=True, params=["rdkafka", "aiokafka"])
def client(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test on both Kafka clients, chosen as collectors choose it: SCOPEWATCH_PUBLISHER_CLIENT."""
    monkeypatch.setenv("SCOPEWATCH_PUBLISHER_CLIENT", request.param)
    return str(request.param)


def test_the_client_setting_picks_the_publisher(tmp_path: Path, client: str) -> None:
    from collectors.publisher_rdkafka import RdkafkaPublisher

    publisher = BackgroundPublisher(NOWHERE, spool=SpoolConfig(tmp_path / "spool"))
    assert publisher.client == client
    assert isinstance(publisher, RdkafkaPublisher) == (client == "rdkafka")
    other = "aiokafka" if client == "rdkafka" else "rdkafka"
    explicit = BackgroundPublisher(NOWHERE, spool=SpoolConfig(tmp_path / "spool2"), client=other)
    assert explicit.client == other and isinstance(explicit, RdkafkaPublisher) == (other == "rdkafka")
    with pytest.raises(PublisherError, match="unknown publisher client"):
        BackgroundPublisher(NOWHERE, spool=SpoolConfig(tmp_path / "spool3"), client="kafka-python")


def _pending(spool_dir: Path) -> list[tuple[int, str, bytes | None, bytes]]:
    report = inspect_spool(spool_dir)
    return [(e.kind, e.topic, e.key, e.value) for s in report.segments for e in read_pending(s.path)]


def _wait(predicate: object, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def test_events_spool_in_publish_order_when_kafka_is_unreachable(tmp_path: Path) -> None:
    config = SpoolConfig(tmp_path / "spool", fsync="always")
    publisher = BackgroundPublisher(NOWHERE, spool=config).start()
    for i in range(300):
        assert publisher.publish("calls", f"session-{i % 3}".encode(), f"{i}".encode())
    _wait(lambda: publisher.stats.spooled == 300)
    stats = publisher.close(timeout=0.5)
    assert (stats.sent, stats.spooled, stats.spooled_at_close, stats.lost_at_close) == (0, 300, 300, 0)
    assert stats.degraded == 1 and "connect" in (stats.last_error or "")
    records = _pending(config.dir)
    assert [r[3] for r in records] == [f"{i}".encode() for i in range(300)]
    assert {r[0] for r in records} == {KIND_EVENT}


def test_the_next_publisher_adopts_what_a_dead_one_left(tmp_path: Path) -> None:
    config = SpoolConfig(tmp_path / "spool")
    first = BackgroundPublisher(NOWHERE, spool=config).start()
    for i in range(10):
        first.publish("calls", b"s", f"old-{i}".encode())
    first.close(timeout=0.5)
    second = BackgroundPublisher(NOWHERE, spool=config).start()
    second.publish("calls", b"s", b"new")
    _wait(lambda: second.stats.spooled == 1)
    stats = second.close(timeout=0.5)
    assert stats.adopted == 10
    assert [r[3] for r in _pending(config.dir)] == [*(f"old-{i}".encode() for i in range(10)), b"new"]


def test_a_full_spool_fails_closed_and_records_the_loss(tmp_path: Path) -> None:
    config = SpoolConfig(tmp_path / "spool", max_bytes=64 * 1024, on_full="fail", loss_topic="t.audit.dead-letter")
    publisher = BackgroundPublisher(NOWHERE, spool=config, max_queued=20, client_id="wrap-test").start()
    accepted = 0
    while publisher.publish("calls", b"s", b"x" * 1000):  # a burst: memory fills faster than the thread spools
        accepted += 1
    assert publisher.stats.spool_full  # refused only once the spool itself is full, not when memory is
    for _ in range(9):
        assert not publisher.publish("calls", b"s", b"x" * 1000)  # fail closed: at once
    stats = publisher.close(timeout=0.5)
    assert stats.lost_queue_full == 10 and stats.loss_records >= 1
    records = _pending(config.dir)
    events = [r for r in records if r[0] == KIND_EVENT]
    assert len(events) + stats.lost_at_close == accepted
    losses = [r for r in records if r[0] == KIND_LOSS]
    assert losses and all(r[1] == "t.audit.dead-letter" and r[2] == b"wrap-test" for r in losses)
    letters = [decode(r[3]) for r in losses]
    assert all(isinstance(d, DeadLetter) and d.stage == "collector" for d in letters)
    details = [json.loads(base64.b64decode(d.payload_b64)) for d in letters if isinstance(d, DeadLetter)]
    assert sum(d["lost"] for d in details) == stats.lost_queue_full + stats.lost_at_close
    assert all(d["topic"] == "calls" for d in details)
    assert sum(d["reasons"].get("spool full", 0) for d in details) == 10


def test_a_full_spool_blocks_the_caller_until_the_block_timeout(tmp_path: Path) -> None:
    config = SpoolConfig(tmp_path / "spool", max_bytes=64 * 1024, on_full="block", block_timeout=0.3)
    publisher = BackgroundPublisher(NOWHERE, spool=config, max_queued=5).start()
    outcomes: list[tuple[bool, float]] = []
    for _ in range(120):
        started = time.monotonic()
        outcomes.append((publisher.publish("calls", b"s", b"z" * 1000), time.monotonic() - started))
        if not outcomes[-1][0]:
            break
    stats = publisher.close(timeout=0.5)
    ok, waited = outcomes[-1]
    assert not ok and waited >= 0.29  # it waited for room, then gave up: a counted, recorded loss
    assert stats.blocked >= 1 and stats.lost_queue_full == 1
    # what was still in memory at close had no room in the spool either: lost, and said so too
    assert stats.lost_at_close == 5
    losses = [decode(r[3]) for r in _pending(config.dir) if r[0] == KIND_LOSS]
    lost = [json.loads(base64.b64decode(d.payload_b64))["lost"] for d in losses if isinstance(d, DeadLetter)]
    assert sum(lost) == 6


def test_a_blocked_caller_is_released_when_the_publisher_closes(tmp_path: Path) -> None:
    config = SpoolConfig(tmp_path / "spool", max_bytes=64 * 1024, on_full="block")
    publisher = BackgroundPublisher(NOWHERE, spool=config, max_queued=5).start()
    done = threading.Event()

    def flood() -> None:
        while publisher.publish("calls", b"s", b"q" * 1000):
            pass
        done.set()

    thread = threading.Thread(target=flood, daemon=True)
    thread.start()
    _wait(lambda: publisher.stats.blocked >= 1)
    assert not done.is_set()
    publisher.close(timeout=0.2)
    assert done.wait(10)


def test_an_unusable_spool_directory_fails_at_start(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(PublisherError, match="cannot use the spool directory"):
        BackgroundPublisher(NOWHERE, spool=SpoolConfig(blocker / "spool")).start()


def test_bad_spool_settings_fail_at_construction(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCOPEWATCH_SPOOL_ON_FULL", "drop-silently")
    with pytest.raises(PublisherError, match="spool settings: on_full must be block or fail"):
        BackgroundPublisher(NOWHERE)


def test_nothing_published_leaves_no_files(tmp_path: Path) -> None:
    config = SpoolConfig(tmp_path / "spool")
    publisher = BackgroundPublisher(NOWHERE, spool=config).start()
    stats = publisher.close(timeout=0.5)
    assert stats.spooled_at_close == 0
    assert list(config.dir.iterdir()) == []


def test_publish_many_queues_in_order_with_one_wake_up(tmp_path: Path) -> None:
    config = SpoolConfig(tmp_path / "spool")
    publisher = BackgroundPublisher(NOWHERE, spool=config).start()
    _wait(lambda: publisher.stats.degraded == 1)  # cannot connect: spooling
    _wait(lambda: publisher._sleeping)
    pokes: list[None] = []
    poke = publisher._poke

    def counted() -> None:
        pokes.append(None)
        poke()

    publisher._poke = counted  # type: ignore[method-assign]
    assert publisher.publish_many([("calls", b"s", f"{i}".encode()) for i in range(50)]) == 50
    assert len(pokes) == 1  # one hand-over, one wake-up (not one per record)
    assert publisher.publish("calls", b"s", b"50")
    _wait(lambda: publisher.stats.spooled == 51)
    stats = publisher.close(timeout=0.5)
    assert (stats.queued, stats.lost_at_close, stats.lost_queue_full) == (51, 0, 0)
    assert [r[3] for r in _pending(config.dir)] == [f"{i}".encode() for i in range(51)]


def test_publish_many_larger_than_memory_waits_for_the_spool_and_keeps_the_order(tmp_path: Path) -> None:
    config = SpoolConfig(tmp_path / "spool", on_full="block")
    publisher = BackgroundPublisher(NOWHERE, spool=config, max_queued=5).start()
    started = time.monotonic()
    assert publisher.publish_many([("calls", b"s", f"{i}".encode()) for i in range(200)]) == 200
    assert time.monotonic() - started < 10
    _wait(lambda: publisher.stats.spooled == 200)
    stats = publisher.close(timeout=0.5)
    assert stats.blocked >= 1 and stats.lost_queue_full == 0
    assert [r[3] for r in _pending(config.dir)] == [f"{i}".encode() for i in range(200)]


def test_publish_many_on_a_full_spool_fails_closed_per_record(tmp_path: Path) -> None:
    config = SpoolConfig(tmp_path / "spool", max_bytes=64 * 1024, on_full="fail")
    publisher = BackgroundPublisher(NOWHERE, spool=config, max_queued=20).start()
    accepted = publisher.publish_many([("calls", b"s", b"x" * 1000) for _ in range(200)])
    assert 0 < accepted < 200 and publisher.stats.spool_full
    stats = publisher.close(timeout=0.5)
    assert stats.lost_queue_full == 200 - accepted  # every refused record is a counted loss
    events = [r for r in _pending(config.dir) if r[0] == KIND_EVENT]
    assert len(events) + stats.lost_at_close == accepted
