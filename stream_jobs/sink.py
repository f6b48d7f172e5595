"""The ClickHouse sink: Kafka topics -> ClickHouse tables, committing offsets only after a write.

The sink batches by rows and time, inserts each table's rows with a deduplication token
built from the topic-partition-offset ranges in the batch, and commits the consumed
offsets only once ClickHouse accepted every insert of the batch. Undecodable messages
become ``dead_letters`` rows (stage ``sink``) and are counted.

Crash safety: before the first insert of a batch, its offset ranges are written to an
*intent* file (fsynced). If the process dies between an insert and the offset commit, the
next start finds the intent, re-reads exactly those offset ranges from the committed
offsets, rebuilds the same batch and inserts it with the same tokens -- ClickHouse drops
what it already has (``insert_deduplication_token``) -- then commits and clears the intent.
A commit that fails (a rebalance) takes the same path in-process.

The cycle is the one runner's (:mod:`stream_jobs.runner`): :class:`ClickHouseSink` is the job
(records to a :class:`Batch` of row tuples), :class:`ClickHouseOutput` its output (intent, inserts,
crash drills), and the runner takes the batch, flushes it, commits, and owns the rest: the redo of
exact offset ranges (at start from the intent; after a refused commit), and backpressure.

Backpressure: while ClickHouse refuses a batch, the runner pauses every assigned partition,
keeps polling (so it stays in the consumer group) and retries the same batch with backoff;
memory is bounded by one batch plus the consumer's fetch buffer. Counters: rows, batches,
retries, recoveries, dead letters, lag (high watermark minus committed offset).

Fast path: each message is read straight into a row tuple by a reader generated from its Avro
schema (:mod:`stream_jobs.columnar`); a batch's tuples are transposed into columns and inserted
column-oriented, DateTime64 values as integer milliseconds (into chDB as an Arrow table the
engine reads in place, into a server in Native format). Any message the fast reader does not
accept takes the full path -- ``schemas.decode`` (fastavro + the pydantic models), ``to_row`` and
``check_row`` -- which stores it or turns it into a dead letter with the reason, as before.
Both paths give byte-identical column values for a message (tests compare them).

What the fast reader checks per message (the trust boundary; details in stream_jobs.columnar):
the single-object header and a known fingerprint; a well-formed body consumed to its last byte
(minimal varints, lengths inside the body, valid UTF-8, valid union and boolean bytes); every
field present with its Avro type, which the generator matched one to one against the model's
fields; Literal values (event_type, transport, status, severity, channel, outcome); canonical
UUID event ids; the models' numeric ranges and finite floats; timestamps a datetime can hold;
no unknown fields; JSON fields parsed (orjson) as objects already in canonical form; and the
sink's own column checks below. What it relies on the producer for: only the spelling of floats
inside JSON fields (orjson and Python's json write a few differently; text from
``schemas.encode`` that orjson would respell takes the full path). Besides the models' checks,
``check_row`` (both paths) dead-letters values a column cannot hold (which used to fail the
whole insert on every retry), JSON with lone surrogates, and evidence verdicts outside
``detections.engine.VERDICTS``.

When the ClickHouse is embedded (chDB), this process owns the data folder; it also
serves read-only SQL on a loopback port so analysts can query while the pipeline runs.
"""

from __future__ import annotations

import asyncio
import gc
import json
import logging
import os
import tempfile
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

from clickhouse_connect.driver.client import Client

from schemas import decode
from stream_jobs import evidence_lists, rowbinary
from stream_jobs.assignor import by_topic, describe
from stream_jobs.bulk import AvroBulk, BulkBlock, bulk_specs
from stream_jobs.clickhouse import chdb_path
from stream_jobs.columnar import FastReader, arrow_table, fast_readers
from stream_jobs.dead_letters import dead_letter_for
from stream_jobs.kafka_adapter import KafkaConsumer
from stream_jobs.rows import COLUMNS, Provenance, check_row, millis, row_values, to_row
from stream_jobs.runner import TP, Consumer, Job, Record, Runner, RunnerConfig
from stream_jobs.runtime.files import atomic_write
from stream_jobs.trace import TRACE

if TYPE_CHECKING:
    from stream_jobs.rdkafka_adapter import RdKafkaConsumer

log = logging.getLogger("scopewatch.sink")


@dataclass
class Batch:
    rows: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    """Per insert unit (a table name, or ``<table>@<bulk unit>`` for a refused bulk block's rows), the row
    tuples (columns of ``rows.COLUMNS``) in arrival order."""
    blocks: dict[bytes, BulkBlock] = field(default_factory=dict)
    """Per message header (schema), the messages taking the bulk path (:mod:`stream_jobs.bulk`)."""
    ranges: dict[tuple[str, int], list[int]] = field(default_factory=dict)  # tp -> [first, last]
    size: int = 0
    started: float = 0.0
    ingested_ms: int = 0
    now: datetime | None = None
    pending: list[str] | None = None
    """The insert units not yet written (None: no attempt yet); a retry writes only these."""

    def add(self, table: str, row: Any, topic: str, partition: int, offset: int) -> None:
        if self.size == 0:
            self.started = time.monotonic()
        self.rows[table].append(row)
        self.size += 1
        self.track(topic, partition, offset)

    def track(self, topic: str, partition: int, offset: int) -> None:
        span = self.ranges.setdefault((topic, partition), [offset, offset])
        span[0] = min(span[0], offset)
        span[1] = max(span[1], offset)

    def token(self, unit: str) -> str:
        """Deduplication token of an insert unit: the same batch retried gives the same token."""
        spans = ",".join(f"{t}:{p}:{a}-{b}" for (t, p), (a, b) in sorted(self.ranges.items()))
        return f"{unit}|{spans}"

    def bulk_units(self) -> dict[str, BulkBlock]:
        """The bulk blocks by insert unit name (``<table>#<fingerprint hex>``)."""
        return {bulk_unit(block.spec): block for block in self.blocks.values() if len(block)}

    def units(self) -> list[str]:
        """The insert units in the order a flush writes them: evidence first (what ``evidence_current`` and
        the verdict latency read; a batch carrying held raw rows makes it visible before them), then the rest."""
        bulk = list(self.bulk_units())
        rows = list(self.rows)
        return [u for u in bulk if unit_table(u) == "evidence"] + [
            *(u for u in rows if unit_table(u) == "evidence"),
            *(u for u in bulk if unit_table(u) != "evidence"),
            *(u for u in rows if unit_table(u) != "evidence"),
        ]

    def offsets(self) -> dict[tuple[str, int], int]:
        return {(t, p): last + 1 for (t, p), (_first, last) in self.ranges.items()}

    def intent(self) -> dict[str, Any]:
        """What must be redone exactly if the process dies before the commit."""
        return {
            "ranges": [[t, p, a, b] for (t, p), (a, b) in sorted(self.ranges.items())],
            "tokens": {unit: self.token(unit) for unit in sorted(self.units())},
        }


