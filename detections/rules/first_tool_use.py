"""first_tool_use: a delegation calls a ``server/tool`` it never called before, after a learning period.

The first call of a delegation opens a learning period of ``first_use_learning`` during which
every tool it calls is learnt silently. A call after it (strictly later than first call +
learning) to a tool not learnt raises an ``info`` finding: a new capability in use, worth a look on
the dashboard, not a page. Calls count whatever their verdict. "By an agent" is read per
delegation (tenant, principal, agent_id): sequence state is kept per delegation.

State: the learning start and the tools seen (server/tool -> last call time), at most
``max_entries`` tools, least recently used evicted first. A tool evicted and then used again is
reported again (once). Stored (:data:`CODEC`, version 1) as ``[1, since_us, [[tool, last_us],
...]]``, least recently used tool first (so the eviction order survives).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from detections.casekit import call, delegation
from detections.engine import Decision, tool_name
from detections.findings import Finding
from detections.rulebase import (
    DetectionConfig,
    Lru,
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
    id="first_tool_use",
    version=1,
    title="Agent uses a tool for the first time",
    severity="info",
    kind="sequence",
    runbook=(
        "Run tool_digests for the tool: when did the agent start using it, and what does it do?",
        "Check that the principal expects the agent to use this tool for the grant's purpose.",
        "If it is unexpected, review the agent's recent inputs for injected instructions.",
    ),
    owasp=("ASI10", "ASI02"),
    atlas=("AML.T0053",),
)


@dataclass
class ToolsSeen:
    tools: Lru[str, datetime]
    since: datetime | None = field(default=None)


def new_state(config: DetectionConfig) -> ToolsSeen:
    return ToolsSeen(Lru(config.max_entries))


def _dump(state: ToolsSeen) -> list[Any]:
    since = None if state.since is None else micros(state.since)
    return [since, [[name, micros(at)] for name, at in state.tools.items()]]


def _load(items: list[Any], config: DetectionConfig) -> ToolsSeen:
    since, tools = items
    state = new_state(config)
    state.since = None if since is None else from_micros(since)
    for name, at in tools:
        state.tools[stored_text(name)] = from_micros(at)
    return state


CODEC = StateCodec(1, _dump, _load)


def evaluate(call: ToolCall, decision: Decision, ctx: RuleContext[ToolsSeen]) -> list[Finding]:
    """Fires on the first call to a tool after the delegation's learning period."""
    t, name, state = call.event_time, tool_name(call), ctx.state
    state.since = t if state.since is None else min(state.since, t)
    known = name in state.tools
    state.tools[name] = max(t, state.tools.get(name, t))
    if known or t - state.since <= ctx.config.first_use_learning:
        return []
    return [
        ctx.finding(
            call,
            decision,
            summary=f"{decision.agent_id or call.session_id!r} called {name} for the first time",
            key=(name,),
            query="tool_digests",
            details={"tools_known": len(state.tools) - 1},
        )
    ]


RULE = Rule(
    META,
    evaluate,
    (
        positive(
            "new tool after the learning hour",
            *delegation(),
            call("09:00:00", "c1"),
            call("10:00:00.001", "c2", "fs/write_file"),
            fires_on=["c2"],
        ),
        negative(
            "new tool inside the learning hour",
            *delegation(),
            call("09:00:00", "c1"),
            call("10:00:00", "c2", "fs/write_file"),
        ),
        negative("known tool after the learning hour", *delegation(), call("09:00:00", "c1"), call("11:00:00", "c2")),
    ),
    new_state,
    codec=CODEC,
)
