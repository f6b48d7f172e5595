"""Migrations and deduplicated inserts on the real ClickHouse engine (chDB, in this process)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from clickhouse_connect.driver.client import Client

from scopewatch.stack.kafka import KafkaBroker
from stream_jobs.clickhouse import connect, load_migrations, migrate, result_json, run_query
from stream_jobs.rows import Provenance, to_row
from stream_jobs.sink import ClickHouseWriter
from support.samples import SAMPLES, T

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def chdb(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Client]:
    # chDB holds one data folder per process: this module is the only in-process user.
    client = connect(f"chdb://{tmp_path_factory.mktemp('chdb') / 'data'}")
    yield client
    client.close()


def test_migrations_apply_once(chdb: Client) -> None:
    assert migrate(chdb, "mig") == [f"{m.version:04d}_{m.name}" for m in load_migrations()]
    assert migrate(chdb, "mig") == []
    tables = {r[0] for r in chdb.query("SELECT name FROM system.tables WHERE database = 'mig'").result_rows}
    assert {
        "tool_calls",
        "tool_results",
        "identity_events",
        "consent_events",
        "policy_events",
        "approval_events",
        "evidence",
        "dead_letters",
        "findings",
        "pages",
        "evidence_current",
        "pipeline_metrics",
        "schema_migrations",
    } <= tables


def test_evidence_merges_write_compact_parts_up_to_16_gib(chdb: Client) -> None:
    """0008: a merge of evidence parts past 256 MiB stays compact (0006 alone made it wide, ~40 % dearer
    per merged row); the raw tables keep 0006's threshold. Since 0010 the evidence rows are in evidence_rows."""
    migrate(chdb, "wide")
    settings = {}
    for table in ("evidence_rows", "tool_calls"):
        [(create,)] = chdb.query(
            f"SELECT create_table_query FROM system.tables WHERE database = 'wide' AND name = '{table}'"
        ).result_rows
        settings[table] = re.search(r"min_bytes_for_wide_part = (\d+)", create).group(1)  # type: ignore[union-attr]
    assert settings == {"evidence_rows": str(16 * 2**30), "tool_calls": str(256 * 2**20)}


def test_the_bulk_tables_merge_ten_parts_at_once(chdb: Client) -> None:
    """0009: merges of the tables the sink writes in bulk start at 10 parts of a size (MergeTree's default
    selector starts at about 5): a row goes through log10 instead of log5 merge levels, each ≈ 1.5 µs of CPU."""
    migrate(chdb, "levels")
    found = {}
    lists = ("evidence_reason_lists", "evidence_fact_lists")
    for table in ("evidence_rows", *lists, "tool_calls", "tool_results", "dead_letters"):
        [(create,)] = chdb.query(
            f"SELECT create_table_query FROM system.tables WHERE database = 'levels' AND name = '{table}'"
        ).result_rows
        match = re.search(r"min_parts_to_merge_at_once = (\d+)", create)
        found[table] = match.group(1) if match else None
    assert found == {
        "evidence_rows": "10",
        "evidence_reason_lists": "10",
        "evidence_fact_lists": "10",
        "tool_calls": "10",
        "tool_results": "10",
        "dead_letters": None,
    }


def test_evidence_parts_wait_for_ten_before_a_merge(chdb: Client) -> None:
    """0009 in action: nine small evidence parts stay apart (the default selector merges a few tiny parts at
    once), the tenth starts the merge that makes them one."""
    import time

    migrate(chdb, "levels10")

    def parts() -> int:
        return int(
            chdb.query(
                "SELECT count() FROM system.parts WHERE database = 'levels10' AND table = 'evidence_rows' AND active"
            ).result_rows[0][0]
        )

    def insert(i: int) -> None:
        chdb.command(
            "INSERT INTO levels10.evidence_rows (tenant, call_id, version, evidence_id, call_time) "
            f"VALUES ('t', 'call-{i}', 1, 'ev-{i}', '2026-12-06 00:00:00')"
        )

    for i in range(9):
        insert(i)
    time.sleep(3)  # background merges are scheduled within a few hundred ms
    assert parts() == 9
    insert(9)
    deadline = time.monotonic() + 30
    while parts() > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert parts() == 1


def test_the_migrated_tables_have_every_spec_column_and_a_missing_one_stops_the_sink(chdb: Client) -> None:
    from stream_jobs.clickhouse import ClickHouseError, check_tables
    from stream_jobs.tables import SPECS, migration_columns

    migrate(chdb, "specs")
    check_tables(chdb, "specs")
    stored: dict[str, set[str]] = {}
    for table, column in chdb.query("SELECT table, name FROM system.columns WHERE database = 'specs'").result_rows:
        stored.setdefault(table, set()).add(column)
    parsed = migration_columns(";\n".join(m.statements) + ";" for m in load_migrations())
    for spec in SPECS:  # the unit test's migration parser reads what ClickHouse makes of the migrations
        assert parsed[spec.table] == stored[spec.table], spec.table
    chdb.command("ALTER TABLE specs.findings DROP COLUMN details")
    with pytest.raises(ClickHouseError, match=r"findings\.details"):
        check_tables(chdb, "specs")


def test_same_token_inserts_once(chdb: Client) -> None:
    migrate(chdb, "dedup")
    writer = ClickHouseWriter(chdb, "dedup")
    for i, (table, record) in enumerate(SAMPLES):
        _, row = to_row(record, Provenance("topic", 0, i, T))
        writer.insert(table, [row], token=f"{table}|topic:0:{i}-{i}")
        writer.insert(table, [row], token=f"{table}|topic:0:{i}-{i}")  # a retried batch
    counts = run_query(
        chdb,
        "SELECT table, sum(rows) FROM system.parts WHERE database = 'dedup' AND active "
        "AND table != 'schema_migrations' GROUP BY table ORDER BY table",
    )["rows"]
    expected: dict[str, int] = {}
    for table, _ in SAMPLES:
        table = "evidence_rows" if table == "evidence" else table  # a view since 0010: rows + their lists
        expected[table] = expected.get(table, 0) + 1
    got = dict((t, int(n)) for t, n in counts)
    lists = {t: got.pop(t) for t in ("evidence_reason_lists", "evidence_fact_lists")}
    assert got == expected
    assert lists == {
        "evidence_reason_lists": expected["evidence_rows"],
        "evidence_fact_lists": expected["evidence_rows"],
    }


def test_evidence_current_has_one_row_per_call_with_its_result(chdb: Client) -> None:
    from schemas import Evidence, ToolResult

    migrate(chdb, "cur")
    writer = ClickHouseWriter(chdb, "cur")
    base = next(r for t, r in SAMPLES if t == "evidence")
    assert isinstance(base, Evidence)

    def version(call_id: str, v: int, verdict: str, final: bool) -> dict[str, object]:
        e = base.model_copy(update={"call_id": call_id, "version": v, "verdict": verdict, "final": final})
        return to_row(e, Provenance("audit.evidence", 0, v, T))[1]

    evidence = [
        version("c1", 1, "unbound_session", False),
        version("c1", 1, "unbound_session", False),  # the job re-sent a version: same record twice
        version("c1", 2, "in_scope", False),
        version("c1", 3, "in_scope", True),
        version("c2", 1, "no_grant", False),
    ]
    for i, row in enumerate(evidence):  # separate inserts, as separate sink batches would be
        writer.insert("evidence", [row], token=f"ev{i}")
    result = next(r for t, r in SAMPLES if t == "tool_results")
    assert isinstance(result, ToolResult)
    done = result.model_copy(update={"call_id": "c1", "tenant": base.tenant, "status": "error", "duration_ms": 12.5})
    writer.insert("tool_results", [to_row(done, Provenance("mcp.tool-results", 0, 0, T))[1]], token="r0")

    rows = run_query(
        chdb,
        "SELECT call_id, version, verdict, final, result_status, result_duration_ms FROM cur.evidence_current"
        " ORDER BY call_id",
    )["rows"]
    assert rows == [["c1", 3, "in_scope", True, "error", 12.5], ["c2", 1, "no_grant", False, None, None]]


# -- dashboards: every panel's SQL on a seeded scenario (issue 7) ------------------------------------
# Own database "dash" in this module's chDB (one data folder per process). The scenario is
# support.scenario.story() plus a use after revocation and a grant expiring within a day, stamped by
# one collector chain with one sequence number missing; evidence is every replay decision as a
# provisional then a final version; findings are replay's, plus one tool_rug_pull; pages and dead
# letters are a few hand-made rows.

import uuid  # noqa: E402
from datetime import timedelta  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

from dashboards.macros import TimeRange  # noqa: E402

DASH_DB = "dash"
DASH_TAG = "dash"
DASH_RANGE = TimeRange(T.replace(hour=9, minute=50), T.replace(minute=10), 60)
DASH_VARIABLES = {"tenant": "acme", "principal": f"alice-{DASH_TAG}@acme.example", "agent": "agent-1"}


def _dash_events() -> list[dict[str, object]]:
    from support.scenario import grant, story, tool_call, ts

    tag = DASH_TAG
    events = [
        *story(tag),
        tool_call("10:00:40", f"{tag}-c-uar", f"{tag}-s1", "fs", "write_file", ["file:/data/b.txt"]),
        grant("10:00:00", f"{tag}-report", f"carol-{tag}@acme.example", "agent-3", ["report/*"], expires="20:00:00"),
    ]
    calls = {e["call_id"]: e for e in events if e["event_type"] == "tool_call"}
    for call_id, status in ((f"{tag}-c-in", "ok"), (f"{tag}-c-revoked", "ok"), (f"{tag}-c-tool", "error")):
        call = calls[call_id]
        events.append(
            {
                "event_type": "tool_result",
                "event_id": str(uuid.uuid4()),
                "event_time": call["event_time"],
                "tenant": call["tenant"],
                "call_id": call_id,
                "session_id": call["session_id"],
                "status": status,
                "duration_ms": 12.5,
                "error": "denied by server" if status == "error" else None,
                "result_digest": None,
            }
        )
    raw = [e for e in events if e["event_type"] in ("tool_call", "tool_result")]
    stamped = sorted(raw, key=lambda e: str(e["event_time"]))
    for i, event in enumerate(stamped):  # sequence number 3 never arrives: a lost event
        event["collector"] = {"id": f"{tag}-wrap", "epoch": 1, "seq": i if i < 3 else i + 1, "prev_hash": None}
    assert ts("10:00:00").startswith("2026-11-21")
    from support.gated import gated_story

    return [*events, *gated_story(tag)]  # policies and approvals (issue 18): alice's agent-7, unstamped


def _finding_row(f: Any, offset: int) -> dict[str, object]:
    import json

    return {
        "finding_id": f.finding_id,
        "dedup_key": f.dedup_key,
        "rule_id": f.rule_id,
        "rule_version": f.rule_version,
        "severity": f.severity,
        "title": f.title,
        "summary": f.summary,
        "tenant": f.tenant,
        "principal": f.principal,
        "agent_id": f.agent_id,
        "call_id": f.call_id,
        "call_ids": list(f.evidence.call_ids),
        "session_id": f.evidence.session_id,
        "grant_id": f.evidence.grant_id,
        "forensic_query": f.evidence.query,
        "first_call_time": f.first_call_time,
        "last_call_time": f.last_call_time,
        "details": json.dumps(f.details, sort_keys=True),
        "_topic": "audit.findings",
        "_partition": 0,
        "_offset": offset,
        "_ingested_at": f.last_call_time + timedelta(seconds=16),
    }


def _page_row(finding: dict[str, Any], attempt: int, outcome: str, channel: str, status: int) -> dict[str, object]:
    return {
        "attempt_id": str(uuid.uuid4()),
        "page_key": f"{finding['dedup_key']}#1",
        "dedup_key": finding["dedup_key"],
        "finding_id": finding["finding_id"],
        "rule_id": finding["rule_id"],
        "severity": finding["severity"],
        "tenant": finding["tenant"],
        "channel": channel,
        "route": f"{channel}-oncall",
        "attempt": attempt,
        "outcome": outcome,
        "http_status": status,
        "error": None if outcome == "delivered" else f"HTTP {status}",
        "findings_grouped": 1,
        "attempted_at": finding["_ingested_at"] + timedelta(seconds=attempt),
        "latency_ms": 120.0 * attempt,
        "_ingested_at": finding["_ingested_at"] + timedelta(seconds=attempt + 1),
    }


def _metric_rows(spool_dir: Path) -> list[dict[str, Any]]:
    """Pipeline metrics snapshots every 10 s from 10:00:00 (stream_jobs.metrics, as the sink writes them):
    lag on two topics, a sink that retried and paused, one worker, a pager, a spool with 3 events pending."""
    from collectors.spool import KIND_EVENT, Segment, encode_payload, inspect_spool
    from scopewatch.spools import figures
    from stream_jobs.metrics import metric_rows

    seg = Segment.create(spool_dir / "tok-000001.seg")
    seg.append([(KIND_EVENT, encode_payload("mcp.tool-calls", None, b"event")) for _ in range(3)])
    seg.close()
    rows: list[dict[str, Any]] = []
    for i in range(4):
        now = T + timedelta(seconds=10 * i)
        sink = {"rows": 10 * i, "batches": i, "retries": min(i, 2), "paused": int(i == 1)}
        sink["lag_by_topic"] = {"mcp.tool-calls": 5 - i, "audit.evidence": i}
        worker = {
            "updated_at": now.isoformat(),
            "counters": {"dead_letters": 1, "dead_letters_decode": 1},
            "open_calls_stage1": 2,
            "open_calls_stage2": i,
        }
        pager = {"at": now.timestamp(), "pid": 9, "pending_pages": 1, "recorded.delivered": i}
        rows += metric_rows(
            now=now,
            instance="dash-host-1",
            sink=sink,
            workers={"worker-dash-7": worker},
            pager=pager,
            spools=[figures(inspect_spool(spool_dir))],
        )
    return rows


