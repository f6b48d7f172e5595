"""``scopewatch intake`` (signed identity and consent webhooks onto Kafka) and ``scopewatch emit``.

    SCOPEWATCH_INTAKE_SECRETS=whsec_... scopewatch intake --listen 127.0.0.1:8788
    scopewatch emit bind --session-id S --principal alice@example.com --agent-id support-copilot
    scopewatch emit grant --principal alice@example.com --agent-id support-copilot \\
        --tool 'fs/read_*' --resource 'file:/data/*' --expires-at +8h
    scopewatch emit revoke --grant-id G --principal alice@example.com --agent-id support-copilot --reason left
    scopewatch emit end --session-id S
    scopewatch emit approve --principal alice@example.com --agent-id support-copilot --tool fs/write_file \\
        --approver bob@example.com --arguments '{"path": "/data/a.txt"}' --expires-at +15m
    scopewatch emit deny --principal alice@example.com --agent-id support-copilot --tool fs/write_file --approver bob

``intake`` serves :mod:`collectors.intake` (Standard Webhooks signatures, replay protection,
per-event validation, acknowledged only once Kafka acknowledged). Its secrets come from
``SCOPEWATCH_INTAKE_SECRETS`` (``whsec_...`` values separated by spaces or commas) and/or
``--secret-file`` (one per line; the file must not be readable by group or others) -- never
from the command line, where other users could read them. Several secrets allow rotation.
It prints ``scopewatch intake: listening on URL`` to stderr once it accepts deliveries and stops
on SIGINT/SIGTERM.

``emit`` builds one canonical event from its options, prints it (canonical JSON, one line) and
publishes it to its topic with its key (``acks=all``); ``--dry-run`` only prints it. Times are
RFC 3339, ``now``, or relative to now: ``+8h``, ``-5m``, ``+30s``, ``+2d``.

Kafka comes from the usual settings (``SCOPEWATCH_BOOTSTRAP``, ``SCOPEWATCH_TOPIC_PREFIX`` ...).
The main CLI mounts these with ``app.add_typer(intake_app, name="intake")`` and
``app.add_typer(emit_app, name="emit")``; ``python -m scopewatch.intake_cli`` runs them standalone.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any

import typer

from scopewatch.emitting import emit_event

intake_app = typer.Typer(
    add_completion=False,
    help="Accept signed identity and consent events (Standard Webhooks) and publish them to Kafka.",
)
emit_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Publish one identity or consent event built from options (for operators and scripts).",
)

SECRETS_ENV = "SCOPEWATCH_INTAKE_SECRETS"


def _fail(command: str, message: str, code: int = 2) -> None:
    sys.stderr.write(f"scopewatch {command}: error: {message}\n")
    raise typer.Exit(code)


# -- intake ------------------------------------------------------------------------------------
def load_secrets(settings: Mapping[str, str] | Any, files: list[Path]) -> list[bytes]:
    """HMAC keys from ``SCOPEWATCH_INTAKE_SECRETS`` (the collector settings, or an environment
    mapping to read them from) and secret files; ValueError names no secret."""
    from collectors.config import CollectorConfig
    from schemas.webhooks import parse_secret

    config = CollectorConfig.of(settings)
    raw = config.intake_secrets.get_secret_value() if config.intake_secrets is not None else ""
    texts = [(SECRETS_ENV, t) for t in re.split(r"[\s,]+", raw) if t]
    for path in files:
        try:
            mode = path.stat().st_mode
            lines = path.read_text(encoding="utf-8").splitlines()
        except OSError as exc:
            raise ValueError(f"cannot read the secret file {path}: {exc.strerror or exc}") from None
        if mode & 0o077:
            raise ValueError(f"the secret file {path} is accessible to group or others: chmod 600 it")
        texts += [(str(path), line.strip()) for line in lines if line.strip() and not line.startswith("#")]
    keys: list[bytes] = []
    for origin, text in texts:
        try:
            keys.append(parse_secret(text))
        except ValueError as exc:
            raise ValueError(f"{origin}: {exc}") from None
    return keys


@intake_app.callback(invoke_without_command=True)
def intake(
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on (serve remote senders behind TLS)")] = (
        "127.0.0.1:8788"
    ),
    secret_file: Annotated[
        list[Path] | None,
        typer.Option("--secret-file", help=f"file with whsec_ secrets, one per line; repeatable (or ${SECRETS_ENV})"),
    ] = None,
    path: Annotated[str, typer.Option(help="the endpoint's path")] = "/v1/events",
    max_body_bytes: Annotated[int, typer.Option(help="larger bodies are refused with 413")] = 1 << 20,
    max_batch: Annotated[int, typer.Option(help="most events in one delivery")] = 1000,
    tolerance: Annotated[float, typer.Option(help="seconds webhook-timestamp may be off the intake's clock")] = 300.0,
    replay_cache: Annotated[int, typer.Option(help="most webhook-ids remembered at once")] = 100_000,
    replay_file: Annotated[
        Path | None,
        typer.Option(help="where accepted webhook-ids are kept (default: the collectors' state home, intake/)"),
    ] = None,
    event_id_window: Annotated[
        int, typer.Option(help="most accepted event_ids remembered to refuse a re-sent event (409)")
    ] = 200_000,
    event_id_seconds: Annotated[float, typer.Option(help="seconds an accepted event_id is remembered")] = 86_400.0,
    publish_timeout: Annotated[float, typer.Option(help="seconds to wait for Kafka's acknowledgement")] = 10.0,
    collector_id: Annotated[str | None, typer.Option(envvar="SCOPEWATCH_COLLECTOR_ID")] = None,
    log_level: Annotated[str, typer.Option(help="debug | info | warning | error")] = "info",
) -> None:
    """Run the intake until SIGINT/SIGTERM."""
    from collectors.config import CollectorConfig, ConfigError, parse_listen
    from collectors.intake import IntakeConfig

    logging.basicConfig(stream=sys.stderr, level=log_level.upper(), format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # failures are answered 503 and logged once
    try:
        host, port = parse_listen(listen)
        collector = CollectorConfig.from_env()
        keys = load_secrets(collector, list(secret_file or []))
    except (ValueError, ConfigError) as exc:
        _fail("intake", str(exc))
    if not keys:
        _fail("intake", f"no webhook secret: set {SECRETS_ENV} or pass --secret-file")
    config = IntakeConfig(
        keys=keys,
        topics=collector.topics,
        path=path if path.startswith("/") else "/" + path,
        max_body_bytes=max_body_bytes,
        max_batch=max_batch,
        tolerance=tolerance,
        replay_cache_size=replay_cache,
        replay_file=replay_file or collector.state_home / "intake" / "webhook-ids",
        event_id_window_size=event_id_window,
        event_id_window_seconds=event_id_seconds,
    )
    if collector_id:
        config.collector_id = collector_id
    asyncio.run(_serve(config, collector.kafka_bootstrap, host, port, publish_timeout))


async def _serve(config: Any, bootstrap: str, host: str, port: int, publish_timeout: float) -> None:
    from aiohttp import web

    from collectors.intake import KafkaSink, make_app, make_runner

    sink = KafkaSink(bootstrap, timeout=publish_timeout)
    app = make_app(config, sink)
    runner = make_runner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        _fail("intake", f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    shown = f"[{host}]" if ":" in host else host
    sys.stderr.write(f"scopewatch intake: listening on http://{shown}:{port}{config.path}\n")
    sys.stderr.flush()
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
        await sink.close()


# -- emit --------------------------------------------------------------------------------------
Tenant = Annotated[str, typer.Option(envvar="SCOPEWATCH_TENANT", help="tenant of the event")]
EventTime = Annotated[str, typer.Option(help="when it happened: RFC 3339, now, +5m, -1h")]
EventId = Annotated[str | None, typer.Option(help="default: a new UUID")]
DryRun = Annotated[bool, typer.Option("--dry-run", help="print the event, publish nothing")]
Principal = Annotated[str, typer.Option(help="the human or service the agent acts for")]
AgentId = Annotated[str, typer.Option(help="the agent's client or workload id")]


@emit_app.command("bind")
def emit_bind(
    session_id: Annotated[str, typer.Option(help="the MCP session being bound")],
    principal: Principal,
    agent_id: AgentId,
    tenant: Tenant = "default",
    valid_from: Annotated[str | None, typer.Option(help="default: the event time")] = None,
    valid_until: Annotated[str | None, typer.Option(help="default: no expiry")] = None,
    auth_issuer: Annotated[str | None, typer.Option(help="who authenticated the principal")] = None,
    auth_method: Annotated[str, typer.Option(help="how, e.g. oidc, mtls, operator")] = "operator",
    auth_token_id: Annotated[
        str | None,
        typer.Option(help="id (jti) of the token used, never the token (JWTs and secrets are refused)"),
    ] = None,
    event_time: EventTime = "now",
    event_id: EventId = None,
    dry_run: DryRun = False,
) -> None:
    """session_bound: the session acts for PRINCIPAL through AGENT_ID."""
    auth = {"method": auth_method, "issuer": auth_issuer, "token_id": auth_token_id}
    fields = {
        "event_type": "session_bound",
        "event_id": event_id,
        "tenant": tenant,
        "session_id": session_id,
        "principal": principal,
        "agent_id": agent_id,
        "auth": {k: v for k, v in auth.items() if v is not None},
    }
    times = {"event_time": event_time, "valid_from": valid_from or event_time, "valid_until": valid_until}
    emit_event(fields, times, dry_run)


@emit_app.command("end")
def emit_end(
    session_id: Annotated[str, typer.Option(help="the session that ends")],
    tenant: Tenant = "default",
    event_time: EventTime = "now",
    event_id: EventId = None,
    dry_run: DryRun = False,
) -> None:
    """session_ended: the session is not valid from the event time on."""
    fields = {"event_type": "session_ended", "event_id": event_id, "tenant": tenant, "session_id": session_id}
    emit_event(fields, {"event_time": event_time}, dry_run)


@emit_app.command("grant")
def emit_grant(
    principal: Principal,
    agent_id: AgentId,
    tool: Annotated[list[str], typer.Option(help="glob over server/tool, e.g. 'fs/read_*'; repeatable")],
    resource: Annotated[list[str] | None, typer.Option(help="glob over resources; repeatable; none: any")] = None,
    scope: Annotated[list[str] | None, typer.Option(help="OAuth scope (evidence only); repeatable")] = None,
    grant_id: Annotated[str | None, typer.Option(help="default: a new UUID")] = None,
    tenant: Tenant = "default",
    not_before: Annotated[str | None, typer.Option(help="default: the event time")] = None,
    expires_at: Annotated[str | None, typer.Option(help="default: no expiry; e.g. +8h")] = None,
    granted_by: Annotated[str | None, typer.Option(help="default: the principal")] = None,
    purpose: Annotated[str, typer.Option(help="why the consent was given")] = "",
    parent_grant_id: Annotated[str | None, typer.Option(help="the grant this one narrows")] = None,
    policy: Annotated[
        list[str] | None, typer.Option(help="policy_id whose Cedar policies must permit each call; repeatable")
    ] = None,
    approval_tool: Annotated[
        list[str] | None, typer.Option(help="glob over server/tool whose calls need a human approval; repeatable")
    ] = None,
    event_time: EventTime = "now",
    event_id: EventId = None,
    dry_run: DryRun = False,
) -> None:
    """grant_issued: PRINCIPAL lets AGENT_ID call the tools (and resources) given."""
    fields = {
        "event_type": "grant_issued",
        "event_id": event_id,
        "tenant": tenant,
        "grant_id": grant_id or str(uuid.uuid4()),
        "principal": principal,
        "agent_id": agent_id,
        "tools": list(tool),
        "resources": list(resource or []),
        "scopes": list(scope or []),
        "granted_by": granted_by or principal,
        "purpose": purpose,
        "parent_grant_id": parent_grant_id,
        "policies": list(policy or []),
        "approval_tools": list(approval_tool or []),
    }
    times = {"event_time": event_time, "not_before": not_before or event_time, "expires_at": expires_at}
    emit_event(fields, times, dry_run)


@emit_app.command("revoke")
def emit_revoke(
    grant_id: Annotated[str, typer.Option(help="the grant revoked")],
    principal: Principal,
    agent_id: AgentId,
    tenant: Tenant = "default",
    revoked_by: Annotated[str | None, typer.Option(help="default: the principal")] = None,
    reason: Annotated[str, typer.Option(help="why")] = "",
    event_time: EventTime = "now",
    event_id: EventId = None,
    dry_run: DryRun = False,
) -> None:
    """grant_revoked: the grant stops authorising calls from the event time on."""
    fields = {
        "event_type": "grant_revoked",
        "event_id": event_id,
        "tenant": tenant,
        "grant_id": grant_id,
        "principal": principal,
        "agent_id": agent_id,
        "revoked_by": revoked_by or principal,
        "reason": reason,
    }
    emit_event(fields, {"event_time": event_time}, dry_run)


ApprovalTool = Annotated[str, typer.Option("--tool", help="the exact server/tool decided on, e.g. fs/write_file")]
Arguments = Annotated[
    str | None,
    typer.Option(help="bind the decision to these call arguments (a JSON object; its RFC 8785 SHA-256 is kept)"),
]
ArgumentsDigest = Annotated[
    str | None, typer.Option(help="bind the decision to this arguments digest (64 hex digits) instead")
]
Approver = Annotated[str, typer.Option(help="who decided")]


def _approval(
    decision: str,
    approval_id: str | None,
    principal: str,
    agent_id: str,
    tool: str,
    arguments: str | None,
    arguments_digest: str | None,
    approver: str,
    tenant: str,
    expires_at: str | None,
    reason: str,
    event_time: str,
    event_id: str | None,
    dry_run: bool,
) -> None:
    import json

    from schemas import arguments_digest as digest_of

    if arguments is not None and arguments_digest is not None:
        _fail("emit", "give --arguments or --arguments-digest, not both")
    if "/" not in tool:
        _fail("emit", f"--tool must be server/tool, got {tool!r}")
    digest = arguments_digest
    if arguments is not None:
        try:
            value = json.loads(arguments)
        except ValueError as exc:
            _fail("emit", f"--arguments is not JSON: {exc}")
        if not isinstance(value, dict):
            _fail("emit", "--arguments must be a JSON object (the call's arguments)")
        digest = digest_of(value)
    elif digest is not None and not re.fullmatch(r"[0-9a-f]{64}", digest):
        _fail("emit", "--arguments-digest must be 64 lowercase hex digits (SHA-256)")
    fields = {
        "event_type": "approval_decided",
        "event_id": event_id,
        "tenant": tenant,
        "approval_id": approval_id or str(uuid.uuid4()),
        "principal": principal,
        "agent_id": agent_id,
        "tool": tool,
        "arguments_digest": digest,
        "decision": decision,
        "approver": approver,
        "reason": reason,
    }
    emit_event(fields, {"event_time": event_time, "expires_at": expires_at}, dry_run)


def _approval_command(decision: str, doc: str) -> None:
    """Register ``emit approve`` / ``emit deny``: the same options, one decision each."""

    def command(
        principal: Principal,
        agent_id: AgentId,
        tool: ApprovalTool,
        approver: Approver,
        arguments: Arguments = None,
        arguments_digest: ArgumentsDigest = None,
        approval_id: Annotated[str | None, typer.Option(help="default: a new UUID")] = None,
        tenant: Tenant = "default",
        expires_at: Annotated[str | None, typer.Option(help="default: no expiry; e.g. +15m")] = None,
        reason: Annotated[str, typer.Option(help="why")] = "",
        event_time: EventTime = "now",
        event_id: EventId = None,
        dry_run: DryRun = False,
    ) -> None:
        _approval(
            decision,
            approval_id,
            principal,
            agent_id,
            tool,
            arguments,
            arguments_digest,
            approver,
            tenant,
            expires_at,
            reason,
            event_time,
            event_id,
            dry_run,
        )

    command.__doc__ = doc
    command.__name__ = f"emit_{decision}"
    emit_app.command(decision)(command)


_approval_command(
    "approve",
    "approval_decided (approve): one call of TOOL by AGENT_ID for PRINCIPAL may run (each approval authorises one).",
)
_approval_command(
    "deny",
    "approval_decided (deny): calls of TOOL by AGENT_ID for PRINCIPAL are denied (until a later approval).",
)


def _standalone() -> typer.Typer:
    app = typer.Typer(add_completion=False, no_args_is_help=True)
    app.add_typer(intake_app, name="intake")
    app.add_typer(emit_app, name="emit")
    return app


if __name__ == "__main__":
    _standalone()()
