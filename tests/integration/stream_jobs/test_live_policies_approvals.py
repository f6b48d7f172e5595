"""Policies and approvals through the real broker and chDB, on both worker engines.

A scenario with Cedar policies (labels, a ``restricted`` resource forbidden, a policy that fails
closed until a version published before the call arrives after it, a version published after the
call that must not touch it) and approvals (one arriving after its call, one approval and two calls
where the earlier-event-time call arrives after the later one and takes the approval, a deny, an
approval bound to other arguments) is published in two steps: the second step's facts and call
arrive only once the first step's provisional verdicts are in ClickHouse, within grace. The final
verdict, ``matched_grant_id`` and ``approval_id`` of every call in ``evidence_current`` must equal
``scopewatch replay`` over both files, and nothing may be flagged late.

Then: a worker killed with SIGKILL and restarted reads the approval uses back from its changelogs,
so an approval a final call used is not used again by a later call.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from integration.conftest import make_settings

from scopewatch.sqlclient import run_sql
from scopewatch.stack import proc
from scopewatch.stack.kafka import KafkaBroker
from scopewatch.stack.stack import Stack, worker_name
from stream_jobs.runtime.settings import Settings
from support.pipeline import cli, replay_output, wait_rows
from support.scenario import approval, bound, grant, jsonl, policy
from support.scenario import tool_call as call

pytestmark = pytest.mark.integration

GRACE = 15.0
"""Long enough for the second publish (a CLI start) to land within the first calls' grace."""

PERMIT_UNLESS_RESTRICTED = (
    'permit(principal, action == Action::"call", resource);\n'
    'forbid(principal, action, resource) when { context.labels.contains("restricted") };\n'
)
PERMIT_ALL = "permit(principal, action, resource);\n"
FORBID_ALL = "forbid(principal, action, resource);\n"


def scenario(tag: str) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, tuple[str, str | None]]]:
    """(first step, second step, provisional verdicts the first step must show: call -> (verdict, approval))."""
    alice, bob = f"alice-{tag}@acme.example", f"bob-{tag}@acme.example"
    s1, s2 = f"{tag}-s1", f"{tag}-s2"
    pol, pol2 = f"{tag}-pol", f"{tag}-pol2"
    c = f"{tag}-c"
    first = [
        bound("09:59:00", s1, alice, "agent-1"),
        bound("09:59:00", s2, bob, "agent-2"),
        # alice: database calls under a policy with labels, key-value calls under a second policy
        grant("09:59:00", f"{tag}-db", alice, "agent-1", ["db/*"], policies=[pol]),
        grant("09:59:00", f"{tag}-kv", alice, "agent-1", ["kv/*"], policies=[pol2]),
        policy("09:59:30", pol, "v1", PERMIT_UNLESS_RESTRICTED, {"restricted": ["db:prod/*"]}),
        # bob: every fs tool but reads needs a human approval
        grant(
            "09:59:00",
            f"{tag}-fs",
            bob,
            "agent-2",
            ["fs/*"],
            approval_tools=["fs/write_*", "fs/delete_*", "fs/chmod", "fs/move"],
        ),
        approval("10:00:00", f"{tag}-ap-one", bob, "agent-2", "fs/delete_file"),
        approval("10:00:00", f"{tag}-ap-deny", bob, "agent-2", "fs/chmod", decision="deny"),
        approval("10:00:00", f"{tag}-ap-args", bob, "agent-2", "fs/move", arguments={"to": "/srv/ok"}),
        call("10:00:10", f"{c}-db-dev", s1, "db", "query", ["db:dev/users"]),
        call("10:00:11", f"{c}-db-prod", s1, "db", "query", ["db:prod/users"]),
        call("10:00:15", f"{c}-kv-before", s1, "kv", "get"),  # pol2 v1 (10:00:05) arrives later
        call("10:00:25", f"{c}-kv-after", s1, "kv", "get"),  # pol2 v2 (10:00:20) forbids it
        call("10:00:10", f"{c}-write", s2, "fs", "write_file", ["file:/a"], arguments={"path": "/a"}),
        call("10:00:20", f"{c}-delete-later", s2, "fs", "delete_file", arguments={"path": "/b"}),
        call("10:00:10", f"{c}-chmod", s2, "fs", "chmod", arguments={"mode": 777}),
        call("10:00:10", f"{c}-move-other", s2, "fs", "move", arguments={"to": "/tmp/x"}),
        call("10:00:12", f"{c}-move-bound", s2, "fs", "move", arguments={"to": "/srv/ok"}),
        call("10:00:10", f"{c}-read", s2, "fs", "read_file", arguments={"price": 1.25}),
    ]
    second = [
        policy("10:00:05", pol2, "v1", PERMIT_ALL),
        policy("10:00:20", pol2, "v2", FORBID_ALL),
        approval("10:00:05", f"{tag}-ap-late", bob, "agent-2", "fs/write_file"),
        call("10:00:15", f"{c}-delete-earlier", s2, "fs", "delete_file", arguments={"path": "/c"}),
    ]
    provisional = {
        f"{c}-kv-before": ("out_of_policy", None),  # no version of pol2 yet: fail closed
        f"{c}-write": ("approval_missing", None),
        f"{c}-delete-later": ("in_scope", f"{tag}-ap-one"),  # until the earlier call arrives
    }
    return first, second, provisional


