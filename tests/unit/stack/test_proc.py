"""Unit tests for scopewatch.stack.proc (real processes, no broker)."""

from __future__ import annotations

import dataclasses
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from scopewatch.stack import proc
from support.procs import gone

pytestmark = pytest.mark.timeout(60)


def _wait_for(cond: Callable[[], bool], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.02)
    return bool(cond())


def _children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2 :].split()
        if int(fields[1]) == pid or int(fields[2]) == pid:  # ppid or pgid
            out.append(int(entry.name))
    return out


@pytest.fixture
def records() -> Iterator[list[proc.PidRecord]]:
    """Collects spawned records and makes sure they are gone after the test."""
    spawned: list[proc.PidRecord] = []
    yield spawned
    for rec in spawned:
        proc.stop_process(rec, timeout=2.0)


def _spawn(tmp_path: Path, records: list[proc.PidRecord], argv: list[str]) -> proc.PidRecord:
    log = tmp_path / "logs" / "daemon.log"
    pid = proc.spawn_daemon(argv, log)
    rec = proc.PidRecord.for_pid(pid, "test", argv)
    records.append(rec)
    return rec


# ------------------------------------------------------------------ ports


def test_port_is_free_against_bound_and_listening_socket() -> None:
    port = proc.free_port()
    assert proc.port_is_free("127.0.0.1", port)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        assert not proc.port_is_free("127.0.0.1", port)  # bound only
        sock.listen(1)
        assert not proc.port_is_free("127.0.0.1", port)  # listening
    assert proc.port_is_free("127.0.0.1", port)


def test_free_port_returns_distinct_usable_ports() -> None:
    ports = {proc.free_port() for _ in range(5)}
    assert all(1024 <= p <= 65535 for p in ports)
    assert len(ports) > 1


# ------------------------------------------------------------------ spawn / is_running / stop


def test_spawn_daemon_detached_with_log(tmp_path: Path, records: list[proc.PidRecord]) -> None:
    rec = _spawn(tmp_path, records, ["sh", "-c", "echo out-line; echo err-line >&2; exec sleep 30"])
    assert proc.is_running(rec)
    assert os.getpgid(rec.pid) == rec.pid
    assert os.getsid(rec.pid) == rec.pid
    log = tmp_path / "logs" / "daemon.log"
    assert _wait_for(lambda: "err-line" in log.read_text())
    assert "out-line" in log.read_text()
    # stdin is /dev/null
    assert os.readlink(f"/proc/{rec.pid}/fd/0") == "/dev/null"
    # Not our child: the launcher exits right away, the daemon is re-parented.
    with pytest.raises(ChildProcessError):
        os.waitpid(rec.pid, os.WNOHANG)


def test_spawn_daemon_appends_to_log(tmp_path: Path) -> None:
    log = tmp_path / "d.log"
    log.write_text("before\n")
    proc.spawn_daemon(["sh", "-c", "echo after"], log, env={"PATH": os.environ["PATH"]})
    assert _wait_for(lambda: "after" in log.read_text())
    assert log.read_text().startswith("before\n")


def test_spawn_daemon_env_and_cwd(tmp_path: Path) -> None:
    log = tmp_path / "env.log"
    env = {"PATH": os.environ["PATH"], "SW_TEST_VALUE": "hello-env"}
    proc.spawn_daemon(["sh", "-c", 'echo "$SW_TEST_VALUE $(pwd)"'], log, env=env, cwd=tmp_path)
    assert _wait_for(lambda: "hello-env" in log.read_text())
    assert str(tmp_path) in log.read_text()


