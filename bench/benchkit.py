"""What the benchmark scripts share: one module, imported by every script in this folder.

* what a result belongs to: :func:`machine`, :func:`code_fingerprint`, :func:`announce`;
* printing: the rich :data:`console`, :func:`say`, :func:`mark`, :func:`ms`, :func:`percentile`,
  :func:`ms_p`, :func:`new_table` and :class:`RunsTable`;
* the command line and the run's life: :func:`add_common_options` (``--max-load``, ``--wait``,
  ``--keep``), :func:`quiet_load`, :func:`exit_with`, :func:`temp_folder`, :func:`pin_to`;
* CPU from ``/proc``: :func:`cpu_times`, :func:`sample_cpu`, :func:`cpu_shares`, :func:`busy_share`;
* the stack: :func:`local_broker`, :func:`pipeline_settings`, :func:`start_pipeline`,
  :func:`warmed_pipeline`, the worker's stats (:func:`wait_counters`, :func:`dead_letters`,
  :func:`diagnose`);
* traffic and read-back: :func:`fresh_call`, :func:`send_paced`, :func:`select`,
  :func:`select_by_call`, :func:`window`;
* keeping up: :func:`tenths`, :func:`kept_up`, :func:`verdict_rates`, :func:`measure_rates`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import hashlib
import json
import math
import os
import platform
import shutil
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Collection, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn, Protocol, TypeVar

from aiokafka import AIOKafkaProducer
from rich.console import Console
from rich.table import Table

from schemas import Event, SessionBound, ToolCall, encode
from schemas.avro_writer import fast_encode
from schemas.topics import partition_for
from scopewatch.publish import publish_events
from scopewatch.sqlclient import run_sql
from scopewatch.stack import proc
from scopewatch.stack.kafka import KafkaBroker, create_topics, start_broker
from scopewatch.stack.stack import Stack
from stream_jobs.runtime.settings import Settings

ROOT = Path(__file__).resolve().parent.parent

#: The sources of the decision path, whose speed or size ``decisions_throughput.py``,
#: ``profile_decisions.py`` and ``state_size.py`` measure (the default of :func:`code_fingerprint`).
DECISION_CODE = (
    "detections/live",
    "detections/compact.py",
    "detections/engine.py",
    "schemas/codec.py",
    "schemas/events.py",
    "stream_jobs/app.py",
)

console = Console(width=150)


# ------------------------------------------------------------------------- what a result belongs to


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def load_text() -> str:
    """The load average (1/5/15 min), as ``1.23 1.10 0.98``."""
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> str:
    return (
        f"{os.cpu_count()} cores (nproc), {cpu_model()}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.release()}; load average now {load_text()}; "
        f"{time.strftime('%Y-%m-%d %H:%M:%S %Z')}"
    )


def code_fingerprint(paths: tuple[str, ...] = DECISION_CODE) -> str:
    """``file sha256[:10]`` of each measured source (there is no commit to name while it changes); a
    package folder counts as the names and contents of its ``.py`` files."""
    parts = []
    for rel in paths:
        path = ROOT / rel
        try:
            if path.is_dir():
                h = hashlib.sha256()
                for file in sorted(path.rglob("*.py")):
                    h.update(file.relative_to(path).as_posix().encode() + b"\0" + file.read_bytes() + b"\0")
                digest = h.hexdigest()[:10]
            else:
                digest = hashlib.sha256(path.read_bytes()).hexdigest()[:10]
        except OSError:
            digest = "missing"
        parts.append(f"{rel} {digest}")
    return ", ".join(parts)


def announce(code: tuple[str, ...] = DECISION_CODE) -> None:
    """Print the machine and the sha256 prefixes of the measured sources: the first lines of every run."""
    say(f"machine: {machine()}")
    say(f"code: {code_fingerprint(code)}")


# ------------------------------------------------------------------------- printing


def say(msg: str) -> None:
    console.print(f"[dim]{time.strftime('%H:%M:%S')}[/] {msg}")


def mark(ok: bool) -> str:
    return "[green]PASS[/]" if ok else "[red]MISS[/]"


def ms(seconds: float) -> str:
    """Seconds as whole milliseconds, ``-`` for NaN (a percentile of nothing)."""
    return "-" if math.isnan(seconds) else f"{seconds * 1000:,.0f} ms"


def percentile(values: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) of ``values``, linear between closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = math.ceil(pos)
    if lo == hi:
        return ordered[lo]
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


def ms_p(values: Sequence[float], q: float) -> str:
    """The q-th percentile of ``values`` (seconds) in milliseconds, as :func:`ms` prints it."""
    return ms(percentile(values, q))


def new_table(title: str, columns: Iterable[str], left: Collection[str] = ("measure",)) -> Table:
    """A rich table with these columns: the ones named in ``left`` left-aligned, the others right-aligned."""
    table = Table(title=title)
    for col in columns:
        table.add_column(col, justify="left" if col in left else "right")
    return table


class RunsTable:
    """A table of measures (rows) by run (one column per run, headed by its offered rate)."""

    def __init__(self, title: str, runs: Sequence[Any], first: str = "measure") -> None:
        self.runs = runs
        self.table = Table(title=title)
        self.table.add_column(first)
        for r in runs:
            label = getattr(r, "label", "")
            self.table.add_column(f"{r.rate:,.0f}/s" + (f" {label}" if label else ""), justify="right")

    def row(self, name: str, cell: Callable[..., str]) -> None:
        """One row: ``name``, then ``cell(run)`` for every run."""
        self.table.add_row(name, *[cell(r) for r in self.runs])


# ------------------------------------------------------------------------- command line, load and the run's life


def add_common_options(parser: argparse.ArgumentParser) -> None:
    """``--max-load``, ``--wait`` and ``--keep``, the same in every script of issues 4, 5 and 6."""
    parser.add_argument("--max-load", type=float, default=1.5, help="wait for this 1-min load average (0: never)")
    parser.add_argument("--wait", type=float, default=600, help="wait at most this many seconds for it")
    parser.add_argument("--keep", action="store_true", help="keep the temp folder (logs, data)")


def wait_for_quiet(threshold: float, max_wait: float) -> str:
    """Wait (up to ``max_wait`` s) until the 1-minute load average is at most ``threshold``.

    Other people run test suites on this machine; the figures are only worth recording on a quiet
    one. Returns the load average (1/5/15 min) when the wait ended, whatever it is.
    """
    deadline = time.monotonic() + max_wait
    first = True
    while os.getloadavg()[0] > threshold and time.monotonic() < deadline:
        if first:
            say(f"load average {load_text()} > {threshold}: waiting up to {max_wait:.0f}s for a quieter machine")
            first = False
        time.sleep(15)
    if os.getloadavg()[0] > threshold:
        say(f"[yellow]load average still {load_text()} after {max_wait:.0f}s: measuring anyway[/]")
    return load_text()


def quiet_load(args: argparse.Namespace) -> str:
    """Wait for a quiet machine as the common options say; the load average measured under."""
    return wait_for_quiet(args.max_load, args.wait) if args.max_load else load_text()


def exit_with(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> NoReturn:
    """Exit with ``run(args)``'s status. SIGTERM exits (143) through ``run``'s cleanup, as Ctrl-C does."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    sys.exit(run(args))


