"""Walking-skeleton verdict: every call is recorded as ``unevaluated``.

The delegated-authority decision engine (issue 3) replaces this; it is kept pure like the
real engine will be, so the stream job's adapter code does not change shape.
"""

from __future__ import annotations

from datetime import datetime

from schemas import Evidence, ToolCall

UNEVALUATED = "unevaluated"


def placeholder_evidence(call: ToolCall, decided_at: datetime, evidence_id: str) -> Evidence:
    """The first (and, for now, only) evidence version of a call."""
    return Evidence(
        evidence_id=evidence_id,
        call_id=call.call_id,
        tenant=call.tenant,
        session_id=call.session_id,
        principal=None,
        agent_id=None,
        server=call.server,
        tool=call.tool,
        call_time=call.event_time,
        verdict=UNEVALUATED,
        matched_grant_id=None,
        reasons=["the decision engine is not part of the walking skeleton yet"],
        version=1,
        final=False,
        late=False,
        decided_at=decided_at,
        facts={},
    )
