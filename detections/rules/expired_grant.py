"""expired_grant: the grant covering the call had expired (verdict 7)."""

from __future__ import annotations

from detections.casekit import bound, call, grant
from detections.engine import Decision
from detections.findings import Finding
from detections.rulebase import NoState, RuleContext, RuleMeta, negative, per_call_rule, positive
from schemas import ToolCall

META = RuleMeta(
    id="expired_grant",
    version=1,
    title="Tool call under an expired grant",
    severity="medium",
    kind="per_call",
    runbook=(
        "Run grant_history for the grant: when did it expire, was a renewal requested?",
        "Run delegation_timeline since the expiry to see what the agent did without consent.",
        "Ask the principal to renew consent if the work is legitimate; otherwise block the agent.",
    ),
    owasp=("ASI03",),
    atlas=("AML.T0053",),
)


def evaluate(call: ToolCall, decision: Decision, ctx: RuleContext[NoState]) -> list[Finding]:
    """Fires on verdict expired_grant."""
    return ctx.on_verdict(
        call,
        decision,
        "expired_grant",
        summary=f"{call.server}/{call.tool} called under grant {decision.matched_grant_id}, which had expired",
        key=(decision.matched_grant_id or "-",),
        query="grant_history",
    )


_FACTS = (bound("09:00:00"), grant("09:00:00", expires="10:00:00"))

RULE = per_call_rule(
    META,
    evaluate,
    [
        positive("call after expires_at", *_FACTS, call("10:30:00", "c1"), fires_on=["c1"]),
        positive("call at expires_at", *_FACTS, call("10:00:00", "c1"), fires_on=["c1"]),
        negative("call before expires_at", *_FACTS, call("09:59:59.999", "c1")),
    ],
    verdicts=("expired_grant",),
)
