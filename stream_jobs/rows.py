"""Mapping of decoded events to ClickHouse rows (one table per kind of record).

``to_row`` maps one decoded model to a dict row; the sink's columnar fast path
(:mod:`stream_jobs.columnar`) produces the same values straight from the Avro bytes, as tuples
in the order of :data:`COLUMNS`, with DateTime64 columns as integer milliseconds
(:func:`row_values` turns a dict row into such a tuple). :func:`check_row` holds the checks the
sink adds to the models' own validation: values a column cannot store, and verdict names.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from detections.engine import VERDICTS
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
from schemas.topics import Topics


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
            "fact_ids": list(record.fact_ids),
            "fact_hashes": list(record.fact_hashes),
            "kind": record.kind,
            "trigger": record.trigger,
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


def table_topics(topics: Topics) -> dict[str, str]:
    """Each table's topic: tool_calls only from the tool-calls topic, consent_events from the grants topic..."""
    return {
        "tool_calls": topics.tool_calls,
        "tool_results": topics.tool_results,
        "identity_events": topics.sessions,
        "consent_events": topics.grants,
        "evidence": topics.evidence,
        "findings": topics.findings,
        "pages": topics.pages,
        "dead_letters": topics.dead_letter,
    }


# ------------------------------------------------------------------ column layout

_PROVENANCE: Final = ("_topic", "_partition", "_offset", "_ingested_at")
_COLLECTOR: Final = ("collector_id", "collector_epoch", "collector_seq", "collector_prev_hash")

COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    "tool_calls": (
        "event_id", "event_time", "tenant", "call_id", "session_id", "server", "tool", "arguments", "resources",
        "transport", "attested", "claimed", "tool_digest", *_COLLECTOR, "extra", *_PROVENANCE, "_record_hash",
    ),
    "tool_results": (
        "event_id", "event_time", "tenant", "call_id", "session_id", "status", "duration_ms", "error",
        "result_digest", *_COLLECTOR, "extra", *_PROVENANCE, "_record_hash",
    ),
    "identity_events": (
        "event_id", "event_type", "event_time", "tenant", "session_id", "principal", "agent_id", "valid_from",
        "valid_until", "auth", *_COLLECTOR, "extra", *_PROVENANCE, "_record_hash",
    ),
    "consent_events": (
        "event_id", "event_type", "event_time", "tenant", "grant_id", "principal", "agent_id", "tools", "resources",
        "scopes", "not_before", "expires_at", "granted_by", "purpose", "parent_grant_id", "revoked_by", "reason",
        *_COLLECTOR, "extra", *_PROVENANCE, "_record_hash",
    ),
    "evidence": (
        "evidence_id", "call_id", "tenant", "session_id", "principal", "agent_id", "server", "tool", "call_time",
        "verdict", "matched_grant_id", "reasons", "version", "final", "late", "decided_at", "facts",
        "fact_ids", "fact_hashes", "kind", "trigger", *_PROVENANCE,
    ),
    "findings": (
        "finding_id", "dedup_key", "rule_id", "rule_version", "severity", "title", "summary", "tenant", "principal",
        "agent_id", "call_id", "call_ids", "session_id", "grant_id", "forensic_query", "first_call_time",
        "last_call_time", "details", "detected_at", *_PROVENANCE,
    ),
    "pages": (
        "attempt_id", "page_key", "dedup_key", "finding_id", "rule_id", "severity", "tenant", "channel", "route",
        "attempt", "outcome", "http_status", "error", "findings_grouped", "attempted_at", "latency_ms",
        "_ingested_at",
    ),
    "dead_letters": (
        "dead_letter_id", "source_topic", "source_partition", "source_offset", "key", "reason", "stage",
        "payload_b64", "failed_at", *_PROVENANCE,
    ),
}  # fmt: skip
"""Every table's insert columns, in the order of ``to_row``'s dict and of the fast path's tuples."""

TIME_COLUMNS: Final[dict[str, frozenset[str]]] = {
    "tool_calls": frozenset({"event_time", "_ingested_at"}),
    "tool_results": frozenset({"event_time", "_ingested_at"}),
    "identity_events": frozenset({"event_time", "valid_from", "valid_until", "_ingested_at"}),
    "consent_events": frozenset({"event_time", "not_before", "expires_at", "_ingested_at"}),
    "evidence": frozenset({"call_time", "decided_at", "_ingested_at"}),
    "findings": frozenset({"first_call_time", "last_call_time", "detected_at", "_ingested_at"}),
    "pages": frozenset({"attempted_at", "_ingested_at"}),
    "dead_letters": frozenset({"failed_at", "_ingested_at"}),
}
"""DateTime64(3) columns: in row tuples they hold integer milliseconds since the epoch (UTC)."""

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)


def millis(value: datetime) -> int:
    """Milliseconds since the epoch, rounded down: the DateTime64(3) tick ClickHouse stores for ``value``."""
    return (value - _EPOCH) // _MS


def row_values(table: str, row: dict[str, Any]) -> tuple[Any, ...]:
    """A ``to_row`` dict as the tuple the columnar batch holds (DateTime64 columns as milliseconds)."""
    times = TIME_COLUMNS[table]
    return tuple((None if row[c] is None else millis(row[c])) if c in times else row[c] for c in COLUMNS[table])


# ------------------------------------------------------------------ checks the sink adds

UINT32_MAX: Final = 2**32 - 1
LIMITS: Final[dict[str, dict[str, int]]] = {
    "evidence": {"version": UINT32_MAX},
    "dead_letters": {"source_partition": UINT32_MAX},
}
"""Upper bounds of UInt32 columns whose model allows more: such a row would fail the whole insert."""

VERDICT_NAMES: Final[frozenset[str]] = frozenset(VERDICTS)

JSON_COLUMNS: Final[dict[str, tuple[str, ...]]] = {
    "tool_calls": ("arguments", "attested", "claimed", "extra"),
    "tool_results": ("extra",),
    "identity_events": ("auth", "extra"),
    "consent_events": ("extra",),
    "evidence": ("facts",),
    "findings": ("details",),
}
"""Columns holding canonical JSON text. Python's json reads an escaped lone surrogate (``"\\ud800"``)
into a str that is not valid UTF-8; ClickHouse cannot be sent such a value (the insert would fail
on every retry), so check_row refuses it."""


class RowError(ValueError):
    """A decoded record the sink will not store (it becomes a dead letter)."""


def check_row(table: str, row: dict[str, Any]) -> None:
    """Raise RowError if ``row`` has a value its column cannot hold or a verdict outside the taxonomy."""
    for column, limit in LIMITS.get(table, {}).items():
        if row[column] > limit:
            raise RowError(f"{table}.{column} = {row[column]} does not fit the column (at most {limit})")
    if table == "evidence" and row["verdict"] not in VERDICT_NAMES:
        raise RowError(f"evidence.verdict {row['verdict'][:60]!r} is not a known verdict")
    for column in JSON_COLUMNS.get(table, ()):
        value = row[column]
        if value is not None:
            try:
                value.encode()
            except UnicodeEncodeError:
                raise RowError(f"{table}.{column} holds a lone surrogate (not valid UTF-8)") from None