@pytest.fixture(scope="module")
def dash(chdb: Client, tmp_path_factory: pytest.TempPathFactory) -> Client:
    import io

    from detections.live import build_evidence
    from schemas import DeadLetter, event_from_json
    from scopewatch.jsonl import read_events
    from scopewatch.replay import replay
    from support.scenario import jsonl

    migrate(chdb, DASH_DB)
    writer = ClickHouseWriter(chdb, DASH_DB)
    events = _dash_events()
    tables: dict[str, list[dict[str, object]]] = {}
    for offset, event in enumerate(events):
        record = event_from_json(jsonl([event]))
        table, row = to_row(record, Provenance("raw", 0, offset, record.event_time + timedelta(seconds=2)))
        tables.setdefault(table, []).append(row)
    judged = replay(read_events(io.StringIO(jsonl(events))))
    assert not judged.bad
    for call, decision in judged.decisions:
        for version, final, after in ((1, False, 0.5), (2, True, 15.0)):
            decided = call.event_time + timedelta(seconds=after)
            kind = "final" if final else "provisional"
            evidence = build_evidence(call, decision, version, final, False, decided, 1, "deadline", kind)
            prov = Provenance("audit.evidence", 0, len(tables.get("evidence", [])), decided + timedelta(seconds=1))
            tables.setdefault("evidence", []).append(to_row(evidence, prov)[1])
    findings = [_finding_row(f, i) for i, f in enumerate(judged.findings)]
    rug = dict(findings[0], finding_id=str(uuid.uuid4()), rule_id="tool_rug_pull", severity="high")
    findings.append(dict(rug, dedup_key=f"tool_rug_pull|{rug['tenant']}|{rug['call_id']}"))
    tables["findings"] = findings
    by_rule = {f["rule_id"]: f for f in findings}
    tables["pages"] = [
        _page_row(by_rule["revoked_grant"], 1, "retry", "pagerduty", 502),
        _page_row(by_rule["revoked_grant"], 2, "delivered", "pagerduty", 202),
        _page_row(by_rule["exfiltration_chain"], 1, "failed", "slack", 404),
    ]
    tables["dead_letters"] = [
        to_row(
            DeadLetter(
                dead_letter_id=str(uuid.uuid4()),
                source_topic="mcp.tool-calls",
                source_partition=0,
                source_offset=offset,
                key=None,
                reason=f"undecodable Avro payload #{offset}",
                stage=stage,
                payload_b64="AA==",
                failed_at=T + timedelta(seconds=offset),
            ),
            Provenance("audit.dead-letter", 0, offset, T + timedelta(seconds=offset + 1)),
        )[1]
        for offset, stage in ((0, "decode"), (1, "authorize"))
    ]
    tables["pipeline_metrics"] = _metric_rows(tmp_path_factory.mktemp("dash-spool"))
    for table, rows in tables.items():
        writer.insert(table, rows, token=f"dash-{table}")
    return chdb


def test_every_dashboard_query_returns_its_columns_and_rows(dash: Client) -> None:
    from dashboards.boards import dashboards
    from dashboards.macros import expand

    problems: list[str] = []
    checked = 0
    for board in dashboards(DASH_DB):
        for name, query in board.queries():
            sql = expand(query.sql, DASH_RANGE, DASH_VARIABLES)
            try:
                result = dash.query(sql)
            except Exception as exc:
                problems.append(f"{board.uid} {name}: {str(exc).splitlines()[0]}\n{sql}")
                continue
            checked += 1
            if tuple(result.column_names) != query.columns:
                problems.append(f"{board.uid} {name}: columns {result.column_names} != {query.columns}")
            if not result.result_rows:
                problems.append(f"{board.uid} {name}: no rows\n{sql}")
    assert not problems, "\n\n".join(problems)
    assert checked >= 20


def _panel_rows(dash: Client, uid: str, title: str) -> list[dict[str, Any]]:
    from dashboards.boards import dashboards
    from dashboards.macros import expand

    board = next(b for b in dashboards(DASH_DB) if b.uid == uid)
    query = next(p.query for p in board.panels if p.title == title)
    assert query is not None
    result = run_query(dash, expand(query.sql, DASH_RANGE, DASH_VARIABLES))
    return [dict(zip(result["columns"], row, strict=True)) for row in result["rows"]]


def test_dashboard_panels_show_what_the_scenario_did(dash: Client) -> None:
    tag = DASH_TAG
    revocations = _panel_rows(dash, "scopewatch-soc-overview", "Revocations and use after revocation")
    assert [(r["grant_id"], r["uses_after"], r["first_use_after_s"]) for r in revocations] == [(f"{tag}-write", 2, 0.0)]
    expiring = _panel_rows(dash, "scopewatch-soc-overview", "Grants expiring in the next 24 h")
    assert [(r["grant_id"], r["hours_left"]) for r in expiring] == [(f"{tag}-report", 9.8)]
    timeline = {r["call_id"]: r for r in _panel_rows(dash, "scopewatch-delegation", "Timeline of calls")}
    revoked = timeline[f"{tag}-c-revoked"]
    assert (revoked["verdict"], revoked["grant_id"], revoked["grant_tools"], revoked["result"], revoked["final"]) == (
        "revoked_grant",
        f"{tag}-write",
        "fs/write_file",
        "ok",
        True,
    )
    assert f"{tag}-c-nogrant" not in timeline  # bob's call: another delegation
    pages = {r["rule_id"]: r["page"] for r in _panel_rows(dash, "scopewatch-findings", "Open findings")}
    paged = [pages[r] for r in ("revoked_grant", "exfiltration_chain", "no_grant")]
    assert paged == ["delivered", "failed", "not paged"]
    collectors = _panel_rows(dash, "scopewatch-pipeline", "Collectors: sequence gaps")
    assert [(r["collector_id"], r["missing_seq"]) for r in collectors] == [(f"{tag}-wrap", 1)]


def test_approval_and_policy_panels_show_what_the_scenario_did(dash: Client) -> None:
    tag = DASH_TAG
    approvals = _panel_rows(dash, "scopewatch-soc-overview", "Approvals by tool")
    assert approvals == [
        {
            "tenant": "acme",
            "tool": "db/drop_table",
            "gated_calls": 1,
            "approved": 0,
            "missing": 0,
            "denied_then_executed": 1,
            "p50_time_to_use_s": None,
            "max_time_to_use_s": None,
        },
        {
            "tenant": "acme",
            "tool": "db/write_row",
            "gated_calls": 3,
            "approved": 2,
            "missing": 1,
            "denied_then_executed": 0,
            "p50_time_to_use_s": 75.0,  # 30 s (ap-1) and 120 s (ap-3)
            "max_time_to_use_s": 120.0,
        },
    ]
    denials = _panel_rows(dash, "scopewatch-soc-overview", "Policy denials by policy version")
    assert [(r["policy_version"], r["denials"], r["agents"], r["with_errors"]) for r in denials] == [
        (f"{tag}-labels@v1", 1, 1, 0),
        (f"{tag}-labels@v2", 1, 1, 0),
    ]
    assert denials[1]["last_denied"] == ts("10:06:00")


def test_pipeline_metric_panels_show_the_snapshots(dash: Client) -> None:
    lag = _panel_rows(dash, "scopewatch-pipeline", "Consumer lag by topic (sink)")
    last = max(r["time"] for r in lag)
    assert {r["topic"]: r["consumer_lag"] for r in lag if r["time"] == last} == {
        "audit.evidence": 3.0,
        "mcp.tool-calls": 2.0,
    }
    sink = _panel_rows(dash, "scopewatch-pipeline", "Sink retries and paused")
    assert {(r["metric"], r["value"]) for r in sink if r["time"] == last} == {("paused", 0.0), ("retries", 2.0)}
    worker = _panel_rows(dash, "scopewatch-pipeline", "Worker dead letters and open calls")
    assert {r["metric"]: r["value"] for r in worker if r["time"] == last} == {
        "dead_letters": 1.0,
        "open_calls_stage1": 2.0,
        "open_calls_stage2": 3.0,
    }
    depth = _panel_rows(dash, "scopewatch-pipeline", "Collector spool depth")
    assert {r["pending_events"] for r in depth} == {3.0}
    [spool] = _panel_rows(dash, "scopewatch-pipeline", "Collector spools")
    assert (spool["pending_events"], spool["problems"], spool["live_writers"]) == (3.0, 0.0, 0.0)
    assert spool["pending_bytes"] > 0


def test_a_retried_metrics_snapshot_lands_once(chdb: Client, tmp_path: Path) -> None:
    from scopewatch.spools import reader
    from stream_jobs.metrics import TABLE, MetricsReporter

    migrate(chdb, "metrics")
    writer = ClickHouseWriter(chdb, "metrics")
    reporter = MetricsReporter(writer, tmp_path, reader([tmp_path / "spool"]), "h-1")
    written = reporter.write({"retries": 1}, T)
    assert reporter.write({"retries": 1}, T) == written  # same instance and time: same token
    count = chdb.query(f"SELECT count() FROM metrics.{TABLE}").result_rows[0][0]
    assert count == written
    (tmp_path / "fault").touch()
    failing = MetricsReporter(ClickHouseWriter(chdb, "metrics", fault_file=tmp_path / "fault"), tmp_path, list, "h-2")
    import asyncio

    assert asyncio.run(failing.tick({})) is False and failing.failures == 1


def test_alert_queries_count_recent_findings_per_tenant(dash: Client) -> None:
    from dashboards.alerts import detection_alerts
    from dashboards.macros import expand

    rules = detection_alerts(DASH_DB)
    main = {"revoked_grant", "identity_mismatch", "exfiltration_chain", "use_after_revocation"}
    assert main <= {r.rule_id for r in rules}
    for rule in rules:
        result = dash.query(expand(rule.query.sql, DASH_RANGE))
        assert tuple(result.column_names) == rule.query.columns
        assert [row[0] for row in result.result_rows] == ["acme"], rule.rule_id
        assert all(row[1] >= 1 for row in result.result_rows)


# -- forensic query pack (stream_jobs/forensics): each query on a seeded scenario, database "forensics" --------------

import datetime as _datetime  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
from dataclasses import dataclass, field, replace  # noqa: E402

from typer.testing import CliRunner  # noqa: E402

from detections.live import build_evidence  # noqa: E402
from schemas import Evidence, canonical_json  # noqa: E402
from scopewatch.jsonl import read_events  # noqa: E402
from scopewatch.replay import replay  # noqa: E402
from stream_jobs.forensics import bind, load_queries, parse_query  # noqa: E402
from support.scenario import _base, bound, grant, jsonl, story, tool_call, ts  # noqa: E402

ALICE, BOB, CAROL = "alice-fx@acme.example", "bob-fx@acme.example", "carol@initech.example"


@dataclass
class Seeded:
    ids: dict[tuple[str, str], str] = field(default_factory=dict)
    """(event_type, call_id / session_id / grant_id) -> event_id"""
    keys: dict[str, tuple[str, str]] = field(default_factory=dict)
    """event_id -> (event_type, call_id / session_id / grant_id)"""
    evidence: dict[str, Evidence] = field(default_factory=dict)


def _result(at: str, call: str, session: str, status: str, ms: float, error: str | None = None) -> dict[str, object]:
    base = _base("tool_result", at, "acme")
    return {**base, "call_id": call, "session_id": session, "status": status, "duration_ms": ms, "error": error}


def _forensic_events() -> list[dict[str, object]]:
    """story("fx") (every verdict), results for three calls, and a delegation whose tool definition changes."""
    events = story("fx")
    events += [
        _result("10:00:10.500", "fx-c-in", "fx-s1", "ok", 12.5),
        _result("10:00:12.250", "fx-c-res", "fx-s1", "error", 3.0, "permission denied"),
        _result("10:00:29.040", "fx-c-write-ok", "fx-s1", "ok", 40.0),
        bound("11:00:00", "fx-d1", CAROL, "agent-9", tenant="initech"),
        grant("11:00:00", "fx-git", CAROL, "agent-9", ["git/*"], tenant="initech"),
    ]
    digests = [("push", "sha256:aaa"), ("push", "sha256:aaa"), ("push", "sha256:bbb"), ("pull", None)]
    for i, (tool, digest) in enumerate(digests):
        call = tool_call(f"11:00:0{i + 1}", f"fx-d-{i}", "fx-d1", "git", tool, tenant="initech")
        events.append({**call, "tool_digest": digest})
    return events


def _seed_forensics(chdb: Client, db: str, copied: bool) -> Seeded:
    """Raw events as the sink writes them, and one final evidence version per call from the replay engine.

    ``copied=False``: evidence as the worker writes it now, referencing its facts (fact_ids, and fact_hashes
    equal to the raw rows' _record_hash, as the live worker knows them). ``copied=True``: evidence as written
    before fact references (the facts copied as JSON, no fact_ids), as a database migrated from then holds it.
    """
    migrate(chdb, db)
    writer = ClickHouseWriter(chdb, db)
    items = list(read_events(io.StringIO(jsonl(_forensic_events()))))
    seeded = Seeded()
    tables: dict[str, list[dict[str, object]]] = {}
    hashes: dict[str, str] = {}
    for i, (_, event) in enumerate(items):
        table, row = to_row(event, Provenance("events", 0, i, T))
        tables.setdefault(table, []).append(row)
        key = next(row[k] for k in ("call_id", "session_id", "grant_id") if k in row)
        seeded.ids[(event.event_type, key)] = row["event_id"]
        seeded.keys[str(row["event_id"])] = (event.event_type, str(key))
        hashes[str(row["event_id"])] = str(row["_record_hash"])
    for i, (call, decision) in enumerate(replay(items).decisions):
        decided = call.event_time + _datetime.timedelta(seconds=1)
        evidence = build_evidence(call, decision, 1, True, False, decided, 1, "replay", "final")
        if copied:
            facts = {**decision.facts, "attribution_version": 1, "trigger": "replay", "kind": "final"}
            evidence = evidence.model_copy(
                update={"facts": facts, "fact_ids": [], "fact_hashes": [], "kind": "", "trigger": ""}
            )
        else:
            assert evidence.facts == {} and len(evidence.fact_hashes) == len(evidence.fact_ids)
            evidence = evidence.model_copy(update={"fact_hashes": [hashes[f] for f in evidence.fact_ids]})
        seeded.evidence[call.call_id] = evidence
        tables.setdefault("evidence", []).append(to_row(evidence, Provenance("audit.evidence", 0, i, T))[1])
    for table, rows in tables.items():
        writer.insert(table, rows, token=f"{db}-{table}")
    return seeded


@pytest.fixture(scope="module")
def forensics_db(chdb: Client) -> Seeded:
    """Database "forensics": evidence that references its facts."""
    return _seed_forensics(chdb, "forensics", copied=False)


@pytest.fixture(scope="module")
def forensics_v1_db(chdb: Client) -> Seeded:
    """Database "forensics_v1": the same events, evidence with the facts copied (written before references)."""
    return _seed_forensics(chdb, "forensics_v1", copied=True)


def forensic(client: Client, name: str, db: str = "forensics", **params: object) -> list[dict[str, object]]:
    """Rows of a shipped query as dicts; its columns are exactly those its header documents."""
    query = load_queries()[name]
    result = run_query(client, bind(query, params, db))
    assert result["columns"] == ([c.name for c in query.columns] if result["rows"] else [])
    return [dict(zip(result["columns"], row, strict=True)) for row in result["rows"]]


NO_GRANT: dict[str, object] = {
    "grant_id": None,
    "grant_status": None,
    "grant_issued_at": None,
    "grant_tools": [],
    "grant_resources": [],
    "grant_not_before": None,
    "grant_expires_at": None,
    "grant_granted_by": None,
}


