"""``scopewatch pager``: findings from ``audit.findings`` to PagerDuty, Slack and signed webhooks.

The I/O around :mod:`stream_jobs.pager_core` (grouping, windows, rate limits, retry decisions):

* runs on the one stream runner (:mod:`stream_jobs.runner`): :class:`PagerService` is the job,
  the worker's :class:`~stream_jobs.decisions.BatchProducer` its output; it consumes
  ``audit.findings`` (Avro, consumer group from the config, manual commits);
* delivers each page with one asyncio task per route (aiohttp), retrying on 429/5xx/no response
  with backoff (Retry-After honoured) until ``max_age_seconds``;
* records every attempt -- and every batch of held-back findings -- as a ``PageAttempt`` on
  ``audit.pages`` (acks=all; the sink lands it in the ``pages`` table) *before* the finding's
  offset may be committed: the rows are the runner cycle's outputs (a delivery task queues its
  attempt's row; the next cycle, at most ``TICK_SECONDS`` later, flushes it and awaits the acks,
  retrying in place while Kafka is unavailable), and a partition is committed only up to its
  oldest finding not yet fully recorded (``to_commit``), so a receiver that is down, or a pager
  that dies, loses no page;
* whenever it is given findings partitions (at start, and after a rebalance of a group of several
  pagers), re-reads the last ``max(window, max_age)`` of ``audit.pages`` for those partitions
  before it reads their findings, to rebuild their windows (a restart or a takeover neither
  re-pages a problem paged a minute ago nor forgets a page still being retried: the same page key,
  the same webhook id, attempt numbers carry on); a partition that goes away first has its
  deliveries stopped, its held-back counts recorded and its offsets committed, and its windows
  dropped (the ledger rows and findings are keyed by dedup key, so a window lives in one partition);
* pauses consumption while ``max_pending_pages`` deliveries or ``max_held_findings`` uncommitted
  findings are in flight (bounded state: the job's ``room``), and keeps polling so the group keeps it;
* writes counters to ``<home>/run/pager-stats.json`` every 2 s.

Secrets: the route's URL and secret only ever go into the HTTP request. Logs and ledger rows name
the route; error texts pass through :class:`stream_jobs.pager_config.Redactor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from schemas import CodecError, Finding, PageAttempt, decode, encode
from schemas.topics import partition_for
from stream_jobs.decisions import BatchProducer
from stream_jobs.kafka_adapter import KafkaConsumer
from stream_jobs.pager_config import PagerConfig, Redactor, Route, load_config, resolve_routes
from stream_jobs.pager_core import AttemptResult, Hold, OffsetTracker, Page, PageBook, RouteState
from stream_jobs.pager_render import ForensicParams, HttpRequest
from stream_jobs.runner import TP, Job, Message, Record, Runner, RunnerConfig
from stream_jobs.runtime.files import atomic_write
from stream_jobs.runtime.lifecycle import kafka_or_exit, service_logging, stop_on_signals
from stream_jobs.runtime.settings import Settings
from stream_jobs.trace import TRACE

__all__ = [
    "CONFIG_NAMES",
    "HttpSender",
    "PagerService",
    "PagerTopics",
    "find_config",
    "forensic_params",
    "run_pager_service",
    "send_test_page",
    "stats_file",
    "synthetic_finding",
]

log = logging.getLogger("scopewatch.pager")

CONFIG_NAMES = ("pager.toml", "pager.json")
MAX_RESPONSE_BYTES = 2048
TICK_SECONDS = 0.2
"""The runner's timer: queued ledger rows are flushed, held-back counts and expiry checked, this often."""


def find_config(settings: Settings, explicit: Path | None = None) -> Path | None:
    """The routes file: ``explicit``, else ``<home>/pager.toml`` or ``<home>/pager.json`` when present."""
    if explicit is not None:
        return explicit
    for name in CONFIG_NAMES:
        path = settings.home / name
        if path.exists():
            return path
    return None


def stats_file(settings: Settings) -> Path:
    return settings.run_dir / "pager-stats.json"


