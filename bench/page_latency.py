"""Latency from a violating tool call emitted to its page received by on-call (issue 5).

Target: p99 <= grace + 1 s at 1,000 calls/s with 1 % of the calls violating. Findings for a call
are raised when its verdict becomes final, i.e. once the grace for late identity and consent facts
(production: 15 s) has run out after the call reached stage 1 (``detections/live``, "Timing"),
so the target is the grace plus one second. One run against the real stack on this machine:

* a local Kafka broker (KRaft, 127.0.0.1, free ports, temp folder);
* ``Stack.up`` starts the sink (fresh chDB folder), one decision worker (``python -m scopewatch
  worker``; ``--workers N``: N in one group, as ``scopewatch up --workers N``, their CPU added up)
  and the pager (``python -m scopewatch pager``, started because ``HOME/pager.toml`` exists), as
  ``scopewatch up`` starts them, on topics and consumer groups unique to the run;
* an on-call receiver the bench starts as its own process (aiohttp on 127.0.0.1): a generic
  webhook endpoint that verifies each delivery's Standard Webhooks signature (HMAC-SHA256 over
  ``id.timestamp.body``, checked here with ``hmac``, not with the pager's code) and a PagerDuty
  Events API v2 endpoint (``/v2/enqueue``) that checks the routing key, ``event_action`` and
  ``dedup_key``. It records the arrival time of every request and what it carried.

The pager has two routes to the receiver, ``webhook`` and ``pagerduty``, both for medium and
above. Their token buckets and the global one are set to 1,000,000 pages per minute with a burst
of 1,000,000, so rate limiting never holds a page back here (the ``pages`` ledger's rows are
printed by outcome: a ``rate_limited`` one would show there, and its page as missing). The
suppression window stays at the default 600 s.

1. The identity and consent facts of ``decisions_throughput.build_workload`` (2,000 sessions,
   500 delegations x 2 grants) are published; the worker is restarted once after processing them
   (see ``benchkit.start_pipeline`` for why). A warm-up (3 s at up to 500 calls/s, 1 % violating) must
   page every one of its violating calls, which proves the whole path before measuring.
2. Calls are emitted at the offered rate for ``--seconds`` (default 30): in-scope calls of the
   workload (``fs/read_file`` and ``github/create_issue`` inside the grants), and every
   ``1/share``-th call a violating one: a call on a bound session to ``shell/exec_<run>_<n>``, a tool
   no grant names. Each gets a fresh call id and ``event_time`` = the instant it is emitted
   (idempotent aiokafka producer, acks=all, linger 5 ms, paced every 2 ms). Then the same traffic
   goes on for ``--tail`` seconds (default grace + 3 s), not measured, so the measured calls
   become final and page while the stack is under the offered load, as in a steady state. Without
   it the last ``grace`` seconds of calls would be finalized in an idle pipeline, by the worker's
   1 s tick only (``--tail 0`` shows that case).
3. Why each violating call pages on its own: its verdict is ``out_of_scope_tool`` (medium), whose
   dedup key is ``out_of_scope_tool|tenant|principal|agent|server/tool``, and every violating call
   names a tool of its own, so every page maps to exactly one call (the receiver's body names the
   call, and ``findings_grouped`` must be 1). Violating calls go round-robin over the 500
   delegations, so no delegation sees 5 violations in 60 s and ``violation_burst`` (high, one dedup
   key per delegation) stays silent; ``first_tool_use`` is inside its learning hour. Findings of
   every rule are counted from ClickHouse to show it.
4. Latency per violating call and route = arrival at the receiver - emit. Where the time goes,
   from the timestamps the pipeline leaves: version-1 ``decided_at`` (worker, from ClickHouse);
   the finding's ``detected_at`` (worker, when the verdict became final); the finding's Kafka
   record timestamp (the worker's producer); the page's ``opened_at`` (the pager's clock when it
   took the finding: the page key is ``dedup_key#opened_at_ms``); the delivery attempt's start
   (ledger ``attempted_at - latency_ms``); the arrival at the receiver. All clocks are this host's.
   A call's deadline is its arrival at stage 1 plus the grace; ``v1 + grace -> final`` is about how
   long after it the verdict became final (v1 comes a little after the arrival: a lower bound). With
   several workers that is where stage 2 waits for the other workers' stage 1 (``README``, "Scaling
   out"). ``--baseline DIR`` measures each rate again with the jobs on the code in DIR.
5. Keeping up: version-1 verdict latency in the first and the last tenth of the calls, and the
   verdicts per second the worker got through. If the stack did not keep up, or pages are
   missing, the bench measures again on a fresh pipeline at 0.7 x the rate it got through, up to
   ``--fallbacks`` times.

Everything runs on the same machine: the bench process (producer), the receiver, the broker, the
worker, the sink and the pager share its cores. CPU of each is sampled from /proc.

Usage: ``.venv/bin/python bench/page_latency.py [--rate 1000] [--seconds 30] [--grace 15] [--workers 2] ...``
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import os
import random
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import benchkit as bk
from aiokafka import AIOKafkaConsumer, TopicPartition
from decisions_throughput import build_workload

from schemas import CodecError, Finding, SessionBound, ToolCall, decode
from schemas.events import parse_timestamp
from scopewatch.sqlclient import SqlError
from scopewatch.stack import proc
from scopewatch.stack.kafka import KafkaBroker, StackError
from stream_jobs.runtime.settings import Settings

CODE = (
    "stream_jobs/app.py",
    "detections/live",
    "detections/rulebase.py",
    "detections/rules/out_of_scope_tool.py",
    "stream_jobs/pager.py",
    "stream_jobs/pager_core.py",
    "stream_jobs/pager_render.py",
    "stream_jobs/sink.py",
)  # printed as sha256 prefixes: there is no commit to name

TARGET_RATE = 1_000
TARGET_SHARE = 0.01
TARGET_SLACK_S = 1.0  # target p99 <= grace + this
TENANT = "acme"
RULE = "out_of_scope_tool"
HOOK_PATH = "/hooks/scopewatch"
PD_PATH = "/v2/enqueue"
ROUTES = {"webhook": "bench-webhook", "pagerduty": "bench-pagerduty"}  # channel -> route name
SERVICES = ("worker", "sink", "pager")  # what Stack.up starts (the pager because HOME/pager.toml exists)
WEBHOOK_SECRET_ENV = "BENCH_PAGE_WEBHOOK_SECRET"
PD_KEY_ENV = "BENCH_PAGE_PD_ROUTING_KEY"
UNLIMITED = 1_000_000  # pages per minute and burst of every token bucket: never limits here


# ------------------------------------------------------------------------- the receiver (child process)


def serve_receiver(port: int, out: Path) -> None:
    """The on-call receiver: verify each delivery, record one JSON line per request, answer 2xx.

    Runs as its own process (``--serve-receiver``), so its arrival times are not delayed by the
    bench's producer. Secrets come from the environment, never from argv.
    """
    from aiohttp import web

    secret = os.environ[WEBHOOK_SECRET_ENV]
    routing_key = os.environ[PD_KEY_ENV]
    key = base64.b64decode(secret.removeprefix("whsec_"))
    sink = out.open("a", buffering=1, encoding="utf-8")

    def record(at: float, channel: str, problem: str | None, msg_id: str, data: dict[str, Any]) -> None:
        sink.write(
            json.dumps(
                {
                    "at": at,
                    "done": time.time(),
                    "channel": channel,
                    "ok": problem is None,
                    "problem": problem,
                    "id": msg_id,
                    "call_id": data.get("call_id"),
                    "dedup_key": data.get("dedup_key"),
                    "rule_id": data.get("rule_id"),
                    "severity": data.get("severity"),
                    "detected_at": data.get("detected_at"),
                    "page_key": data.get("page_key"),
                    "grouped": data.get("findings_grouped"),
                }
            )
            + "\n"
        )

    async def webhook(request: web.Request) -> web.Response:
        at = time.time()
        body = await request.read()
        msg_id = request.headers.get("webhook-id", "")
        stamp = request.headers.get("webhook-timestamp", "")
        signatures = request.headers.get("webhook-signature", "").split()
        problem = None
        data: dict[str, Any] = {}
        if not msg_id.startswith("msg_") or not stamp.isdigit() or not signatures:
            problem = "missing Standard Webhooks headers"
        elif abs(at - int(stamp)) > 300:
            problem = "webhook-timestamp outside 5 minutes"
        else:
            mac = hmac.new(key, f"{msg_id}.{stamp}.".encode() + body, hashlib.sha256).digest()
            expected = "v1," + base64.b64encode(mac).decode()
            if not any(hmac.compare_digest(s, expected) for s in signatures):
                problem = "bad signature"
        try:
            payload = json.loads(body)
            data = payload.get("data") or {}
            if problem is None and (payload.get("type") != "scopewatch.page" or not data.get("call_id")):
                problem = "unexpected body"
        except ValueError:
            problem = problem or "body is not JSON"
        if request.headers.get("Content-Type", "").split(";")[0] != "application/json":
            problem = problem or "content type is not JSON"
        record(at, "webhook", problem, msg_id, data)
        return web.Response(status=401 if problem == "bad signature" else 204)

    async def pagerduty(request: web.Request) -> web.Response:
        at = time.time()
        body = await request.read()
        problem = None
        data: dict[str, Any] = {}
        dedup = ""
        try:
            event = json.loads(body)
            payload = event.get("payload") or {}
            data = payload.get("custom_details") or {}
            dedup = str(event.get("dedup_key") or "")
            if not hmac.compare_digest(str(event.get("routing_key", "")), routing_key):
                problem = "wrong routing key"
            elif event.get("event_action") != "trigger":
                problem = "event_action is not trigger"
            elif not dedup or dedup != data.get("dedup_key"):
                problem = "dedup_key missing or not the finding's"
            elif payload.get("severity") not in ("critical", "error", "warning", "info") or not payload.get("summary"):
                problem = "payload severity/summary invalid"
        except (ValueError, AttributeError):
            problem = "body is not a PagerDuty event"
        record(at, "pagerduty", problem, dedup, data)
        if problem == "wrong routing key":
            return web.json_response({"status": "invalid event", "message": "Event object is invalid"}, status=400)
        return web.json_response({"status": "success", "message": "Event processed", "dedup_key": dedup}, status=202)

    app = web.Application()
    app.router.add_post(HOOK_PATH, webhook)
    app.router.add_post(PD_PATH, pagerduty)
    web.run_app(app, host="127.0.0.1", port=port, access_log=None, print=None)


# ------------------------------------------------------------------------- the bench side


@dataclass
class Receiver:
    """The receiver process and what it recorded (read back from its JSON-lines file)."""

    port: int
    path: Path
    record: proc.PidRecord
    seen: list[dict[str, Any]] = field(default_factory=list)
    _offset: int = 0

    @classmethod
    def start(cls, tmp: Path) -> Receiver:
        port = proc.free_port()
        path = tmp / "receiver.jsonl"
        path.touch()
        argv = [sys.executable, str(Path(__file__).resolve()), "--serve-receiver", str(port), str(path)]
        pid = proc.spawn_daemon(argv, tmp / "receiver.log", env=dict(os.environ), cwd=tmp)
        record = proc.PidRecord.for_pid(pid, "receiver", argv)
        deadline = time.monotonic() + 60
        while proc.port_is_free("127.0.0.1", port):
            if not proc.is_running(record) or time.monotonic() > deadline:
                proc.stop_process(record)
                raise RuntimeError(f"the receiver did not start; see {tmp / 'receiver.log'}")
            time.sleep(0.1)
        return cls(port, path, record)

    def stop(self) -> None:
        proc.stop_process(self.record, timeout=10)

    def read(self) -> list[dict[str, Any]]:
        """Every request recorded so far."""
        with self.path.open("rb") as fh:
            fh.seek(self._offset)
            chunk = fh.read()
        end = chunk.rfind(b"\n") + 1
        self._offset += end
        for line in chunk[:end].splitlines():
            if line.strip():
                self.seen.append(json.loads(line))
        return self.seen


# ------------------------------------------------------------------------- workload


@dataclass
class Calls:
    """In-scope call templates, and per delegation the templates violating calls are made from."""

    normal: list[ToolCall]
    by_delegation: list[list[ToolCall]]
    next_violation: int = 0

    def violation(self, tag: str, now: float) -> ToolCall:
        n = self.next_violation
        self.next_violation += 1
        group = self.by_delegation[n % len(self.by_delegation)]
        template = group[(n // len(self.by_delegation)) % len(group)]
        return bk.fresh_call(
            template,
            now,
            server="shell",
            tool=f"exec_{tag}_{n:06d}",
            arguments={"command": "cat /etc/shadow"},
            resources=[],
        )


def make_calls(wl: Any) -> Calls:
    delegation_of: dict[str, tuple[str, str]] = {
        f.session_id: (f.principal, f.agent_id) for f in wl.facts if isinstance(f, SessionBound)
    }
    pool = [c for c in (decode(v) for _, v in wl.calls) if isinstance(c, ToolCall)]
    normal = [
        c
        for c in pool
        if (c.server, c.tool) in (("fs", "read_file"), ("github", "create_issue"))
        and all(r.startswith(("file:/data/", "repo:acme/")) for r in c.resources)
    ]
    groups: dict[tuple[str, str], list[ToolCall]] = {}
    for c in normal:
        groups.setdefault(delegation_of[c.session_id], []).append(c)
    return Calls(normal, [groups[k] for k in sorted(groups)])


# ------------------------------------------------------------------------- emitting


@dataclass
class Emitted:
    started: float
    ended: float
    times: dict[str, float]  # call_id -> emit time (epoch s), every call of the measured window
    violating: dict[str, float]  # call_id -> emit time, the violating calls of the measured window
    tools: set[str]  # server/tool of the measured violating calls (the end of their dedup keys)
    late_ticks: int  # pacing ticks that ran more than 50 ms late (the bench process could not keep up)
    tail_calls: int  # calls emitted after the measured window (same rate and mix, not measured)
    tail_ended: float


async def emit_calls(
    bootstrap: str, topic: str, calls: Calls, tag: str, rate: float, seconds: float, share: float, tail: float = 0.0
) -> Emitted:
    """Emit for ``seconds`` (measured), then ``tail`` seconds more of the same traffic (not measured).

    The tail keeps the offered load on while the measured calls' grace runs out: without it the
    last ``grace`` seconds of calls would become final in an idle pipeline, driven only by the
    worker's tick, which is not the steady state at the offered rate.
    """
    measured = int(rate * seconds)
    times: dict[str, float] = {}
    violating: dict[str, float] = {}
    tools: set[str] = set()
    rng = random.Random(13)

    def make(i: int, now: float) -> ToolCall:
        # exactly every (1/share)-th call violates, evenly spread
        bad = int((i + 1) * share) > int(i * share)
        if bad:
            call = calls.violation(tag, now)
        else:
            call = bk.fresh_call(calls.normal[rng.randrange(len(calls.normal))], now)
        if i < measured:
            times[call.call_id] = now
            if bad:
                violating[call.call_id] = now
                tools.add(f"{call.server}/{call.tool}")
        return call

    total = measured + int(rate * tail)
    paced = await bk.send_paced(bootstrap, topic, rate, total, make)
    ended = max(times.values(), default=0.0)  # the last measured call's emit time
    return Emitted(paced.started, ended, times, violating, tools, paced.late_ticks, total - measured, paced.ended)


# ------------------------------------------------------------------------- reading back


def verdict_counts(settings: Settings, since: float, until: float) -> tuple[int, int]:
    """(calls with a version-1 verdict, calls with a final verdict) of calls emitted in [since, until]."""
    what = "uniqExactIf(call_id, version = 1), uniqExactIf(call_id, final)"
    rows = bk.select(settings, what, "evidence", bk.window("call_time", since, until), timeout=120)
    return int(rows[0][0]), int(rows[0][1])


def fetch_decided(settings: Settings, since: float, until: float) -> dict[str, tuple[int, int | None]]:
    """call_id -> (version-1 decided_at ms, first final decided_at ms or None), for calls in [since, until]."""
    rows = bk.select_by_call(
        settings,
        "toUnixTimestamp64Milli(minIf(decided_at, version = 1)), toUnixTimestamp64Milli(minIf(decided_at, final)), "
        "countIf(final)",
        "evidence",
        bk.window("call_time", since, until),
        pages=4,
    )
    return {cid: (int(v1), int(fin) if int(n_final) else None) for cid, v1, fin, n_final in rows}


def findings_by_rule(settings: Settings, since: float, until: float) -> dict[str, int]:
    """Findings of every rule on calls emitted in [since, until]."""
    where = f"{bk.window('last_call_time', since, until)} GROUP BY rule_id ORDER BY rule_id"
    return {str(r): int(n) for r, n in bk.select(settings, "rule_id, uniqExact(finding_id)", "findings", where)}


@dataclass(frozen=True)
class LedgerRow:
    page_key: str
    dedup_key: str
    route: str
    attempt: int
    outcome: str
    attempted_at: float
    latency_ms: float
    grouped: int


def fetch_ledger(settings: Settings, since: float) -> list[LedgerRow]:
    rows = bk.select(
        settings,
        "page_key, dedup_key, route, attempt, outcome, toUnixTimestamp64Milli(attempted_at), latency_ms, "
        "findings_grouped",
        "pages FINAL",
        bk.window("attempted_at", since),
    )
    return [
        LedgerRow(str(k), str(d), str(r), int(a), str(o), int(t) / 1000, float(lat), int(g))
        for k, d, r, a, o, t, lat, g in rows
    ]


async def finding_offsets(bootstrap: str, topic: str, partitions: int, wanted: set[str]) -> dict[str, float]:
    """call_id -> Kafka record timestamp (s) of the RULE finding of each wanted call, read from ``topic``."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None)
    await consumer.start()
    out: dict[str, float] = {}
    try:
        tps = [TopicPartition(topic, p) for p in range(partitions)]
        consumer.assign(tps)
        await consumer.seek_to_beginning(*tps)
        ends = await consumer.end_offsets(tps)
        remaining = {tp: end for tp, end in ends.items() if end > 0}
        deadline = time.monotonic() + 120
        while remaining and time.monotonic() < deadline:
            batch = await consumer.getmany(*remaining, timeout_ms=500)
            for _tp, messages in batch.items():
                for msg in messages:
                    try:
                        rec = decode(msg.value or b"")
                    except CodecError:
                        continue
                    if isinstance(rec, Finding) and rec.rule_id == RULE and rec.call_id in wanted:
                        out.setdefault(rec.call_id, msg.timestamp / 1000)
            for tp, end in list(remaining.items()):
                if await consumer.position(tp) >= end:
                    del remaining[tp]
    finally:
        await consumer.stop()
    return out


