"""The ``scopewatch`` command line."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Audit and detection pipeline for AI-agent tool use over MCP.",
)
err = Console(stderr=True)


def _settings(**overrides: Any) -> Any:
    from stream_jobs.runtime.settings import load_settings

    return load_settings(**overrides)


def _fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[bold red]error:[/] {message}", highlight=False, markup=True)
    raise typer.Exit(code)


# -- stack ------------------------------------------------------------------------------
@app.command()
def up(
    home: Annotated[Path | None, typer.Option(help="state folder (env SCOPEWATCH_HOME)")] = None,
    workers: Annotated[
        int, typer.Option(min=1, max=32, help="decision workers to run here (one consumer group, co-partitioned)")
    ] = 1,
) -> None:
    """Start the local stack: Kafka broker (KRaft), ClickHouse sink (embedded chDB) and decision worker."""
    from scopewatch.stack.kafka import StackError
    from scopewatch.stack.stack import Stack

    settings = _settings(home=home)
    stack = Stack(settings, report=lambda m: err.print(f"[green]•[/] {m}", highlight=False))
    try:
        stack.up(workers=workers)
    except StackError as exc:
        _fail(str(exc))
    err.print(f"[bold green]stack is up[/] (home {settings.home}); try: scopewatch demo", highlight=False)


@app.command()
def down(home: Annotated[Path | None, typer.Option(help="state folder")] = None) -> None:
    """Stop every process `scopewatch up` started (by recorded process id)."""
    from scopewatch.stack.stack import Stack

    stopped = Stack(_settings(home=home), report=lambda m: err.print(f"[green]•[/] {m}", highlight=False)).down()
    err.print("stack is down" + ("" if stopped else " (nothing was running)"))


@app.command()
def status(
    home: Annotated[Path | None, typer.Option(help="state folder")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Show which parts of the stack are running. Exit code 3 when something is down."""
    from scopewatch.stack.stack import Stack

    info = Stack(_settings(home=home)).status()
    if as_json:
        print(json.dumps(info, indent=2, default=str))
    else:
        table = Table("service", "state", "pid", "detail")
        for svc in info["services"]:
            state = "[green]running[/]" if svc["running"] else "[red]stopped[/]"
            table.add_row(svc["name"], state, str(svc["pid"] or ""), svc["detail"])
        Console().print(table)
        if "topics" in info:
            Console().print("topics: " + ", ".join(t for t in info["topics"] if not t.startswith("__")))
        counts = info.get("clickhouse", {})
        if counts and "error" not in counts:
            Console().print("clickhouse rows: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
        if "sink" in info:
            Console().print("sink: " + ", ".join(f"{k}={v}" for k, v in info["sink"].items() if k != "at"))
    if not all(s["running"] for s in info["services"]):
        raise typer.Exit(3)


# -- services (started by `up`) ------------------------------------------------------------
@app.command(hidden=True)
def worker() -> None:
    """Run one decision worker in the foreground (engine: SCOPEWATCH_WORKER_ENGINE)."""
    from stream_jobs.worker import run_worker

    run_worker(_settings())


@app.command(hidden=True)
def sink() -> None:
    """Run the ClickHouse sink (and, for embedded chDB, the read-only SQL endpoint) in the foreground."""
    import os

    from scopewatch.spools import reader, spool_dirs
    from stream_jobs.service import run_sink_service

    settings = _settings()
    run_sink_service(settings, reader(spool_dirs(os.environ, settings.home)))


@app.command()
def fetch() -> None:
    """Download what the stack needs into the cache: Kafka broker jars (Maven Central) and npm MCP servers."""
    from scopewatch.stack.kafka import StackError, ensure_kafka_jars
    from scopewatch.stack.npm import server_everything_command, server_filesystem_command, server_memory_command

    s = _settings()
    try:
        libs = ensure_kafka_jars(s.cache_dir)
        server = server_everything_command(s.cache_dir)
        filesystem = server_filesystem_command(s.cache_dir)
        memory = server_memory_command(s.cache_dir)
    except StackError as exc:
        _fail(str(exc))
    err.print(
        f"Kafka jars: {libs}\nserver-everything: {server[1]}\nserver-filesystem: {filesystem[1]}"
        f"\nserver-memory: {memory[1]}",
        highlight=False,
    )


@app.command()
def migrate() -> None:
    """Apply pending ClickHouse migrations (idempotent). With embedded chDB, run it while the stack is down."""
    from stream_jobs.clickhouse import ClickHouseError, connect
    from stream_jobs.clickhouse import migrate as apply

    s = _settings()
    try:
        client = connect(s.dsn, user=s.clickhouse_user, password=s.clickhouse_password.get_secret_value())
        applied = apply(client, s.clickhouse_database)
    except ClickHouseError as exc:
        _fail(str(exc))
    err.print("applied: " + (", ".join(applied) if applied else "nothing (up to date)"))


# -- collectors --------------------------------------------------------------------------
@app.command(context_settings={"allow_interspersed_args": False})
def wrap(
    command: Annotated[list[str], typer.Argument(help="the MCP server command, after --")],
    session_id: Annotated[str | None, typer.Option(envvar="SCOPEWATCH_SESSION_ID", help="default: a new UUID")] = None,
    tenant: Annotated[str, typer.Option(envvar="SCOPEWATCH_TENANT")] = "default",
    principal: Annotated[str | None, typer.Option(envvar="SCOPEWATCH_PRINCIPAL", help="who the agent acts for")] = None,
    agent_id: Annotated[str | None, typer.Option(envvar="SCOPEWATCH_AGENT_ID", help="the agent's client id")] = None,
    server: Annotated[str | None, typer.Option(envvar="SCOPEWATCH_SERVER", help="server label in events")] = None,
    collector_id: Annotated[str | None, typer.Option(envvar="SCOPEWATCH_COLLECTOR_ID")] = None,
    flush_timeout: Annotated[float, typer.Option(help="seconds to flush events at exit")] = 15.0,
) -> None:
    """Run an MCP stdio server, relay its traffic byte-exactly and publish every tool call and result."""
    import socket

    from collectors.chain import ChainStamper
    from collectors.config import CollectorConfig, ConfigError
    from collectors.observer import McpSessionObserver, SessionIdentity
    from collectors.publisher import PublisherError
    from collectors.spool import SpoolConfigError
    from collectors.stdio import KafkaSink, StdioWrapper, exit_like

    logging.basicConfig(stream=sys.stderr, level=logging.WARNING)  # stdout carries the MCP session
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # delivery problems are summed up at exit
    for option, value in (("--principal", principal), ("--agent-id", agent_id), ("--session-id", session_id)):
        if value is not None and not value.strip():
            _fail(f"{option} must not be empty or whitespace", code=2)
    sid = session_id or str(uuid.uuid4())
    if principal is None or agent_id is None:
        err.print("scopewatch wrap: no --principal/--agent-id: the session is recorded as unbound", highlight=False)
    identity = SessionIdentity(
        session_id=sid,
        tenant=tenant,
        principal=principal,
        agent_id=agent_id,
        auth={"method": "launcher", "issuer": "scopewatch-wrap", "host": socket.gethostname()},
    )
    cid = collector_id or f"stdio:{socket.gethostname()}:{sid}"
    stamper = ChainStamper(cid, epoch=time.time_ns() // 1_000_000)
    observer = McpSessionObserver(identity, transport="stdio", server_label=server)
    try:
        collector = CollectorConfig.from_env()
    except ConfigError as exc:
        _fail(str(exc), code=2)
    try:
        # the publisher runs in the wrapper's observer process (see collectors.stdio)
        sink = KafkaSink(
            collector.kafka_bootstrap, collector.topics, stamper, flush_timeout=flush_timeout, spool=collector.spool()
        )
        code = StdioWrapper(list(command), observer, sink).run()
    except (PublisherError, SpoolConfigError) as exc:
        _fail(f"spool settings: {exc}" if isinstance(exc, SpoolConfigError) else str(exc), code=2)
    except ConfigError as exc:
        _fail(str(exc), code=127)
    exit_like(code)


# -- analysts -------------------------------------------------------------------------------
@app.command()
def sql(
    query: Annotated[str, typer.Argument(help="SQL to run (read-only)")],
    fmt: Annotated[str, typer.Option("--format", help="table | json")] = "table",
) -> None:
    """Run SQL against the configured ClickHouse (works while the stack runs, also on embedded chDB)."""
    from scopewatch.sqlclient import SqlError, run_sql

    settings = _settings()
    try:
        result = run_sql(settings, query)
    except SqlError as exc:
        _fail(str(exc))
    print_result(result, fmt)


@app.command()
def verify(
    since: Annotated[str | None, typer.Option(help="only events at or after this RFC 3339 instant")] = None,
    tenant: Annotated[str | None, typer.Option(help="only this tenant")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="machine-readable report")] = False,
) -> None:
    """Check the stored evidence: collector chains (gaps, edits, breaks) and verdicts re-derived from raw events.

    Exit code 1 when anything is wrong; the report names the first bad record of each collector.
    """
    from schemas import parse_timestamp
    from scopewatch.sqlclient import SqlError, run_sql
    from stream_jobs.verify import verify as run_verify

    settings = _settings()
    try:
        start = None if since is None else parse_timestamp(since)
    except ValueError as exc:
        _fail(f"--since: {exc}", code=2)
    try:
        report = run_verify(
            lambda q: run_sql(settings, q), settings.clickhouse_database, start, tenant, settings.topics
        )
    except SqlError as exc:
        _fail(str(exc))
    if as_json:
        print(json.dumps(report.to_json(), ensure_ascii=False, indent=1))
    else:
        console = Console()
        table = Table("collector", "events", "epochs", "gaps", "edited", "chain breaks", "first bad record")
        for c in report.collectors:
            bad = c.first_bad
            table.add_row(
                c.collector_id,
                str(c.events),
                str(c.epochs),
                str(c.count("gap")),
                str(c.count("edited")),
                str(c.count("chain_break")),
                "" if bad is None else f"[red]{bad.kind}[/]: {bad.where()}: {bad.detail}",
            )
        console.print(table)
        console.print(
            f"events without a collector stamp: {report.unstamped}; calls re-judged: {report.calls_checked}, "
            f"verdicts matching: {report.verdicts_match}, still provisional: {report.pending}; "
            f"fact references checked: {report.facts_checked} ({report.fact_hashes_unknown} without a hash)"
        )
        for p in [*report.row_problems, *report.verdict_problems, *report.fact_problems][:50]:
            console.print(f"[red]{p.kind}[/]: {p.where()}: {p.detail}", highlight=False)
        console.print(
            "[bold green]verified: no problems[/]" if report.ok else f"[bold red]{len(report.problems)} problems[/]"
        )
    if not report.ok:
        raise typer.Exit(1)


def print_result(result: dict[str, Any], fmt: str) -> None:
    if fmt == "json":
        rows = [dict(zip(result["columns"], row, strict=True)) for row in result["rows"]]
        print(json.dumps(rows, ensure_ascii=False))
        return
    if fmt != "table":
        _fail(f"unknown format {fmt!r}: use table or json")
    table = Table(*result["columns"])
    for row in result["rows"]:
        table.add_row(*("" if v is None else str(v) for v in row))
    Console().print(table)


@app.command()
def replay(
    events: Annotated[str, typer.Argument(help="canonical JSONL events, or - for stdin")],
) -> None:
    """Judge every tool_call of a JSONL file with all facts known; one JSON line per call, in input order."""
    from scopewatch.jsonl import open_source, read_events
    from scopewatch.replay import replay as run_replay

    try:
        stream = open_source(events)
    except OSError as exc:
        _fail(f"cannot read {events}: {exc.strerror or exc}")
    with stream:
        result = run_replay(read_events(stream))
    for line in result.lines:
        print(line)
    for bad in result.bad:
        sys.stderr.write(f"scopewatch replay: {bad}\n")
    if result.bad:
        raise typer.Exit(2)


@app.command()
def publish(
    events: Annotated[str, typer.Argument(help="canonical JSONL events, or - for stdin")],
    from_line: Annotated[
        int, typer.Option("--from-line", min=1, help="skip the lines before this one (resume an interrupted publish)")
    ] = 1,
) -> None:
    """Publish canonical JSONL events to their Kafka topics with their keys, in file order.

    Rides out a Kafka outage up to SCOPEWATCH_KAFKA_WAIT_SECONDS; after a longer one it exits 75 and
    prints the command that resumes at the first line Kafka did not acknowledge. Bad lines: exit 2.
    """
    import asyncio

    from scopewatch.jsonl import open_source, read_events
    from scopewatch.publish import EXIT_INTERRUPTED, PublishInterrupted, publish_events, resume_command
    from stream_jobs.runtime.lifecycle import limit_repeats

    settings = _settings()
    _publish_logging()
    limit_repeats()
    try:
        stream = open_source(events)
    except OSError as exc:
        _fail(f"cannot read {events}: {exc.strerror or exc}")
    try:
        with stream:
            sent, bad = asyncio.run(
                publish_events(
                    settings.kafka_bootstrap,
                    settings.topics,
                    read_events(stream, from_line),
                    wait_seconds=settings.kafka_wait_seconds,
                    start_line=from_line,
                )
            )
    except PublishInterrupted as stop:
        for item in stop.bad:
            sys.stderr.write(f"scopewatch publish: {item}\n")
        tracker = stop.tracker
        if tracker.acknowledged == 0 and tracker.resume_line == from_line:
            sys.stderr.write(f"scopewatch publish: {stop.reason}; nothing was published\n")
        else:
            sys.stderr.write(f"scopewatch publish: stopped: {stop.reason}; {tracker.position()}\n")
            same = " (with the same input on stdin)" if events == "-" else ""
            sys.stderr.write(f"scopewatch publish: resume{same} with: {resume_command(events, tracker.resume_line)}\n")
        raise typer.Exit(EXIT_INTERRUPTED) from None
    for item in bad:
        sys.stderr.write(f"scopewatch publish: {item}\n")
    summary = ", ".join(f"{n} to {t}" for t, n in sorted(sent.items())) or "nothing"
    sys.stderr.write(f"published {summary}\n")
    if bad:
        raise typer.Exit(2)


def _publish_logging() -> None:
    """stderr lines prefixed ``scopewatch publish:``; a library's record is one line, never a traceback."""

    class OneLine(logging.Formatter):
        def format(self, record: logging.LogRecord) -> str:
            text = record.getMessage()
            if record.name.startswith("scopewatch"):
                return text if text.startswith("scopewatch publish:") else f"scopewatch publish: {text}"
            if record.exc_info and record.exc_info[1] is not None:
                exc = record.exc_info[1]
                text = f"{text} ({type(exc).__name__}: {exc})"
            return f"scopewatch publish: {record.name}: {text}"

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(OneLine())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.WARNING)
    logging.getLogger("scopewatch").setLevel(logging.INFO)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)  # connection errors; our own lines say what happens