def bulk_unit(spec: AvroBulk) -> str:
    return f"{spec.table}#{spec.header[2:].hex()}"


def unit_table(unit: str) -> str:
    """The table an insert unit writes to."""
    return unit.split("@", 1)[0].split("#", 1)[0]


INSERT_SETTINGS: dict[str, Any] = {"async_insert": 0, "optimize_on_insert": 0}
"""Settings of every sink insert (plus its deduplication token).

``async_insert=0``: the sink batches itself (26.x turns async inserts on by default, which adds
a wait). ``optimize_on_insert=0``: do not collapse rows with equal sort keys inside the inserted
block at insert time (ReplacingMergeTree), about a third of chDB's insert work for evidence rows.
Nothing relied on it: equal keys in different batches were never collapsed at insert time, so
readers already use ``FINAL`` / ``LIMIT 1 BY`` (``evidence_current``, ``verify``, forensics).
"""


ARROW_SETTINGS: dict[str, Any] = {"max_threads": 1, "max_insert_threads": 1, "min_insert_block_size_bytes": 0}
"""Extra settings of the embedded engine's Arrow insert: one reading thread and, with ``max_block_size``
and ``min_insert_block_size_rows`` set to the row count, exactly one block per insert. Then the
deduplication token covers the whole insert the same way on every retry (several blocks would
get per-block tokens whose boundaries could differ between attempts)."""


def _literal(value: Any) -> str:
    if isinstance(value, int):
        return str(value)
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


class BulkRefused(RuntimeError):
    """The engine refused a bulk (Avro) block's data: its messages take the per-message path."""


_SHM = "/dev/shm"  # noqa: S108 - only as mkstemp's folder (O_EXCL, mode 0600)
_TMP_DIR = _SHM if os.path.isdir(_SHM) and os.access(_SHM, os.W_OK) else None
"""Where a bulk block's container file is written for the engine to read (memory-backed when possible)."""

_FD_DIR = "/proc/self/fd"


class ScratchFile:
    """One unlinked file in ``_TMP_DIR`` that every bulk insert of a writer rewrites (issue 16).

    A new tmpfs file per insert faulted its pages in, zeroed, and freed them at the unlink (≈ 0.25 µs of
    kernel time per evidence row, 0.11 when the pages are reused). The engine reads it by its
    ``/proc/self/fd/<n>`` name; nothing else can open it (no name in the folder). It keeps the size of the
    last insert between inserts (``ftruncate`` frees the pages past it).
    """

    def __init__(self) -> None:
        fd, path = tempfile.mkstemp(prefix="scopewatch-sink-", suffix=".rowbinary", dir=_TMP_DIR)
        os.unlink(path)
        self.fd = fd
        self.path = f"{_FD_DIR}/{fd}"
        self._at = 0

    @staticmethod
    def usable() -> bool:
        return _TMP_DIR is not None and os.path.isdir(_FD_DIR)

    def rewind(self) -> None:
        self._at = 0

    def write(self, data: Any) -> None:
        view = memoryview(data).cast("B")
        while view:
            n = os.pwrite(self.fd, view, self._at)
            self._at += n
            view = view[n:]

    def finish(self) -> None:
        """Cut the file at what this insert wrote (the engine reads the whole file)."""
        os.ftruncate(self.fd, self._at)

    def put(self, data: Any) -> None:
        """The file's whole content for the next insert: ``data``."""
        self.rewind()
        self.write(data)
        self.finish()

    def close(self) -> None:
        os.close(self.fd)


SLOW_INSERT_SECONDS = 1.0
"""An insert that took longer (waiting for the writer's lock included) is logged and counted."""