def remove_temp(tmp: Path, keep: bool) -> None:
    if keep:
        say(f"kept {tmp}")
    else:
        shutil.rmtree(tmp, ignore_errors=True)


@contextlib.contextmanager
def temp_folder(prefix: str, keep: bool) -> Iterator[Path]:
    """A new temp folder for the run, removed at the end unless ``keep`` (then its path is printed)."""
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield tmp
    finally:
        remove_temp(tmp, keep)


def pin_to(cpu: int | None) -> str:
    """Restrict this process (and threads it starts later) to one CPU; returns a description."""
    if cpu is None or not hasattr(os, "sched_setaffinity"):
        return f"not pinned ({len(os.sched_getaffinity(0))} CPUs allowed)"
    cpu = cpu % (os.cpu_count() or 1)
    os.sched_setaffinity(0, {cpu})
    return f"pinned to CPU {cpu}"


# ------------------------------------------------------------------------- CPU from /proc


@dataclass(frozen=True)
class CpuSample:
    at: float
    busy: float  # machine-wide busy CPU seconds (all cores) since boot
    total: float  # machine-wide CPU seconds since boot
    proc: float  # CPU seconds of one process (0 when none given)


def cpu_times(pid: int | None = None) -> CpuSample:
    """Machine-wide busy/total CPU seconds (/proc/stat) and, optionally, one process's CPU seconds."""
    tick = os.sysconf("SC_CLK_TCK")
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    idle = fields[3] + fields[4]
    total = sum(fields[:8])
    used = 0.0
    if pid is not None:
        stat = Path(f"/proc/{pid}/stat").read_text()
        rest = stat[stat.rfind(")") + 2 :].split()
        used = (int(rest[11]) + int(rest[12])) / tick
    return CpuSample(time.time(), (total - idle) / tick, total / tick, used)


