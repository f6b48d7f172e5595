"""ClickHouse access through clickhouse-connect: embedded chDB (``chdb:///path``) or a server
(``http(s)://host:port``), with the same code and the same SQL.
"""

from __future__ import annotations

import re
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from typing import Any
from urllib.parse import urlparse

import clickhouse_connect
from clickhouse_connect.driver.client import Client

_IDENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


class ClickHouseError(RuntimeError):
    pass


@dataclass(frozen=True)
class Statement:
    """One statement of a migration and the conditions it runs under.

    ``only_if``: queries (``{db}`` substituted) that each return one row with 0 or 1; the statement runs
    only when all return 1. A migration file gives them as comment lines ``-- only if: <query>`` among
    the comments before the statement, which is what lets a migration resume after a kill half-way.
    """

    sql: str
    only_if: tuple[str, ...] = ()


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    steps: list[Statement]

    @property
    def statements(self) -> list[str]:
        """The SQL of every statement, conditions left out."""
        return [s.sql for s in self.steps]


_OPENED_HERE: set[str] = set()
"""chDB folders this process has opened (a second client in the same process shares the engine)."""

_CHDB_PATHS: weakref.WeakKeyDictionary[Client, str] = weakref.WeakKeyDictionary()


def chdb_path(client: Client) -> str | None:
    """The data folder of an embedded (chDB) client made by :func:`connect`; None for a server or ``:memory:``.

    Code that talks to the embedded engine directly (the sink's Arrow insert) opens its own
    ``chdb.connect(path)`` handle to the same engine with it.
    """
    return _CHDB_PATHS.get(client)


def _ensure_not_locked(path: str) -> None:
    """Fail loudly if another process holds the chDB folder.

    chDB, given a folder another process has locked, may print the lock error and go on with an
    engine that does not see that folder's data: queries then return empty results instead of
    failing. ClickHouse locks ``<folder>/status`` with ``flock``; probe the same lock first.
    """
    import fcntl
    import os

    real = os.path.realpath(path)
    if real in _OPENED_HERE:
        return
    status = os.path.join(real, "status")
    try:
        fd = os.open(status, os.O_RDONLY)
    except FileNotFoundError:
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise ClickHouseError(
            f"the embedded ClickHouse folder {path} is in use by another process "
            "(while the sink runs it owns the folder: `scopewatch sql` routes through its query endpoint)"
        ) from None
    finally:
        os.close(fd)  # closing drops our probe lock, if we got it


def connect(
    dsn: str, *, database: str | None = None, password: str = "", user: str = "default", readonly: bool = False
) -> Client:
    """A client for ``dsn``. ``readonly`` gives a session that can only read (ClickHouse readonly=2)."""
    settings: dict[str, Any] = {"readonly": 2} if readonly else {}
    try:
        if dsn.startswith("chdb:"):
            path = dsn[len("chdb://") :] if dsn.startswith("chdb://") else dsn[len("chdb:") :]
            if path and path != ":memory:":
                from pathlib import Path

                Path(path).mkdir(parents=True, exist_ok=True)
                _ensure_not_locked(path)
            client = clickhouse_connect.get_client(dsn=f"chdb://{path}", settings=settings, database=database)
            if path and path != ":memory:":
                import os

                _OPENED_HERE.add(os.path.realpath(path))
                _CHDB_PATHS[client] = os.path.realpath(path)
            return client
        parsed = urlparse(dsn)
        if parsed.scheme not in ("http", "https"):
            raise ClickHouseError(
                f"unsupported ClickHouse DSN scheme {parsed.scheme!r}: use chdb:///path or http(s)://"
            )
        return clickhouse_connect.get_client(
            dsn=dsn,
            username=parsed.username or user,
            password=parsed.password or password,
            settings=settings,
            database=database,
        )
    except ClickHouseError:
        raise
    except Exception as exc:
        text = str(exc)
        if "Cannot lock file" in text or "already running" in text:
            raise ClickHouseError(
                f"the embedded ClickHouse folder {dsn} is in use by another process "
                "(the stack's sink owns it while it runs: `scopewatch sql` routes through it)"
            ) from exc
        raise ClickHouseError(
            f"cannot open ClickHouse at {redact_dsn(dsn)}: {text.splitlines()[0] if text else exc}"
        ) from exc


def redact_dsn(dsn: str) -> str:
    parsed = urlparse(dsn)
    if parsed.password:
        return dsn.replace(f":{parsed.password}@", ":***@")
    return dsn


def load_migrations() -> list[Migration]:
    """The migrations shipped in ``stream_jobs/migrations``, in version order."""
    out: list[Migration] = []
    folder = resources.files("stream_jobs").joinpath("migrations")
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        match = re.match(r"^(\d+)_(.+)\.sql$", entry.name)
        if not match:
            continue
        text = entry.read_text(encoding="utf-8")
        out.append(Migration(int(match.group(1)), match.group(2), parse_statements(text)))
    return out


