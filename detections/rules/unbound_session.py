"""unbound_session: a call on a session no ``session_bound`` covers (verdict 1).

Nobody can be held accountable for such a call: the collector saw traffic on a session the
identity provider never bound, or before it was bound.
"""

from __future__ import annotations

from detections.casekit import call, delegation
from detections.engine import Decision
from detections.findings import Finding
from detections.rulebase import NoState, RuleContext, RuleMeta, negative, per_call_rule, positive
from schemas import ToolCall

META = RuleMeta(
    id="unbound_session",
    version=1,
    title="Tool call on an unbound session",
    severity="medium",
    kind="per_call",
    runbook=(
        "Run session_timeline for the session: was a session_bound late, lost, or never sent?",
        "Identify the collector and host from the call_evidence query (collector id, transport).",
        "If no identity provider ever bound the session, treat the agent as unauthenticated and block it "
        "at the gateway.",
    ),
    owasp=("ASI03", "ASI10"),
    atlas=("AML.T0053",),
)


def evaluate(call: ToolCall, decision: Decision, ctx: RuleContext[NoState]) -> list[Finding]:
    """Fires on verdict unbound_session."""
    return ctx.on_verdict(
        call,
        decision,
        "unbound_session",
        summary=f"{call.server}/{call.tool} called on session {call.session_id!r}, which is not bound to anyone",
        key=(),
        query="session_timeline",
    )


RULE = per_call_rule(
    META,
    evaluate,
    [
        positive("call on a session never bound", *delegation(), call("10:00:00", "c1", session="s9"), fires_on=["c1"]),
        positive("call before the binding", call("08:59:59", "c1"), *delegation(), fires_on=["c1"]),
        negative("call on the bound session", *delegation(), call("10:00:00", "c1")),
    ],
    verdicts=("unbound_session",),
)