def sample_cpu(pids: dict[str, int]) -> dict[str, CpuSample]:
    """One :func:`cpu_times` sample per named process."""
    return {name: cpu_times(pid) for name, pid in pids.items()}


def cpu_shares(a: dict[str, CpuSample], b: dict[str, CpuSample]) -> dict[str, float]:
    """CPU share of each process between two :func:`sample_cpu` samples (1 core = 1.0)."""
    return {name: (b[name].proc - a[name].proc) / max(1e-9, b[name].at - a[name].at) for name in a}


def busy_share(a: CpuSample, b: CpuSample) -> float:
    """How busy the whole machine was between two samples (all cores = 1.0)."""
    return (b.busy - a.busy) / max(1e-9, b.total - a.total)


# ------------------------------------------------------------------------- the stack


class OffsetOnly:
    """A consumed message as :meth:`stream_jobs.bulk.BulkBlock.add` reads it: only its offset."""

    __slots__ = ("offset",)

    def __init__(self, offset: int) -> None:
        self.offset = offset


def migrated_chdb(prefix: str) -> Any:
    """A raw ``chdb`` connection to a new chDB folder with scopewatch's migrations applied."""
    import chdb

    from stream_jobs.clickhouse import connect, migrate

    home = tempfile.mkdtemp(prefix=prefix)
    client = connect(f"chdb://{home}/chdb")
    migrate(client, "scopewatch")
    del client
    return chdb.connect(f"{home}/chdb")  # type: ignore[no-untyped-call]


def evidence_codec() -> tuple[Any, Any]:
    """The evidence table's bulk spec and its RowBinary codec (the C library must be built)."""
    from stream_jobs import rowbinary
    from stream_jobs.bulk import bulk_specs

    spec = next(s for s in bulk_specs().values() if s.table == "evidence")
    codec = rowbinary.codec_for(spec)
    assert codec is not None and rowbinary.library() is not None
    return spec, codec


def evidence_block(spec: Any, values: Iterable[bytes], first_offset: int = 0) -> Any:
    """A bulk block of encoded evidence ``values`` from partition 0 of one topic, offsets from ``first_offset``."""
    from stream_jobs.bulk import BulkBlock

    block = BulkBlock(spec)
    prefix = block.prefix("bench.audit.evidence", 0)
    for offset, value in enumerate(values, first_offset):
        block.add(OffsetOnly(offset), value, prefix)
    return block


def tmpfs_file(data: bytes) -> str:
    """``data`` in a new file on /dev/shm (or the temp folder without it): its path."""
    fd, path = tempfile.mkstemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    with os.fdopen(fd, "wb") as out:
        out.write(data)
    return path


def local_broker(tmp: Path, cache_dir: Path, heap: str = "1g") -> KafkaBroker:
    """A Kafka broker (KRaft) on 127.0.0.1 with free ports, its data under ``tmp/kafka``; ready when returned."""
    return start_broker(tmp / "kafka", cache_dir, port=proc.free_port(), controller_port=proc.free_port(), heap=heap)


def pipeline_settings(tmp: Path, bootstrap: str, run_id: str, partitions: int, grace: float, **extra: Any) -> Settings:
    """Settings of one pipeline on a shared broker: its own home (created), topic prefix, groups and SQL port."""
    settings = Settings(
        home=tmp / f"pipeline-{run_id}",
        bootstrap=bootstrap,
        topic_prefix=f"bench{run_id}.",
        partitions=partitions,
        query_port=proc.free_port(),
        sink_group=f"bench{run_id}-sink",
        worker_group=f"bench{run_id}-decisions",
        grace_seconds=grace,
        **extra,
    )
    settings.home.mkdir(parents=True, exist_ok=True)
    return settings


