"""out_of_scope_resource: a grant names the tool, but a call resource is outside it (verdict 10)."""

from __future__ import annotations

from detections.casekit import bound, call, grant
from detections.engine import Decision
from detections.findings import Finding
from detections.rulebase import NoState, RuleContext, RuleMeta, negative, per_call_rule, positive
from schemas import ToolCall

META = RuleMeta(
    id="out_of_scope_resource",
    version=1,
    title="Tool call on a resource outside the grant",
    severity="medium",
    kind="per_call",
    runbook=(
        "Run call_evidence for the call: which resources did it name?",
        "Run grant_history: which resource patterns did the principal delegate?",
        "A path outside the project (e.g. /etc, ~/.ssh) suggests injection or traversal: review the agent's inputs.",
    ),
    owasp=("ASI02", "ASI03"),
    atlas=("AML.T0053",),
)


def evaluate(call: ToolCall, decision: Decision, ctx: RuleContext[NoState]) -> list[Finding]:
    """Fires on verdict out_of_scope_resource."""
    return ctx.on_verdict(
        call,
        decision,
        "out_of_scope_resource",
        summary=f"{call.server}/{call.tool} called on {', '.join(call.resources)}, outside the granted resources",
        key=(f"{call.server}/{call.tool}",),
        query="call_evidence",
    )


_FACTS = (bound("09:00:00"), grant("09:00:00", tools=("fs/read_*",), resources=("file:/data/*",)))

RULE = per_call_rule(
    META,
    evaluate,
    [
        positive("system file", *_FACTS, call("10:00:00", "c1", resources=("file:/etc/shadow",)), fires_on=["c1"]),
        positive(
            "one resource of two outside",
            *_FACTS,
            call("10:00:00", "c1", resources=("file:/data/a", "file:/home/b")),
            fires_on=["c1"],
        ),
        negative("granted resource", *_FACTS, call("10:00:00", "c1", resources=("file:/data/a.txt",))),
    ],
    verdicts=("out_of_scope_resource",),
)
