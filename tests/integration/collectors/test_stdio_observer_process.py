"""`scopewatch wrap`'s observer process: lifetime, kill -9, a full spool, fail-closed start, restarts.

These run the real wrapper (``python -m scopewatch wrap``, or :class:`StdioWrapper` in this process)
in front of a small MCP stdio server with Kafka unreachable, so everything goes to the spool, which
is read back. The Kafka side of the same paths is covered by ``test_spool.py``.
"""

from __future__ import annotations

import base64
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from collectors import stdio
from collectors.chain import ChainStamper
from collectors.observer import McpSessionObserver, SessionIdentity
from collectors.spool import SpoolConfig, inspect_spool, read_pending
from collectors.stdio import KafkaSink, StdioWrapper
from schemas import DeadLetter, SessionBound, SessionEnded, ToolCall, ToolResult, decode
from schemas.topics import Topics
from support.procs import gone, observer_processes, relay_processes

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("wrap_relay")]

NOWHERE = "127.0.0.1:9"  # nothing listens on the discard port
SERVER = r"""
import json, sys
count = sys.argv[1]
n = 0
for line in sys.stdin:
    msg = json.loads(line)
    if msg.get("method") == "initialize":
        info = {"protocolVersion": "2025-06-18", "capabilities": {}, "serverInfo": {"name": "mini", "version": "1"}}
        out = {"jsonrpc": "2.0", "id": msg["id"], "result": info}
    elif msg.get("method") == "tools/call":
        n += 1
        open(count, "w").write(str(n))
        text = "echo: " + str(msg["params"]["arguments"].get("message", ""))[:20]
        out = {"jsonrpc": "2.0", "id": msg["id"], "result": {"content": [{"type": "text", "text": text}]}}
    else:
        continue
    sys.stdout.write(json.dumps(out) + "\n")
    sys.stdout.flush()
print("mini server done", file=sys.stderr)
"""


def server(tmp_path: Path) -> list[str]:
    script = tmp_path / "mini_server.py"
    script.write_text(SERVER)
    return [sys.executable, str(script), str(tmp_path / "calls-received")]


def received(tmp_path: Path) -> int:
    path = tmp_path / "calls-received"
    return int(path.read_text()) if path.exists() else 0


def env_for(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        SCOPEWATCH_HOME=str(tmp_path / "home"),
        SCOPEWATCH_BOOTSTRAP=NOWHERE,
        SCOPEWATCH_SPOOL_DIR=str(tmp_path / "spool"),
        SCOPEWATCH_REDACTION_KEY="test-redaction-key-0123456789abcdef",
    )
    env.update(extra)
    return env


def wrap(tmp_path: Path, env: dict[str, str], child: list[str] | None = None) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "scopewatch", "wrap", "--session-id", "s-1", "--tenant", "acme"]
    argv += ["--principal", "alice", "--agent-id", "agent-1", "--server", "mini", "--flush-timeout", "0.5", "--"]
    return subprocess.Popen(
        argv + (child or server(tmp_path)),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        bufsize=0,
    )


class Client:
    """Blocking JSON-RPC over two file descriptors (the wrapper's stdin and stdout)."""

    def __init__(self, wfd: int, rfd: int) -> None:
        self.wfd, self.rfd, self.buf = wfd, rfd, b""

    def send(self, message: dict[str, Any]) -> None:
        data = json.dumps(message).encode() + b"\n"
        while data:
            data = data[os.write(self.wfd, data) :]

    def receive(self) -> dict[str, Any]:
        while b"\n" not in self.buf:
            chunk = os.read(self.rfd, 1 << 16)
            if not chunk:
                raise EOFError
            self.buf += chunk
        line, self.buf = self.buf.split(b"\n", 1)
        return dict(json.loads(line))

    def call(self, i: int, message: str) -> dict[str, Any]:
        params = {"name": "echo", "arguments": {"message": message}}
        self.send({"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": params})
        return self.receive()

    def initialize(self) -> None:
        params = {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "1"}}
        self.send({"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": params})
        self.receive()


