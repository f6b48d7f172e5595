"""Retention honesty (DESIGN "Retention"): a call older than the compaction horizon of a history
it was judged on is flagged ``history_complete: false`` with a ``history_incomplete`` finding; the
horizon survives the stored form (compact format 3) and a restart."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from detections.catalog import Detector, default_catalog
from detections.compact import decode_grants, decode_sessions, encode_grants, encode_sessions
from detections.engine import GrantHistory, SessionHistory
from detections.live import LiveConfig, Stage2
from schemas import GrantIssued, SessionBound, ToolCall
from support.live_sim import LiveSim

DAY0 = datetime(2026, 11, 1, 9, 0, tzinfo=UTC)
NOW = DAY0 + timedelta(days=3)
CONFIG = LiveConfig(retention=timedelta(days=1))


def at(minutes: int) -> datetime:
    return DAY0 + timedelta(minutes=minutes)


def eid(n: int) -> str:
    return f"00000000-0000-0000-0000-{n:012d}"


def bound(n: int, minutes: int, session: str = "s1") -> SessionBound:
    return SessionBound(
        event_id=eid(n),
        event_time=at(minutes),
        tenant="acme",
        session_id=session,
        principal="alice",
        agent_id="a1",
        valid_from=at(minutes),
    )


def grant(n: int, minutes: int, tools: list[str]) -> GrantIssued:
    return GrantIssued(
        event_id=eid(n),
        event_time=at(minutes),
        tenant="acme",
        grant_id="g1",
        principal="alice",
        agent_id="a1",
        tools=tools,
        not_before=at(0),
        granted_by="alice",
    )


def call(n: int, minutes: int, tool: str, session: str = "s1") -> ToolCall:
    return ToolCall(
        event_id=eid(n),
        event_time=at(minutes),
        tenant="acme",
        call_id=f"c{n}",
        session_id=session,
        server="fs" if tool.startswith("read") else "web",
        tool=tool,
        arguments={},
        resources=[],
        transport="stdio",
    )


def test_compaction_horizon_is_kept_in_the_stored_history() -> None:
    grants = GrantHistory("acme", "alice", "a1")
    grants.add(grant(1, 0, ["fs/*"]))
    assert encode_grants(grants)[0] == 2, "a history never compacted keeps format 2"
    grants.add(grant(2, 120, ["web/*"]))
    assert grants.compact(at(180)) == 1
    again = decode_grants(encode_grants(grants), "acme", "alice", "a1")
    assert again.horizon == grants.horizon == at(180)
    assert grants.compact(at(170)) == 0 and grants.horizon == at(180)
    sessions = SessionHistory("acme", "s1")
    sessions.add(bound(3, 0))
    sessions.add(bound(4, 10))
    assert sessions.compact(at(60)) == 1
    assert decode_sessions(encode_sessions(sessions), "acme", "s1").horizon == at(60)


def test_live_flags_calls_older_than_the_grants_horizon_and_raises_a_finding() -> None:
    """The grant allowed fs/* until it was re-issued for web/* only; with the first version compacted
    away, a call made under it is judged no_grant (its only version left is later; replay: in_scope), and says so."""
    sim = LiveSim(1, CONFIG)
    sim.stage2 = [
        Stage2(
            0,
            sim.s2_grants,
            sim.s2_calls,
            CONFIG,
            sim.counters,
            Detector(list(default_catalog())),
            sequence=sim.s2_seq,
            approvals=sim.s2_approvals,
            policies=sim.policies,
        )
    ]
    for fact in (bound(1, 0), grant(2, 0, ["fs/*"]), grant(3, 120, ["web/*"])):
        sim.deliver(fact, NOW)
    old, recent = call(10, 60, "read_file"), call(11, 2 * 24 * 60 + 60, "get")  # horizon: NOW - 1 day
    for c in (old, recent):
        sim.deliver(c, NOW)
    sim.drain(NOW)
    sim.tick(NOW + timedelta(seconds=20))
    latest = sim.latest()
    assert latest["c10"].final and latest["c10"].verdict == "no_grant"  # replay: in_scope (version at 09:00)
    assert latest["c10"].history_complete is False
    assert latest["c11"].history_complete is True and latest["c11"].verdict == "in_scope"
    flagged = [f for f in sim.findings if f.rule_id == "history_incomplete"]
    assert [f.call_id for f in flagged] == ["c10"]
    assert flagged[0].severity == "medium"
    # the horizon survives a restart: stores only, new processors
    sim.rebuild()
    stored = decode_grants(sim.s2_grants[next(iter(sim.s2_grants))], "acme", "alice", "a1")
    assert stored.horizon is not None and stored.horizon > at(60)


def test_live_flags_calls_older_than_the_session_horizon() -> None:
    sim = LiveSim(2, CONFIG)
    for fact in (bound(1, 0), bound(2, 10), grant(3, 0, ["fs/*"])):
        sim.deliver(fact, NOW)
    for c in (call(10, 5, "read_file"), call(11, 2 * 24 * 60 + 60, "read_file")):
        sim.deliver(c, NOW)
    sim.drain(NOW)
    sim.tick(NOW + timedelta(seconds=20))
    latest = sim.latest()
    assert latest["c10"].history_complete is False
    assert latest["c11"].history_complete is True
    assert latest["c10"].verdict == "unbound_session"  # replay: in_scope (the first binding was compacted)
    assert latest["c11"].verdict == "in_scope"
