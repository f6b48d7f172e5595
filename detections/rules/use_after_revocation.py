"""use_after_revocation: a revoked grant keeps being used past the revocation tolerance.

Every ``revoked_grant`` call is already a finding of rule ``revoked_grant``. This rule measures
how long after the revocation the call came (``call.event_time - revocation.event_time``, the
revocation read from the matched grant's ``GrantState``) and fires when that exceeds
``revocation_tolerance`` (strictly): the revocation did not stop the agent, beyond what an in-flight
call or clock skew explains. It also counts the uses of the revoked grant since the revocation.
Without grant states in the context the delay is unknown and the rule stays silent.

State: per revocation (its event id), the first use after it and the number of uses; at most
``max_entries`` revocations, least recently used evicted (an evicted one restarts its count).
Stored (:data:`CODEC`, version 1) as ``[1, [revocation_event_id, first_us, first_call_id, count],
...]``, least recently used first.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from detections.casekit import call, delegation, revoke
from detections.engine import Decision
from detections.findings import Finding
from detections.rulebase import (
    DetectionConfig,
    Lru,
    Rule,
    RuleContext,
    RuleMeta,
    StateCodec,
    from_micros,
    micros,
    negative,
    positive,
    stored_int,
    stored_text,
)
from schemas import ToolCall, format_timestamp

META = RuleMeta(
    id="use_after_revocation",
    version=1,
    title="Revoked grant still used after the revocation",
    severity="critical",
    kind="sequence",
    runbook=(
        "Run grant_history: when was the grant revoked, by whom, and how many calls used it since?",
        "Check the gateway's consent cache and the consent.grants topic lag: did the revocation reach enforcement?",
        "End the agent's sessions for this principal now; revocation alone did not stop it.",
        "Report to the principal every call made after they withdrew consent.",
    ),
    owasp=("ASI03", "ASI10"),
    atlas=("AML.T0012", "AML.T0053"),
)


@dataclass
class Uses:
    first: datetime
    first_call_id: str
    count: int = 0


@dataclass
class RevokedUses:
    by_revocation: Lru[str, Uses]


def new_state(config: DetectionConfig) -> RevokedUses:
    return RevokedUses(Lru(config.max_entries))


def _dump(state: RevokedUses) -> list[Any]:
    return [[rid, micros(u.first), u.first_call_id, u.count] for rid, u in state.by_revocation.items()]


def _load(items: list[Any], config: DetectionConfig) -> RevokedUses:
    state = new_state(config)
    for rid, first, call_id, count in items:
        state.by_revocation[stored_text(rid)] = Uses(from_micros(first), stored_text(call_id), stored_int(count))
    return state


CODEC = StateCodec(1, _dump, _load)


def evaluate(call: ToolCall, decision: Decision, ctx: RuleContext[RevokedUses]) -> list[Finding]:
    """Fires on a use of a revoked grant more than ``revocation_tolerance`` after the revocation."""
    matched = ctx.grant(decision.matched_grant_id) if decision.verdict == "revoked_grant" else None
    if matched is None or matched.revocation is None:
        return []
    revocation, t = matched.revocation, call.event_time
    uses = ctx.state.by_revocation.get(revocation.event_id) or Uses(t, call.call_id)
    if t < uses.first:
        uses.first, uses.first_call_id = t, call.call_id
    uses.count += 1
    ctx.state.by_revocation[revocation.event_id] = uses
    delay = t - revocation.event_time
    if delay <= ctx.config.revocation_tolerance:
        return []
    seconds = delay.total_seconds()
    return [
        ctx.finding(
            call,
            decision,
            summary=f"grant {matched.grant_id} used {seconds:g} s after {revocation.revoked_by} revoked it "
            f"({uses.count} use(s) since the revocation)",
            key=(matched.grant_id, revocation.event_id),
            query="grant_history",
            call_ids=[uses.first_call_id] if uses.first_call_id != call.call_id else [],
            grant_id=matched.grant_id,
            first_call_time=uses.first,
            details={
                "seconds_after_revocation": seconds,
                "revoked_at": format_timestamp(revocation.event_time),
                "revoked_by": revocation.revoked_by,
                "uses_since_revocation": uses.count,
            },
        )
    ]


RULE = Rule(
    META,
    evaluate,
    (
        positive(
            "an hour after the revocation", *delegation(), revoke("10:00:00"), call("11:00:00", "c1"), fires_on=["c1"]
        ),
        positive(
            "just past the tolerance",
            *delegation(),
            revoke("10:00:00"),
            call("10:00:02", "c1"),
            call("10:00:05.001", "c2"),
            fires_on=["c2"],
        ),
        negative("within the tolerance", *delegation(), revoke("10:00:00"), call("10:00:05", "c1")),
        negative("before the revocation", *delegation(), revoke("10:00:00"), call("09:59:59", "c1")),
    ),
    new_state,
    frozenset({"revoked_grant"}),  # evaluate returns at once on other verdicts
    codec=CODEC,
)