class ClickHouseWriter:
    """Serialises all access to one ClickHouse client (chDB is one engine per process).

    Into the embedded engine (chDB), ``insert_columns`` hands the columns over as an Arrow table
    (``INSERT ... SELECT * FROM Python(table)``, read in place) on a connection of its own to
    the same engine; into a server, clickhouse-connect sends them column-oriented in Native format.
    Both store the same bytes (tests compare them with the old row-oriented insert).
    """

    def __init__(
        self, client: Client, database: str, fault_file: Path | None = None, decoder: rowbinary.Decoder = "auto"
    ) -> None:
        self.client = client
        self.database = database
        self.lock = threading.Lock()
        self.fault_file = fault_file
        """While this file exists, inserts fail as if ClickHouse were unreachable (outage drills, tests)."""
        self._types: dict[str, dict[str, str]] = {}
        self._chdb_path = chdb_path(client)
        self.insert_seconds_max = 0.0
        """Longest insert (waiting for the lock included) since :meth:`timing` last read it."""
        self.slow_inserts = 0
        """Inserts that took longer than SLOW_INSERT_SECONDS, waiting for the lock included."""
        self.decoder = decoder
        """How bulk containers reach the engine (:mod:`stream_jobs.rowbinary`): ``auto``/``rowbinary``
        transcoded to RowBinary when the library is built, ``avro`` as Avro."""
        self.rowbinary_fallbacks = 0
        """Bulk containers the RowBinary transcoder refused (inserted as Avro instead)."""
        self._scratches: dict[int, ScratchFile] = {}
        """The scratch files, made when first used (:meth:`_scratch_file`)."""
        self._scratch_lock = threading.Lock()
        """Held while a bulk insert writes and reads the scratch files (one bulk insert at a time)."""

    def timing(self) -> dict[str, int]:
        """``insert_ms_max`` since the last call (then reset) and the count of slow inserts so far."""
        longest, self.insert_seconds_max = self.insert_seconds_max, 0.0
        return {
            "insert_ms_max": round(longest * 1000),
            "slow_inserts": self.slow_inserts,
            "rowbinary_fallbacks": self.rowbinary_fallbacks,
        }

    def insert(self, table: str, rows: list[dict[str, Any]], token: str) -> None:
        """Insert dict rows (all with the same keys); datetimes or integer milliseconds for DateTime64.

        Always through clickhouse-connect (Native, column-oriented): for the few rows of a metrics
        snapshot or a test; the sink's batches go through :meth:`insert_columns`.
        """
        columns = list(rows[0].keys())
        self._insert(table, columns, [[row[c] for row in rows] for c in columns], token, arrow=False)

    def insert_columns(self, table: str, columns: list[str], data: Sequence[Sequence[Any]], token: str) -> None:
        """Insert column-oriented data: ``data[i]`` holds the values of ``columns[i]``, one per row.

        DateTime64 values must be integer milliseconds (as in the sink's row tuples).
        """
        self._insert(table, columns, data, token, arrow=True)

    def _insert(self, table: str, columns: list[str], data: Sequence[Sequence[Any]], token: str, arrow: bool) -> None:
        if table == evidence_lists.EVIDENCE:  # a view since migration 0010: its lists, then its rows
            self._insert_evidence(columns, list(zip(*data, strict=True)), token, arrow, None)
            return
        if self.fault_file is not None and self.fault_file.exists():
            raise ConnectionError(f"ClickHouse unavailable (drill: {self.fault_file} exists)")
        settings = {**INSERT_SETTINGS, "insert_deduplication_token": token}
        started = time.monotonic()
        try:
            self._insert_locked(table, columns, data, settings, arrow)
        finally:
            took = time.monotonic() - started
            self.insert_seconds_max = max(self.insert_seconds_max, took)
            if took > SLOW_INSERT_SECONDS:
                self.slow_inserts += 1
                log.warning("an insert into %s took %.1f s (lock wait included)", table, took)

    def _insert_locked(
        self, table: str, columns: list[str], data: Sequence[Sequence[Any]], settings: dict[str, Any], arrow: bool
    ) -> None:
        with self.lock:
            types = self._column_types(table)
        type_names = [types[c] for c in columns]
        batch = arrow_table(columns, type_names, data) if arrow and self._chdb_path else None  # outside the lock
        with self.lock:
            try:
                if batch is not None:
                    self._insert_arrow(table, columns, batch, settings)
                    return
                self.client.insert(
                    f"{self.database}.{table}",
                    data,
                    column_names=columns,
                    column_type_names=type_names,
                    column_oriented=True,
                    settings=settings,
                )
            except Exception:
                self._types.pop(table, None)  # the table may have changed: describe it again
                raise

    def _insert_arrow(self, table: str, columns: list[str], arrow_batch: Any, settings: dict[str, Any]) -> None:
        """INSERT ... SELECT from the Arrow table in place (chDB's ``Python()`` table function finds it by name)."""
        import chdb

        rows = max(1, arrow_batch.num_rows)
        settings = {**settings, **ARROW_SETTINGS, "max_block_size": rows, "min_insert_block_size_rows": rows}
        names = ", ".join(f"`{c}`" for c in columns)
        clause = ", ".join(f"{k} = {_literal(v)}" for k, v in settings.items())
        sql = f"INSERT INTO {self.database}.{table} ({names}) SELECT * FROM Python(arrow_batch) SETTINGS {clause}"
        conn = chdb.connect(self._chdb_path)  # type: ignore[no-untyped-call]  # own handle, closed right after
        try:
            conn.query(sql)
        finally:
            conn.close()

    @property
    def bulk_capable(self) -> bool:
        """Whether :meth:`insert_avro` can be used (the embedded engine reads the container from a file)."""
        return self._chdb_path is not None

    def insert_avro(
        self, block: BulkBlock, ingested_ms: int, token: str, between: Callable[[], None] | None = None
    ) -> None:
        """Insert a :class:`~stream_jobs.bulk.BulkBlock`: ClickHouse decodes the Avro container itself.

        Raises :class:`BulkRefused` when the engine refused the block's data (a row failed a check
        or did not read): the caller takes the per-message path for it. Anything else (the engine
        unreachable, the drill's fault file) raises as for any insert.

        Evidence goes in as its lists, then its rows (:meth:`_insert_evidence_bulk`); ``between`` is called
        in between (the crash drill's ``after_lists``).
        """
        if self.fault_file is not None and self.fault_file.exists():
            raise ConnectionError(f"ClickHouse unavailable (drill: {self.fault_file} exists)")
        if self._chdb_path is None:
            raise BulkRefused("the bulk path needs the embedded engine")
        rows = max(1, len(block))
        settings = {
            **INSERT_SETTINGS,
            **ARROW_SETTINGS,
            "insert_deduplication_token": token,
            "max_block_size": rows,
            "min_insert_block_size_rows": rows,
            "input_format_avro_allow_missing_fields": 0,
            # the plan of an INSERT ... SELECT from one file has nothing to optimise; planning the
            # optimisations still cost ~1 ms of every insert (chDB 4.4, 20-row blocks)
            "query_plan_enable_optimizations": 0,
        }
        clause = ", ".join(f"{k} = {_literal(v)}" for k, v in settings.items())
        target = f"{self.database}.{block.spec.table}"
        started = time.monotonic()
        try:
            if block.spec.table == evidence_lists.EVIDENCE:
                self._insert_evidence_bulk(block, ingested_ms, settings, between)
                return
            if ScratchFile.usable():
                with self._scratch_lock:
                    scratch = self._scratch_file(0)
                    scratch.rewind()
                    sql = block.spec.sql(target, scratch.path, block, ingested_ms, clause)
                    sql = self._write_container(scratch, block, scratch.path, sql)
                    scratch.finish()
                    self._query_bulk(sql)
            else:
                fd, path = tempfile.mkstemp(prefix="scopewatch-sink-", suffix=".avro", dir=_TMP_DIR)
                try:
                    sql = block.spec.sql(target, path, block, ingested_ms, clause)
                    with os.fdopen(fd, "wb") as out:
                        sql = self._write_container(out, block, path, sql)
                    self._query_bulk(sql)
                finally:
                    os.unlink(path)
        finally:
            took = time.monotonic() - started
            self.insert_seconds_max = max(self.insert_seconds_max, took)
            if took > SLOW_INSERT_SECONDS:
                self.slow_inserts += 1
                log.warning("an insert into %s took %.1f s (lock wait included)", block.spec.table, took)

    def _insert_evidence_bulk(
        self, block: BulkBlock, ingested_ms: int, settings: dict[str, Any], between: Callable[[], None] | None
    ) -> None:
        """A bulk evidence block: each group's distinct lists (``evidence_<group>_lists``, token ``<token>|<group>``)
        first, then the narrow rows (``evidence_rows``, the block's token), so that no row is ever visible
        without its lists (:mod:`stream_jobs.evidence_lists`). With the transcoder the keys and the batch's
        distinct lists come from C (RowBinary files); otherwise ClickHouse reads the Avro container for each
        insert and computes the keys in SQL (the same SHA-256)."""
        db = self.database
        rows_target = f"{db}.{evidence_lists.ROWS_TABLE}"
        token = str(settings["insert_deduplication_token"])

        def clause(extra: str = "") -> str:
            own = {**settings, "insert_deduplication_token": token + extra}
            return ", ".join(f"{k} = {_literal(v)}" for k, v in own.items())

        codec = rowbinary.codec_of(block.spec, self.decoder, evidence_lists.GROUPS)
        if codec is not None and ScratchFile.usable():
            with self._scratch_lock:
                got = codec.transcode_lists(block)
                if got is not None:
                    rows, lists = got
                    scratch = self._scratch_file(0)
                    sql = block.spec.sql(rows_target, scratch.path, block, ingested_ms, clause())
                    sql_rows = codec.rewrite(sql, scratch.path)
                    keys = {g: f"`{evidence_lists.key_column(g)}`" for g, _ in evidence_lists.GROUPS}
                    sql_rows = None if sql_rows is None else evidence_lists.narrow_insert(sql_rows, rows_target, keys)
                    if sql_rows is not None:
                        for j, (group, _cols) in enumerate(evidence_lists.GROUPS):
                            side = self._scratch_file(j + 1)
                            side.put(lists[j])
                            structure = rowbinary.quote(codec.side_structures[j])
                            self._query_bulk(
                                f"INSERT INTO {db}.{evidence_lists.list_table(group)} SELECT * FROM "
                                f"file({rowbinary.quote(side.path)}, RowBinary, {structure}) "
                                f"SETTINGS {clause('|' + group)}"
                            )
                        if between is not None:
                            between()
                        scratch.put(rows)
                        self._query_bulk(sql_rows)
                        return
                self.rowbinary_fallbacks += 1
        fd, path = tempfile.mkstemp(prefix="scopewatch-sink-", suffix=".avro", dir=_TMP_DIR)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(block.payload())
            full = block.spec.sql(rows_target, path, block, ingested_ms, clause())
            keys = {g: evidence_lists.key_sql(cols) for g, cols in evidence_lists.GROUPS}
            sql_rows = evidence_lists.narrow_insert(full, rows_target, keys)
            sql_lists = evidence_lists.lists_from_select(full, db, "")
            if sql_rows is None or sql_lists is None:
                raise BulkRefused("the evidence bulk SQL is not the expected one")
            for (group, _cols), sql in zip(evidence_lists.GROUPS, sql_lists, strict=True):
                self._query_bulk(sql + clause("|" + group))
            if between is not None:
                between()
            self._query_bulk(sql_rows)
        finally:
            os.unlink(path)

    def _scratch_file(self, index: int) -> ScratchFile:
        """The writer's ``index``-th scratch file (0: the rows; 1, 2: evidence's list groups)."""
        scratch = self._scratches.get(index)
        if scratch is None:
            scratch = self._scratches[index] = ScratchFile()
        return scratch

    def insert_evidence(
        self, columns: Sequence[str], rows: list[tuple[Any, ...]], token: str, between: Callable[[], None] | None
    ) -> None:
        """Evidence row tuples (the per-message path): each group's distinct lists, then the narrow rows;
        ``between`` is called in between (the crash drill's ``after_lists``)."""
        self._insert_evidence(columns, rows, token, True, between)

    def _insert_evidence(
        self,
        columns: Sequence[str],
        rows: list[tuple[Any, ...]],
        token: str,
        arrow: bool,
        between: Callable[[], None] | None,
    ) -> None:
        narrow, lists = evidence_lists.split_rows(columns, rows)
        for (group, cols), values in zip(evidence_lists.GROUPS, lists, strict=True):
            if values:
                data = list(zip(*values, strict=True))
                self._insert(evidence_lists.list_table(group), ["id", *cols], data, f"{token}|{group}", arrow)
        if between is not None:
            between()
        if narrow:
            names = list(evidence_lists.narrow_columns(columns))
            self._insert(evidence_lists.ROWS_TABLE, names, list(zip(*narrow, strict=True)), token, arrow)

    def _query_bulk(self, sql: str) -> None:
        import chdb

        with self.lock:
            conn = chdb.connect(self._chdb_path)  # type: ignore[no-untyped-call]
            try:
                conn.query(sql)
            except Exception as exc:
                raise BulkRefused(str(exc)[:500]) from exc
            finally:
                conn.close()

    def _write_container(self, out: Any, block: BulkBlock, path: str, sql: str) -> str:
        """Write ``block`` to ``out`` as RowBinary when the decoder allows and the transcoder reads it
        (returning the insert's SQL rewritten to read it), else as Avro (``sql`` unchanged)."""
        codec = rowbinary.codec_of(block.spec, self.decoder)
        if codec is not None:
            data = codec.transcode(block)
            rewritten = codec.rewrite(sql, path) if data is not None else None
            if data is not None and rewritten is not None:
                out.write(data)
                return rewritten
            self.rowbinary_fallbacks += 1
        out.write(block.payload())
        return sql

    def _column_types(self, table: str) -> dict[str, str]:
        """The table's column types, described once (clickhouse-connect would describe it on every insert)."""
        types = self._types.get(table)
        if types is None:
            result = self.client.query(f"DESCRIBE TABLE {self.database}.{table}")
            types = {str(row[0]): str(row[1]) for row in result.result_rows}
            self._types[table] = types
        return types


