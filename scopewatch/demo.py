"""``scopewatch demo``: real MCP traffic through the stdio collector into the running stack.

Two MCP sessions (the ``mcp`` Python SDK client -> ``scopewatch wrap`` -> server-everything). The
first tells the consent story for alice's agent: grants are issued when the session starts, calls
stay inside and outside them, one grant is revoked mid-session and another expires, so every kind
of verdict shows up with the grant and the reason that explain it. It ends with the
runtime authorization story (issue 18): a tool that needs a human approval is approved once and
called twice (the second call is ``approval_missing``), and a Cedar policy forbids resources
labelled ``restricted`` (a call touching one is ``out_of_policy``). The second session (bob) is
plain traffic under a narrow grant. The demo waits for the grace period so the verdicts it shows
are final, then checks them against ``scopewatch verify``: the replay engine over the same stored
events must give every call the same verdict, grant and approval.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
import threading
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from rich.console import Console
from rich.table import Table

from schemas import ApprovalDecided, Event, GrantIssued, GrantRevoked, PolicyPublished
from scopewatch.publish import publish_events
from scopewatch.sqlclient import SqlError, run_sql
from scopewatch.stack import proc
from scopewatch.stack.npm import server_everything_command
from scopewatch.stack.stack import settings_env
from stream_jobs.runtime.settings import Settings

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


STORY_CALLS = 11
"""Calls of alice's consent story; ``--calls`` must allow at least these."""
RESTRICTED_POLICY = (
    "// scopewatch demo: the agent may call what its grant covers, except on resources labelled restricted\n"
    "permit(principal, action, resource);\n"
    'forbid(principal, action, resource) when { context.labels.contains("restricted") };\n'
)
GRANT_TTL = timedelta(seconds=4)


def _require_stack(settings: Settings) -> None:
    for name in ("sink", "worker"):
        record = proc.read_pid_record(settings.run_dir / f"{name}.json")
        if record is None or not proc.is_running(record):
            raise DemoError(f"the stack is not running ({name} is down): run `scopewatch up` first")


def _grant(principal: str, grant_id: str, tools: list[str], at: datetime, **extra: Any) -> GrantIssued:
    return GrantIssued(
        event_id=str(uuid.uuid4()),
        event_time=at,
        tenant=DEMO_TENANT,
        grant_id=grant_id,
        principal=principal,
        agent_id=DEMO_AGENT,
        tools=[f"everything/{t}" for t in tools],
        not_before=at,
        granted_by=principal,
        purpose="scopewatch demo",
        **extra,
    )


def _revoke(principal: str, grant_id: str, at: datetime, reason: str) -> GrantRevoked:
    return GrantRevoked(
        event_id=str(uuid.uuid4()),
        event_time=at,
        tenant=DEMO_TENANT,
        grant_id=grant_id,
        principal=principal,
        agent_id=DEMO_AGENT,
        revoked_by=principal,
        reason=reason,
    )


def _policy(policy_id: str, at: datetime) -> PolicyPublished:
    return PolicyPublished(
        event_id=str(uuid.uuid4()),
        event_time=at,
        tenant=DEMO_TENANT,
        policy_id=policy_id,
        version="demo-1",
        cedar=RESTRICTED_POLICY,
        labels={"restricted": ["resource:9*"]},
        published_by="scopewatch demo",
    )


def _approval(principal: str, approval_id: str, tool: str, at: datetime) -> ApprovalDecided:
    return ApprovalDecided(
        event_id=str(uuid.uuid4()),
        event_time=at,
        tenant=DEMO_TENANT,
        approval_id=approval_id,
        principal=principal,
        agent_id=DEMO_AGENT,
        tool=f"everything/{tool}",
        decision="approve",
        approver="carol@acme.example",
        reason="one tiny image, once",
    )


Publish = Callable[[list[Event]], Awaitable[None]]
Call = Callable[[DemoCall], Awaitable[None]]