@dataclass
class Pipeline:
    """A sink and a worker (and a pager) that ``Stack.up`` started on topics and groups of their own."""

    settings: Settings
    stack: Stack
    pids: dict[str, int]  # service -> pid, then "kafka" -> the broker's
    tag: str  # the run id in the topic prefix and group names


def start_pipeline(
    settings: Settings,
    broker: KafkaBroker,
    facts: list[Event],
    tag: str,
    services: Sequence[str] = ("worker", "sink"),
    workers: int = 1,
) -> Pipeline:
    """Create the topics, ``Stack.up``, publish ``facts`` and wait for the workers to have them; restart them once.

    ``services`` are the ones ``Stack.up`` must have started (the pager starts when ``HOME/pager.toml``
    exists). ``workers``: decision workers in the one consumer group, as ``scopewatch up --workers N``
    starts them (their pids are ``worker``, ``worker2``, ... in :attr:`Pipeline.pids`). Whatever was
    started is stopped again if anything fails.
    """
    asyncio.run(create_topics(settings.kafka_bootstrap, settings.topics.all(), settings.partitions))
    stack = Stack(settings, report=lambda m: say(f"stack: {m}"))
    try:
        stack.up(timeout=180, workers=workers)
        records = {name: proc.read_pid_record(stack.pid_path(name)) for name in services}
        started = {name: record for name, record in records.items() if record is not None}
        if len(started) < len(services):
            raise RuntimeError(f"Stack.up did not start all of {', '.join(services)}")
        numbered = list(enumerate(facts, start=1))
        sent, _ = asyncio.run(publish_events(settings.kafka_bootstrap, settings.topics, numbered))
        n_sessions = sum(isinstance(f, SessionBound) for f in facts)
        wanted = {"stage1_facts": n_sessions, "stage2_facts": len(facts) - n_sessions}
        if workers == 1:
            wait_counters(settings, started["worker"], wanted, timeout=300)
        else:
            wait_summed_counters(settings, [r for _, r in stack.worker_records()], wanted, timeout=300)
        # Restart the workers once, as decisions_throughput.py does: a worker started on a fresh cluster can miss
        # the changelog topics Faust creates at its start ("Topic ...-s2-calls-changelog not found in cluster
        # metadata") and then dead-letters every call (PartitionsMismatch) until its metadata refresh.
        for _name, record in reversed(stack.worker_records()):
            proc.stop_process(record, timeout=60)
        stack.up(timeout=180, workers=workers)
        restarted = dict(stack.worker_records())
        if len(restarted) < workers or "worker" not in restarted:
            raise RuntimeError("Stack.up did not restart the workers")
        started.update(restarted)
        pids = {name: record.pid for name, record in started.items()}
        kafka = broker.running_record()
        if kafka is not None:
            pids["kafka"] = kafka.pid
    except BaseException:
        stack.down()  # whatever it started, before the error propagates
        raise
    others = "".join(f"; {name} pid {started[name].pid}" for name in services if name not in ("worker", "sink"))
    say(f"facts processed by the worker ({dict(sent)}); worker restarted{others}")
    return Pipeline(settings, stack, pids, tag)


def warmed_pipeline(
    start: Callable[[], Pipeline],
    warm_up: Callable[[Pipeline], bool],
    failed: str,
    gave_up: str,
    retry: tuple[type[Exception], ...] = (),
) -> Pipeline:
    """A pipeline from ``start`` whose ``warm_up`` passed, on the first of at most three fresh ones.

    A pipeline whose warm-up fails (``failed`` says how) is stopped and the next one started; so is
    one whose start raises one of ``retry``. RuntimeError(``gave_up``) after the third.
    """
    for _ in range(3):
        try:
            pipe = start()
        except retry as exc:  # start() stopped what it started
            say(f"[red]the pipeline did not come up ({str(exc)[:500]}); trying a fresh one[/]")
            continue
        try:
            ok = warm_up(pipe)
        except BaseException:
            pipe.stack.down()
            raise
        if ok:
            return pipe
        say(f"[red]{failed}: starting another fresh pipeline[/]")
        pipe.stack.down()
    raise RuntimeError(gave_up)


def worker_stats(settings: Settings, pid: int) -> dict[str, Any] | None:
    """The stats file the worker with this pid writes (its counters), if there is one."""
    for path in settings.run_dir.glob(f"worker-*-{pid}.json"):
        try:
            data: dict[str, Any] = json.loads(path.read_text())
            return data
        except (OSError, ValueError):
            return None
    return None


