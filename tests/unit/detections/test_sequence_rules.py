"""Sequence rules: window edges, configuration, bounded state, stable finding ids."""

from __future__ import annotations

from datetime import timedelta

import pytest

from detections.casekit import bound, call, delegation, grant, revoke
from detections.catalog import Detector, Judged, default_catalog, judge
from detections.findings import MAX_DEDUP_KEY, dedup_key
from detections.rulebase import DetectionConfig
from detections.rules.tool_rug_pull import MAX_EPOCHS
from schemas import BaseEvent

ALICE = ("acme", "alice", "agent-1")


def run(rule_id: str, *events: BaseEvent, **config: object) -> tuple[list[Judged], Detector]:
    detector = Detector([default_catalog().get(rule_id)], DetectionConfig.model_validate(config))
    return judge(events, detector), detector


def fired(judged: list[Judged]) -> list[str]:
    return [j.call.call_id for j in judged if j.findings]


# ----------------------------------------------------------------------- exfiltration


@pytest.mark.parametrize(("send_at", "fires"), [("10:00:30", True), ("10:00:30.001", False), ("10:00:00", True)])
def test_exfiltration_window_is_inclusive(send_at: str, fires: bool) -> None:
    judged, _ = run(
        "exfiltration_chain",
        *delegation(tools=("*",)),
        call("10:00:00", "read", "fs/read_file"),
        call(send_at, "send", "mail/send_email"),
        exfiltration_window=timedelta(seconds=30),
    )
    assert fired(judged) == (["send"] if fires else [])


def test_which_tools_are_reads_and_sends_is_configuration() -> None:
    events = (*delegation(tools=("*",)), call("10:00:00", "r", "crm/list_customers"), call("10:01:00", "s", "ftp/put"))
    assert fired(run("exfiltration_chain", *events)[0]) == []
    judged, _ = run("exfiltration_chain", *events, sensitive_reads=("crm/*",), external_sends=("ftp/put",))
    assert fired(judged) == ["s"]
    (finding,) = judged[-1].findings
    assert finding.evidence.call_ids == ("r", "s") and finding.evidence.query == "delegation_timeline"
    assert finding.first_call_time < finding.last_call_time


def test_exfiltration_state_keeps_at_most_max_entries_reads() -> None:
    reads = [call(f"10:00:{s:02d}", f"r{s}", "fs/read_file") for s in range(40)]
    judged, detector = run(
        "exfiltration_chain", *delegation(tools=("*",)), *reads, call("10:01:00", "send", "web/fetch"), max_entries=8
    )
    assert len(detector.state_of(ALICE, "exfiltration_chain").reads) == 8
    (finding,) = judged[-1].findings
    assert finding.evidence.call_ids == (*(f"r{s}" for s in range(32, 40)), "send")


# ---------------------------------------------------------------------------- burst


def denied(*times: str) -> list[BaseEvent]:
    return [call(hms, f"d{n}", "db/drop") for n, hms in enumerate(times, start=1)]


@pytest.mark.parametrize(("third", "fires"), [("10:00:10", True), ("10:00:10.001", False)])
def test_burst_window_edge(third: str, fires: bool) -> None:
    judged, _ = run(
        "violation_burst",
        *delegation(),
        *denied("10:00:00", "10:00:05", third),
        burst_threshold=3,
        burst_window=timedelta(seconds=10),
    )
    assert fired(judged) == (["d3"] if fires else [])


def test_burst_state_is_bounded_by_the_threshold_and_bursts_share_a_dedup_key() -> None:
    times = [f"10:{m:02d}:{s:02d}" for m in range(2) for s in range(0, 60, 2)]
    judged, detector = run("violation_burst", *delegation(), *denied(*times), burst_threshold=4)
    assert len(detector.state_of(ALICE, "violation_burst").recent) < 4
    findings = [f for j in judged for f in j.findings]
    assert len(findings) == len(times) // 4
    assert {f.dedup_key for f in findings} == {"violation_burst|acme|alice|agent-1"}
    assert len({f.finding_id for f in findings}) == len(findings)


def test_unattributed_calls_burst_per_session() -> None:
    """Calls on unbound sessions have no delegation: their state is keyed by session."""
    calls = [call(f"10:00:0{n}", f"u{n}", session="ghost") for n in range(5)]
    judged, detector = run("violation_burst", *calls)
    assert fired(judged) == ["u4"]
    assert judged[-1].findings[0].dedup_key == "violation_burst|acme|session:ghost"
    assert detector.state_of(("acme", "session:ghost"), "violation_burst") is not None


# ------------------------------------------------------------------------ first use


def test_first_tool_use_learning_edge_and_eviction() -> None:
    learning = [call(f"09:00:0{n}", f"l{n}", f"fs/tool_{n}") for n in range(4)]
    judged, detector = run(
        "first_tool_use",
        *delegation(),
        *learning,
        call("09:10:00", "inside", "fs/new_a"),  # learnt silently
        call("09:10:00.001", "edge", "fs/new_b"),  # learning is first call + 10 min, inclusive
        call("10:00:00", "evicted", "fs/tool_0"),  # max_entries 3: tool_0 was evicted, so it is new again
        call("10:00:01", "known", "fs/new_b"),
        first_use_learning=timedelta(minutes=10),
        max_entries=3,
    )
    assert fired(judged) == ["edge", "evicted"]
    assert len(detector.state_of(ALICE, "first_tool_use").tools) == 3


# ------------------------------------------------------------------------- rug pull


