"""The decision stream job (faust-streaming), built by :func:`create_app`.

Two agents, each over a pair of co-partitioned topics, run the pure processors of
``detections.live`` and send what they return:

* ``attribute`` (stage 1) reads ``mcp.tool-calls`` and ``identity.sessions`` (key: session_id).
  Its state holds session histories and open calls; it forwards each call, with its attribution,
  to the internal topic ``scopewatch.calls-by-route`` keyed by the call's route (delegation key,
  or the session route when the session names nobody).
* ``authorize`` (stage 2) reads ``scopewatch.calls-by-route``, ``consent.grants`` and
  ``consent.approvals`` (key: the delegation key). Its state holds grant and approval histories and
  the calls it owns; every verdict version goes to ``audit.evidence``. ``consent.policies`` is read
  whole by a consumer of its own (``stream_jobs.decisions.PolicyFeed``), polled before each batch.

Faust assigns topics with the same partition count and the same subscribers together, so
partition p of both inputs of an agent lives on one worker. The internal topic is written with the
partition Kafka's default partitioner (murmur2) gives the key, which is how the grants topic is
keyed by its producers. A timer sends a tick to each assigned partition of the internal topic so
idle partitions still finalize calls at their deadline.

State is not kept in Faust tables (see ``stream_jobs.state`` for why): each stage keeps, per
partition, stores loaded from compacted changelog topics of its own on first use after an
assignment and dropped on revocation. Agents take events in batches (``take_events``: up to
``SCOPEWATCH_WORKER_BATCH_SIZE`` events or ``SCOPEWATCH_WORKER_BATCH_SECONDS``), run the pure
processors of ``detections.live`` on each event, then send the batch's outputs and changelog
writes (one per changed key) through the worker's own producer and wait for every acknowledgement
of exactly that batch's messages (each stage and the tick timer collect into their own buffer)
before the batch is acked. So an input offset is committed only after everything it produced is on the
broker: at-least-once, and the processors ignore redelivered events (evidence ids are
deterministic).

Agents only decode, call the core and emit. Raw bytes are decoded with our own Avro codec (not
``faust.Record``); an event that does not decode, is of the wrong type or makes the core fail
goes to the dead-letter topic with the reason, and is counted. Agents run with
``concurrency=1`` (faust-streaming#606). An input offset that jumps (events never delivered, the
faust-streaming#596 symptom) is logged and counted (``offset_gaps``, ``offsets_skipped``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal as signal_module
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from detections.live import LiveCounters, tick_message
from stream_jobs.assignor import CoPartitionedAssignor, by_topic, describe
from stream_jobs.decisions import (
    EXIT_NOT_COPARTITIONED,
    STAGE1_TABLES,
    STAGE2_TABLES,
    BatchProducer,
    Message,
    Sender,
    StageRunner,
    build_stages,
    changelog_topic,
    check_assignment,
    exit_worker,
    log_start,
    new_assignment,
    stage_groups,
    stats_path,
    worker_stats,
)
from stream_jobs.kafka_adapter import FETCH_MIN_BYTES, FETCH_WAIT_MS, leave_on_stop
from stream_jobs.metrics import remove_stale_worker_stats
from stream_jobs.runtime.files import atomic_write
from stream_jobs.runtime.kafka_admin import create_topics
from stream_jobs.runtime.lifecycle import StopTimer, kafka_or_exit, limit_repeats
from stream_jobs.runtime.settings import Settings

__all__ = [
    "EXIT_NOT_COPARTITIONED",
    "FETCH_MIN_BYTES",
    "FETCH_WAIT_MS",
    "STAGE1_TABLES",
    "STAGE2_TABLES",
    "BatchProducer",
    "Message",
    "Sender",
    "StageRunner",
    "changelog_topic",
    "create_app",
    "run_faust_worker",
    "stage_groups",
]

log = logging.getLogger("scopewatch.stream")


class _FetchTunedConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    """Faust's consumer thread, whose fetches wait in the broker for ``FETCH_MIN_BYTES`` or
    ``FETCH_WAIT_MS``, whichever comes first.

    Faust builds its aiokafka consumer with the 1-byte default (no setting reaches it), so a busy
    worker sent a fetch request for every few messages: about a tenth of its CPU went to fetch
    requests (py-spy at 490 calls/s). The values are set before the consumer starts, which is when
    aiokafka hands them to its fetcher; the wait adds at most ``FETCH_WAIT_MS`` per stage.
    """

    def _create_worker_consumer(self, transport: Any) -> Any:
        consumer = super()._create_worker_consumer(transport)
        consumer._fetch_min_bytes = FETCH_MIN_BYTES
        consumer._fetch_max_wait_ms = FETCH_WAIT_MS
        # Faust passes aiokafka's round robin when an app has no changelog tables (ours has none),
        # which splits partition p of a stage's two inputs across workers: use ours instead. The
        # coordinator is built at start() from this attribute.
        assignor = self.app.scopewatch_assignor  # type: ignore[attr-defined]
        consumer._partition_assignment_strategy = (assignor,)
        self._assignor = assignor
        return consumer

    async def on_thread_stop(self) -> None:
        leave_on_stop(getattr(self, "_consumer", None))  # a static member too: hand partitions over at once
        await super().on_thread_stop()


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> _FetchTunedConsumerThread:
        return _FetchTunedConsumerThread(self, loop=self.loop, beacon=self.beacon)


class _Transport(faust_aiokafka.Transport):
    Consumer = _Consumer


class _App(faust.App):
    """A Faust app whose consumer transport is :class:`_Transport` (the ``kafka://`` driver with
    tuned fetches); everything else is Faust's."""

    def _new_transport(self) -> Any:
        return _Transport(self.conf.broker_consumer, self)


