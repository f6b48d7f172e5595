"""What a page looks like on the wire: PagerDuty Events API v2, Slack incoming webhooks, Standard Webhooks.

Pure functions: the body of a page to a route is built once (``render_body``) and sent unchanged on
every retry; the request around it (``build_request``) is rebuilt per attempt, because a Standard
Webhooks signature covers the attempt's timestamp. Identity that survives retries and restarts:

* PagerDuty: ``dedup_key`` is the finding's dedup key, so PagerDuty folds a re-sent trigger into the
  open alert;
* webhook: ``webhook-id`` is derived from the page key and the route name (``msg_`` + 32 hex);
* every body carries the page key.

Severity on PagerDuty (which knows critical, error, warning and info): critical -> critical,
high -> error, medium -> warning, low -> info, info -> info. ``low`` goes to ``info`` rather than
``warning`` so a PagerDuty service's urgency rules can keep low findings from waking anyone.
"""

from __future__ import annotations

import hashlib
import json
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from schemas import Finding, format_timestamp
from stream_jobs.pager_config import Route, Severity, webhook_key

__all__ = [
    "MAX_CALL_IDS",
    "PAGERDUTY_SEVERITY",
    "ForensicParams",
    "HttpRequest",
    "PageContent",
    "build_request",
    "evidence_summary",
    "forensic_command",
    "render_body",
    "sign",
    "webhook_id",
]

PAGERDUTY_SEVERITY: Final[dict[Severity, str]] = {
    "info": "info",
    "low": "info",
    "medium": "warning",
    "high": "error",
    "critical": "critical",
}
MAX_CALL_IDS: Final = 50
USER_AGENT: Final = "scopewatch-pager/1"
WEBHOOK_EVENT_TYPE: Final = "scopewatch.page"

ForensicParams = Mapping[str, Sequence[tuple[str, bool]]]
"""Forensic query name -> its parameters (name, required), as ``scopewatch forensics`` declares them."""

_FALLBACK_PARAMS: Final[dict[str, tuple[tuple[str, bool], ...]]] = {
    "call_evidence": (("tenant", True), ("call_ids", True)),
    "session_timeline": (("tenant", True), ("session_id", True)),
    "delegation_timeline": (
        ("tenant", True),
        ("principal", True),
        ("agent_id", True),
        ("grant_id", False),
        ("since", False),
        ("until", False),
    ),
    "grant_history": (("tenant", True), ("grant_id", True), ("principal", False), ("agent_id", False)),
    "tool_digests": (
        ("tenant", True),
        ("principal", True),
        ("agent_id", True),
        ("server", False),
        ("tool", False),
    ),
    "approval_history": (
        ("tenant", True),
        ("principal", False),
        ("agent_id", False),
        ("tool", False),
        ("until", False),
    ),
    "policy_decisions": (("tenant", True), ("principal", False), ("agent_id", False), ("until", False)),
}
_QUALIFIED_TOOL: Final = frozenset({"approval_history"})
"""Queries whose ``tool`` parameter is ``server/tool`` (the approval's), not the bare tool name."""


@dataclass(frozen=True)
class HttpRequest:
    method: str
    url: str
    headers: dict[str, str]
    body: bytes

    def __repr__(self) -> str:  # the URL and some bodies carry secrets
        return f"HttpRequest({self.method}, <url>, {len(self.body)} bytes)"


@dataclass(frozen=True)
class PageContent:
    """What a page says: the finding that opened it and the facts of the page."""

    finding: Finding
    page_key: str
    findings_grouped: int
    opened_at: float
    source: str = "scopewatch"
    forensic_params: ForensicParams = field(default_factory=lambda: _FALLBACK_PARAMS)


def forensic_command(finding: Finding, params: ForensicParams | None = None) -> str:
    """The ``scopewatch forensics`` command line that shows the evidence behind ``finding``.

    Required parameters always appear (``<name>`` when the finding lacks a value); optional ones
    when the finding has a value: principal, agent, grant, server/tool (from ``details``) and
    ``until`` (the triggering call), never ``since`` -- what led up to the finding matters.
    """
    declared = (params or _FALLBACK_PARAMS).get(finding.forensic_query)
    if declared is None:
        declared = _FALLBACK_PARAMS.get(finding.forensic_query, (("tenant", True),))
    details = finding.details
    values: dict[str, str | list[str] | None] = {
        "tenant": finding.tenant,
        "principal": finding.principal,
        "agent_id": finding.agent_id,
        "session_id": finding.session_id,
        "grant_id": finding.grant_id,
        "call_ids": list(finding.call_ids) or [finding.call_id],
        "since": None,  # the history leading up to the finding matters: from the first
        "until": format_timestamp(finding.last_call_time),
        "server": details.get("server") if isinstance(details.get("server"), str) else None,
        "tool": details.get("tool") if isinstance(details.get("tool"), str) else None,
    }
    if finding.forensic_query in _QUALIFIED_TOOL:
        server, tool = values["server"], values["tool"]
        values["tool"] = f"{server}/{tool}" if server and tool else None
    argv = ["scopewatch", "forensics", finding.forensic_query]
    for name, required in declared:
        value = values.get(name)
        if value is None:
            if required:
                argv += ["--param", f"{name}=<{name}>"]
            continue
        for item in value if isinstance(value, list) else [value]:
            argv += ["--param", f"{name}={item}"]
    return shlex.join(argv)


