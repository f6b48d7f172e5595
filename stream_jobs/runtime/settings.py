"""Configuration, read from the environment (prefix ``SCOPEWATCH_``) and built in ``main()``.

Nothing here runs at import: call :func:`load_settings` where a command starts.
"""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path
from typing import Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from detections.live import LiveConfig
from schemas.topics import LOCAL_KAFKA_PORT, Topics


def _default_cache() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "scopewatch"


class Settings(BaseSettings):
    """Everything a scopewatch process needs to know about where things are."""

    model_config = SettingsConfigDict(env_prefix="SCOPEWATCH_", extra="ignore")

    home: Path = Field(default=Path(".scopewatch"), description="state folder: broker data, chDB data, logs, pid files")
    cache_dir: Path = Field(default_factory=_default_cache, description="downloaded Kafka jars and npm MCP servers")

    # Kafka
    bootstrap: str | None = Field(
        default=None, description="external Kafka bootstrap servers; default: the local broker"
    )
    kafka_port: int = LOCAL_KAFKA_PORT
    kafka_controller_port: int = 19093
    kafka_heap: str = "1g"
    topic_prefix: str = ""
    partitions: int = Field(default=4, ge=1, le=256)

    # ClickHouse
    clickhouse_dsn: str | None = Field(
        default=None, description="chdb:///path or http(s)://host:port; default chDB under home"
    )
    clickhouse_database: str = "scopewatch"
    clickhouse_user: str = "default"
    clickhouse_password: SecretStr = SecretStr("")

    # The process that owns an embedded chDB folder serves read-only SQL on this port (loopback only).
    query_port: int = 18124
    query_timeout_seconds: float = Field(
        default=30.0, gt=0, le=3600, description="longest a query through the sink's SQL endpoint may run"
    )
    query_max_rows: int = Field(
        default=100_000, ge=10_000, description="most rows one answer of the SQL endpoint may have"
    )
    query_max_result_bytes: int = Field(
        default=32 * 1024 * 1024, ge=1024 * 1024, description="most bytes (uncompressed) of one answer"
    )
    query_max_memory_bytes: int = Field(
        default=1024 * 1024 * 1024, ge=64 * 1024 * 1024, description="most memory one analyst query may use"
    )

    # Sink
    sink_batch_rows: int = Field(default=30_000, ge=1)
    sink_batch_seconds: float = Field(default=0.5, gt=0)
    sink_latency_target: float = Field(
        default=0.4,
        ge=0,
        description="seconds a row may spend in the sink (fetch wait, batch fill, flush): each batch fills for "
        "what that leaves after the recent flushes, at most sink_batch_seconds; 0: always sink_batch_seconds",
    )
    sink_backlog_rows: int = Field(
        default=150_000,
        ge=0,
        description="while the sink is behind (a batch filled up to sink_batch_rows), batches of up to this many "
        "rows: fewer, bigger parts to merge; 0 or not above sink_batch_rows: off",
    )
    sink_backlog_seconds: float = Field(
        default=2.0,
        ge=0,
        description="while the sink is behind, a batch fills for up to this long (stopping at the first fetch "
        "that brings nothing: caught up), so it can reach sink_backlog_rows; 0: sink_batch_seconds",
    )
    sink_raw_seconds: float = Field(
        default=2.0,
        ge=0,
        description="the raw tables' records (every sink topic but evidence) are held and flushed with a "
        "batch once the oldest is this old (or sink_batch_rows are held): fewer inserts per second at the "
        "same evidence latency; 0: every topic every batch",
    )
    sink_bulk_avro: bool = True
    """Evidence records go to the embedded engine as Avro containers it decodes (stream_jobs.bulk);
    false: every message is read in Python (the columnar fast reader), as before."""
    sink_decoder: Literal["auto", "rowbinary", "avro"] = Field(
        default="auto",
        description="how bulk containers reach chDB: transcoded to RowBinary in C (auto: when built) or as Avro",
    )
    sink_malloc_keep_mb: int = Field(
        default=256,
        ge=0,
        le=4096,
        description="the sink's C heap (glibc) keeps up to this many MiB of freed memory for the next batch "
        "instead of handing it back to the kernel (M_TRIM_THRESHOLD; allocations below it come from the heap, "
        "M_MMAP_THRESHOLD): no page faults re-touching each batch's message buffers; 0: glibc's defaults",
    )
    sink_fetch_wait_ms: int = Field(
        default=100, ge=0, le=5000, description="a sink fetch waits in the broker this long for 256 KiB"
    )
    sink_group: str = "scopewatch-sink"
    sink_client: Literal["librdkafka", "aiokafka"] = Field(
        default="librdkafka",
        description="the sink's Kafka consumer: librdkafka (confluent-kafka, C fetch path) or aiokafka",
    )

    # Stream job
    worker_group: str = "scopewatch-decisions"
    worker_web_port: int = 16066
    grace_seconds: float = Field(default=15.0, ge=0, description="wait for late identity/consent facts")
    amend_window_seconds: float = Field(default=600.0, ge=0, description="after grace: late facts still amend")
    retention_days: float = Field(default=7.0, gt=0, description="fact history kept for calls this old")
    sequence_slack_seconds: float = Field(
        default=0.5, ge=0, le=60, description="final calls wait this long so sequence rules see them in event order"
    )
    tick_seconds: float = Field(default=0.25, gt=0, description="how often idle partitions finalize calls")
    worker_batch_size: int = Field(default=1000, ge=1, le=100_000, description="events per decision batch")
    worker_batch_seconds: float = Field(default=0.02, gt=0, le=5, description="longest wait to fill a batch")
    worker_fetch_min_bytes: int = Field(
        default=1024 * 1024,
        ge=1,
        le=64 * 1024 * 1024,
        description="a worker fetch waits in the broker for this many bytes (or worker_fetch_wait_ms)",
    )
    worker_fetch_wait_ms: int = Field(
        default=50,
        ge=0,
        le=1000,
        description="longest a worker fetch waits in the broker: each cycle then carries more calls at paced rates"
        " (the call path crosses two fetches, so up to twice this is added to the latency)",
    )
    worker_commit_seconds: float = Field(
        default=0.5,
        ge=0,
        le=10,
        description="the worker commits its flushed offsets at most this often (0: after every batch);"
        " after a crash at most this much more input is judged again (idempotently)",
    )
    worker_engine: Literal["aiokafka", "faust"] = Field(
        default="aiokafka",
        description="how the decision worker runs: aiokafka (the runner over getmany batches) or faust (two agents)",
    )
    worker_session_timeout_seconds: float = Field(
        default=30.0, ge=6, le=300, description="a silent worker leaves the group (its partitions move) after this"
    )
    worker_slot: str | None = Field(
        default=None,
        pattern=r"^[A-Za-z0-9._-]{1,64}$",
        description="stable name of this worker in its group (static membership: a restart reclaims its partitions"
        " at once); unique per group; `scopewatch up --workers N` sets HOST-0 .. HOST-(N-1)",
    )

    # Every service
    stop_seconds: float = Field(
        default=10.0,
        gt=0,
        le=300,
        description="a service still stopping this long after SIGTERM exits anyway (uncommitted input is re-read)",
    )
    kafka_wait_seconds: float = Field(
        default=300.0, ge=0, description="a service started before Kafka answers waits this long, then exits 1"
    )
    trace_dir: Path | None = Field(
        default=None,
        description="latency bench only: each stream job appends a per-cycle timeline to DIR/ROLE-PID.jsonl "
        "(stream_jobs/trace.py); unset: off",
    )
    trace_role: str | None = Field(default=None, description="the ROLE of trace_dir's file names; default the program")

    # Pager
    pager_config: Path | None = Field(
        default=None, description="routes file (TOML/JSON); default HOME/pager.toml or HOME/pager.json when present"
    )
    pager_group: str | None = Field(
        default=None, description="pager consumer group; unset: the routes file's `group`, else scopewatch-pager"
    )

    @property
    def live_config(self) -> LiveConfig:
        return LiveConfig(
            grace=timedelta(seconds=self.grace_seconds),
            amend_window=timedelta(seconds=self.amend_window_seconds),
            retention=timedelta(days=self.retention_days),
            sequence_slack=timedelta(seconds=self.sequence_slack_seconds),
        )

    @field_validator("home", "cache_dir")
    @classmethod
    def _absolute(cls, value: Path) -> Path:
        return value.expanduser().resolve()

    @property
    def kafka_bootstrap(self) -> str:
        return self.bootstrap or f"127.0.0.1:{self.kafka_port}"

    @property
    def topics(self) -> Topics:
        return Topics.with_prefix(self.topic_prefix)

    @property
    def dsn(self) -> str:
        return self.clickhouse_dsn or f"chdb://{self.home / 'chdb'}"

    @property
    def embedded(self) -> bool:
        return self.dsn.startswith("chdb:")

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def log_dir(self) -> Path:
        return self.home / "logs"


def load_settings(**overrides: object) -> Settings:
    """Build settings from the environment, with explicit overrides (e.g. CLI options) on top."""
    clean = {k: v for k, v in overrides.items() if v is not None}
    return Settings(**clean)  # type: ignore[arg-type]
