"""violation_burst: ``burst_threshold`` violating calls of one delegation within ``burst_window``.

A violating call is any call whose verdict is not ``in_scope``. The rule fires on the call that
completes a burst: the ``burst_threshold``-th violation with all of the last ``burst_threshold``
violations inside ``[t - burst_window, t]`` (both ends inclusive). It then starts counting afresh,
so a sustained storm raises one finding per ``burst_threshold`` violations, all under one dedup key.

State: the last ``burst_threshold`` violations (a deque of that length); nothing older can
complete a burst, so the state is bounded by the threshold itself. Stored (:data:`CODEC`,
version 1) as ``[1, [at_us, call_id, verdict], ...]``, oldest first.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from detections.casekit import call, delegation
from detections.engine import VERDICTS, Decision
from detections.findings import Finding
from detections.rulebase import (
    DetectionConfig,
    Rule,
    RuleContext,
    RuleMeta,
    StateCodec,
    from_micros,
    micros,
    negative,
    positive,
    stored_text,
)
from schemas import ToolCall

META = RuleMeta(
    id="violation_burst",
    version=1,
    title="Burst of violating tool calls",
    severity="high",
    kind="sequence",
    runbook=(
        "Run delegation_timeline over the burst: which verdicts, tools and resources?",
        "Many different tools or paths in seconds means probing (an injected or rogue agent); one tool "
        "repeated means a retry loop after consent changed.",
        "Stop the agent (revoke its grants or end its sessions) until its inputs have been reviewed.",
    ),
    owasp=("ASI10", "ASI02"),
    atlas=("AML.T0053", "AML.T0084.001"),
)


@dataclass(frozen=True)
class Violation:
    at: datetime
    call_id: str
    verdict: str


@dataclass
class RecentViolations:
    recent: deque[Violation]


def new_state(config: DetectionConfig) -> RecentViolations:
    return RecentViolations(deque(maxlen=config.burst_threshold))


def _dump(state: RecentViolations) -> list[Any]:
    return [[micros(v.at), v.call_id, v.verdict] for v in state.recent]


def _load(items: list[Any], config: DetectionConfig) -> RecentViolations:
    state = new_state(config)
    state.recent.extend(Violation(from_micros(at), stored_text(cid), stored_text(v)) for at, cid, v in items)
    return state


CODEC = StateCodec(1, _dump, _load)


def evaluate(call: ToolCall, decision: Decision, ctx: RuleContext[RecentViolations]) -> list[Finding]:
    """Fires on the violation that completes a burst."""
    if decision.verdict == "in_scope":
        return []
    t, config, recent = call.event_time, ctx.config, ctx.state.recent
    recent.append(Violation(t, call.call_id, decision.verdict))
    earliest = min(v.at for v in recent)
    if len(recent) < config.burst_threshold or t - earliest > config.burst_window:
        return []
    burst = list(recent)
    recent.clear()
    verdicts = sorted({v.verdict for v in burst})
    return [
        ctx.finding(
            call,
            decision,
            summary=f"{len(burst)} violating calls in {(t - earliest).total_seconds():g} s ({', '.join(verdicts)})",
            key=(),
            query="delegation_timeline",
            call_ids=[v.call_id for v in burst[:-1]],
            first_call_time=earliest,
            details={"violations": len(burst), "window_s": config.burst_window.total_seconds()},
        )
    ]


def _tries(*times: str) -> tuple[ToolCall, ...]:
    """Out-of-scope calls at the given times, ids v1, v2, ..."""
    return tuple(call(hms, f"v{n}", "db/drop_table") for n, hms in enumerate(times, start=1))


RULE = Rule(
    META,
    evaluate,
    (
        positive(
            "five denials in a minute",
            *delegation(),
            *_tries("10:00:00", "10:00:10", "10:00:20", "10:00:30", "10:01:00"),
            fires_on=["v5"],
        ),
        positive(
            "ten denials are two bursts",
            *delegation(),
            *_tries(*(f"10:00:{s:02d}" for s in range(10))),
            fires_on=["v5", "v10"],
        ),
        negative(
            "five denials spread over more than a minute",
            *delegation(),
            *_tries("10:00:00", "10:00:10", "10:00:20", "10:00:30", "10:01:00.001"),
        ),
        negative(
            "four denials and in-scope calls",
            *delegation(),
            *_tries("10:00:00", "10:00:01", "10:00:02", "10:00:03"),
            call("10:00:04", "ok1"),
            call("10:00:05", "ok2"),
        ),
    ),
    new_state,
    frozenset(VERDICTS) - {"in_scope"},  # evaluate returns at once on in_scope calls
    codec=CODEC,
)
