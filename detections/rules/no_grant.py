"""no_grant: the delegation had no grant issued at or before the call (verdict 5).

The agent acted for the principal before (or without) any consent.
"""

from __future__ import annotations

from detections.casekit import bound, call, delegation, grant
from detections.engine import Decision
from detections.findings import Finding
from detections.rulebase import NoState, RuleContext, RuleMeta, negative, per_call_rule, positive
from schemas import ToolCall

META = RuleMeta(
    id="no_grant",
    version=1,
    title="Tool call without any consent grant",
    severity="medium",
    kind="per_call",
    runbook=(
        "Run delegation_timeline: did a grant arrive later (consent after the act never authorises it)?",
        "Ask the principal whether they delegated anything to this agent.",
        "If not, block the agent for this principal at the gateway and review what the calls touched.",
    ),
    owasp=("ASI03", "ASI02"),
    atlas=("AML.T0053",),
)


def evaluate(call: ToolCall, decision: Decision, ctx: RuleContext[NoState]) -> list[Finding]:
    """Fires on verdict no_grant."""
    return ctx.on_verdict(
        call,
        decision,
        "no_grant",
        summary=(
            f"{decision.agent_id!r} called {call.server}/{call.tool} for {decision.principal!r} "
            "without any grant issued before the call"
        ),
        key=(),
        query="delegation_timeline",
    )


RULE = per_call_rule(
    META,
    evaluate,
    [
        positive("no grant at all", bound("09:00:00"), call("10:00:00", "c1"), fires_on=["c1"]),
        positive(
            "grant issued after the call", bound("09:00:00"), grant("10:00:01"), call("10:00:00", "c1"), fires_on=["c1"]
        ),
        negative("grant issued before the call", *delegation(), call("10:00:00", "c1")),
    ],
    verdicts=("no_grant",),
)
