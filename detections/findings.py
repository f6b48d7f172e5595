"""What a detection rule emits: a :class:`Finding` (DESIGN.md, "Detections").

A finding names the rule that fired, how bad it is, who it is about (tenant, principal, agent)
and where to look (evidence pointers: call ids, grant, session and the name of a forensic query).

Identity of a finding:

* ``dedup_key`` groups findings that are "the same problem" for paging: the rule id, the
  tenant, the delegation (principal and agent, or the session when the call has no delegation)
  and a rule-chosen discriminator (e.g. the grant id). Paging groups and rate-limits by it.
* ``finding_id`` is deterministic: a UUIDv5 over the rule id, the dedup key and the triggering
  call id, so judging the same events again (replay, a retried stream job) gives the same id.
"""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from datetime import datetime
from typing import Final, Literal, TypeAlias, get_args

from pydantic import BaseModel, ConfigDict, Field

from schemas.events import Finding as FindingRecord
from schemas.events import Timestamp

__all__ = [
    "FINDING_NAMESPACE",
    "FORENSIC_QUERIES",
    "MAX_DEDUP_KEY",
    "SEVERITIES",
    "Detail",
    "Finding",
    "FindingEvidence",
    "ForensicQuery",
    "Severity",
    "dedup_key",
    "finding_id",
]

Severity: TypeAlias = Literal["info", "low", "medium", "high", "critical"]
SEVERITIES: Final[tuple[Severity, ...]] = get_args(Severity)
"""Severities from least to most severe."""

ForensicQuery: TypeAlias = Literal[
    "call_evidence",
    "session_timeline",
    "delegation_timeline",
    "grant_history",
    "tool_digests",
]

FORENSIC_QUERIES: Final[dict[ForensicQuery, str]] = {
    "call_evidence": "every verdict version and the raw tool_call/tool_result events of the evidence call ids",
    "session_timeline": "the session's session_bound/session_ended facts and every call made on it",
    "delegation_timeline": "calls, verdicts and consent facts of the delegation between first and last call time",
    "grant_history": "every grant_issued/grant_revoked of the grant, and the calls it matched",
    "tool_digests": "the delegation's calls to the server/tool with their tool_digest, in time order",
}
"""Named forensic queries a finding can point to (the SQL lives with the ClickHouse side)."""

FINDING_NAMESPACE: Final = uuid.UUID("5c0be3a7-d7f1-4c55-9a0e-2f6f4b8f2d61")
MAX_DEDUP_KEY: Final = 255
"""PagerDuty's limit for ``dedup_key``; longer keys are shortened to a stable digest."""

Detail: TypeAlias = str | int | float | bool | None


def dedup_key(rule_id: str, parts: Sequence[str]) -> str:
    """``rule_id|part|part...``; over :data:`MAX_DEDUP_KEY` characters, ``rule_id|sha256:<hex>``."""
    key = "|".join((rule_id, *parts))
    if len(key) <= MAX_DEDUP_KEY:
        return key
    return f"{rule_id}|sha256:{hashlib.sha256(key.encode()).hexdigest()}"


def finding_id(rule_id: str, key: str, call_id: str) -> str:
    """Deterministic id of the finding ``rule_id`` raised on ``call_id`` under dedup key ``key``."""
    return str(uuid.uuid5(FINDING_NAMESPACE, f"{rule_id}\x1f{key}\x1f{call_id}"))


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class FindingEvidence(_Frozen):
    """Where an analyst starts: the calls involved, the grant and session, the query to run."""

    call_ids: tuple[str, ...] = Field(min_length=1)
    session_id: str
    grant_id: str | None = None
    query: ForensicQuery


class Finding(_Frozen):
    """One rule firing on one call (the triggering call is the last of ``evidence.call_ids``)."""

    finding_id: str
    dedup_key: str = Field(min_length=1, max_length=MAX_DEDUP_KEY)
    rule_id: str
    rule_version: int = Field(ge=1)
    severity: Severity
    title: str
    summary: str
    tenant: str
    principal: str | None
    agent_id: str | None
    call_id: str
    first_call_time: Timestamp
    last_call_time: Timestamp
    evidence: FindingEvidence
    details: dict[str, Detail] = Field(default_factory=dict)

    def to_record(self, detected_at: datetime) -> FindingRecord:
        """The flat record that travels on ``audit.findings`` and lands in the ``findings`` table."""
        return FindingRecord(
            finding_id=self.finding_id,
            dedup_key=self.dedup_key,
            rule_id=self.rule_id,
            rule_version=self.rule_version,
            severity=self.severity,
            title=self.title,
            summary=self.summary,
            tenant=self.tenant,
            principal=self.principal,
            agent_id=self.agent_id,
            call_id=self.call_id,
            call_ids=list(self.evidence.call_ids),
            session_id=self.evidence.session_id,
            grant_id=self.evidence.grant_id,
            forensic_query=self.evidence.query,
            first_call_time=self.first_call_time,
            last_call_time=self.last_call_time,
            details=dict(self.details),
            detected_at=detected_at,
        )