def test_spawn_daemon_missing_program(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        proc.spawn_daemon(["/nonexistent/definitely-not-a-program"], tmp_path / "x.log")
    with pytest.raises(ValueError):
        proc.spawn_daemon([], tmp_path / "x.log")


def test_stop_process_terminates_and_reports(tmp_path: Path, records: list[proc.PidRecord]) -> None:
    rec = _spawn(tmp_path, records, ["sleep", "30"])
    assert proc.is_running(rec)
    assert proc.stop_process(rec, timeout=5.0) is True
    assert not proc.is_running(rec)
    assert _wait_for(lambda: gone(rec.pid))
    assert proc.stop_process(rec, timeout=5.0) is False


def test_stop_process_kills_whole_group(tmp_path: Path, records: list[proc.PidRecord]) -> None:
    rec = _spawn(tmp_path, records, ["sh", "-c", "sleep 30 & sleep 30 & wait"])
    assert _wait_for(lambda: len(_children_of(rec.pid)) >= 3)  # sh + 2 sleeps share the group
    group = _children_of(rec.pid)
    assert proc.stop_process(rec, timeout=5.0)
    assert _wait_for(lambda: all(gone(p) for p in group))


def test_stop_process_escalates_to_sigkill(tmp_path: Path, records: list[proc.PidRecord]) -> None:
    # SIG_IGN for TERM is inherited by the exec'd sleep as well.
    rec = _spawn(tmp_path, records, ["sh", "-c", "trap '' TERM; sleep 30; sleep 30"])
    time.sleep(0.2)
    started = time.monotonic()
    assert proc.stop_process(rec, timeout=0.5) is True
    assert time.monotonic() - started >= 0.5
    assert not proc.is_running(rec)


def test_recycled_pid_is_never_signalled(tmp_path: Path, records: list[proc.PidRecord]) -> None:
    rec = _spawn(tmp_path, records, ["sleep", "30"])
    assert rec.start_ticks is not None
    forged = dataclasses.replace(rec, start_ticks=rec.start_ticks + 1)
    assert not proc.is_running(forged)
    assert proc.stop_process(forged, timeout=1.0) is False
    assert proc.is_running(rec), "the real process must survive a stop with a stale record"
    missing = dataclasses.replace(rec, start_ticks=None)
    assert not proc.is_running(missing)


def test_zombie_child_is_not_running_and_gets_reaped() -> None:
    child = subprocess.Popen(["true"])
    ticks = proc.process_start_time(child.pid)
    rec = proc.PidRecord(child.pid, "zombie", ["true"], time.time(), ticks)
    assert _wait_for(lambda: Path(f"/proc/{child.pid}/stat").read_text().split(") ")[1].startswith("Z"))
    assert not proc.is_running(rec)
    assert proc.stop_process(rec) is False
    assert not Path(f"/proc/{child.pid}").exists()  # reaped by stop_process
    child.returncode = 0  # already reaped; keep Popen.__del__ quiet


def test_process_start_time_of_self_and_missing() -> None:
    assert isinstance(proc.process_start_time(os.getpid()), int)
    assert proc.process_start_time(2**22 + 12345) is None


# ------------------------------------------------------------------ pid records


def test_pid_record_roundtrip(tmp_path: Path) -> None:
    path = tmp_path / "run" / "svc.json"
    rec = proc.PidRecord.for_pid(os.getpid(), "self", [sys.executable, "-m", "pytest"], {"port": 1})
    proc.write_pid_record(path, rec)
    loaded = proc.read_pid_record(path)
    assert loaded == rec
    assert proc.is_running(loaded)
    assert not list(path.parent.glob(".*.tmp"))


def test_read_pid_record_missing_or_corrupt(tmp_path: Path) -> None:
    assert proc.read_pid_record(tmp_path / "nope.json") is None
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert proc.read_pid_record(bad) is None
    bad.write_text('{"name": "no pid"}')
    assert proc.read_pid_record(bad) is None


# ------------------------------------------------------------------ tail


def test_tail(tmp_path: Path) -> None:
    path = tmp_path / "log.txt"
    path.write_text("".join(f"line {i}\n" for i in range(20000)))
    assert proc.tail(path, 3) == "line 19997\nline 19998\nline 19999"
    assert proc.tail(path, 0) == ""
    short = tmp_path / "short.txt"
    short.write_text("a\nb")
    assert proc.tail(short, 10) == "a\nb"
    assert proc.tail(tmp_path / "missing.txt") == ""