def latest(settings: Settings, call_ids: list[str]) -> dict[str, tuple[Any, ...]]:
    """call -> (verdict, approval_id, final, version) of its latest evidence version."""
    ids = ",".join(f"'{c}'" for c in call_ids)
    sql = (
        f"SELECT call_id, argMax(verdict, version), argMax(approval_id, version), argMax(final, version),"
        f" max(version) FROM {settings.clickhouse_database}.evidence WHERE call_id IN ({ids}) GROUP BY call_id"
    )
    return {str(r[0]): tuple(r[1:]) for r in run_sql(settings, sql)["rows"]}


def current(settings: Settings, call_ids: list[str], timeout: float = 180.0) -> dict[str, tuple[Any, ...]]:
    """Wait until every call's current evidence is final; call -> (verdict, matched, approval, late, version)."""
    ids = ",".join(f"'{c}'" for c in call_ids)
    sql = (
        f"SELECT call_id, verdict, matched_grant_id, approval_id, late, version, final"
        f" FROM {settings.clickhouse_database}.evidence_current WHERE call_id IN ({ids})"
    )
    rows = wait_rows(settings, sql, lambda r: len(r) == len(call_ids) and all(row[6] for row in r), timeout)
    return {str(r[0]): tuple(r[1:6]) for r in rows}


def replayed(settings: Settings, path: Path) -> dict[str, tuple[Any, ...]]:
    """``scopewatch replay``: call -> (verdict, matched_grant_id, approval_id)."""
    return {
        str(d["call_id"]): (d["verdict"], d["matched_grant_id"], d["approval_id"])
        for d in replay_output(settings, path)
    }


def publish(settings: Settings, path: Path, events: list[dict[str, Any]]) -> None:
    path.write_text(jsonl(events))
    result = cli(settings, "publish", str(path))
    assert result.returncode == 0, result.stderr


@pytest.fixture(params=["aiokafka", "faust"])
def engine_stack(
    request: pytest.FixtureRequest, tmp_path: Path, kafka_broker: KafkaBroker, cache_dir: Path
) -> Iterator[tuple[Settings, Stack]]:
    """A pipeline of its own on each engine (a longer grace than the session pipeline's)."""
    settings = make_settings(
        tmp_path / request.param,
        kafka_broker.config.bootstrap,
        cache_dir,
        worker_engine=request.param,
        grace_seconds=GRACE,
        worker_session_timeout_seconds=8.0,
    )
    stack = Stack(settings)
    stack.up(timeout=120)
    try:
        yield settings, stack
    finally:
        stack.down()