def _in_force(
    name: str, status: str, tools: list[str], resources: list[str] | None = None, **times: str
) -> dict[str, object]:
    expires = times.get("expires")
    return {
        "grant_id": f"fx-{name}",
        "grant_status": status,
        "grant_issued_at": ts("10:00:00"),
        "grant_tools": tools,
        "grant_resources": resources or [],
        "grant_not_before": ts("10:00:00"),
        "grant_expires_at": ts(expires) if expires else None,
        "grant_granted_by": ALICE,
    }


def _activity(
    at: str, call: str, tool: str, resources: list[str], verdict: str, in_force: dict[str, object], *result: object
) -> dict[str, object]:
    server, tool_name = tool.split("/")
    return {
        "call_time": ts(at),
        "call_id": f"fx-{call}",
        "agent_id": "agent-1",
        "session_id": "fx-s1",
        "server": server,
        "tool": tool_name,
        "resources": resources,
        "verdict": verdict,
        **in_force,
        "result_status": result[0] if result else None,
        "result_duration_ms": result[1] if result else None,
    }


def test_forensic_agent_activity_has_the_grant_in_force_per_call(chdb: Client, forensics_db: Seeded) -> None:
    rows = forensic(chdb, "agent_activity", tenant="acme", principal=ALICE, since=ts("10:00:11"), until=ts("10:00:30"))
    write, b_txt, passwd = ["fs/write_file"], ["file:/data/b.txt"], ["file:/etc/passwd"]
    web = _in_force("web", "expired", ["web/fetch"], expires="10:00:20")
    assert rows == [
        _activity("10:00:11", "c-tool", "shell/exec", [], "out_of_scope_tool", NO_GRANT),
        _activity("10:00:12", "c-res", "fs/read_file", passwd, "out_of_scope_resource", NO_GRANT, "error", 3.0),
        _activity("10:00:25", "c-expired", "web/fetch", ["url:https://example.com"], "expired_grant", web),
        _activity(
            "10:00:29",
            "c-write-ok",
            "fs/write_file",
            b_txt,
            "in_scope",
            _in_force("write", "active", write),
            "ok",
            40.0,
        ),
        _activity(
            "10:00:30", "c-revoked", "fs/write_file", b_txt, "revoked_grant", _in_force("write", "revoked", write)
        ),
    ]
    read = _in_force("read", "active", ["fs/read_*"], ["file:/data/*"])
    assert forensic(chdb, "agent_activity", tenant="acme", principal=ALICE, until=ts("10:00:10")) == [
        _activity("10:00:10", "c-in", "fs/read_file", ["file:/data/a.txt"], "in_scope", read, "ok", 12.5),
        _activity("10:00:10", "c-mismatch", "fs/read_file", [], "identity_mismatch", NO_GRANT),
    ]
    assert forensic(chdb, "agent_activity", tenant="acme", principal=ALICE, agent_id="agent-2") == []


def test_forensic_calls_after_grant_end_says_how_long_after(chdb: Client, forensics_db: Seeded) -> None:
    call = {"principal": ALICE, "agent_id": "agent-1", "session_id": "fx-s1"}
    assert forensic(chdb, "calls_after_grant_end", tenant="acme") == [
        {
            "call_time": ts("10:00:30"),
            "call_id": "fx-c-revoked",
            **call,
            "server": "fs",
            "tool": "write_file",
            "verdict": "revoked_grant",
            "grant_id": "fx-write",
            "ended_by": "revoked",
            "ended_at": ts("10:00:30"),
            "after_ms": 0,
            "revoked_by": ALICE,
            "reason": "test",
        },
        {
            "call_time": ts("10:00:25"),
            "call_id": "fx-c-expired",
            **call,
            "server": "web",
            "tool": "fetch",
            "verdict": "expired_grant",
            "grant_id": "fx-web",
            "ended_by": "expired",
            "ended_at": ts("10:00:20"),
            "after_ms": 5000,
            "revoked_by": None,
            "reason": None,
        },
    ]
    assert forensic(chdb, "calls_after_grant_end", tenant="acme", principal=BOB) == []
    assert forensic(chdb, "calls_after_grant_end", tenant="globex") == []


def test_forensic_grant_queries_read_evidence_written_before_fact_references(
    chdb: Client, forensics_db: Seeded, forensics_v1_db: Seeded
) -> None:
    """Rows with the facts copied (no fact_ids) give the same answers as rows that reference them."""
    assert all(not e.fact_ids and e.facts.get("grants") is not None for e in forensics_v1_db.evidence.values())
    assert any(e.fact_ids for e in forensics_db.evidence.values())
    asked: list[tuple[str, dict[str, object]]] = [
        ("agent_activity", {"tenant": "acme", "principal": ALICE}),
        ("agent_activity", {"tenant": "acme", "principal": ALICE, "since": ts("10:00:20")}),
        ("calls_after_grant_end", {"tenant": "acme"}),
        ("calls_after_grant_end", {"tenant": "acme", "principal": ALICE, "until": ts("10:00:26")}),
    ]
    for name, params in asked:
        now = forensic(chdb, name, **params)
        assert now and any(r["grant_id"] for r in now)
        assert forensic(chdb, name, db="forensics_v1", **params) == now, (name, params)


def _timeline_row(**values: object) -> dict[str, object]:
    columns = [c.name for c in load_queries()["session_timeline"].columns]
    return {**dict.fromkeys(columns), "resources": [], **values}


def test_forensic_session_timeline_orders_facts_and_calls_with_results(chdb: Client, forensics_db: Seeded) -> None:
    ids = forensics_db.ids

    def call(at: str, name: str, verdict: str, grant_id: str | None) -> dict[str, object]:
        return _timeline_row(
            at=ts(at),
            kind="tool_call",
            call_id=f"fx-{name}",
            principal=BOB,
            agent_id="agent-2",
            server="fs",
            tool="read_file",
            verdict=verdict,
            grant_id=grant_id,
            event_id=ids[("tool_call", f"fx-{name}")],
        )

    assert forensic(chdb, "session_timeline", tenant="acme", session_id="fx-s2") == [
        _timeline_row(
            at=ts("10:00:00"),
            kind="session_bound",
            principal=BOB,
            agent_id="agent-2",
            valid_from=ts("10:00:00"),
            event_id=ids[("session_bound", "fx-s2")],
        ),
        call("10:00:20", "c-nogrant", "no_grant", None),
        call("10:00:45", "c-bob", "in_scope", "fx-bob"),
        _timeline_row(at=ts("10:00:50"), kind="session_ended", event_id=ids[("session_ended", "fx-s2")]),
        call("10:00:55", "c-ended", "session_expired", None),
    ]
    rows = forensic(chdb, "session_timeline", tenant="acme", session_id="fx-s1")
    picked = ("at", "kind", "call_id", "verdict", "grant_id", "result_status", "result_duration_ms", "result_error")
    assert [tuple(r[k] for k in picked) for r in rows] == [
        (ts("10:00:00"), "session_bound", None, None, None, None, None, None),
        (ts("10:00:10"), "tool_call", "fx-c-in", "in_scope", "fx-read", "ok", 12.5, None),
        (ts("10:00:10"), "tool_call", "fx-c-mismatch", "identity_mismatch", None, None, None, None),
        (ts("10:00:11"), "tool_call", "fx-c-tool", "out_of_scope_tool", None, None, None, None),
        (ts("10:00:12"), "tool_call", "fx-c-res", "out_of_scope_resource", None, "error", 3.0, "permission denied"),
        (ts("10:00:25"), "tool_call", "fx-c-expired", "expired_grant", "fx-web", None, None, None),
        (ts("10:00:29"), "tool_call", "fx-c-write-ok", "in_scope", "fx-write", "ok", 40.0, None),
        (ts("10:00:30"), "tool_call", "fx-c-revoked", "revoked_grant", "fx-write", None, None, None),
        (ts("10:00:31"), "tool_call", "fx-c-early", "not_yet_valid", "fx-later", None, None, None),
    ]


def test_forensic_principals_with_violations_are_ranked(chdb: Client, forensics_db: Seeded) -> None:
    alice = {
        "rank": 1,
        "tenant": "acme",
        "principal": ALICE,
        "violations": 6,
        "calls": 8,
        "violating_agents": 1,
        "verdicts": [
            "expired_grant",
            "identity_mismatch",
            "not_yet_valid",
            "out_of_scope_resource",
            "out_of_scope_tool",
            "revoked_grant",
        ],
        "first_violation": ts("10:00:10"),
        "last_violation": ts("10:00:31"),
    }
    bob = {
        "rank": 2,
        "tenant": "acme",
        "principal": BOB,
        "violations": 2,
        "calls": 3,
        "violating_agents": 1,
        "verdicts": ["no_grant", "session_expired"],
        "first_violation": ts("10:00:20"),
        "last_violation": ts("10:00:55"),
    }
    globex = {**bob, "tenant": "globex", "principal": ALICE, "violations": 1, "calls": 1, "verdicts": ["no_grant"]}
    globex.update(first_violation=ts("10:00:10"), last_violation=ts("10:00:10"))
    assert forensic(chdb, "principals_with_violations") == [alice, bob, {**globex, "rank": 3}]
    assert forensic(chdb, "principals_with_violations", tenant="globex") == [{**globex, "rank": 1}]
    assert forensic(chdb, "principals_with_violations", limit=1) == [alice]
    assert forensic(chdb, "principals_with_violations", until=ts("10:00:10")) == [
        {**alice, "violations": 1, "calls": 2, "verdicts": ["identity_mismatch"], "last_violation": ts("10:00:10")},
        {**globex, "rank": 2},
    ]


def _first_seen(agent: str, tool: str, first: str, call: str, verdict: str, last: str, calls: int) -> dict[str, object]:
    server, tool_name = tool.split("/")
    principal = ALICE if agent == "agent-1" else BOB
    return {
        "tenant": "acme",
        "agent_id": agent,
        "server": server,
        "tool": tool_name,
        "first_seen": ts(first),
        "first_call_id": f"fx-{call}",
        "first_principal": principal,
        "first_verdict": verdict,
        "last_seen": ts(last),
        "calls": calls,
    }


def test_forensic_first_seen_tools_per_agent(chdb: Client, forensics_db: Seeded) -> None:
    expected = [
        _first_seen("agent-1", "fs/read_file", "10:00:10", "c-in", "in_scope", "10:00:12", 3),
        _first_seen("agent-1", "shell/exec", "10:00:11", "c-tool", "out_of_scope_tool", "10:00:11", 1),
        _first_seen("agent-1", "web/fetch", "10:00:25", "c-expired", "expired_grant", "10:00:25", 1),
        _first_seen("agent-1", "fs/write_file", "10:00:29", "c-write-ok", "in_scope", "10:00:30", 2),
        _first_seen("agent-1", "db/query", "10:00:31", "c-early", "not_yet_valid", "10:00:31", 1),
        _first_seen("agent-2", "fs/read_file", "10:00:20", "c-nogrant", "no_grant", "10:00:55", 3),
    ]
    assert forensic(chdb, "first_seen_tools", tenant="acme") == expected
    assert forensic(chdb, "first_seen_tools", tenant="acme", agent_id="agent-1", since=ts("10:00:20")) == expected[2:5]


def test_forensic_unused_grants(chdb: Client, forensics_db: Seeded) -> None:
    grant_row = {
        "tenant": "acme",
        "principal": ALICE,
        "agent_id": "agent-1",
        "issued_at": ts("10:00:00"),
        "versions": 1,
        "resources": [],
        "granted_by": ALICE,
        "purpose": "test",
        "revoked_at": None,
        "refused_calls": 1,
    }
    later = {**grant_row, "grant_id": "fx-later", "tools": ["db/*"], "not_before": ts("10:05:00"), "expires_at": None}
    web = {**grant_row, "grant_id": "fx-web", "tools": ["web/fetch"], "not_before": ts("10:00:00")}
    web["expires_at"] = ts("10:00:20")
    assert forensic(chdb, "unused_grants") == [later, web]
    assert forensic(chdb, "unused_grants", tenant="initech") == []
    assert forensic(chdb, "unused_grants", principal=BOB) == []


def test_forensic_call_evidence_has_raw_events_and_every_verdict_version(chdb: Client, forensics_db: Seeded) -> None:
    ids, evidence = forensics_db.ids, forensics_db.evidence
    columns = [c.name for c in load_queries()["call_evidence"].columns]
    empty = {**dict.fromkeys(columns), "resources": [], "reasons": [], "fact_ids": [], "fact_hashes": []}

    def raw_call(name: str, at: str, resources: list[str], attested: str | None) -> dict[str, object]:
        call_id = f"fx-{name}"
        return {
            **empty,
            "call_id": call_id,
            "at": ts(at),
            "kind": "tool_call",
            "id": ids[("tool_call", call_id)],
            "session_id": "fx-s1",
            "server": "fs",
            "tool": "read_file",
            "resources": resources,
            "arguments": "{}",
            "attested": attested,
        }

    def verdict(name: str, at: str) -> dict[str, object]:
        e = evidence[f"fx-{name}"]
        return {
            **empty,
            "call_id": e.call_id,
            "at": ts(at),
            "kind": "evidence",
            "id": e.evidence_id,
            "session_id": "fx-s1",
            "server": "fs",
            "tool": "read_file",
            "version": 1,
            "verdict": e.verdict,
            "grant_id": e.matched_grant_id,
            "final": True,
            "late": False,
            "reasons": list(e.reasons),
            "facts": "{}",
            "fact_ids": list(e.fact_ids),
            "fact_hashes": list(e.fact_hashes),
            "referenced_facts": referenced_text[e.call_id],
        }

    def referenced(call: str) -> list[dict[str, object]]:
        """What referenced_facts says of a version's facts: found, with the hash it was decided on."""
        e = evidence[f"fx-{call}"]
        assert e.fact_ids and all(h.startswith("sha256:") for h in e.fact_hashes)
        return [
            {"event_id": i, "record_hash": h, "found": True, "hash_matches": True, "key": forensics_db.keys[i]}
            for i, h in zip(e.fact_ids, e.fact_hashes, strict=True)
        ]

    result = {
        **empty,
        "call_id": "fx-c-in",
        "at": ts("10:00:10.500"),
        "kind": "tool_result",
        "id": ids[("tool_result", "fx-c-in")],
        "session_id": "fx-s1",
        "result_status": "ok",
        "result_duration_ms": 12.5,
    }
    rows = forensic(chdb, "call_evidence", tenant="acme", call_ids=["fx-c-mismatch", "fx-c-in"])
    # the referenced facts, joined from the raw tables: the session binding, then the grant version
    rows_referenced: dict[str, object] = {}
    referenced_text: dict[str, object] = {}
    for row in rows:
        if row["kind"] == "evidence" and row["referenced_facts"] is not None:
            referenced_text[str(row["call_id"])] = row["referenced_facts"]
            got = json.loads(str(row["referenced_facts"]))
            for f in got:
                fact = f.pop("fact")
                assert fact["event_id"] == f["event_id"]
                f["key"] = (fact["event_type"], fact.get("grant_id", fact.get("session_id")))
            rows_referenced[str(row["call_id"])] = got
    assert rows_referenced["fx-c-in"] == referenced("c-in")
    assert rows_referenced["fx-c-mismatch"] == referenced("c-mismatch")
    in_keys = [f["key"] for f in referenced("c-in")]
    assert in_keys[0] == ("session_bound", "fx-s1") and ("grant_issued", "fx-read") in in_keys
    assert [f["key"] for f in referenced("c-mismatch")] == [("session_bound", "fx-s1")]
    assert rows == [
        raw_call("c-in", "10:00:10", ["file:/data/a.txt"], None),
        result,
        verdict("c-in", "10:00:11"),
        raw_call("c-mismatch", "10:00:10", [], canonical_json({"sub": BOB})),
        verdict("c-mismatch", "10:00:11"),
    ]
    assert rows[2]["verdict"] == "in_scope" and rows[4]["verdict"] == "identity_mismatch"
    assert forensic(chdb, "call_evidence", tenant="globex", call_ids=["fx-c-in"]) == []


