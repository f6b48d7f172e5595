"""``scopewatch verify``'s chain check: a re-sent event stamped twice leaves one stored row (the raw
tables keep one row per event), and the gap that leaves is proven harmless, not reported as lost."""

from __future__ import annotations

from typing import Any

from collectors.chain import ChainStamper
from schemas import parse_event, record_hash
from stream_jobs.verify import CollectorReport, Stamped, check_chains
from support.scenario import bound


def _events(n: int) -> list[Any]:
    return [parse_event(bound(f"10:00:{i:02d}", f"s-{i}", "alice", "agent")) for i in range(n)]


def _stored(records: list[Any], drop: set[int]) -> list[Stamped]:
    return [Stamped("identity_events", e, record_hash(e)) for e in records if e.collector.seq not in drop]


def _only(reports: list[CollectorReport], cid: str) -> CollectorReport:
    return next(r for r in reports if r.collector_id == cid)


def test_a_re_sent_event_whose_first_copy_was_merged_away_is_not_a_gap() -> None:
    a, b, c = _events(3)
    intake = ChainStamper("intake:x", epoch=1)
    chain = [intake.stamp(a), intake.stamp(b), intake.stamp(c), intake.stamp(b), intake.stamp(a)]  # b, a again
    for drop in ({2}, {4}, {1}, {1, 4}):  # which copy the table kept does not matter
        report = _only(check_chains(_stored(chain, drop)), "intake:x")
        assert report.problems == [] and report.resent == len(drop), (drop, report)
        assert report.events == 5 - len(drop)  # each event counted once


def test_a_run_of_re_sent_events_and_a_copy_stamped_by_another_intake() -> None:
    a, b, c, d = _events(4)
    one, two = ChainStamper("intake:1", epoch=1), ChainStamper("intake:2", epoch=1)
    first = [one.stamp(a), one.stamp(b), one.stamp(c), one.stamp(d)]
    second = [two.stamp(b), two.stamp(c)]  # the sender retried b and c on the other replica
    stored = _stored(first, {2, 3}) + _stored(second, set())
    reports = check_chains(stored)
    assert _only(reports, "intake:1").problems == [] and _only(reports, "intake:1").resent == 2
    assert _only(reports, "intake:2").problems == []


def test_a_lost_or_different_event_is_still_a_gap() -> None:
    a, b, c = _events(3)
    intake = ChainStamper("intake:x", epoch=1)
    chain = [intake.stamp(a), intake.stamp(b), intake.stamp(c)]
    report = _only(check_chains(_stored(chain, {2})), "intake:x")
    assert [(p.kind, p.seq) for p in report.problems] == [("gap", 2)] and report.resent == 0
    # a stored event that is *almost* the lost one (another event_id) explains nothing
    other = parse_event({**bound("10:00:01", "s-1", "alice", "agent"), "event_id": a.event_id})
    stored = [*_stored(chain, {2}), *_stored([ChainStamper("y", 1).stamp(other)], set())]
    assert [p.kind for p in _only(check_chains(stored), "intake:x").problems] == ["gap"]