# ------------------------------------------------------------------------- a measured run


@dataclass
class Delivery:
    """One violating call's page to one route, with the times of each step (epoch s)."""

    channel: str
    emit: float
    v1: float | None
    final: float | None  # finding detected_at (= the final verdict's decided_at)
    on_kafka: float | None  # the finding's record timestamp
    opened: float | None  # the pager took the finding (page key)
    attempt_start: float | None  # ledger attempted_at - latency_ms of the delivered attempt
    arrived: float
    grace: float

    @property
    def total(self) -> float:
        return self.arrived - self.emit


@dataclass
class RunResult:
    rate: float
    seconds: float
    grace: float
    emitted: int
    expected_pages: int  # violating calls
    deliveries: list[Delivery]
    missing: dict[str, int]  # channel -> violating calls without a page on that route
    duplicates: dict[str, int]  # channel -> extra requests for a call already paged
    grouped: int  # pages carrying findings_grouped != 1
    receiver_problems: dict[str, int]
    stray_pages: int  # pages for calls of this run that are not violating calls, or of another rule
    late_ticks: int
    tail_calls: int
    emit_rate: float
    decided: int
    final: int
    v1_lat: list[float]  # version-1 decided_at - emit, every call
    trend: tuple[float, float]  # median v1 latency, first and last tenth
    page_trend: tuple[float, float]  # median page latency (webhook), first and last tenth
    throughput: float  # version-1 verdicts per second, first emit -> last version-1 verdict
    decided_rate: float  # version-1 verdicts per second decided inside the emit window
    sustained: bool
    findings: dict[str, int]
    ledger: dict[tuple[str, str], int]  # (route, outcome) -> rows
    max_attempt: int
    cpu_emit: dict[str, float]
    cpu_all: dict[str, float]
    busy_emit: float
    busy_all: float
    load: str
    load_end: str
    drain_seconds: float
    dead_letters: int
    workers: int = 1
    label: str = ""  # "baseline": the jobs ran the code of --baseline


