"""identity_mismatch: the attested identity differs from the session binding (verdict 2).

The collector verified a token whose subject or client differs from the principal and agent the
session was bound to: a stolen, replayed or mixed-up credential.
"""

from __future__ import annotations

from detections.casekit import call, delegation
from detections.engine import Decision
from detections.findings import Finding
from detections.rulebase import NoState, RuleContext, RuleMeta, negative, per_call_rule, positive
from schemas import ToolCall

META = RuleMeta(
    id="identity_mismatch",
    version=1,
    title="Attested identity differs from the session binding",
    severity="high",
    kind="per_call",
    runbook=(
        "Compare the attested sub/client_id in call_evidence with the binding in session_timeline.",
        "Find the token (attested jti/iss) at the identity provider; revoke it if it was not issued to this agent.",
        "Run delegation_timeline for the bound principal to see what else the session did.",
        "Page the identity team if the token belongs to another principal (credential theft or session fixation).",
    ),
    owasp=("ASI03", "ASI07"),
    atlas=("AML.T0091.000", "AML.T0012"),
)


def evaluate(call: ToolCall, decision: Decision, ctx: RuleContext[NoState]) -> list[Finding]:
    """Fires on verdict identity_mismatch."""
    return ctx.on_verdict(
        call,
        decision,
        "identity_mismatch",
        summary=(
            f"call {call.call_id} on session {call.session_id!r} presented attested identity {call.attested!r}, "
            f"but the session is bound to {decision.principal!r}/{decision.agent_id!r}"
        ),
        key=(call.session_id,),
        query="session_timeline",
    )


RULE = per_call_rule(
    META,
    evaluate,
    [
        positive(
            "another subject", *delegation(), call("10:00:00", "c1", attested={"sub": "mallory"}), fires_on=["c1"]
        ),
        positive(
            "another client", *delegation(), call("10:00:00", "c1", attested={"client_id": "evil"}), fires_on=["c1"]
        ),
        negative(
            "matching attestation",
            *delegation(),
            call("10:00:00", "c1", attested={"sub": "alice", "client_id": "agent-1"}),
        ),
    ],
    verdicts=("identity_mismatch",),
)
