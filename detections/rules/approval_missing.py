"""approval_missing: the call needed a human approval and none authorised it (verdict 6).

Either no approval was given for the tool (and these arguments), or every approval given was
already used by an earlier call: each approval authorises one call.
"""

from __future__ import annotations

from detections.casekit import approval, bound, call, grant
from detections.engine import Decision
from detections.findings import Finding
from detections.rulebase import NoState, RuleContext, RuleMeta, negative, per_call_rule, positive
from schemas import ToolCall

META = RuleMeta(
    id="approval_missing",
    version=1,
    title="Approval-gated tool called without an approval",
    severity="high",
    kind="per_call",
    runbook=(
        "Run approval_history: the call, its arguments and the approvals that were candidates (used or expired).",
        "Run delegation_timeline: did an earlier call use the approval (reuse), or was none ever asked for?",
        "Check that the gateway enforces the approval gate for this tool; block the tool for the agent until it does.",
        "Ask the principal whether they wanted this action; undo its effects if not.",
    ),
    owasp=("ASI03", "ASI09"),
    atlas=("AML.T0053",),
)


def evaluate(call: ToolCall, decision: Decision, ctx: RuleContext[NoState]) -> list[Finding]:
    """Fires on verdict approval_missing."""
    return ctx.on_verdict(
        call,
        decision,
        "approval_missing",
        summary=f"{call.server}/{call.tool} needs a human approval under grant {decision.matched_grant_id} "
        "and none authorised it",
        key=(decision.matched_grant_id or "-", f"{call.server}/{call.tool}"),
        query="approval_history",
    )


GATED = (bound("09:00:00"), grant("09:00:00", tools=("fs/*",), approval_tools=("fs/write_*",)))

RULE = per_call_rule(
    META,
    evaluate,
    [
        positive("never approved", *GATED, call("10:00:00", "c1", "fs/write_file"), fires_on=["c1"]),
        positive(
            "approved once, called twice",
            *GATED,
            approval("09:30:00", "a1"),
            call("10:00:00", "c1", "fs/write_file"),
            call("10:00:05", "c2", "fs/write_file"),
            fires_on=["c2"],
        ),
        positive(
            "approval expired",
            *GATED,
            approval("09:30:00", "a1", expires="10:00:00"),
            call("10:00:00", "c1", "fs/write_file"),
            fires_on=["c1"],
        ),
        negative("approved", *GATED, approval("09:30:00", "a1"), call("10:00:00", "c1", "fs/write_file")),
        negative("a tool needing no approval", *GATED, call("10:00:00", "c1", "fs/read_file")),
    ],
    verdicts=("approval_missing",),
)
