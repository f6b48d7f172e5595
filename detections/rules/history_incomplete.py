"""history_incomplete: the call was judged on history compacted past it (DESIGN "Retention").

The live pipeline compacts identity and consent history older than its retention
(``SCOPEWATCH_RETENTION_DAYS``). A call whose event_time is older than the compaction horizon of a
history it was judged on (its session's, its delegation's grants or approvals) may get a verdict
that differs from replay's over all facts. It is never judged silently: its evidence says
``history_complete: false`` and this rule raises a finding so the SOC re-judges it.
"""

from __future__ import annotations

from detections.casekit import at, bound, call, grant
from detections.engine import Decision
from detections.findings import Finding
from detections.rulebase import NoState, RuleContext, RuleMeta, headline, negative, per_call_rule, positive
from schemas import ToolCall

META = RuleMeta(
    id="history_incomplete",
    version=1,
    title="Call judged on history compacted past it (verdict may differ from replay)",
    severity="medium",
    kind="per_call",
    runbook=(
        "Re-judge the call over the raw events: `scopewatch replay` on an export of its session's and "
        "delegation's events, or `scopewatch verify`, which re-derives verdicts from the raw tables.",
        "Run call_evidence: compare the live verdict with the re-judged one; if they differ, treat the "
        "re-judged verdict as the truth and follow that verdict's runbook.",
        "Find why the call arrived after the retention window (a collector backlog, a replayed spool) "
        "and raise SCOPEWATCH_RETENTION_DAYS if such delays are normal.",
    ),
    owasp=("ASI03",),
    atlas=("AML.T0053",),
)


def evaluate(call: ToolCall, decision: Decision, ctx: RuleContext[NoState]) -> list[Finding]:
    """Fires on any verdict judged on incomplete history."""
    if decision.facts.get("history_complete") is not False:
        return []
    which = decision.facts.get("history_incomplete")
    histories = ", ".join(map(str, which)) if isinstance(which, list) else "some"
    return [
        ctx.finding(
            call,
            decision,
            summary=f"{call.server}/{call.tool} was judged {decision.verdict} on compacted {histories} history "
            "older than the retention: re-judge it with scopewatch replay or verify",
            key=(call.call_id,),
            query="call_evidence",
            grant_id=decision.matched_grant_id,
            details={"verdict": decision.verdict, "histories": histories, "reason": headline(decision)},
        )
    ]


# The grant's first version allowed fs/*; it was re-issued for web/* only. Compacting at 12:00 keeps
# only the 11:00 version, so the 10:00 call is judged out_of_scope_tool although replay says in_scope.
REISSUED = (
    bound("09:00:00"),
    grant("09:00:00", tools=("fs/*",)),
    grant("11:00:00", tools=("web/*",)),
)

RULE = per_call_rule(
    META,
    evaluate,
    [
        positive(
            "a call older than the grants' compaction horizon",
            *REISSUED,
            call("10:00:00", "c1", "fs/read_file"),
            fires_on=["c1"],
            compact_before=at("12:00:00"),
        ),
        negative("nothing compacted", *REISSUED, call("10:00:00", "c1", "fs/read_file")),
        negative(
            "a call after the horizon",
            *REISSUED,
            call("12:30:00", "c2", "web/get"),
            compact_before=at("12:00:00"),
        ),
    ],
)