def paged(receiver: Receiver, wanted: dict[str, float]) -> dict[str, dict[str, dict[str, Any]]]:
    """channel -> call_id -> first good delivery, for the wanted calls."""
    out: dict[str, dict[str, dict[str, Any]]] = {ch: {} for ch in ROUTES}
    for rec in receiver.read():
        cid = rec.get("call_id")
        if rec["ok"] and cid in wanted and rec.get("rule_id") == RULE:
            out[rec["channel"]].setdefault(cid, rec)
    return out


def wait_pages(
    receiver: Receiver,
    wanted: dict[str, float],
    settings: Settings,
    since: float,
    until: float,
    n_calls: int,
    quiet_until: float,
    timeout: float,
    stall: float,
) -> bool:
    """Wait until every wanted call is paged on every route and every call has a final verdict.

    Gives up after ``timeout`` s, or ``stall`` s without a new page or verdict once ``quiet_until``
    (when the first pages are due) has passed. True when complete.
    """
    deadline = time.monotonic() + timeout
    progress: tuple[int, ...] = ()
    moved = time.time()
    checked = 0.0
    counts = (0, 0)
    while time.monotonic() < deadline:
        got = paged(receiver, wanted)
        n_paged = tuple(len(v) for v in got.values())
        if time.monotonic() - checked > 2.0 or min(n_paged) >= len(wanted):
            checked = time.monotonic()
            try:
                counts = verdict_counts(settings, since, until)
            except (SqlError, OSError):
                pass
        state = (*n_paged, *counts)
        if state != progress:
            progress, moved = state, time.time()
        if min(n_paged) >= len(wanted) and counts[0] >= n_calls and counts[1] >= n_calls:
            return True
        if time.time() > quiet_until and time.time() - moved > stall:
            bk.say(
                f"[red]nothing new for {stall:.0f}s: pages {n_paged} of {len(wanted)}, "
                f"verdicts {counts} of {n_calls}[/]"
            )
            return False
        time.sleep(0.5)
    bk.say(
        f"[red]gave up after {timeout:.0f}s: pages {progress[:2]} of {len(wanted)}, verdicts {counts} of {n_calls}[/]"
    )
    return False


