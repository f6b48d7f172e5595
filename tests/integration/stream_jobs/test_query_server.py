"""The sink's read-only SQL endpoint on a real chDB folder: a runaway query is stopped, and the
writer's lock it held is free again for the sink's next insert."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import aiohttp
import pytest

from scopewatch.stack import proc
from stream_jobs.clickhouse import connect
from stream_jobs.query_server import QueryServer

pytestmark = pytest.mark.integration


async def test_a_runaway_query_is_stopped_and_the_sink_can_write_again(tmp_path: Path) -> None:
    dsn = f"chdb://{tmp_path / 'chdb'}"
    writer = connect(dsn)
    writer.command("CREATE TABLE default.t (n UInt64) ENGINE = MergeTree ORDER BY n")
    reader = connect(dsn, readonly=True)
    lock = threading.Lock()
    port = proc.free_port()
    server = QueryServer(reader, "tok", lock, port, max_seconds=2.0)
    await server.start()
    url = f"http://127.0.0.1:{port}/query"
    headers = {"Authorization": "Bearer tok"}
    try:
        async with aiohttp.ClientSession() as http:

            async def query(sql: str) -> tuple[int, dict[str, object]]:
                async with http.post(url, json={"sql": sql}, headers=headers) as response:
                    return response.status, await response.json()

            started = time.monotonic()
            # about 30 s of work on this machine: without the time limit it holds the lock that long
            runaway = asyncio.create_task(query("SELECT sum(sipHash64(number)) FROM numbers(2000000000)"))
            await asyncio.sleep(0.5)
            # the sink's insert waits for the query, and gets the lock once ClickHouse stopped it
            got_lock = await asyncio.to_thread(lock.acquire, True, 10)
            waited = time.monotonic() - started
            if not got_lock:
                await runaway
            assert got_lock, "the query held the writer's lock for 10 s"
            try:
                writer.command("INSERT INTO default.t VALUES (1), (2)")
            finally:
                lock.release()
            status, body = await runaway
            assert status == 400 and "TIMEOUT_EXCEEDED" in str(body["error"]), body
            assert 1.5 <= waited < 10
            # ordinary queries still work, and the session stays read-only
            assert await query("SELECT sum(n) FROM default.t") == (
                200,
                {"columns": ["sum(n)"], "types": ["UInt64"], "rows": [[3]]},
            )
            status, body = await query("INSERT INTO default.t VALUES (3)")
            assert status == 400 and "readonly" in str(body["error"]).lower(), body
    finally:
        await server.stop()
        reader.close()
        writer.close()
