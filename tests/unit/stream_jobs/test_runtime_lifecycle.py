"""Log-repeat limiting and the bounded stop of long-running services (stream_jobs.runtime.lifecycle)."""

from __future__ import annotations

import logging
import threading

import pytest

from stream_jobs.runtime.lifecycle import (
    EXIT_UNFINISHED_STOP,
    KafkaUnreachable,
    RepeatFilter,
    StopTimer,
    wait_for_kafka,
)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(name: str, msg: str, *args: object, level: int = logging.ERROR) -> logging.LogRecord:
    return logging.LogRecord(name, level, __file__, 1, msg, args, None)


def test_first_of_a_kind_passes_then_one_per_window_carrying_the_count() -> None:
    clock = Clock()
    limiter = RepeatFilter(window=30.0, clock=clock)
    msg = "Unable connect to node with id %s: %s"
    assert limiter.filter(record("aiokafka", msg, 1, "refused"))
    passed = 0
    for i in range(500):
        clock.now += 0.05  # 25 s of a flood at 20 lines/s
        passed += limiter.filter(record("aiokafka", msg, i, "refused"))
    assert passed == 0 and limiter.suppressed == 500
    clock.now = 1030.0  # 30 s after the first one
    late = record("aiokafka", msg, 9, "refused")
    assert limiter.filter(late)
    assert late.getMessage() == "Unable connect to node with id 9: refused [and 500 more like this in the last 30s]"
    # the window starts again from that record
    clock.now += 1.0
    assert not limiter.filter(record("aiokafka", msg, 10, "refused"))


def test_kinds_are_logger_level_and_template() -> None:
    limiter = RepeatFilter(window=30.0, clock=Clock())
    assert limiter.filter(record("aiokafka", "Unable to update metadata from %s", [1]))
    assert limiter.filter(record("aiokafka.consumer.fetcher", "Unable to update metadata from %s", [1]))
    assert limiter.filter(record("aiokafka", "Unable to update metadata from %s", [1], level=logging.WARNING))
    assert limiter.filter(record("aiokafka", "Failed fetch messages from %s: %s", 1, "x"))
    assert not limiter.filter(record("aiokafka", "Unable to update metadata from %s", [2]))


def test_scopewatch_and_other_loggers_are_never_limited() -> None:
    limiter = RepeatFilter(clock=Clock())
    for _ in range(3):
        assert limiter.filter(record("scopewatch.sink", "dead letter %s[%d]@%d: %s", "t", 0, 1, "bad"))
        assert limiter.filter(record("aiokafkaesque", "same"))  # a prefix of a name is not its package
    assert limiter.filter(record("faust.transport", "x")) and not limiter.filter(record("faust.transport", "x"))
    assert limiter.filter(record("mode.services", "x")) and not limiter.filter(record("mode.services", "x"))


def test_remembered_kinds_are_bounded() -> None:
    limiter = RepeatFilter(clock=Clock(), max_kinds=8)
    for i in range(100):
        assert limiter.filter(record("kafka", f"message {i}"))
    assert len(limiter._kinds) == 8
    assert limiter.filter(record("kafka", "message 0"))  # forgotten: passes again
    assert not limiter.filter(record("kafka", "message 99"))


def test_stop_timer_exits_with_its_code_once_the_time_is_up() -> None:
    exited: list[int] = []
    done = threading.Event()

    def fake_exit(code: int) -> None:
        exited.append(code)
        done.set()

    timer = StopTimer(0.05, "sink", exit=fake_exit)
    assert not timer.fired.is_set()
    timer.arm()
    timer.arm()  # a second signal does not start a second timer
    assert done.wait(5)
    assert exited == [EXIT_UNFINISHED_STOP] and timer.fired.is_set()
    done.clear()
    assert not done.wait(0.2)  # exactly one exit


def test_stop_timer_does_nothing_until_armed() -> None:
    exited: list[int] = []
    StopTimer(0.01, "worker", exit=exited.append)
    threading.Event().wait(0.1)
    assert exited == []


class FakeKafka:
    """A probe that fails ``down`` times, then answers; a clock that moves only when slept."""

    def __init__(self, down: int) -> None:
        self.down = down
        self.now = 0.0
        self.sleeps: list[float] = []

    def probe(self, bootstrap: str) -> str | None:
        assert bootstrap == "k:9092"
        if self.down:
            self.down -= 1
            return "KafkaConnectionError: Unable to bootstrap"
        return None

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def wait(kafka: FakeKafka, timeout: float) -> None:
    wait_for_kafka("k:9092", "sink", timeout, probe=kafka.probe, clock=lambda: kafka.now, sleep=kafka.sleep)


def test_a_service_waits_for_kafka_with_backoff(caplog: pytest.LogCaptureFixture) -> None:
    kafka = FakeKafka(down=0)
    wait(kafka, 300)
    assert kafka.sleeps == [] and not caplog.records
    kafka = FakeKafka(down=12)
    with caplog.at_level(logging.INFO, logger="scopewatch.runtime"):
        wait(kafka, 300)
    assert kafka.sleeps == [0.5, 1, 2, 4, 5, 5, 5, 5, 5, 5, 5, 5]
    messages = [r.getMessage() for r in caplog.records]
    assert messages[0] == "sink: waiting for Kafka at k:9092 (KafkaConnectionError: Unable to bootstrap)"
    assert len([m for m in messages if "waiting" in m]) == 2  # at 0 s and again after 30 s, not per attempt
    assert messages[-1] == "sink: Kafka at k:9092 answers after 48s"


def test_a_service_gives_up_on_kafka_after_its_wait() -> None:
    kafka = FakeKafka(down=1000)
    with pytest.raises(KafkaUnreachable, match=r"sink: Kafka at k:9092 did not answer in 20s \(KafkaConnectionError"):
        wait(kafka, 20)
    assert sum(kafka.sleeps) == 20  # the last sleep is cut to the time left
