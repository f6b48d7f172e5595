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
