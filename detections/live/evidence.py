"""Evidence records and the call as rules read it, built from what stage 2 holds of a call."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from datetime import datetime
from typing import Final

from detections.engine import Decision, evidence_fields
from detections.findings import trusted_model, uuid5_text
from detections.live.wire import CallLine, call_key
from schemas import Evidence, ToolCall

__all__ = ["EVIDENCE_NAMESPACE", "build_evidence", "evidence_id_for", "fact_refs", "make_evidence", "tool_call"]

EVIDENCE_NAMESPACE: Final = uuid.UUID("6f1c2b1e-3c1a-5b7e-9a53-7d5b0c9e2a10")
_EVIDENCE_NS: Final = EVIDENCE_NAMESPACE.bytes


def evidence_id_for(tenant: str, session_id: str, call_id: str, version: int, ckey: str | None = None) -> str:
    """Deterministic: a version re-emitted after a crash has the same id (idempotent sink)."""
    return uuid5_text(_EVIDENCE_NS, f"{ckey or call_key(tenant, session_id, call_id)}#{version}")


_EVIDENCE_FIELDS: Final = set(Evidence.model_fields)
_CALL_FIELDS_SET: Final = set(ToolCall.model_fields) - {"event_type", "collector"}
"""What ``model_construct`` records as set for the stripped call of earlier snapshots (all but defaults)."""


def make_evidence(
    tenant: str,
    session_id: str,
    call_id: str,
    server: str,
    tool: str,
    call_time: datetime,
    decision: Decision,
    version: int,
    final: bool,
    late: bool,
    decided_at: datetime,
    attribution_version: int,
    reason: str,
    kind: str,
    ckey: str | None,
) -> Evidence:
    fact_ids, fact_hashes = fact_refs(decision.facts)
    values: dict[str, object] = {
        "evidence_id": evidence_id_for(tenant, session_id, call_id, version, ckey),
        "call_id": call_id,
        "tenant": tenant,
        "session_id": session_id,
        "principal": decision.principal,
        "agent_id": decision.agent_id,
        "server": server,
        "tool": tool,
        "call_time": call_time,
        "verdict": decision.verdict,
        "matched_grant_id": decision.matched_grant_id,
        "reasons": list(decision.reasons),
        "version": version,
        "final": final,
        "late": late,
        "decided_at": decided_at,
        "facts": {},
        "fact_ids": fact_ids,
        "fact_hashes": fact_hashes,
        "kind": kind,
        "trigger": reason,
        "approval_id": decision.approval_id,  # evidence_fields(decision), inline for the usual call
        "approver": decision.approver,
        "policy_versions": [],
        "policy_decision": None,
        "policy_reasons": [],
        "policy_errors": [],
        "history_complete": decision.facts.get("history_complete", True) is not False,
    }
    if decision.policy is not None:
        values.update(evidence_fields(decision))
    return trusted_model(Evidence, values, {}, _EVIDENCE_FIELDS.copy())


def fact_refs(facts: Mapping[str, object]) -> tuple[list[str], list[str]]:
    """The facts a decision rests on, as references: (event ids, record hashes), in decision order.

    The session's deciding fact, then the binding it closed (an ended session), then per grant
    considered its version and the revocation that applied. A hash the history does not know (a
    fact stored in live state before hashes were kept) is ``""``. The raw tables hold the facts
    themselves by event_id, with the same hash in ``_record_hash``.
    """
    ids: list[str] = []
    hashes: list[str] = []
    session = facts.get("session")
    if isinstance(session, dict):
        deciding = session.get("event_id")
        if isinstance(deciding, str):
            ids.append(deciding)
            hashes.append(str(session.get("event_hash") or ""))
            binding = session.get("binding_event_id")
            if isinstance(binding, str) and binding != deciding:
                ids.append(binding)
                hashes.append(str(session.get("binding_hash") or ""))
    grants = facts.get("grants")
    if isinstance(grants, list):
        for g in grants:
            ids.append(g["version_event_id"])
            hashes.append(str(g.get("version_hash") or ""))
            revocation = g.get("revocation_event_id")
            if revocation is not None:
                ids.append(revocation)
                hashes.append(str(g.get("revocation_hash") or ""))
    return ids, hashes


def build_evidence(
    call: ToolCall,
    decision: Decision,
    version: int,
    final: bool,
    late: bool,
    decided_at: datetime,
    attribution_version: int,
    reason: str,
    kind: str,
    ckey: str | None = None,
) -> Evidence:
    return make_evidence(
        call.tenant,
        call.session_id,
        call.call_id,
        call.server,
        call.tool,
        call.event_time,
        decision,
        version,
        final,
        late,
        decided_at,
        attribution_version,
        reason,
        kind,
        ckey,
    )


def tool_call(c: CallLine, t: datetime) -> ToolCall:
    """The call as rules read it (what stage 2 has of it: no claimed hints)."""
    values = {
        "event_type": "tool_call",
        "event_id": c.event_id,
        "event_time": t,
        "tenant": c.tenant,
        "collector": None,
        "call_id": c.call_id,
        "session_id": c.session_id,
        "server": c.server,
        "tool": c.tool,
        "arguments": c.arguments,
        "resources": c.resources,
        "transport": c.transport,
        "attested": c.attested,
        "claimed": {},
        "tool_digest": c.tool_digest,
    }
    return trusted_model(ToolCall, values, {}, _CALL_FIELDS_SET.copy())
