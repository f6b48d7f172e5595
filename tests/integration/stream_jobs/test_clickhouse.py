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
