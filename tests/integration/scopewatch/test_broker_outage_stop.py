"""The services during a Kafka outage: their logs stay readable, a stop ends them, nothing is lost.

The broker of a real stack is SIGKILLed while the sink and the decision worker run. Before
``stream_jobs.runtime.lifecycle``, aiokafka logged a few hundred lines a second in each service, and each
ignored SIGTERM until ``scopewatch down`` SIGKILLed it 20 s later.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scopewatch.stack import proc
from support.pipeline import cli_env as cli
from support.pipeline import stack_env
from support.procs import gone
from support.scenario import jsonl, story

pytestmark = pytest.mark.integration

STOP_SECONDS = 3.0
OUTAGE_SECONDS = 8.0


def sql(env: dict[str, str], query: str) -> list[dict[str, object]]:
    result = cli(env, "sql", query, "--format", "json")
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


def wait_final(env: dict[str, str], call_ids: list[str], timeout: float = 120.0) -> dict[str, str]:
    ids = ",".join(f"'{c}'" for c in call_ids)
    query = (
        "SELECT call_id, argMax(verdict, version) AS verdict, argMax(final, version) AS final"
        f" FROM scopewatch.evidence FINAL WHERE call_id IN ({ids}) GROUP BY call_id"
    )
    deadline = time.monotonic() + timeout
    rows: list[dict[str, object]] = []
    while time.monotonic() < deadline:
        rows = sql(env, query)
        if len(rows) == len(call_ids) and all(r["final"] for r in rows):
            return {str(r["call_id"]): str(r["verdict"]) for r in rows}
        time.sleep(0.5)
    raise AssertionError(f"no final verdict for every call: {rows}")


def lines(path: Path) -> int:
    return path.read_bytes().count(b"\n")


def test_services_stop_in_bounded_time_with_the_broker_gone_and_lose_nothing(tmp_path: Path, cache_dir: Path) -> None:
    home = tmp_path / "home"
    env = stack_env(home, cache_dir, kafka_heap="512m", stop_seconds=str(STOP_SECONDS))
    before, after = story("outage-a"), story("outage-b")
    (tmp_path / "a.jsonl").write_text(jsonl(before))
    (tmp_path / "b.jsonl").write_text(jsonl(after))
    calls_a = [str(e["call_id"]) for e in before if e["event_type"] == "tool_call"]
    calls_b = [str(e["call_id"]) for e in after if e["event_type"] == "tool_call"]
    try:
        assert (up := cli(env, "up")).returncode == 0, up.stderr
        assert (pub := cli(env, "publish", str(tmp_path / "a.jsonl"))).returncode == 0, pub.stderr
        first = wait_final(env, calls_a)

        logs = {name: home / "logs" / f"{name}.log" for name in ("sink", "worker")}
        records = {name: proc.read_pid_record(home / "run" / f"{name}.json") for name in logs}
        broker = proc.read_pid_record(home / "kafka" / "run" / "kafka.json")
        assert broker is not None and all(records.values())
        at_kill = {name: lines(path) for name, path in logs.items()}
        os.kill(broker.pid, signal.SIGKILL)
        time.sleep(OUTAGE_SECONDS)
        grown = {name: lines(path) - at_kill[name] for name, path in logs.items()}
        # one record per kind per 30 s: a handful of kinds (connect, metadata, fetch, coordinator...)
        assert all(n <= 40 for n in grown.values()), grown

        for name, record in records.items():
            assert record is not None
            started = time.monotonic()
            os.killpg(record.pid, signal.SIGTERM)
            while not gone(record.pid) and time.monotonic() - started < 30:
                time.sleep(0.1)
            took = time.monotonic() - started
            assert gone(record.pid), f"{name} still running 30 s after SIGTERM"
            assert took <= STOP_SECONDS + 4, (name, took, logs[name].read_text()[-3000:])

        assert b"\x1b[" not in logs["worker"].read_bytes()  # Faust's terminal spinner stays out of log files

        # Back up on the same folders: what the stopped services left uncommitted is read again,
        # and every call still has exactly one current verdict, the same as before the outage.
        assert (up := cli(env, "up")).returncode == 0, up.stderr
        assert (pub := cli(env, "publish", str(tmp_path / "b.jsonl"))).returncode == 0, pub.stderr
        second = wait_final(env, calls_a + calls_b)
        assert {c: second[c] for c in calls_a} == first
        replay = cli(env, "replay", str(tmp_path / "b.jsonl"))
        assert replay.returncode == 0, replay.stderr
        assert {c: second[c] for c in calls_b} == {
            str(d["call_id"]): str(d["verdict"]) for d in map(json.loads, replay.stdout.splitlines())
        }
        ids = ",".join(f"'{c}'" for c in calls_a + calls_b)
        per_call = sql(
            env,
            f"SELECT call_id, count() AS n FROM scopewatch.evidence_current WHERE call_id IN ({ids}) GROUP BY call_id",
        )
        assert len(per_call) == len(calls_a + calls_b) and all(r["n"] == 1 for r in per_call), per_call
        # raw rows may trail their evidence by up to SINK_RAW_SECONDS (the sink holds the raw topics)
        deadline = time.monotonic() + 30
        while True:
            calls = sql(env, f"SELECT count() AS n FROM scopewatch.tool_calls FINAL WHERE call_id IN ({ids})")
            if calls[0]["n"] == len(calls_a + calls_b) or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        assert calls[0]["n"] == len(calls_a + calls_b)
    finally:
        cli(env, "down")


@pytest.mark.parametrize("service", ["sink", "worker", "pager"])
def test_a_service_started_without_kafka_waits_then_says_why_it_gives_up(
    service: str, tmp_path: Path, cache_dir: Path
) -> None:
    env = stack_env(tmp_path / "home", cache_dir, bootstrap=f"127.0.0.1:{proc.free_port()}", kafka_wait_seconds="3")
    if service == "pager":
        (tmp_path / "home").mkdir()
        (tmp_path / "home" / "pager.toml").write_text(
            '[[routes]]\nname = "siem"\nchannel = "webhook"\nurl = "http://127.0.0.1:9/x"\nsecret_env = "PG_SECRET"\n'
        )
        env["PG_SECRET"] = "whsec_" + "A" * 44
    started = time.monotonic()
    result = cli(env, service, timeout=60)
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr[-2000:]
    assert 3 <= took < 30
    assert "waiting for Kafka at 127.0.0.1:" in result.stderr
    assert "did not answer in 3s" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_service_waiting_for_kafka_stops_at_once(tmp_path: Path, cache_dir: Path) -> None:
    env = stack_env(tmp_path / "home", cache_dir, bootstrap=f"127.0.0.1:{proc.free_port()}")
    child = subprocess.Popen([sys.executable, "-m", "scopewatch", "worker"], env=env, stderr=subprocess.PIPE, text=True)
    try:
        time.sleep(4)
        assert child.poll() is None  # still waiting (the default wait is 5 minutes), not crashed
        started = time.monotonic()
        child.terminate()
        child.wait(timeout=10)
        assert time.monotonic() - started < 5
    finally:
        if child.poll() is None:
            child.kill()
        child.communicate()
