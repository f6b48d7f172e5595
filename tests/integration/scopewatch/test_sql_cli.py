"""`scopewatch sql` with no sink running, on a real chDB folder it opens itself: the same checks and
caps as the sink's SQL endpoint (issue 15), and ordinary forensic queries still work."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from scopewatch.stack.stack import settings_env
from stream_jobs.runtime.settings import Settings

pytestmark = pytest.mark.integration

MARK = "sec2-secret-7f3c1d"

PREPARE = textwrap.dedent(
    """
    import sys
    from stream_jobs.clickhouse import connect
    client = connect(sys.argv[1])
    client.command("CREATE DATABASE IF NOT EXISTS scopewatch")
    client.command("CREATE TABLE scopewatch.calls (call_id String, tool String) ENGINE = MergeTree ORDER BY call_id")
    client.command("INSERT INTO scopewatch.calls VALUES ('c1', 'read_file'), ('c2', 'read_file'), ('c3', 'send')")
    client.close()
    """
)


def _sql(settings: Settings, query: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scopewatch", "sql", query, "--format", "json"],
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def folder(tmp_path: Path) -> Settings:
    settings = Settings(home=tmp_path / "home", clickhouse_dsn=f"chdb://{tmp_path / 'chdb'}")
    done = subprocess.run(
        [sys.executable, "-c", PREPARE, settings.dsn], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stderr
    assert not (settings.run_dir / "query.json").exists()  # no sink: the CLI opens the folder itself
    return settings


def test_sql_without_a_sink_refuses_what_the_endpoint_refuses(folder: Settings, tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text(MARK)
    outfile = tmp_path / "out.tsv"
    refusals = {
        f"SELECT * FROM file('{secret}', 'RawBLOB')": "table function file() is not allowed",
        f"SELECT file('{secret}')": "function file() is not allowed",
        f"SELECT 1 INTO OUTFILE '{outfile}'": "INTO OUTFILE is not allowed",
        f"INSERT INTO FUNCTION file('{outfile}', 'TSV') SELECT 1": "read-only",
        "SELECT * FROM numbers(1000000) SETTINGS max_result_rows = 0": "SETTINGS and SET are not allowed",
        "SET max_result_rows = 0": "read-only",
        "INSERT INTO scopewatch.calls VALUES ('c4', 'x')": "read-only",
        "SELECT * FROM numbers(1000000)": "TOO_MANY_ROWS",  # the row cap holds here too
    }
    for query, why in refusals.items():
        done = _sql(folder, query)
        assert done.returncode == 1, (query, done.stdout, done.stderr)
        assert why in done.stderr, (query, done.stderr)
        assert MARK not in done.stdout + done.stderr, query
    assert not outfile.exists()

    # ordinary forensic queries, and what `scopewatch status` asks, still work
    done = _sql(folder, "SELECT tool, count() AS n FROM scopewatch.calls GROUP BY tool ORDER BY tool")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [{"tool": "read_file", "n": 2}, {"tool": "send", "n": 1}]
    done = _sql(folder, "SELECT name FROM system.tables WHERE database = 'scopewatch' ORDER BY name")
    assert done.returncode == 0 and json.loads(done.stdout) == [{"name": "calls"}], done.stderr
    done = _sql(folder, "DESCRIBE TABLE scopewatch.calls")
    assert done.returncode == 0 and "call_id" in done.stdout, done.stderr
