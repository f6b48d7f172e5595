"""Line framing and chain stamping used by the stdio collector."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime

from hypothesis import given
from hypothesis import strategies as st

from collectors.chain import ChainStamper, record_hash
from collectors.stdio import LineAssembler
from schemas import SessionEnded


@given(st.lists(st.binary(max_size=40).filter(lambda b: b"\n" not in b), max_size=8), st.data())
def test_lines_survive_any_chunking(lines: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    assembler = LineAssembler()
    out: list[bytes] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        out += assembler.feed(stream[start:cut])
        start = cut
    assert out == lines


def test_oversize_lines_are_skipped_not_parsed() -> None:
    assembler = LineAssembler(limit=10)
    assert assembler.feed(b"short\n" + b"y" * 8) == [b"short"]
    assert assembler.feed(b"y" * 8) == []  # over the limit: dropped from parsing
    assert assembler.feed(b"yyy\nnext\n") == [b"next"]
    assert assembler.oversize == 1


def ended(i: int) -> SessionEnded:
    return SessionEnded(
        event_id=str(uuid.UUID(int=i)), event_time=datetime(2026, 1, 1, tzinfo=UTC), tenant="t", session_id="s"
    )


def test_chain_links_each_record_to_the_previous_hash() -> None:
    stamper = ChainStamper("c-1", epoch=5)
    a, b, c = (stamper.stamp(ended(i)) for i in range(3))
    assert [e.collector.seq for e in (a, b, c) if e.collector] == [1, 2, 3]
    assert a.collector and a.collector.prev_hash is None and a.collector.epoch == 5
    assert b.collector and b.collector.prev_hash == record_hash(a)
    assert c.collector and c.collector.prev_hash == record_hash(b)
    edited = a.model_copy(update={"tenant": "other"})
    assert record_hash(edited) != b.collector.prev_hash  # an edited record no longer matches the chain