def all_threads_gone(pid: int) -> bool:
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except FileNotFoundError:
        return True
    return tasks == [str(pid)] and gone(pid)


def spooled(spool: Path) -> list[Any]:
    report = inspect_spool(spool)
    assert not report.problems
    return [decode(e.value) for s in report.segments for e in read_pending(s.path)]


def losses(records: list[Any]) -> list[dict[str, Any]]:
    return [json.loads(base64.b64decode(d.payload_b64)) for d in records if isinstance(d, DeadLetter)]


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.02)


def test_the_observer_process_ends_with_the_wrapper_and_the_session_is_recorded_in_order(tmp_path: Path) -> None:
    p = wrap(tmp_path, env_for(tmp_path))
    assert p.stdin and p.stdout and p.stderr
    client = Client(p.stdin.fileno(), p.stdout.fileno())
    client.initialize()
    [observer] = observer_processes(p.pid)
    assert Path(f"/proc/{observer}/comm").read_text().strip() == "scopewatch-obs"
    for i in range(1, 51):
        assert client.call(i, f"call {i}")["result"]["content"][0]["text"] == f"echo: call {i}"
    p.stdin.close()
    assert p.wait(timeout=60) == 0
    assert b"mini server done" in p.stderr.read()  # the server's stderr passes through
    assert gone(observer)  # the wrapper waited for it: no orphan
    events = spooled(tmp_path / "spool")
    assert [type(e) for e in events] == [SessionBound] + [ToolCall, ToolResult] * 50 + [SessionEnded]
    assert [e.collector.seq for e in events] == list(range(1, 103))
    assert [e.arguments["message"] for e in events if isinstance(e, ToolCall)] == [f"call {i}" for i in range(1, 51)]


def test_kill_9_the_wrapper_everything_it_relayed_is_recorded(tmp_path: Path) -> None:
    p = wrap(tmp_path, env_for(tmp_path))
    assert p.stdin and p.stdout
    client = Client(p.stdin.fileno(), p.stdout.fileno())
    client.initialize()
    [observer] = observer_processes(p.pid)
    relays = relay_processes(p.pid)
    calls = 300
    for i in range(1, calls + 1):
        client.call(i, f"call {i}")
    p.kill()  # right after the last answer: nothing waited for the observer
    p.wait(timeout=30)
    wait_for(lambda: gone(observer), 30, "the observer process to finish and exit")
    wait_for(lambda: all(gone(r) for r in relays), 30, "the native relay to go with the wrapper")
    report = inspect_spool(tmp_path / "spool")
    assert not any(report.locks.values())
    events = spooled(tmp_path / "spool")
    assert [type(e) for e in events] == [SessionBound] + [ToolCall, ToolResult] * calls  # no end is invented
    assert [e.collector.seq for e in events] == list(range(1, 2 * calls + 2))
    assert [e.arguments["message"] for e in events if isinstance(e, ToolCall)] == [
        f"call {i}" for i in range(1, calls + 1)
    ]


def test_bad_spool_settings_or_an_unusable_spool_stop_the_wrapper_before_the_server(tmp_path: Path) -> None:
    marker = tmp_path / "server-started"
    child = ["sh", "-c", f"touch {marker}"]
    bad = wrap(tmp_path, env_for(tmp_path, SCOPEWATCH_SPOOL_ON_FULL="drop-silently"), child)
    _out, err = bad.communicate(timeout=60)
    assert bad.returncode == 2 and b"on_full must be block or fail" in err
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    unusable = wrap(tmp_path, env_for(tmp_path, SCOPEWATCH_SPOOL_DIR=str(blocker / "spool")), child)
    _out, err = unusable.communicate(timeout=60)
    assert unusable.returncode == 2 and b"cannot use the spool directory" in err
    assert not marker.exists()


