"""Unit tests for scopewatch.stack.kafka that need no JVM and no network."""

from __future__ import annotations

import os
import socket
import stat
from pathlib import Path

import pytest

from scopewatch.stack import kafka, proc
from scopewatch.stack.kafka import (
    BrokerFailed,
    KafkaBroker,
    KafkaConfig,
    PortInUse,
    StackError,
    ToolMissing,
    ensure_kafka_jars,
)

pytestmark = pytest.mark.timeout(60)

FAKE_MVN = """#!/bin/sh
# Fake mvn for tests. Behaviour from $FAKE_MVN_MODE: ok | fail | partial
echo "$@" >> "$FAKE_MVN_CALLS"
for arg in "$@"; do
  case "$arg" in -DoutputDirectory=*) out="${arg#-DoutputDirectory=}";; esac
done
mkdir -p "$out"
case "$FAKE_MVN_MODE" in
  ok) touch "$out/kafka_2.13-9.9.9.jar" "$out/kafka-clients-9.9.9.jar"; exit 0;;
  partial) touch "$out/kafka_2.13-9.9.9.jar"; echo "[ERROR] connection reset while downloading"; exit 1;;
  *) echo "[ERROR] Failed to execute goal: could not resolve dependencies"; exit 1;;
esac
"""

POM = """<?xml version="1.0"?>
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>x</groupId><artifactId>y</artifactId><version>1</version>
  <properties><kafka.version>9.9.9</kafka.version></properties>
  <dependencies>
    <dependency><groupId>org.apache.kafka</groupId><artifactId>kafka_2.13</artifactId>
      <version>${kafka.version}</version></dependency>
  </dependencies>
</project>
"""