def test_forensic_delegation_timeline_and_grant_history(chdb: Client, forensics_db: Seeded) -> None:
    ids = forensics_db.ids
    columns = [c.name for c in load_queries()["delegation_timeline"].columns]
    empty = {**dict.fromkeys(columns), "tools": [], "resources": [], "principal": ALICE, "agent_id": "agent-1"}

    def issued(
        name: str, tools: list[str], resources: list[str], not_before: str, expires: str | None
    ) -> dict[str, object]:
        grant_id = f"fx-{name}"
        return {
            **empty,
            "at": ts("10:00:00"),
            "kind": "grant_issued",
            "grant_id": grant_id,
            "tools": tools,
            "resources": resources,
            "not_before": ts(not_before),
            "expires_at": ts(expires) if expires else None,
            "event_id": ids[("grant_issued", grant_id)],
        }

    def call(
        at: str, name: str, tool: str, resources: list[str], verdict: str, grant_id: str, status: object
    ) -> dict[str, object]:
        server, tool_name = tool.split("/")
        return {
            **empty,
            "at": ts(at),
            "kind": "tool_call",
            "grant_id": grant_id,
            "call_id": f"fx-{name}",
            "session_id": "fx-s1",
            "server": server,
            "tool": tool_name,
            "resources": resources,
            "verdict": verdict,
            "result_status": status,
            "event_id": ids[("tool_call", f"fx-{name}")],
        }

    b_txt = ["file:/data/b.txt"]
    write_issued = issued("write", ["fs/write_file"], [], "10:00:00", None)
    revoked = {
        **empty,
        "at": ts("10:00:30"),
        "kind": "grant_revoked",
        "grant_id": "fx-write",
        "revoked_by": ALICE,
        "reason": "test",
        "event_id": ids[("grant_revoked", "fx-write")],
    }
    write_ok = call("10:00:29", "c-write-ok", "fs/write_file", b_txt, "in_scope", "fx-write", "ok")
    write_revoked = call("10:00:30", "c-revoked", "fs/write_file", b_txt, "revoked_grant", "fx-write", None)
    delegation = dict(tenant="acme", principal=ALICE, agent_id="agent-1")
    assert forensic(chdb, "delegation_timeline", **delegation, since=ts("10:00:25"), until=ts("10:00:30")) == [
        issued("later", ["db/*"], [], "10:05:00", None),
        issued("read", ["fs/read_*"], ["file:/data/*"], "10:00:00", None),
        issued("web", ["web/fetch"], [], "10:00:00", "10:00:20"),
        write_issued,
        call("10:00:25", "c-expired", "web/fetch", ["url:https://example.com"], "expired_grant", "fx-web", None),
        write_ok,
        revoked,
        write_revoked,
    ]
    assert forensic(chdb, "grant_history", tenant="acme", grant_id="fx-write") == [
        write_issued,
        write_ok,
        revoked,
        write_revoked,
    ]
    everything = forensic(chdb, "delegation_timeline", **delegation)
    assert len(everything) == 5 + 8  # four grant_issued and a grant_revoked; eight calls
    assert forensic(chdb, "delegation_timeline", **delegation, grant_id="fx-write") == [
        r for r in everything if r["grant_id"] == "fx-write"
    ]


def test_forensic_tool_digests_mark_a_changed_definition(chdb: Client, forensics_db: Seeded) -> None:
    def call(i: int, tool: str, digest: str | None, previous: str | None, changed: bool) -> dict[str, object]:
        return {
            "call_time": ts(f"11:00:0{i + 1}"),
            "call_id": f"fx-d-{i}",
            "session_id": "fx-d1",
            "server": "git",
            "tool": tool,
            "tool_digest": digest,
            "previous_digest": previous,
            "changed": changed,
            "verdict": "in_scope",
            "grant_id": "fx-git",
        }

    pushes = [
        call(0, "push", "sha256:aaa", None, False),
        call(1, "push", "sha256:aaa", "sha256:aaa", False),
        call(2, "push", "sha256:bbb", "sha256:aaa", True),
    ]
    delegation = dict(tenant="initech", principal=CAROL, agent_id="agent-9")
    assert forensic(chdb, "tool_digests", **delegation) == [*pushes, call(3, "pull", None, None, False)]
    assert forensic(chdb, "tool_digests", **delegation, server="git", tool="push") == pushes
    assert forensic(chdb, "tool_digests", **delegation, since=ts("11:00:02"), until=ts("11:00:03")) == [
        call(1, "push", "sha256:aaa", None, False),
        call(2, "push", "sha256:bbb", "sha256:aaa", True),
    ]


INJECTIONS = [
    "'; DROP TABLE forensics.evidence; --",
    "x' OR '1'='1",
    "\\'; DROP TABLE forensics.evidence; --",
    "\\",
    "a\\' OR 1=1 -- ",
    "'\n; DROP TABLE forensics.evidence\n--",
    "{db}",
    "{tenant:String}",
    "%s %(x)s",
    "\x00\x01 ✓",
]


def test_forensic_injection_attempts_are_plain_string_values(chdb: Client, forensics_db: Seeded) -> None:
    echo = parse_query("echo", "-- question: echo?\n-- param v String: v\n-- column v: v\nSELECT {v:String} AS v")
    for value in INJECTIONS:
        assert run_query(chdb, bind(echo, {"v": value}, "forensics"))["rows"] == [[value]]
        assert forensic(chdb, "session_timeline", tenant="acme", session_id=value) == []
        assert forensic(chdb, "session_timeline", tenant=value, session_id="fx-s2") == []
    count = run_query(chdb, "SELECT count() FROM forensics.evidence")["rows"]
    assert count == [[len(forensics_db.evidence)]] and len(forensics_db.evidence) == 17