def page_opened_at(page_key: str | None) -> float | None:
    if not page_key or "#" not in page_key:
        return None
    tail = page_key.rsplit("#", 1)[1]
    return int(tail) / 1000 if tail.isdigit() else None


def measure(
    pipe: bk.Pipeline, receiver: Receiver, calls: Calls, rate: float, seconds: float, args: argparse.Namespace
) -> RunResult:
    settings, pids = pipe.settings, pipe.pids
    grace = settings.grace_seconds
    dead_before = bk.workers_dead_letters(settings, pids)
    watched = {**pids, "receiver": receiver.record.pid, "bench": os.getpid()}
    s0 = bk.sample_cpu(watched)
    load = bk.load_text()
    tail = grace + 3 if args.tail is None else args.tail
    emitted = asyncio.run(
        emit_calls(
            settings.kafka_bootstrap, settings.topics.tool_calls, calls, pipe.tag, rate, seconds, args.share, tail
        )
    )
    s1 = bk.sample_cpu(watched)
    n = len(emitted.times)
    bk.say(
        f"emitted {n:,} calls ({len(emitted.violating):,} violating) in {emitted.ended - emitted.started:.2f}s "
        f"({n / (emitted.ended - emitted.started):,.0f}/s), then {emitted.tail_calls:,} more (not measured) to "
        f"keep the load on while their grace ({grace:g}s) runs out; waiting for their pages"
    )
    complete = wait_pages(
        receiver,
        emitted.violating,
        settings,
        emitted.started,
        emitted.ended,
        n,
        quiet_until=emitted.ended + grace + 5,
        timeout=grace + args.drain,
        stall=args.stall,
    )
    drain_seconds = time.time() - emitted.ended
    s2 = bk.sample_cpu(watched)
    load_end = bk.load_text()
    if not complete:
        bk.diagnose(settings, pids["worker"], ("worker", "pager"))

    # -- read back
    decided = fetch_decided(settings, emitted.started, emitted.ended)
    findings = findings_by_rule(settings, emitted.started, emitted.ended)
    on_kafka = asyncio.run(
        finding_offsets(settings.kafka_bootstrap, settings.topics.findings, settings.partitions, set(emitted.violating))
    )
    got = paged(receiver, emitted.violating)
    n_delivered = sum(len(v) for v in got.values())
    ledger: list[LedgerRow] = []
    for _ in range(60):  # the sink lands the ledger rows a moment after the deliveries
        ledger = [r for r in fetch_ledger(settings, emitted.started) if r.dedup_key.rsplit("|", 1)[-1] in emitted.tools]
        if sum(1 for r in ledger if r.outcome == "delivered") >= n_delivered:
            break
        time.sleep(0.5)
    delivered_at = {
        (r.page_key, r.route): r.attempted_at - r.latency_ms / 1000 for r in ledger if r.outcome == "delivered"
    }

    deliveries: list[Delivery] = []
    for channel, by_call in got.items():
        for cid, rec in by_call.items():
            v1, fin = decided.get(cid, (None, None))
            detected = rec.get("detected_at")
            deliveries.append(
                Delivery(
                    channel=channel,
                    emit=emitted.violating[cid],
                    v1=None if v1 is None else v1 / 1000,
                    final=parse_timestamp(detected).timestamp() if detected else (None if fin is None else fin / 1000),
                    on_kafka=on_kafka.get(cid),
                    opened=page_opened_at(rec.get("page_key")),
                    attempt_start=delivered_at.get((rec.get("page_key"), ROUTES[channel])),
                    arrived=float(rec["at"]),
                    grace=grace,
                )
            )
    # anomalies
    run_ids = set(emitted.times)
    missing = {ch: len(emitted.violating) - len(v) for ch, v in got.items()}
    per_call: dict[tuple[str, str], int] = {}
    problems: dict[str, int] = {}
    stray = grouped = 0
    for rec in receiver.seen:
        cid = rec.get("call_id")
        if not rec["ok"]:
            problems[rec["problem"]] = problems.get(rec["problem"], 0) + 1
        if cid not in run_ids:
            continue
        if cid not in emitted.violating or rec.get("rule_id") != RULE:
            stray += 1
            continue
        per_call[(rec["channel"], cid)] = per_call.get((rec["channel"], cid), 0) + 1
        if rec.get("grouped") != 1:
            grouped += 1
    duplicates = {ch: sum(c - 1 for (chan, _), c in per_call.items() if chan == ch) for ch in ROUTES}

    # keeping up: version-1 verdict latency over the run
    order: list[tuple[float, float]] = []
    for cid, emit in emitted.times.items():
        d = decided.get(cid)
        if d is not None:
            order.append((emit, d[0] / 1000 - emit))
    trend = bk.tenths(order)
    throughput, decided_rate = bk.verdict_rates(order, emitted.started, emitted.ended)
    page_trend = bk.tenths((d.emit, d.total) for d in deliveries if d.channel == "webhook")
    sustained = len(order) >= n and bk.kept_up(trend) and all(m == 0 for m in missing.values())
    n_final = sum(1 for cid in emitted.times if decided.get(cid, (0, None))[1] is not None)

    ledger_counts: dict[tuple[str, str], int] = {}
    for r in ledger:
        ledger_counts[(r.route, r.outcome)] = ledger_counts.get((r.route, r.outcome), 0) + 1
    return RunResult(
        rate=rate,
        seconds=seconds,
        grace=grace,
        emitted=n,
        expected_pages=len(emitted.violating),
        deliveries=deliveries,
        missing=missing,
        duplicates=duplicates,
        grouped=grouped,
        receiver_problems=problems,
        stray_pages=stray,
        late_ticks=emitted.late_ticks,
        tail_calls=emitted.tail_calls,
        emit_rate=n / (emitted.ended - emitted.started),
        decided=len(order),
        final=n_final,
        v1_lat=[x for _, x in order],
        trend=trend,
        page_trend=page_trend,
        throughput=throughput,
        decided_rate=decided_rate,
        sustained=sustained,
        findings=findings,
        ledger=ledger_counts,
        max_attempt=max((r.attempt for r in ledger), default=0),
        cpu_emit=bk.workers_added(bk.cpu_shares(s0, s1)),
        cpu_all=bk.workers_added(bk.cpu_shares(s0, s2)),
        busy_emit=bk.busy_share(s0["worker"], s1["worker"]),
        busy_all=bk.busy_share(s0["worker"], s2["worker"]),
        load=load,
        load_end=load_end,
        drain_seconds=drain_seconds,
        dead_letters=bk.workers_dead_letters(settings, pids) - dead_before,
        workers=args.workers,
    )


