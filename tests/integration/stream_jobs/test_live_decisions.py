"""Live decisions through the real broker and chDB equal ``scopewatch replay`` on the same file.

The scenario (``support.scenario.story``) holds every verdict and arrives in a bad order: calls
first, then the facts newest first, all within the 3 s grace of the test pipeline. The final
evidence in ClickHouse must name the same verdict and grant as replay for every call. The same
holds with a second worker in the consumer group (partitions and their state move between
processes), after that worker leaves, and after a worker is killed with SIGKILL mid-story.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from integration.conftest import make_settings

from schemas import delegation_key
from schemas.topics import partition_for
from scopewatch.stack.kafka import KafkaBroker
from scopewatch.stack.stack import Stack
from stream_jobs.runtime.settings import Settings
from support.pipeline import cli, current_verdicts, replay_lines, replay_output, wait_findings
from support.scenario import bound, grant, jsonl, story
from support.scenario import tool_call as call
from support.wrap import child_env

pytestmark = pytest.mark.integration


def publish_story(settings: Settings, tmp_path: Path, tag: str) -> tuple[Path, dict[str, tuple[str, str | None]]]:
    path = tmp_path / f"{tag}.jsonl"
    path.write_text(jsonl(story(tag)))
    result = cli(settings, "publish", str(path))
    assert result.returncode == 0, result.stderr
    return path, replay_lines(settings, path)


def assert_live_equals_replay(
    settings: Settings, expected: dict[str, tuple[str, str | None]], *, late_allowed: bool = False
) -> None:
    live = current_verdicts(settings, sorted(expected))
    assert {c: (v[0], v[1]) for c, v in live.items()} == expected
    if not late_allowed:
        assert not any(v[3] for v in live.values()), "every fact arrived within grace: nothing is late"
    assert len({v for v, _ in expected.values()}) == 10, "the story covers all ten verdicts"


@pytest.fixture(params=["aiokafka", "faust"])
def engine_pipeline(
    request: pytest.FixtureRequest, pipeline: Settings, tmp_path: Path, kafka_broker: KafkaBroker, cache_dir: Path
) -> Iterator[Settings]:
    """The session pipeline (default engine: aiokafka), or a stack of its own on the Faust engine."""
    if request.param == pipeline.worker_engine:
        yield pipeline
        return
    with _own_stack(tmp_path / request.param, kafka_broker, cache_dir, worker_engine=request.param) as settings:
        yield settings


def test_final_verdicts_in_clickhouse_equal_replay(engine_pipeline: Settings, tmp_path: Path) -> None:
    pipeline = engine_pipeline
    stats = [json.loads(p.read_text()) for p in pipeline.run_dir.glob("worker-*.json")]
    assert stats and {s["engine"] for s in stats} == {pipeline.worker_engine}
    path, expected = publish_story(pipeline, tmp_path, f"one{os.getpid()}")
    assert_live_equals_replay(pipeline, expected)
    # the findings the final verdicts raised landed too: the same rules per call as replay lists
    wanted = {str(d["call_id"]): list(d["findings"]) for d in replay_output(pipeline, path) if d["findings"]}  # type: ignore[call-overload]
    assert len(wanted) >= 9
    live = wait_findings(pipeline, sorted(expected), sum(map(len, wanted.values())))
    assert live == wanted


def test_late_revocation_is_an_amendment_flagged_late(pipeline: Settings, tmp_path: Path) -> None:
    tag = f"late{os.getpid()}"
    events = story(tag)
    revocation = next(e for e in events if e["event_type"] == "grant_revoked")
    early = [e for e in events if e is not revocation]
    first = tmp_path / "first.jsonl"
    first.write_text(jsonl(early))
    assert cli(pipeline, "publish", str(first)).returncode == 0
    call_id = f"{tag}-c-revoked"
    before = current_verdicts(pipeline, [call_id])[call_id]
    assert before[0] == "in_scope" and before[3] is False
    second = tmp_path / "second.jsonl"
    second.write_text(jsonl([revocation]))
    assert cli(pipeline, "publish", str(second)).returncode == 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        after = current_verdicts(pipeline, [call_id])[call_id]
        if after[2] > before[2]:
            break
        time.sleep(0.3)
    assert after[0] == "revoked_grant" and after[1] == f"{tag}-write" and after[3] is True


def _start_worker(settings: Settings, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "scopewatch", "worker"],
        env=child_env(settings),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def _wait_for_stats(settings: Settings, pid: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if list(settings.run_dir.glob(f"worker-*-{pid}.json")):
            return
        time.sleep(0.2)
    raise AssertionError(f"worker {pid} never wrote its stats")


@contextmanager
def _own_stack(home: Path, kafka_broker: KafkaBroker, cache_dir: Path, **extra: object) -> Iterator[Settings]:
    """A pipeline of its own: whatever the rebalances do to its workers stays out of the shared one."""
    settings = make_settings(home, kafka_broker.config.bootstrap, cache_dir, **extra)
    stack = Stack(settings)
    stack.up(timeout=120)
    try:
        yield settings
    finally:
        stack.down()


@pytest.fixture
def own_pipeline(tmp_path: Path, kafka_broker: KafkaBroker, cache_dir: Path) -> Iterator[Settings]:
    with _own_stack(tmp_path / "own", kafka_broker, cache_dir) as settings:
        yield settings


def test_two_workers_give_the_same_verdicts_as_one(own_pipeline: Settings, tmp_path: Path) -> None:
    pipeline = own_pipeline
    extra = _start_worker(pipeline, tmp_path / "worker2.log")
    try:
        _wait_for_stats(pipeline, extra.pid)
        time.sleep(3)  # let the group rebalance
        _, expected = publish_story(pipeline, tmp_path, f"two{os.getpid()}")
        assert_live_equals_replay(pipeline, expected)
        assert extra.poll() is None, (tmp_path / "worker2.log").read_text()[-3000:]
    finally:
        os.killpg(extra.pid, signal.SIGTERM)  # a graceful leave
        extra.wait(timeout=60)
    # the surviving worker takes the partitions back and reads their state from the changelogs
    _, expected = publish_story(pipeline, tmp_path, f"after{os.getpid()}")
    assert_live_equals_replay(pipeline, expected)
    # ...except a partition nobody wrote to while it was away: that state is kept, not re-read
    survivor = [p for p in pipeline.run_dir.glob("worker-*.json") if not p.name.endswith(f"-{extra.pid}.json")]
    counters = json.loads(survivor[0].read_text())["counters"]
    assert counters.get("authorize_partition_reuses", 0) + counters.get("attribute_partition_reuses", 0) >= 1


@pytest.fixture
def quick_failover(tmp_path: Path, kafka_broker: KafkaBroker, cache_dir: Path) -> Iterator[Settings]:
    """Its workers are declared dead after 8 s of silence (not 30)."""
    with _own_stack(tmp_path / "kill", kafka_broker, cache_dir, worker_session_timeout_seconds=8.0) as settings:
        yield settings


def test_a_worker_killed_mid_story_loses_nothing(quick_failover: Settings, tmp_path: Path) -> None:
    """SIGKILL one of two workers right after a story is published, with calls open in its state.

    Whatever it had processed but not committed is redelivered to the survivor, which reads the
    killed worker's partitions from the changelogs it wrote: the final verdicts still equal replay.
    """
    pipeline = quick_failover
    extra = _start_worker(pipeline, tmp_path / "worker2.log")
    try:
        _wait_for_stats(pipeline, extra.pid)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the second worker owns partitions (it has loaded state)
            stats = json.loads(next(pipeline.run_dir.glob(f"worker-*-{extra.pid}.json")).read_text())
            if stats["counters"].get("authorize_partition_loads"):  # its stage-2 partitions got ticks
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the second worker never got partitions")
        path = tmp_path / "killed.jsonl"
        tag = f"kill{os.getpid()}"
        path.write_text(jsonl(story(tag)))
        assert cli(pipeline, "publish", str(path)).returncode == 0
        time.sleep(0.5)  # inside the 3 s grace: calls are open, some provisional, none final
    finally:
        os.killpg(extra.pid, signal.SIGKILL)
        extra.wait(timeout=10)
    # (a fact the killed worker had not processed reaches the survivor after the calls' grace:
    # the correction is then an amendment flagged late, which is right; the verdict is what counts)
    assert_live_equals_replay(pipeline, replay_lines(pipeline, path), late_allowed=True)
    # and the survivor goes on deciding new calls on every partition
    _, expected = publish_story(pipeline, tmp_path, f"survivor{os.getpid()}")
    assert_live_equals_replay(pipeline, expected)


def _route_partitions(tag: str, partitions: int) -> list[tuple[str, str]]:
    """(principal, agent) of one delegation per stage-2 partition (where its route's key hashes to)."""
    found: dict[int, tuple[str, str]] = {}
    i = 0
    while len(found) < partitions:
        principal, agent = f"{tag}-user{i}", f"{tag}-agent{i}"
        found.setdefault(
            partition_for(delegation_key("acme", principal, agent).encode(), partitions), (principal, agent)
        )
        i += 1
    return [found[p] for p in range(partitions)]


def test_a_worker_killed_between_a_read_and_a_send_still_raises_the_chain(
    quick_failover: Settings, tmp_path: Path
) -> None:
    """A sensitive read, SIGKILL of a worker, then an external send of the same delegation.

    One delegation per stage-2 partition, so the killed worker held one of the reads in its
    sequence-rule state (or among the calls held for the rules). The survivor reads that state back
    from the ``s2-seq`` changelog and raises ``exfiltration_chain`` on every send; the findings in
    ClickHouse equal replay's.
    """
    pipeline = quick_failover
    tag = f"seq{os.getpid()}"
    delegations = _route_partitions(tag, pipeline.partitions)
    facts, reads, sends = [], [], []
    for n, (principal, agent) in enumerate(delegations):
        session = f"{tag}-s{n}"
        facts += [
            bound("09:00:00", session, principal, agent),
            grant("09:00:00", f"{tag}-g{n}", principal, agent, ["vault/*", "web/*"]),
        ]
        reads.append(call("10:00:00", f"{tag}-read{n}", session, "vault", "get_secret"))
        sends.append(call("10:05:00", f"{tag}-send{n}", session, "web", "fetch"))
    extra = _start_worker(pipeline, tmp_path / "worker2.log")
    try:
        _wait_for_stats(pipeline, extra.pid)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # until the second worker owns stage-2 partitions
            stats = json.loads(next(pipeline.run_dir.glob(f"worker-*-{extra.pid}.json")).read_text())
            if stats["counters"].get("authorize_partition_loads"):
                break
            time.sleep(0.2)
        else:
            raise AssertionError("the second worker never got partitions")
        first = tmp_path / "reads.jsonl"
        first.write_text(jsonl([*facts, *reads]))
        assert cli(pipeline, "publish", str(first)).returncode == 0
        read_ids = [r["call_id"] for r in reads]
        assert {v[0] for v in current_verdicts(pipeline, read_ids).values()} == {"in_scope"}  # final
        time.sleep(1.0)  # past the sequence slack: the reads are in the rules' state, and it is written
    finally:
        os.killpg(extra.pid, signal.SIGKILL)
        extra.wait(timeout=10)
    second = tmp_path / "sends.jsonl"
    second.write_text(jsonl(sends))
    assert cli(pipeline, "publish", str(second)).returncode == 0
    everything = tmp_path / "all.jsonl"
    everything.write_text(jsonl([*facts, *reads, *sends]))
    wanted = {str(d["call_id"]): list(d["findings"]) for d in replay_output(pipeline, everything) if d["findings"]}  # type: ignore[call-overload]
    assert all("exfiltration_chain" in wanted[s["call_id"]] for s in sends)
    call_ids = sorted(r["call_id"] for r in (*reads, *sends))
    live = wait_findings(pipeline, call_ids, sum(map(len, wanted.values())))
    assert live == wanted


def test_verify_confirms_the_live_evidence(pipeline: Settings, tmp_path: Path) -> None:
    """`scopewatch verify` on what the live pipeline stored: chains intact, every final verdict re-derivable."""
    import json

    _, expected = publish_story(pipeline, tmp_path, f"vfy{os.getpid()}")
    assert_live_equals_replay(pipeline, expected)
    deadline = time.monotonic() + 30  # the raw facts may trail their evidence by SINK_RAW_SECONDS
    while True:
        result = cli(pipeline, "verify", "--json")
        report = json.loads(result.stdout)
        if result.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(1)
    assert result.returncode == 0, report["problems"][:5]
    assert report["ok"] and report["calls_checked"] >= len(expected)
    assert report["verdicts_match"] >= len(expected)