def forensic_params() -> ForensicParams | None:
    """Parameters of every forensic query (for the command line in a page), None if they cannot load."""
    try:
        from stream_jobs.forensics import load_queries

        return {name: [(p.name, p.required) for p in q.params] for name, q in load_queries().items()}
    except Exception as exc:  # noqa: BLE001 - a page without a precise command beats no page
        log.warning("forensic queries unavailable (%s); pages name the fallback parameters", exc)
        return None


@dataclass(frozen=True)
class PagerTopics:
    findings: str
    pages: str


class HttpSender:
    """One HTTP attempt: a response (status, Retry-After, a redacted excerpt of an error body) or an error."""

    def __init__(self, session: aiohttp.ClientSession, redact: Redactor) -> None:
        self.session = session
        self.redact = redact

    async def send(self, request: HttpRequest, timeout: float) -> AttemptResult:
        started = time.monotonic()
        try:
            async with self.session.request(
                request.method,
                request.url,
                data=request.body,
                headers=request.headers,
                timeout=aiohttp.ClientTimeout(total=timeout),
                allow_redirects=False,
            ) as response:
                head = await response.content.read(MAX_RESPONSE_BYTES)
                status, retry_after = response.status, response.headers.get("Retry-After")
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            latency = (time.monotonic() - started) * 1000
            text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            return AttemptResult(None, latency, None, self.redact(text))
        latency = (time.monotonic() - started) * 1000
        error = None
        if not 200 <= status < 300:
            text = self.redact(head.decode("utf-8", "replace"), limit=200)
            error = f"HTTP {status}" + (f": {text}" if text else "")
        return AttemptResult(status, latency, retry_after, error)


Recording = tuple[PageAttempt, Sequence[Hold]]
"""A ledger row and the holds it accounts for (released once the row is on the ledger)."""