# ------------------------------------------------------------------------- report


def steps(ds: list[Delivery]) -> list[tuple[str, list[float]]]:
    def span(a: str, b: str) -> list[float]:
        out = []
        for d in ds:
            x, y = getattr(d, a), getattr(d, b)
            if x is not None and y is not None:
                out.append(y - x)
        return out

    grace = [d.final - d.v1 for d in ds if d.final is not None and d.v1 is not None]
    past = [g - ds[0].grace for g in grace] if ds else []
    return [
        ("emit -> provisional verdict (v1 decided_at)", span("emit", "v1")),
        ("v1 -> final verdict + finding (detected_at)", grace),
        ("  of which past v1 + grace (~ past the deadline)", past),
        ("finding detected -> on Kafka (record timestamp)", span("final", "on_kafka")),
        ("on Kafka -> pager took it (page opened_at)", span("on_kafka", "opened")),
        ("page opened -> HTTP attempt started (ledger)", span("opened", "attempt_start")),
        ("attempt started -> arrived at the receiver", span("attempt_start", "arrived")),
        ("finding detected -> arrived (all after the grace)", span("final", "arrived")),
    ]


def report(results: list[RunResult]) -> None:
    table = bk.new_table(
        "Violating call emitted -> page received by the local on-call receiver",
        ("offered rate", "route", "paged / expected", "p50", "p90", "p99", "max", "target p99", "result"),
        left=("route", "offered rate"),
    )
    for r in results:
        target = r.grace + TARGET_SLACK_S
        label = (
            f"{r.rate:,.0f}/s, {r.grace:g}s grace, {r.workers} worker{'s' if r.workers > 1 else ''}"
            + (f" {r.label}" if r.label else "")
            + ("" if r.sustained else " (not kept up)")
        )
        for channel in (*ROUTES, "all"):
            vals = [d.total for d in r.deliveries if channel in ("all", d.channel)]
            expected = r.expected_pages * (len(ROUTES) if channel == "all" else 1)
            complete = len(vals) == expected
            p99 = bk.percentile(vals, 99)
            table.add_row(
                label,
                channel,
                f"{len(vals):,} / {expected:,}",
                bk.ms_p(vals, 50),
                bk.ms_p(vals, 90),
                bk.ms(p99),
                bk.ms(max(vals)) if vals else "-",
                f"<= {target * 1000:,.0f} ms",
                bk.mark(bool(vals) and p99 <= target and complete),
            )
            label = ""
    bk.console.print(table)

    def spread(vals: list[float]) -> str:
        return f"{bk.ms_p(vals, 50)} / {bk.ms_p(vals, 99)} / " + (bk.ms(max(vals)) if vals else "- (n=0)")

    where = bk.RunsTable("Where the time goes (every delivery, both routes): p50 / p99 / max", results, "step")
    for i, (name, _) in enumerate(steps(results[0].deliveries)):
        where.row(name, lambda r, i=i: spread(steps(r.deliveries)[i][1]))
    bk.console.print(where.table)

    extra = bk.RunsTable("The same runs, other views", results)
    row = extra.row
    row("calls emitted / violating (expected pages per route)", lambda r: f"{r.emitted:,} / {r.expected_pages:,}")
    row("calls emitted after the window to keep the load on (not measured)", lambda r: f"{r.tail_calls:,}")
    row("emit rate achieved (bench producer)", lambda r: f"{r.emit_rate:,.0f}/s")
    row("pacing ticks > 50 ms late (bench process starved)", lambda r: str(r.late_ticks))
    row("calls with a v1 verdict / a final verdict", lambda r: f"{r.decided:,} / {r.final:,}")
    row(
        "emit -> v1 verdict p50 / p99, every call",
        lambda r: f"{bk.ms_p(r.v1_lat, 50)} / {bk.ms_p(r.v1_lat, 99)}",
    )
    row("median v1 latency, first -> last tenth of calls", lambda r: f"{bk.ms(r.trend[0])} -> {bk.ms(r.trend[1])}")
    row(
        "median page latency (webhook), first -> last tenth",
        lambda r: f"{bk.ms(r.page_trend[0])} -> {bk.ms(r.page_trend[1])}",
    )
    row("v1 verdicts/s decided inside the emit window", lambda r: f"{r.decided_rate:,.0f}/s")
    row("v1 verdicts/s, first emit -> last v1 (backlog included)", lambda r: f"{r.throughput:,.0f}/s")
    row("kept up with the offered rate (and every page came)", lambda r: "yes" if r.sustained else "[red]no[/]")
    row("findings by rule (ClickHouse)", lambda r: ", ".join(f"{k} {v:,}" for k, v in r.findings.items()) or "-")
    row(
        "ledger rows by route and outcome",
        lambda r: ", ".join(f"{rt.removeprefix('bench-')} {oc} {n:,}" for (rt, oc), n in sorted(r.ledger.items())),
    )
    row("highest attempt number (1 = no retry)", lambda r: str(r.max_attempt))
    row("missing pages (webhook / pagerduty)", lambda r: f"{r.missing['webhook']} / {r.missing['pagerduty']}")
    row(
        "duplicate deliveries (webhook / pagerduty)",
        lambda r: f"{r.duplicates['webhook']} / {r.duplicates['pagerduty']}",
    )
    row("pages with findings_grouped != 1", lambda r: str(r.grouped))
    row("pages for other calls or rules", lambda r: str(r.stray_pages))
    row(
        "receiver rejections",
        lambda r: ", ".join(f"{k} {v}" for k, v in r.receiver_problems.items()) or "none",
    )
    row("worker dead letters during the run", lambda r: str(r.dead_letters))
    for name in ("worker", "sink", "kafka", "pager", "receiver", "bench"):
        row(
            f"{name} CPU, while emitting / first emit -> last page (1 core = 100%)",
            lambda r, name=name: f"{r.cpu_emit.get(name, 0):.0%} / {r.cpu_all.get(name, 0):.0%}",
        )
    row(
        "machine busy, while emitting / first emit -> last page (2 cores = 100%)",
        lambda r: f"{r.busy_emit:.0%} / {r.busy_all:.0%}",
    )
    row("measured window end -> last page and final verdict", lambda r: f"{r.drain_seconds:.1f} s")
    row("load average at the start / end (1/5/15)", lambda r: f"{r.load} / {r.load_end}")
    bk.console.print(extra.table)
    bk.say(f"load average at the end: {bk.load_text()}")