async def alice_story(tag: str, principal: str, call: Call, publish: Publish, say: Callable[[str], None]) -> None:
    """The consent story: in scope, out of scope (tool and resource), revoked, expired."""
    now = datetime.now(UTC)
    basics, reports, refs = f"{tag}-basics", f"{tag}-reports", f"{tag}-refs"
    await publish(
        [
            _grant(principal, basics, ["echo", "get-sum"], now, expires_at=now + GRANT_TTL),
            _grant(principal, reports, ["get-structured-content", "get-annotated-message"], now),
            _grant(principal, refs, ["get-resource-reference"], now, resources=["resource:1", "resource:2"]),
        ]
    )
    say(
        f"  alice grants the agent: {basics} (echo, get-sum; expires in {GRANT_TTL.seconds}s), "
        f"{reports} (structured reports), {refs} (resources 1 and 2 only)"
    )
    await call(DemoCall("echo", {"message": "hello from the demo"}))
    await call(DemoCall("get-sum", {"a": 2, "b": 3}))
    await call(DemoCall("get-structured-content", {"location": "Chicago"}))
    await call(DemoCall("get-resource-reference", {"resourceType": "Text", "resourceId": 1}))
    await call(DemoCall("get-resource-reference", {"resourceType": "Text", "resourceId": 7}))
    await call(DemoCall("trigger-long-running-operation", {"duration": 0.2, "steps": 2}))
    await publish([_revoke(principal, reports, datetime.now(UTC), "alice withdrew consent for reports")])
    say(f"  alice revokes {reports}")
    await call(DemoCall("get-structured-content", {"location": "Chicago"}))
    wait = (now + GRANT_TTL - datetime.now(UTC)).total_seconds() + 0.3
    if wait > 0:
        say(f"  waiting {wait:.1f}s for {basics} to expire")
        await asyncio.sleep(wait)
    await call(DemoCall("echo", {"message": "still allowed?"}))
    await authorization_story(tag, principal, call, publish, say)


async def authorization_story(
    tag: str, principal: str, call: Call, publish: Publish, say: Callable[[str], None]
) -> None:
    """Runtime authorization: an approval-gated tool approved once and called twice; a Cedar policy that
    forbids resources labelled restricted."""
    now = datetime.now(UTC)
    gated, labelled, policy = f"{tag}-gated", f"{tag}-labelled", f"{tag}-no-restricted"
    await publish(
        [
            _policy(policy, now),
            _grant(principal, gated, ["get-tiny-image"], now, approval_tools=["everything/get-tiny-image"]),
            _grant(principal, labelled, ["get-resource-reference"], now, policies=[policy]),
        ]
    )
    say(
        f"  alice grants {gated} (get-tiny-image, each call needs a human approval) and {labelled} "
        f"(get-resource-reference under Cedar policy {policy}: resource:9* is labelled restricted, forbidden)"
    )
    await publish([_approval(principal, f"{tag}-approval-1", "get-tiny-image", datetime.now(UTC))])
    say("  carol approves one get-tiny-image call; the agent calls it twice")
    await call(DemoCall("get-tiny-image", {}))
    await call(DemoCall("get-tiny-image", {}))
    await call(DemoCall("get-resource-reference", {"resourceType": "Text", "resourceId": 9}))


async def _drive(
    settings: Settings,
    session_id: str,
    principal: str,
    script: Callable[[Call, Publish], Awaitable[None]],
) -> list[tuple[str, bool]]:
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

    async def publish(events: list[Event]) -> None:
        _, bad = await publish_events(settings.kafka_bootstrap, settings.topics, enumerate(events, start=1))
        assert not bad

    async with Client(params, read_timeout_seconds=60) as client:
        await client.list_tools()

        async def call(c: DemoCall) -> None:
            result = await client.call_tool(c.tool, c.arguments)
            outcomes.append((c.tool, bool(getattr(result, "is_error", False))))

        await script(call, publish)
    return outcomes


