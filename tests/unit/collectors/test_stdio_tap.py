"""The copy channel of `scopewatch wrap` (relay -> observer process) and the observer's frame handling."""

from __future__ import annotations

import itertools
import json
import os
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collectors import tap as tap_module
from collectors.observer import McpSessionObserver, SessionIdentity
from collectors.observer_process import LineAssembler, SessionRecorder
from collectors.tap import C2S, END, GAP, HEAD, S2C, DropCounters, Frame, FrameReader, Tap, lost_messages
from schemas import Event, SessionBound, SessionEnded, ToolCall, ToolResult

T0 = 1_795_000_000_000_000_000


@pytest.fixture
def pipe() -> Iterator[tuple[int, int]]:
    """A pipe with the smallest buffer Linux allows (one page), so it fills quickly."""
    r, w = os.pipe()
    tap_module.set_pipe_size(w, 4096)
    inode = os.fstat(r).st_ino
    yield r, w
    for fd in (r, w):  # close what the test left open -- never a number reused by someone else since
        try:
            if os.fstat(fd).st_ino == inode:
                os.close(fd)
        except OSError:
            pass


def drain(fd: int) -> bytes:
    os.set_blocking(fd, False)
    out = b""
    while True:
        try:
            part = os.read(fd, 1 << 16)
        except BlockingIOError:
            return out
        if not part:
            return out
        out += part


def fill(w: int) -> int:
    """Fill the pipe with whole frames until not even an empty one fits; how many."""
    os.set_blocking(w, False)
    n = 0
    for size in (300, 0):
        frame = HEAD.pack(S2C, size, T0, 0) + b"f" * size
        while True:
            try:
                os.write(w, frame)
            except BlockingIOError:
                break
            n += 1
    return n


def frames_of(data: bytes) -> list[Frame]:
    reader = FrameReader()
    frames = reader.feed(data)
    assert reader.pending == 0
    return frames


@given(st.lists(st.tuples(st.sampled_from([C2S, S2C]), st.binary(max_size=300)), max_size=12), st.data())
def test_frames_survive_any_chunking(chunks: list[tuple[int, bytes]], data: st.DataObject) -> None:
    stream = b"".join(HEAD.pack(d, len(c), T0 + i, i) + c for i, (d, c) in enumerate(chunks))
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=8)))
    reader = FrameReader()
    out: list[Frame] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        out += reader.feed(stream[start:cut])
        start = cut
    assert [(f.kind, f.body, f.wall_ns, f.mono_ns) for f in out] == [
        (d, c, T0 + i, i) for i, (d, c) in enumerate(chunks)
    ]
    assert reader.pending == 0


def test_a_frame_cut_off_by_the_writer_dying_is_left_pending() -> None:
    frame = HEAD.pack(C2S, 10, T0, 0) + b"0123456789"
    reader = FrameReader()
    assert reader.feed(frame[:15]) == []
    assert reader.pending == 15


def test_garbage_on_the_pipe_is_an_error_not_a_guess() -> None:
    with pytest.raises(ValueError, match="bad frame"):
        FrameReader().feed(b"\xff" * HEAD.size)


def test_chunks_arrive_in_order_with_their_timestamps(pipe: tuple[int, int]) -> None:
    r, w = pipe
    tap = Tap(w)
    assert tap.send(C2S, b'{"a":1}\n', T0, 1)
    assert tap.send(S2C, b'{"b":2}\n', T0 + 5, 2)
    assert tap.end(T0 + 9, 3, timeout=1.0) and tap.closed
    frames = frames_of(drain(r))
    assert [(f.kind, f.body, f.wall_ns, f.mono_ns) for f in frames] == [
        (C2S, b'{"a":1}\n', T0, 1),
        (S2C, b'{"b":2}\n', T0 + 5, 2),
        (END, b"", T0 + 9, 3),
    ]