# ------------------------------------------------------------------------- main


def pager_toml(settings: Settings, port: int) -> str:
    def route(channel: str, url: str, secret_env: str) -> str:
        return (
            f'[[routes]]\nname = "{ROUTES[channel]}"\nchannel = "{channel}"\nurl = "{url}"\n'
            f'secret_env = "{secret_env}"\nmin_severity = "medium"\ntenants = ["{TENANT}"]\n'
            f"rate_per_minute = {UNLIMITED}\nburst = {UNLIMITED}\ntimeout_seconds = 10\n"
        )

    return (
        f'group = "{settings.pager_group}"\nwindow_seconds = 600\n'
        f"global_rate_per_minute = {UNLIMITED}\nglobal_burst = {UNLIMITED}\n\n"
        + route("webhook", f"http://127.0.0.1:{port}{HOOK_PATH}", WEBHOOK_SECRET_ENV)
        + "\n"
        + route("pagerduty", f"http://127.0.0.1:{port}", PD_KEY_ENV)
    )


def fresh_pipeline(
    args: argparse.Namespace, tmp: Path, broker: KafkaBroker, wl: Any, receiver: Receiver
) -> bk.Pipeline:
    """A new sink, worker and pager with a fresh chDB folder, on new topics and groups; facts decided."""
    run_id = uuid.uuid4().hex[:8]
    settings = bk.pipeline_settings(
        tmp,
        broker.config.bootstrap,
        run_id,
        args.partitions,
        args.grace,
        pager_group=f"bench{run_id}-pager",
        sink_batch_seconds=args.batch_seconds,
    )
    (settings.home / "pager.toml").write_text(pager_toml(settings, receiver.port), encoding="utf-8")
    return bk.start_pipeline(settings, broker, wl.facts, run_id, SERVICES, workers=args.workers)