def test_a_dead_observer_process_is_replaced_and_the_loss_is_recorded(tmp_path: Path, wrap_relay: str) -> None:
    p = wrap(tmp_path, env_for(tmp_path))
    assert p.stdin and p.stdout and p.stderr
    client = Client(p.stdin.fileno(), p.stdout.fileno())
    client.initialize()
    assert len(relay_processes(p.pid)) == (1 if wrap_relay == "native" else 0)
    for i in range(1, 6):
        client.call(i, f"before {i}")
    [first] = observer_processes(p.pid)
    # what it spooled survives it (what it held only in memory would not: that is what killing it costs)
    wait_for(lambda: inspect_spool(tmp_path / "spool").pending == 11, 30, "the first events in the spool")
    os.kill(first, signal.SIGKILL)
    # all of it: a thread of a killed process may still hold the pipe open for a while (say, in fdatasync)
    # after its main thread is a zombie; until then the relay's copies still go into the pipe (and are lost
    # with it: the loss record says so, without a count)
    wait_for(lambda: all_threads_gone(first), 30, "the observer to die")
    for i in range(6, 11):
        assert client.call(i, f"after {i}")["result"]  # the relay never stopped
    [second] = observer_processes(p.pid)
    assert second != first
    p.stdin.close()
    assert p.wait(timeout=60) == 0
    assert b"the observer process died" in p.stderr.read()
    records = spooled(tmp_path / "spool")
    found = losses(records)
    assert any("observer process of this session died" in reason for d in found for reason in d["reasons"])
    assert sum(d["lost"] for d in found) >= 2  # the death, and the call that found no observer
    events = [e for e in records if not isinstance(e, DeadLetter)]
    epochs = sorted({e.collector.epoch for e in events})
    assert len(epochs) == 2  # the replacement stamps a new chain epoch
    later = [e for e in events if e.collector.epoch == epochs[1]]
    assert [e.collector.seq for e in later] == list(range(1, len(later) + 1))
    assert [e.arguments["message"] for e in later if isinstance(e, ToolCall)] == [f"after {i}" for i in range(7, 11)]
    assert isinstance(later[-1], SessionEnded)


def test_block_mode_a_full_spool_stops_the_relay_with_bounded_memory_and_no_silent_loss(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, wrap_relay: str
) -> None:
    """The observer is stuck (spool full, Kafka down, on_full=block): the relay stops once the copy pipe
    is full instead of queueing without bound. When the session ends anyway, every relayed message is
    either an event in the spool or counted in a loss record."""
    monkeypatch.setattr(stdio, "END_GRACE", 0.5)
    spool = tmp_path / "spool"
    config = SpoolConfig(spool, max_bytes=64 * 1024, on_full="block", fsync="never")
    sink = KafkaSink(NOWHERE, Topics(), ChainStamper("c-1", epoch=1), flush_timeout=0.5, spool=config, max_queued=20)
    identity = SessionIdentity(session_id="s-1", tenant="acme", principal="alice", agent_id="agent-1")
    observer = McpSessionObserver(identity, server_label="mini")
    monkeypatch.setenv("SCOPEWATCH_REDACTION_KEY", "test-redaction-key-0123456789abcdef")
    c2w_r, c2w_w = os.pipe()
    w2c_r, w2c_w = os.pipe()
    wrapper = StdioWrapper(server(tmp_path), observer, sink, stdin_fd=c2w_r, stdout_fd=w2c_w)
    answered: list[int] = []
    payload = "p" * 2000

    def agent() -> None:
        client = Client(c2w_w, w2c_r)
        try:
            for i in range(1, 5000):
                if stop.is_set():
                    return
                client.call(i, payload)
                answered.append(i)
        except (EOFError, OSError):
            pass

    def stop_when_stalled() -> None:
        last, since = -1, time.monotonic()
        while time.monotonic() - since < 2.0:  # no answer for 2 s: the relay is held up
            time.sleep(0.1)
            if len(answered) != last:
                last, since = len(answered), time.monotonic()
        stalled.append(len(answered))
        stop.set()  # no call after this one: the server's count is then exactly what was relayed
        assert wrapper._proc is not None
        wrapper._proc.send_signal(signal.SIGTERM)  # the server goes away while the relay is blocked

    stalled: list[int] = []
    stop = threading.Event()
    client = threading.Thread(target=agent, daemon=True)
    client.start()
    threading.Thread(target=stop_when_stalled, daemon=True).start()
    code = wrapper.run()
    assert wrapper.relay == wrap_relay
    os.close(w2c_w)  # the client sees the end of the session
    client.join(10)
    os.close(c2w_w)  # the relay's reading thread sees the end too
    os.close(w2c_r)
    time.sleep(0.2)
    os.close(c2w_r)
    assert code == -signal.SIGTERM
    assert stalled and 30 < stalled[0] < 1500  # bounded: ~the pipe's 1 MiB, the queue and the spool
    assert observer_processes(os.getpid()) == []
    records = spooled(spool)
    kinds = [type(e) for e in records if not isinstance(e, DeadLetter)]
    relayed = received(tmp_path)
    assert relayed >= stalled[0]
    lost = sum(d["lost"] for d in losses(records))
    assert lost > 0
    # session_bound + a call and a result (or a timeout) per relayed call + session_ended; the call that
    # was waiting for room when the server died is recorded too (with a timeout), though it never reached it
    assert len(kinds) + lost in (2 + 2 * relayed, 2 + 2 * (relayed + 1))