@pytest.fixture
def fake_mvn(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Puts a scripted ``mvn`` first on PATH; returns the file logging its calls."""
    bindir = tmp_path / "bin"
    bindir.mkdir()
    script = bindir / "mvn"
    script.write_text(FAKE_MVN)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    calls = tmp_path / "mvn-calls.txt"
    monkeypatch.setenv("PATH", f"{bindir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_MVN_CALLS", str(calls))
    monkeypatch.setenv("FAKE_MVN_MODE", "ok")
    return calls


@pytest.fixture
def pom(tmp_path: Path) -> Path:
    path = tmp_path / "pom.xml"
    path.write_text(POM)
    return path


def test_bundled_pom_version() -> None:
    assert kafka.bundled_pom().is_file()
    assert kafka.kafka_version() == "4.1.1"


def test_kafka_version_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.xml"
    bad.write_text("<project")
    with pytest.raises(StackError, match="cannot read Maven pom"):
        kafka.kafka_version(bad)
    empty = tmp_path / "empty.xml"
    empty.write_text("<project/>")
    with pytest.raises(StackError, match="no usable Kafka version"):
        kafka.kafka_version(empty)


def test_ensure_jars_resolves_once(tmp_path: Path, fake_mvn: Path, pom: Path) -> None:
    cache = tmp_path / "cache"
    libs = ensure_kafka_jars(cache, pom)
    assert libs == (cache / "kafka-9.9.9" / "libs").resolve()
    assert (libs / "kafka_2.13-9.9.9.jar").is_file()
    assert (libs.parent / ".complete").is_file()
    assert fake_mvn.read_text().count("copy-dependencies") == 1
    assert ensure_kafka_jars(cache, pom) == libs
    assert fake_mvn.read_text().count("copy-dependencies") == 1  # reused, mvn not run again
    assert sorted(p.name for p in cache.iterdir()) == ["kafka-9.9.9"]  # no temp leftovers


@pytest.mark.parametrize("mode", ["fail", "partial"])
def test_ensure_jars_failure_leaves_nothing_complete(
    tmp_path: Path, fake_mvn: Path, pom: Path, monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    monkeypatch.setenv("FAKE_MVN_MODE", mode)
    cache = tmp_path / "cache"
    with pytest.raises(StackError) as info:
        ensure_kafka_jars(cache, pom)
    msg = str(info.value)
    assert "Maven failed" in msg and "[ERROR]" in msg  # includes the mvn output tail
    assert list(cache.iterdir()) == []
    # A later successful run works.
    monkeypatch.setenv("FAKE_MVN_MODE", "ok")
    assert (ensure_kafka_jars(cache, pom) / "kafka-clients-9.9.9.jar").is_file()


def test_ensure_jars_redoes_incomplete_folder(tmp_path: Path, fake_mvn: Path, pom: Path) -> None:
    cache = tmp_path / "cache"
    half = cache / "kafka-9.9.9" / "libs"
    half.mkdir(parents=True)
    (half / "kafka_2.13-9.9.9.jar").write_text("truncated")  # no marker: not complete
    libs = ensure_kafka_jars(cache, pom)
    assert (libs / "kafka-clients-9.9.9.jar").is_file()
    assert fake_mvn.read_text().count("copy-dependencies") == 1


def test_tool_missing(tmp_path: Path, pom: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "empty-bin"))
    with pytest.raises(ToolMissing, match=r"apt-get install maven") as info:
        ensure_kafka_jars(tmp_path / "cache", pom)
    assert info.value.tool == "mvn"
    broker = KafkaBroker(KafkaConfig(tmp_path / "k"), tmp_path)
    with pytest.raises(ToolMissing, match=r"Java 17\+ \(apt-get install openjdk-17-jre-headless\)"):
        broker.command()
    assert issubclass(ToolMissing, StackError) and issubclass(StackError, RuntimeError)


def test_config_and_server_properties(tmp_path: Path) -> None:
    cfg = KafkaConfig(tmp_path / "k", port=23456, controller_port=23457, overrides={"num.partitions": "4"})
    assert cfg.bootstrap == "127.0.0.1:23456"
    assert cfg.home.is_absolute()
    broker = KafkaBroker(cfg, tmp_path / "libs")
    path = broker.write_config()
    props = dict(line.split("=", 1) for line in path.read_text().splitlines() if line and not line.startswith("#"))
    assert props["process.roles"] == "broker,controller"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:23456,CONTROLLER://127.0.0.1:23457"
    assert props["controller.quorum.bootstrap.servers"] == "127.0.0.1:23457"
    assert "controller.quorum.voters" not in props
    assert props["log.dirs"] == str(cfg.home / "data")
    assert props["offsets.topic.replication.factor"] == "1"
    assert props["share.coordinator.state.topic.min.isr"] == "1"
    assert props["num.partitions"] == "4"
    assert "kafka.logs.dir" in broker.log4j_path.read_text()
    for sub in ("data", "logs", "run"):
        assert (cfg.home / sub).is_dir()


def test_cluster_id_is_persisted(tmp_path: Path) -> None:
    broker = KafkaBroker(KafkaConfig(tmp_path / "k"), tmp_path)
    cid = broker.cluster_id()
    assert len(cid) == 22 and not cid.startswith("-")
    assert KafkaBroker(KafkaConfig(tmp_path / "k"), tmp_path).cluster_id() == cid
    # Recovered from meta.properties when the cluster-id file is lost.
    other = KafkaBroker(KafkaConfig(tmp_path / "k2"), tmp_path)
    other.data_dir.mkdir(parents=True)
    (other.data_dir / "meta.properties").write_text("version=1\ncluster.id=AbCdEfGhIjKlMnOpQrStUv\n")
    assert other.cluster_id() == "AbCdEfGhIjKlMnOpQrStUv"


def test_jvm_options_heap(tmp_path: Path) -> None:
    small = KafkaBroker(KafkaConfig(tmp_path, heap="128m"), tmp_path)._jvm_options()
    assert "-Xmx128m" in small and "-Xms128m" in small
    big = KafkaBroker(KafkaConfig(tmp_path, heap="1g"), tmp_path)._jvm_options()
    assert "-Xmx1g" in big and "-Xms256m" in big


def test_start_raises_port_in_use_before_anything_else(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(1)
        port = sock.getsockname()[1]
        broker = KafkaBroker(KafkaConfig(tmp_path / "k", port=port, controller_port=proc.free_port()), tmp_path)
        with pytest.raises(PortInUse) as info:
            broker.start()
    err = info.value
    assert err.port == port
    assert f"127.0.0.1:{port}" in str(err) and "KafkaConfig.port" in str(err)
    assert not broker.pid_path.exists()


def test_error_messages() -> None:
    err = BrokerFailed("Kafka exited", "line one\nline two\n")
    assert "Kafka exited" in str(err) and "line two" in str(err) and err.log_tail
    assert str(BrokerFailed("no tail")) == "no tail"
    assert "KafkaConfig.controller_port" in str(PortInUse(1234, "KafkaConfig.controller_port"))


def test_status_and_stop_when_not_running(tmp_path: Path) -> None:
    broker = KafkaBroker(KafkaConfig(tmp_path / "k"), tmp_path)
    status = broker.status()
    assert status["running"] is False and status["pid"] is None
    assert status["bootstrap"] == "127.0.0.1:19092"
    assert broker.stop() is False
    assert broker.running_record() is None
    with pytest.raises(BrokerFailed, match="not started"):
        broker.wait_ready(timeout=1)


def test_ensure_jars_removes_stale_partial_downloads(tmp_path: Path, fake_mvn: Path, pom: Path) -> None:
    cache = tmp_path / "cache"
    stale = cache / ".kafka-9.9.9.abc.partial"
    fresh = cache / ".kafka-9.9.9.def.partial"  # may belong to a concurrent download
    for d in (stale, fresh):
        (d / "libs").mkdir(parents=True)
    os.utime(stale, (0, 0))
    ensure_kafka_jars(cache, pom)
    assert not stale.exists() and fresh.exists()


def test_jvm_options_c1_only_and_extra_flags_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("SCOPEWATCH_KAFKA_JVM_OPTS", raising=False)
    plain = KafkaBroker(KafkaConfig(tmp_path), tmp_path)._jvm_options()
    assert "-XX:TieredStopAtLevel=1" in plain  # no C2 compiler threads (their warm-up cost, h16e)
    monkeypatch.setenv("SCOPEWATCH_KAFKA_JVM_OPTS", "-XX:StartFlightRecording=filename='/tmp/a b.jfr' -Dx=1")
    extra = KafkaBroker(KafkaConfig(tmp_path), tmp_path)._jvm_options()
    assert extra[: len(plain)] == plain
    assert extra[len(plain) :] == ["-XX:StartFlightRecording=filename=/tmp/a b.jfr", "-Dx=1"]
