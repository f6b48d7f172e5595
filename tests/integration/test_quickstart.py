"""The quickstart path through the real CLI: up from nothing, demo, sql, down, up again (resume), down."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from scopewatch.stack import proc
from support.pipeline import cli_env as cli
from support.pipeline import stack_env
from support.procs import gone

pytestmark = pytest.mark.integration

IN_CALL_ORDER = (
    " LEFT JOIN (SELECT call_id, any(collector_seq) AS seq FROM scopewatch.tool_calls GROUP BY call_id) AS t"
    " ON t.call_id = e.call_id"
)
"""Calls one after the other can share a millisecond of ``call_time`` (a wrapped call takes ~0.2 ms):
the collector's sequence number orders them as they were made."""


def recorded_pids(home: Path) -> list[int]:
    pids = []
    for path in [home / "run" / "sink.json", home / "run" / "worker.json", home / "kafka" / "run" / "kafka.json"]:
        record = proc.read_pid_record(path)
        if record is not None:
            pids.append(record.pid)
    return pids


def count(env: dict[str, str], table: str) -> int:
    result = cli(env, "sql", f"SELECT count() AS n FROM scopewatch.{table}", "--format", "json")
    assert result.returncode == 0, result.stderr
    return int(json.loads(result.stdout)[0]["n"])


def test_up_demo_sql_down_resume(tmp_path: Path, cache_dir: Path) -> None:
    home = tmp_path / "home"
    env = stack_env(home, cache_dir)
    try:
        up = cli(env, "up")
        assert up.returncode == 0, up.stderr
        assert "stack is up" in up.stderr
        status = cli(env, "status", "--json")
        assert status.returncode == 0, status.stdout
        info = json.loads(status.stdout)
        assert {s["name"] for s in info["services"] if s["running"]} == {"kafka", "sink", "worker"}
        assert {
            "mcp.tool-calls",
            "mcp.tool-results",
            "identity.sessions",
            "consent.grants",
            "audit.evidence",
            "audit.findings",
            "audit.dead-letter",
        } <= set(info["topics"])

        demo = cli(env, "demo", "--calls", "14")
        assert demo.returncode == 0, demo.stdout + demo.stderr
        assert "made 14 tool calls" in demo.stdout
        # while the stack runs, `sql` goes through the sink that owns the chDB folder
        assert count(env, "tool_calls") == 14
        assert count(env, "tool_results") == 14
        info = json.loads(cli(env, "status", "--json").stdout)
        assert info["clickhouse"]["tool_calls"] == 14 and info["clickhouse"]["evidence"] >= 28  # provisional + final
        # the consent story: each verdict with the grant that explains it
        final = cli(
            env,
            "sql",
            "SELECT e.tool AS tool, argMax(e.verdict, e.version) AS verdict,"
            " argMax(e.matched_grant_id, e.version) AS grant FROM scopewatch.evidence AS e"
            + IN_CALL_ORDER
            + " WHERE e.principal = 'alice@acme.example' GROUP BY e.call_id, e.tool"
            " ORDER BY min(e.call_time), any(t.seq)",
            "--format",
            "json",
        )
        story = [(r["tool"], r["verdict"], (r["grant"] or "").rsplit("-", 1)[-1]) for r in json.loads(final.stdout)]
        assert story == [
            ("echo", "in_scope", "basics"),
            ("get-sum", "in_scope", "basics"),
            ("get-structured-content", "in_scope", "reports"),
            ("get-resource-reference", "in_scope", "refs"),
            ("get-resource-reference", "out_of_scope_resource", ""),
            ("trigger-long-running-operation", "out_of_scope_tool", ""),
            ("get-structured-content", "revoked_grant", "reports"),
            ("echo", "expired_grant", "basics"),
            # runtime authorization (issue 18): approved once, called twice; a restricted resource under a policy
            ("get-tiny-image", "in_scope", "gated"),
            ("get-tiny-image", "approval_missing", "gated"),
            ("get-resource-reference", "out_of_policy", "labelled"),
        ], demo.stdout
        # the demo checked itself: replay over the stored events gives every call the live final verdict
        assert "replay of the stored events agrees with every live final verdict" in demo.stdout, demo.stdout
        approvals = cli(
            env,
            "sql",
            "SELECT argMax(e.approval_id, e.version) AS approval, argMax(e.policy_versions, e.version) AS policies,"
            " argMax(e.policy_decision, e.version) AS decision, argMax(e.policy_errors, e.version) AS errors"
            " FROM scopewatch.evidence AS e" + IN_CALL_ORDER + " WHERE e.principal = 'alice@acme.example' AND e.tool IN"
            " ('get-tiny-image', 'get-resource-reference') GROUP BY e.call_id ORDER BY min(e.call_time), any(t.seq)",
            "--format",
            "json",
        )
        used, missing, restricted = json.loads(approvals.stdout)[-3:]
        assert used["approval"].endswith("-approval-1") and missing["approval"] is None, approvals.stdout
        # the evidence names the policy version that denied (live stage 2 of h18l must know the policy)
        assert [p.split("-", 1)[1] for p in restricted["policies"]] == ["no-restricted@demo-1"], approvals.stdout
        assert (restricted["decision"], restricted["errors"]) == ("Deny", []), approvals.stdout
        # the violations were paged: each pageable finding's dedup key delivered to the demo's receiver
        paged = cli(
            env,
            "sql",
            "SELECT f.rule_id AS rule, countIf(p.outcome = 'delivered') AS delivered FROM scopewatch.findings AS f"
            " LEFT JOIN scopewatch.pages AS p ON p.dedup_key = f.dedup_key"
            " WHERE f.principal = 'alice@acme.example' AND f.severity IN ('medium', 'high', 'critical')"
            " GROUP BY f.rule_id ORDER BY f.rule_id",
            "--format",
            "json",
        )
        rules = {r["rule"]: r["delivered"] for r in json.loads(paged.stdout)}
        assert {
            "revoked_grant",
            "expired_grant",
            "out_of_scope_tool",
            "out_of_scope_resource",
            "approval_missing",
            "out_of_policy",
        } <= set(rules), rules
        assert all(n >= 1 for n in rules.values()), rules
        assert "signed webhook deliveries" in demo.stdout and "0 bad" in demo.stdout

        pids = recorded_pids(home)
        assert len(pids) == 3
        down = cli(env, "down")
        assert down.returncode == 0, down.stderr
        assert all(gone(pid) for pid in pids)
        assert cli(env, "status").returncode == 3
        # with the stack down, `sql` opens the embedded folder itself
        assert count(env, "tool_calls") == 14

        again = cli(env, "up")  # resumes on the existing data folder
        assert again.returncode == 0, again.stderr
        assert count(env, "tool_calls") == 14
        assert cli(env, "status").returncode == 0
    finally:
        cli(env, "down")
    for pid in recorded_pids(home) + pids:
        assert gone(pid)


def test_up_reports_a_taken_port(tmp_path: Path, cache_dir: Path) -> None:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        env = dict(
            os.environ,
            SCOPEWATCH_HOME=str(tmp_path / "h"),
            SCOPEWATCH_CACHE_DIR=str(cache_dir),
            SCOPEWATCH_KAFKA_PORT=str(port),
            SCOPEWATCH_KAFKA_CONTROLLER_PORT=str(proc.free_port()),
        )
        result = cli(env, "up")
    assert result.returncode != 0
    assert str(port) in result.stderr and "in use" in result.stderr.lower()
    assert cli(env, "status").returncode == 3