BLOCKED_WRAPPER = r"""
import os, sys
from pathlib import Path
from collectors.chain import ChainStamper
from collectors.observer import McpSessionObserver, SessionIdentity
from collectors.spool import SpoolConfig
from collectors.stdio import KafkaSink, StdioWrapper
from schemas.topics import Topics

config = SpoolConfig(Path(sys.argv[1]), max_bytes=64 * 1024, on_full="block", fsync="never")
sink = KafkaSink("127.0.0.1:9", Topics(), ChainStamper("c-1", epoch=1), flush_timeout=0.5, spool=config, max_queued=20)
identity = SessionIdentity(session_id="s-1", tenant="acme", principal="alice", agent_id="agent-1")
sys.exit(StdioWrapper(sys.argv[2:], McpSessionObserver(identity, server_label="mini"), sink).run())
"""


def test_kill_9_the_wrapper_while_its_observer_is_blocked_on_a_full_spool(tmp_path: Path) -> None:
    """No orphan even then: the observer stops waiting, records what has no room as lost, and exits."""
    spool = tmp_path / "spool"
    argv = [sys.executable, "-c", BLOCKED_WRAPPER, str(spool), *server(tmp_path)]
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env_for(tmp_path), bufsize=0)
    assert p.stdin and p.stdout
    client = Client(p.stdin.fileno(), p.stdout.fileno())
    answered: list[int] = []

    def agent() -> None:
        try:
            for i in range(1, 5000):
                client.call(i, "p" * 2000)
                answered.append(i)
        except (EOFError, OSError):
            pass

    threading.Thread(target=agent, daemon=True).start()
    wait_for(lambda: len(answered) > 0, 30, "the first answer")
    [observer] = observer_processes(p.pid)
    last, since, deadline = -1, time.monotonic(), time.monotonic() + 120
    while time.monotonic() - since < 2.0:  # no answer for 2 s: the relay is held up by the full spool
        assert time.monotonic() < deadline, "the relay never stopped"
        time.sleep(0.1)
        if len(answered) != last:
            last, since = len(answered), time.monotonic()
    assert 30 < len(answered) < 1500
    p.kill()
    p.wait(timeout=30)
    wait_for(lambda: all_threads_gone(observer), 30, "the observer process to exit")
    records = spooled(spool)
    assert sum(d["lost"] for d in losses(records)) > 0  # what had no room is counted, not dropped silently
    assert isinstance(records[0], SessionBound)
