"""Mapping of decoded events to ClickHouse rows (one table per kind of record)."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from schemas import (
    BaseEvent,
    DeadLetter,
    Evidence,
    Finding,
    GrantIssued,
    GrantRevoked,
    PageAttempt,
    SessionBound,
    SessionEnded,
    ToolCall,
    ToolResult,
    canonical_json,
    record_hash,
)


def _extra(model: Any) -> str:
    extra = getattr(model, "model_extra", None) or {}
    return canonical_json(extra) if extra else "{}"


def _collector(model: Any) -> dict[str, Any]:
    c = getattr(model, "collector", None)
    if c is None:
        return {"collector_id": "", "collector_epoch": 0, "collector_seq": 0, "collector_prev_hash": None}
    return {
        "collector_id": c.id,
        "collector_epoch": c.epoch,
        "collector_seq": c.seq,
        "collector_prev_hash": c.prev_hash,
    }


@dataclass(frozen=True)
class Provenance:
    topic: str
    partition: int
    offset: int
    ingested_at: datetime

    def columns(self) -> dict[str, Any]:
        return {
            "_topic": self.topic,
            "_partition": self.partition,
            "_offset": self.offset,
            "_ingested_at": self.ingested_at,
        }


def to_row(record: Any, prov: Provenance) -> tuple[str, dict[str, Any]]:
    """The table and the row for one decoded record."""
    table, row = _to_row(record, prov)
    if isinstance(record, BaseEvent):
        row["_record_hash"] = record_hash(record)
    return table, row


def _to_row(record: Any, prov: Provenance) -> tuple[str, dict[str, Any]]:
    common = prov.columns()
    if isinstance(record, ToolCall):
        return "tool_calls", {
            "event_id": record.event_id,
            "event_time": record.event_time,
            "tenant": record.tenant,
            "call_id": record.call_id,
            "session_id": record.session_id,
            "server": record.server,
            "tool": record.tool,
            "arguments": canonical_json(record.arguments),
            "resources": list(record.resources),
            "transport": record.transport,
            "attested": None if record.attested is None else canonical_json(record.attested),
            "claimed": canonical_json(record.claimed),
            "tool_digest": record.tool_digest,
            **_collector(record),
            "extra": _extra(record),
            **common,
        }
    if isinstance(record, ToolResult):
        return "tool_results", {
            "event_id": record.event_id,
            "event_time": record.event_time,
            "tenant": record.tenant,
            "call_id": record.call_id,
            "session_id": record.session_id,
            "status": record.status,
            "duration_ms": float(record.duration_ms),
            "error": record.error,
            "result_digest": record.result_digest,
            **_collector(record),
            "extra": _extra(record),
            **common,
        }
    if isinstance(record, (SessionBound, SessionEnded)):
        row = {
            "event_id": record.event_id,
            "event_type": record.event_type,
            "event_time": record.event_time,
            "tenant": record.tenant,
            "session_id": record.session_id,
            "principal": None,
            "agent_id": None,
            "valid_from": None,
            "valid_until": None,
            "auth": "{}",
            **_collector(record),
            "extra": _extra(record),
            **common,
        }
        if isinstance(record, SessionBound):
            row.update(
                principal=record.principal,
                agent_id=record.agent_id,
                valid_from=record.valid_from,
                valid_until=record.valid_until,
                auth=canonical_json(record.auth),
            )
        return "identity_events", row
    if isinstance(record, (GrantIssued, GrantRevoked)):
        row = {
            "event_id": record.event_id,
            "event_type": record.event_type,
            "event_time": record.event_time,
            "tenant": record.tenant,
            "grant_id": record.grant_id,
            "principal": record.principal,
            "agent_id": record.agent_id,
            "tools": [],
            "resources": [],
            "scopes": [],
            "not_before": None,
            "expires_at": None,
            "granted_by": None,
            "purpose": None,
            "parent_grant_id": None,
            "revoked_by": None,
            "reason": None,
            **_collector(record),
            "extra": _extra(record),
            **common,
        }
        if isinstance(record, GrantIssued):
            row.update(
                tools=list(record.tools),
                resources=list(record.resources),
                scopes=list(record.scopes),
                not_before=record.not_before,
                expires_at=record.expires_at,
                granted_by=record.granted_by,
                purpose=record.purpose,
                parent_grant_id=record.parent_grant_id,
            )
        else:
            row.update(revoked_by=record.revoked_by, reason=record.reason)
        return "consent_events", row
    if isinstance(record, Evidence):
        return "evidence", {
            "evidence_id": record.evidence_id,
            "call_id": record.call_id,
            "tenant": record.tenant,
            "session_id": record.session_id,
            "principal": record.principal,
            "agent_id": record.agent_id,
            "server": record.server,
            "tool": record.tool,
            "call_time": record.call_time,
            "verdict": record.verdict,
            "matched_grant_id": record.matched_grant_id,
            "reasons": list(record.reasons),
            "version": record.version,
            "final": record.final,
            "late": record.late,
            "decided_at": record.decided_at,
            "facts": canonical_json(record.facts),
            **common,
        }
    if isinstance(record, Finding):
        return "findings", {
            "finding_id": record.finding_id,
            "dedup_key": record.dedup_key,
            "rule_id": record.rule_id,
            "rule_version": record.rule_version,
            "severity": record.severity,
            "title": record.title,
            "summary": record.summary,
            "tenant": record.tenant,
            "principal": record.principal,
            "agent_id": record.agent_id,
            "call_id": record.call_id,
            "call_ids": list(record.call_ids),
            "session_id": record.session_id,
            "grant_id": record.grant_id,
            "forensic_query": record.forensic_query,
            "first_call_time": record.first_call_time,
            "last_call_time": record.last_call_time,
            "details": canonical_json(record.details),
            "detected_at": record.detected_at,
            **common,
        }
    if isinstance(record, PageAttempt):
        # The pages table has no _topic/_partition/_offset: only _ingested_at of the provenance.
        return "pages", {
            "attempt_id": record.attempt_id,
            "page_key": record.page_key,
            "dedup_key": record.dedup_key,
            "finding_id": record.finding_id,
            "rule_id": record.rule_id,
            "severity": record.severity,
            "tenant": record.tenant,
            "channel": record.channel,
            "route": record.route,
            "attempt": record.attempt,
            "outcome": record.outcome,
            "http_status": record.http_status,
            "error": record.error,
            "findings_grouped": record.findings_grouped,
            "attempted_at": record.attempted_at,
            "latency_ms": float(record.latency_ms),
            "_ingested_at": prov.ingested_at,
        }
    if isinstance(record, DeadLetter):
        return "dead_letters", {
            "dead_letter_id": record.dead_letter_id,
            "source_topic": record.source_topic,
            "source_partition": record.source_partition,
            "source_offset": record.source_offset,
            "key": record.key,
            "reason": record.reason,
            "stage": record.stage,
            "payload_b64": record.payload_b64,
            "failed_at": record.failed_at,
            **common,
        }
    raise TypeError(f"no table for {type(record).__name__}")