def wait_counters(
    settings: Settings,
    record: proc.PidRecord,
    wanted: dict[str, int],
    timeout: float,
    stall: float | None = None,
    samples: list[CpuSample] | None = None,
) -> tuple[dict[str, Any], bool]:
    """Poll the worker's stats until every counter reaches its value: (stats, True).

    With ``stall``: give up when none of the counters moved for that many seconds after they
    started moving, and return (stats, False). ``samples`` collects the worker's CPU time.
    """
    deadline = time.monotonic() + timeout
    stats: dict[str, Any] | None = None
    last: tuple[int, ...] | None = None
    moved = time.monotonic()
    while time.monotonic() < deadline:
        if not proc.is_running(record):
            raise RuntimeError(f"worker pid {record.pid} exited; see its log under {settings.log_dir}")
        if samples is not None:
            samples.append(cpu_times(record.pid))
        stats = worker_stats(settings, record.pid)
        counters = (stats or {}).get("counters", {})
        values = tuple(counters.get(k, 0) for k in wanted)
        if stats is not None and all(v >= w for v, w in zip(values, wanted.values(), strict=True)):
            return stats, True
        if values != last:
            last, moved = values, time.monotonic()
        elif stall is not None and stats is not None and any(values) and time.monotonic() - moved > stall:
            return stats, False
        time.sleep(0.25)
    raise TimeoutError(f"worker did not reach {wanted} in {timeout:.0f}s; last stats: {stats}")


def wait_summed_counters(
    settings: Settings, records: Sequence[proc.PidRecord], wanted: dict[str, int], timeout: float
) -> dict[str, int]:
    """Poll the stats of several workers (one consumer group) until each counter, summed over them,
    reaches its value; returns the sums."""
    deadline = time.monotonic() + timeout
    sums: dict[str, int] = {}
    while time.monotonic() < deadline:
        for record in records:
            if not proc.is_running(record):
                raise RuntimeError(f"worker pid {record.pid} exited; see its log under {settings.log_dir}")
        stats = [(worker_stats(settings, r.pid) or {}).get("counters", {}) for r in records]
        sums = {k: sum(int(c.get(k, 0)) for c in stats) for k in wanted}
        if all(sums[k] >= v for k, v in wanted.items()):
            return sums
        time.sleep(0.25)
    raise TimeoutError(f"workers did not reach {wanted} in {timeout:.0f}s; last sums: {sums}")


def worker_names(names: Iterable[str]) -> list[str]:
    """The decision workers among a pipeline's service names (``worker``, ``worker2``, ...)."""
    return [name for name in names if name == "worker" or (name.startswith("worker") and name[6:].isdigit())]


def dead_letters(settings: Settings, worker_pid: int) -> int:
    """The worker's dead-letter counter."""
    stats = worker_stats(settings, worker_pid) or {}
    return int(stats.get("counters", {}).get("dead_letters", 0))


def workers_dead_letters(settings: Settings, pids: dict[str, int]) -> int:
    """The dead-letter counters of every decision worker among ``pids`` (``--workers``), added up."""
    return sum(dead_letters(settings, pids[name]) for name in worker_names(pids))


def workers_added(shares: dict[str, float]) -> dict[str, float]:
    """CPU shares with ``worker`` the workers' added up (``--workers``; the others keep their own)."""
    workers = worker_names(shares)
    if len(workers) > 1:
        shares = {**shares, "worker": sum(shares[w] for w in workers)}
    return shares


@contextlib.contextmanager
def code_from(code: str | None) -> Iterator[None]:
    """While inside: the jobs ``Stack.up`` starts run the code in ``code`` (``--baseline DIR``, from
    ``git archive REV schemas detections stream_jobs scopewatch | tar -x -C DIR``), put first on the
    PYTHONPATH they inherit from this process. None: no change."""
    if code is None:
        yield
        return
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [code, saved]))
    say(f"[bold]baseline[/]: the jobs run the code in {code}")
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = saved


