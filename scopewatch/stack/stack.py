"""The local stack: a Kafka broker, the ClickHouse sink (owning embedded chDB) and the decision worker.

``up`` starts what is not running yet (so it resumes on an existing data folder), ``down``
stops by recorded process id exactly what ``up`` started, ``status`` reports both.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from scopewatch.stack import proc
from scopewatch.stack.kafka import (
    BrokerFailed,
    KafkaBroker,
    KafkaConfig,
    PortInUse,
    StackError,
    create_topics,
    ensure_kafka_jars,
    list_topics,
)
from stream_jobs.runtime.settings import Settings

SERVICES = ("sink", "worker", "pager")
OPTIONAL_SERVICES = ("pager",)
"""Started only when configured (the pager needs a routes file); not counted as down otherwise."""
MAX_WORKERS = 32


def worker_name(index: int) -> str:
    """The service name of the index-th local worker (1-based): ``worker``, ``worker2``, ``worker3``..."""
    return "worker" if index == 1 else f"worker{index}"


def worker_slot(index: int) -> str:
    """The stable group-instance name of the index-th local worker: a restart reclaims its partitions."""
    return f"{socket.gethostname()}-w{index}"


Report = Callable[[str], None]


def settings_env(settings: Settings) -> dict[str, str]:
    """The environment that gives a child process the same settings."""
    env = dict(os.environ)
    for name, value in settings.model_dump().items():
        if value is None:  # unset: the child decides (e.g. the pager takes its routes file's group)
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"SCOPEWATCH_{name.upper()}"] = str(value)
    return env


@dataclass
class ServiceStatus:
    name: str
    running: bool
    pid: int | None
    detail: str = ""


class Stack:
    def __init__(self, settings: Settings, report: Report | None = None) -> None:
        self.settings = settings
        self.report = report or (lambda _msg: None)

    # -- paths -----------------------------------------------------------------------
    @property
    def kafka_home(self) -> Path:
        return self.settings.home / "kafka"

    def pid_path(self, name: str) -> Path:
        return self.settings.run_dir / f"{name}.json"

    def log_path(self, name: str) -> Path:
        return self.settings.log_dir / f"{name}.log"

    def broker(self, libs: Path | None = None) -> KafkaBroker:
        s = self.settings
        config = KafkaConfig(
            home=self.kafka_home, port=s.kafka_port, controller_port=s.kafka_controller_port, heap=s.kafka_heap
        )
        return KafkaBroker(config, libs or Path("/nonexistent"))

    # -- up ----------------------------------------------------------------------------
    def up(self, timeout: float = 120.0, workers: int = 1) -> None:
        s = self.settings
        s.home.mkdir(parents=True, exist_ok=True)
        if s.bootstrap is None:
            self._up_kafka(timeout)
        else:
            self.report(f"using external Kafka at {s.bootstrap}")
        created = asyncio.run(
            create_topics(s.kafka_bootstrap, s.topics.all(), s.partitions, per_topic=s.topics.configs())
        )
        self.report(f"topics: {len(s.topics.all())} ready ({len(created)} created)")
        self._up_service(
            "sink",
            ["sink"],
            ports={"query_port": s.query_port} if s.embedded else {},
            ready=self._sink_ready,
            timeout=timeout,
        )
        if not 1 <= workers <= MAX_WORKERS:
            raise StackError(f"--workers must be between 1 and {MAX_WORKERS}")
        if workers > s.partitions:
            self.report(f"{workers} workers for {s.partitions} partitions: {workers - s.partitions} will stay idle")
        for index in range(1, workers + 1):
            self._up_worker(index, timeout)
        self._up_pager(timeout)

    def worker_records(self) -> list[tuple[str, proc.PidRecord]]:
        """The pid records of the local workers ``up`` started: (service name, record)."""
        out = []
        for index in range(1, MAX_WORKERS + 1):
            record = proc.read_pid_record(self.pid_path(worker_name(index)))
            if record is not None:
                out.append((worker_name(index), record))
        return out

    def _up_worker(self, index: int, timeout: float) -> None:
        """Start a worker with a stable slot; it is ready once it holds its share of the partitions
        (its stats file shows an assignment), not merely once the process runs."""
        name = worker_name(index)

        def ready() -> bool:
            record = proc.read_pid_record(self.pid_path(name))
            assignment = worker_assignment(self.settings.run_dir, record.pid) if record is not None else None
            return bool(assignment and assignment.get("generation"))

        self._up_service(
            name,
            ["worker"],
            ports={},
            ready=ready,
            timeout=timeout,
            env={"SCOPEWATCH_WORKER_SLOT": worker_slot(index)},
            detail=lambda pid: _holding(worker_assignment(self.settings.run_dir, pid)),
        )

    def _up_pager(self, timeout: float) -> None:
        from stream_jobs.pager import find_config, load, stats_file
        from stream_jobs.pager_config import PagerConfigError

        s = self.settings
        path = find_config(s, s.pager_config)
        if path is None:
            self.report("pager: no routes file (HOME/pager.toml or SCOPEWATCH_PAGER_CONFIG); not started")
            return
        try:
            load(s, path)  # a missing secret is a clear error before anything is spawned
        except PagerConfigError as exc:
            raise StackError(f"pager: {exc}") from exc
        stats_file(s).unlink(missing_ok=True)
        self._up_service("pager", ["pager"], ports={}, ready=lambda: stats_file(s).exists(), timeout=timeout)

    def _up_kafka(self, timeout: float) -> None:
        s = self.settings
        self.report(f"resolving Kafka broker jars (cache: {s.cache_dir})")
        libs = ensure_kafka_jars(s.cache_dir)
        broker = self.broker(libs)
        started = time.monotonic()
        if not broker.ensure_running(timeout):
            self.report(f"Kafka already running at {s.kafka_bootstrap}")
            return
        self.report(f"Kafka (KRaft) ready on {s.kafka_bootstrap} in {time.monotonic() - started:.1f}s")

    def _up_service(
        self,
        name: str,
        args: list[str],
        ports: dict[str, int],
        ready: Callable[[], bool],
        timeout: float,
        env: dict[str, str] | None = None,
        detail: Callable[[int], str] | None = None,
    ) -> None:
        record = proc.read_pid_record(self.pid_path(name))
        if record is not None and proc.is_running(record):
            self.report(f"{name} already running (pid {record.pid})")
            return
        for setting, port in ports.items():
            if not proc.port_is_free("127.0.0.1", port):
                raise PortInUse(port, f"SCOPEWATCH_{setting.upper()}")
        argv = [sys.executable, "-m", "scopewatch", *args]
        log = self.log_path(name)
        offset = log.stat().st_size if log.exists() else 0
        pid = proc.spawn_daemon(argv, log, env=settings_env(self.settings) | (env or {}), cwd=self.settings.home)
        record = proc.PidRecord.for_pid(pid, name, argv)
        proc.write_pid_record(self.pid_path(name), record)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not proc.is_running(record):
                raise StackError(f"{name} exited during start-up; last lines of {log}:\n{_tail_from(log, offset)}")
            if ready():
                extra = f"; {detail(pid)}" if detail is not None else ""
                self.report(f"{name} running (pid {pid}, log {log}{extra})")
                return
            time.sleep(0.2)
        proc.stop_process(record)
        raise StackError(
            f"{name} did not become ready in {timeout:.0f}s; last lines of {log}:\n{_tail_from(log, offset)}"
        )

    def _sink_ready(self) -> bool:
        if not self.settings.embedded:
            return (self.settings.run_dir / "sink-stats.json").exists()
        path = self.settings.run_dir / "query.json"
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            return False
        return not proc.port_is_free("127.0.0.1", int(info["port"]))

    # -- down --------------------------------------------------------------------------
    def down(self) -> list[str]:
        stopped: list[str] = []
        extra_workers = [name for name, _ in self.worker_records() if name != "worker"]
        for name in [*reversed(extra_workers), *reversed(SERVICES)]:
            path = self.pid_path(name)
            record = proc.read_pid_record(path)
            if record is not None and proc.stop_process(record):
                stopped.append(name)
                self.report(f"stopped {name} (pid {record.pid})")
            path.unlink(missing_ok=True)
        broker = self.broker()
        record = broker.running_record()
        if record is not None and broker.stop():
            stopped.append("kafka")
            self.report(f"stopped kafka (pid {record.pid})")
        (self.settings.run_dir / "query.json").unlink(missing_ok=True)
        return stopped

    # -- status ------------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        out: dict[str, Any] = {"home": str(self.settings.home), "services": []}
        broker = self.broker()
        rec = broker.running_record()
        if self.settings.bootstrap is None:
            out["services"].append(
                ServiceStatus(
                    "kafka", rec is not None, rec.pid if rec else None, self.settings.kafka_bootstrap
                ).__dict__
            )
        names = [*SERVICES[:2], *(name for name, _ in self.worker_records() if name != "worker"), *SERVICES[2:]]
        for name in names:
            record = proc.read_pid_record(self.pid_path(name))
            alive = record is not None and proc.is_running(record)
            if name in OPTIONAL_SERVICES and record is None:
                continue  # not configured, so not started: not "down"
            detail = str(self.log_path(name))
            if name.startswith("worker") and record is not None and alive:
                detail += "; " + _holding(worker_assignment(self.settings.run_dir, record.pid))
            out["services"].append(
                ServiceStatus(name, alive, record.pid if record and alive else None, detail).__dict__
            )
        if rec is not None or self.settings.bootstrap is not None:
            try:
                out["topics"] = sorted(asyncio.run(asyncio.wait_for(list_topics(self.settings.kafka_bootstrap), 15)))
            except Exception as exc:  # noqa: BLE001 - status reports, it does not fail
                out["topics_error"] = str(exc)
        out["clickhouse"] = self._row_counts()
        stats = self.settings.run_dir / "sink-stats.json"
        if stats.exists():
            try:
                out["sink"] = json.loads(stats.read_text())
            except ValueError:
                pass
        return out

    def _row_counts(self) -> dict[str, Any]:
        """Rows per table, through whatever owns ClickHouse; an error text when it cannot be read."""
        from scopewatch.sqlclient import SqlError, run_sql

        db = self.settings.clickhouse_database
        try:
            rows = run_sql(
                self.settings,
                f"SELECT name, total_rows FROM system.tables WHERE database = '{db}' ORDER BY name",
                timeout=15,
            )["rows"]
        except SqlError as exc:
            return {"error": str(exc)}
        counts = {str(name): int(n or 0) for name, n in rows}
        if "evidence_rows" in counts:  # evidence is a view since migration 0010 (no total_rows): its stored rows
            counts["evidence"] = counts["evidence_rows"]
        return counts


def worker_assignment(run_dir: Path, pid: int) -> dict[str, Any] | None:
    """The assignment a running worker reports in its stats file (None before it wrote one)."""
    for path in run_dir.glob(f"worker-*-{pid}.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        assignment = data.get("assignment")
        return assignment if isinstance(assignment, dict) else None
    return None


def _holding(assignment: dict[str, Any] | None) -> str:
    if not assignment or not assignment.get("generation"):
        return "no assignment yet"
    held = assignment.get("held") or {}
    if not held:
        return "holds no partitions (more workers than partitions)"
    return "holds " + ", ".join(f"{topic} {parts}" for topic, parts in held.items())


def _tail_from(path: Path, offset: int, lines: int = 40) -> str:
    try:
        with path.open("rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


__all__ = ["BrokerFailed", "PortInUse", "Stack", "StackError", "settings_env"]