def warm_up(pipe: bk.Pipeline, receiver: Receiver, calls: Calls, rate: float, args: argparse.Namespace) -> bool:
    """3 s of calls at up to 500/s, 1 % violating: True once every violating one was paged on every route."""
    settings = pipe.settings
    warm = min(rate, 500.0)
    bk.say(f"warming up at {warm:,.0f}/s for 3 s; waiting for its pages (grace {settings.grace_seconds:g}s)")
    emitted = asyncio.run(
        emit_calls(settings.kafka_bootstrap, settings.topics.tool_calls, calls, pipe.tag, warm, 3, args.share)
    )
    ok = wait_pages(
        receiver,
        emitted.violating,
        settings,
        emitted.started,
        emitted.ended,
        len(emitted.times),
        quiet_until=emitted.ended + settings.grace_seconds + 5,
        timeout=settings.grace_seconds + 120,
        stall=60,
    )
    if not ok:
        bk.diagnose(settings, pipe.pids["worker"], ("worker", "pager"))
    return ok


def run(args: argparse.Namespace) -> int:
    bk.announce(CODE)
    with bk.temp_folder("scopewatch-bench-pages-", args.keep) as tmp, contextlib.ExitStack() as cleanup:
        os.environ[WEBHOOK_SECRET_ENV] = "whsec_" + base64.b64encode(os.urandom(32)).decode()
        os.environ[PD_KEY_ENV] = uuid.uuid4().hex
        broker = bk.local_broker(tmp, Settings().cache_dir)
        cleanup.callback(broker.stop)
        bk.say(f"Kafka broker ready on {broker.config.bootstrap}")
        receiver = Receiver.start(tmp)
        cleanup.callback(receiver.stop)
        bk.say(f"on-call receiver on 127.0.0.1:{receiver.port} (pid {receiver.record.pid})")
        wl = build_workload(args.pool, args.sessions, args.delegations, seed=7)
        calls = make_calls(wl)
        per_delegation_gap = len(calls.by_delegation) / max(1e-9, args.rate * args.share)
        bk.say(
            f"{len(calls.normal):,} in-scope call templates; violating calls round-robin over "
            f"{len(calls.by_delegation)} delegations: one per delegation every {per_delegation_gap:.0f}s at "
            f"{args.rate:,.0f}/s"
        )
        if per_delegation_gap * 4 <= 60:
            bk.say("[yellow]5 violations of one delegation can fall within 60 s: violation_burst may fire too[/]")

        baseline_runs: list[RunResult] = []

        def at_rate(rate: float) -> RunResult:
            # the same rate with the jobs on the earlier code, right after (or, --baseline-first, right before)
            if args.baseline and args.baseline_first:
                baseline_runs.append(at_rate_on(rate, args.baseline))
            r = at_rate_on(rate, None)
            if args.baseline and not args.baseline_first:
                baseline_runs.append(at_rate_on(rate, args.baseline))
            return r

        def at_rate_on(rate: float, code: str | None) -> RunResult:
            with bk.code_from(code):  # Stack.up passes our environment to the jobs
                r = measure_on(rate)
            r.label = "baseline" if code is not None else ""
            return r

        def measure_on(rate: float) -> RunResult:
            pipe = bk.warmed_pipeline(
                lambda: fresh_pipeline(args, tmp, broker, wl, receiver),
                lambda p: warm_up(p, receiver, calls, rate, args),
                failed="the warm-up's violating calls were not all paged",
                gave_up="three fresh pipelines in a row did not come up or page their warm-up calls",
                retry=(StackError, RuntimeError, TimeoutError),
            )
            try:
                load = bk.quiet_load(args)
                bk.say(
                    f"measuring at {rate:,.0f} calls/s for {args.seconds:.0f}s, {args.share:.1%} violating "
                    f"(load {load})"
                )
                r = measure(pipe, receiver, calls, rate, args.seconds, args)
            finally:
                pipe.stack.down()
            hooks = [d.total for d in r.deliveries]
            bk.say(
                f"{rate:,.0f}/s: {len(r.deliveries):,} of {r.expected_pages * len(ROUTES):,} pages; "
                f"p50 {bk.ms_p(hooks, 50)} p99 {bk.ms_p(hooks, 99)}; "
                f"{'kept up' if r.sustained else 'did NOT keep up'} (v1 verdicts {r.throughput:,.0f}/s)"
            )
            return r

        report(bk.measure_rates(args.rate, args.fallbacks, at_rate) + baseline_runs)
    return 0