def diagnose(settings: Settings, worker_pid: int, logs: Sequence[str] = ("worker",)) -> None:
    """Print the worker's counters, the pager's stats (when ``logs`` names it) and the last warnings of ``logs``."""
    stats = worker_stats(settings, worker_pid) or {}
    say(f"worker counters: {stats.get('counters')}")
    if "pager" in logs:
        try:
            say(f"pager stats: {(settings.run_dir / 'pager-stats.json').read_text()[:400]}")
        except OSError:
            say("pager stats: none")
    for name in logs:
        try:
            lines = (settings.log_dir / f"{name}.log").read_text(errors="replace").splitlines()
        except OSError:
            continue
        for line in [ln for ln in lines if "WARNING" in ln or "ERROR" in ln][-5:]:
            say(f"{name} log: {line[:300]}")


# ------------------------------------------------------------------------- traffic


def fresh_call(template: ToolCall, now: float, **changes: Any) -> ToolCall:
    """``template`` as a new call emitted at ``now`` (epoch s): new call and event ids, ``event_time`` = now."""
    return template.model_copy(
        update={
            "call_id": str(uuid.uuid4()),
            "event_id": str(uuid.uuid4()),
            "event_time": datetime.fromtimestamp(now, UTC),
            **changes,
        }
    )


@dataclass(frozen=True)
class Paced:
    """When a paced send ran (epoch s: the start and the end of the sending) and how often it fell behind."""

    started: float
    ended: float
    late_ticks: int  # pacing ticks that ran more than 50 ms late (the bench process could not keep up)


async def send_paced(
    bootstrap: str,
    topic: str,
    rate: float,
    total: int,
    make: Callable[[int, float], ToolCall],
    batched: bool = False,
) -> Paced:
    """Send ``total`` calls to ``topic`` at ``rate`` per second, as the collectors send them.

    ``make(i, now)`` builds the i-th call, emitted at ``now`` (epoch s). An idempotent aiokafka
    producer (acks=all, linger 5 ms, keyed by session id) sends them, paced every 2 ms; every send
    is acknowledged before this returns. ``batched``: the calls due at each tick go out as one
    record batch per partition (Kafka's default partitioner on the session id, as ``send`` would
    pick) and are encoded with the compiled writer: the same messages on the broker for a fraction
    of the bench process's CPU, which the stack under test shares.
    """
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)
    await producer.start()
    futures = []
    late = 0
    sent = 0
    partitions = len(await producer.partitions_for(topic)) if batched else 0
    try:
        started = time.time()
        t0 = time.perf_counter()
        while sent < total:
            elapsed = time.perf_counter() - t0
            due = min(total, int(elapsed * rate) + 1)
            if due - sent > rate * 0.05:
                late += 1
            if batched:
                groups: dict[int, Any] = {}
                while sent < due:
                    call = make(sent, time.time())
                    key = call.session_id.encode("utf-8")
                    part = partition_for(key, partitions)
                    batch = groups.get(part)
                    if batch is None:
                        batch = groups[part] = producer.create_batch()
                    if batch.append(key=key, value=fast_encode(call), timestamp=None) is None:
                        futures.append(await producer.send_batch(batch, topic, partition=part))
                        batch = groups[part] = producer.create_batch()
                        batch.append(key=key, value=fast_encode(call), timestamp=None)
                    sent += 1
                for part, batch in groups.items():
                    futures.append(await producer.send_batch(batch, topic, partition=part))
            while sent < due:
                call = make(sent, time.time())
                futures.append(await producer.send(topic, value=encode(call), key=call.session_id.encode("utf-8")))
                sent += 1
            next_at = t0 + (sent / rate)
            await asyncio.sleep(max(0.0, min(0.002, next_at - time.perf_counter())))
        ended = time.time()
        await producer.flush()
        await asyncio.gather(*futures)
    finally:
        await producer.stop()
    return Paced(started, ended, late)


def _avro_long(n: int) -> bytes:
    """Avro's zig-zag varint of ``n``."""
    z = (n << 1) ^ (n >> 63)
    out = bytearray()
    while z > 0x7F:
        out.append((z & 0x7F) | 0x80)
        z >>= 7
    out.append(z)
    return bytes(out)


@dataclass
class Prebuilt:
    """Calls Avro-encoded before a timed run, their ``event_time`` a placeholder patched at send time.

    ``event_time`` is timestamp-millis, a zig-zag varint: 6 bytes for every instant from 2004 to 2039,
    so the send patches those bytes in place of the placeholder's (the same width, checked per call).
    """

    keys: list[bytes]
    values: list[bytes]
    partitions: list[int]
    stamp_at: int  # offset of event_time's varint in every value
    stamp_width: int


