"""tool_rug_pull: a tool's definition changed since the grant in force was issued.

``grant_issued`` carries no tool digest, so "the digest when the grant was issued" is read as:
the digest of the *first call to that server/tool by this delegation at or after the matched
grant version's issue time* (``GrantState.version.event_time``). The rule fires on an
``in_scope`` call whose ``tool_digest`` differs from that baseline; the first call after the issue
sets the baseline and never fires. Calls with no digest are ignored; calls of any verdict are
sightings (they show what the server listed). A re-issued grant (new version) re-baselines. The
rule needs the grant states (``ctx.grants``); without them it only records sightings.

State: per server/tool, the runs of equal consecutive digests ("epochs": digest, first and last
call time, first call id); at most :data:`MAX_EPOCHS` epochs per tool and ``max_entries`` tools
(least recently used evicted). When a tool has too many epochs the *second* oldest is dropped:
the first digest ever seen stays, as it is the baseline of long-lived grants; a grant issued while
a dropped epoch was current gets the next kept epoch as its baseline. The evidence names the first
call of the baseline's run, which may precede the grant. Stored (:data:`CODEC`, version 1) as
``[1, [tool, [[digest, first_us, last_us, first_call_id], ...]], ...]``, least recently used tool
first.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any, Final

from detections.casekit import bound, call, delegation, grant
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

MAX_EPOCHS: Final = 8

META = RuleMeta(
    id="tool_rug_pull",
    version=1,
    title="Tool definition changed since consent was granted",
    severity="high",
    kind="sequence",
    runbook=(
        "Run tool_digests for the tool: when did the digest change, and on which server version?",
        "Diff the tool's listed definition (description, input schema) before and after the change.",
        "If the new description carries instructions or widens the tool, pin or remove the server and "
        "revoke the grant.",
        "Ask the principal to re-consent against the new definition if the change is legitimate.",
    ),
    owasp=("ASI04",),
    atlas=("AML.T0110.000", "AML.T0010.005"),
)


@dataclass
class Epoch:
    digest: str
    first_seen: datetime
    last_seen: datetime
    first_call_id: str


@dataclass
class Digests:
    tools: Lru[str, list[Epoch]]


def new_state(config: DetectionConfig) -> Digests:
    return Digests(Lru(config.max_entries))


def _dump(state: Digests) -> list[Any]:
    return [
        [name, [[e.digest, micros(e.first_seen), micros(e.last_seen), e.first_call_id] for e in epochs]]
        for name, epochs in state.tools.items()
    ]


def _load(items: list[Any], config: DetectionConfig) -> Digests:
    state = new_state(config)
    for name, epochs in items:
        state.tools[stored_text(name)] = [
            Epoch(stored_text(digest), from_micros(first), from_micros(last), stored_text(call_id))
            for digest, first, last, call_id in epochs
        ]
    return state


CODEC = StateCodec(1, _dump, _load)


def _record(epochs: list[Epoch], digest: str, call: ToolCall) -> None:
    t = call.event_time
    if epochs and epochs[-1].digest == digest:
        epochs[-1].last_seen = max(epochs[-1].last_seen, t)
        return
    epochs.append(Epoch(digest, t, t, call.call_id))
    if len(epochs) > MAX_EPOCHS:
        del epochs[1]


def evaluate(call: ToolCall, decision: Decision, ctx: RuleContext[Digests]) -> list[Finding]:
    """Fires on an in-scope call whose tool digest differs from the first one seen since the grant's issue."""
    digest = call.tool_digest
    if digest is None:
        return []
    name = tool_name(call)
    tools = ctx.state.tools
    epochs = tools.get(name) or []
    findings: list[Finding] = []
    matched = ctx.grant(decision.matched_grant_id) if decision.verdict == "in_scope" else None
    if matched is not None:
        issued = matched.version.event_time
        baseline = None
        for epoch in epochs:  # the first epoch seen since the issue
            if epoch.last_seen >= issued:
                baseline = epoch
                break
        if baseline is not None and baseline.digest != digest:
            findings.append(
                ctx.finding(
                    call,
                    decision,
                    summary=f"{name} now has digest {digest}, not {baseline.digest} as when grant "
                    f"{matched.grant_id} was issued",
                    key=(name, digest),
                    query="tool_digests",
                    call_ids=[baseline.first_call_id],
                    grant_id=matched.grant_id,
                    first_call_time=baseline.first_seen,
                    details={"expected_digest": baseline.digest, "digest": digest},
                )
            )
    _record(epochs, digest, call)
    tools[name] = epochs
    return findings


def _use(hms: str, call_id: str, digest: str) -> ToolCall:
    return call(hms, call_id, "fs/read_file", digest=digest)


RULE = Rule(
    META,
    evaluate,
    (
        positive(
            "digest changes under the same grant",
            *delegation(),
            _use("10:00:00", "c1", "sha256:a"),
            _use("10:05:00", "c2", "sha256:b"),
            fires_on=["c2"],
        ),
        positive(
            "changed before the call, after the issue",
            *delegation(),
            _use("09:30:00", "c1", "sha256:a"),
            _use("10:00:00", "c2", "sha256:b"),
            _use("10:05:00", "c3", "sha256:b"),
            fires_on=["c2", "c3"],
        ),
        negative(
            "stable digest", *delegation(), _use("10:00:00", "c1", "sha256:a"), _use("10:05:00", "c2", "sha256:a")
        ),
        negative(
            "re-consent after the change",
            *delegation(),
            _use("10:00:00", "c1", "sha256:a"),
            grant("10:01:00"),
            _use("10:05:00", "c2", "sha256:b"),
        ),
        negative(
            "change seen by an out-of-scope call only",
            bound("09:00:00"),
            grant("09:00:00", tools=("web/*",)),
            _use("10:00:00", "c1", "sha256:a"),
            _use("10:05:00", "c2", "sha256:b"),
        ),
    ),
    new_state,
    codec=CODEC,
)
