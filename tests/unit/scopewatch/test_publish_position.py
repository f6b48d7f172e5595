"""The position `scopewatch publish` reports: the contiguous acknowledged prefix, and how to resume from it."""

from __future__ import annotations

import io
import random

import pytest

from scopewatch.jsonl import BadLine, read_events
from scopewatch.publish import AckTracker, resume_command
from support.scenario import jsonl, tool_call


def test_acks_out_of_order_only_advance_the_position_over_a_contiguous_prefix() -> None:
    t = AckTracker()
    for line in (1, 2, 3, 5, 6):  # line 4 blank: the reader never hands it over
        t.sent(line)
    assert (t.resume_line, t.acked_through) == (1, 0)
    assert t.acked(3) and t.acked(5)  # other partitions answered first
    assert (t.resume_line, t.acked_through, t.acknowledged) == (1, 0, 2)
    assert t.acked(1)
    assert (t.resume_line, t.acked_through) == (2, 1)
    assert t.acked(2)
    assert (t.resume_line, t.acked_through) == (6, 5)  # 3 and 5 were already in, 4 is blank
    assert t.acked(6)
    assert (t.resume_line, t.acked_through, t.acknowledged, t.unacknowledged) == (7, 6, 5, 0)
    assert t.position() == "5 events acknowledged; every line up to 6 is on Kafka"


def test_a_late_second_ack_of_a_line_counts_once() -> None:
    t = AckTracker()
    t.sent(1)
    assert t.acked(1)
    assert not t.acked(1)
    assert t.acknowledged == 1


def test_bad_and_dropped_lines_do_not_hold_the_position_back() -> None:
    t = AckTracker()
    t.sent(1)
    t.read(2)  # a bad line: reported, never sent
    t.sent(3)
    t.sent(4)
    t.dropped(3)  # too large for Kafka: reported as a bad line
    t.acked(1)
    t.acked(4)
    assert (t.resume_line, t.acked_through, t.acknowledged) == (5, 4, 2)


def test_nothing_acknowledged_yet() -> None:
    t = AckTracker(start_line=40)
    assert (t.resume_line, t.acked_through) == (40, 39)
    t.sent(41)
    assert t.resume_line == 41  # line 40 was blank or bad
    assert t.position() == "0 events acknowledged; every line up to 40 is on Kafka"
    t2 = AckTracker()
    t2.sent(1)
    assert t2.position() == "0 events acknowledged; no line from 1 on is known to be on Kafka"


def test_lines_must_come_in_order() -> None:
    t = AckTracker()
    t.sent(5)
    with pytest.raises(ValueError, match="line 3 read after line 5"):
        t.sent(3)
    with pytest.raises(ValueError):
        AckTracker(start_line=0)


def test_resume_from_the_reported_line_publishes_every_unacknowledged_line_exactly_once_more() -> None:
    """Random ack orders: lines before the resume line are all acked; from it on, nothing acked is lost."""
    rng = random.Random(14)
    for _ in range(200):
        lines = sorted(rng.sample(range(1, 200), 60))
        t = AckTracker()
        for line in lines:
            t.sent(line)
        acked = set(rng.sample(lines, rng.randrange(0, 60)))
        for line in rng.sample(sorted(acked), len(acked)):
            t.acked(line)
        resumed = {line for line in lines if line >= t.resume_line}
        assert {line for line in lines if line not in acked} <= resumed  # no loss
        assert all(line in acked for line in lines if line < t.resume_line)  # no line skipped unacked
        if len(acked) < len(lines):
            assert t.resume_line == min(set(lines) - acked)  # duplicates only from the first unacked line on


def test_read_events_from_line_skips_earlier_lines_unread_and_keeps_the_numbering() -> None:
    events = [tool_call(f"10:00:{i:02d}", f"c{i}", "s", "fs", "read_file") for i in range(4)]
    text = "{bad\n" + jsonl(events[:2]) + "\n" + jsonl(events[2:]) + "{also bad\n"
    everything = list(read_events(io.StringIO(text)))
    assert [n for n, _ in everything] == [1, 2, 3, 5, 6, 7]
    resumed = list(read_events(io.StringIO(text), from_line=3))
    assert [n for n, _ in resumed] == [3, 5, 6, 7]  # line 1's error is not reported again
    assert resumed == everything[2:]
    assert isinstance(resumed[-1][1], BadLine)
    assert list(read_events(io.StringIO(text), from_line=99)) == []


def test_resume_command_quotes_the_path() -> None:
    assert resume_command("events.jsonl", 4402) == "scopewatch publish events.jsonl --from-line 4402"
    assert resume_command("my events/a b.jsonl", 7) == "scopewatch publish 'my events/a b.jsonl' --from-line 7"
    assert resume_command("-", 1) == "scopewatch publish - --from-line 1"
