"""A decision worker refuses an assignment that is not co-partitioned, and says why in one line.

The grants topic is created with 3 partitions against 2 for the stage's other input: partition p
of both can no longer be held together, so the worker must judge nothing and exit (78, EX_CONFIG)
instead of deciding calls on half the facts.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from integration.conftest import make_settings

from scopewatch.stack.kafka import KafkaBroker, create_topics
from stream_jobs.app import EXIT_NOT_COPARTITIONED
from support.wrap import child_env

pytestmark = pytest.mark.integration


def test_unequal_partition_counts_stop_the_worker_with_one_clear_line(
    tmp_path: Path, kafka_broker: KafkaBroker, cache_dir: Path
) -> None:
    settings = make_settings(tmp_path / "home", kafka_broker.config.bootstrap, cache_dir, kafka_wait_seconds=30)
    topics = settings.topics
    asyncio.run(create_topics(settings.kafka_bootstrap, [topics.grants], 3))
    asyncio.run(create_topics(settings.kafka_bootstrap, [t for t in topics.all() if t != topics.grants], 2))
    worker = subprocess.run(
        [sys.executable, "-m", "scopewatch", "worker"],
        env=child_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert worker.returncode == EXIT_NOT_COPARTITIONED, worker.stderr[-3000:]
    refusal = [line for line in worker.stderr.splitlines() if "is not co-partitioned (" in line]
    assert len(refusal) == 1, worker.stderr[-3000:]
    assert f"different partition counts: {topics.calls_by_route}=2, {topics.grants}=3" in refusal[0]
    assert "authorize: partition" not in worker.stderr  # no stage-2 state was even loaded: nothing judged
    assert not list(settings.run_dir.glob("worker-*.json"))  # and it left no stats file behind