_PLACEHOLDER_MS = 1_800_000_000_000  # 2027-01-15: the same varint width as the run's instants
PLACEHOLDER_S = _PLACEHOLDER_MS / 1000
"""Give calls for :func:`prebuild_calls` this event time (epoch s) and they are not copied again."""


def prebuild_calls(calls: Sequence[ToolCall], partitions: int) -> Prebuilt:
    """Encode ``calls`` (their event times are replaced at send time) and their partitions (Kafka's
    default partitioner on the session id, as ``send`` picks)."""
    placeholder = datetime.fromtimestamp(_PLACEHOLDER_MS / 1000, UTC)
    probe = calls[0].model_copy(update={"event_time": placeholder})
    stamp = _avro_long(_PLACEHOLDER_MS)
    a = fast_encode(probe)
    other = _avro_long(_PLACEHOLDER_MS + 1)
    b = fast_encode(probe.model_copy(update={"event_time": datetime.fromtimestamp((_PLACEHOLDER_MS + 1) / 1000, UTC)}))
    at = a.find(stamp)
    if at < 0 or b[at : at + len(other)] != other or len(other) != len(stamp):
        raise RuntimeError("cannot locate event_time in the encoded call")
    now_width = len(_avro_long(int(time.time() * 1000)))
    if now_width != len(stamp):
        raise RuntimeError("the placeholder's varint width differs from now's")
    keys, values, parts = [], [], []
    part_of: dict[bytes, int] = {}
    for call in calls:
        if call.event_time != placeholder:
            call = call.model_copy(update={"event_time": placeholder})
        value = fast_encode(call)
        if value[at : at + len(stamp)] != stamp:
            raise RuntimeError(f"call {call.call_id}: event_time not where the probe had it")
        key = call.session_id.encode("utf-8")
        part = part_of.get(key)
        if part is None:
            part = part_of[key] = partition_for(key, partitions)
        keys.append(key)
        values.append(value)
        parts.append(part)
    return Prebuilt(keys, values, parts, at, len(stamp))


TICK_S = 0.002
"""How often :func:`send_prebuilt` hands the calls that are due to the producer."""


def send_prebuilt(
    bootstrap: str,
    topic: str,
    rate: float,
    pre: Prebuilt,
    on_sent: Callable[[int, float], None] | None = None,
    options: dict[str, Any] | None = None,
) -> Paced:
    """Send the prebuilt calls at ``rate`` per second through a librdkafka producer (confluent-kafka;
    idempotent, acks=all, linger 20 ms), paced every 2 ms.

    Call i's planned emit time is ``started + i / rate``: it is sent at the first tick at or after it,
    its ``event_time`` is that planned time (latency is measured from it, so the bench's own delays
    count against the stack), and ``on_sent(i, planned)`` is called once it is handed over. Per call
    the bench only patches 6 bytes and hands the message to librdkafka, which batches per partition
    in C. Every delivery is awaited before this returns; a failed one raises.
    """
    from confluent_kafka import Producer

    failed: list[str] = []

    def delivered(err: Any, _msg: Any) -> None:
        if err is not None:
            failed.append(str(err))

    producer = Producer(
        {
            "bootstrap.servers": bootstrap,
            "acks": "all",
            "enable.idempotence": True,
            "linger.ms": 20,  # librdkafka's threads cost 30 µs per call at 5 ms, 5 µs at 20 ms (3,000/s)
            "delivery.report.only.error": True,  # no Python callback per delivered message
            "on_delivery": delivered,
            "queue.buffering.max.messages": 2_000_000,
            "queue.buffering.max.kbytes": 2 * 1024 * 1024,
        }
        | (options or {})
    )
    keys, values, parts = pre.keys, pre.values, pre.partitions
    at, end = pre.stamp_at, pre.stamp_at + pre.stamp_width
    produce, poll, total = producer.produce, producer.poll, len(values)
    late = sent = last_ms = 0
    stamp = b""
    started = time.time()
    t0 = time.perf_counter()
    while sent < total:
        elapsed = time.perf_counter() - t0
        due = min(total, int(elapsed * rate) + 1)
        if due - sent > rate * 0.05:
            late += 1
        while sent < due:
            planned = started + sent / rate
            ms = int(planned * 1000)
            if ms != last_ms:  # several calls share a millisecond at these rates
                last_ms, stamp = ms, _avro_long(ms)
            value = values[sent]
            produce(topic, value[:at] + stamp + value[end:], keys[sent], parts[sent])
            if on_sent is not None:
                on_sent(sent, planned)
            sent += 1
        poll(0)
        # sleep to the next 2 ms tick at or after the next call's planned time (sleeping until that
        # call alone woke the bench once per call: 20 µs of CPU each)
        now = time.perf_counter()
        next_at = max(t0 + sent / rate, now + TICK_S - (now - t0) % TICK_S)
        time.sleep(max(0.0, next_at - now))
    ended = time.time()
    left = producer.flush(120)
    if left or failed:
        raise RuntimeError(f"{left} calls not delivered, {len(failed)} failed ({failed[:3]})")
    return Paced(started, ended, late)