def test_forensics_cli_runs_a_query_end_to_end(
    chdb: Client, forensics_db: Seeded, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scopewatch.forensics_cli import forensics_app

    monkeypatch.setenv("SCOPEWATCH_CLICKHOUSE_DATABASE", "forensics")
    monkeypatch.setenv("COLUMNS", "400")
    monkeypatch.setattr("scopewatch.sqlclient.run_sql", lambda settings, sql: run_query(chdb, sql))
    result = CliRunner().invoke(forensics_app, ["calls_after_grant_end", "-p", "tenant=acme", "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == forensic(chdb, "calls_after_grant_end", tenant="acme")
    table = CliRunner().invoke(forensics_app, ["unused_grants", "--param", "tenant=acme"])
    assert table.exit_code == 0 and "fx-later" in table.stdout and "fx-web" in table.stdout


def test_forensic_queries_run_read_only(chdb: Client, forensics_db: Seeded) -> None:
    """The sink's endpoint and `scopewatch sql` use readonly=2 sessions: every query must work there."""
    required = {"String": "acme", "Array(String)": ["fx-c-in"]}
    for query in load_queries().values():
        values = {p.name: required[p.type] for p in query.params if p.required}
        sql = bind(query, values, "forensics")
        chdb.query(sql, settings={"readonly": 2})


# ------------------------------------------------------------------ scopewatch verify


def _seed_verify(chdb: Client, db: str, skip_seq: int | None = None, hashes: bool = True) -> dict[int, str]:
    """The story, stamped by two collectors, landed with final evidence from replay; call seq -> event_id.

    The evidence references its facts with their record hashes, as the live worker knows them (``hashes=False``:
    without, as a worker whose state predates them writes)."""
    from collectors.chain import ChainStamper
    from detections.live import build_evidence
    from schemas import ToolCall, parse_event
    from schemas.topics import topic_for
    from scopewatch.replay import replay
    from support.scenario import story

    migrate(chdb, db)
    writer = ClickHouseWriter(chdb, db)
    events = [parse_event(e) for e in story("vf")]
    facts = sorted((e for e in events if not isinstance(e, ToolCall)), key=lambda e: e.event_time)
    calls = [e for e in events if isinstance(e, ToolCall)]
    intake, wrap = ChainStamper("intake:test", epoch=1), ChainStamper("stdio:test", epoch=7)
    stamped = [intake.stamp(f) for f in facts] + [wrap.stamp(c) for c in calls]
    rows: dict[str, list[dict[str, object]]] = {}
    seqs = {}
    for i, e in enumerate(stamped):
        assert e.collector is not None
        if isinstance(e, ToolCall):
            seqs[e.collector.seq] = e.event_id
            if e.collector.seq == skip_seq:
                continue  # lost on the way
        table, row = to_row(e, Provenance(topic_for(e), 0, i, T))
        rows.setdefault(table, []).append(row)
    for table, batch in rows.items():
        writer.insert(table, batch, token=f"{db}-{table}")
    landed = {str(r["event_id"]): str(r["_record_hash"]) for batch in rows.values() for r in batch}
    result = replay(enumerate(events))
    evidence = []
    for i, (c, d) in enumerate(result.decisions):
        ev = build_evidence(c, d, 1, True, False, T, 1, "deadline", "final")
        assert ev.facts == {} and ev.fact_hashes == [""] * len(ev.fact_ids)  # replay knows no hashes
        if hashes:
            ev = ev.model_copy(update={"fact_hashes": [landed[f] for f in ev.fact_ids]})
        evidence.append(to_row(ev, Provenance("e", 0, i, T))[1])
    writer.insert("evidence", evidence, token=f"{db}-evidence")
    return seqs


def _verify(chdb: Client, db: str):  # type: ignore[no-untyped-def]
    from stream_jobs.verify import verify

    return verify(lambda sql: run_query(chdb, sql), db)


def _first_bad(report, collector: str):  # type: ignore[no-untyped-def]
    return next(c for c in report.collectors if c.collector_id == collector).first_bad


def test_verify_passes_on_clean_data(chdb: Client) -> None:
    _seed_verify(chdb, "vf_clean")
    report = _verify(chdb, "vf_clean")
    assert report.ok, report.problems
    assert {c.collector_id: c.events for c in report.collectors} == {"intake:test": 10, "stdio:test": 13}
    assert (report.calls_checked, report.verdicts_match, report.unstamped) == (13, 13, 0)
    referenced = chdb.query("SELECT sum(length(fact_ids)) FROM vf_clean.evidence").result_rows[0][0]
    assert report.facts_checked == referenced > 13 and report.fact_hashes_unknown == 0


def test_verify_counts_fact_references_without_hashes_and_checks_they_exist(chdb: Client) -> None:
    _seed_verify(chdb, "vf_nohash", hashes=False)
    report = _verify(chdb, "vf_nohash")
    assert report.ok, report.problems
    assert report.facts_checked == report.fact_hashes_unknown > 13
    bound = _fact_id(chdb, "vf_nohash", "identity_events", "event_type = 'session_bound'")
    chdb.command(f"ALTER TABLE vf_nohash.identity_events DELETE WHERE event_id = '{bound}' SETTINGS mutations_sync = 2")
    missing = [(p.kind, p.call_id, p.event_id) for p in _verify(chdb, "vf_nohash").fact_problems]
    assert missing == [("fact_missing", c, bound) for c in _calls_on(chdb, "vf_nohash", bound)]


def _fact_id(chdb: Client, db: str, table: str, where: str) -> str:
    return str(
        chdb.query(f"SELECT event_id FROM {db}.{table} WHERE {where} ORDER BY event_id LIMIT 1").result_rows[0][0]
    )


def _calls_on(chdb: Client, db: str, fact_id: str) -> list[str]:
    """The calls whose evidence references the fact, in verify's order."""
    rows = chdb.query(f"SELECT call_id FROM {db}.evidence WHERE has(fact_ids, '{fact_id}') ORDER BY call_id")
    calls = [str(r[0]) for r in rows.result_rows]
    assert calls
    return calls


def test_verify_names_each_call_whose_evidence_rests_on_an_edited_fact(chdb: Client) -> None:
    _seed_verify(chdb, "vf_fact")
    write = _fact_id(chdb, "vf_fact", "consent_events", "event_type = 'grant_issued' AND grant_id = 'vf-write'")
    chdb.command(
        "ALTER TABLE vf_fact.consent_events UPDATE tools = ['*']"
        f" WHERE event_id = '{write}' SETTINGS mutations_sync = 2"
    )
    report = _verify(chdb, "vf_fact")
    calls = _calls_on(chdb, "vf_fact", write)
    assert [(p.kind, p.call_id, p.event_id, p.table) for p in report.fact_problems] == [
        ("fact_mismatch", c, write, "consent_events") for c in calls
    ]
    assert "no longer hashes" in report.fact_problems[0].detail
    assert f"call {calls[0]}" in report.fact_problems[0].where() and write in report.fact_problems[0].where()
    assert report.to_json()["problems"][-1]["kind"] == "fact_mismatch"


def test_verify_names_a_fact_whose_stored_hash_was_forged_too(chdb: Client) -> None:
    from schemas import record_hash
    from stream_jobs.verify import event_from_row

    _seed_verify(chdb, "vf_fact_forge")
    bound = _fact_id(chdb, "vf_fact_forge", "identity_events", "event_type = 'session_bound'")
    chdb.command(
        "ALTER TABLE vf_fact_forge.identity_events UPDATE principal = 'mallory@acme.example'"
        f" WHERE event_id = '{bound}' SETTINGS mutations_sync = 2"
    )
    result = chdb.query(f"SELECT * FROM vf_fact_forge.identity_events WHERE event_id = '{bound}'")
    row = {k: _plain(v) for k, v in zip(result.column_names, result.result_rows[0], strict=True)}
    forged = record_hash(event_from_row("identity_events", row))
    chdb.command(
        f"ALTER TABLE vf_fact_forge.identity_events UPDATE _record_hash = '{forged}'"
        f" WHERE event_id = '{bound}' SETTINGS mutations_sync = 2"
    )
    problems = _verify(chdb, "vf_fact_forge").fact_problems
    assert [(p.kind, p.call_id, p.event_id) for p in problems] == [
        ("fact_mismatch", c, bound) for c in _calls_on(chdb, "vf_fact_forge", bound)
    ]
    assert "stored _record_hash differs" in problems[0].detail


def test_verify_names_a_deleted_row(chdb: Client) -> None:
    seqs = _seed_verify(chdb, "vf_del")
    chdb.command(f"ALTER TABLE vf_del.tool_calls DELETE WHERE event_id = '{seqs[5]}' SETTINGS mutations_sync = 2")
    bad = _first_bad(_verify(chdb, "vf_del"), "stdio:test")
    assert (bad.kind, bad.seq) == ("gap", 5)


def test_verify_names_a_dropped_event(chdb: Client) -> None:
    _seed_verify(chdb, "vf_drop", skip_seq=9)
    report = _verify(chdb, "vf_drop")
    bad = _first_bad(report, "stdio:test")
    assert (bad.kind, bad.seq) == ("gap", 9) and not report.ok


def test_verify_names_an_edited_row_and_the_verdict_it_no_longer_supports(chdb: Client) -> None:
    seqs = _seed_verify(chdb, "vf_edit")
    chdb.command(
        f"ALTER TABLE vf_edit.tool_calls UPDATE tool = 'exec' WHERE event_id = '{seqs[1]}' SETTINGS mutations_sync = 2"
    )
    report = _verify(chdb, "vf_edit")
    bad = _first_bad(report, "stdio:test")
    assert (bad.kind, bad.seq, bad.event_id) == ("edited", 1, seqs[1])
    assert [p.kind for p in report.verdict_problems] == ["mismatch"]  # in_scope on fs/read_file, not on fs/exec


def test_verify_names_an_edit_that_also_forged_the_stored_hash(chdb: Client) -> None:
    from schemas import record_hash
    from stream_jobs.verify import event_from_row

    seqs = _seed_verify(chdb, "vf_forge")
    chdb.command(
        f"ALTER TABLE vf_forge.tool_calls UPDATE tool = 'exec' WHERE event_id = '{seqs[3]}' SETTINGS mutations_sync = 2"
    )
    result = chdb.query(f"SELECT * FROM vf_forge.tool_calls WHERE event_id = '{seqs[3]}'")
    row = {k: v for k, v in zip(result.column_names, result.result_rows[0], strict=True)}
    forged = record_hash(event_from_row("tool_calls", {k: _plain(v) for k, v in row.items()}))
    chdb.command(
        f"ALTER TABLE vf_forge.tool_calls UPDATE _record_hash = '{forged}'"
        f" WHERE event_id = '{seqs[3]}' SETTINGS mutations_sync = 2"
    )
    bad = _first_bad(_verify(chdb, "vf_forge"), "stdio:test")
    assert (bad.kind, bad.seq, bad.event_id) == ("chain_break", 3, seqs[3])


def test_verify_names_reordered_rows(chdb: Client) -> None:
    seqs = _seed_verify(chdb, "vf_swap")
    a, b = seqs[6], seqs[7]
    chdb.command(
        f"ALTER TABLE vf_swap.tool_calls UPDATE collector_seq = if(event_id = '{a}', 7, 6)"
        f" WHERE event_id IN ('{a}', '{b}') SETTINGS mutations_sync = 2"
    )
    bad = _first_bad(_verify(chdb, "vf_swap"), "stdio:test")
    assert bad.kind == "edited" and bad.seq == 6 and bad.event_id == b


def test_verify_names_a_stored_verdict_the_raw_events_do_not_support(chdb: Client) -> None:
    from schemas import Evidence

    _seed_verify(chdb, "vf_verdict")
    base = next(r for t, r in SAMPLES if t == "evidence")
    assert isinstance(base, Evidence)
    forged = base.model_copy(
        update={"call_id": "vf-c-revoked", "tenant": "acme", "version": 99, "final": True, "verdict": "in_scope"}
    )
    ClickHouseWriter(chdb, "vf_verdict").insert("evidence", [to_row(forged, Provenance("e", 0, 999, T))[1]], token="f")
    report = _verify(chdb, "vf_verdict")
    assert [(p.kind, p.call_id) for p in report.problems] == [("mismatch", "vf-c-revoked")]
    assert "replay of the raw events gives revoked_grant" in report.problems[0].detail


def _plain(value: object) -> object:
    from stream_jobs.clickhouse import jsonable

    return jsonable(value)


# -- the sink's columnar fast path (issue 4, sink throughput) ----------------------------------------
# The fast path (stream_jobs/columnar.py) must store exactly what the old row path stored, and the
# sink must still dead-letter every kind of bad input while the good records of the batch land.


def _columnar_records() -> list[Any]:
    """Records of every type, with the edge cases: unicode, empty optionals, collector stamps, big facts."""
    from schemas import Collector, DeadLetter, Evidence, Finding, PageAttempt, ToolCall, ToolResult

    records: list[Any] = [record for _, record in SAMPLES]
    stamp = Collector(id="col-ü", epoch=7, seq=2**40, prev_hash="sha256:" + "cd" * 32)
    call = next(r for _, r in SAMPLES if isinstance(r, ToolCall))
    ev = next(r for _, r in SAMPLES if isinstance(r, Evidence))
    for _, record in SAMPLES:  # every raw event type again, stamped and without unknown fields
        if hasattr(record, "collector"):
            declared = {k: v for k, v in record.model_dump().items() if k in type(record).model_fields}
            fields = {**declared, "collector": stamp, "event_id": str(uuid.uuid4())}
            records.append(type(record).model_validate(fields))
    records += [
        call.model_copy(update={"event_id": str(uuid.uuid4()), "tool": "日本語", "arguments": {"q": "😀\u2028\x01"}}),
        ToolCall(
            event_id=str(uuid.uuid4()),
            event_time=T,
            tenant="t",
            call_id="c-empty",
            session_id="s",
            server="fs",
            tool="read",
            arguments={},
            resources=[],
            transport="http",
            collector=Collector(id="c", epoch=0, seq=0),
        ),
        ToolResult(
            event_id=str(uuid.uuid4()),
            event_time=T,
            tenant="t",
            call_id="c",
            session_id="s",
            status="error",
            duration_ms=0.1 + 0.2,
            error="boom \u00e9",
        ),
        ev.model_copy(
            update={
                "evidence_id": "big",
                "principal": "渡辺",
                "agent_id": "a",
                "matched_grant_id": "g",
                "reasons": ["r1", "ü"],
                "version": 2**32 - 1,
                "final": True,
                "late": True,
                "facts": {f"k{i:04d}": {"id": str(uuid.UUID(int=i)), "n": i, "ok": i % 3 == 0} for i in range(2000)},
            }
        ),
        Finding(
            finding_id="f-1",
            dedup_key="revoked_grant|acme|alice|a|g",
            rule_id="revoked_grant",
            rule_version=1,
            severity="high",
            title="Tool call under a revoked grant",
            summary="ünïcode",
            tenant="acme",
            call_id="c",
            call_ids=["c", "d"],
            session_id="s",
            forensic_query="grant_history",
            first_call_time=T,
            last_call_time=T,
            details={"seconds_after_revocation": 1.5},
            detected_at=T,
        ),
        PageAttempt(
            attempt_id=str(uuid.uuid4()),
            page_key="k#1",
            dedup_key="k",
            finding_id="f-1",
            rule_id="revoked_grant",
            severity="critical",
            tenant="acme",
            channel="slack",
            route="oncall",
            attempt=0,
            outcome="suppressed",
            findings_grouped=2,
            attempted_at=T,
            latency_ms=0.0,
        ),
        DeadLetter(
            dead_letter_id="dl-2",
            source_topic="x",
            source_partition=2**32 - 1,
            source_offset=2**63 - 1,
            key="ключ",
            reason="bad",
            stage="sink",
            payload_b64="",
            failed_at=T,
        ),
    ]
    return records


def _messages(values: list[bytes], topic: str = "t") -> list[Any]:
    from aiokafka.structs import ConsumerRecord

    return [
        ConsumerRecord(topic, 0, offset, 0, 0, None, value, None, 0, len(value), ())
        for offset, value in enumerate(values)
    ]


def _table_bytes(client: Client, database: str, table: str) -> bytes:
    order = "attempt_id" if table == "pages" else "_offset"
    data: bytes = client.raw_query(
        f"SELECT * FROM {database}.{table} ORDER BY {order}", fmt="RowBinaryWithNamesAndTypes"
    )
    return data


def test_fast_path_stores_the_same_bytes_as_the_row_path(chdb: Client) -> None:
    import io
    from collections import defaultdict
    from datetime import UTC, datetime

    from fastavro import schemaless_writer

    from schemas import Evidence, decode, encode
    from schemas.codec import MAGIC, _registry
    from stream_jobs.rows import COLUMNS
    from stream_jobs.sink import Batch, ClickHouseSink, SinkConfig

    migrate(chdb, "rowpath")
    migrate(chdb, "colpath")
    migrate(chdb, "nativepath")
    records = _columnar_records()
    values = [encode(r) for r in records]
    entry = _registry().current[Evidence]
    for facts in ('{"b": 2, "a": 1}', '{"é":"\\u00e9"}'):  # valid JSON, not canonical: the full path canonicalises
        body = io.BytesIO()
        body.write(MAGIC + entry.fingerprint)
        rec = {**next(r for r in records if isinstance(r, Evidence)).model_dump(), "facts": facts, "extra_json": None}
        schemaless_writer(body, entry.schema, {**rec, "evidence_id": facts})
        values.append(body.getvalue())
    now = datetime(2026, 11, 21, 10, 0, 1, 234567, tzinfo=UTC)

    # the row path as the sink ran it before: decode + to_row, dict rows inserted row-oriented
    rows: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for offset, value in enumerate(values):
        table, row = to_row(decode(value), Provenance("t", 0, offset, now))
        rows[table].append(row)
    for table, batch_rows in rows.items():
        columns = list(batch_rows[0])
        if table == "evidence":  # a view since 0010: the writer stores its lists and narrow rows
            ClickHouseWriter(chdb, "rowpath").insert(table, batch_rows, f"row-{table}")
            continue
        chdb.insert(
            f"rowpath.{table}",
            [[row[c] for c in columns] for row in batch_rows],
            column_names=columns,
            settings={"insert_deduplication_token": f"row-{table}", "async_insert": 0},
        )

    # the sink's own absorb and insert: into chDB as an Arrow table; as into a server (Native, column-oriented)
    arrow_writer = ClickHouseWriter(chdb, "colpath")
    assert arrow_writer._chdb_path is not None
    native_writer = ClickHouseWriter(chdb, "nativepath")
    native_writer._chdb_path = None
    sink = ClickHouseSink(SinkConfig(bootstrap="", topics=[], group="g"), arrow_writer)
    batch = Batch()
    sink._absorb_many(batch, _messages(values), now)
    for table, batch_rows in batch.rows.items():
        sink._insert(table, batch_rows, batch.token(table))
        native_writer.insert_columns(table, list(COLUMNS[table]), list(zip(*batch_rows, strict=True)), "n")
    extras = sum(1 for r in records if r.model_extra or (getattr(r, "collector", None) and r.collector.model_extra))
    assert sink.counters["full_path"] == extras + 2  # unknown fields and non-canonical JSON only
    assert sink.counters["dead_letters"] == 0

    assert set(rows) == set(COLUMNS)
    for table in COLUMNS:
        old, new = _table_bytes(chdb, "rowpath", table), _table_bytes(chdb, "colpath", table)
        assert new == old, table
        assert _table_bytes(chdb, "nativepath", table) == old, table
        assert int(chdb.command(f"SELECT count() FROM colpath.{table}")) == len(rows[table])


@pytest.mark.parametrize("client", ["librdkafka", "aiokafka"])
def test_sink_dead_letters_every_kind_of_bad_record_and_stores_the_good_ones(
    chdb: Client, kafka_broker: KafkaBroker, tmp_path: Path, cache_dir: Path, client: str
) -> None:
    import asyncio
    import io
    import json
    import re

    from aiokafka import AIOKafkaProducer
    from fastavro import parse_schema, schemaless_writer

    from schemas import Evidence, PageAttempt, ToolCall, ToolResult, encode, register_schema, topic_for
    from schemas.codec import AVRO_DIR, MAGIC, _registry
    from scopewatch.stack.kafka import create_topics
    from stream_jobs.runtime.settings import Settings
    from stream_jobs.service import sink_topics
    from stream_jobs.sink import ClickHouseSink, SinkConfig

    def raw(model: type[Any], record: dict[str, Any], schema: Any = None, fingerprint: bytes | None = None) -> bytes:
        entry = _registry().current[model]
        buf = io.BytesIO()
        buf.write(MAGIC + (fingerprint or entry.fingerprint))
        schemaless_writer(buf, schema or entry.schema, {"extra_json": None, **record})
        return buf.getvalue()

    good = _columnar_records()
    ev = next(r for r in good if isinstance(r, Evidence)).model_dump()
    call = next(r for r in good if isinstance(r, ToolCall) and not r.model_extra)
    call_rec = {**call.model_dump(), "arguments": '{"path":"/x"}', "claimed": "{}", "attested": None}
    result_rec = next(r for r in good if isinstance(r, ToolResult)).model_dump()
    page = next(r for r in good if isinstance(r, PageAttempt)).model_dump()
    facts = '{"a":1}'
    # an older ToolResult schema without the required "status": it decodes, the model refuses it
    older = json.loads((AVRO_DIR / "tool_result.avsc").read_text())
    older["fields"] = [f for f in older["fields"] if f["name"] != "status"]
    older_fp = register_schema(older, ToolResult)
    evidence_message = encode(next(r for r in good if isinstance(r, Evidence)))
    bad: dict[str, tuple[bytes, str]] = {
        "undecodable bytes": (b"\x00\x01not avro", "not Avro single-object encoding"),
        "empty message": (b"", "empty message"),
        "unknown schema fingerprint": (MAGIC + b"\x01" * 8 + evidence_message[10:], "unknown schema fingerprint"),
        "truncated body": (evidence_message[:-7], "truncated|corrupt"),
        "trailing bytes": (evidence_message + b"\x00\x00", "trailing bytes"),
        "missing required field": (
            raw(
                ToolResult,
                {k: v for k, v in result_rec.items() if k != "status"},
                parse_schema(older),
                older_fp,
            ),
            "missing required field 'status'",
        ),
        "event id not a UUID": (raw(ToolCall, {**call_rec, "event_id": "1234"}), "not a UUID"),
        "transport not allowed": (raw(ToolCall, {**call_rec, "transport": "pigeon"}), "transport"),
        "facts not an object": (raw(Evidence, {**ev, "facts": "[1]"}), "facts"),
        "facts not JSON": (raw(Evidence, {**ev, "facts": "{oops"}), "not valid JSON"),
        "facts with a lone surrogate": (raw(Evidence, {**ev, "facts": '{"a":"\\udc00"}'}), "lone surrogate"),
        "version beyond UInt32": (raw(Evidence, {**ev, "facts": facts, "version": 2**32}), "does not fit"),
        "version 0": (raw(Evidence, {**ev, "facts": facts, "version": 0}), "version"),
        "http status beyond UInt16": (raw(PageAttempt, {**page, "http_status": 70_000}), "http_status"),
        "unknown verdict": (raw(Evidence, {**ev, "facts": facts, "verdict": "probably_fine"}), "not a known verdict"),
    }

    run = uuid.uuid4().hex[:8]
    settings = Settings(
        home=tmp_path / "home", cache_dir=cache_dir, bootstrap=kafka_broker.config.bootstrap, topic_prefix=f"dl{run}."
    )
    asyncio.run(create_topics(settings.kafka_bootstrap, settings.topics.all(), 1))
    bad_topic = settings.topics.evidence

    async def produce() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=settings.kafka_bootstrap, acks="all")
        await producer.start()
        try:
            sends = []
            for name in bad:  # interleaved with good ones, in one batch
                sends.append(await producer.send(bad_topic, bad[name][0]))
                sends.append(await producer.send(bad_topic, evidence_message))
            for record in good:
                sends.append(await producer.send(topic_for(record, settings.topics), encode(record)))
            await asyncio.gather(*sends)
        finally:
            await producer.stop()

    asyncio.run(produce())
    db = f"dl_{client}"
    migrate(chdb, db)
    config = SinkConfig(
        bootstrap=settings.kafka_bootstrap,
        topics=sink_topics(settings),
        group=f"dl{run}-sink",
        batch_rows=10_000,
        batch_seconds=1.0,
        intent_file=tmp_path / "intent.json",
        client=client,
    )
    sink = ClickHouseSink(config, ClickHouseWriter(chdb, db))
    total = 2 * len(bad) + len(good)

    async def consume() -> None:
        task = asyncio.create_task(sink.run())
        deadline = asyncio.get_running_loop().time() + 60
        while sink.counters["rows"] < total and asyncio.get_running_loop().time() < deadline and not task.done():
            await asyncio.sleep(0.1)
        sink.stop()
        await task

    asyncio.run(consume())
    assert sink.counters["rows"] == total
    assert sink.counters["dead_letters"] == len(bad)
    letters = run_query(
        chdb, f"SELECT source_offset, reason FROM {db}.dead_letters WHERE source_topic = '{bad_topic}' ORDER BY 1"
    )["rows"]
    assert [int(offset) for offset, _ in letters] == [2 * i for i in range(len(bad))]
    for (name, (_, pattern)), (_, reason) in zip(bad.items(), letters, strict=True):
        assert re.search(pattern, reason), (name, reason)
    counts = dict(run_query(chdb, f"SELECT 'evidence', count() FROM {db}.evidence")["rows"])
    assert int(counts["evidence"]) == len(bad) + sum(1 for r in good if isinstance(r, Evidence))
    from stream_jobs.tables import RAW_TABLES

    for table in (*RAW_TABLES, "findings", "pages"):
        expected = sum(1 for r in good if to_row(r, Provenance("t", 0, 0, T))[0] == table)
        assert expected > 0 and int(chdb.command(f"SELECT count() FROM {db}.{table}")) == expected, table
    good_letters = sum(1 for r in good if to_row(r, Provenance("t", 0, 0, T))[0] == "dead_letters")
    assert int(chdb.command(f"SELECT count() FROM {db}.dead_letters")) == len(bad) + good_letters
    assert not (tmp_path / "intent.json").exists()


# ------------------------------------------------------------------ the bulk (Avro container) path


def _raw_evidence(record: dict[str, Any]) -> bytes:
    from fastavro import schemaless_writer

    from schemas import Evidence
    from schemas.codec import MAGIC, _registry

    entry = _registry().current[Evidence]
    buf = io.BytesIO()
    buf.write(MAGIC + entry.fingerprint)
    schemaless_writer(buf, entry.schema, {"extra_json": None, **record})
    return buf.getvalue()


def _lists_bytes(client: Client, database: str) -> tuple[bytes, ...]:
    """Each evidence list table's distinct rows (0010), by key: the same keys whoever computed them (C, SQL, Python)."""
    return tuple(
        client.raw_query(f"SELECT DISTINCT * FROM {database}.{t} ORDER BY id", fmt="RowBinary")
        for t in ("evidence_reason_lists", "evidence_fact_lists")
    )


def _flush_sinks(chdb: Client, values: list[bytes], ways: list[tuple[str, bool, str]], topic: str = "t") -> list[Any]:
    """The same messages through one sink per ``(database, bulk path on, decoder)``, each flushed once."""
    import asyncio
    from datetime import UTC, datetime

    from stream_jobs.sink import Batch, ClickHouseSink, SinkConfig

    now = datetime(2026, 12, 5, 10, 0, 1, 234567, tzinfo=UTC)
    sinks = []
    for db, bulk, decoder in ways:
        migrate(chdb, db)
        writer = ClickHouseWriter(chdb, db, decoder=decoder)  # type: ignore[arg-type]
        sink = ClickHouseSink(SinkConfig(bootstrap="", topics=[], group="g", bulk_avro=bulk), writer)
        batch = Batch()
        sink._absorb_many(batch, _messages(values, topic), now)
        assert bool(batch.blocks) == bulk
        asyncio.run(sink.output.flush([batch]))
        sinks.append(sink)
    return sinks


def _flush_both_ways(chdb: Client, database: str, values: list[bytes], topic: str = "t") -> tuple[Any, Any]:
    """The same messages through a sink with the bulk path (into ``<database>_bulk``) and without it."""
    bulk, rows = _flush_sinks(
        chdb, values, [(f"{database}_bulk", True, "auto"), (f"{database}_rows", False, "auto")], topic
    )
    return bulk, rows


def test_bulk_path_stores_the_same_bytes_as_the_per_message_path(chdb: Client) -> None:
    """Evidence read by chDB's Avro reader (one container per batch) is stored as the Python reader stores it."""
    from schemas import encode
    from stream_jobs.rows import COLUMNS

    values = [encode(r) for r in _edge_evidence()]
    bulk, rows = _flush_both_ways(chdb, "bulkeq", values)
    assert bulk.counters["bulk_rows"] == len(values) and bulk.counters["bulk_fallbacks"] == 0
    assert rows.counters["bulk_rows"] == 0
    for table in COLUMNS:
        assert _table_bytes(chdb, "bulkeq_bulk", table) == _table_bytes(chdb, "bulkeq_rows", table), table
    assert _lists_bytes(chdb, "bulkeq_bulk") == _lists_bytes(chdb, "bulkeq_rows")  # C keys == Python keys
    assert all(_lists_bytes(chdb, "bulkeq_bulk"))
    assert int(chdb.command("SELECT count() FROM bulkeq_bulk.evidence")) == len(values)
    # a retried flush of the same offsets (same token) adds nothing
    _flush_both_ways(chdb, "bulkeq", values)
    assert int(chdb.command("SELECT count() FROM bulkeq_bulk.evidence")) == len(values)


@pytest.mark.parametrize(
    "bad",
    [
        "unknown verdict",
        "version beyond UInt32",
        "version 0",
        "facts not empty",
        "facts not canonical",
        "trailing bytes",
        "truncated body",
        "invalid UTF-8",
        "invalid UTF-8 in an optional field",
        "invalid UTF-8 in a list",
        "UTF-8 split across two fields",
        "unknown field",
    ],
)
def test_a_bad_record_in_a_bulk_block_takes_the_per_message_path(chdb: Client, bad: str) -> None:
    """One bad record refuses the whole block; its messages go the per-message way: same rows, same dead letters."""
    from schemas import Evidence, encode
    from stream_jobs.rows import COLUMNS

    base = next(r for r in _columnar_records() if isinstance(r, Evidence))
    good = [encode(base.model_copy(update={"evidence_id": f"ok-{i}"})) for i in range(3)]
    rec = {**base.model_dump(), "facts": "{}", "evidence_id": "bad"}
    value = {
        "unknown verdict": lambda: _raw_evidence({**rec, "verdict": "maybe"}),
        "version beyond UInt32": lambda: _raw_evidence({**rec, "version": 2**32}),
        "version 0": lambda: _raw_evidence({**rec, "version": 0}),
        "facts not empty": lambda: _raw_evidence({**rec, "facts": '{"a":1}'}),
        "facts not canonical": lambda: _raw_evidence({**rec, "facts": "{ }"}),
        "trailing bytes": lambda: good[0] + b"\x00" * 30,
        "truncated body": lambda: good[0][:-5],
        "invalid UTF-8": lambda: good[0].replace(b"ok-0", b"ok-\xff"),
        # the bulk check tests all of a row's text in one isValidUTF8 over the fields joined by '\n'
        "invalid UTF-8 in an optional field": lambda: _raw_evidence({**rec, "principal": "Zq9x"}).replace(
            b"Zq9x", b"Zq\xed\xa0"
        ),
        "invalid UTF-8 in a list": lambda: _raw_evidence({**rec, "reasons": ["fine", "Zq8x"]}).replace(
            b"Zq8x", b"Zq\xc3("
        ),
        # each half is invalid, joined without a separator they would read as one valid 'é'
        "UTF-8 split across two fields": lambda: (
            _raw_evidence({**rec, "evidence_id": "Zq7x", "call_id": "Zq6x"})
            .replace(b"Zq7x", b"Zq7\xc3")
            .replace(b"Zq6x", b"\xa9q6x")
        ),
        "unknown field": lambda: _raw_evidence({**rec, "extra_json": '{"x":1}'}),
    }[bad]()
    values = [good[0], value, *good[1:]]
    db = "bulkbad_" + bad.replace(" ", "_").replace("-", "_")
    bulk, rows = _flush_both_ways(chdb, db, values)
    assert bulk.counters["bulk_fallbacks"] == 1 and bulk.counters["bulk_rows"] == 0
    assert bulk.counters["dead_letters"] == rows.counters["dead_letters"]
    for table in COLUMNS:
        assert _table_bytes(chdb, f"{db}_bulk", table) == _table_bytes(chdb, f"{db}_rows", table), table
    assert int(chdb.command(f"SELECT count() FROM {db}_bulk.evidence")) >= 3


# ------------------------------------------------------------------ the bulk path read as RowBinary (issue 16)


def _flush_by_decoders(chdb: Client, database: str, values: list[bytes]) -> tuple[Any, Any]:
    """The same messages through the bulk path transcoded to RowBinary (``<database>_rb``) and read as Avro."""
    from stream_jobs import rowbinary

    assert rowbinary.library() is not None, "make install builds the transcoder"
    rb, avro = _flush_sinks(chdb, values, [(f"{database}_rb", True, "rowbinary"), (f"{database}_avro", True, "avro")])
    return rb, avro


def _edge_evidence() -> list[Any]:
    from datetime import UTC, datetime

    from schemas import Evidence

    base = next(r for r in _columnar_records() if isinstance(r, Evidence))
    return [
        base,
        base.model_copy(update={"evidence_id": "ё-😀", "principal": None, "agent_id": None, "matched_grant_id": None}),
        base.model_copy(
            update={"evidence_id": "e-empty", "reasons": [], "fact_ids": [], "fact_hashes": [], "kind": ""}
        ),
        base.model_copy(update={"evidence_id": "", "tenant": "", "trigger": "", "policy_versions": [""]}),
        base.model_copy(update={"evidence_id": "e-max", "version": 2**32 - 1, "final": True, "late": True}),
        base.model_copy(
            update={"evidence_id": "e-long", "reasons": ["r" * 70_000, "日本語\u2028", "\x00"], "tool": "x" * 300}
        ),
        base.model_copy(update={"evidence_id": "e-many", "fact_ids": [f"f{i}" for i in range(500)]}),
        base.model_copy(  # before 1970: negative milliseconds (zigzag varints of negative numbers)
            update={
                "evidence_id": "e-neg",
                "call_time": datetime(1960, 3, 1, 12, 0, 0, 1000, tzinfo=UTC),
                "decided_at": datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC),
            }
        ),
        base.model_copy(
            update={
                "evidence_id": "e-policy",
                "verdict": "out_of_policy",
                "approval_id": "ap-ü",
                "approver": "bob",
                "policy_versions": ["p@v1", "q@3f2a"],
                "policy_decision": "Deny",
                "policy_reasons": ["p@v1#1"],
                "policy_errors": ["policy q has no version at the call (fail closed)"],
                "history_complete": False,
            }
        ),
    ]


def test_rowbinary_bulk_path_stores_the_same_bytes_as_the_avro_bulk_path(chdb: Client) -> None:
    """The transcoded container (RowBinary) stores exactly what chDB's Avro reader stores, edge cases included."""
    from schemas import encode
    from stream_jobs.rows import COLUMNS

    values = [encode(r) for r in _edge_evidence()]
    rb, avro = _flush_by_decoders(chdb, "rbeq", values)
    assert rb.writer.rowbinary_fallbacks == 0 and rb.counters["bulk_fallbacks"] == 0
    assert rb.counters["bulk_rows"] == avro.counters["bulk_rows"] == len(values)
    for table in COLUMNS:
        assert _table_bytes(chdb, "rbeq_rb", table) == _table_bytes(chdb, "rbeq_avro", table), table
    assert _lists_bytes(chdb, "rbeq_rb") == _lists_bytes(chdb, "rbeq_avro")  # C keys == SQL keys
    assert int(chdb.command("SELECT count() FROM rbeq_rb.evidence")) == len(values)


@pytest.mark.parametrize(
    "bad",
    [
        "trailing bytes",
        "truncated body",
        "union index 2",
        "boolean byte 2",
        "overlong varint",
        "negative length",
        "invalid UTF-8",
        "UTF-8 surrogate",
    ],
)
def test_a_record_the_transcoder_cannot_read_sends_the_block_as_avro(chdb: Client, bad: str) -> None:
    """A malformed record or text that is not valid UTF-8: the transcoder refuses the block, which is
    inserted as Avro, exactly as before (the same rows and dead letters as the Avro bulk path)."""
    from schemas import encode
    from stream_jobs.rows import COLUMNS

    records = _edge_evidence()
    good = [encode(r.model_copy(update={"evidence_id": f"ok-{i}"})) for i, r in enumerate(records[:3])]
    base = good[0]
    head = 10
    body = bytearray(base[head:])
    first = len(b"ok-0") + 1  # evidence_id's varint length, then its bytes: call_id follows
    if bad == "trailing bytes":
        value = base + b"\x00" * 3
    elif bad == "truncated body":
        value = base[:-3]
    elif bad == "union index 2":  # principal is the 5th field, after four strings
        pos = 0
        for _ in range(4):
            n = body[pos] >> 1
            pos += 1 + n
        body[pos] = 4  # zigzag 2
        value = base[:head] + bytes(body)
    elif bad == "boolean byte 2":  # history_complete is the record's last field
        assert body[-1] in (0, 1)
        body[-1] = 2
        value = base[:head] + bytes(body)
    elif bad == "invalid UTF-8":  # the transcoder validates text itself (the SQL's isValidUTF8 is dropped)
        value = base.replace(b"ok-0", b"ok-\xff")
    elif bad == "UTF-8 surrogate":
        value = base.replace(b"ok-0", b"o\xed\xa0\x80")
    elif bad == "overlong varint":  # evidence_id's length as an 11-byte varint
        value = base[:head] + b"\x88" + b"\x80" * 9 + b"\x00" + bytes(body[first:])
    else:  # evidence_id's length negative
        value = base[:head] + b"\x01" + bytes(body[first:])
    values = [good[1], value, good[2]]
    db = "rbbad_" + bad.replace(" ", "_").replace("-", "_")
    rb, avro = _flush_by_decoders(chdb, db, values)
    assert rb.writer.rowbinary_fallbacks == 1
    assert rb.counters["bulk_fallbacks"] == avro.counters["bulk_fallbacks"]
    assert rb.counters["dead_letters"] == avro.counters["dead_letters"]
    for table in COLUMNS:
        assert _table_bytes(chdb, f"{db}_rb", table) == _table_bytes(chdb, f"{db}_avro", table), table


# ------------------------------------------------------------------ policies and approvals (issue 18)
# support.gated.gated_story("gx"): one delegation under a grant with a labelled Cedar policy (two versions) and
# approval-gated tools; facts stamped by the intake's chain, calls by a wrapper's; final evidence from replay,
# referencing its facts with their record hashes (as the live worker writes it).

GX_ALICE = "alice-gx@acme.example"


def _seed_gated(chdb: Client, db: str) -> dict[str, Any]:
    """Seed database ``db``; returns the events by event_id (as parsed, stamped)."""
    from collectors.chain import ChainStamper
    from schemas import ToolCall, ToolResult, topic_for
    from support.gated import gated_story

    migrate(chdb, db)
    writer = ClickHouseWriter(chdb, db)
    items = list(read_events(io.StringIO(jsonl(gated_story("gx")))))
    events = [e for _, e in items]
    intake, wrap = ChainStamper("intake:gx", epoch=1), ChainStamper("stdio:gx", epoch=1)
    facts = sorted((e for e in events if not isinstance(e, (ToolCall, ToolResult))), key=lambda e: e.event_time)
    stamped = [intake.stamp(f) for f in facts] + [
        wrap.stamp(e) for e in events if isinstance(e, (ToolCall, ToolResult))
    ]
    tables: dict[str, list[dict[str, object]]] = {}
    hashes: dict[str, str] = {}
    for i, e in enumerate(stamped):
        table, row = to_row(e, Provenance(topic_for(e), 0, i, T))
        tables.setdefault(table, []).append(row)
        hashes[str(row["event_id"])] = str(row["_record_hash"])
    for i, (call, decision) in enumerate(replay(items).decisions):
        decided = call.event_time + _datetime.timedelta(seconds=1)
        ev = build_evidence(call, decision, 1, True, False, decided, 1, "replay", "final")
        ev = ev.model_copy(update={"fact_hashes": [hashes[f] for f in ev.fact_ids]})
        tables.setdefault("evidence", []).append(to_row(ev, Provenance("audit.evidence", 0, i, T))[1])
    for table, rows in tables.items():
        writer.insert(table, rows, token=f"{db}-{table}")
    return {e.event_id: e for e in stamped}


@pytest.fixture(scope="module")
def gated_db(chdb: Client) -> dict[str, Any]:
    return _seed_gated(chdb, "gated")


def test_policy_and_approval_rows_rebuild_the_events_and_evidence_keeps_the_policy_fields(
    chdb: Client, gated_db: dict[str, Any]
) -> None:
    from stream_jobs.verify import event_from_row

    for table, n in (("policy_events", 2), ("approval_events", 4), ("consent_events", 1)):
        result = chdb.query(f"SELECT * FROM gated.{table} ORDER BY event_time, event_id")
        rows = [{k: _plain(v) for k, v in zip(result.column_names, r, strict=True)} for r in result.result_rows]
        assert len(rows) == n, table
        for row in rows:
            rebuilt = event_from_row(table, row)
            assert rebuilt == gated_db[rebuilt.event_id], table
    grant_row = run_query(chdb, "SELECT policies, approval_tools FROM gated.consent_events")["rows"]
    assert grant_row == [[["gx-labels"], ["db/write_row", "db/drop_table"]]]
    rows = run_query(
        chdb,
        "SELECT call_id, verdict, approval_id, approver, policy_versions, policy_decision, policy_reasons,"
        " policy_errors, history_complete FROM gated.evidence_current ORDER BY call_time",
    )["rows"]
    v1, v2 = ["gx-labels@v1"], ["gx-labels@v2"]
    assert rows == [
        ["gx-c-approved", "in_scope", "gx-ap-1", "bob@acme.example", v1, "Allow", ["gx-labels@v1#0"], [], True],
        ["gx-c-missing", "approval_missing", None, None, v1, "Allow", ["gx-labels@v1#0"], [], True],
        ["gx-c-denied", "approval_denied", "gx-ap-2", "bob@acme.example", v1, "Allow", ["gx-labels@v1#0"], [], True],
        ["gx-c-restricted", "out_of_policy", None, None, v1, "Deny", ["gx-labels@v1#1"], [], True],
        ["gx-c-hr", "out_of_policy", None, None, v2, "Deny", ["gx-labels@v2#1"], [], True],
        ["gx-c-open", "in_scope", None, None, v2, "Allow", ["gx-labels@v2#0"], [], True],
        ["gx-c-late", "in_scope", "gx-ap-3", "bob@acme.example", v2, "Allow", ["gx-labels@v2#0"], [], True],
    ]


def test_verify_round_trips_policies_and_approvals(chdb: Client) -> None:
    _seed_gated(chdb, "vf_gated")
    report = _verify(chdb, "vf_gated")
    assert report.ok, report.problems
    # the intake's chain runs through identity, consent, policy and approval rows
    assert {c.collector_id: c.events for c in report.collectors} == {"intake:gx": 8, "stdio:gx": 9}
    assert (report.calls_checked, report.verdicts_match) == (7, 7)


def test_verify_names_a_deleted_approval_and_the_verdicts_it_no_longer_supports(chdb: Client) -> None:
    _seed_gated(chdb, "vf_gated_del")
    chdb.command(
        "ALTER TABLE vf_gated_del.approval_events DELETE WHERE approval_id = 'gx-ap-1' SETTINGS mutations_sync = 2"
    )
    report = _verify(chdb, "vf_gated_del")
    assert _first_bad(report, "intake:gx").kind == "gap"
    # without ap-1 the first write takes no approval, and the second ...: replay says approval_missing for both
    mismatches = {p.call_id: p.detail for p in report.verdict_problems}
    assert set(mismatches) == {"gx-c-approved"}
    assert "stored in_scope (grant gx-gated, approval gx-ap-1" in mismatches["gx-c-approved"]
    assert "gives approval_missing (grant gx-gated)" in mismatches["gx-c-approved"]


def test_verify_names_an_edited_policy_and_the_verdicts_it_no_longer_supports(chdb: Client) -> None:
    events = _seed_gated(chdb, "vf_gated_edit")
    v1 = next(e for e in events.values() if e.event_type == "policy_published" and e.version == "v1")
    chdb.command(
        "ALTER TABLE vf_gated_edit.policy_events UPDATE cedar = 'permit(principal, action, resource);'"
        f" WHERE event_id = '{v1.event_id}' SETTINGS mutations_sync = 2"
    )
    report = _verify(chdb, "vf_gated_edit")
    bad = _first_bad(report, "intake:gx")
    assert (bad.kind, bad.table, bad.event_id) == ("edited", "policy_events", v1.event_id)
    assert [(p.kind, p.call_id) for p in report.verdict_problems] == [("mismatch", "gx-c-restricted")]
    assert "replay of the raw events gives in_scope" in report.verdict_problems[0].detail


def test_forensic_approval_history_says_which_call_used_each_approval(chdb: Client, gated_db: dict[str, Any]) -> None:
    rows = forensic(chdb, "approval_history", db="gated", tenant="acme")
    brief = [
        (
            r["approval_id"],
            r["decision"],
            r["outcome"],
            r["call_id"],
            r["verdict"],
            r["result_status"],
            r["time_to_use_ms"],
        )
        for r in rows
    ]
    assert brief == [
        ("gx-ap-1", "approve", "used", "gx-c-approved", "in_scope", "ok", 30_000),
        (None, None, "missing", "gx-c-missing", "approval_missing", None, None),
        ("gx-ap-2", "deny", "denied_then_executed", "gx-c-denied", "approval_denied", "ok", None),
        ("gx-ap-3", "approve", "used", "gx-c-late", "in_scope", None, 120_000),
        ("gx-ap-4", "approve", "unused", None, None, None, None),
    ]
    first = rows[0]
    assert (first["approver"], first["principal"], first["agent_id"], first["tool"], first["versions"]) == (
        "bob@acme.example",
        GX_ALICE,
        "agent-7",
        "db/write_row",
        1,
    )
    assert rows[3]["expires_at"] == "2026-11-21T10:30:00.000Z" and rows[1]["tool"] == "db/write_row"
    # filters: one tool, a time window, another delegation
    drops = forensic(chdb, "approval_history", db="gated", tenant="acme", tool="db/drop_table")
    assert [r["approval_id"] for r in drops] == ["gx-ap-2"]
    window = forensic(chdb, "approval_history", db="gated", tenant="acme", since=ts("10:02:00"), until=ts("10:07:00"))
    assert [(r["approval_id"], r["call_id"]) for r in window] == [
        (None, "gx-c-missing"),
        ("gx-ap-2", "gx-c-denied"),
        ("gx-ap-3", "gx-c-late"),
    ]
    assert forensic(chdb, "approval_history", db="gated", tenant="acme", principal="bob@acme.example") == []
    assert forensic(chdb, "approval_history", db="gated", tenant="globex") == []


def test_forensic_approval_history_times_use_from_the_version_in_force(chdb: Client) -> None:
    """An approval re-decided after its use: time to use counts from the decision the call relied on."""
    from support.gated import approval

    _seed_gated(chdb, "gated_redecided")
    later = approval("10:20:00", "gx-ap-1", GX_ALICE, "agent-7", "db/write_row", expires="10:21:00")
    [(_, event)] = list(read_events(io.StringIO(jsonl([later]))))
    ClickHouseWriter(chdb, "gated_redecided").insert(
        "approval_events", [to_row(event, Provenance("consent.approvals", 0, 99, T))[1]], token="redecided"
    )
    [row] = [
        r
        for r in forensic(chdb, "approval_history", db="gated_redecided", tenant="acme")
        if r["approval_id"] == "gx-ap-1"
    ]
    assert (row["versions"], row["decided_at"], row["call_id"], row["time_to_use_ms"]) == (
        2,
        "2026-11-21T10:20:00.000Z",
        "gx-c-approved",
        30_000,
    )


def test_forensic_policy_decisions_name_versions_decisions_and_determining_policies(
    chdb: Client, gated_db: dict[str, Any]
) -> None:
    rows = forensic(chdb, "policy_decisions", db="gated", tenant="acme")
    brief = [
        (
            r["call_id"],
            r["verdict"],
            r["policy_versions"],
            r["policy_decision"],
            r["determining_policies"],
            r["resources"],
        )
        for r in rows
    ]
    assert brief == [
        ("gx-c-approved", "in_scope", ["gx-labels@v1"], "Allow", ["gx-labels@v1#0"], ["db:dev/t"]),
        ("gx-c-missing", "approval_missing", ["gx-labels@v1"], "Allow", ["gx-labels@v1#0"], ["db:dev/t"]),
        ("gx-c-denied", "approval_denied", ["gx-labels@v1"], "Allow", ["gx-labels@v1#0"], ["db:dev/t"]),
        ("gx-c-restricted", "out_of_policy", ["gx-labels@v1"], "Deny", ["gx-labels@v1#1"], ["db:prod/users"]),
        ("gx-c-hr", "out_of_policy", ["gx-labels@v2"], "Deny", ["gx-labels@v2#1"], ["db:hr/salaries"]),
        ("gx-c-open", "in_scope", ["gx-labels@v2"], "Allow", ["gx-labels@v2#0"], ["db:dev/x"]),
        ("gx-c-late", "in_scope", ["gx-labels@v2"], "Allow", ["gx-labels@v2#0"], ["db:dev/t"]),
    ]
    assert all(r["policy_errors"] == [] and r["history_complete"] is True and r["grant_id"] == "gx-gated" for r in rows)
    denied = forensic(chdb, "policy_decisions", db="gated", tenant="acme", decision="Deny")
    assert [r["call_id"] for r in denied] == ["gx-c-restricted", "gx-c-hr"]
    assert len(forensic(chdb, "policy_decisions", db="gated", tenant="acme", policy_id="gx-labels")) == 7
    assert forensic(chdb, "policy_decisions", db="gated", tenant="acme", policy_id="gx-label") == []
    assert forensic(chdb, "policy_decisions", db="gated", tenant="acme", until=ts("10:01:59")) == rows[:1]
    # calls under grants without policies are not listed (the forensics story has none)
    assert forensic(chdb, "policy_decisions", db="gated", tenant="globex") == []


def test_verify_since_compares_times_as_times(chdb: Client) -> None:
    """--since is a DateTime64 literal: the sink's SQL endpoint parses time strings strictly
    (date_time_input_format=basic), where '2026-11-21T10:04:00.000Z' as a string does not convert."""
    from stream_jobs.verify import verify

    _seed_gated(chdb, "vf_gated_since")

    def strict(sql: str) -> dict[str, Any]:
        return result_json(chdb.query(sql, settings={"date_time_input_format": "basic"}))

    since = _datetime.datetime(2026, 11, 21, 10, 4, tzinfo=_datetime.UTC)
    report = verify(strict, "vf_gated_since", since=since, tenant="acme")
    assert report.ok, report.problems
    assert (report.calls_checked, report.verdicts_match) == (4, 4)  # c-restricted, c-hr, c-open, c-late


def test_0010_keeps_every_evidence_row_and_computes_the_keys_c_and_python_compute(
    chdb: Client, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Migration 0010 on a store with evidence: `evidence` (now a view), evidence_final and evidence_current
    read exactly the bytes they read before (every column, in order); each row's keys are the SHA-256/128 of
    its lists that stream_jobs.evidence_lists (and the C transcoder, tests/unit/stream_jobs/test_evidence_lists)
    compute; each distinct list is stored once."""
    from datetime import timedelta

    from schemas import Evidence
    from stream_jobs import clickhouse
    from stream_jobs.evidence_lists import key_of

    before = [m for m in load_migrations() if m.version < 10]
    monkeypatch.setattr(clickhouse, "load_migrations", lambda: before)
    migrate(chdb, "lists10")
    monkeypatch.undo()
    base = next(r for _, r in SAMPLES if isinstance(r, Evidence))
    lists = [([], []), (["a", "bc"], ["x"]), (["ab", "c"], ["x"]), (["ё-😀\x00", "r" * 300], ["f"] * 200)]
    records = []
    for i in range(12):
        reasons, facts = lists[i % len(lists)]
        for version in (1, 2):
            records.append(
                base.model_copy(
                    update={
                        "evidence_id": f"ev-{i}-{version}",
                        "call_id": f"call-{i}",
                        "version": version,
                        "final": version == 2,
                        "reasons": reasons,
                        "fact_ids": facts,
                        "fact_hashes": [f"h-{f}" for f in facts],
                        "facts": {} if facts else {"grants": [i]},
                        "decided_at": base.decided_at + timedelta(seconds=version),
                    }
                )
            )
    rows = [to_row(r, Provenance("audit.evidence", 0, n, T))[1] for n, r in enumerate(records)]
    columns = list(rows[0])
    chdb.insert("lists10.evidence", [[row[c] for c in columns] for row in rows], column_names=columns)
    chdb.insert("lists10.evidence", [[row[c] for c in columns] for row in rows[:3]], column_names=columns)  # dups

    def read(source: str) -> bytes:
        order = "call_id, version, evidence_id" + ("" if source == "evidence_current" else ", _ingested_at, _offset")
        data: bytes = chdb.raw_query(
            f"SELECT * FROM lists10.{source} ORDER BY {order}", fmt="RowBinaryWithNamesAndTypes"
        )
        return data

    old = {"evidence": read("evidence"), "final": read("evidence FINAL"), "current": read("evidence_current")}
    migrate(chdb, "lists10")
    assert read("evidence") == old["evidence"]
    assert read("evidence_final") == old["final"] != old["evidence"]  # the 3 duplicates: only FINAL drops them
    assert read("evidence_current") == old["current"]
    stored = chdb.query(
        "SELECT evidence_id, reason_key, fact_key FROM lists10.evidence_rows FINAL ORDER BY evidence_id"
    ).result_rows
    by_id = {r.evidence_id: r for r in records}
    assert len(stored) == len(records)
    for evidence_id, reason_key, fact_key in stored:
        r = by_id[evidence_id]
        assert bytes(reason_key) == key_of(r.reasons), evidence_id
        assert bytes(fact_key) == key_of(r.fact_ids, r.fact_hashes), evidence_id
    counts = chdb.query(
        "SELECT (SELECT count() FROM lists10.evidence_reason_lists), (SELECT count() FROM lists10.evidence_fact_lists)"
    ).result_rows[0]
    assert counts == (len(lists), 3)  # (["a", "bc"], ["x"]) and (["ab", "c"], ["x"]) share their fact list
    assert "evidence_before_lists" not in {
        r[0] for r in chdb.query("SELECT name FROM system.tables WHERE database = 'lists10'").result_rows
    }
    # Lists written twice (a batch re-sent under another token, not merged yet): the views' ANY joins still
    # give each row its list once.
    for table in ("evidence_reason_lists", "evidence_fact_lists"):
        chdb.command(f"INSERT INTO lists10.{table} SELECT * FROM lists10.{table} SETTINGS insert_deduplicate = 0")
    assert chdb.query("SELECT count() FROM lists10.evidence_reason_lists").result_rows[0][0] == 2 * len(lists)
    assert read("evidence") == old["evidence"]
    assert read("evidence_final") == old["final"]
    assert read("evidence_current") == old["current"]

    # The forensic call_evidence reads evidence_rows FINAL and only the calls' lists (by primary key): its
    # evidence rows are exactly evidence_final's for those calls, each fact reference in fact_ids order.
    calls = ["call-1", "call-2", "call-3", "call-4", "call-99"]
    got = forensic(chdb, "call_evidence", "lists10", tenant=base.tenant, call_ids=calls)
    want = chdb.query(
        "SELECT call_id, evidence_id, version, verdict, final, reasons, facts, fact_ids, fact_hashes"
        f" FROM lists10.evidence_final WHERE tenant = '{base.tenant}' AND has({calls}, call_id)"
        " ORDER BY call_id, decided_at, version, evidence_id"
    ).result_rows
    assert len(want) == 8 and {w[0] for w in want} == set(calls[:4])
    assert [r["kind"] for r in got] == ["evidence"] * len(want)  # no raw events in this store
    fields = ("call_id", "id", "version", "verdict", "final", "reasons", "facts", "fact_ids", "fact_hashes")
    assert [tuple(r[f] for f in fields) for r in got] == [tuple(w) for w in want]
    for r in got:
        refs = None if r["referenced_facts"] is None else json.loads(str(r["referenced_facts"]))
        fact_ids = list(r["fact_ids"])  # type: ignore[call-overload]
        assert (refs is None) == (not fact_ids)
        assert [f["event_id"] for f in refs or []] == fact_ids
        assert all(not f["found"] and f["fact"] is None for f in refs or [])


_LISTS10 = next(m for m in load_migrations() if m.version == 10)
_COPY = next(i for i, s in enumerate(_LISTS10.steps) if s.sql.startswith("INSERT INTO {db}.evidence_rows"))
_PARTIAL = "partial"
"""The kill in the middle of the copy: each list insert and the row copy wrote some of their rows."""


def _evidence_before_lists(chdb: Client, db: str) -> None:
    """``db`` migrated up to 0009, with evidence in three monthly partitions and not yet merged duplicates."""
    from stream_jobs import clickhouse

    before = [m for m in load_migrations() if m.version < 10]
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(clickhouse, "load_migrations", lambda: before)
        migrate(chdb, db)
    base = next(r for _, r in SAMPLES if isinstance(r, Evidence))
    lists = [([], []), (["a", "bc"], ["x"]), (["ab", "c"], ["x"]), (["ё-😀\x00", "r" * 300], ["f"] * 20)]
    records = [
        base.model_copy(
            update={
                "evidence_id": f"ev-{i}-{version}",
                "call_id": f"call-{i}",
                "call_time": base.call_time + timedelta(days=31 * (i % 3)),
                "version": version,
                "final": version == 2,
                "reasons": lists[i % len(lists)][0],
                "fact_ids": lists[i % len(lists)][1],
                "fact_hashes": [f"h-{f}" for f in lists[i % len(lists)][1]],
                "decided_at": base.decided_at + timedelta(seconds=version),
            }
        )
        for i in range(9)
        for version in (1, 2)
    ]
    rows = [to_row(r, Provenance("audit.evidence", 0, n, T))[1] for n, r in enumerate(records)]
    columns = list(rows[0])
    chdb.insert(f"{db}.evidence", [[row[c] for c in columns] for row in rows], column_names=columns)
    chdb.insert(f"{db}.evidence", [[row[c] for c in columns] for row in rows[:5]], column_names=columns)  # dups


def _lists_state(chdb: Client, db: str) -> dict[str, Any]:
    """Everything 0010 leaves: every evidence row as stored (duplicates too), the distinct lists, what the
    three views read, the tables and views of ``db`` and the recorded migrations."""

    def raw(sql: str) -> bytes:
        data: bytes = chdb.raw_query(sql, fmt="RowBinaryWithNamesAndTypes")
        return data

    order = "call_id, version, evidence_id, _ingested_at, _offset"
    return {
        "evidence_rows": raw(f"SELECT * FROM {db}.evidence_rows ORDER BY {order}"),
        "reason_lists": raw(f"SELECT DISTINCT * FROM {db}.evidence_reason_lists ORDER BY id"),
        "fact_lists": raw(f"SELECT DISTINCT * FROM {db}.evidence_fact_lists ORDER BY id"),
        "evidence": raw(f"SELECT * FROM {db}.evidence ORDER BY {order}"),
        "evidence_final": raw(f"SELECT * FROM {db}.evidence_final ORDER BY {order}"),
        "evidence_current": raw(f"SELECT * FROM {db}.evidence_current ORDER BY call_id"),
        "tables": chdb.query(
            f"SELECT name, engine FROM system.tables WHERE database = '{db}' ORDER BY name"
        ).result_rows,
        "migrations": chdb.query(
            f"SELECT version, count() FROM {db}.schema_migrations GROUP BY version ORDER BY version"
        ).result_rows,
    }


@pytest.fixture(scope="module")
def lists_uninterrupted(chdb: Client) -> dict[str, Any]:
    _evidence_before_lists(chdb, "resume_ref")
    assert migrate(chdb, "resume_ref") == ["0010_evidence_lists"]
    state = _lists_state(chdb, "resume_ref")
    counts = chdb.query(
        "SELECT count(), uniqExact(evidence_id), uniqExact(toYYYYMM(call_time)) FROM resume_ref.evidence_rows"
    ).result_rows[0]
    assert counts == (23, 18, 3)  # 5 duplicates not merged away, 3 partitions
    return state


@pytest.mark.parametrize("kill_before", [*range(len(_LISTS10.steps) + 1), _PARTIAL])
def test_0010_resumes_after_a_kill_at_any_statement(
    chdb: Client, lists_uninterrupted: dict[str, Any], kill_before: int | str
) -> None:
    """0010 killed before its statement ``kill_before`` (or half-way through its copy) and run again ends
    exactly as the uninterrupted run: every stored evidence row once (its duplicates as many times), the
    same lists, the views read the same bytes, 0010 recorded once."""
    from stream_jobs.clickhouse import run_statement

    db = f"resume_{kill_before}"
    _evidence_before_lists(chdb, db)
    stop = _COPY + 1 if kill_before == _PARTIAL else int(kill_before)
    for k, statement in enumerate(_LISTS10.steps[:stop]):
        if kill_before == _PARTIAL and "INSERT" in statement.sql.split()[0]:  # the lists and the copy: some rows
            sql = statement.sql.replace(
                "FROM {db}.evidence_before_lists",
                "FROM {db}.evidence_before_lists WHERE call_id IN ('call-1', 'call-2')",
            )
            statement = replace(statement, sql=sql)
            assert sql != _LISTS10.steps[k].sql
        run_statement(chdb, db, statement)
    if kill_before == _PARTIAL:
        partial = chdb.query(f"SELECT count() FROM {db}.evidence_rows").result_rows[0][0]
        assert 0 < partial < 23
    assert migrate(chdb, db) == ["0010_evidence_lists"]
    assert _lists_state(chdb, db) == lists_uninterrupted
    if kill_before == _PARTIAL:  # the lists written twice: both rows until a merge, and the views read each once
        assert chdb.query(f"SELECT count() > uniqExact(id) FROM {db}.evidence_reason_lists").result_rows[0][0]
    assert migrate(chdb, db) == []


_KILLS = [(m.version, k) for m in load_migrations() for k in range(len(m.steps) + 1)]


def _schema(chdb: Client, db: str) -> list[tuple[str, str, str]]:
    """Every table and view of ``db`` with its full definition (columns in order, settings, view bodies)."""
    rows = chdb.query(
        f"SELECT name, engine, create_table_query FROM system.tables WHERE database = '{db}' ORDER BY name"
    ).result_rows
    return [(name, engine, query.replace(f"{db}.", "DB.")) for name, engine, query in rows]


@pytest.fixture(scope="module")
def schema_uninterrupted(chdb: Client) -> list[tuple[str, str, str]]:
    migrate(chdb, "kill_ref")
    return _schema(chdb, "kill_ref")


@pytest.mark.parametrize(("version", "kill_before"), _KILLS, ids=[f"{v:04d}-{k}" for v, k in _KILLS])
def test_every_migration_resumes_after_a_kill(
    chdb: Client, schema_uninterrupted: list[tuple[str, str, str]], version: int, kill_before: int
) -> None:
    """Killed before any statement of any migration (the one before recorded, this one not), `migrate` run
    again ends with the tables and views of an uninterrupted run and every migration recorded once (the
    README says migrations resume after a kill; 0010 with evidence rows: the test above)."""
    from stream_jobs import clickhouse
    from stream_jobs.clickhouse import run_statement

    db = f"kill_{version}_{kill_before}"
    migrations = load_migrations()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(clickhouse, "load_migrations", lambda: [m for m in migrations if m.version < version])
        migrate(chdb, db)
    [migration] = [m for m in migrations if m.version == version]
    for statement in migration.steps[:kill_before]:
        run_statement(chdb, db, statement)
    assert migrate(chdb, db) == [f"{m.version:04d}_{m.name}" for m in migrations if m.version >= version]
    assert _schema(chdb, db) == schema_uninterrupted
    recorded = chdb.query(f"SELECT version, count() FROM {db}.schema_migrations GROUP BY version ORDER BY version")
    assert recorded.result_rows == [(m.version, 1) for m in migrations]


def test_a_migration_condition_runs_its_statement_only_on_1(chdb: Client) -> None:
    from stream_jobs.clickhouse import ClickHouseError, Statement, run_statement

    chdb.command("CREATE DATABASE IF NOT EXISTS cond")
    create = "CREATE TABLE {db}.t (a UInt8) ENGINE = Memory"
    exists = "SELECT count() = 1 FROM system.tables WHERE database = '{db}' AND name = 't'"
    assert run_statement(chdb, "cond", Statement(create, (f"SELECT NOT ({exists})",)))
    assert not run_statement(chdb, "cond", Statement(create, ("SELECT 1", f"SELECT NOT ({exists})")))
    for bad in ("SELECT 2", "SELECT 1 FROM numbers(2)", "SELECT 1, 1", "SELECT 1 WHERE 0"):
        with pytest.raises(ClickHouseError, match="one row with 0 or 1"):
            run_statement(chdb, "cond", Statement("DROP TABLE {db}.t", (bad,)))
    assert chdb.query("SELECT count() FROM system.tables WHERE database = 'cond'").result_rows == [(1,)]
