"""The ClickHouse sink: Kafka topics -> ClickHouse tables, committing offsets only after a write.

The sink batches by rows and time, inserts each table's rows with a deduplication token
built from the topic-partition-offset ranges in the batch, and commits the consumed
offsets only once ClickHouse accepted every insert of the batch. A failed flush is
retried with the same batch and the same tokens, and consumption pauses meanwhile.
Undecodable messages become ``dead_letters`` rows (stage ``sink``) and are counted.

When the ClickHouse is embedded (chDB), this process owns the data folder; it also
serves read-only SQL on a loopback port so analysts can query while the pipeline runs.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition
from clickhouse_connect.driver.client import Client

from schemas import decode
from stream_jobs.dead_letters import dead_letter_for
from stream_jobs.rows import Provenance, to_row

log = logging.getLogger("scopewatch.sink")


@dataclass
class Batch:
    rows: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: defaultdict(list))
    ranges: dict[tuple[str, int], list[int]] = field(default_factory=dict)  # tp -> [first, last]
    size: int = 0
    started: float = 0.0

    def add(self, table: str, row: dict[str, Any], topic: str, partition: int, offset: int) -> None:
        if self.size == 0:
            self.started = time.monotonic()
        self.rows[table].append(row)
        self.size += 1
        self.track(topic, partition, offset)

    def track(self, topic: str, partition: int, offset: int) -> None:
        span = self.ranges.setdefault((topic, partition), [offset, offset])
        span[0] = min(span[0], offset)
        span[1] = max(span[1], offset)

    def token(self, table: str) -> str:
        """Deduplication token: the same batch retried gives the same token."""
        spans = ",".join(f"{t}:{p}:{a}-{b}" for (t, p), (a, b) in sorted(self.ranges.items()))
        return f"{table}|{spans}"

    def offsets(self) -> dict[TopicPartition, int]:
        return {TopicPartition(t, p): last + 1 for (t, p), (_first, last) in self.ranges.items()}


class ClickHouseWriter:
    """Serialises all access to one ClickHouse client (chDB is one engine per process)."""

    def __init__(self, client: Client, database: str) -> None:
        self.client = client
        self.database = database
        self.lock = threading.Lock()

    def insert(self, table: str, rows: list[dict[str, Any]], token: str) -> None:
        columns = list(rows[0].keys())
        data = [[row[c] for c in columns] for row in rows]
        with self.lock:
            self.client.insert(
                f"{self.database}.{table}",
                data,
                column_names=columns,
                settings={"insert_deduplication_token": token, "async_insert": 0},
            )


@dataclass
class SinkConfig:
    bootstrap: str
    topics: list[str]
    group: str
    batch_rows: int = 10_000
    batch_seconds: float = 0.5
    retry_max_seconds: float = 10.0


class ClickHouseSink:
    def __init__(self, config: SinkConfig, writer: ClickHouseWriter) -> None:
        self.config = config
        self.writer = writer
        self.counters: Counter[str] = Counter()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        consumer = AIOKafkaConsumer(
            *self.config.topics,
            bootstrap_servers=self.config.bootstrap,
            group_id=self.config.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.config.batch_rows,
        )
        await consumer.start()
        try:
            batch = Batch()
            while not self._stop.is_set():
                timeout = self.config.batch_seconds
                if batch.size:
                    timeout = max(0.0, self.config.batch_seconds - (time.monotonic() - batch.started))
                records = await consumer.getmany(
                    timeout_ms=int(timeout * 1000), max_records=max(1, self.config.batch_rows - batch.size)
                )
                now = datetime.now(UTC)
                for messages in records.values():
                    for msg in messages:
                        self._absorb(batch, msg, now)
                due = batch.size >= self.config.batch_rows or (
                    batch.size and time.monotonic() - batch.started >= self.config.batch_seconds
                )
                if due or (batch.ranges and not batch.size):
                    await self._flush(consumer, batch)
                    batch = Batch()
            if batch.ranges:
                await self._flush(consumer, batch)
        finally:
            await consumer.stop()

    def _absorb(self, batch: Batch, msg: Any, now: datetime) -> None:
        prov = Provenance(msg.topic, msg.partition, msg.offset, now)
        try:
            record = decode(msg.value or b"")
            table, row = to_row(record, prov)
        except Exception as exc:  # noqa: BLE001 - bad input becomes a dead letter, never a crash
            self.counters["dead_letters"] += 1
            letter = dead_letter_for(
                msg.topic, msg.partition, msg.offset, msg.key, msg.value, "sink", f"{type(exc).__name__}: {exc}", now
            )
            log.warning("dead letter %s[%d]@%d: %s", msg.topic, msg.partition, msg.offset, letter.reason)
            table, row = to_row(letter, prov)
        batch.add(table, row, msg.topic, msg.partition, msg.offset)

    async def _flush(self, consumer: AIOKafkaConsumer, batch: Batch) -> None:
        """Write every table of the batch, then commit; retry the same batch until it lands."""
        delay = 0.2
        pending = dict(batch.rows)
        while True:
            try:
                for table in list(pending):
                    await asyncio.to_thread(self.writer.insert, table, pending[table], batch.token(table))
                    self.counters[f"rows.{table}"] += len(pending[table])
                    self.counters["rows"] += len(pending[table])
                    del pending[table]
                break
            except Exception as exc:
                self.counters["retries"] += 1
                log.warning("ClickHouse write failed (%s); retrying in %.1fs", exc, delay)
                if self._stop.is_set() and delay >= self.config.retry_max_seconds:
                    raise
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.config.retry_max_seconds)
        await consumer.commit(batch.offsets())
        self.counters["batches"] += 1
