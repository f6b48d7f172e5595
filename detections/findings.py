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
import math
import uuid
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypeAlias, TypeVar, get_args

from pydantic import BaseModel, ConfigDict, Field

from schemas.events import Finding as FindingRecord
from schemas.events import Timestamp, parse_timestamp

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
    "new_finding",
    "trusted_model",
    "uuid5_text",
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
    "approval_history",
    "policy_decisions",
]

FORENSIC_QUERIES: Final[dict[ForensicQuery, str]] = {
    "call_evidence": "every verdict version and the raw tool_call/tool_result events of the evidence call ids",
    "session_timeline": "the session's session_bound/session_ended facts and every call made on it",
    "delegation_timeline": "calls, verdicts and consent facts of the delegation between first and last call time",
    "grant_history": "every grant_issued/grant_revoked of the grant, and the calls it matched",
    "tool_digests": "the delegation's calls to the server/tool with their tool_digest, in time order",
    "approval_history": "the delegation's approvals with the call that used or ignored each, and its calls with none",
    "policy_decisions": "calls judged under Cedar policies: versions, decision, deciding policies, errors",
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


_VARIANT: Final = {c: "89ab"[int(c, 16) & 3] for c in "0123456789abcdef"}


_SHA1: Final = hashlib.sha1


def uuid5_text(namespace: bytes, name: str) -> str:
    """``str(uuid.uuid5(uuid.UUID(bytes=namespace), name))``, without building UUID objects."""
    h = _SHA1(namespace + name.encode("utf-8")).hexdigest()
    return f"{h[:8]}-{h[8:12]}-5{h[13:16]}-{_VARIANT[h[16]]}{h[17:20]}-{h[20:32]}"


_FINDING_NS: Final = FINDING_NAMESPACE.bytes


def finding_id(rule_id: str, key: str, call_id: str) -> str:
    """Deterministic id of the finding ``rule_id`` raised on ``call_id`` under dedup key ``key``."""
    return uuid5_text(_FINDING_NS, f"{rule_id}\x1f{key}\x1f{call_id}")


M = TypeVar("M", bound=BaseModel)
_NEW: Final = object.__new__
_SET: Final = object.__setattr__


def trusted_model(
    cls: type[M], values: dict[str, Any], extra: dict[str, Any] | None, fields_set: set[str] | None = None
) -> M:
    """The model pydantic would build from ``values`` (every field, in declaration order, each value
    already what validation would make of it), without running validation.

    Sets what ``model_construct`` sets; ``extra`` is ``{}`` for ``extra="allow"`` models and None
    for the others, as validation leaves it; ``fields_set`` defaults to every field. Unit tests
    compare the results with validated models.
    """
    model = _NEW(cls)
    _SET(model, "__dict__", values)
    _SET(model, "__pydantic_fields_set__", set(values) if fields_set is None else fields_set)
    _SET(model, "__pydantic_extra__", extra)
    _SET(model, "__pydantic_private__", None)
    return model


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
        evidence = self.evidence
        if (
            _texts(self.finding_id, self.dedup_key, self.rule_id, self.title, self.summary, self.tenant, self.call_id)
            and _texts(evidence.session_id, evidence.query, *evidence.call_ids)
            and type(self.rule_version) is int
            and 1 <= self.rule_version <= _MAX_RULE_VERSION
            and type(self.severity) is str
            and self.severity in _SEVERITY_SET
            and (self.principal is None or type(self.principal) is str)
            and (self.agent_id is None or type(self.agent_id) is str)
            and (evidence.grant_id is None or type(evidence.grant_id) is str)
            and type(self.details) is dict
            and _plain(self.details)
        ):
            try:
                first, last, detected = (
                    _instant(self.first_call_time),
                    _instant(self.last_call_time),
                    _instant(detected_at),
                )
            except ValueError:
                pass  # validation below raises the error
            else:
                values = {
                    "finding_id": self.finding_id,
                    "dedup_key": self.dedup_key,
                    "rule_id": self.rule_id,
                    "rule_version": self.rule_version,
                    "severity": self.severity,
                    "title": self.title,
                    "summary": self.summary,
                    "tenant": self.tenant,
                    "principal": self.principal,
                    "agent_id": self.agent_id,
                    "call_id": self.call_id,
                    "call_ids": list(evidence.call_ids),
                    "session_id": evidence.session_id,
                    "grant_id": evidence.grant_id,
                    "forensic_query": evidence.query,
                    "first_call_time": first,
                    "last_call_time": last,
                    "details": dict(self.details),
                    "detected_at": detected,
                }
                return trusted_model(FindingRecord, values, {})
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


_MAX_RULE_VERSION: Final = 2**31 - 1  # the record's bound (Avro int)
_DETAIL_TYPES: Final = (str, int, float, bool, type(None))


def _plain(details: Mapping[str, Detail]) -> bool:
    """Detail values only, str keys, finite floats: what the record's JSON check accepts as is."""
    return all(
        type(k) is str and type(v) in _DETAIL_TYPES and (type(v) is not float or math.isfinite(v))
        for k, v in details.items()
    )


def new_finding(
    *,
    finding_id: str,
    dedup_key: str,
    rule_id: str,
    rule_version: int,
    severity: Severity,
    title: str,
    summary: str,
    tenant: str,
    principal: str | None,
    agent_id: str | None,
    call_id: str,
    first_call_time: datetime,
    last_call_time: datetime,
    call_ids: tuple[str, ...],
    session_id: str,
    grant_id: str | None,
    query: ForensicQuery,
    details: dict[str, Detail],
) -> Finding:
    """``Finding(..., evidence=FindingEvidence(call_ids, session_id, grant_id, query), details)``.

    When every value already has its field's exact type (what rules give), the models are built
    without validation (a rule finding costs about a tenth); anything else is validated as usual.
    ``details`` becomes the finding's own (pass a fresh dict).
    """
    if (
        _texts(finding_id, rule_id, title, summary, tenant, call_id, session_id)
        and type(dedup_key) is str
        and 0 < len(dedup_key) <= MAX_DEDUP_KEY
        and type(rule_version) is int
        and rule_version >= 1
        and type(severity) is str
        and severity in _SEVERITY_SET
        and type(query) is str
        and query in FORENSIC_QUERIES
        and (principal is None or type(principal) is str)
        and (agent_id is None or type(agent_id) is str)
        and (grant_id is None or type(grant_id) is str)
        and type(call_ids) is tuple
        and call_ids
        and all(type(c) is str for c in call_ids)
        and type(details) is dict
        and all(type(k) is str and type(v) in _DETAIL_TYPES for k, v in details.items())
    ):
        try:
            first, last = _instant(first_call_time), _instant(last_call_time)
        except ValueError:
            pass  # validation below raises the error
        else:
            evidence = trusted_model(
                FindingEvidence,
                {"call_ids": call_ids, "session_id": session_id, "grant_id": grant_id, "query": query},
                None,
            )
            values = {
                "finding_id": finding_id,
                "dedup_key": dedup_key,
                "rule_id": rule_id,
                "rule_version": rule_version,
                "severity": severity,
                "title": title,
                "summary": summary,
                "tenant": tenant,
                "principal": principal,
                "agent_id": agent_id,
                "call_id": call_id,
                "first_call_time": first,
                "last_call_time": last,
                "evidence": evidence,
                "details": details,
            }
            return trusted_model(Finding, values, None)
    return Finding(
        finding_id=finding_id,
        dedup_key=dedup_key,
        rule_id=rule_id,
        rule_version=rule_version,
        severity=severity,
        title=title,
        summary=summary,
        tenant=tenant,
        principal=principal,
        agent_id=agent_id,
        call_id=call_id,
        first_call_time=first_call_time,
        last_call_time=last_call_time,
        evidence=FindingEvidence(call_ids=call_ids, session_id=session_id, grant_id=grant_id, query=query),
        details=details,
    )


_SEVERITY_SET: Final = frozenset(SEVERITIES)


def _texts(*values: object) -> bool:
    return all(type(v) is str for v in values)


def _instant(value: datetime) -> datetime:
    """What a ``Timestamp`` field makes of a datetime (``parse_timestamp``): UTC, milliseconds."""
    if type(value) is datetime and value.tzinfo is UTC:  # parse_timestamp's result, without its checks
        micro = value.microsecond
        return value if micro % 1000 == 0 else value.replace(microsecond=micro - micro % 1000)
    return parse_timestamp(value)
