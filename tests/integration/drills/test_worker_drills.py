"""Scale-out drills: several decision workers in one group, killed and restarted under load.

Each drill runs a whole stack of its own (``scopewatch up --workers N`` with the production
topic names on its own broker), publishes stories in the background, and then checks against
``scopewatch replay`` over everything it published: 0 calls lost, 0 duplicated, final verdicts
and findings equal. Before the co-partitioning assignor, two workers gave wrong final verdicts
(partition p of the calls and of the grants on different workers); before durable rule state,
a killed worker's sequence findings were lost.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from support.drills import Drill, sequence_story
from support.pipeline import stack_env
from support.procs import gone

pytestmark = pytest.mark.integration

GRACE = "15"  # every fact of the drills arrives well within it, also across a restart
GRACE_WAIT = float(GRACE) + 5
STAGE_TOPICS = ("mcp.tool-calls", "identity.sessions", "scopewatch.calls-by-route", "consent.grants")


def _stack(tmp_path: Path, cache_dir: Path, workers: int) -> Drill:
    env = stack_env(
        tmp_path / "home",
        cache_dir,
        kafka_heap="512m",
        partitions="4",
        grace_seconds=GRACE,
        stop_seconds="5",
    )
    env["COLUMNS"] = "400"  # one line per report: rich wraps at 80 columns otherwise
    drill = Drill(env, tmp_path)
    up = drill.cli("up", "--workers", str(workers))
    assert up.returncode == 0, up.stderr
    # `up` reports a worker once it holds its share of the partitions, not merely once it runs
    assert up.stderr.count("holds ") == workers, up.stderr
    return drill


def _held(drill: Drill, pid: int, timeout: float) -> float:
    """Seconds until the worker ``pid`` reports partitions of both stages; AssertionError after timeout."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        a = drill.assignment(pid)
        if a and a.get("ok") and len(a.get("held", {})) >= 4:
            return time.monotonic() - started
        time.sleep(0.1)
    raise AssertionError(f"worker {pid} holds no partitions {timeout}s after its start: {drill.assignment(pid)}")


def _every_partition_held_once(drill: Drill, names: list[str]) -> None:
    seen: list[tuple[str, int]] = []
    for name in names:
        a = drill.assignment(drill.worker_pid(name))
        assert a is not None and a["ok"], (name, a)
        seen += [(t, p) for t, ps in a["held"].items() if t in STAGE_TOPICS for p in ps]
    assert sorted(seen) == sorted((t, p) for t in STAGE_TOPICS for p in range(4)), seen


def test_two_workers_one_killed_mid_load_then_restarted(tmp_path: Path, cache_dir: Path) -> None:
    drill = _stack(tmp_path, cache_dir, workers=2)
    try:
        _every_partition_held_once(drill, ["worker", "worker2"])
        halves = [sequence_story(f"kq{i}") for i in range(12)]
        drill.publish([e for first, _ in halves for e in first])
        load = drill.load("kl", stories=8, pause=0.5)
        time.sleep(GRACE_WAIT)  # the first halves are final and their rule state is written
        victim = drill.worker_pid("worker2")
        os.kill(victim, signal.SIGKILL)
        while not gone(victim):
            time.sleep(0.05)
        started = time.monotonic()
        up = drill.cli("up", "--workers", "2")  # the same slot: static membership reclaims it at once
        assert up.returncode == 0, up.stderr
        took = time.monotonic() - started
        assert took < 15, f"the restarted worker took {took:.1f}s to hold partitions (session timeout is 30 s)"
        _every_partition_held_once(drill, ["worker", "worker2"])
        drill.publish([e for _, second in halves for e in second])
        load.join(timeout=120)
        drill.assert_equals_replay()
        # the killed worker's stats file is gone (a restart removes those of dead processes)
        run = Path(drill.env["SCOPEWATCH_HOME"]) / "run"
        assert not list(run.glob(f"worker-*-{victim}.json"))
        log = (Path(drill.env["SCOPEWATCH_HOME"]) / "logs" / "worker2.log").read_text()
        assert "removed 1 stats files of stopped workers" in log and "partitions assigned:" in log
    finally:
        drill.cli("down")


def test_three_workers_rolling_restart_under_load(tmp_path: Path, cache_dir: Path) -> None:
    drill = _stack(tmp_path, cache_dir, workers=3)
    try:
        names = ["worker", "worker2", "worker3"]
        _every_partition_held_once(drill, names)
        halves = [sequence_story(f"rq{i}") for i in range(9)]
        drill.publish([e for first, _ in halves for e in first])
        load = drill.load("rl", stories=12, pause=1.0)
        for name in names:  # each leaves (orderly stop) and joins again while stories arrive
            pid = drill.worker_pid(name)
            os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + 20
            while not gone(pid) and time.monotonic() < deadline:
                time.sleep(0.05)
            assert gone(pid), f"{name} still running 20 s after SIGTERM"
            up = drill.cli("up", "--workers", "3")
            assert up.returncode == 0, up.stderr
            assert _held(drill, drill.worker_pid(name), 15) < 15
        _every_partition_held_once(drill, names)
        drill.publish([e for _, second in halves for e in second])
        load.join(timeout=120)
        drill.assert_equals_replay()
        home = Path(drill.env["SCOPEWATCH_HOME"])
        for name in names:
            log = (home / "logs" / f"{name}.log").read_text()
            assert "decision worker stopped (exit 0)" in log and "partitions revoked:" in log
    finally:
        drill.cli("down")
