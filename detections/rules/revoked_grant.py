"""revoked_grant: the grant covering the call had been revoked (verdict 6)."""

from __future__ import annotations

from detections.casekit import call, delegation, revoke
from detections.engine import Decision
from detections.findings import Finding
from detections.rulebase import NoState, RuleContext, RuleMeta, negative, per_call_rule, positive
from schemas import ToolCall

META = RuleMeta(
    id="revoked_grant",
    version=1,
    title="Tool call under a revoked grant",
    severity="high",
    kind="per_call",
    runbook=(
        "Run grant_history for the grant: who revoked it, when, and why.",
        "Run delegation_timeline from the revocation on: every call since then acted without consent.",
        "Check that the gateway received the revocation; block the agent for this principal until it has.",
        "Tell the principal what the agent did after they withdrew consent.",
    ),
    owasp=("ASI03", "ASI10"),
    atlas=("AML.T0053", "AML.T0012"),
)


def evaluate(call: ToolCall, decision: Decision, ctx: RuleContext[NoState]) -> list[Finding]:
    """Fires on verdict revoked_grant."""
    return ctx.on_verdict(
        call,
        decision,
        "revoked_grant",
        summary=f"{call.server}/{call.tool} called under grant {decision.matched_grant_id}, which had been revoked",
        key=(decision.matched_grant_id or "-",),
        query="grant_history",
    )


RULE = per_call_rule(
    META,
    evaluate,
    [
        positive(
            "call after the revocation", *delegation(), revoke("10:00:10"), call("10:00:20", "c1"), fires_on=["c1"]
        ),
        positive(
            "call at the revocation instant", *delegation(), revoke("10:00:10"), call("10:00:10", "c1"), fires_on=["c1"]
        ),
        negative("call before the revocation", *delegation(), revoke("10:00:10"), call("10:00:05", "c1")),
    ],
    verdicts=("revoked_grant",),
)