def test_policies_and_approvals_out_of_order_equal_replay(engine_stack: tuple[Settings, Stack], tmp_path: Path) -> None:
    settings, _stack = engine_stack
    stats = [json.loads(p.read_text()) for p in settings.run_dir.glob("worker-*.json")]
    assert stats and {s["engine"] for s in stats} == {settings.worker_engine}
    tag = f"pa{os.getpid()}{settings.worker_engine[0]}"
    first, second, provisional = scenario(tag)
    publish(settings, tmp_path / "first.jsonl", first)
    # the first step is judged (provisionally) before anything of the second step exists
    deadline = time.monotonic() + GRACE / 2
    seen: dict[str, tuple[Any, ...]] = {}
    while time.monotonic() < deadline:
        seen = latest(settings, sorted(provisional))
        if {c: v[:2] for c, v in seen.items()} == provisional:
            break
        time.sleep(0.2)
    assert {c: v[:2] for c, v in seen.items()} == provisional
    assert not any(v[2] for v in seen.values()), "still within grace: nothing final yet"
    publish(settings, tmp_path / "second.jsonl", second)
    everything = tmp_path / "all.jsonl"
    everything.write_text(jsonl([*first, *second]))
    expected = replayed(settings, everything)
    c = f"{tag}-c"
    # what the scenario is about, as replay sees it
    assert expected[f"{c}-db-dev"] == ("in_scope", f"{tag}-db", None)
    assert expected[f"{c}-db-prod"] == ("out_of_policy", f"{tag}-db", None)
    assert expected[f"{c}-kv-before"] == ("in_scope", f"{tag}-kv", None)
    assert expected[f"{c}-kv-after"] == ("out_of_policy", f"{tag}-kv", None)
    assert expected[f"{c}-write"] == ("in_scope", f"{tag}-fs", f"{tag}-ap-late")
    assert expected[f"{c}-delete-earlier"] == ("in_scope", f"{tag}-fs", f"{tag}-ap-one")
    assert expected[f"{c}-delete-later"] == ("approval_missing", f"{tag}-fs", None)
    assert expected[f"{c}-chmod"] == ("approval_denied", f"{tag}-fs", f"{tag}-ap-deny")
    assert expected[f"{c}-move-other"] == ("approval_missing", f"{tag}-fs", None)
    assert expected[f"{c}-move-bound"] == ("in_scope", f"{tag}-fs", f"{tag}-ap-args")
    assert expected[f"{c}-read"] == ("in_scope", f"{tag}-fs", None)
    live = current(settings, sorted(expected))
    assert {k: v[:3] for k, v in live.items()} == expected
    assert not any(v[3] for v in live.values()), "every fact arrived within grace: nothing is late"
    for corrected in provisional:
        assert live[corrected][4] >= 2, f"{corrected}: its provisional verdict was corrected"


def test_approval_uses_and_policies_survive_a_sigkill(engine_stack: tuple[Settings, Stack], tmp_path: Path) -> None:
    """A worker killed with SIGKILL and restarted: an approval a final call used is not used again
    by a later call, and a policy version published while it was down (dated before a call that is
    already final) amends that call, flagged late, as replay judges it."""
    settings, stack = engine_stack
    tag = f"kill{os.getpid()}{settings.worker_engine[0]}"
    principal, session, pol = f"dave-{tag}@acme.example", f"{tag}-s", f"{tag}-pol"
    facts = [
        bound("09:59:00", session, principal, "agent-9"),
        grant(
            "09:59:00", f"{tag}-g", principal, "agent-9", ["fs/*"], policies=[pol], approval_tools=["fs/delete_file"]
        ),
        policy("09:59:30", pol, "v1", PERMIT_ALL),
        approval("10:00:00", f"{tag}-ap", principal, "agent-9", "fs/delete_file"),
    ]
    used = call("10:00:10", f"{tag}-c1", session, "fs", "delete_file", arguments={"path": "/x"})
    read = call("10:00:10", f"{tag}-read", session, "fs", "read_file", arguments={"path": "/x"})
    amended = policy(
        "10:00:05", pol, "v2", 'permit(principal, action, resource) unless { resource.tool == "read_file" };'
    )
    later = call("10:00:20", f"{tag}-c2", session, "fs", "delete_file", arguments={"path": "/x"})
    publish(settings, tmp_path / "first.jsonl", [*facts, used, read])
    before = current(settings, [used["call_id"], read["call_id"]])
    assert before[used["call_id"]][:3] == ("in_scope", f"{tag}-g", f"{tag}-ap")
    assert before[read["call_id"]][:3] == ("in_scope", f"{tag}-g", None)
    time.sleep(1.0)  # the changelog writes of the final verdicts' batch are acknowledged before its commit
    record = proc.read_pid_record(stack.pid_path(worker_name(1)))
    assert record is not None
    os.kill(record.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while proc.is_running(record) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not proc.is_running(record)
    publish(settings, tmp_path / "policy.jsonl", [amended])  # nobody reads it now
    stack._up_worker(1, timeout=120)  # the same slot: it takes the same partitions back at once
    publish(settings, tmp_path / "second.jsonl", [later])
    everything = tmp_path / "all.jsonl"
    everything.write_text(jsonl([*facts, used, read, amended, later]))
    expected = replayed(settings, everything)
    assert expected[later["call_id"]] == ("approval_missing", f"{tag}-g", None)
    assert expected[read["call_id"]] == ("out_of_policy", f"{tag}-g", None)
    deadline = time.monotonic() + 60
    live = current(settings, sorted(expected))
    while live[read["call_id"]][0] != "out_of_policy" and time.monotonic() < deadline:
        time.sleep(0.3)
        live = current(settings, sorted(expected))
    assert {k: v[:3] for k, v in live.items()} == expected
    assert live[read["call_id"]][3] is True, "an amendment after grace is flagged late"
    # (the call that used the approval keeps its verdict, but its evidence now names v2: amended too)
    assert live[used["call_id"]][3] is True and live[later["call_id"]][3] is False