def wait_for_rows(settings: Settings, session_ids: list[str], expected: int, timeout: float) -> dict[str, int]:
    """Poll ClickHouse until the demo's calls, results and final verdicts have all landed."""
    ids = ",".join(f"'{s}'" for s in session_ids)
    db = settings.clickhouse_database
    query = (
        f"SELECT (SELECT count() FROM {db}.tool_calls WHERE session_id IN ({ids})) AS calls, "
        f"(SELECT count() FROM {db}.tool_results WHERE session_id IN ({ids})) AS results, "
        f"(SELECT uniqExact(call_id) FROM {db}.evidence_rows WHERE session_id IN ({ids}) AND final) AS verdicts"
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
    raise DemoError(f"timed out after {timeout:.0f}s waiting for {expected} final verdicts in ClickHouse; saw {counts}")


def explain(verdict: str, matched: str | None, reasons: list[str]) -> str:
    """The one reason that explains a verdict best: the matched grant's line, else the headline."""
    if matched is not None:
        for r in reasons:
            if r.startswith(f"grant {matched}:"):
                return r
    if verdict == "out_of_scope_resource":
        for r in reasons:
            if r.startswith("grant ") and " outside " in r:
                return r
    for r in reasons:
        if r.startswith(f"{verdict}:"):
            return r
    return reasons[0] if reasons else ""


# ------------------------------------------------------------------------------- paging

DEMO_ROUTE = "demo-oncall"
DEMO_SECRET_ENV = "SCOPEWATCH_DEMO_WEBHOOK_SECRET"  # noqa: S105 - the variable's name, not a secret


class OnCall:
    """A local on-call receiver and an in-process pager paging it, for a stack without a pager.

    The receiver is a real HTTP server on 127.0.0.1 that checks each delivery's Standard Webhooks
    signature; the pager is ``stream_jobs.pager.PagerService`` with one webhook route to it, so the
    requests and the ``pages`` rows are what a configured pager would produce.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.received: list[dict[str, Any]] = []
        self.bad_signatures = 0
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._service: Any = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="demo-oncall", daemon=True)
        self._thread.start()
        if not self._ready.wait(30):
            raise DemoError("the demo's local pager did not start")
        if self._error is not None:
            raise DemoError(f"the demo's local pager failed: {self._error}")

    def stop(self) -> None:
        if self._loop is not None and self._service is not None:
            self._loop.call_soon_threadsafe(self._service.stop)
        if self._thread is not None:
            self._thread.join(30)

    def _run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException as exc:  # noqa: BLE001 - reported to the demo thread
            self._error = exc
            self._ready.set()

    async def _main(self) -> None:
        from aiohttp import web

        from schemas.webhooks import parse_secret, sign
        from stream_jobs.pager import PagerService, PagerTopics
        from stream_jobs.pager_config import PagerConfig, RouteConfig, resolve_routes

        secret = "whsec_" + base64.b64encode(os.urandom(24)).decode("ascii")
        key = parse_secret(secret)

        async def deliver(request: web.Request) -> web.Response:
            body = await request.read()
            msg_id = request.headers.get("webhook-id", "")
            stamp = request.headers.get("webhook-timestamp", "0")
            expected = sign(key, msg_id, int(stamp), body)
            if request.headers.get("webhook-signature", "") != expected:
                self.bad_signatures += 1
                return web.Response(status=401)
            self.received.append({"id": msg_id, "body": json.loads(body)})
            return web.Response(status=204)

        app = web.Application()
        app.router.add_post("/oncall", deliver)
        runner = web.AppRunner(app)
        await runner.setup()
        port = proc.free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        config = PagerConfig(
            group=f"{self.settings.worker_group}-demo-pager",
            window_seconds=600,
            routes=(
                RouteConfig(
                    name=DEMO_ROUTE,
                    channel="webhook",
                    url=f"http://127.0.0.1:{port}/oncall",
                    secret_env=DEMO_SECRET_ENV,
                    min_severity="medium",
                    tenants=(DEMO_TENANT,),
                ),
            ),
        )
        routes = resolve_routes(config, {DEMO_SECRET_ENV: secret})
        topics = PagerTopics(self.settings.topics.findings, self.settings.topics.pages)
        self._service = PagerService(config, routes, self.settings.kafka_bootstrap, topics)
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        try:
            await self._service.run()
        finally:
            await runner.cleanup()


def pager_running(settings: Settings) -> bool:
    record = proc.read_pid_record(settings.run_dir / "pager.json")
    return record is not None and proc.is_running(record)


def wait_for_pages(settings: Settings, session_ids: list[str], timeout: float) -> list[list[Any]]:
    """Findings of the demo's calls and the page attempts for them, once every pageable one was delivered.

    No ``SETTINGS`` (the SQL endpoint refuses them): a finding without a page attempt gets the
    LEFT JOIN's defaults, an empty outcome and route and 0 attempts.
    """
    ids = ",".join(f"'{s}'" for s in session_ids)
    db = settings.clickhouse_database
    query = f"""
        SELECT f.rule_id AS rule, f.severity AS severity, count() AS findings,
               any(f.summary) AS summary, f.dedup_key AS dedup_key,
               argMax(p.outcome, p.attempted_at) AS page, argMax(p.route, p.attempted_at) AS route,
               max(p.attempt) AS attempts
        FROM (SELECT * FROM {db}.findings FINAL WHERE session_id IN ({ids})) AS f
        LEFT JOIN {db}.pages AS p ON p.dedup_key = f.dedup_key
        GROUP BY f.rule_id, f.severity, f.dedup_key
        ORDER BY f.rule_id, f.dedup_key"""
    deadline = time.monotonic() + timeout
    rows: list[list[Any]] = []
    while time.monotonic() < deadline:
        try:
            rows = run_sql(settings, query)["rows"]
        except SqlError:
            rows = []
        pageable = [r for r in rows if r[1] in ("medium", "high", "critical")]
        if pageable and all(r[5] == "delivered" for r in pageable):
            return rows
        time.sleep(0.5)
    return rows


def show_pages(console: Console, rows: list[list[Any]], oncall: OnCall | None) -> dict[str, int]:
    table = Table("rule", "severity", "findings", "summary", "page", "route", title="findings and pages")
    outcomes: dict[str, int] = {}
    for rule, severity, count, summary, _key, page, route, _attempts in rows:
        outcome = page or ("not paged (below the route's severity)" if severity in ("info", "low") else "pending")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        style = "green" if page == "delivered" else "yellow"
        table.add_row(str(rule), str(severity), str(count), str(summary), f"[{style}]{outcome}[/]", str(route or ""))
    console.print(table)
    if oncall is not None:
        console.print(
            f"the local on-call receiver got {len(oncall.received)} signed webhook deliveries "
            f"(Standard Webhooks signatures verified; {oncall.bad_signatures} bad)"
        )
    return outcomes


def run_demo(settings: Settings, calls: int, timeout: float, console: Console) -> dict[str, Any]:
    _require_stack(settings)
    if calls < STORY_CALLS:
        raise DemoError(f"--calls must be at least {STORY_CALLS} (the consent story alone makes {STORY_CALLS})")
    tag = uuid.uuid4().hex[:6]
    started = datetime.now(UTC)
    alice, bob = "alice@acme.example", "bob@acme.example"
    filler = demo_calls(calls - STORY_CALLS)

    async def bob_script(call: Call, publish: Publish) -> None:
        now = datetime.now(UTC)
        await publish([_grant(bob, f"{tag}-bob-echo", ["echo", "get-sum"], now)])
        for c in filler:
            await call(c)

    sessions: list[tuple[str, str, Callable[[Call, Publish], Awaitable[None]]]] = [
        (str(uuid.uuid4()), alice, lambda call, publish: alice_story(tag, alice, call, publish, console.print)),
    ]
    if filler:
        sessions.append((str(uuid.uuid4()), bob, bob_script))
    console.print(
        f"[bold]demo[/]: {calls} tool calls in {len(sessions)} MCP sessions "
        "(mcp Python SDK client → scopewatch wrap → @modelcontextprotocol/server-everything)"
    )
    oncall: OnCall | None = None
    if not pager_running(settings):
        console.print("  no pager configured: pages go to a local on-call receiver the demo starts")
        oncall = OnCall(settings)
        oncall.start()
    made = errors = 0
    for session_id, principal, script in sessions:
        console.print(f"  session {session_id} for {principal}:")
        outcomes = asyncio.run(_drive(settings, session_id, principal, script))
        made += len(outcomes)
        errors += sum(1 for _, failed in outcomes if failed)
        console.print(f"    {len(outcomes)} calls, {sum(1 for _, f in outcomes if f)} returned errors")
    grace = settings.grace_seconds
    with console.status(f"waiting for final verdicts (grace {grace:g}s for late identity and consent facts)"):
        counts = wait_for_rows(settings, [s for s, _, _ in sessions], made, timeout + grace)
    db = settings.clickhouse_database
    ids = ",".join(f"'{s}'" for s, _, _ in sessions)
    result = run_sql(
        settings,
        f"""
        SELECT formatDateTime(c.event_time, '%H:%i:%S.%f') AS time, e.principal AS principal, c.tool AS tool,
               r.status AS status, e.verdict AS verdict, e.matched_grant_id AS grant, rl.reasons AS reasons,
               e.latest_version AS version
        FROM {db}.tool_calls AS c
        LEFT JOIN {db}.tool_results AS r ON r.call_id = c.call_id
        LEFT JOIN (
            SELECT call_id, argMax(principal, version) AS principal, argMax(verdict, version) AS verdict,
                   argMax(matched_grant_id, version) AS matched_grant_id, argMax(reason_key, version) AS reason_key,
                   max(version) AS latest_version
            FROM {db}.evidence_rows WHERE session_id IN ({ids}) AND final GROUP BY call_id
        ) AS e ON e.call_id = c.call_id
        LEFT JOIN (
            SELECT id, any(reasons) AS reasons FROM {db}.evidence_reason_lists
            WHERE id IN (SELECT reason_key FROM {db}.evidence_rows WHERE session_id IN ({ids}) AND final)
            GROUP BY id
        ) AS rl ON rl.id = e.reason_key
        WHERE c.session_id IN ({ids})
        ORDER BY c.event_time, c.collector_seq""",
    )
    table = Table("time", "principal", "tool", "status", "verdict", "grant", "why", title="final verdicts")
    verdicts: dict[str, int] = {}
    for time_, principal, tool, status, verdict, grant, reasons, _version in result["rows"]:
        verdicts[str(verdict)] = verdicts.get(str(verdict), 0) + 1
        style = "green" if verdict == "in_scope" else "red"
        table.add_row(
            str(time_),
            str(principal),
            str(tool),
            str(status),
            f"[{style}]{verdict}[/]",
            "" if grant is None else str(grant),
            explain(str(verdict), grant, list(reasons or [])),
        )
    console.print(table)
    replayed = check_with_replay(settings, started, console)
    total = run_sql(settings, f"SELECT count() FROM {db}.tool_calls")["rows"][0][0]
    console.print(
        f"[bold green]made {made} tool calls ({errors} failing); ClickHouse holds {counts['calls']} "
        f"tool_calls, {counts['results']} tool_results and a final verdict for {counts['verdicts']} of them[/] "
        f"({total} tool_calls in all)."
    )
    console.print(
        f'Every verdict version: scopewatch sql "SELECT call_id, version, verdict, final, late FROM {db}.evidence_rows '
        'ORDER BY decided_at DESC LIMIT 20"'
    )
    try:
        with console.status("waiting for the findings to be paged"):
            page_rows = wait_for_pages(settings, [s for s, _, _ in sessions], timeout)
    finally:
        if oncall is not None:
            oncall.stop()
    pages = show_pages(console, page_rows, oncall)
    received = None if oncall is None else len(oncall.received)
    if replayed["mismatches"]:
        raise DemoError(
            f"{len(replayed['mismatches'])} live final verdicts differ from replay of the same events "
            "(listed above; `scopewatch verify` shows them again)"
        )
    return {
        "made": made,
        "errors": errors,
        "verdicts": verdicts,
        "pages": pages,
        "received": received,
        "replay": replayed,
        **counts,
    }


def check_with_replay(settings: Settings, since: datetime, console: Console) -> dict[str, Any]:
    """The demo's own check: ``scopewatch verify`` re-judges the stored calls from the stored facts with the
    replay engine and compares verdict, grant and approval with the live final verdicts."""
    from stream_jobs.verify import verify

    with console.status("checking the live verdicts against replay of the stored events (scopewatch verify)"):
        report = verify(
            lambda sql: run_sql(settings, sql), settings.clickhouse_database, since=since, tenant=DEMO_TENANT
        )
    ours = [p for p in report.verdict_problems if p.call_id is not None]
    if not ours:
        console.print(
            f"[bold green]replay of the stored events agrees with every live final verdict[/] "
            f"({report.verdicts_match} calls of tenant {DEMO_TENANT} since the demo started; "
            f"{report.pending} still provisional)"
        )
    else:
        console.print(f"[bold red]replay disagrees with {len(ours)} live verdicts:[/]")
        for p in ours:
            console.print(f"  call {p.call_id}: {p.detail}")
    return {
        "checked": report.calls_checked,
        "match": report.verdicts_match,
        "pending": report.pending,
        "mismatches": [{"call_id": p.call_id, "kind": p.kind, "detail": p.detail} for p in ours],
    }