M_TRIM_THRESHOLD: Final = -1
M_MMAP_THRESHOLD: Final = -3


def keep_freed_memory(mb: int) -> bool:
    """Let glibc's heap keep up to ``mb`` MiB of freed memory (and serve allocations below that from the
    heap, not from fresh mmaps); True when set.

    Each batch allocates ~35 MB of message values (30,000 evidence records, one ``bytes`` each) and
    the container joined from them, then frees it all. With glibc's defaults the freed heap top is
    handed back to the kernel and the next batch faults every page in again, zeroed (perf of the
    sink: ~10 % of its CPU in page faults; a loop allocating and freeing what a batch does: 1.1 ->
    0.4 µs per row). Process-wide, for the sink's own process; nothing on other C libraries (musl).
    """
    if mb <= 0:
        return False
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    size = mb << 20
    ok = bool(mallopt(M_TRIM_THRESHOLD, size)) and bool(mallopt(M_MMAP_THRESHOLD, size))
    if not ok:
        log.info("glibc refused to keep %d MiB of freed memory (mallopt): its defaults stay", mb)
    return ok


@contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building a batch's rows or columns.

    Those loops allocate a container per message (or per row) that all stay alive, so the
    collections the allocations trigger find nothing to free and only cost time: about 15 % of
    absorbing a fetch, more when the heap is large. Nothing there makes cycles; any elsewhere are
    collected once it runs again. (Nested or concurrent use leaves it enabled at the end.)
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if collecting:
            gc.enable()