def create_app(settings: Settings, *, app_id: str | None = None) -> faust.App:
    """A fresh Faust app for one worker process (never shared at module level)."""
    topics = settings.topics
    n = settings.partitions
    slot = settings.worker_slot
    groups = stage_groups(settings)
    app = _App(
        app_id or settings.worker_group,
        broker=f"kafka://{settings.kafka_bootstrap}",
        store="memory://",
        datadir=str(settings.home / "faust"),
        web_enabled=False,
        topic_partitions=n,
        topic_replication_factor=1,
        consumer_auto_offset_reset="earliest",
        key_serializer="raw",
        value_serializer="raw",
        table_standby_replicas=0,
        broker_session_timeout=settings.worker_session_timeout_seconds,
        consumer_group_instance_id=slot,
    )
    assignor = CoPartitionedAssignor(groups, slot=slot or "")
    app.scopewatch_assignor = assignor  # type: ignore[attr-defined]
    counters: Counter[str] = Counter()
    live_counters = LiveCounters()
    app.scopewatch_counters = counters  # type: ignore[attr-defined]
    app.scopewatch_live_counters = live_counters  # type: ignore[attr-defined]

    def raw_topic(*names: str) -> Any:
        return app.topic(*names, key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw")

    stage1_in = raw_topic(topics.tool_calls, topics.sessions)
    stage2_in = raw_topic(topics.calls_by_route, topics.grants, topics.approvals)

    producer = BatchProducer(settings.kafka_bootstrap, counters)
    ticks = Sender(producer, settings, counters)
    ready = asyncio.Event()
    stage1, stage2, changelogs = build_stages(settings, producer, counters, live_counters, ready)
    app.scopewatch_changelogs = changelogs  # type: ignore[attr-defined]
    app.scopewatch_stages = (stage1, stage2)  # type: ignore[attr-defined]
    batch, within = settings.worker_batch_size, settings.worker_batch_seconds

    @app.task  # type: ignore[untyped-decorator]
    async def prepare() -> None:
        # Runs once the worker has set up logging, which leaves aiokafka at DEBUG: about ten log
        # records per call, a tenth of the worker's time (bench/profile_decisions.py).
        logging.getLogger("aiokafka").setLevel(logging.WARNING)
        await create_topics(
            settings.kafka_bootstrap, list(changelogs.values()), n, configs={"cleanup.policy": "compact"}
        )
        ready.set()

    @app.agent(stage1_in, concurrency=1, name="attribute")
    async def attribute_agent(stream: Any) -> None:
        async for events in stream.take_events(batch, within=within):
            await stage1.run([event.message for event in events])

    @app.agent(stage2_in, concurrency=1, name="authorize")
    async def authorize_agent(stream: Any) -> None:
        async for events in stream.take_events(batch, within=within):
            await stage2.run([event.message for event in events])

    assignment = new_assignment()
    app.scopewatch_assignment = assignment  # type: ignore[attr-defined]

    @app.on_partitions_assigned.connect
    async def on_assigned(sender_app: Any, /, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        assigned: set[Any] = args[0] if args else kwargs.get("assigned", set())
        ok = check_assignment(assignment, ((tp.topic, tp.partition) for tp in assigned), assignor, settings)
        write_stats()
        if not ok:
            for stage in (stage1, stage2):
                stage.halted.set()
            os.kill(os.getpid(), signal_module.SIGTERM)  # the orderly, bounded stop (run_worker exits 78)

    @app.on_partitions_revoked.connect
    async def on_revoked(sender_app: Any, /, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        revoked: set[Any] = args[0] if args else kwargs.get("revoked", set())
        if revoked:
            log.info("partitions revoked: %s", describe(by_topic(revoked)))
        # Faust has waited for in-flight batches (ours send and await everything before acking):
        # forget the state, the next owner (maybe us again) reads it back from the changelogs.
        stage1.revoke({tp.partition for tp in revoked if tp.topic in (topics.tool_calls, topics.sessions)})
        stage2_topics = (topics.calls_by_route, topics.grants, topics.approvals)
        stage2.revoke({tp.partition for tp in revoked if tp.topic in stage2_topics})

    @app.on_before_shutdown.connect
    async def close_producer(sender_app: Any, /, *args: Any, signal: Any = None, **kwargs: Any) -> None:
        await producer.stop()  # Faust has stopped its consumer: no batch is in flight any more
        if stage2.policies is not None:
            await stage2.policies.stop()

    @app.timer(interval=settings.tick_seconds)  # type: ignore[untyped-decorator]
    async def tick() -> None:
        for tp in app.consumer.assignment():
            if tp.topic == topics.calls_by_route:
                await ticks.send(topics.calls_by_route, b"", tick_message(), tp.partition)

    stats_file = stats_path(settings)

    def write_stats() -> None:
        data = worker_stats(settings, assignment, counters, live_counters, (stage1, stage2), "faust")
        data["updated_at"] = datetime.now(UTC).isoformat()
        try:
            atomic_write(stats_file, json.dumps(data, indent=1, sort_keys=True))
        except OSError as exc:  # stats are best effort; never stop the job
            log.warning("cannot write %s: %s", stats_file, exc)

    @app.timer(interval=max(settings.tick_seconds, 1.0))  # type: ignore[untyped-decorator]
    async def stats_timer() -> None:
        write_stats()

    app.scopewatch_stats_file = stats_file  # type: ignore[attr-defined]
    return app


def run_faust_worker(settings: Settings, loglevel: str = "WARNING") -> None:
    """Run one decision worker on the Faust engine until it is stopped (SIGTERM/SIGINT).

    The stop is bounded by ``settings.stop_seconds`` and Faust's Kafka logging is rate-limited
    (:mod:`stream_jobs.runtime.lifecycle`).
    """
    from faust.worker import Worker

    class _Worker(Worker):
        stop_timer = StopTimer(settings.stop_seconds, "decision worker")

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            if not self.stdout.isatty():  # the spinner wrote cursor codes into the log file
                self.spinner = None

        def _on_sigterm(self) -> None:
            self.stop_timer.arm()
            super()._on_sigterm()

        def _on_sigint(self) -> None:
            self.stop_timer.arm()
            super()._on_sigint()

        def on_setup_root_logger(self, logger: logging.Logger, level: int) -> None:
            super().on_setup_root_logger(logger, level)
            limit_repeats(logger)
            # Our own lifecycle lines (start, assignment, revocation, stop) at INFO; the libraries stay at `level`.
            for name in ("faust", "mode", "aiokafka", "kafka"):
                logging.getLogger(name).setLevel(level)
            for handler in logger.handlers:
                handler.setLevel(min(handler.level or logging.INFO, logging.INFO))
            log.setLevel(logging.INFO)
            log_start(settings, "faust", removed)

    settings.home.mkdir(parents=True, exist_ok=True)  # Faust's workdir: a missing one made it exit 1, silently
    kafka_or_exit(settings.kafka_bootstrap, "decision worker", settings.kafka_wait_seconds, own_handler=True)
    removed = remove_stale_worker_stats(settings.run_dir)
    app = create_app(settings)
    worker = _Worker(app, loglevel=loglevel, quiet=True, workdir=str(settings.home))
    stages = app.scopewatch_stages  # type: ignore[attr-defined]
    code: int | str | None = 0
    try:
        worker.execute_from_commandline()
    except SystemExit as exc:
        code = exc.code
    finally:
        app.scopewatch_stats_file.unlink(missing_ok=True)  # type: ignore[attr-defined]
    exit_worker(any(stage.halted.is_set() for stage in stages), code)
