"""``scopewatch replay``: the decision engine over a file of canonical events, all facts known.

Facts (session and consent events) are loaded first, whatever their position in the file, so the
input order does not matter; then one line is printed per ``tool_call``, in input order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from detections.engine import Decision, DecisionEngine
from schemas import Event, ToolCall
from scopewatch.jsonl import BadLine


@dataclass
class ReplayResult:
    lines: list[str] = field(default_factory=list)
    decisions: list[tuple[ToolCall, Decision]] = field(default_factory=list)
    bad: list[BadLine] = field(default_factory=list)


def replay(items: Iterable[tuple[int, Event | BadLine]]) -> ReplayResult:
    result = ReplayResult()
    engine = DecisionEngine()
    calls: list[ToolCall] = []
    for _line_no, item in items:
        if isinstance(item, BadLine):
            result.bad.append(item)
        elif isinstance(item, ToolCall):
            calls.append(item)
        elif item.event_type != "tool_result":
            engine.add_fact(item)
    for call in calls:
        decision = engine.decide(call)
        result.decisions.append((call, decision))
        result.lines.append(replay_line(call, decision, findings=[]))
    return result


def replay_line(call: ToolCall, decision: Decision, findings: list[str]) -> str:
    """The line DESIGN.md specifies: call_id, verdict, matched_grant_id, sorted rule ids that fired."""
    return json.dumps(
        {
            "call_id": call.call_id,
            "verdict": decision.verdict,
            "matched_grant_id": decision.matched_grant_id,
            "findings": sorted(findings),
        }
    )
