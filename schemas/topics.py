"""Kafka topic names and message keys (DESIGN.md, "Event contract")."""

from __future__ import annotations

import dataclasses
import struct
from dataclasses import dataclass
from typing import Final
from urllib.parse import quote, unquote

from schemas.events import (
    ApprovalDecided,
    BaseEvent,
    DeadLetter,
    Evidence,
    Finding,
    GrantIssued,
    GrantRevoked,
    PageAttempt,
    PolicyPublished,
    SchemaModel,
    SessionBound,
    SessionEnded,
    ToolCall,
    ToolResult,
)

__all__ = [
    "APPROVALS",
    "CALLS_BY_ROUTE",
    "DEAD_LETTER",
    "EVIDENCE",
    "FINDINGS",
    "GRANTS",
    "KEEP_FOREVER",
    "LOCAL_KAFKA_PORT",
    "PAGES",
    "POLICIES",
    "SESSIONS",
    "TOOL_CALLS",
    "TOOL_RESULTS",
    "Topics",
    "delegation_key",
    "key_for",
    "parse_delegation_key",
    "partition_for",
    "policy_key",
    "topic_for",
]

TOOL_CALLS: Final = "mcp.tool-calls"
TOOL_RESULTS: Final = "mcp.tool-results"
SESSIONS: Final = "identity.sessions"
GRANTS: Final = "consent.grants"
POLICIES: Final = "consent.policies"
"""Cedar policy versions, keyed tenant/policy_id; small, read whole by every worker."""
APPROVALS: Final = "consent.approvals"
"""Human approval decisions, keyed (and co-partitioned) like consent.grants: tenant/principal/agent_id."""
EVIDENCE: Final = "audit.evidence"
FINDINGS: Final = "audit.findings"
PAGES: Final = "audit.pages"
"""Page delivery ledger: one PageAttempt per attempt (``scopewatch pager``), keyed by dedup key."""
DEAD_LETTER: Final = "audit.dead-letter"
LOCAL_KAFKA_PORT: Final = 19092
"""Where the local broker (``scopewatch up``) listens, and so every default bootstrap points: the
services' and the collectors' settings and the stack's broker share this one number."""
KEEP_FOREVER: Final = {"cleanup.policy": "delete", "retention.ms": "-1", "retention.bytes": "-1"}
"""Configs of a topic whose whole history is state: no time or size retention, no compaction."""
CALLS_BY_ROUTE: Final = "scopewatch.calls-by-route"
"""Internal: stage 1 -> stage 2 of the decision job, keyed by route (delegation or session)."""


@dataclass(frozen=True)
class Topics:
    """The pipeline's topic names; ``Topics.with_prefix("t123.")`` isolates a test run."""

    tool_calls: str = TOOL_CALLS
    tool_results: str = TOOL_RESULTS
    sessions: str = SESSIONS
    grants: str = GRANTS
    evidence: str = EVIDENCE
    findings: str = FINDINGS
    pages: str = PAGES
    dead_letter: str = DEAD_LETTER
    calls_by_route: str = CALLS_BY_ROUTE
    policies: str = POLICIES
    approvals: str = APPROVALS

    @classmethod
    def with_prefix(cls, prefix: str) -> Topics:
        return cls(**{f.name: prefix + f.default for f in dataclasses.fields(cls) if isinstance(f.default, str)})

    def all(self) -> list[str]:
        return [getattr(self, f.name) for f in dataclasses.fields(self)]

    def configs(self) -> dict[str, dict[str, str]]:
        """Topic configs the pipeline relies on, by topic name (others take the broker's defaults).

        ``consent.policies`` is kept forever and never compacted: every worker rebuilds "the policy
        version as of t" from the whole topic at each start, so a version deleted by time retention
        (or compacted away by its key) would make grants fail closed after a restart.
        """
        return {self.policies: dict(KEEP_FOREVER)}


_DEFAULT: Final = Topics()


def topic_for(event: SchemaModel, topics: Topics = _DEFAULT) -> str:
    """Topic an event (or Evidence / DeadLetter record) is published to."""
    match event:
        case ToolCall():
            return topics.tool_calls
        case ToolResult():
            return topics.tool_results
        case SessionBound() | SessionEnded():
            return topics.sessions
        case GrantIssued() | GrantRevoked():
            return topics.grants
        case PolicyPublished():
            return topics.policies
        case ApprovalDecided():
            return topics.approvals
        case Evidence():
            return topics.evidence
        case Finding():
            return topics.findings
        case PageAttempt():
            return topics.pages
        case DeadLetter():
            return topics.dead_letter
    raise TypeError(f"no topic for {type(event).__name__}")


def key_for(event: BaseEvent) -> str:
    """Message key: session_id for calls, results and sessions; delegation key for grants and
    approvals; tenant/policy_id for policies."""
    match event:
        case ToolCall() | ToolResult() | SessionBound() | SessionEnded():
            return event.session_id
        case GrantIssued() | GrantRevoked() | ApprovalDecided():
            return delegation_key(event.tenant, event.principal, event.agent_id)
        case PolicyPublished():
            return policy_key(event.tenant, event.policy_id)
    raise TypeError(f"no key for {type(event).__name__}")


def delegation_key(tenant: str, principal: str, agent_id: str) -> str:
    """``tenant/principal/agent_id``, each part percent-encoded (quote(part, safe=""))."""
    return "/".join(quote(part, safe="") for part in (tenant, principal, agent_id))


def policy_key(tenant: str, policy_id: str) -> str:
    """``tenant/policy_id``, each part percent-encoded (the key of consent.policies)."""
    return "/".join(quote(part, safe="") for part in (tenant, policy_id))


def parse_delegation_key(key: str) -> tuple[str, str, str]:
    """Inverse of :func:`delegation_key`; ValueError if ``key`` has not exactly 3 parts."""
    parts = key.split("/")
    if len(parts) != 3:
        raise ValueError(f"not a delegation key (tenant/principal/agent_id): {key!r}")
    tenant, principal, agent_id = (unquote(p, errors="strict") for p in parts)
    return tenant, principal, agent_id


_M: Final = 0x5BD1E995
_MASK: Final = 0xFFFFFFFF


def murmur2_fast(data: bytes) -> int:
    """Kafka's murmur2 (``aiokafka.partitioner.murmur2``, the Java client's ``Utils.murmur2``), reading
    four bytes at a time: about 3x faster in CPython, equal on every input (unit-tested)."""
    length = len(data)
    h = 0x9747B28C ^ length
    m, mask = _M, _MASK
    n4 = length & ~3
    for (k,) in _BLOCKS(data[:n4]):
        k = (k * m) & mask
        k ^= k >> 24
        h = ((h * m) & mask) ^ ((k * m) & mask)
    extra = length & 3
    if extra:
        if extra >= 3:
            h ^= data[n4 + 2] << 16
        if extra >= 2:
            h ^= data[n4 + 1] << 8
        h = ((h ^ data[n4]) * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    return h ^ (h >> 15)


_BLOCKS: Final = struct.Struct("<I").iter_unpack


def partition_for(key: bytes, partitions: int) -> int:
    """The partition Kafka's default partitioner gives ``key`` (murmur2, as the Java client and aiokafka)."""
    return (murmur2_fast(key) & 0x7FFFFFFF) % partitions
