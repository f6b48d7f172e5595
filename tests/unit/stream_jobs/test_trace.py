"""The stream jobs' per-cycle trace: configured from the settings in main(), never read at import."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from stream_jobs.runtime.settings import Settings
from stream_jobs.trace import Trace


def test_importing_the_trace_reads_no_environment(tmp_path: Path) -> None:
    env = {**os.environ, "SCOPEWATCH_TRACE_DIR": str(tmp_path / "t")}
    code = "from stream_jobs.trace import TRACE; print(TRACE.enabled)"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_the_settings_configure_where_the_lines_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCOPEWATCH_TRACE_DIR", str(tmp_path / "t"))
    monkeypatch.setenv("SCOPEWATCH_TRACE_ROLE", "worker-a")
    settings = Settings()
    trace = Trace()
    assert not trace.enabled
    trace.line("cycle", s=0.1)  # off: nothing written
    assert not (tmp_path / "t").exists()
    trace.configure(settings.trace_dir, settings.trace_role)
    assert trace.enabled
    trace.line("cycle", s=0.25)
    trace.flush()
    (path,) = (tmp_path / "t").iterdir()
    assert path.name == f"worker-a-{os.getpid()}.jsonl"
    assert json.loads(path.read_text()) == {"s": 0.25, "k": "cycle"}
    trace.configure(None)
    assert not trace.enabled
