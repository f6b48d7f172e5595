"""``scopewatch demo``: real MCP traffic through the stdio collector into the running stack."""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Any

from rich.console import Console
from rich.table import Table

from scopewatch.settings import Settings
from scopewatch.sqlclient import SqlError, run_sql
from scopewatch.stack import proc
from scopewatch.stack.npm import server_everything_command
from scopewatch.stack.stack import settings_env

DEMO_TENANT = "acme"
DEMO_AGENT = "support-copilot"


class DemoError(RuntimeError):
    pass


@dataclass(frozen=True)
class DemoCall:
    tool: str
    arguments: dict[str, Any]


def demo_calls(n: int) -> list[DemoCall]:
    """A varied script of calls against server-everything, failing ones included."""
    base = [
        DemoCall("echo", {"message": "hello from the demo"}),
        DemoCall("get-sum", {"a": 2, "b": 3}),
        DemoCall("get-annotated-message", {"messageType": "success", "includeImage": False}),
        DemoCall("get-structured-content", {"location": "Chicago"}),
        DemoCall("get-tiny-image", {}),
        DemoCall("get-resource-links", {"count": 2}),
        DemoCall("get-resource-reference", {"resourceType": "Text", "resourceId": 1}),
        DemoCall("trigger-long-running-operation", {"duration": 0.2, "steps": 2}),
        DemoCall("delete-all-files", {"path": "/"}),  # no such tool: an error result
        DemoCall("get-sum", {"a": "two", "b": 3}),  # invalid arguments: an error result
        DemoCall("get-structured-content", {"location": "Atlantis"}),  # not in the enum: an error result
        DemoCall("echo", {"message": "x" * 2000}),
    ]
    out: list[DemoCall] = []
    i = 0
    while len(out) < n:
        call = base[i % len(base)]
        if call.tool == "echo" and i >= len(base):
            call = DemoCall("echo", {"message": f"message #{i}"})
        if call.tool == "get-sum" and i >= len(base) and isinstance(call.arguments.get("a"), int):
            call = DemoCall("get-sum", {"a": i, "b": i * 2})
        out.append(call)
        i += 1
    return out


def _require_stack(settings: Settings) -> None:
    for name in ("sink", "worker"):
        record = proc.read_pid_record(settings.run_dir / f"{name}.json")
        if record is None or not proc.is_running(record):
            raise DemoError(f"the stack is not running ({name} is down): run `scopewatch up` first")


async def _drive(settings: Settings, session_id: str, principal: str, calls: list[DemoCall]) -> list[tuple[str, bool]]:
    from mcp import Client, StdioServerParameters

    server = server_everything_command(settings.cache_dir)
    wrapper = [
        "-m",
        "scopewatch",
        "wrap",
        "--session-id",
        session_id,
        "--tenant",
        DEMO_TENANT,
        "--principal",
        principal,
        "--agent-id",
        DEMO_AGENT,
        "--server",
        "everything",
        "--",
        *server,
    ]
    env = settings_env(settings)
    params = StdioServerParameters(command=sys.executable, args=wrapper, env=env)
    outcomes: list[tuple[str, bool]] = []
    async with Client(params, read_timeout_seconds=60) as client:
        await client.list_tools()
        for call in calls:
            result = await client.call_tool(call.tool, call.arguments)
            outcomes.append((call.tool, bool(getattr(result, "is_error", False))))
    return outcomes


def wait_for_rows(settings: Settings, session_ids: list[str], expected: int, timeout: float) -> dict[str, int]:
    """Poll ClickHouse until the demo's calls, results and verdicts have all landed."""
    ids = ",".join(f"'{s}'" for s in session_ids)
    db = settings.clickhouse_database
    query = (
        f"SELECT (SELECT count() FROM {db}.tool_calls WHERE session_id IN ({ids})) AS calls, "
        f"(SELECT count() FROM {db}.tool_results WHERE session_id IN ({ids})) AS results, "
        f"(SELECT count() FROM {db}.evidence WHERE session_id IN ({ids})) AS verdicts"
    )
    deadline = time.monotonic() + timeout
    counts = {"calls": 0, "results": 0, "verdicts": 0}
    while time.monotonic() < deadline:
        try:
            row = run_sql(settings, query)["rows"][0]
            counts = dict(zip(("calls", "results", "verdicts"), (int(v) for v in row), strict=True))
        except SqlError:
            pass
        if min(counts.values()) >= expected:
            return counts
        time.sleep(0.5)
    raise DemoError(f"timed out after {timeout:.0f}s waiting for {expected} calls in ClickHouse; saw {counts}")


def run_demo(settings: Settings, calls: int, timeout: float, console: Console) -> dict[str, Any]:
    _require_stack(settings)
    script = demo_calls(calls)
    half = len(script) // 2
    sessions = [
        (str(uuid.uuid4()), "alice@acme.example", script[:half]),
        (str(uuid.uuid4()), "bob@acme.example", script[half:]),
    ]
    console.print(
        f"[bold]demo[/]: {len(script)} tool calls in {len(sessions)} MCP sessions "
        "(mcp Python SDK client → scopewatch wrap → @modelcontextprotocol/server-everything)"
    )
    made = 0
    errors = 0
    for session_id, principal, part in sessions:
        outcomes = asyncio.run(_drive(settings, session_id, principal, part))
        made += len(outcomes)
        errors += sum(1 for _, failed in outcomes if failed)
        console.print(
            f"  session {session_id} for {principal}: {len(outcomes)} calls, "
            f"{sum(1 for _, f in outcomes if f)} returned errors"
        )
    counts = wait_for_rows(settings, [s for s, _, _ in sessions], made, timeout)
    db = settings.clickhouse_database
    ids = ",".join(f"'{s}'" for s, _, _ in sessions)
    result = run_sql(
        settings,
        f"""
        SELECT formatDateTime(c.event_time, '%H:%i:%S.%f') AS time, left(c.session_id, 8) AS session,
               c.tool AS tool, r.status AS status, round(r.duration_ms, 1) AS ms, e.verdict AS verdict,
               left(ifNull(r.error, ''), 40) AS error
        FROM {db}.tool_calls AS c
        LEFT JOIN {db}.tool_results AS r ON r.call_id = c.call_id
        LEFT JOIN {db}.evidence AS e ON e.call_id = c.call_id
        WHERE c.session_id IN ({ids})
        ORDER BY c.event_time, c.collector_seq""",
    )
    table = Table(*result["columns"], title="what landed in ClickHouse")
    for row in result["rows"]:
        table.add_row(*("" if v is None else str(v) for v in row))
    console.print(table)
    total = run_sql(settings, f"SELECT count() FROM {db}.tool_calls")["rows"][0][0]
    console.print(
        f"[bold green]made {made} tool calls ({errors} failing); ClickHouse holds {counts['calls']} "
        f"tool_calls, {counts['results']} tool_results and {counts['verdicts']} verdicts for them[/] "
        f"({total} tool_calls in all)."
    )
    console.print(f'Query it yourself: scopewatch sql "SELECT tool, count() FROM {db}.tool_calls GROUP BY tool"')
    return {"made": made, "errors": errors, **counts}
