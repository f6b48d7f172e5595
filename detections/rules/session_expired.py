"""session_expired: the session was bound but is not valid at the call (verdict 3).

Its binding expired (``valid_until``), is not valid yet, or the session was ended.
"""

from __future__ import annotations

from detections.casekit import bound, call, ended, grant
from detections.engine import Decision
from detections.findings import Finding
from detections.rulebase import NoState, RuleContext, RuleMeta, negative, per_call_rule, positive
from schemas import ToolCall

META = RuleMeta(
    id="session_expired",
    version=1,
    title="Tool call on an expired or ended session",
    severity="low",
    kind="per_call",
    runbook=(
        "Run session_timeline: when did the binding expire or the session end, and who ended it?",
        "Check whether the client keeps stale sessions alive (a bug) or the session was ended on purpose.",
        "If the session was ended by security, treat further calls as an intrusion and block the agent.",
    ),
    owasp=("ASI03",),
    atlas=("AML.T0091.000",),
)


def evaluate(call: ToolCall, decision: Decision, ctx: RuleContext[NoState]) -> list[Finding]:
    """Fires on verdict session_expired."""
    return ctx.on_verdict(
        call,
        decision,
        "session_expired",
        summary=f"{call.server}/{call.tool} called on session {call.session_id!r}, which is no longer valid",
        key=(call.session_id,),
        query="session_timeline",
    )


_CALL = call("10:00:00", "c1")

RULE = per_call_rule(
    META,
    evaluate,
    [
        positive("after valid_until", bound("09:00:00", until="09:30:00"), grant("09:00:00"), _CALL, fires_on=["c1"]),
        positive(
            "after session_ended", bound("09:00:00"), grant("09:00:00"), ended("09:45:00"), _CALL, fires_on=["c1"]
        ),
        negative("within the binding", bound("09:00:00", until="10:30:00"), grant("09:00:00"), _CALL),
    ],
    verdicts=("session_expired",),
)