def main() -> None:
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-receiver":
        serve_receiver(int(sys.argv[2]), Path(sys.argv[3]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=TARGET_RATE, help="offered calls/s (default 1,000)")
    parser.add_argument("--seconds", type=float, default=30.0, help="emit window per rate (default 30)")
    parser.add_argument(
        "--tail",
        type=float,
        default=None,
        help="seconds of the same traffic after the measured window, not measured (default grace + 3)",
    )
    parser.add_argument("--share", type=float, default=TARGET_SHARE, help="share of violating calls (default 0.01)")
    parser.add_argument("--grace", type=float, default=15.0, help="worker grace seconds (default 15, as production)")
    parser.add_argument("--fallbacks", type=int, default=2, help="lower rates to try when the stack does not keep up")
    parser.add_argument("--batch-seconds", type=float, default=0.5, help="SCOPEWATCH_SINK_BATCH_SECONDS (default 0.5)")
    parser.add_argument("--partitions", type=int, default=4)
    parser.add_argument(
        "--workers",
        type=int,
        default=1,
        help="decision workers in one group, as `scopewatch up --workers N` (default 1); CPU added up",
    )
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="measure each rate again with the jobs on the code in DIR"
        " (`git archive REV schemas detections stream_jobs scopewatch | tar -x -C DIR`)",
    )
    parser.add_argument(
        "--baseline-first",
        action="store_true",
        help="with --baseline: measure the earlier code first at each rate (the first run meets a fresh broker)",
    )
    parser.add_argument("--sessions", type=int, default=2_000)
    parser.add_argument("--delegations", type=int, default=500)
    parser.add_argument("--pool", type=int, default=5_000, help="call templates drawn from the workload")
    parser.add_argument("--drain", type=float, default=600, help="seconds past the grace to wait for pages")
    parser.add_argument("--stall", type=float, default=60, help="stop waiting when nothing new came for this long")
    bk.add_common_options(parser)
    args = parser.parse_args()
    if not 0 < args.share <= 0.5:
        parser.error("--share must be in (0, 0.5]")
    bk.exit_with(run, args)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