@app.command()
def demo(
    calls: Annotated[int, typer.Option(help="roughly how many tool calls to make")] = 36,
    timeout: Annotated[float, typer.Option(help="seconds to wait for rows in ClickHouse")] = 90.0,
) -> None:
    """Drive a real MCP client through `scopewatch wrap` against server-everything; show what landed."""
    from scopewatch.demo import DemoError, run_demo

    try:
        run_demo(_settings(), calls=calls, timeout=timeout, console=Console())
    except DemoError as exc:
        _fail(str(exc))


def _mount_subcommands() -> None:
    from scopewatch.dashboards_cli import dashboards_app
    from scopewatch.forensics_cli import forensics_app
    from scopewatch.intake_cli import emit_app, intake_app
    from scopewatch.pager_cli import pager_app
    from scopewatch.policy_cli import policy_app
    from scopewatch.proxy_cli import proxy_app
    from scopewatch.redact_cli import redact_test
    from scopewatch.rules_cli import rules_app

    app.add_typer(rules_app, name="rules", help="the detection rule catalog: list the rules, run their cases")
    app.add_typer(forensics_app, name="forensics", help="named forensic SQL queries: list them, run one")
    app.add_typer(dashboards_app, name="dashboards", help="Grafana dashboards and alert rules as code")
    app.add_typer(proxy_app, name="proxy", help="HTTP collector: reverse proxy for MCP Streamable HTTP")
    app.add_typer(intake_app, name="intake", help="signed identity/consent webhooks onto Kafka")
    app.add_typer(emit_app, name="emit", help="publish one identity or consent event from options")
    app.add_typer(pager_app, name="pager", help="page on-call from findings: PagerDuty, Slack, signed webhooks")
    app.add_typer(policy_app, name="policy", help="Cedar policies as code: check a folder, publish it")
    app.command("redact-test")(redact_test)


_mount_subcommands()


def main() -> None:
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    app()


if __name__ == "__main__":
    main()