class PagerService(Job[Message]):
    """The pager as a :class:`~stream_jobs.runner.Job` (module docstring)."""

    def __init__(
        self,
        config: PagerConfig,
        routes: list[Route],
        bootstrap: str,
        topics: PagerTopics,
        *,
        group: str | None = None,
        stats_path: Path | None = None,
        params: ForensicParams | None = None,
        clock: Callable[[], float] = time.time,
        rand: Callable[[], float] = random.random,
        drain_seconds: float = 10.0,
    ) -> None:
        self.config = config
        self.routes = routes
        self.bootstrap = bootstrap
        self.topics = topics
        self.group = group or config.group
        self.stats_path = stats_path
        self.clock = clock
        self.rand = rand
        self.drain_seconds = drain_seconds
        self.book = PageBook(config, routes, clock(), params)
        self.redact = Redactor.for_routes(routes)
        self.tracker = OffsetTracker()
        self.counters: Counter[str] = Counter()
        self.restored = 0
        self._stop = asyncio.Event()
        self._tasks: dict[asyncio.Task[None], str] = {}  # delivery task -> its page's dedup key
        self._owned: set[int] = set()  # findings partitions whose windows this pager holds
        self._findings_partitions = 0
        self._kafka: KafkaConsumer | None = None
        self._runner: Runner[Message] | None = None
        self._sender: HttpSender | None = None
        self._paused = False
        self._queue: list[Recording] = []  # rows to record in the next cycle
        self._in_flight: list[Recording] = []  # rows of the cycle being flushed
        self._last_flush = self._last_expire = clock()
        self.halted = False
        self.ready = asyncio.Event()
        """Set once the ledger is re-read and the consumer has joined (tests, readiness)."""

    def stop(self) -> None:
        self._stop.set()
        if self._runner is not None:
            self._runner.stop()

    def stats(self) -> dict[str, Any]:
        return {
            **self.counters,
            "pending_pages": self.book.pending,
            "held_findings": self.tracker.held,
            "windows": len(self.book.windows),
            "restored_windows": self.restored,
            "paused": int(self._paused),
            "routes": [r.name for r in self.routes],
        }

    # ------------------------------------------------------------------------------- run

    async def run(self) -> None:
        self._kafka = KafkaConsumer(self.bootstrap, self.group, [self.topics.findings], session_timeout=10.0)
        output = BatchProducer(self.bootstrap, Counter())
        config = RunnerConfig(
            max_records=500,
            batch_ms=200,
            timer_seconds=TICK_SECONDS,
            min_backoff=0.5,
            max_backoff=8.0,
            retry_in_place=True,  # a ledger row is written, or retried, never dropped
        )
        self._runner = runner = Runner(self._kafka, output, self, config)
        if self._stop.is_set():
            runner.stop()
        async with aiohttp.ClientSession() as http:
            self._sender = HttpSender(http, self.redact)
            reporter = asyncio.create_task(self._report())
            try:
                await runner.run()
            finally:
                reporter.cancel()
                self._write_stats()

    # ------------------------------------------------------------------- the runner's job

    def room(self) -> int:
        """Findings it may take now; 0 while ``max_pending_pages`` or ``max_held_findings`` is reached."""
        cfg = self.config
        room = min(cfg.max_pending_pages - self.book.pending, cfg.max_held_findings - self.tracker.held)
        full = room <= 0
        if full and not self._paused:
            log.warning("pausing consumption: %d pages pending, %d findings held", self.book.pending, self.tracker.held)
            self.counters["pauses"] += 1
        elif self._paused and not full:
            log.info("resuming consumption")
        self._paused = full
        return max(0, min(500, room))

    async def process(self, batch: Mapping[TP, Sequence[Record]], now: datetime) -> list[Message]:
        for tp, messages in batch.items():
            if tp[1] not in self._owned and self._kafka is not None:
                # fetched before the assignment hook rebuilt the partition's windows: read them again
                self._kafka.seek(tp, messages[0].offset)
                continue
            for msg in messages:
                await self._absorb(tp, msg)
        return self._outputs()

    async def timer(self, assignment: set[TP], now: datetime) -> list[Message]:
        at = self.clock()
        if at - self._last_flush >= self.config.suppressed_flush_seconds:
            self._last_flush = at
            self._take_suppressed()
        if at - self._last_expire >= 5.0:
            self._last_expire = at
            self.book.expire(at)
        return self._outputs()

    def _outputs(self) -> list[Message]:
        """The queued ledger rows as this cycle's messages (their holds are released once flushed)."""
        self._in_flight, self._queue = self._in_flight + self._queue, []
        return [(self.topics.pages, row.dedup_key.encode(), encode(row), None) for row, _ in self._in_flight]

    def flushed(self, ends: dict[TP, int]) -> None:
        recorded, self._in_flight = self._in_flight, []
        for row, holds in recorded:
            self.counters[f"recorded.{row.outcome}"] += 1
            self._release(self.book.release(holds))

    def reset(self, tps: set[TP]) -> None:
        # rows that did not reach the ledger: their findings stay held (uncommitted), read again later
        if self._in_flight:
            self.counters["unrecorded"] += len(self._in_flight)
        self._in_flight = []

    def to_commit(self, taken: dict[TP, int]) -> dict[TP, int]:
        offsets: dict[TP, int] = self.tracker.committable()  # type: ignore[assignment]  # keyed by TP here
        return offsets

    def committed(self, offsets: Mapping[TP, int]) -> None:
        self.tracker.committed(dict(offsets))

    async def drain(self) -> list[Message]:
        """Stop: finish attempts in flight (bounded), then record their rows and the held-back counts."""
        if self._tasks:
            log.info("stopping: waiting up to %.0fs for %d deliveries", self.drain_seconds, len(self._tasks))
            _done, pending = await asyncio.wait(set(self._tasks), timeout=self.drain_seconds)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.gather(*pending, return_exceptions=True)
        self._take_suppressed()
        return self._outputs()

    # ------------------------------------------------------------------------- findings

    async def _absorb(self, tp: TP, msg: Record) -> None:
        self.counters["findings"] += 1
        self.tracker.seen(tp, msg.offset)
        hold = Hold(tp, msg.offset)
        try:
            record = decode(msg.value or b"")
        except CodecError as exc:
            self.counters["undecodable"] += 1
            log.warning("%s[%d]@%d: not a record (%s); skipped", tp[0], tp[1], msg.offset, exc)
            self.tracker.done(tp, msg.offset)
            return
        if not isinstance(record, Finding):
            self.counters["not_findings"] += 1
            self.tracker.done(tp, msg.offset)
            return
        now = self.clock()
        offer = self.book.offer(record, hold, now)
        self.counters[offer.kind] += 1
        self._release(offer.release)
        page = offer.page
        if page is None:
            return
        if offer.kind in ("new", "resumed"):
            log.info(
                "page %s (%s %s): %s to %s",
                page.page_key,
                record.severity,
                record.rule_id,
                "opened" if offer.kind == "new" else "resumed",
                ", ".join(rs.route.name for rs in (*offer.start, *offer.rate_limited)) or "no route",
            )
        for rs in offer.rate_limited:
            step = self.book.rate_limited_row(page, rs, now)
            log.warning("page %s to %s: rate limited, not sent", page.page_key, rs.route.name)
            self._queue.append((step.row, step.holds))
        for rs in offer.start:
            task = asyncio.create_task(self._deliver(page, rs))
            self._tasks[task] = page.dedup_key
            task.add_done_callback(self._forget_task)

    def _forget_task(self, task: asyncio.Task[None]) -> None:
        self._tasks.pop(task, None)

    def _release(self, holds: Iterable[Hold]) -> None:
        for hold in holds:
            self.tracker.done(hold.partition, hold.offset)

    def _take_suppressed(self) -> None:
        for item in self.book.take_suppressed(self.clock()):
            log.debug(
                "page %s to %s: %d findings held back",
                item.page.page_key,
                item.state.route.name,
                item.row.findings_grouped,
            )
            self._queue.append((item.row, item.holds))

    # ------------------------------------------------------------------------ deliveries

    async def _deliver(self, page: Page, rs: RouteState) -> None:
        try:
            while True:
                request = self.book.begin_attempt(page, rs, self.clock())
                assert self._sender is not None
                result = await self._sender.send(request, rs.route.config.timeout_seconds)
                step = self.book.end_attempt(page, rs, result, self.clock(), self.rand())
                self._queue.append((step.row, step.holds))  # recorded by the next cycle, before any commit
                row = step.row
                level = logging.INFO if row.outcome == "delivered" else logging.WARNING
                log.log(
                    level,
                    "page %s to %s: %s (attempt %d, HTTP %s, %.0f ms)%s",
                    page.page_key,
                    rs.route.name,
                    row.outcome,
                    row.attempt,
                    row.http_status if row.http_status is not None else "-",
                    row.latency_ms,
                    f": {row.error}" if row.error else "",
                )
                if step.delay is None:
                    return
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), timeout=step.delay)
                if self._stop.is_set():
                    log.info("page %s to %s: left for the next start (stopping)", page.page_key, rs.route.name)
                    self.book.abandon(rs)
                    return
        except asyncio.CancelledError:
            self.book.abandon(rs)
            raise
        except Exception:
            self.book.abandon(rs)
            self.counters["delivery_errors"] += 1
            log.exception("page %s to %s: delivery task failed; it stays uncommitted", page.page_key, rs.route.name)

    # ------------------------------------------------------------------------- rebalances

    def _partition(self, dedup_key: str) -> int:
        """The findings partition of a dedup key (findings and ledger rows are keyed by it)."""
        return partition_for(dedup_key.encode("utf-8"), self._findings_partitions)

    async def revoking(self, tps: set[TP]) -> list[Message]:
        """Before a rebalance: stop the deliveries of these partitions; their rows and the held-back
        counts are recorded and what is recorded committed (the runner) before they go.

        Whoever owns a partition next -- another pager of the group, or this one again -- rebuilds
        its windows from the ledger and reads its uncommitted findings again, which resume the pages
        still being delivered. Stopping here keeps two pagers from delivering one page at once.
        """
        parts = {p for t, p in tps if t == self.topics.findings}
        if self._findings_partitions:
            moving = [task for task, key in self._tasks.items() if self._partition(key) in parts]
            for task in moving:
                task.cancel()
            if moving:
                await asyncio.gather(*moving, return_exceptions=True)
                log.info("stopped %d deliveries of partitions %s (rebalance)", len(moving), sorted(parts))
        self._take_suppressed()
        return self._outputs()

    async def revoked(self, tps: set[TP]) -> None:
        self.tracker.forget(tps)

    async def assigned(self, tps: set[TP]) -> None:
        """After a rebalance: drop the windows of partitions that went elsewhere, rebuild those of
        partitions that are new here from the ledger. (The runner processes none of their findings
        before this returns.)"""
        assert self._kafka is not None
        parts = {p for t, p in tps if t == self.topics.findings}
        known = self._kafka.consumer.partitions_for_topic(self.topics.findings) or set()
        self._findings_partitions = max(len(known), max(parts, default=-1) + 1, 1)
        gone, new = self._owned - parts, parts - self._owned
        self._owned -= gone
        if gone:
            dropped = self.book.forget(lambda key: self._partition(key) in gone)
            log.info("partitions %s moved to another pager: %d windows handed over", sorted(gone), dropped)
        if new:
            await self._restore(new)
        self._owned = parts
        if parts and not self.ready.is_set():
            self.ready.set()
            log.info("consuming %s as group %s", self.topics.findings, self.group)

    # ---------------------------------------------------------------------------- ledger

    async def _restore(self, partitions: set[int]) -> None:
        """Rebuild the windows of these findings partitions from the recent ledger (audit.pages)."""
        now = self.clock()
        horizon = max(self.config.window_seconds, self.config.max_age_seconds)
        rows: list[PageAttempt] = []
        ledger = await self._ledger_partitions()
        if not ledger:
            log.info("no ledger topic %s yet: starting with no windows", self.topics.pages)
            return
        reader = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False, group_id=None)
        await reader.start()
        try:
            tps = [TopicPartition(self.topics.pages, p) for p in ledger]
            reader.assign(tps)
            since = int((now - horizon) * 1000)
            starts = await reader.offsets_for_times({tp: since for tp in tps})
            ends = await reader.end_offsets(tps)
            remaining: dict[TopicPartition, int] = {}
            for tp in tps:
                start = starts.get(tp)
                if start is not None and start.offset < ends[tp]:
                    reader.seek(tp, start.offset)
                    remaining[tp] = ends[tp]
            deadline = time.monotonic() + 60
            while remaining:
                if time.monotonic() > deadline:
                    log.warning("ledger re-read timed out; windows may be incomplete")
                    break
                batch = await reader.getmany(*remaining, timeout_ms=500)
                for tp, messages in batch.items():
                    for msg in messages:
                        if msg.offset >= remaining.get(tp, 0):
                            break
                        with contextlib.suppress(CodecError):
                            record = decode(msg.value or b"")
                            if isinstance(record, PageAttempt) and self._partition(record.dedup_key) in partitions:
                                rows.append(record)
                for tp, end in list(remaining.items()):
                    if await reader.position(tp) >= end:  # past the end as it was (gaps in offsets included)
                        del remaining[tp]
        finally:
            await reader.stop()
        restored = self.book.restore(rows, now)
        self.restored += restored
        pending = sum(1 for p in self.book.windows.values() if p.restored and not p.done)
        log.info(
            "ledger: %d rows of the last %.0fs for findings partitions %s; %d windows open (%d pages to resume)",
            len(rows),
            horizon,
            sorted(partitions),
            restored,
            pending,
        )

    async def _ledger_partitions(self) -> list[int]:
        """Partition ids of the ledger topic; none when it does not exist (never creates it)."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            if self.topics.pages not in set(await admin.list_topics()):
                return []
            described = await admin.describe_topics([self.topics.pages])
        finally:
            await admin.close()
        return sorted(p["partition"] for t in described if t["topic"] == self.topics.pages for p in t["partitions"])

    # ----------------------------------------------------------------------------- stats

    def _write_stats(self) -> None:
        if self.stats_path is not None:
            atomic_write(self.stats_path, json.dumps({"at": time.time(), "pid": os.getpid(), **self.stats()}))

    async def _report(self) -> None:
        while True:
            with contextlib.suppress(OSError):
                self._write_stats()
            await asyncio.sleep(2.0)


# ----------------------------------------------------------------------------- entry points


def load(
    settings: Settings, config_path: Path, environ: Mapping[str, str] | None = None
) -> tuple[PagerConfig, list[Route]]:
    """The configuration and its routes with their secrets; PagerConfigError says what is missing."""
    config = load_config(config_path)
    return config, resolve_routes(config, os.environ if environ is None else environ)


def run_pager_service(
    settings: Settings, config_path: Path, *, group: str | None = None, log_level: str = "INFO"
) -> None:
    """Run the pager in the foreground until SIGTERM/SIGINT (PagerConfigError before it starts)."""
    service_logging(log_level.upper())
    TRACE.configure(settings.trace_dir, settings.trace_role)
    config, routes = load(settings, config_path)
    kafka_or_exit(settings.kafka_bootstrap, "pager", settings.kafka_wait_seconds)
    settings.run_dir.mkdir(parents=True, exist_ok=True)
    service = PagerService(
        config,
        routes,
        settings.kafka_bootstrap,
        PagerTopics(settings.topics.findings, settings.topics.pages),
        group=group,
        stats_path=stats_file(settings),
        params=forensic_params(),
    )
    log.info(
        "routes: %s; window %.0fs",
        ", ".join(f"{r.name} ({r.channel}, >= {r.config.min_severity})" for r in routes),
        config.window_seconds,
    )

    async def main() -> None:
        stop_on_signals(service.stop, settings.stop_seconds + service.drain_seconds, "pager")  # after its drain
        await service.run()

    asyncio.run(main())


async def send_test_page(
    config: PagerConfig,
    route: Route,
    finding: Finding,
    clock: Callable[[], float] = time.time,
    max_attempts: int = 3,
) -> list[PageAttempt]:
    """Deliver one page for ``finding`` to ``route`` now (no Kafka, no ledger): its attempt rows."""
    book = PageBook(config, [route], clock())
    rows: list[PageAttempt] = []
    page = book.offer(finding, Hold(None, 0), clock()).page
    if page is None:
        raise ValueError(f"route {route.name} does not take {finding.severity} findings of tenant {finding.tenant}")
    rs = page.routes[route.name]
    async with aiohttp.ClientSession() as http:
        sender = HttpSender(http, Redactor.for_routes([route]))
        while True:
            request = book.begin_attempt(page, rs, clock())
            result = await sender.send(request, route.config.timeout_seconds)
            step = book.end_attempt(page, rs, result, clock(), 0.0)
            rows.append(step.row)
            if step.delay is None or len(rows) >= max_attempts:
                return rows
            await asyncio.sleep(min(step.delay, 5.0))


def synthetic_finding(severity: str, tenant: str, now: datetime | None = None) -> Finding:
    """A synthetic finding for ``scopewatch pager send-test``."""
    at = now or datetime.now(UTC)
    return Finding(
        finding_id=f"test-{int(at.timestamp())}",
        dedup_key=f"pager_test|{tenant}|{int(at.timestamp())}",
        rule_id="pager_test",
        rule_version=1,
        severity=severity,  # type: ignore[arg-type]
        title="scopewatch pager test page",
        summary="A test page sent by `scopewatch pager send-test`; no agent did anything.",
        tenant=tenant,
        principal=None,
        agent_id=None,
        call_id="test-call",
        call_ids=["test-call"],
        session_id="test-session",
        grant_id=None,
        forensic_query="call_evidence",
        first_call_time=at - timedelta(seconds=1),
        last_call_time=at,
        details={},
        detected_at=at,
    )