def test_fail_mode_a_full_pipe_drops_after_a_grace_and_reports_a_gap(
    pipe: tuple[int, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tap_module, "FAIL_GRACE", 0.05)
    r, w = pipe
    counters = DropCounters()
    tap = Tap(w, on_full="fail", counters=counters)
    line = b"x" * 199 + b"\n"
    sent = 0
    started = time.monotonic()
    while tap.send(C2S, line, T0, 0):  # nobody reads: the pipe fills up, then a line is dropped
        sent += 1
        assert sent < 100
    assert time.monotonic() - started < 1.0  # after the (shortened) grace, not FAIL_GRACE's 1 s
    cut = b"cut-off start of a message" * 12
    assert not tap.send(C2S, cut, T0, 0)
    assert counters.get(C2S) == (1, len(line) + len(cut), False)
    assert counters.get(S2C) == (0, 0, False)
    frames = frames_of(drain(r))
    assert len(frames) == sent and all(f.body == line for f in frames)
    assert tap.send(C2S, b"rest of it\nnext\n", T0, 0)  # room again: the gap goes first
    gap, data = frames_of(drain(r))
    assert gap.kind == GAP and data.body == b"rest of it\nnext\n"
    direction, nbytes, newlines, ends = tap_module.GAP_BODY.unpack(gap.body)
    assert (direction, nbytes, newlines, ends) == (C2S, len(line) + len(cut), 1, False)
    assert lost_messages(newlines, bool(ends)) == 2  # the dropped line, and the one cut off
    assert tap.dropped_chunks == 2 and tap.waits >= 2


def test_block_mode_waits_for_room_then_the_write_goes_through(pipe: tuple[int, int]) -> None:
    r, w = pipe
    tap = Tap(w, on_full="block")
    fill(w)
    got = bytearray()

    def reader() -> None:
        time.sleep(0.3)
        got.extend(drain(r))

    thread = threading.Thread(target=reader)
    thread.start()
    started = time.monotonic()
    big = b"z" * 20_000  # bigger than the pipe: written in parts as the reader makes room
    done = threading.Thread(target=lambda: tap.send(S2C, big, T0, 0))
    done.start()
    thread.join()
    while done.is_alive():
        got.extend(drain(r))
        time.sleep(0.01)
    got.extend(drain(r))
    assert time.monotonic() - started >= 0.25  # it waited for the reader, never dropped
    assert tap.dropped_chunks == 0
    assert frames_of(bytes(got))[-1].body == big


def test_block_mode_gives_up_after_the_block_timeout(pipe: tuple[int, int]) -> None:
    _r, w = pipe
    tap = Tap(w, on_full="block", block_timeout=0.2)
    fill(w)
    started = time.monotonic()
    assert not tap.send(C2S, b"q" * 300 + b"\n", T0, 0)
    assert time.monotonic() - started >= 0.19
    assert tap.dropped_chunks == 1


def test_end_without_room_keeps_the_tap_open(pipe: tuple[int, int]) -> None:
    r, w = pipe
    tap = Tap(w, on_full="block", block_timeout=0.05)
    fill(w)
    assert not tap.send(C2S, b"e" * 300 + b"\n", T0, 0)
    assert not tap.end(T0, 0, timeout=0.05) and not tap.closed
    drain(r)
    assert tap.end(T0, 0, timeout=1.0) and tap.closed
    assert [f.kind for f in frames_of(drain(r))] == [GAP, END]  # the drops are reported before the end


def test_a_dead_observer_breaks_the_tap(pipe: tuple[int, int]) -> None:
    r, w = pipe
    tap = Tap(w)
    os.close(r)
    assert not tap.send(C2S, b"lost\n", T0, 0)
    assert tap.broken and tap.dropped_chunks == 1
    r2, w2 = os.pipe()
    try:
        tap.reopen(w2, None)  # a new observer: what was dropped meanwhile is reported to it first
        assert tap.send(C2S, b"next\n", T0, 0)
        gap, data = frames_of(drain(r2))
        assert gap.kind == GAP and tap_module.GAP_BODY.unpack(gap.body) == (C2S, 5, 1, True)
        assert data.body == b"next\n"
    finally:
        os.close(r2)


def test_line_assembler_resynchronises_after_a_gap() -> None:
    lines = LineAssembler()
    assert lines.feed(b'{"partial') == []
    lines.gap(ends_with_newline=False)  # the rest of that message and the start of the next were lost
    assert lines.feed(b'tail of the lost one"}\n{"whole":1}\n') == [b'{"whole":1}']
    assert lines.feed(b'{"a"') == []
    lines.gap(ends_with_newline=True)
    assert lines.feed(b'{"b":2}\n') == [b'{"b":2}']
    assert lines.feed(b"one\n") == [b"one"] and lines.partial == 0


# -- the observer process's side -------------------------------------------------------------------------
class ListSink:
    def __init__(self) -> None:
        self.events: list[Event] = []
        self.losses: list[tuple[int, int, str]] = []
        self.batches: list[int] = []

    def emit(self, event: Event) -> None:
        self.events.append(event)

    def emit_many(self, events: list[Event], on_error: object) -> None:
        self.batches.append(len(events))
        self.events.extend(events)

    def lost(self, direction: int, messages: int, reason: str) -> None:
        self.losses.append((direction, messages, reason))

    def hurry(self) -> None:
        pass

    def close(self, timeout: float) -> None:
        pass


def recorder() -> tuple[SessionRecorder, ListSink]:
    counter = itertools.count()
    ident = SessionIdentity(session_id="s-1", tenant="acme", principal="alice", agent_id="agent-1")
    observer = McpSessionObserver(
        ident, server_label="fs", new_id=lambda: f"00000000-0000-4000-8000-{next(counter):012d}"
    )
    sink = ListSink()
    return SessionRecorder(observer, sink), sink


def line(message: dict[str, object]) -> bytes:
    return json.dumps(message).encode() + b"\n"


def call(i: int, message: str) -> bytes:
    params = {"name": "echo", "arguments": {"message": message}}
    return line({"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": params})


def answer(i: int) -> bytes:
    return line({"jsonrpc": "2.0", "id": i, "result": {"content": []}})


def test_frames_become_events_with_the_relay_s_timestamps() -> None:
    rec, sink = recorder()
    rec.start(T0)
    whole = call(1, "hi")
    rec.handle(Frame(C2S, T0 + 1_000_000, 10_000_000_000, whole[:7]))
    rec.handle(Frame(C2S, T0 + 2_000_000, 10_001_000_000, whole[7:]))
    rec.handle(Frame(S2C, T0 + 3_000_000, 10_251_000_000, answer(1)))
    rec.handle(Frame(END, T0 + 4_000_000, 10_300_000_000, b""))
    bound, c, r, ended = sink.events
    assert isinstance(bound, SessionBound) and isinstance(ended, SessionEnded)
    assert isinstance(c, ToolCall) and isinstance(r, ToolResult)
    assert c.event_time == datetime.fromtimestamp((T0 + 2_000_000) / 1e9, tz=UTC)  # the line's last chunk
    assert r.call_id == c.call_id and r.duration_ms == 250.0
    assert rec.stats.client_bytes == len(whole) and rec.stats.events == 4


def test_all_frames_of_one_read_are_handed_over_in_one_batch() -> None:
    rec, sink = recorder()
    rec.start(T0)
    frames = [Frame(C2S, T0, 0, call(1, "a") + call(2, "b")), Frame(S2C, T0, 1, answer(1) + answer(2))]
    rec.handle_all(frames)
    rec.handle_all([Frame(C2S, T0, 2, call(3, "c"))])
    rec.handle_all([Frame(C2S, T0, 3, b'{"partial')])  # nothing parsed: nothing handed over
    assert sink.batches == [1, 4, 1]
    kinds = [type(e).__name__ for e in sink.events[1:]]
    assert kinds == ["ToolCall", "ToolCall", "ToolResult", "ToolResult", "ToolCall"]
    assert rec.stats.events == 6


def test_a_gap_frame_becomes_a_loss_and_the_lines_after_it_still_count() -> None:
    rec, sink = recorder()
    first = call(1, "one")
    rec.handle(Frame(C2S, T0, 0, first[:10]))
    body = tap_module.GAP_BODY.pack(C2S, 200, 1, False)  # the rest of call 1, and the start of call 2
    rec.handle(Frame(GAP, T0, 0, body))
    rec.handle(Frame(C2S, T0, 0, b'rest of call 2"}}}\n' + call(3, "three")))
    [c] = sink.events
    assert isinstance(c, ToolCall) and c.arguments == {"message": "three"}
    [(direction, messages, reason)] = sink.losses
    assert (direction, messages) == (C2S, 2) and "200 bytes" in reason
    assert rec.stats.lost_messages == 2 and rec.stats.unparsable_lines == 0


def test_drops_the_wrapper_could_not_report_before_it_died_are_counted() -> None:
    rec, sink = recorder()
    counters = DropCounters()
    counters.add(S2C, b"lost answer\nand half of ")
    counters.add(S2C, b"another")
    rec.cut_off(counters, torn=0)
    [(direction, messages, _reason)] = sink.losses
    assert (direction, messages) == (S2C, 2)
    rec2, sink2 = recorder()
    counters2 = DropCounters()
    counters2.add(C2S, b"a\n")
    rec2.handle(Frame(GAP, T0, 0, tap_module.GAP_BODY.pack(C2S, 2, 1, True)))  # already reported
    rec2.cut_off(counters2, torn=0)
    assert len(sink2.losses) == 1


def test_a_cut_off_session_invents_no_end() -> None:
    rec, sink = recorder()
    rec.start(T0)
    rec.handle(Frame(C2S, T0, 0, call(1, "x")))
    rec.cut_off(DropCounters(), torn=12)
    assert [type(e) for e in sink.events] == [SessionBound, ToolCall]
    assert sink.losses == []


def test_a_bad_message_does_not_stop_the_others(monkeypatch: pytest.MonkeyPatch) -> None:
    rec, sink = recorder()
    real = rec.observer.from_client
    calls = iter([RuntimeError("boom"), None])

    def flaky(message: object, now: datetime, mono: float) -> list[Event]:
        err = next(calls)
        if err is not None:
            raise err
        return real(message, now, mono)

    monkeypatch.setattr(rec, "_handlers", {C2S: flaky, S2C: rec.observer.from_server})
    rec.handle(Frame(C2S, T0, 0, call(1, "a") + call(2, "b") + b"not json\n"))
    assert [e.arguments for e in sink.events if isinstance(e, ToolCall)] == [{"message": "b"}]
    assert rec.stats.observer_errors == 1 and rec.stats.unparsable_lines == 1
