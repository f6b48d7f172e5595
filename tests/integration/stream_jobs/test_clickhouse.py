"""Migrations and deduplicated inserts on the real ClickHouse engine (chDB, in this process)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from clickhouse_connect.driver.client import Client

from stream_jobs.clickhouse import connect, load_migrations, migrate, run_query
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
        "evidence",
        "dead_letters",
        "findings",
        "pages",
        "evidence_current",
        "schema_migrations",
    } <= tables


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
        expected[table] = expected.get(table, 0) + 1
    assert dict((t, int(n)) for t, n in counts) == expected


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
