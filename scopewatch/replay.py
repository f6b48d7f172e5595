"""``scopewatch replay``: the decision engine and the rule catalog over a file of canonical events.

Facts (session and consent events) are loaded first, whatever their position in the file, so the
input order does not matter. Every call is decided with all facts known, and the detector sees
the calls in (event_time, call_id) order, which orders each delegation's calls for the sequence
rules (see :func:`detections.catalog.judge`). One line is printed per ``tool_call``, in input order.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass, field

from detections.catalog import Detector, judge
from detections.engine import Decision
from detections.findings import Finding
from schemas import BaseEvent, Event, ToolCall
from scopewatch.jsonl import BadLine


@dataclass
class ReplayResult:
    lines: list[str] = field(default_factory=list)
    decisions: list[tuple[ToolCall, Decision]] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)
    """Every finding once (a repeated call event does not repeat its findings)."""
    bad: list[BadLine] = field(default_factory=list)


def replay(items: Iterable[tuple[int, Event | BadLine]], detector: Detector | None = None) -> ReplayResult:
    result = ReplayResult()
    events: list[BaseEvent] = []
    for _line_no, item in items:
        if isinstance(item, BadLine):
            result.bad.append(item)
        else:
            events.append(item)
    seen: set[str] = set()
    for judged in judge(events, detector):
        result.decisions.append((judged.call, judged.decision))
        result.findings.extend(f for f in judged.findings if f.finding_id not in seen)
        seen.update(f.finding_id for f in judged.findings)
        result.lines.append(replay_line(judged.call, judged.decision, judged.rule_ids))
    return result


def replay_line(call: ToolCall, decision: Decision, findings: list[str]) -> str:
    """The line DESIGN.md specifies: call_id, verdict, matched_grant_id, approval_id, sorted rule ids that fired."""
    return json.dumps(
        {
            "call_id": call.call_id,
            "verdict": decision.verdict,
            "matched_grant_id": decision.matched_grant_id,
            "approval_id": decision.approval_id if decision.verdict in ("in_scope", "approval_denied") else None,
            "findings": sorted(findings),
        }
    )
