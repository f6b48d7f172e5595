"""``scopewatch pager`` against a real Kafka broker and a real local HTTP receiver.

Findings are produced to a real ``audit.findings`` topic (unique prefix per test); the pager runs
as its own process (``python -m scopewatch.pager_cli``, what ``scopewatch pager`` mounts) with
routes pointing at an aiohttp server on 127.0.0.1 that records every request and answers as each
test scripts it. The tests check the exact requests (method, path, headers, body; the Standard
Webhooks signature verified here with hmac, not with the pager's code), the ledger the pager
writes to ``audit.pages`` (consumed back), the committed offsets of the pager's group, and that
no secret appears in the pager's log or in a ledger record.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from schemas import Finding, PageAttempt, Topics, decode, encode
from schemas.topics import partition_for
from scopewatch.stack import proc
from scopewatch.stack.kafka import KafkaBroker, create_topics
from stream_jobs.runtime.settings import Settings
from support.pipeline import wait_rows

pytestmark = [pytest.mark.integration, pytest.mark.timeout(420)]

HOOK_PATH = "/hooks/scopewatch"


# ------------------------------------------------------------------------------ the receiver


@dataclass
class Seen:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    at: float
    status: int

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class Receiver:
    """An HTTP server on 127.0.0.1 that records requests; ``script[path]`` lists statuses to answer first."""

    port: int
    script: dict[str, list[int]] = field(default_factory=dict)
    seen: list[Seen] = field(default_factory=list)
    runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", self.port, reuse_address=True).start()

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def handle(self, request: web.Request) -> web.Response:
        body = await request.read()
        queued = self.script.get(request.path) or []
        status = queued.pop(0) if queued else 200
        if request.path == "/v2/enqueue" and status == 200:
            status = 202
        self.seen.append(Seen(request.method, request.path, dict(request.headers), body, time.time(), status))
        if status == 429:
            return web.json_response(
                {"status": "throttle", "message": "Requests throttled"}, status=429, headers={"Retry-After": "1"}
            )
        if request.path == "/v2/enqueue":
            payload = json.loads(body) if status == 202 else {}
            return web.json_response(
                {"status": "success", "message": "Event processed", "dedup_key": payload.get("dedup_key")},
                status=status,
            )
        return web.Response(status=status, text="ok" if status < 300 else "nope")

    def on(self, path: str) -> list[Seen]:
        return [s for s in self.seen if s.path.startswith(path)]


# ----------------------------------------------------------------------------------- a run


@dataclass
class Run:
    """One test's topics, secrets, routes file and pager process."""

    broker: KafkaBroker
    home: Path
    receiver: Receiver
    routes: list[dict[str, Any]]
    topics: Topics = field(default_factory=lambda: Topics.with_prefix(f"pg{uuid.uuid4().hex[:8]}."))
    group: str = field(default_factory=lambda: f"pg-{uuid.uuid4().hex[:8]}")
    secrets: dict[str, str] = field(default_factory=dict)
    process: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def bootstrap(self) -> str:
        return self.broker.config.bootstrap

    @property
    def log(self) -> Path:
        return self.home / "pager.log"

    def write_config(self, **extra: Any) -> Path:
        self.secrets = {
            "PGT_PD_KEY": uuid.uuid4().hex,
            "PGT_WEBHOOK_SECRET": "whsec_" + base64.b64encode(os.urandom(32)).decode(),
            "PGT_SLACK_URL": f"http://127.0.0.1:{self.receiver.port}/services/T0TEST/B0TEST/{uuid.uuid4().hex}",
        }
        lines = [
            "window_seconds = 600",
            "retry_base_seconds = 0.3",
            "retry_max_seconds = 1.0",
            "retry_jitter = 0",
            "max_age_seconds = 300",
            "suppressed_flush_seconds = 0.5",
            *(f"{k} = {json.dumps(v)}" for k, v in extra.items()),
        ]
        for route in self.routes:
            lines.append("[[routes]]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in route.items()]
        path = self.home / "pager.toml"
        path.write_text("\n".join(lines) + "\n")
        return path

    async def create_topics(self) -> None:
        await create_topics(self.bootstrap, [self.topics.findings, self.topics.pages], partitions=2)

    def start(self) -> None:
        assert self.process is None or self.process.poll() is not None
        env = {
            **os.environ,
            **self.secrets,
            "SCOPEWATCH_HOME": str(self.home),
            "SCOPEWATCH_BOOTSTRAP": self.bootstrap,
            "SCOPEWATCH_TOPIC_PREFIX": self.topics.findings.removesuffix("audit.findings"),
        }
        argv = [sys.executable, "-m", "scopewatch.pager_cli", "--config", str(self.home / "pager.toml")]
        argv += ["--group", self.group, "--log-level", "debug"]
        self.starts += 1
        with self.log.open("ab") as out:
            out.write(f"--- start {self.starts}\n".encode())
            self.process = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=self.home, start_new_session=True
            )

    async def wait_ready(self, timeout: float = 120) -> None:
        marker = f"--- start {self.starts}\n"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = self.log.read_text(errors="replace").rsplit(marker, 1)[-1]
            if "consuming " in text:
                return
            assert self.process is not None and self.process.poll() is None, text[-4000:]
            await asyncio.sleep(0.3)
        raise AssertionError("pager did not start consuming:\n" + self.log.read_text()[-4000:])

    async def stop(self) -> None:
        process = self.process
        if process is not None and process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            deadline = time.monotonic() + 60
            while process.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.2)
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
            assert process.wait(timeout=30) == 0, self.log.read_text()[-4000:]

    async def produce(self, findings: list[Finding]) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap, acks="all", linger_ms=5)
        await producer.start()
        try:
            sent = [await producer.send(self.topics.findings, encode(f), key=f.dedup_key.encode()) for f in findings]
            await asyncio.gather(*sent)
        finally:
            await producer.stop()

    async def ledger_raw(self) -> list[bytes]:
        """Every message on the run's audit.pages, from the start."""
        consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False)
        await consumer.start()
        try:
            tps = [TopicPartition(self.topics.pages, p) for p in range(2)]
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            out: list[bytes] = []
            remaining = {tp: end for tp, end in ends.items() if end > 0}
            while remaining:
                batch = await consumer.getmany(*remaining, timeout_ms=1000)
                for tp, messages in batch.items():
                    out += [m.value or b"" for m in messages if m.offset < remaining.get(tp, 0)]
                    if messages and messages[-1].offset + 1 >= remaining.get(tp, 0):
                        remaining.pop(tp, None)
            return out
        finally:
            await consumer.stop()

    async def ledger(self) -> list[PageAttempt]:
        rows = [decode(raw) for raw in await self.ledger_raw()]
        assert all(isinstance(r, PageAttempt) for r in rows)
        return sorted(rows, key=lambda r: (r.attempted_at, r.attempt))  # type: ignore[union-attr]

    async def wait_ledger(
        self, predicate: Callable[[list[PageAttempt]], bool], timeout: float = 120
    ) -> list[PageAttempt]:
        deadline = time.monotonic() + timeout
        rows: list[PageAttempt] = []
        while time.monotonic() < deadline:
            rows = await self.ledger()
            if predicate(rows):
                return rows
            assert self.process is None or self.process.poll() is None, self.log.read_text()[-4000:]
            await asyncio.sleep(0.5)
        raise AssertionError(
            f"ledger never matched; {len(rows)} rows: {[(r.route, r.attempt, r.outcome) for r in rows]}"
            f"\n{self.log.read_text()[-3000:]}"
        )

    async def committed(self) -> int:
        """Sum over partitions of the group's committed offsets on the findings topic."""
        admin = AIOKafkaAdminClient(bootstrap_servers=self.bootstrap)
        await admin.start()
        try:
            offsets = await admin.list_consumer_group_offsets(self.group)
        finally:
            await admin.close()
        return sum(meta.offset for tp, meta in offsets.items() if tp.topic == self.topics.findings and meta.offset > 0)

    async def wait_committed(self, expected: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while await self.committed() != expected and time.monotonic() < deadline:
            await asyncio.sleep(0.5)
        assert await self.committed() == expected

    async def assert_no_secrets(self) -> None:
        text = self.log.read_text(errors="replace")
        raw = b"".join(await self.ledger_raw())
        slack_token = self.secrets["PGT_SLACK_URL"].rsplit("/", 1)[1]
        whsec = self.secrets["PGT_WEBHOOK_SECRET"]
        for secret in (self.secrets["PGT_PD_KEY"], whsec, whsec.removeprefix("whsec_"), slack_token):
            assert secret not in text, "a secret is in the pager's log"
            assert secret.encode() not in raw, "a secret is in the ledger"
        assert "ERROR scopewatch" not in text and "Traceback" not in text, text[-3000:]


@pytest.fixture
async def receiver() -> Any:
    r = Receiver(proc.free_port())
    await r.start()
    try:
        yield r
    finally:
        await r.stop()


@pytest.fixture
async def run_for(kafka_broker: KafkaBroker, receiver: Receiver, tmp_path: Path) -> Any:
    runs: list[Run] = []

    async def make(routes: list[dict[str, Any]], topics: Topics | None = None, **extra: Any) -> Run:
        run = Run(kafka_broker, tmp_path, receiver, routes)
        if topics is not None:
            run.topics = topics
        run.write_config(**extra)
        await run.create_topics()
        runs.append(run)
        return run

    try:
        yield make
    finally:
        for run in runs:
            await run.stop()


PD_ROUTE = {"name": "oncall-pd", "channel": "pagerduty", "secret_env": "PGT_PD_KEY", "min_severity": "high"}
SLACK_ROUTE = {
    "name": "secops-slack",
    "channel": "slack",
    "url_env": "PGT_SLACK_URL",
    "min_severity": "medium",
    "tenants": ["acme"],
}
HOOK_ROUTE = {"name": "siem", "channel": "webhook", "secret_env": "PGT_WEBHOOK_SECRET", "min_severity": "info"}


def routes(receiver: Receiver, *which: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for route in which:
        route = dict(route)
        if route["channel"] == "pagerduty":
            route["url"] = f"http://127.0.0.1:{receiver.port}"
        if route["channel"] == "webhook":
            route["url"] = f"http://127.0.0.1:{receiver.port}{HOOK_PATH}"
        out.append(route)
    return out


def finding(n: int, dedup_key: str, severity: str = "high", tenant: str = "acme", **over: Any) -> Finding:
    now = datetime.now(UTC).replace(microsecond=0)
    data: dict[str, Any] = {
        "finding_id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"{dedup_key}/{n}")),
        "dedup_key": dedup_key,
        "rule_id": "revoked_grant",
        "rule_version": 1,
        "severity": severity,
        "title": "Tool call under a revoked grant",
        "summary": f"agent-7 called fs/read_file for alice under revoked grant g-1 (call {n})",
        "tenant": tenant,
        "principal": "alice@example.com",
        "agent_id": "agent-7",
        "call_id": f"c-{n}",
        "call_ids": [f"c-{n}"],
        "session_id": "s-1",
        "grant_id": "g-1",
        "forensic_query": "grant_history",
        "first_call_time": now - timedelta(seconds=3),
        "last_call_time": now - timedelta(seconds=2),
        "details": {"seconds_after_revocation": 1.5},
        "detected_at": now,
    }
    data.update(over)
    return Finding.model_validate(data)


async def wait_stats(run: Run, predicate: Callable[[dict[str, Any]], bool], timeout: float = 30) -> dict[str, Any]:
    path = run.home / "run" / "pager-stats.json"
    deadline = time.monotonic() + timeout
    stats: dict[str, Any] = {}
    while time.monotonic() < deadline:
        try:
            stats = json.loads(path.read_text())
        except (OSError, ValueError):
            stats = {}
        if predicate(stats):
            return stats
        await asyncio.sleep(0.3)
    raise AssertionError(f"pager stats never matched: {stats}")


def verify_signature(secret: str, seen: Seen) -> str:
    """Standard Webhooks check, written out here: HMAC-SHA256 over id.timestamp.body with the base64 key."""
    msg_id, stamp = seen.headers["webhook-id"], seen.headers["webhook-timestamp"]
    assert re.fullmatch(r"msg_[0-9a-f]{32}", msg_id)
    assert abs(int(stamp) - seen.at) <= 5
    key = base64.b64decode(secret.removeprefix("whsec_"))
    mac = hmac.new(key, f"{msg_id}.{stamp}.".encode() + seen.body, hashlib.sha256).digest()
    signatures = seen.headers["webhook-signature"].split()
    assert f"v1,{base64.b64encode(mac).decode()}" in signatures
    return msg_id


def common_headers(seen: Seen) -> None:
    assert seen.method == "POST"
    assert seen.headers["Content-Type"] == "application/json"
    assert seen.headers["User-Agent"] == "scopewatch-pager/1"
    assert int(seen.headers["Content-Length"]) == len(seen.body)


# ------------------------------------------------------------------------------------ tests


async def test_pages_reach_pagerduty_slack_and_a_signed_webhook(run_for: Any, receiver: Receiver) -> None:
    run: Run = await run_for(routes(receiver, PD_ROUTE, SLACK_ROUTE, HOOK_ROUTE))
    run.start()
    high = finding(1, "revoked_grant|acme|alice|agent-7|g-1", "high")
    low = finding(2, "first_tool_use|other|bob|agent-9|fs/write", "low", tenant="other")
    medium = finding(3, "burst|acme|alice|agent-7", "medium")
    await run.produce([high, low, medium])
    rows = await run.wait_ledger(lambda rs: sum(r.outcome == "delivered" for r in rs) >= 6)
    await asyncio.sleep(1.0)
    rows = await run.ledger()

    # PagerDuty: only the high finding; exact event.
    (pd,) = receiver.on("/v2/enqueue")
    common_headers(pd)
    assert pd.path == "/v2/enqueue"
    assert run.secrets["PGT_PD_KEY"] not in json.dumps(pd.headers)
    event = pd.json()
    details = event["payload"].pop("custom_details")
    assert event == {
        "routing_key": run.secrets["PGT_PD_KEY"],
        "event_action": "trigger",
        "dedup_key": high.dedup_key,
        "client": "scopewatch",
        "payload": {
            "summary": f"[acme] {high.title}: {high.summary}",
            "source": "scopewatch/acme",
            "severity": "error",
            "timestamp": high.last_call_time.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "component": "agent-7",
            "group": "acme",
            "class": "revoked_grant",
        },
    }
    assert details["finding_id"] == high.finding_id and details["rule_id"] == "revoked_grant"
    assert (details["principal"], details["agent_id"], details["grant_id"]) == ("alice@example.com", "agent-7", "g-1")
    assert details["call_ids"] == ["c-1"] and details["session_id"] == "s-1"
    assert details["forensic_command"] == (
        "scopewatch forensics grant_history --param tenant=acme --param grant_id=g-1 "
        "--param principal=alice@example.com --param agent_id=agent-7 --param until="
        + high.last_call_time.isoformat(timespec="milliseconds").replace("+00:00", "Z")
    )

    # Slack: the high and the medium finding of tenant acme, at the webhook URL's path.
    slack_path = "/" + run.secrets["PGT_SLACK_URL"].split("/", 3)[3]
    slack = receiver.on("/services/")
    assert sorted(s.json()["text"] for s in slack) == sorted(
        f"[{f.severity.upper()}] {f.title} (acme): {f.summary}" for f in (high, medium)
    )
    for s in slack:
        common_headers(s)
        assert s.path == slack_path
        assert set(s.json()) == {"text", "blocks"}
        assert s.json()["blocks"][0] == {
            "type": "header",
            "text": {"type": "plain_text", "text": s.json()["text"].split(" (acme)")[0]},
        }

    # Webhook: every finding, signed; data carries the evidence.
    hooks = receiver.on(HOOK_PATH)
    assert len(hooks) == 3
    ids = set()
    for h in hooks:
        common_headers(h)
        ids.add(verify_signature(run.secrets["PGT_WEBHOOK_SECRET"], h))
        body = h.json()
        assert body["type"] == "scopewatch.page" and set(body) == {"type", "timestamp", "data"}
    assert len(ids) == 3
    assert sorted(h.json()["data"]["finding_id"] for h in hooks) == sorted(f.finding_id for f in (high, low, medium))

    # The ledger: one delivered row per request, route names only.
    delivered = [r for r in rows if r.outcome == "delivered"]
    assert sorted((r.route, r.channel, r.http_status) for r in delivered) == sorted(
        [("oncall-pd", "pagerduty", 202), ("secops-slack", "slack", 200), ("secops-slack", "slack", 200)]
        + [("siem", "webhook", 200)] * 3
    )
    assert all(r.attempt == 1 and r.findings_grouped == 1 and r.error is None for r in delivered)
    assert {r.outcome for r in rows} == {"delivered"}
    by_finding = {h.json()["data"]["finding_id"]: h.json()["data"]["page_key"] for h in hooks}
    assert {r.finding_id: r.page_key for r in delivered if r.route == "siem"} == by_finding
    assert await run.committed() == 3
    stats = await wait_stats(run, lambda st: st.get("recorded.delivered") == 6)
    assert (stats["new"], stats["pending_pages"], stats["held_findings"]) == (3, 0, 0)
    await run.assert_no_secrets()


async def test_a_429_then_a_success_delivers_once(run_for: Any, receiver: Receiver) -> None:
    run: Run = await run_for(routes(receiver, PD_ROUTE, HOOK_ROUTE))
    receiver.script = {"/v2/enqueue": [429], HOOK_PATH: [429]}
    run.start()
    f = finding(1, "revoked_grant|acme|alice|agent-7|g-429")
    await run.produce([f])
    rows = await run.wait_ledger(lambda rs: sum(r.outcome == "delivered" for r in rs) == 2)
    await asyncio.sleep(2.0)  # nothing else may arrive
    rows = await run.ledger()
    for path, route, ok in (("/v2/enqueue", "oncall-pd", 202), (HOOK_PATH, "siem", 200)):
        first, second = receiver.on(path)
        assert (first.status, second.status) == (429, ok)
        assert first.body == second.body
        assert second.at - first.at >= 0.9  # Retry-After: 1 was honoured
        mine = [(r.attempt, r.outcome, r.http_status) for r in rows if r.route == route]
        assert mine == [(1, "retry", 429), (2, "delivered", ok)]
        assert len({r.page_key for r in rows if r.route == route}) == 1
    assert receiver.on("/v2/enqueue")[0].json()["dedup_key"] == receiver.on("/v2/enqueue")[1].json()["dedup_key"]
    a, b = receiver.on(HOOK_PATH)
    assert verify_signature(run.secrets["PGT_WEBHOOK_SECRET"], a) == verify_signature(
        run.secrets["PGT_WEBHOOK_SECRET"], b
    )
    retry = next(r for r in rows if r.outcome == "retry" and r.route == "siem")
    assert retry.error is not None and retry.error.startswith("HTTP 429")
    assert await run.committed() == 1
    await run.assert_no_secrets()


async def test_500_findings_with_one_dedup_key_page_once(run_for: Any, receiver: Receiver) -> None:
    run: Run = await run_for(routes(receiver, HOOK_ROUTE))
    key = "exfiltration_chain|acme|alice|agent-7"
    run.start()
    # Findings read while the page is on its way are grouped into it; those after it, suppressed.
    await run.produce([finding(n, key) for n in range(100)])
    await run.wait_ledger(lambda rs: any(r.outcome == "delivered" for r in rs))
    await run.produce([finding(n, key) for n in range(100, 500)])

    def accounted(total: int) -> Callable[[list[PageAttempt]], bool]:
        def check(rows: list[PageAttempt]) -> bool:
            counted = sum(r.findings_grouped for r in rows if r.outcome in ("delivered", "suppressed"))
            return counted == total

        return check

    rows = await run.wait_ledger(accounted(500))
    (request,) = receiver.on(HOOK_PATH)
    verify_signature(run.secrets["PGT_WEBHOOK_SECRET"], request)
    (delivered,) = [r for r in rows if r.outcome == "delivered"]
    assert {r.outcome for r in rows} == {"delivered", "suppressed"}
    assert {r.page_key for r in rows} == {delivered.page_key}
    assert request.json()["data"]["page_key"] == delivered.page_key
    assert all(r.attempt == 0 and r.http_status is None for r in rows if r.outcome == "suppressed")
    assert len(rows) < 50  # held-back findings are counted in batches, not a row each
    await run.wait_committed(500)

    # A restart inside the window does not page again: the window comes back from the ledger.
    await run.stop()
    run.start()
    await run.wait_ready()
    await run.produce([finding(n, key) for n in range(500, 550)])
    rows = await run.wait_ledger(accounted(550))
    assert len(receiver.on(HOOK_PATH)) == 1
    assert {r.page_key for r in rows} == {delivered.page_key}
    assert "1 windows open (0 pages to resume)" in run.log.read_text()
    await run.assert_no_secrets()


async def test_two_pagers_of_one_group_hand_their_windows_over(
    run_for: Any, receiver: Receiver, tmp_path: Path
) -> None:
    """A second pager in the group takes half the partitions; when the first one leaves, the
    survivor rebuilds the windows of the partitions it takes over from the ledger: no page twice."""
    a: Run = await run_for(routes(receiver, HOOK_ROUTE))
    b = Run(a.broker, tmp_path / "b", receiver, a.routes, topics=a.topics, group=a.group, secrets=a.secrets)
    b.home.mkdir()
    (b.home / "pager.toml").write_text((a.home / "pager.toml").read_text())
    keys = {partition_for(k.encode(), 2): k for k in (f"revoked_grant|acme|alice|agent-{i}" for i in range(20))}
    assert set(keys) == {0, 1}
    try:
        a.start()
        await a.wait_ready()
        b.start()
        await b.wait_ready()  # b owns a partition: the group has settled on one partition each
        await a.produce([finding(1, keys[0]), finding(2, keys[1])])
        await a.wait_ledger(lambda rs: sum(r.outcome == "delivered" for r in rs) == 2)
        delivered_by = [run for run in (a, b) if "delivered (attempt 1" in run.log.read_text()]
        assert delivered_by == [a, b]  # each pager paged the key of its own partition

        await a.stop()  # b takes a's partition over, with the window of the page a sent
        await a.produce([finding(3, keys[0]), finding(4, keys[1])])

        def accounted(rows: list[PageAttempt]) -> bool:
            return sum(r.findings_grouped for r in rows if r.outcome in ("delivered", "suppressed")) == 4

        rows = await b.wait_ledger(accounted)
        assert len(receiver.on(HOOK_PATH)) == 2
        assert sorted(r.outcome for r in rows) == ["delivered", "delivered", "suppressed", "suppressed"]
        assert re.search(r"for findings partitions \[\d\]; 1 windows open", b.log.read_text())
        await b.assert_no_secrets()
    finally:
        await b.stop()


async def test_a_receiver_down_for_a_while_gets_the_page_when_it_returns(run_for: Any, receiver: Receiver) -> None:
    run: Run = await run_for(routes(receiver, HOOK_ROUTE))
    await receiver.stop()  # nothing listens on the port now
    run.start()
    first = finding(1, "tool_rug_pull|acme|alice|agent-7|fs/read_file")
    await run.produce([first])
    rows = await run.wait_ledger(lambda rs: sum(r.outcome == "retry" for r in rs) >= 3)
    assert all(r.http_status is None and "Connect" in (r.error or "") for r in rows)
    page_key = rows[0].page_key

    # The pager stops while the receiver is still down: the finding stays uncommitted ...
    await run.stop()
    assert await run.committed() == 0
    before = max(r.attempt for r in await run.ledger())

    # ... and the next pager resumes the same page (same key, attempts counting on).
    run.start()
    await run.wait_ready()
    rows = await run.wait_ledger(lambda rs: max(r.attempt for r in rs) > before)
    assert "1 windows open (1 pages to resume)" in run.log.read_text()
    second = finding(2, "use_after_revocation|acme|alice|agent-7|g-1", "critical")
    await run.produce([second])
    await run.wait_ledger(lambda rs: any(r.finding_id == second.finding_id and r.outcome == "retry" for r in rs))
    while time.time() - rows[0].attempted_at.timestamp() < 12:  # down for a while
        await asyncio.sleep(0.5)
    assert receiver.on(HOOK_PATH) == []

    await receiver.start()  # back, on the same port
    rows = await run.wait_ledger(lambda rs: sum(r.outcome == "delivered" for r in rs) == 2)
    await asyncio.sleep(2.0)
    hooks = receiver.on(HOOK_PATH)
    assert sorted(h.json()["data"]["finding_id"] for h in hooks) == sorted([first.finding_id, second.finding_id])
    first_request = next(h for h in hooks if h.json()["data"]["finding_id"] == first.finding_id)
    msg_id = verify_signature(run.secrets["PGT_WEBHOOK_SECRET"], first_request)
    assert msg_id == "msg_" + hashlib.sha256(f"{page_key}\x1fsiem".encode()).hexdigest()[:32]
    mine = [r for r in await run.ledger() if r.page_key == page_key]
    attempts = [r.attempt for r in mine]
    assert attempts == list(range(1, len(mine) + 1))  # no number repeats across the restart
    assert [r.outcome for r in mine] == ["retry"] * (len(mine) - 1) + ["delivered"]
    await run.wait_committed(2)
    await run.assert_no_secrets()


async def test_pending_pages_are_bounded_and_wait_for_the_receiver(run_for: Any, receiver: Receiver) -> None:
    run: Run = await run_for(routes(receiver, HOOK_ROUTE), max_pending_pages=2)
    receiver.script = {HOOK_PATH: [503] * 10_000}
    run.start()
    findings = [finding(n, f"burst|acme|alice|agent-{n}") for n in range(6)]
    await run.produce(findings)
    await run.wait_ledger(lambda rs: sum(r.outcome == "retry" for r in rs) >= 6)
    stats = await wait_stats(run, lambda st: st.get("paused") == 1)
    assert stats["pending_pages"] == 2 and stats["findings"] == 2
    await asyncio.sleep(3.0)
    rows = await run.ledger()
    assert len({r.page_key for r in rows}) == 2  # the other four are not even read yet
    assert all((r.outcome, r.http_status) == ("retry", 503) for r in rows)
    assert await run.committed() == 0
    receiver.script.clear()
    rows = await run.wait_ledger(lambda rs: sum(r.outcome == "delivered" for r in rs) == 6)
    assert sorted(h.json()["data"]["finding_id"] for h in receiver.on(HOOK_PATH) if h.status == 200) == sorted(
        f.finding_id for f in findings
    )
    await run.wait_committed(6)
    await run.assert_no_secrets()


async def test_rate_limited_pages_are_recorded_not_sent(run_for: Any, receiver: Receiver) -> None:
    run: Run = await run_for(routes(receiver, {**HOOK_ROUTE, "burst": 2, "rate_per_minute": 0.01}))
    run.start()
    findings = [finding(n, f"first_tool_use|acme|alice|agent-{n}") for n in range(4)]
    await run.produce(findings)
    rows = await run.wait_ledger(lambda rs: len(rs) == 4)
    assert sorted((r.outcome, r.attempt) for r in rows) == [
        ("delivered", 1),
        ("delivered", 1),
        ("rate_limited", 0),
        ("rate_limited", 0),
    ]
    assert len(receiver.on(HOOK_PATH)) == 2
    limited = [r for r in rows if r.outcome == "rate_limited"]
    assert all(r.http_status is None and "rate limited" in (r.error or "") for r in limited)
    await run.wait_committed(4)
    await run.assert_no_secrets()


async def test_page_attempts_land_in_the_pages_table(run_for: Any, receiver: Receiver, pipeline: Settings) -> None:
    """Through the running sink: the ledger rows become ``pages`` rows in ClickHouse, route names only."""
    tenant = f"pg-{uuid.uuid4().hex[:8]}"  # the pipeline's topics are shared: page only this test's tenant
    run: Run = await run_for(routes(receiver, {**PD_ROUTE, "tenants": [tenant]}), topics=pipeline.topics)
    receiver.script = {"/v2/enqueue": [429]}
    run.start()
    f = finding(1, f"revoked_grant|{tenant}|alice|agent-7|g-1", "critical", tenant=tenant)
    await run.produce([f])
    db = pipeline.clickhouse_database
    sql = (
        f"SELECT route, channel, attempt, outcome, http_status, error, findings_grouped, severity, page_key"
        f" FROM {db}.pages WHERE dedup_key = '{f.dedup_key}' ORDER BY attempt"
    )
    rows = await asyncio.to_thread(wait_rows, pipeline, sql, lambda r: len(r) == 2, 120)
    page_key = rows[0][8]
    assert [r[:8] for r in rows] == [
        ["oncall-pd", "pagerduty", 1, "retry", 429, rows[0][5], 1, "critical"],
        ["oncall-pd", "pagerduty", 2, "delivered", 202, None, 1, "critical"],
    ]
    assert str(rows[0][5]).startswith("HTTP 429") and rows[1][8] == page_key
    assert [s.json()["payload"]["severity"] for s in receiver.on("/v2/enqueue")] == ["critical", "critical"]
    await run.assert_no_secrets()
