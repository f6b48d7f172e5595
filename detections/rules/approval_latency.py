"""approval_latency: an approval used long after it was given.

A human approval authorises one call; one used long after it was given was most likely given for
another situation than the one the agent acted in (a stale approval parked for later, or an
agent saving approvals up). The rule measures, on every ``in_scope`` call authorised by an
approval, the time from the approval's ``event_time`` to the call's, and fires when that exceeds
``approval_max_age`` (strictly).

State: per tool (``server/tool``), the approvals used, how many were late and the longest latency;
at most ``max_entries`` tools, least recently used evicted. Stored (:data:`CODEC`, version 1) as
``[1, [tool, uses, late, max_latency_us], ...]``, least recently used first.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from detections.casekit import approval, bound, call, grant
from detections.engine import Decision
from detections.findings import Finding
from detections.rulebase import (
    DetectionConfig,
    Lru,
    Rule,
    RuleContext,
    RuleMeta,
    StateCodec,
    negative,
    positive,
    stored_int,
    stored_text,
)
from schemas import ToolCall, parse_timestamp

META = RuleMeta(
    id="approval_latency",
    version=1,
    title="Approval used long after it was given",
    severity="medium",
    kind="sequence",
    runbook=(
        "Run approval_history: the approval (who, when, for which arguments) and the call that used it.",
        "Ask the approver whether the approval was meant for this call, this late.",
        "Set an expiry on approvals for this tool (expires_at) so that stale ones cannot be used.",
    ),
    owasp=("ASI09", "ASI03"),
    atlas=("AML.T0053",),
)


@dataclass
class ToolLatency:
    uses: int = 0
    late: int = 0
    max_latency_us: int = 0


@dataclass
class Latencies:
    by_tool: Lru[str, ToolLatency]


def new_state(config: DetectionConfig) -> Latencies:
    return Latencies(Lru(config.max_entries))


def _dump(state: Latencies) -> list[Any]:
    return [[tool, s.uses, s.late, s.max_latency_us] for tool, s in state.by_tool.items()]


def _load(items: list[Any], config: DetectionConfig) -> Latencies:
    state = new_state(config)
    for tool, uses, late, longest in items:
        state.by_tool[stored_text(tool)] = ToolLatency(stored_int(uses), stored_int(late), stored_int(longest))
    return state


CODEC = StateCodec(1, _dump, _load)


def evaluate(call: ToolCall, decision: Decision, ctx: RuleContext[Latencies]) -> list[Finding]:
    """Fires on an approval used more than ``approval_max_age`` after it was given."""
    if decision.verdict != "in_scope" or decision.approval_id is None:
        return []
    facts = decision.facts.get("approval")
    given = facts.get("decided_at") if isinstance(facts, dict) else None
    if not isinstance(given, str):
        return []
    latency = call.event_time - parse_timestamp(given)
    tool = f"{call.server}/{call.tool}"
    stats = ctx.state.by_tool.get(tool) or ToolLatency()
    stats.uses += 1
    micros = latency // timedelta(microseconds=1)
    stats.max_latency_us = max(stats.max_latency_us, micros)
    late = latency > ctx.config.approval_max_age
    if late:
        stats.late += 1
    ctx.state.by_tool[tool] = stats
    if not late:
        return []
    seconds = latency.total_seconds()
    return [
        ctx.finding(
            call,
            decision,
            summary=f"approval {decision.approval_id} by {decision.approver} used {seconds:g} s after it was given "
            f"({stats.late} of {stats.uses} approval(s) for {tool} used late)",
            key=(decision.approval_id,),
            query="approval_history",
            grant_id=decision.matched_grant_id,
            details={
                "approval_id": decision.approval_id,
                "approver": decision.approver,
                "seconds_from_approval_to_use": seconds,
                "approved_at": given,
                "late_uses_of_tool": stats.late,
                "approved_uses_of_tool": stats.uses,
            },
        )
    ]


GATED = (bound("08:00:00"), grant("08:00:00", tools=("fs/*",), approval_tools=("fs/write_*",)))

RULE = Rule(
    META,
    evaluate,
    (
        positive(
            "used two hours later",
            *GATED,
            approval("08:00:00", "a1"),
            call("10:00:00", "c1", "fs/write_file"),
            fires_on=["c1"],
        ),
        positive(
            "just past the limit",
            *GATED,
            approval("08:00:00", "a1"),
            approval("09:00:00", "a2"),
            call("09:00:00.001", "c1", "fs/write_file"),
            call("09:00:00.002", "c2", "fs/write_file"),
            fires_on=["c1"],  # c1 takes the earliest-issued a1 (1 h 1 ms old); c2 takes a2 (2 ms old)
        ),
        negative("used at once", *GATED, approval("09:59:00", "a1"), call("10:00:00", "c1", "fs/write_file")),
        negative("exactly the limit", *GATED, approval("09:00:00", "a1"), call("10:00:00", "c1", "fs/write_file")),
    ),
    new_state,
    frozenset({"in_scope"}),  # evaluate returns at once on other verdicts
    codec=CODEC,
)
