"""approval_denied: a human denied the call and it happened anyway (verdict 5).

The grant covering and permitting the call needs a human approval for this tool, and the latest
approval decision in force at the call was a ``deny``.
"""

from __future__ import annotations

from detections.casekit import approval, bound, call, grant
from detections.engine import Decision
from detections.findings import Finding
from detections.rulebase import NoState, RuleContext, RuleMeta, negative, per_call_rule, positive
from schemas import ToolCall

META = RuleMeta(
    id="approval_denied",
    version=1,
    title="Tool call executed although a human denied it",
    severity="critical",
    kind="per_call",
    runbook=(
        "Run approval_history: which approval denied the call, who denied it, and what the call did.",
        "Check why the gateway let the call through: its approval gate did not see or did not honour the deny.",
        "Block the agent for this principal and tool until the gate is fixed; undo the call's effects if you can.",
        "Tell the approver and the principal that the denied action ran.",
    ),
    owasp=("ASI03", "ASI09"),
    atlas=("AML.T0053",),
)


def evaluate(call: ToolCall, decision: Decision, ctx: RuleContext[NoState]) -> list[Finding]:
    """Fires on verdict approval_denied."""
    return ctx.on_verdict(
        call,
        decision,
        "approval_denied",
        summary=f"{call.server}/{call.tool} ran although {decision.approver} denied it "
        f"(approval {decision.approval_id}, grant {decision.matched_grant_id})",
        key=(decision.matched_grant_id or "-", decision.approval_id or "-"),
        query="approval_history",
    )


GATED = (bound("09:00:00"), grant("09:00:00", tools=("fs/*",), approval_tools=("fs/write_*",)))

RULE = per_call_rule(
    META,
    evaluate,
    [
        positive(
            "denied, then called",
            *GATED,
            approval("09:30:00", "a1", decision="deny"),
            call("10:00:00", "c1", "fs/write_file"),
            fires_on=["c1"],
        ),
        negative(
            "denied, then approved",
            *GATED,
            approval("09:30:00", "a1", decision="deny"),
            approval("09:40:00", "a2"),
            call("10:00:00", "c1", "fs/write_file"),
        ),
        negative(
            "a tool needing no approval",
            *GATED,
            approval("09:30:00", "a1", "fs/read_file", "deny"),
            call("10:00:00", "c1", "fs/read_file"),
        ),
    ],
    verdicts=("approval_denied",),
)
