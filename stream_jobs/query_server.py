"""Read-only SQL over loopback for the process that owns an embedded chDB folder.

chDB allows one process per data folder, so while the sink runs, ``scopewatch sql``
sends its query here. The endpoint listens on 127.0.0.1 only, requires a bearer token
kept in a 0600 file under the stack's run folder, runs queries on a separate read-only
session (ClickHouse ``readonly=2``: no writes, no DDL) and caps query and result size.

Queries run one at a time under the sink's writer lock (one chDB engine in the process), so a
query holds up the sink's inserts while it runs: ClickHouse stops it after ``max_seconds``
(``SCOPEWATCH_QUERY_TIMEOUT_SECONDS``), so a runaway query cannot stall the evidence pipeline.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import secrets
import threading
from pathlib import Path
from typing import Any

from aiohttp import web
from clickhouse_connect.driver.client import Client

from stream_jobs.clickhouse import run_query

MAX_SQL_BYTES = 256 * 1024
MAX_ROWS = 100_000


def write_token(path: Path) -> str:
    """Create a fresh random token readable only by the owner."""
    token = secrets.token_urlsafe(32)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(token)
    return token


class QueryServer:
    def __init__(
        self,
        client: Client,
        token: str,
        lock: threading.Lock,
        port: int,
        host: str = "127.0.0.1",
        max_seconds: float = 30.0,
    ) -> None:
        self.client = client
        self.token = token
        self.lock = lock
        self.port = port
        self.host = host
        self.max_seconds = max_seconds
        self._runner: web.AppRunner | None = None

    def _run(self, sql: str) -> dict[str, Any]:
        with self.lock:
            return run_query(self.client, sql, max_rows=MAX_ROWS, max_seconds=self.max_seconds)

    async def handle_query(self, request: web.Request) -> web.Response:
        auth = request.headers.get("Authorization", "")
        if not hmac.compare_digest(auth.encode(), f"Bearer {self.token}".encode()):
            return web.json_response({"error": "unauthorized"}, status=401)
        if (request.content_length or 0) > MAX_SQL_BYTES:
            return web.json_response({"error": f"query larger than {MAX_SQL_BYTES} bytes"}, status=413)
        try:
            body = await request.json()
            sql = body["sql"]
            if not isinstance(sql, str) or not sql.strip():
                raise ValueError("'sql' must be a non-empty string")
        except (ValueError, KeyError, TypeError, json.JSONDecodeError) as exc:
            return web.json_response({"error": f"bad request: {exc}"}, status=400)
        try:
            result = await asyncio.to_thread(self._run, sql)
        except Exception as exc:  # noqa: BLE001 - report the ClickHouse error to the analyst
            return web.json_response({"error": str(exc).strip()}, status=400)
        return web.json_response(result)

    async def handle_health(self, _request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def start(self) -> None:
        app = web.Application(client_max_size=MAX_SQL_BYTES + 1024)
        app.router.add_post("/query", self.handle_query)
        app.router.add_get("/health", self.handle_health)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