def test_rug_pull_state_is_bounded() -> None:
    flips = [call(f"10:{m:02d}:00", f"f{m}", "fs/read_file", digest=f"sha256:{m % 2}") for m in range(20)]
    tools = [call(f"11:00:0{n}", f"t{n}", f"fs/tool_{n}", digest="sha256:x") for n in range(5)]
    judged, detector = run("tool_rug_pull", *delegation(), *flips, *tools, max_entries=4)
    assert fired(judged) == [f"f{m}" for m in range(1, 20, 2)]  # the first epoch (sha256:0) is never dropped
    state = detector.state_of(ALICE, "tool_rug_pull")
    assert len(state.tools) == 4
    assert all(len(epochs) <= MAX_EPOCHS for epochs in state.tools.values())


def test_rug_pull_baseline_is_the_first_digest_since_the_matched_grant_version() -> None:
    events = (
        bound("09:00:00"),
        grant("09:00:00", "g-old", tools=("fs/*",)),
        call("09:30:00", "before", "fs/read_file", digest="sha256:a"),
        grant("10:00:00", "g-new", tools=("fs/read_file",)),  # later not_before: g-new is the matched grant
        call("10:10:00", "after", "fs/read_file", digest="sha256:a"),
        call("10:20:00", "changed", "fs/read_file", digest="sha256:b"),
    )
    judged, _ = run("tool_rug_pull", *events)
    assert fired(judged) == ["changed"]
    (finding,) = judged[-1].findings
    # the evidence starts at the first call of the baseline digest's run, here before the grant
    assert finding.evidence.grant_id == "g-new" and finding.evidence.call_ids == ("before", "changed")
    assert finding.details == {"expected_digest": "sha256:a", "digest": "sha256:b"}


def test_rug_pull_needs_grant_states() -> None:
    """Without the grant states (the caller passed none) the rule only records sightings."""
    rule = default_catalog().get("tool_rug_pull")
    detector = Detector([rule])
    with_grants = judge((*delegation(), call("10:00:00", "a", digest="x"), call("10:01:00", "b", digest="y")))
    assert with_grants[-1].rule_ids == ["tool_rug_pull"]
    assert detector.evaluate(with_grants[-1].call, with_grants[-1].decision) == []


# -------------------------------------------------------------- use after revocation


@pytest.mark.parametrize(("at", "fires"), [("10:00:00", False), ("10:00:00.001", True)])
def test_use_after_revocation_with_zero_tolerance(at: str, fires: bool) -> None:
    judged, _ = run(
        "use_after_revocation", *delegation(), revoke("10:00:00"), call(at, "c1"), revocation_tolerance=timedelta(0)
    )
    assert fired(judged) == (["c1"] if fires else [])


def test_use_after_revocation_measures_delay_and_counts_uses() -> None:
    calls = [call("10:00:01", "c1"), call("10:00:30", "c2"), call("10:05:00", "c3")]
    judged, _ = run("use_after_revocation", *delegation(), revoke("10:00:00"), *calls)
    assert fired(judged) == ["c2", "c3"]
    last = judged[-1].findings[0]
    assert last.details["seconds_after_revocation"] == 300.0
    assert last.details["uses_since_revocation"] == 3
    assert last.evidence.call_ids == ("c1", "c3") and last.first_call_time < last.last_call_time
    assert last.severity == "critical" and last.evidence.query == "grant_history"


# -------------------------------------------------------------------------- detector


def test_detector_keeps_state_for_at_most_max_delegations() -> None:
    agents = [f"agent-{n}" for n in range(4)]
    events: list[BaseEvent] = []
    for n, agent in enumerate(agents):
        events += [bound("09:00:00", f"s{n}", agent=agent), grant("09:00:00", agent=agent)]
        events.append(call(f"10:00:0{n}", f"c{n}", session=f"s{n}"))
    _, detector = run("first_tool_use", *events, max_delegations=2)
    assert len(detector) == 2
    assert detector.state_of(("acme", "alice", "agent-0"), "first_tool_use") is None
    assert detector.state_of(("acme", "alice", "agent-3"), "first_tool_use") is not None


def test_a_per_call_finding_points_to_its_evidence() -> None:
    (judged,) = run("revoked_grant", *delegation(), revoke("10:00:00"), call("10:00:30", "c1", session="s1"))[0]
    (finding,) = judged.findings
    assert (finding.rule_id, finding.rule_version, finding.severity) == ("revoked_grant", 1, "high")
    assert (finding.tenant, finding.principal, finding.agent_id, finding.call_id) == ("acme", "alice", "agent-1", "c1")
    assert finding.dedup_key == "revoked_grant|acme|alice|agent-1|g1"
    assert finding.evidence.model_dump() == {
        "call_ids": ("c1",),
        "session_id": "s1",
        "grant_id": "g1",
        "query": "grant_history",
    }
    assert finding.first_call_time == finding.last_call_time == judged.call.event_time
    assert finding.details["verdict"] == "revoked_grant"
    assert str(finding.details["reason"]).startswith("revoked_grant: grant g1 covers")
    assert finding.model_dump(mode="json")["last_call_time"] == "2026-11-21T10:00:30.000Z"


def test_finding_ids_are_deterministic() -> None:
    events = (*delegation(), revoke("10:00:00"), call("10:01:00", "c1"), call("10:02:00", "c2"))
    first, second = judge(events), judge(events)
    ids = [f.finding_id for j in first for f in j.findings]
    assert ids == [f.finding_id for j in second for f in j.findings]
    assert len(ids) == len(set(ids)) == 4  # revoked_grant and use_after_revocation on each call
    assert first[0].rule_ids == ["revoked_grant", "use_after_revocation"]


def test_long_dedup_keys_are_shortened_stably() -> None:
    key = dedup_key("rule", ["x" * 300])
    assert len(key) <= MAX_DEDUP_KEY and key.startswith("rule|sha256:")
    assert key == dedup_key("rule", ["x" * 300])
