"""Read-only SQL over loopback for the process that owns an embedded chDB folder.

chDB allows one process per data folder, so while the sink runs, ``scopewatch sql``
sends its query here. The endpoint listens on 127.0.0.1 only, requires a bearer token
kept in a 0600 file under the stack's run folder, and runs each query on an
:class:`AnalystSession`: connections of their own to the engine, opened with ``readonly=1`` and
the caps of :class:`stream_jobs.sql_guard.QueryCaps` (rows, bytes, memory, time, threads), which
no query can lift; before it runs, ClickHouse's parser re-formats the query and its parse tree is
checked (:mod:`stream_jobs.sql_guard`): one SELECT / DESCRIBE / SHOW TABLES, no table function
outside the allow-list, no ``file()``, no ``SETTINGS``, ``SET``, ``FORMAT`` or ``INTO OUTFILE``.

Queries do not take the sink's writer lock: chDB runs queries on different connections to one
engine in parallel, so an analyst query never holds up the sink's inserts. Analyst queries run
one at a time (one session), each stopped by ClickHouse after ``max_seconds``
(``SCOPEWATCH_QUERY_TIMEOUT_SECONDS``).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import secrets
import threading
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

from aiohttp import web

from stream_jobs.clickhouse import jsonable, result_json
from stream_jobs.runtime.settings import Settings
from stream_jobs.sql_guard import NO_SETTINGS as _NO_SETTINGS
from stream_jobs.sql_guard import QueryCaps, QueryRefused, check_ast, parse_explain_ast

log = logging.getLogger("scopewatch.sink")

MAX_SQL_BYTES = 256 * 1024


def query_caps(settings: Settings) -> QueryCaps:
    """The limits of every analyst query on the embedded store (the sink's endpoint and the direct path)."""
    return QueryCaps(
        max_rows=settings.query_max_rows,
        max_result_bytes=settings.query_max_result_bytes,
        max_memory_bytes=settings.query_max_memory_bytes,
        max_seconds=settings.query_timeout_seconds,
    )


def _param(text: str) -> str:
    """A String query parameter as ClickHouse reads it (escaped like a TSV field)."""
    for raw, escaped in (("\\", "\\\\"), ("\n", "\\n"), ("\t", "\\t"), ("\r", "\\r"), ("\0", "\\0")):
        text = text.replace(raw, escaped)
    return text


class AnalystSession:
    """Analyst SQL on the embedded engine at ``path``: inspected by ClickHouse's parser, run capped.

    Two connections of its own to the engine, both opened with the caps and ``readonly=1``: one
    asks the parser (``formatQuery``, ``EXPLAIN AST``), one runs the query through clickhouse-connect
    (typed results, as everywhere else). Thread-safe; one query at a time.
    """

    def __init__(self, path: str, caps: QueryCaps, database: str | None = None) -> None:
        import chdb
        from clickhouse_connect.driver._chdbclient import ChdbClient

        self.caps = caps
        options = caps.settings()
        real = os.path.realpath(path)
        self._parser = chdb.connect(f"{real}?{urlencode(options)}")  # type: ignore[no-untyped-call]
        self._client = ChdbClient(path=real, database=database, chdb_options=options)
        self._lock = threading.Lock()
        self._last_kind = ""
        rows = self._text("SELECT lower(name) FROM system.table_functions", "TSVRaw").splitlines()
        self.table_functions = frozenset(r.strip() for r in rows if r.strip())

    def _text(self, sql: str, fmt: str, params: dict[str, str] | None = None) -> str:
        return str(self._parser.query(sql, fmt, params=params or {}))

    def inspect(self, sql: str) -> str:
        """The query as ClickHouse re-formats it, once its parse tree passed the checks; else QueryRefused."""
        try:
            out = self._text("SELECT formatQuery({sql:String})", "JSONCompactEachRow", {"sql": _param(sql)})
        except Exception as exc:  # noqa: BLE001 - the parser's own message (syntax error, several statements)
            raise QueryRefused(_clickhouse_message(exc)) from None
        canonical = str(json.loads(out)[0])
        try:
            explained = self._text(f"EXPLAIN AST {canonical}", "TSVRaw")
        except Exception as exc:  # noqa: BLE001 - EXPLAIN applies a SETTINGS clause: readonly refuses changes
            message = _clickhouse_message(exc)
            if "(READONLY)" in message:
                message = f"{_NO_SETTINGS} ({message})"
            raise QueryRefused(message) from None
        tree = parse_explain_ast(explained.splitlines())
        check_ast(tree, self.table_functions)
        self._last_kind = tree.kind
        return canonical

    def run(self, sql: str) -> dict[str, Any]:
        """``{"columns", "types", "rows"}``; QueryRefused for a query the endpoint does not run."""
        with self._lock:
            canonical = self.inspect(sql)
            if self._last_kind != "SelectWithUnionQuery":  # DESCRIBE, SHOW TABLES: small, not streamable
                return result_json(self._client.query(canonical))
            return self._capped(canonical)

    def _capped(self, canonical: str) -> dict[str, Any]:
        """Stream the answer block by block and stop once it is larger than ``max_result_bytes``.

        ClickHouse counts a constant column once towards ``max_result_bytes`` (``SELECT <a 30 MB
        string> FROM numbers(100000)`` passes it), so the size is also counted here, as the values
        arrive, keeping the sink's memory bounded by about one block past the cap.
        """
        budget = self.caps.max_result_bytes
        rows: list[list[Any]] = []
        with self._client.query_row_block_stream(canonical) as stream:
            columns = list(stream.source.column_names)
            types = [t.name for t in stream.source.column_types]
            for block in stream:
                for row in block:
                    values = [jsonable(v) for v in row]
                    budget -= _size(values)
                    rows.append(values)
                if budget < 0:
                    raise ResultTooLarge(
                        f"the answer is larger than {self.caps.max_result_bytes} bytes "
                        "(SCOPEWATCH_QUERY_MAX_RESULT_BYTES): select fewer columns or rows, or aggregate"
                    )
        return {"columns": columns, "types": types, "rows": rows}

    def close(self) -> None:
        self._client.close()
        self._parser.close()


class ResultTooLarge(RuntimeError):
    pass


def _size(value: Any) -> int:
    """About how many bytes a JSON-ready value takes in the answer."""
    if isinstance(value, str):
        return len(value) + 2
    if isinstance(value, list):
        return sum(_size(v) for v in value) + 2
    if isinstance(value, dict):
        return sum(len(k) + _size(v) + 4 for k, v in value.items()) + 2
    return 8


def _clickhouse_message(exc: Exception) -> str:
    text = str(exc).strip()
    at = text.rfind("DB::Exception: ")
    return text[at + len("DB::Exception: ") :] if at >= 0 else text


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
        session: AnalystSession,
        token: str,
        port: int,
        host: str = "127.0.0.1",
    ) -> None:
        self.session = session
        self.token = token
        self.port = port
        self.host = host
        self._runner: web.AppRunner | None = None

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
            result = await asyncio.to_thread(self.session.run, sql)
        except QueryRefused as exc:
            log.warning("SQL endpoint refused a query: %s", exc)
            return web.json_response({"error": f"refused: {exc}"}, status=403)
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