def evidence_summary(content: PageContent) -> dict[str, Any]:
    """The evidence behind a page, for PagerDuty custom_details and the webhook's data."""
    f = content.finding
    call_ids = list(f.call_ids)
    return {
        "rule_id": f.rule_id,
        "rule_version": f.rule_version,
        "title": f.title,
        "severity": f.severity,
        "summary": f.summary,
        "tenant": f.tenant,
        "principal": f.principal,
        "agent_id": f.agent_id,
        "session_id": f.session_id,
        "grant_id": f.grant_id,
        "call_id": f.call_id,
        "call_ids": call_ids[-MAX_CALL_IDS:],
        "call_ids_total": len(call_ids),
        "first_call_time": format_timestamp(f.first_call_time),
        "last_call_time": format_timestamp(f.last_call_time),
        "detected_at": format_timestamp(f.detected_at),
        "finding_id": f.finding_id,
        "dedup_key": f.dedup_key,
        "page_key": content.page_key,
        "findings_grouped": content.findings_grouped,
        "forensic_query": f.forensic_query,
        "forensic_command": forensic_command(f, content.forensic_params),
        "details": dict(f.details),
    }


def _json(value: Any) -> bytes:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


def _iso(epoch: float) -> str:
    return format_timestamp(datetime.fromtimestamp(epoch, UTC))


def _pagerduty(content: PageContent, routing_key: str) -> dict[str, Any]:
    f = content.finding
    summary = f"[{f.tenant}] {f.title}: {f.summary}"
    return {
        "routing_key": routing_key,
        "event_action": "trigger",
        "dedup_key": f.dedup_key,
        "client": "scopewatch",
        "payload": {
            "summary": summary if len(summary) <= 1024 else summary[:1023] + "…",
            "source": f"{content.source}/{f.tenant}",
            "severity": PAGERDUTY_SEVERITY[f.severity],
            "timestamp": format_timestamp(f.last_call_time),
            "component": f.agent_id or "unattributed",
            "group": f.tenant,
            "class": f.rule_id,
            "custom_details": evidence_summary(content),
        },
    }


def _mrkdwn(text: str, limit: int) -> str:
    text = text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _slack(content: PageContent) -> dict[str, Any]:
    f = content.finding
    calls = list(f.call_ids)
    fields = [
        ("Severity", f.severity),
        ("Tenant", f.tenant),
        ("Rule", f"{f.rule_id} v{f.rule_version}"),
        ("Principal", f.principal or "—"),
        ("Agent", f.agent_id or "—"),
        ("Grant", f.grant_id or "—"),
        ("Session", f.session_id),
        ("Calls", ", ".join(calls[-5:]) + (f" (+{len(calls) - 5} more)" if len(calls) > 5 else "")),
    ]
    if content.findings_grouped > 1:
        fields.append(("Findings grouped", str(content.findings_grouped)))
    command = forensic_command(f, content.forensic_params)
    return {
        "text": _mrkdwn(f"[{f.severity.upper()}] {f.title} ({f.tenant}): {f.summary}", 3000),
        "blocks": [
            {"type": "header", "text": {"type": "plain_text", "text": f"[{f.severity.upper()}] {f.title}"[:150]}},
            {"type": "section", "text": {"type": "mrkdwn", "text": _mrkdwn(f.summary, 3000)}},
            {
                "type": "section",
                "fields": [{"type": "mrkdwn", "text": f"*{k}*\n{_mrkdwn(v, 1900)}"} for k, v in fields[:10]],
            },
            {
                "type": "section",
                "text": {"type": "mrkdwn", "text": "*Evidence*\n```" + _mrkdwn(command, 2900) + "```"},
            },
            {
                "type": "context",
                "elements": [
                    {"type": "mrkdwn", "text": _mrkdwn(f"dedup key {f.dedup_key} · finding {f.finding_id}", 2900)}
                ],
            },
        ],
    }


def _webhook(content: PageContent) -> dict[str, Any]:
    return {"type": WEBHOOK_EVENT_TYPE, "timestamp": _iso(content.opened_at), "data": evidence_summary(content)}


def render_body(content: PageContent, route: Route) -> bytes:
    """The JSON body of ``content`` for ``route`` (the same bytes on every attempt)."""
    if route.channel == "pagerduty":
        assert route.secret is not None
        return _json(_pagerduty(content, route.secret.get_secret_value()))
    if route.channel == "slack":
        return _json(_slack(content))
    return _json(_webhook(content))


def webhook_id(page_key: str, route_name: str) -> str:
    """Standard Webhooks message id of a page to a route: stable across retries and restarts, no dots."""
    return "msg_" + hashlib.sha256(f"{page_key}\x1f{route_name}".encode()).hexdigest()[:32]


def sign(secret: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """``webhook-signature`` value: ``v1,`` + base64 HMAC-SHA256 over ``{msg_id}.{timestamp}.{body}``."""
    from schemas.webhooks import sign as sign_with_key

    return sign_with_key(webhook_key(secret), msg_id, timestamp, body)


def build_request(route: Route, body: bytes, page_key: str, now: float) -> HttpRequest:
    """The HTTP request of one attempt (webhooks: signed with the attempt's timestamp)."""
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
    if route.channel == "webhook":
        assert route.secret is not None
        msg_id, ts = webhook_id(page_key, route.name), int(now)
        headers.update(
            {
                "webhook-id": msg_id,
                "webhook-timestamp": str(ts),
                "webhook-signature": sign(route.secret.get_secret_value(), msg_id, ts, body),
            }
        )
    return HttpRequest("POST", route.url.get_secret_value(), headers, body)
