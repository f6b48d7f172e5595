"""A sink starting while another process holds its chDB folder for a moment waits, then owns it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
from integration.conftest import make_settings

from scopewatch.stack.kafka import KafkaBroker
from scopewatch.stack.stack import settings_env
from stream_jobs.service import query_endpoint_file

pytestmark = pytest.mark.integration

HOLD = """
import sys, time
from stream_jobs.clickhouse import connect
client = connect(sys.argv[1])
client.command("SELECT 1")
print("held", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_sink_waits_for_a_one_shot_holder_of_its_folder(
    tmp_path: Path, kafka_broker: KafkaBroker, cache_dir: Path
) -> None:
    settings = make_settings(tmp_path / "home", kafka_broker.config.bootstrap, cache_dir)
    env = settings_env(settings)
    # what `scopewatch sql` does when a crashed sink's query.json is stale: open the folder itself
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, settings.dsn, "4"], env=env, stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    log = (tmp_path / "sink.log").open("wb")
    sink = subprocess.Popen([sys.executable, "-m", "scopewatch", "sink"], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not query_endpoint_file(settings).exists():
            assert sink.poll() is None, (tmp_path / "sink.log").read_text()[-3000:]
            time.sleep(0.2)
        assert query_endpoint_file(settings).exists(), (tmp_path / "sink.log").read_text()[-3000:]
        assert holder.wait(timeout=10) == 0
        assert "in use by another process" in (tmp_path / "sink.log").read_text()  # it did have to wait
    finally:
        sink.terminate()
        sink.wait(timeout=60)
        holder.kill()
