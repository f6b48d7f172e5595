"""Run SQL against the configured ClickHouse, routed through the chDB owner while the stack runs.

On an embedded store the rules are the same whoever owns the folder: through the running sink's
endpoint, or, with no sink running, on the folder opened here, each query goes through one
:class:`stream_jobs.query_server.AnalystSession` (ClickHouse's parser checks it, ``readonly=1``,
the caps of :func:`stream_jobs.query_server.query_caps`).
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

from scopewatch.stack import proc
from stream_jobs.runtime.settings import Settings


class SqlError(RuntimeError):
    pass


def _endpoint(settings: Settings) -> tuple[int, str] | None:
    """The running sink's query endpoint (port, token), if there is one.

    ``query.json`` is written by the sink itself (whether ``scopewatch up`` or something else
    started it) with its pid; a file left by a sink that died is ignored.
    """
    try:
        info = json.loads((settings.run_dir / "query.json").read_text())
        token = (settings.run_dir / "query-token").read_text().strip()
        port, pid = int(info["port"]), int(info["pid"])
        ticks = info.get("start_ticks")
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if not proc.pid_alive(pid, None if ticks is None else int(ticks)):
        return None
    return port, token


def run_sql(settings: Settings, sql: str, timeout: float = 120.0) -> dict[str, Any]:
    """``{"columns", "types", "rows"}`` for ``sql``; raises :class:`SqlError` with ClickHouse's message."""
    if settings.embedded:
        endpoint = _endpoint(settings)
        if endpoint is not None:
            return _via_endpoint(endpoint, sql, timeout)
        return _on_folder(settings, sql)
    from stream_jobs.clickhouse import ClickHouseError, connect, run_query

    try:
        client = connect(
            settings.dsn,
            database=None,
            readonly=True,
            user=settings.clickhouse_user,
            password=settings.clickhouse_password.get_secret_value(),
        )
        try:
            return run_query(client, sql)
        finally:
            client.close()
    except ClickHouseError as exc:
        raise SqlError(str(exc)) from exc
    except Exception as exc:
        raise SqlError(str(exc).strip()) from exc


def _on_folder(settings: Settings, sql: str) -> dict[str, Any]:
    """``sql`` on the embedded folder opened here (no sink owns it), with the endpoint's checks and caps.

    The folder is opened through :func:`stream_jobs.clickhouse.connect` (it refuses a folder another
    process holds); the query itself runs on an :class:`AnalystSession` of the same engine, exactly
    as the sink's endpoint runs it, and fails with the endpoint's messages.
    """
    from stream_jobs.clickhouse import ClickHouseError, chdb_path, connect
    from stream_jobs.query_server import AnalystSession, ResultTooLarge, query_caps
    from stream_jobs.sql_guard import QueryRefused

    try:
        owner = connect(settings.dsn, database=None, readonly=True)
    except ClickHouseError as exc:
        raise SqlError(str(exc)) from exc
    try:
        path = chdb_path(owner)
        if path is None:
            raise SqlError(f"{settings.dsn}: an in-memory store holds no data to query; use chdb:///path")
        session = AnalystSession(path, query_caps(settings))
        try:
            return session.run(sql)
        finally:
            session.close()
    except QueryRefused as exc:
        raise SqlError(f"refused: {exc}") from exc
    except ResultTooLarge as exc:
        raise SqlError(str(exc)) from exc
    except SqlError:
        raise
    except Exception as exc:  # ClickHouse's own message, as the endpoint reports it
        raise SqlError(str(exc).strip()) from exc
    finally:
        owner.close()


def _via_endpoint(endpoint: tuple[int, str], sql: str, timeout: float) -> dict[str, Any]:
    port, token = endpoint
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}/query",
        data=json.dumps({"sql": sql}).encode(),
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310 - loopback only
            result: dict[str, Any] = json.loads(response.read())
            return result
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read()).get("error", str(exc))
        except ValueError:
            message = str(exc)
        raise SqlError(message) from exc
    except urllib.error.URLError as exc:
        raise SqlError(f"cannot reach the sink's SQL endpoint on 127.0.0.1:{port}: {exc.reason}") from exc
