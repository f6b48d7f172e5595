"""Real services for the integration suites, started once per test session.

One Kafka broker (KRaft, loopback, free ports) and one pipeline (sink owning a fresh
chDB folder, decision worker) with topic names, consumer groups and data folders unique
to this session.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from scopewatch.stack import proc
from scopewatch.stack.kafka import KafkaBroker, start_broker
from scopewatch.stack.npm import server_everything_command
from scopewatch.stack.stack import Stack
from stream_jobs.runtime.settings import Settings


@pytest.fixture(scope="session")
def kafka_broker(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[KafkaBroker]:
    home = tmp_path_factory.mktemp("kafka")
    broker = start_broker(home, cache_dir, port=proc.free_port(), controller_port=proc.free_port())
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture(scope="session")
def server_everything(cache_dir: Path) -> list[str]:
    """Command line of the real @modelcontextprotocol/server-everything (stdio)."""
    return server_everything_command(cache_dir)


@contextmanager
def own_broker(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path, name: str) -> Iterator[KafkaBroker]:
    """A broker of one test module's own (its tests stop and start it), stopped at the end."""
    home = tmp_path_factory.mktemp(name)
    broker = start_broker(home, cache_dir, port=proc.free_port(), controller_port=proc.free_port(), heap="512m")
    try:
        yield broker
    finally:
        broker.stop()


def make_settings(home: Path, bootstrap: str, cache_dir: Path, **extra: object) -> Settings:
    run = uuid.uuid4().hex[:8]
    values: dict[str, object] = {
        "home": home,
        "cache_dir": cache_dir,
        "bootstrap": bootstrap,
        "topic_prefix": f"it{run}.",
        "partitions": 2,
        "query_port": proc.free_port(),
        "sink_batch_seconds": 0.2,
        "sink_group": f"it{run}-sink",
        "worker_group": f"it{run}-decisions",
        "grace_seconds": 3.0,
        "tick_seconds": 0.5,
        # Sequence rules count a delegation's calls in event-time order when they reach stage 2 less
        # than the slack apart (production: 0.5 s). On this shared 2-core machine under the other
        # tests' load, one story's calls reached the Faust engine's stage 2 more than 0.5 s apart
        # (1 run in 6 at load 4-5), and violation_burst fired on another call than replay's.
        "sequence_slack_seconds": 2.0,
    }
    values.update(extra)
    return Settings(**values)  # type: ignore[arg-type]


@pytest.fixture(scope="session")
def pipeline(
    tmp_path_factory: pytest.TempPathFactory, kafka_broker: KafkaBroker, cache_dir: Path
) -> Iterator[Settings]:
    """Sink + decision worker running against the session broker, on unique topics."""
    settings = make_settings(tmp_path_factory.mktemp("pipeline"), kafka_broker.config.bootstrap, cache_dir)
    stack = Stack(settings)
    stack.up(timeout=120)
    try:
        yield settings
    finally:
        stack.down()