def columns_of(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """A batch's row tuples as columns, what ``ClickHouseWriter.insert_columns`` takes."""
    with _gc_paused():
        return list(zip(*rows, strict=True))


CRASH_POINTS = ("before_insert", "after_lists", "after_first_table", "after_insert", "after_commit")


@dataclass
class SinkConfig:
    bootstrap: str
    topics: list[str]
    group: str
    batch_rows: int = 10_000
    batch_seconds: float = 0.5
    retry_max_seconds: float = 10.0
    intent_file: Path | None = None
    crash_at: str | None = None
    """Test hook: ``os._exit(137)`` at this point of the ``crash_batch``-th flush (see CRASH_POINTS;
    ``after_lists``, between an evidence unit's lists and its rows: of the first flush from then on with evidence)."""
    crash_batch: int = 1
    recovery_timeout: float = 60.0
    fetch_partition_bytes: int = 4 * 1024 * 1024
    """Most bytes one fetch returns per partition (aiokafka's default, 1 MiB, is about 700 evidence rows):
    fewer, larger fetches leave the sink less time waiting for the broker. A fetch is capped at
    aiokafka's ``fetch_max_bytes`` (50 MiB) in all, so memory stays bounded."""
    fetch_min_bytes: int = 256 * 1024
    fetch_wait_ms: int = 100
    """A fetch waits (in the broker) for ``fetch_min_bytes`` or ``fetch_wait_ms``, whichever comes
    first. With aiokafka's defaults (1 byte) a busy sink sends a fetch request for every few
    messages: at a few thousand rows/s, a fifth of the sink's CPU went to fetch requests
    (py-spy). The wait adds at most ``fetch_wait_ms`` to a row's time to ClickHouse."""
    lag_interval: float = 2.0
    """Seconds between consumer-lag refreshes (one offset lookup per assigned partition)."""
    bulk_avro: bool = False
    """Hand the :data:`stream_jobs.bulk.BULK_TABLES` records to the embedded engine as Avro containers
    (decoded in C++) instead of reading each message in Python. The service turns it on
    (``SCOPEWATCH_SINK_BULK_AVRO``, default true); needs the embedded engine (chDB)."""
    lean_records: bool = True
    """Take messages from aiokafka as lean (topic, partition, offset, key, value) tuples instead of
    ``ConsumerRecord`` s (:func:`stream_jobs.kafka_adapter.make_lean`): the sink reads nothing else."""
    client: str = "librdkafka"
    """The Kafka client under the runner: ``librdkafka`` (:mod:`stream_jobs.rdkafka_adapter`, confluent-kafka)
    or ``aiokafka`` (:mod:`stream_jobs.kafka_adapter`). The service takes ``SCOPEWATCH_SINK_CLIENT``."""
    latency_target: float | None = None
    malloc_keep_mb: int = 0
    """The process's C heap keeps this many MiB of freed memory (:func:`keep_freed_memory`; 0: glibc's defaults)."""
    """Seconds a row may spend in the sink, from the broker to visible in ClickHouse (fetch wait, batch
    fill and flush): each batch is filled for as long as that leaves after the recent flushes' time
    (:func:`fill_seconds_for`), at most ``batch_seconds``. None: every batch fills ``batch_seconds``.
    The service takes ``SCOPEWATCH_SINK_LATENCY_TARGET``."""
    backlog_rows: int = 0
    """Above ``batch_rows``: while the sink is behind (its last batch filled up to its bound), the next
    batch takes up to this many records, filling ``backlog_seconds`` (the latency target is moot then):
    fewer, bigger inserts and parts, so fewer merge levels (merges were a quarter of the sink's CPU under
    a backlog). Back to ``batch_rows`` at the first batch that does not fill. Memory grows with it (the
    messages, their values joined, the RowBinary and its file: ~4 times the messages' bytes). 0: off.
    ``SCOPEWATCH_SINK_BACKLOG_ROWS``."""
    backlog_seconds: float = 0.0
    """Above 0 (with ``backlog_rows``): while behind, a batch fills for up to this long instead of
    ``batch_seconds``, and stops at the second fetch in a row that brings nothing within ``backlog_idle_ms``
    (caught up). The fetches bring ~50,000 rows a second on a 2-core host, so ``batch_seconds`` (0.5) capped a
    backlog batch at ~25,000 rows whatever ``backlog_rows`` said. ``SCOPEWATCH_SINK_BACKLOG_SECONDS``."""
    backlog_idle_ms: int = 500
    """See ``backlog_seconds`` (the service: 5 times ``fetch_wait_ms``, 500 ms at least). With 200 ms the
    librdkafka adapter's fetches came back empty twice in a row in the middle of a backlog (its consume call
    had not handed its records over yet), ending backlog batches at ~40,000 rows; with 600 ms they filled to
    90,000 in 0.85 s."""
    raw_seconds: float = 0.0
    """Above 0 (with ``fast_topics``): the records of every other topic (the raw tables: tool calls and
    results, identity and consent events, ...) are held across batches and flushed with the next batch
    once the oldest is this many seconds old, or they reach ``batch_rows``, or at a revocation or stop;
    the fast topics' records are flushed every batch as before. Each flush writes one batch (one
    intent, one token per table, offsets committed after it) of exactly the records it holds, so
    commit-after-write and the redo with the same tokens hold as before; held records are not
    committed (a crash reads them again). 0: every topic every batch. ``SCOPEWATCH_SINK_RAW_SECONDS``."""
    fast_topics: frozenset[str] | None = None
    """The topics flushed every batch when ``raw_seconds`` is on (the service: the evidence topic, which
    ``evidence_current`` and the verdict latency read)."""
    table_topics: dict[str, str] | None = None
    """Per table, the only topic its records may come from (:func:`table_topics`): a record of another
    type on a topic (a ``grant_issued`` on the tool-calls topic) is dead-lettered, not stored. None:
    any topic (tests of the column path)."""


FIRST_FETCH_SECONDS = 0.05
"""How long the fetch that starts a batch waits. librdkafka's ``consume`` returns only when it has
``batch_rows`` records or its time is up, so a batch used to start only after ``batch_seconds``
(then fill for ``batch_seconds`` more): at paced rates a row waited up to twice ``batch_seconds``.
With no records the runner just asks again."""

MIN_FILL_SECONDS = 0.1
"""The shortest batch fill the latency target sets. Flushes slowed down by a busy machine would
otherwise make batches ever smaller, each one's fixed cost adding to what slowed them."""


def fill_seconds_for(target: float, batch_seconds: float, fetch_wait: float, flush_seconds: Sequence[float]) -> float:
    """How long to fill the next batch after its first record so that a row's time in the sink stays near ``target``.

    A row waits in the broker for the fetch (at most ``fetch_wait``), for the fetch that starts the
    batch (:data:`FIRST_FETCH_SECONDS`), in the batch (the fill) and in the flush; chDB's cost per
    insert hardly depends on its size (10-16 ms of CPU for 20 rows or 2,000), so the longest fill
    the target allows is the cheapest. The flush's share is the median of the recent flushes
    (``flush_seconds``; their longest made the fill collapse after one slow flush on a busy
    machine): when flushes slow down the fill shrinks, when they are quick it grows back, never
    beyond ``batch_seconds`` nor under :data:`MIN_FILL_SECONDS`.
    """
    low = min(MIN_FILL_SECONDS, batch_seconds)
    recent = sorted(flush_seconds)
    worst = recent[len(recent) // 2] if recent else 0.0
    first = min(FIRST_FETCH_SECONDS, batch_seconds)
    return max(low, min(batch_seconds, target - fetch_wait - first - worst))


class WrongTopic(ValueError):
    """A record of a type that does not belong on the topic it came from."""


class ClickHouseOutput:
    """The sink's :class:`~stream_jobs.runner.Output`: a batch's rows into ClickHouse, crash-safe.

    ``flush`` writes the batch's intent (fsynced), then inserts each table with its deduplication
    token; the runner retries it in place (the same batch, so the same tokens; the tables already
    written are not sent again) while ClickHouse refuses. ``committed`` clears the intent once the
    runner has committed the batch's offsets. The crash drills (``SinkConfig.crash_at``) exit at each
    point of that cycle.
    """

    def __init__(self, config: SinkConfig, writer: ClickHouseWriter, counters: Counter[str]) -> None:
        self.config = config
        self.writer = writer
        self.counters = counters
        self._flushes = 0
        self.flush_seconds: deque[float] = deque(maxlen=8)
        """Wall seconds of the last successful flushes (the latency target's view of the flush's share)."""
        self.rows_of: Callable[[Sequence[Any], datetime], dict[str, list[tuple[Any, ...]]]] | None = None
        """The sink's per-message path (a refused bulk block's messages to rows per table)."""

    async def flush(self, out: Sequence[Batch]) -> dict[tuple[str, int], int]:
        started = time.monotonic()
        for batch in out:
            await self._write(batch)
        if out:
            self.flush_seconds.append(time.monotonic() - started)
        return {}

    async def _write(self, batch: Batch) -> None:
        if batch.pending is None:  # the first attempt (a retry repeats exactly what is still missing)
            self._flushes += 1
            self._write_intent(batch)
            self._crash_point("before_insert")
            batch.pending = batch.units()
        bulk = batch.bulk_units()
        while batch.pending:
            unit = batch.pending[0]
            started = time.perf_counter()
            if unit in bulk:
                block = bulk[unit]
                try:
                    await asyncio.to_thread(
                        self.writer.insert_avro, block, batch.ingested_ms, batch.token(unit), self._after_lists
                    )
                except BulkRefused as exc:
                    self._fall_back(batch, unit, block, exc)
                    continue
                table, count = block.spec.table, len(block)
                self.counters["bulk_rows"] += count
            else:
                rows = batch.rows[unit]
                table, count = unit_table(unit), len(rows)
                await asyncio.to_thread(self.insert, table, rows, batch.token(unit))
            self.counters[f"rows.{table}"] += count
            self.counters["rows"] += count
            if TRACE.enabled:
                took = time.perf_counter() - started
                TRACE.line("unit", t=round(time.time() - took, 4), table=table, rows=count, s=round(took, 4))
            batch.pending.pop(0)
            self._crash_point("after_first_table")  # some tables written, maybe not all
        self._crash_point("after_insert")

    def _fall_back(self, batch: Batch, unit: str, block: BulkBlock, exc: Exception) -> None:
        """A refused bulk block: its messages by the per-message path, as units of their own in its place."""
        self.counters["bulk_fallbacks"] += 1
        log.warning("bulk block %s (%d rows) refused, taking the per-message path: %s", unit, len(block), exc)
        if self.rows_of is None:
            raise exc
        rows = self.rows_of(block.messages, batch.now or datetime.now(UTC))
        units = []
        for table, table_rows in rows.items():
            key = f"{table}@{unit}"
            batch.rows[key] = table_rows
            units.append(key)
        batch.blocks = {h: b for h, b in batch.blocks.items() if b is not block}
        assert batch.pending is not None
        batch.pending[0:1] = units

    async def committed(self, offsets: Mapping[tuple[str, int], int]) -> None:
        self._crash_point("after_commit")
        self._clear_intent()
        self.counters["batches"] += 1

    async def stop(self) -> None:
        return None  # the writer belongs to the service (the metrics reporter writes through it too)

    def insert(self, table: str, rows: list[tuple[Any, ...]], token: str) -> None:
        if table == evidence_lists.EVIDENCE:
            self.writer.insert_evidence(COLUMNS[table], rows, token, self._after_lists)
            return
        self.writer.insert_columns(table, list(COLUMNS[table]), columns_of(rows), token)

    def _after_lists(self) -> None:
        self._crash_point("after_lists")  # an evidence unit's lists written, its rows not yet

    # -- crash safety

    def read_intent(self) -> dict[str, Any] | None:
        path = self.config.intent_file
        if path is None or not path.exists():
            return None
        try:
            intent: dict[str, Any] = json.loads(path.read_text())
            return intent
        except (OSError, ValueError) as exc:
            log.error("unreadable sink intent %s (%s): ignoring it; duplicates may show until merges", path, exc)
            self.counters["intent_unreadable"] += 1
            return None

    def _write_intent(self, batch: Batch) -> None:
        if self.config.intent_file is not None:
            atomic_write(self.config.intent_file, json.dumps(batch.intent()), durable=True)

    def _clear_intent(self) -> None:
        if self.config.intent_file is not None:
            self.config.intent_file.unlink(missing_ok=True)

    def _crash_point(self, point: str) -> None:
        # after_lists happens only in flushes with evidence: the first at or after the crash_batch-th flush
        due = (
            self._flushes >= self.config.crash_batch
            if point == "after_lists"
            else self._flushes == self.config.crash_batch
        )
        if self.config.crash_at == point and due:
            log.error("crash drill: exiting at %s of flush %d", point, self._flushes)
            os._exit(137)


class _Tp:
    __slots__ = ("partition", "topic")

    def __init__(self, topic: str, partition: int) -> None:
        self.topic, self.partition = topic, partition


class ClickHouseSink(Job["Batch"]):
    """The sink as a :class:`~stream_jobs.runner.Job` on the one :class:`~stream_jobs.runner.Runner`.

    One cycle: take up to ``batch_rows`` records or ``batch_seconds`` after the first one (all the
    sink topics, every assigned partition), turn them into one :class:`Batch` of row tuples
    (``process``), flush it through :class:`ClickHouseOutput` (retried in place while ClickHouse
    refuses, the runner holding back), commit the offsets. At start, an intent left by a flush that
    did not reach its commit makes the runner read exactly its offset ranges again first
    (:meth:`Runner.redo`), so they are inserted again with the same tokens.
    """

    def __init__(self, config: SinkConfig, writer: ClickHouseWriter) -> None:
        if config.crash_at is not None and config.crash_at not in CRASH_POINTS:
            raise ValueError(f"unknown crash point {config.crash_at!r}; one of {', '.join(CRASH_POINTS)}")
        self.config = config
        self.writer = writer
        self.counters: Counter[str] = Counter()
        self.lag: dict[str, int] = {}
        self.halted = False
        self.output = ClickHouseOutput(config, writer, self.counters)
        self.runner: Runner[Batch] | None = None
        self._consumer: KafkaConsumer | RdKafkaConsumer | None = None
        self._stopping = False
        self._readers: dict[bytes, FastReader] = fast_readers()
        capable = writer is not None and getattr(writer, "bulk_capable", False)
        self._bulks: dict[bytes, AvroBulk] = bulk_specs() if config.bulk_avro and capable else {}
        self.output.rows_of = self.rows_of
        self._held: Batch | None = None
        """Records of the slow topics held across batches (``SinkConfig.raw_seconds``)."""
        self._held_since = 0.0
        self._flushing: dict[TP, int] = {}
        """End offsets of the batch handed to the flush (committed once it is written)."""
        self._flushing_ranges: dict[TP, tuple[int, int]] = {}
        self._flushed_ranges: dict[TP, tuple[int, int]] = {}
        self._behind = False
        """The last batch filled up to its bound (``SinkConfig.backlog_rows``)."""
        """The offset ranges of the last batch flushed (what a refused commit must redo exactly)."""

    def stop(self) -> None:
        self._stopping = True
        if self.runner is not None:
            self.runner.stop()

    def stats(self) -> dict[str, Any]:
        self._sync_counters()
        timing = self.writer.timing() if self.writer is not None else {}
        return {**self.counters, **timing, "lag": sum(self.lag.values()), "lag_by_topic": dict(self.lag)}

    def _sync_counters(self) -> None:
        """The runner's counts of this sink's cycles, under the sink's names."""
        if self.runner is None:
            return
        r = self.runner.counters
        for name, value in (
            ("retries", r.retries),
            ("commit_failures", r.commit_failures),
            ("recoveries", r.redos),
            ("recoveries_abandoned", r.redos_abandoned),
        ):
            if value:
                self.counters[name] = value
        if r.retries:
            self.counters["paused"] = int(self.runner.paused)

    def new_consumer(self) -> KafkaConsumer | RdKafkaConsumer:
        """The sink's consumer (the runner starts it), of ``SinkConfig.client``."""
        c = self.config
        common: dict[str, Any] = {
            "session_timeout": 10.0,
            "fetch_min_bytes": c.fetch_min_bytes,
            "fetch_max_wait_ms": c.fetch_wait_ms,
            "max_partition_fetch_bytes": c.fetch_partition_bytes,
        }
        if c.client == "librdkafka":
            from stream_jobs.rdkafka_adapter import RdKafkaConsumer  # here: only the sink loads confluent-kafka

            return RdKafkaConsumer(c.bootstrap, c.group, list(c.topics), client_id="scopewatch-sink", **common)
        if c.client != "aiokafka":
            raise ValueError(f"unknown Kafka client {c.client!r}: librdkafka or aiokafka")
        return KafkaConsumer(c.bootstrap, c.group, list(c.topics), lean_records=c.lean_records, **common)

    def new_runner(self, consumer: Consumer) -> Runner[Batch]:
        cfg = self.config
        return Runner(
            consumer,
            self.output,
            self,
            RunnerConfig(
                max_records=cfg.batch_rows,
                batch_ms=max(1, int(min(cfg.batch_seconds, FIRST_FETCH_SECONDS) * 1000)),
                fill_seconds=cfg.batch_seconds,
                fill_from_last_take=True,  # the previous batch's flush counts toward the fill
                timer_seconds=cfg.lag_interval,
                min_backoff=0.2,
                max_backoff=cfg.retry_max_seconds,
                retry_in_place=True,
                redo_uncommitted=True,
                settle_commits_all=True,  # a revocation's flush of held rows commits all of them
                finish_on_stop=True,  # the rows taken when the stop came still land
                redo_timeout=cfg.recovery_timeout,
            ),
        )

    async def run(self) -> None:
        self._consumer = self.new_consumer()
        self.runner = runner = self.new_runner(self._consumer)
        # Everything made so far (modules, the engine's client, the generated readers) lives as long as
        # the process: out of the cyclic collector's way, its collections walk only what the batches make
        # (py-spy, paced: gc_collect_main was ~6 % of the sink's samples, walking the whole heap).
        gc.collect()
        gc.freeze()
        keep_freed_memory(self.config.malloc_keep_mb)
        if self._stopping:
            runner.stop()
        log.info(
            "sink starting: group %s, %d topics, Kafka client %s",
            self.config.group,
            len(self.config.topics),
            self.config.client,
        )
        intent = self.output.read_intent()
        if intent is not None:
            wanted = {(str(t), int(p)): (int(a), int(b)) for t, p, a, b in intent["ranges"]}
            log.warning("found an unfinished batch (%d partitions): redoing it with the same tokens", len(wanted))
            runner.redo(wanted)
        try:
            await runner.run()
        finally:
            self._sync_counters()

    # -- the Job

    async def assigned(self, tps: set[TP]) -> None:
        """Log the committed offsets the sink resumes from."""
        resume: dict[str, list[str]] = {}
        for tp in sorted(tps):
            committed = await self._consumer.committed(tp) if self._consumer is not None else None
            resume.setdefault(tp[0], []).append(f"{tp[1]}@{'start' if committed is None else committed}")
        log.info(
            "partitions assigned, resuming at the committed offsets: %s",
            "; ".join(f"{topic} {', '.join(parts)}" for topic, parts in resume.items()) or "none",
        )

    async def revoked(self, tps: set[TP]) -> None:
        if tps:
            log.info("partitions revoked: %s", describe(by_topic(_Tp(t, p) for t, p in tps)))

    async def process(self, batch: Mapping[TP, Sequence[Record]], now: datetime) -> list[Batch]:
        if self.config.backlog_rows > self.config.batch_rows and self.runner is not None:
            self._behind = sum(map(len, batch.values())) >= self.runner.config.max_records
        fast = self.config.fast_topics
        if not self._holding() or fast is None or (self.runner is not None and self.runner.redoing):
            # every record flushed now (a redo rebuilds exactly the batch that was flushed: one batch)
            out = Batch()
            for records in batch.values():
                self._absorb_many(out, records, now)
            return self._to_flush(out)
        held = self._held
        for tp, records in batch.items():
            if tp[0] in fast or not records:
                continue
            if held is None:
                held = self._held = Batch()
                self._held_since = time.monotonic()
            self._absorb_many(held, records, now)
        if held is not None and self._held_due(held):
            out, self._held = held, None
            out.ingested_ms, out.now = millis(now), now
        else:
            out = Batch()
        for tp, records in batch.items():
            if tp[0] in fast:
                self._absorb_many(out, records, now)
        return self._to_flush(out)

    async def timer(self, assignment: set[TP], now: datetime) -> list[Batch]:
        if self._consumer is not None and assignment:
            self.lag = await self._consumer.lag()
        held = self._held
        if held is not None and self._held_due(held):
            self._held = None
            return self._to_flush(held)
        return []

    def _holding(self) -> bool:
        return self.config.raw_seconds > 0 and self.config.fast_topics is not None

    def _held_due(self, held: Batch) -> bool:
        cfg = self.config
        return self._stopping or held.size >= cfg.batch_rows or time.monotonic() - self._held_since >= cfg.raw_seconds

    def _to_flush(self, out: Batch) -> list[Batch]:
        """``out`` as this cycle's output (nothing if empty); its offsets are what the cycle commits."""
        if not out.ranges:
            return []
        self._flushing.update(out.offsets())
        self._flushing_ranges.update({tp: (a, b) for tp, (a, b) in out.ranges.items()})
        return [out]

    async def revoking(self, tps: set[TP]) -> list[Batch]:
        """A revocation: flush what is held (of every partition; the runner commits all of it)."""
        held, self._held = self._held, None
        return self._to_flush(held) if held is not None else []

    async def drain(self) -> list[Batch]:
        """The stop: flush what is held."""
        held, self._held = self._held, None
        return self._to_flush(held) if held is not None else []

    def to_commit(self, taken: dict[TP, int]) -> dict[TP, int]:
        """The offsets of the batch just flushed (held records are not committed)."""
        offsets, self._flushing = self._flushing, {}
        self._flushed_ranges, self._flushing_ranges = self._flushing_ranges, {}
        return offsets

    def redo_ranges(self, batch: Mapping[TP, Sequence[Record]]) -> dict[TP, tuple[int, int]]:
        """A refused commit: the ranges of the batch flushed (held records of earlier cycles included)."""
        return dict(self._flushed_ranges)

    def flushed(self, ends: dict[TP, int]) -> None:
        """After each flush: the next batch's bound (bigger while behind) and fill time (under the latency target)."""
        cfg = self.config
        if self.runner is None:
            return
        if cfg.backlog_rows > cfg.batch_rows:
            self.runner.config.max_records = cfg.backlog_rows if self._behind else cfg.batch_rows
            self.counters["behind"] = int(self._behind)
            if self._behind:
                self.runner.config.fill_seconds = cfg.backlog_seconds or cfg.batch_seconds
                self.runner.config.fill_idle_ms = cfg.backlog_idle_ms if cfg.backlog_seconds > 0 else 0
                return
            self.runner.config.fill_idle_ms = 0
            self.runner.config.fill_seconds = cfg.batch_seconds  # (the latency target below may shorten it)
        if cfg.latency_target is None:
            return
        fill = fill_seconds_for(
            cfg.latency_target, cfg.batch_seconds, cfg.fetch_wait_ms / 1000, self.output.flush_seconds
        )
        self.runner.config.fill_seconds = fill
        self.counters["fill_ms"] = round(fill * 1000)

    def reset(self, tps: set[TP]) -> None:
        """A flush failed: the held records are dropped and read again (their partitions sought back)."""
        held, self._held = self._held, None
        self._flushing, self._flushing_ranges = {}, {}
        if held is None or self._consumer is None:
            return
        assigned = self._consumer.assignment()
        for tp, (first, _last) in held.ranges.items():
            if tp in assigned:
                self._consumer.seek(tp, first)

    # -- records to rows

    def _absorb_many(self, batch: Batch, messages: Sequence[Any], now: datetime) -> None:
        """Add one partition's messages (in offset order, as a fetch returns them) to the batch."""
        if not messages:
            return
        with _gc_paused():
            self._absorb_messages(batch, messages, now)

    def _absorb_messages(self, batch: Batch, messages: Sequence[Any], now: datetime) -> None:
        first = messages[0]
        topic, partition = first.topic, first.partition
        if batch.size == 0:
            batch.started = time.monotonic()
            batch.ingested_ms = millis(now)
            batch.now = now
        batch.track(topic, partition, first.offset)
        batch.track(topic, partition, messages[-1].offset)
        batch.size += len(messages)
        ingested = millis(now)
        readers = self._readers
        bulks = self._bulks
        blocks = batch.blocks
        runs: set[bytes] = set()
        rows = batch.rows
        expected = self.config.table_topics
        for msg in messages:
            value = msg.value
            if value is None:
                table, row = self._full_row(msg, now)
                rows[table].append(row)
                continue
            head = value[:10]
            bulk = bulks.get(head)
            if bulk is not None and (expected is None or expected.get(bulk.table) == topic):
                block = blocks.get(head)
                if block is None:
                    block = blocks[head] = BulkBlock(bulk)
                if head not in runs:  # this partition's run of values in the block
                    runs.add(head)
                    block.start_run(block.prefix(topic, partition))
                block.values.append(value)
                block.messages.append(msg)
                continue
            reader = readers.get(head)
            if reader is not None and (expected is None or expected.get(reader.table) == topic):
                try:
                    rows[reader.table].append(reader.read(value, topic, partition, msg.offset, ingested))
                    continue
                except Exception:  # noqa: BLE001, S110 - the full path decides (stores it, or says why not)
                    pass
            table, row = self._full_row(msg, now)
            rows[table].append(row)

    def rows_of(self, messages: Sequence[Any], now: datetime) -> dict[str, list[tuple[Any, ...]]]:
        """The per-message path for ``messages`` (any topics): row tuples per table, dead letters included."""
        out: dict[str, list[tuple[Any, ...]]] = defaultdict(list)
        ingested = millis(now)
        expected = self.config.table_topics
        with _gc_paused():
            for msg in messages:
                value = msg.value
                reader = self._readers.get(value[:10]) if value is not None else None
                if reader is not None and (expected is None or expected.get(reader.table) == msg.topic):
                    try:
                        out[reader.table].append(reader.read(value, msg.topic, msg.partition, msg.offset, ingested))
                        continue
                    except Exception:  # noqa: BLE001, S110 - the full path decides
                        pass
                table, row = self._full_row(msg, now)
                out[table].append(row)
        return dict(out)

    def _full_row(self, msg: Any, now: datetime) -> tuple[str, tuple[Any, ...]]:
        """The row of one message by the full path: decode, validate the model, map, check; or its dead letter."""
        self.counters["full_path"] += 1
        prov = Provenance(msg.topic, msg.partition, msg.offset, now)
        try:
            record = decode(msg.value or b"")
            table, row = to_row(record, prov)
            expected = self.config.table_topics
            if expected is not None and expected.get(table) != msg.topic:
                self.counters["wrong_topic"] += 1
                event_type = getattr(record, "event_type", type(record).__name__)
                raise WrongTopic(f"a {event_type} does not belong on {msg.topic} (its topic: {expected.get(table)})")
            check_row(table, row)
        except Exception as exc:  # noqa: BLE001 - bad input becomes a dead letter, never a crash
            self.counters["dead_letters"] += 1
            letter = dead_letter_for(
                msg.topic, msg.partition, msg.offset, msg.key, msg.value, "sink", f"{type(exc).__name__}: {exc}", now
            )
            log.warning("dead letter %s[%d]@%d: %s", msg.topic, msg.partition, msg.offset, letter.reason)
            table, row = to_row(letter, prov)
        return table, row_values(table, row)

    def _insert(self, table: str, rows: list[tuple[Any, ...]], token: str) -> None:
        self.output.insert(table, rows, token)
