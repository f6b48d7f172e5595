"""out_of_policy: the grant covers the call but its Cedar policies do not permit it (verdict 8).

The finding names the policy versions used and the policies that decided (``@id`` annotations
``<policy_id>@<version>#<n>``), or why none could (a policy missing or unparseable: fail closed).
"""

from __future__ import annotations

from detections.casekit import bound, call, grant, policy
from detections.engine import Decision
from detections.findings import Finding
from detections.rulebase import NoState, RuleContext, RuleMeta, headline, negative, per_call_rule, positive
from schemas import ToolCall

META = RuleMeta(
    id="out_of_policy",
    version=1,
    title="Tool call outside the grant's Cedar policies",
    severity="high",
    kind="per_call",
    runbook=(
        "Run policy_decisions: the policy versions used, Cedar's decision, the deciding policies and any errors.",
        "Run grant_history: which policies the grant names, and when each version was published.",
        "If the policy is right, block the call at the gateway's policy point; if not, fix and publish the policy.",
        "Check Cedar errors in the evidence: an erroring policy is skipped, a missing one permits nothing.",
    ),
    owasp=("ASI03", "ASI02"),
    atlas=("AML.T0053",),
)


def evaluate(call: ToolCall, decision: Decision, ctx: RuleContext[NoState]) -> list[Finding]:
    """Fires on verdict out_of_policy, naming the policy and version that denied."""
    if decision.verdict != "out_of_policy":
        return []
    outcome = decision.policy
    versions = list(outcome.versions) if outcome is not None else []
    deciding = list(outcome.determining) if outcome is not None else []
    errors = list(outcome.errors) if outcome is not None else []
    if deciding:
        why = f"denied by {', '.join(deciding)}"
    elif outcome is not None and outcome.decision == "Deny":
        why = f"no policy of {', '.join(versions) or 'the grant'} permits it"
    else:
        why = "fail closed: " + ("; ".join(errors) or "policies not evaluated")
    return [
        ctx.finding(
            call,
            decision,
            summary=f"{call.server}/{call.tool} is outside the policies of grant {decision.matched_grant_id}: {why}",
            key=(decision.matched_grant_id or "-", *(deciding or versions)),
            query="policy_decisions",
            grant_id=decision.matched_grant_id,
            details={
                "verdict": "out_of_policy",
                "reason": headline(decision),
                "policy_versions": ", ".join(versions),
                "denied_by": ", ".join(deciding),
                "cedar_decision": (outcome.decision if outcome is not None else None) or "",
                "errors": "; ".join(errors),
            },
        )
    ]


FORBID_RESTRICTED = (
    'permit(principal, action == Action::"call", resource);\n'
    'forbid(principal, action, resource) when { context.labels.contains("restricted") };'
)
GOVERNED = (
    bound("09:00:00"),
    grant("09:00:00", tools=("db/*",), policies=("data-policy",)),
    policy("08:00:00", FORBID_RESTRICTED, "data-policy", "c0ffee", {"restricted": ["db:prod/*"]}),
)

RULE = per_call_rule(
    META,
    evaluate,
    [
        positive(
            "restricted resource", *GOVERNED, call("10:00:00", "c1", "db/query", ("db:prod/users",)), fires_on=["c1"]
        ),
        positive(
            "policy published after the call (fail closed)",
            bound("09:00:00"),
            grant("09:00:00", tools=("db/*",), policies=("data-policy",)),
            policy("10:00:01", FORBID_RESTRICTED, "data-policy", "c0ffee"),
            call("10:00:00", "c1", "db/query"),
            fires_on=["c1"],
        ),
        negative("unrestricted resource", *GOVERNED, call("10:00:00", "c1", "db/query", ("db:dev/users",))),
    ],
    verdicts=("out_of_policy",),
)