def check_tables(client: Client, database: str) -> None:
    """Raise ClickHouseError unless every table has every column its spec writes (``stream_jobs.tables``).

    The sink runs it after the migrations, so a spec column that no migration adds stops the sink at
    start with the columns named, instead of failing every insert of that table.
    """
    from stream_jobs.tables import SPECS, missing_columns

    literal = "'" + database.replace("\\", "\\\\").replace("'", "\\'") + "'"
    result = client.query(f"SELECT table, name FROM system.columns WHERE database = {literal}")
    existing: dict[str, set[str]] = {}
    for table, column in result.result_rows:
        existing.setdefault(str(table), set()).add(str(column))
    missing = missing_columns(existing, SPECS)
    if missing:
        raise ClickHouseError(
            f"the ClickHouse tables lack columns the sink writes: {', '.join(missing)} (a migration is missing)"
        )


_ONLY_IF = re.compile(r"^\s*--\s*only if:\s*(.*?)\s*$", re.I)


def parse_statements(sql: str) -> list[Statement]:
    """Split a migration file on ``;`` at line ends into statements, comment lines dropped.

    A comment line ``-- only if: <query>`` before a statement's first line makes the statement
    conditional (several such lines: all must hold). A condition anywhere else (inside a statement, or
    with no statement after it) is a ValueError, so that a misplaced one does not silently run
    a statement unconditionally.
    """
    out = []
    for piece in re.split(r";\s*(?:\n|$)", sql):
        lines: list[str] = []
        only_if: list[str] = []
        for line in piece.splitlines():
            condition = _ONLY_IF.match(line)
            if condition:
                if lines or not condition.group(1):
                    raise ValueError(f"misplaced or empty condition (-- only if: goes before a statement): {line!r}")
                only_if.append(condition.group(1))
            elif not line.strip().startswith("--"):
                lines.append(line)
        body = "\n".join(lines).strip()
        if body:
            out.append(Statement(body, tuple(only_if)))
        elif only_if:
            raise ValueError(f"a condition with no statement after it: {only_if[0]!r}")
    return out


def split_statements(sql: str) -> list[str]:
    """Split a migration file on ``;`` at line ends, dropping comment lines and comment-only pieces."""
    return [s.sql for s in parse_statements(sql)]


def run_statement(client: Client, database: str, statement: Statement) -> bool:
    """Run one migration statement in ``database`` if its conditions hold; whether it ran."""
    for condition in statement.only_if:
        rows = client.query(condition.replace("{db}", database)).result_rows
        if len(rows) != 1 or len(rows[0]) != 1 or rows[0][0] not in (0, 1):
            raise ClickHouseError(f"a migration condition must return one row with 0 or 1, got {rows!r}: {condition}")
        if not rows[0][0]:
            return False
    client.command(statement.sql.replace("{db}", database))
    return True


def migrate(client: Client, database: str) -> list[str]:
    """Apply pending migrations (idempotent); returns the names applied now.

    A migration is recorded in ``schema_migrations`` after its last statement: one killed half-way
    runs again from its first statement, which its conditions (``-- only if:``) and ``IF [NOT] EXISTS``
    make safe.
    """
    if not _IDENT.match(database):
        raise ClickHouseError(f"invalid database name {database!r}")
    client.command(f"CREATE DATABASE IF NOT EXISTS {database}")
    client.command(
        f"CREATE TABLE IF NOT EXISTS {database}.schema_migrations "
        "(version UInt32, name String, applied_at DateTime64(3, 'UTC')) ENGINE = MergeTree ORDER BY version"
    )
    done = {row[0] for row in client.query(f"SELECT version FROM {database}.schema_migrations").result_rows}
    applied: list[str] = []
    for migration in load_migrations():
        if migration.version in done:
            continue
        for statement in migration.steps:
            run_statement(client, database, statement)
        client.insert(
            f"{database}.schema_migrations",
            [(migration.version, migration.name, datetime.now(UTC))],
            column_names=["version", "name", "applied_at"],
        )
        applied.append(f"{migration.version:04d}_{migration.name}")
    return applied


def jsonable(value: Any) -> Any:
    """A query result value as JSON: datetimes as RFC 3339 UTC, bytes as text."""
    if isinstance(value, datetime):
        if value.tzinfo is None:
            value = value.replace(tzinfo=UTC)
        return value.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    return str(value)


def run_query(client: Client, sql: str, max_rows: int = 100_000, max_seconds: float | None = None) -> dict[str, Any]:
    """Run one read query; returns ``{"columns", "types", "rows"}`` with JSON-ready values.

    ``max_seconds``: ClickHouse stops the query after this long (``max_execution_time``).
    """
    settings: dict[str, Any] = {"max_result_rows": max_rows, "result_overflow_mode": "throw"}
    if max_seconds is not None:
        settings["max_execution_time"] = max_seconds
    return result_json(client.query(sql, settings=settings))


def result_json(result: Any) -> dict[str, Any]:
    """A clickhouse-connect query result as ``{"columns", "types", "rows"}`` with JSON-ready values."""
    return {
        "columns": list(result.column_names),
        "types": [t.name for t in result.column_types],
        "rows": [[jsonable(v) for v in row] for row in result.result_rows],
    }