# ------------------------------------------------------------------------- reading back from ClickHouse


def window(column: str, since: float, until: float | None = None) -> str:
    """SQL condition: ``column`` at or after ``since`` (and at or before ``until``), epoch s to the ms."""
    cond = f"{column} >= fromUnixTimestamp64Milli({int(since * 1000)})"
    if until is not None:
        cond += f" AND {column} <= fromUnixTimestamp64Milli({int(until * 1000)})"
    return cond


def select(settings: Settings, columns: str, table: str, where: str, timeout: float = 300) -> list[list[Any]]:
    """The rows of ``SELECT columns FROM <database>.table WHERE where``, through the sink's SQL endpoint.

    Raises ``scopewatch.sqlclient.SqlError`` or OSError when the query fails.
    """
    sql = f"SELECT {columns} FROM {settings.clickhouse_database}.{table} WHERE {where}"
    return list(run_sql(settings, sql, timeout=timeout)["rows"])


def select_by_call(settings: Settings, columns: str, table: str, where: str, pages: int) -> list[list[Any]]:
    """``SELECT call_id, columns ... GROUP BY call_id``, in ``pages`` queries (by call id hash): smaller answers."""
    rows: list[list[Any]] = []
    for page in range(pages):
        cond = f"{where} AND cityHash64(call_id) % {pages} = {page} GROUP BY call_id"
        rows += select(settings, f"call_id, {columns}", table, cond)
    return rows


# ------------------------------------------------------------------------- keeping up


def tenths(pairs: Iterable[tuple[float, float]]) -> tuple[float, float]:
    """The median value of the first and of the last tenth of ``(time, value)`` pairs, in time order."""
    order = sorted(pairs)
    tenth = max(1, len(order) // 10)
    return percentile([x for _, x in order[:tenth]], 50), percentile([x for _, x in order[-tenth:]], 50)


def kept_up(trend: tuple[float, float]) -> bool:
    """Whether latency stayed flat from the first to the last tenth of a run (see :func:`tenths`)."""
    first, last = trend
    return last <= first + 0.5 and last <= 2 * max(first, 0.25)


def verdict_rates(latencies: Iterable[tuple[float, float]], started: float, ended: float) -> tuple[float, float]:
    """Verdicts per second for ``(emit, latency)`` pairs of calls emitted from ``started`` to ``ended``.

    Returns (from the first emit to the last verdict, backlog included; decided inside the emit window).
    """
    done = sorted(emit + lat for emit, lat in latencies)
    throughput = len(done) / max(1e-9, done[-1] - started) if done else 0.0
    in_window = sum(1 for t in done if t <= ended) / max(1e-9, ended - started)
    return throughput, in_window


class RateRun(Protocol):
    rate: float  # offered calls/s
    throughput: float  # what the stack got through, calls/s
    sustained: bool  # whether it kept up


R = TypeVar("R", bound=RateRun)


def measure_rates(rate: float, fallbacks: int, measure_at: Callable[[float], R]) -> list[R]:
    """``measure_at(rate)``; while the stack did not keep up, again at 0.7 x the rate it got through (at
    least 50/s), up to ``fallbacks`` times. Every result, in order."""
    results: list[R] = []
    for attempt in range(fallbacks + 1):
        r = measure_at(rate)
        results.append(r)
        if r.sustained or attempt == fallbacks:
            break
        rate = max(50.0, round(min(r.throughput, rate) * 0.7, -1))
        say(f"the stack did not keep up at {r.rate:,.0f}/s; trying {rate:,.0f}/s on a fresh pipeline")
    return results
