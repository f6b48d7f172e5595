"""out_of_scope_tool: no grant of the delegation names the called tool (verdict 9)."""

from __future__ import annotations

from detections.casekit import call, delegation
from detections.engine import Decision
from detections.findings import Finding
from detections.rulebase import NoState, RuleContext, RuleMeta, negative, per_call_rule, positive
from schemas import ToolCall

META = RuleMeta(
    id="out_of_scope_tool",
    version=1,
    title="Tool call outside every grant's tools",
    severity="medium",
    kind="per_call",
    runbook=(
        "Run call_evidence for the call: which tool, which arguments (redacted), what result?",
        "Run grant_history for the delegation's grants: which tools did the principal delegate?",
        "If the agent needs the tool, ask the principal for consent; otherwise look for prompt injection "
        "in its inputs.",
    ),
    owasp=("ASI02", "ASI03"),
    atlas=("AML.T0053",),
)


def evaluate(call: ToolCall, decision: Decision, ctx: RuleContext[NoState]) -> list[Finding]:
    """Fires on verdict out_of_scope_tool."""
    return ctx.on_verdict(
        call,
        decision,
        "out_of_scope_tool",
        summary=f"{decision.agent_id!r} called {call.server}/{call.tool}, which no grant of {decision.principal!r} "
        "names",
        key=(f"{call.server}/{call.tool}",),
        query="call_evidence",
    )


RULE = per_call_rule(
    META,
    evaluate,
    [
        positive("tool on another server", *delegation(), call("10:00:00", "c1", "db/drop_table"), fires_on=["c1"]),
        negative("granted tool", *delegation(), call("10:00:00", "c1", "fs/read_file")),
    ],
    verdicts=("out_of_scope_tool",),
)
