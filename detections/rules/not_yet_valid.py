"""not_yet_valid: the grant covering the call was issued but its ``not_before`` lies ahead (verdict 8)."""

from __future__ import annotations

from detections.casekit import bound, call, grant
from detections.engine import Decision
from detections.findings import Finding
from detections.rulebase import NoState, RuleContext, RuleMeta, negative, per_call_rule, positive
from schemas import ToolCall

META = RuleMeta(
    id="not_yet_valid",
    version=1,
    title="Tool call before the grant's not_before",
    severity="low",
    kind="per_call",
    runbook=(
        "Run grant_history for the grant: compare not_before with the call time.",
        "A few seconds early usually means clock skew between the consent service and the collector; check both.",
        "Hours early means the agent started work before the principal allowed it: ask the principal.",
    ),
    owasp=("ASI03",),
    atlas=("AML.T0053",),
)


def evaluate(call: ToolCall, decision: Decision, ctx: RuleContext[NoState]) -> list[Finding]:
    """Fires on verdict not_yet_valid."""
    return ctx.on_verdict(
        call,
        decision,
        "not_yet_valid",
        summary=f"{call.server}/{call.tool} called under grant {decision.matched_grant_id} before its not_before",
        key=(decision.matched_grant_id or "-",),
        query="grant_history",
    )


_FACTS = (bound("09:00:00"), grant("09:00:00", not_before="12:00:00"))

RULE = per_call_rule(
    META,
    evaluate,
    [
        positive("call before not_before", *_FACTS, call("10:00:00", "c1"), fires_on=["c1"]),
        negative("call at not_before", *_FACTS, call("12:00:00", "c1")),
    ],
    verdicts=("not_yet_valid",),
)
