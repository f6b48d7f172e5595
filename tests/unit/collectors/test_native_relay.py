"""The native relay of `scopewatch wrap` (collectors/native/relay.c) on plain pipes: bytes, copy frames,
losses when the observer's pipe is full, the end frame. Built here from the source with the same flags
as `make install` (-Werror), so a warning fails the test too."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from collectors.native_relay import NativeRelay, NativeTap, build, find_binary, patience_ms
from collectors.tap import C2S, END, GAP, GAP_BODY, S2C, DropCounters, Frame, FrameReader, set_pipe_size


@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build(tmp_path_factory.mktemp("relay") / "scopewatch-relay")


@dataclass
class Rig:
    relay: NativeRelay
    client_w: int  # what the client writes (the relay's stdin)
    client_r: int  # what the client reads (the relay's stdout)
    server_r: int  # the server's stdin
    server_w: int  # the server's stdout
    tap_r: int
    counters: DropCounters
    wakes: list[int]
    broken: list[NativeTap]


def rig(binary: Path, patience: int, tap_size: int | None = None) -> Rig:
    c_r, c_w = os.pipe()
    o_r, o_w = os.pipe()
    s_in_r, s_in_w = os.pipe()
    s_out_r, s_out_w = os.pipe()
    tap_r, tap_w = os.pipe()
    if tap_size is not None:
        set_pipe_size(tap_w, tap_size)
    counters = DropCounters()
    wakes: list[int] = []
    broken: list[NativeTap] = []
    relay = NativeRelay(
        binary,
        stdin_fd=c_r,
        stdout_fd=o_w,
        child_in=s_in_w,
        child_out=s_out_r,
        tap_fd=tap_w,
        counters=counters,
        patience=patience,
        on_broken=broken.append,
        on_wake=lambda: wakes.append(1),
    )
    for fd in (c_r, o_w, s_in_w, s_out_r, tap_w):  # the relay holds them now
        os.close(fd)
    return Rig(relay, c_w, o_r, s_in_r, s_out_w, tap_r, counters, wakes, broken)


@pytest.fixture
def make(binary: Path) -> Iterator[list[Rig]]:
    made: list[Rig] = []
    yield made
    for r in made:
        r.relay.quit()
        for fd in (r.client_w, r.client_r, r.server_r, r.server_w, r.tap_r):
            try:
                os.close(fd)
            except OSError:
                pass


def read_exact(fd: int, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = os.read(fd, n - len(data))
        assert chunk, "EOF"
        data += chunk
    return data


def eventually(check: Callable[[], bool], timeout: float = 5.0) -> bool:
    """``check()`` once it holds, or its last answer after ``timeout`` (the relay reports wake-ups
    on its control socket, read by a thread of the wrapper: they land a moment after the bytes)."""
    deadline = time.monotonic() + timeout
    while not check() and time.monotonic() < deadline:
        time.sleep(0.005)
    return check()


def read_frames(fd: int, until_eof: bool = False) -> list[Frame]:
    reader, frames = FrameReader(), []
    os.set_blocking(fd, until_eof)
    while True:
        try:
            data = os.read(fd, 1 << 20)
        except BlockingIOError:
            if not reader.pending:
                break
            os.set_blocking(fd, True)  # a frame once started is always finished by the relay
            continue
        if not data:
            break
        frames += reader.feed(data)
        if not until_eof:
            os.set_blocking(fd, False)
    assert reader.pending == 0  # frames are never torn
    return frames


def test_bytes_are_relayed_and_copied_in_order_then_the_end_frame(make: list[Rig], binary: Path) -> None:
    r = rig(binary, patience=-1)
    make.append(r)
    before = time.time_ns()
    os.write(r.client_w, b'{"id":1}\n')
    assert read_exact(r.server_r, 9) == b'{"id":1}\n'
    os.write(r.server_w, b'{"id":1,"result":{}}\n')
    assert read_exact(r.client_r, 21) == b'{"id":1,"result":{}}\n'
    frames = read_frames(r.tap_r)
    assert [(f.kind, f.body) for f in frames] == [(C2S, b'{"id":1}\n'), (S2C, b'{"id":1,"result":{}}\n')]
    assert before <= frames[0].wall_ns <= frames[1].wall_ns <= time.time_ns()
    assert frames[0].mono_ns <= frames[1].mono_ns <= time.monotonic_ns()
    # the client closes its end: the server sees EOF; the server closes its stdout: the wrapper is told
    os.close(r.client_w)
    assert os.read(r.server_r, 10) == b""
    os.close(r.server_w)
    assert r.relay.output_done.wait(10)
    assert r.relay.tap.end(123, 456, timeout=5.0)
    [end] = read_frames(r.tap_r, until_eof=True)  # the relay closed the pipe after the end frame
    assert (end.kind, end.wall_ns, end.mono_ns, end.body) == (END, 123, 456, b"")
    assert r.relay.tap.closed


def test_a_full_copy_pipe_never_stops_the_relay_in_fail_mode_and_the_loss_is_recorded(
    make: list[Rig], binary: Path
) -> None:
    r = rig(binary, patience=0, tap_size=4096)  # patience 0: count a chunk as lost at once
    make.append(r)
    line = b"x" * 999 + b"\n"
    sent = 40  # ~40 KB: far more than the copy pipe holds
    for _ in range(sent):
        os.write(r.client_w, line)
        assert read_exact(r.server_r, len(line)) == line  # relayed regardless
    copied = read_frames(r.tap_r)
    assert 0 < len(copied) < sent and all(f.kind == C2S and f.body == line for f in copied)
    lost = sent - len(copied)
    assert eventually(lambda: bool(r.wakes))  # the wrapper was asked to wake the observer
    assert eventually(lambda: r.counters.get(C2S) == (lost, lost * len(line), True))  # shared with the observer
    assert r.counters.get(S2C) == (0, 0, False)
    # the next chunk that fits is preceded by a gap frame with the same numbers
    os.write(r.client_w, b"next\n")
    assert read_exact(r.server_r, 5) == b"next\n"
    gap, nxt = read_frames(r.tap_r)
    assert gap.kind == GAP and GAP_BODY.unpack(gap.body) == (C2S, lost * len(line), lost, 1)
    assert (nxt.kind, nxt.body) == (C2S, b"next\n")
    assert r.relay.tap.end(1, 2, timeout=5.0)
    assert [f.kind for f in read_frames(r.tap_r, until_eof=True)] == [END]


def test_block_mode_waits_for_room_and_loses_nothing(make: list[Rig], binary: Path) -> None:
    r = rig(binary, patience=-1, tap_size=4096)
    make.append(r)
    line = b"y" * 999 + b"\n"
    got: list[Frame] = []
    for _ in range(40):
        os.write(r.client_w, line)
        os.set_blocking(r.server_r, False)
        time.sleep(0.01)
        try:
            os.read(r.server_r, 1 << 16)
        except BlockingIOError:
            pass
        got += read_frames(r.tap_r)  # the observer reads: the relay goes on
    os.set_blocking(r.server_r, True)
    time.sleep(0.2)
    got += read_frames(r.tap_r)
    assert len(got) == 40 and all(f.body == line for f in got)
    assert r.counters.get(C2S) == (0, 0, False)


def test_a_closed_copy_pipe_is_reported_and_a_new_one_taken_over(make: list[Rig], binary: Path) -> None:
    r = rig(binary, patience=-1)
    make.append(r)
    os.close(r.tap_r)  # the observer died
    os.write(r.client_w, b"lost\n")
    deadline = time.monotonic() + 10
    while not r.broken and time.monotonic() < deadline:
        time.sleep(0.01)
    assert r.broken and r.relay.tap.broken
    new_r, new_w = os.pipe()
    r.tap_r = new_r
    r.relay.tap.reopen(new_w, DropCounters())
    assert read_exact(r.server_r, 5) == b"lost\n"  # relayed once the new observer is there
    os.write(r.client_w, b"kept\n")
    assert read_exact(r.server_r, 5) == b"kept\n"
    gap, kept = read_frames(r.tap_r)
    assert GAP_BODY.unpack(gap.body) == (C2S, 5, 1, 1)
    assert kept.body == b"kept\n"


def test_patience_follows_the_full_spool_policy() -> None:
    assert patience_ms("block", None) == -1
    assert patience_ms("block", 2.5) == 2500
    assert patience_ms("fail", None) == 1000


def test_the_installed_relay_is_found() -> None:
    assert find_binary() is not None  # make install builds it into the virtualenv


def test_the_relay_setting(monkeypatch: pytest.MonkeyPatch, binary: Path) -> None:
    from collectors import stdio

    monkeypatch.setattr(stdio, "find_binary", lambda _cache=None: None)
    with pytest.raises(stdio.WrapError, match="native relay is not built"):  # fail closed, before the server
        stdio.relay_binary({"SCOPEWATCH_WRAP_RELAY": "native"})
    assert stdio.relay_binary({"SCOPEWATCH_WRAP_RELAY": "auto"}) is None  # falls back to the Python relay
    monkeypatch.setattr(stdio, "find_binary", lambda _cache=None: binary)
    assert stdio.relay_binary({}) == binary
    assert stdio.relay_binary({"SCOPEWATCH_WRAP_RELAY": "python"}) is None
    with pytest.raises(stdio.ConfigError, match="SCOPEWATCH_WRAP_RELAY"):  # the CLI's exit 2
        stdio.relay_binary({"SCOPEWATCH_WRAP_RELAY": "c"})
