"""exfiltration_chain: a sensitive read followed by an external send within a window.

Which calls count as sensitive reads and external sends is configuration
(:attr:`DetectionConfig.sensitive_reads` / :attr:`DetectionConfig.external_sends`, globs over
``server/tool``). The rule fires on the send when at least one sensitive read of the same
delegation happened at most :attr:`DetectionConfig.exfiltration_window` before it (inclusive), and
lists those reads as evidence. Calls count whatever their verdict: scopewatch audits what agents
did, and a denied read may still have returned data when the gateway only observes.

State: the delegation's most recent sensitive reads, at most ``max_entries`` (a deque; the oldest
read is evicted first). Reads older than the window are never counted, so eviction only drops
reads that would have been evidence beside newer ones. Stored (:data:`CODEC`, version 1) as
``[1, [at_us, call_id, tool], ...]``, oldest read first.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from detections.casekit import bound, call, delegation, grant
from detections.engine import Decision, tool_name
from detections.findings import Finding
from detections.rulebase import (
    DetectionConfig,
    Rule,
    RuleContext,
    RuleMeta,
    StateCodec,
    from_micros,
    matches,
    micros,
    negative,
    positive,
    stored_text,
)
from schemas import ToolCall

META = RuleMeta(
    id="exfiltration_chain",
    version=1,
    title="Sensitive read followed by an external send",
    severity="critical",
    kind="sequence",
    runbook=(
        "Run delegation_timeline between first and last call time: what was read, what was sent, and where to.",
        "Run call_evidence for the send: compare its (redacted) arguments with the fingerprints of the read data.",
        "Suspend the agent's grants for this principal (revoke) while you investigate.",
        "Look for prompt injection in what the agent read just before the chain (documents, web pages, tool output).",
    ),
    owasp=("ASI02", "ASI01"),
    atlas=("AML.T0086", "AML.T0057"),
)


@dataclass(frozen=True)
class Read:
    at: datetime
    call_id: str
    tool: str


@dataclass
class RecentReads:
    reads: deque[Read]


def new_state(config: DetectionConfig) -> RecentReads:
    return RecentReads(deque(maxlen=config.max_entries))


def _dump(state: RecentReads) -> list[Any]:
    return [[micros(r.at), r.call_id, r.tool] for r in state.reads]


def _load(items: list[Any], config: DetectionConfig) -> RecentReads:
    state = new_state(config)
    state.reads.extend(Read(from_micros(at), stored_text(call_id), stored_text(tool)) for at, call_id, tool in items)
    return state


CODEC = StateCodec(1, _dump, _load)


def evaluate(call: ToolCall, decision: Decision, ctx: RuleContext[RecentReads]) -> list[Finding]:
    """Fires on an external send with a sensitive read of the delegation in the window before it."""
    t, name, config = call.event_time, tool_name(call), ctx.config
    findings: list[Finding] = []
    if matches(config.external_sends, name):
        start = t - config.exfiltration_window
        prior = [r for r in ctx.state.reads if start <= r.at <= t]
        if prior:
            first = min(r.at for r in prior)
            findings.append(
                ctx.finding(
                    call,
                    decision,
                    summary=f"{name} sent data out {(t - first).total_seconds():g} s after {len(prior)} sensitive "
                    f"read(s) ({', '.join(sorted({r.tool for r in prior}))})",
                    key=(name,),
                    query="delegation_timeline",
                    call_ids=[r.call_id for r in prior],
                    first_call_time=first,
                    details={"reads": len(prior), "window_s": config.exfiltration_window.total_seconds()},
                )
            )
    if matches(config.sensitive_reads, name):
        ctx.state.reads.append(Read(t, call.call_id, name))
    return findings


_FACTS = delegation(tools=("*",))
_SECRET = call("10:00:00", "read", "vault/get_secret")
_SEND = "web/fetch"
_OTHER_AGENT = (bound("09:00:00", session="s2", agent="agent-2"), grant("09:00:00", tools=("*",), agent="agent-2"))

RULE = Rule(
    META,
    evaluate,
    (
        positive("secret read then fetch", *_FACTS, _SECRET, call("10:05:00", "send", _SEND), fires_on=["send"]),
        positive("send at the window edge", *_FACTS, _SECRET, call("10:10:00", "send", _SEND), fires_on=["send"]),
        negative("send after the window", *_FACTS, _SECRET, call("10:10:00.001", "send", _SEND)),
        negative("send before the read", *_FACTS, call("09:59:00", "send", _SEND), _SECRET),
        negative(
            "read by another agent",
            *_FACTS,
            *_OTHER_AGENT,
            call("10:00:00", "read", "vault/get_secret", session="s2"),
            call("10:01:00", "send", _SEND),
        ),
    ),
    new_state,
    codec=CODEC,
)
