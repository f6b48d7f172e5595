"""The sink's read-only SQL endpoint on a real chDB folder: a runaway query is stopped after its time
limit, and the owner's inserts never wait for it (analyst queries run on connections of their own)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import pytest

from scopewatch.stack import proc
from stream_jobs.clickhouse import chdb_path, connect
from stream_jobs.query_server import AnalystSession, QueryServer
from stream_jobs.sql_guard import QueryCaps

pytestmark = pytest.mark.integration


async def test_a_runaway_query_is_stopped_and_never_holds_up_the_owners_inserts(tmp_path: Path) -> None:
    writer = connect(f"chdb://{tmp_path / 'chdb'}")
    writer.command("CREATE TABLE default.t (n UInt64) ENGINE = MergeTree ORDER BY n")
    path = chdb_path(writer)
    assert path is not None
    session = AnalystSession(path, QueryCaps(max_seconds=3.0))
    port = proc.free_port()
    server = QueryServer(session, "tok", port)
    await server.start()
    url = f"http://127.0.0.1:{port}/query"
    headers = {"Authorization": "Bearer tok"}
    try:
        async with aiohttp.ClientSession() as http:

            async def query(sql: str) -> tuple[int, dict[str, object]]:
                async with http.post(url, json={"sql": sql}, headers=headers) as response:
                    return response.status, await response.json()

            started = time.monotonic()
            # about 30 s of work on this machine without the time limit
            runaway = asyncio.create_task(query("SELECT sum(sipHash64(number)) FROM numbers(2000000000)"))
            await asyncio.sleep(0.5)
            waits = []
            for n in range(1, 6):  # inserts while the query runs: none waits for it
                t0 = time.monotonic()
                await asyncio.to_thread(writer.command, f"INSERT INTO default.t VALUES ({n})")
                waits.append(time.monotonic() - t0)
            assert not runaway.done(), "the runaway query ended before the inserts were measured"
            assert max(waits) < 1.0, waits
            status, body = await runaway
            assert status == 400 and "TIMEOUT_EXCEEDED" in str(body["error"]), body
            assert 2.5 <= time.monotonic() - started < 15
            # ordinary queries still work, and the session stays read-only
            assert await query("SELECT sum(n) FROM default.t") == (
                200,
                {"columns": ["sum(n)"], "types": ["UInt64"], "rows": [[15]]},
            )
            status, body = await query("INSERT INTO default.t VALUES (3)")
            assert status == 403 and "read-only" in str(body["error"]), body
    finally:
        await server.stop()
        session.close()
        writer.close()


async def test_only_the_system_tables_an_analyst_needs_are_readable(tmp_path: Path) -> None:
    writer = connect(f"chdb://{tmp_path / 'chdb'}")
    writer.command("CREATE DATABASE IF NOT EXISTS scopewatch")
    writer.command("CREATE TABLE scopewatch.t (n UInt64) ENGINE = MergeTree ORDER BY n")
    writer.command("INSERT INTO scopewatch.t VALUES (1), (2)")
    path = chdb_path(writer)
    assert path is not None
    session = AnalystSession(path, QueryCaps())
    port = proc.free_port()
    server = QueryServer(session, "tok", port)
    await server.start()
    try:
        async with aiohttp.ClientSession() as http:

            async def query(sql: str) -> tuple[int, dict[str, object]]:
                url = f"http://127.0.0.1:{port}/query"
                async with http.post(url, json={"sql": sql}, headers={"Authorization": "Bearer tok"}) as response:
                    return response.status, await response.json()

            for sql in (
                "SELECT query FROM system.processes",
                "SELECT * FROM system.query_log",
                "SELECT name, value FROM system.settings",
                "SELECT 1 WHERE 'x' IN system.processes",
                "SELECT * FROM view(SELECT query FROM `system`.`processes`)",
                "SELECT (SELECT count() FROM system.query_log)",
                "DESCRIBE TABLE system.processes",
                "SELECT * FROM information_schema.tables",
                "SELECT * FROM scopewatch.t AS a JOIN system.processes AS p ON 1 = 1",
            ):
                status, body = await query(sql)
                assert status == 403 and "is not allowed" in str(body["error"]), (sql, body)
                assert "system tables: system.columns" in str(body["error"]), (sql, body)
            status, body = await query(
                "SELECT t.name, t.total_rows, sum(p.rows) AS rows, count(c.name) > 0 AS has_columns "
                "FROM system.tables AS t LEFT JOIN system.parts AS p ON p.database = t.database AND p.table = t.name "
                "LEFT JOIN system.columns AS c ON c.database = t.database AND c.table = t.name "
                "WHERE t.database = 'scopewatch' GROUP BY t.name, t.total_rows"
            )
            assert status == 200 and body["rows"] == [["t", 2, 2, 1]], body
            status, body = await query("SELECT name FROM system.databases WHERE name = 'scopewatch'")
            assert status == 200 and body["rows"] == [["scopewatch"]], body
    finally:
        await server.stop()
        session.close()
        writer.close()
