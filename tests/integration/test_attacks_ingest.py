"""Attack run of 2026-12-05 (issue 15, least privilege), replayed against real services.

Each test replays one finding and checks that the entry point refuses it, that nothing untrusted
landed (read back from the real Kafka broker, and from chDB through ``scopewatch verify``), and
that ingestion keeps working right after.

3. HTTP proxy (its real command line, in front of a real MCP server): a verified token without
   ``sub`` was forwarded and attested without an identity; an oversized ``Authorization`` header
   got 400 and aiohttp logged the token's first 100 characters.
4. Intake (in-process aiohttp app, real Kafka): a sender wrote into another collector's chain
   (``collector: {id: "stdio-victim", seq: 999999}``), and the same ``event_id`` under a new
   webhook id was stored twice, so ``verify`` reported a gap or not depending on merges.
5. ``scopewatch emit`` (its real command line, real Kafka): an empty principal was accepted, and
   ``--auth-token-id`` stored a whole JWT.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from integration.collectors import test_http_proxy as proxy_suite
from integration.collectors.test_http_proxy import Keys, Upstream, collect, proxy_options, raw_call, running_proxy
from integration.conftest import make_settings

from collectors.chain import ChainStamper
from collectors.intake import IntakeConfig, KafkaSink, make_app, new_secret, parse_secret, sign
from schemas import SessionBound, ToolCall, ToolResult, decode, parse_event, record_hash
from scopewatch.stack.kafka import KafkaBroker, create_topics
from stream_jobs.clickhouse import connect, migrate, run_query
from stream_jobs.rows import Provenance, to_row
from stream_jobs.runtime.settings import Settings
from stream_jobs.sink import ClickHouseWriter
from stream_jobs.verify import verify
from support.kafka import reader
from support.scenario import bound, tool_call
from support.wrap import child_env

pytestmark = pytest.mark.integration

SECRET = new_secret()
KEY = parse_secret(SECRET)

keys = proxy_suite.keys  # the proxy suite's fixtures: signing keys, the upstream MCP server
upstream = proxy_suite.upstream


@pytest.fixture
def settings(tmp_path: Path, kafka_broker: KafkaBroker, cache_dir: Path) -> Settings:
    s = make_settings(tmp_path / "home", kafka_broker.config.bootstrap, cache_dir)
    s.home.mkdir(parents=True, exist_ok=True)
    asyncio.run(create_topics(s.kafka_bootstrap, s.topics.all(), partitions=2))
    return s


# -- 3. the HTTP proxy ---------------------------------------------------------------------------------
def _oversized_post(url: str, authorization: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, data=b"{}", method="POST")
    request.add_header("Content-Type", "application/json")
    request.add_header("Authorization", authorization)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.mark.parametrize("server", ["lean", "aiohttp"])
def test_attack_3_the_proxy_refuses_tokens_without_an_identity_and_oversized_headers(
    settings: Settings, upstream: Upstream, keys: Keys, server: str
) -> None:
    faceless = {
        "no_sub": keys.token("RS256", sub=None),
        "empty_sub": keys.token("RS256", sub=""),
        "blank_sub": keys.token("ES256", sub="   "),
        "no_agent": keys.token("RS256", client_id=None),  # the configured agent claim is missing
    }
    # opaque, random and far over the 32 KiB header limit: any 16 characters of it are its own
    huge = secrets.token_urlsafe(40_000)
    # a signed JWT between the verifier's 16 KiB and the parser's 32 KiB
    big_jwt = keys.token("RS256", pad="p" * 20_000)
    good = keys.token("RS256")
    options = proxy_options(keys, "--require-auth", "--agent-claim", "client_id")
    with running_proxy(settings, upstream.url, *options, server=server) as proxy:
        for i, (name, token) in enumerate(faceless.items()):
            status, headers, body = raw_call(proxy.url, i, "touch", {"name": name}, token)
            assert status == 401, (name, body)
            challenge = headers["WWW-Authenticate"]
            assert 'error="invalid_token"' in challenge and "names no" in challenge, challenge
            assert json.loads(body)["error"] == "invalid_token"
        status, body = _oversized_post(proxy.url, f"Bearer {huge}")
        assert status == 431, body
        assert huge[:16] not in body.decode("utf-8", "replace")
        status, _headers, body = raw_call(proxy.url, 20, "touch", {"name": "big_jwt"}, big_jwt)
        assert status == 401 and json.loads(body)["error"] == "invalid_token", body
        # ingestion keeps working: the next request with a proper token goes through and binds
        status, _headers, body = raw_call(proxy.url, 30, "touch", {"name": "good"}, good)
        assert status == 200, body
        landed = collect(settings, lambda got: len(got.of(ToolResult)) >= 6)

    assert sorted(p.name for p in upstream.marks.iterdir() if p.name in {*faceless, "big_jwt", "good"}) == ["good"]
    calls = {c.arguments["name"]: c for c in landed.of(ToolCall)}
    assert sorted(calls) == sorted([*faceless, "big_jwt", "good"])  # the 431 never reached the handler
    for name in faceless:
        assert calls[name].attested is None, name  # no identity-less attestation can land
        assert calls[name].claimed["auth"]["reason"] in ("missing_subject", "missing_agent"), name
    assert calls["big_jwt"].claimed["auth"]["reason"] == "too_large"
    assert calls["good"].attested is not None and calls["good"].attested["sub"] == "alice@example.com"
    assert [b.principal for b in landed.of(SessionBound)] == ["alice@example.com"]
    # the proxy's whole log (debug level) holds none of the oversized header's characters
    assert "431" not in proxy.log or "over the size limit" in proxy.log
    for i in range(0, 200, 16):
        assert huge[i : i + 16] not in proxy.log
    for token in [*faceless.values(), big_jwt, good]:
        assert token.rsplit(".", 1)[-1] not in proxy.log


# -- 4. the intake -----------------------------------------------------------------------------------
def _signed(body: bytes, msg_id: str) -> dict[str, str]:
    ts = int(time.time())
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(KEY, msg_id, ts, body),
    }


async def _deliver(client: TestClient[Any, Any], events: list[dict[str, Any]]) -> tuple[int, dict[str, Any]]:
    body = json.dumps(events).encode()
    response = await client.post("/v1/events", data=body, headers=_signed(body, f"msg_{uuid.uuid4().hex}"))
    return response.status, await response.json()


async def _sessions(settings: Settings, want: int, timeout: float = 60.0) -> list[Any]:
    consumer = reader(settings, settings.topics.sessions)
    await consumer.start()
    found: list[Any] = []
    try:
        deadline = time.monotonic() + timeout
        while len(found) < want and time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                found.extend(decode(m.value) for m in messages)
        await asyncio.sleep(1.5)  # anything extra (a duplicate) would show up now
        for messages in (await consumer.getmany(timeout_ms=1000)).values():
            found.extend(decode(m.value) for m in messages)
    finally:
        await consumer.stop()
    return sorted(found, key=lambda e: (0, 0) if e.collector is None else (e.collector.epoch, e.collector.seq))


def _land(client: Any, db: str, events: list[Any], batch: str) -> None:
    writer = ClickHouseWriter(client, db)
    rows: dict[str, list[dict[str, Any]]] = {}
    for i, event in enumerate(events):
        table, row = to_row(event, Provenance("attack", 0, i, event.event_time))
        rows.setdefault(table, []).append(row)
    for table, batch_rows in rows.items():
        writer.insert(table, batch_rows, token=f"{batch}-{table}")


async def test_attack_4_the_intake_stamps_its_own_chain_and_stores_a_re_sent_event_once(
    settings: Settings, tmp_path: Path
) -> None:
    victim_stamp = {"id": "stdio-victim", "epoch": 1, "seq": 999999, "prev_hash": None}
    forged = {**bound("10:00:00", "s-forged", "alice@example.com", "agent-1"), "collector": victim_stamp}
    fresh = bound("10:00:05", "s-fresh", "bob@example.com", "agent-2")
    config = IntakeConfig(keys=[KEY], topics=settings.topics, collector_id="intake:attack")
    sink = KafkaSink(settings.kafka_bootstrap, timeout=15)
    try:
        async with TestClient(TestServer(make_app(config, sink), host="127.0.0.1")) as client:
            # the event is a real fact and is accepted, but only with the intake's stamp
            status, answer = await _deliver(client, [forged])
            assert status == 200, answer
            # the same event_id under new webhook ids: as sent, and rewritten
            for again in (forged, {**forged, "principal": "mallory@example.com"}):
                status, answer = await _deliver(client, [again])
                assert (status, answer["reason"]) == (409, "duplicate_event"), answer
                assert [e["event_id"] for e in answer["errors"]] == [forged["event_id"]]
            # ingestion keeps working right after
            status, answer = await _deliver(client, [fresh])
            assert status == 200, answer
        landed = await _sessions(settings, want=2)
    finally:
        await sink.close()

    assert [e.event_id for e in landed] == [forged["event_id"], fresh["event_id"]]  # each once, nothing else
    first, second = landed
    assert isinstance(first, SessionBound) and first.principal == "alice@example.com"
    assert (first.collector.id, first.collector.seq, first.collector.prev_hash) == ("intake:attack", 1, None)
    assert (second.collector.id, second.collector.seq) == ("intake:attack", 2)
    assert second.collector.prev_hash == record_hash(first)
    assert first.model_extra["claimed_collector"] == victim_stamp  # kept, as an untrusted extra field

    # the victim's own chain, as its stdio collector stamped it; verify on chDB finds both chains whole
    victim = ChainStamper("stdio-victim", epoch=1)
    victim_calls = [
        victim.stamp(parse_event(tool_call(f"10:00:0{i}", f"c-{i}", "s-victim", "fs", "read_file")))
        for i in range(1, 4)
    ]
    chdb = connect(f"chdb://{tmp_path / 'chdb'}")
    try:
        migrate(chdb, "attack")
        _land(chdb, "attack", [*landed, *victim_calls], "first")
        report = verify(lambda sql: run_query(chdb, sql), "attack")
        chains = {c.collector_id: c for c in report.collectors}
        assert not [p for c in report.collectors for p in c.problems], report.to_json()
        assert (chains["stdio-victim"].events, chains["intake:attack"].events) == (3, 2)

        # Past the intake's event-id window (here: a restarted intake) the event is published again,
        # stamped in the new epoch. The table keeps one row for it, so the first epoch now misses
        # seq 1; verify proves that record was a copy and counts the event once, before and after
        # ClickHouse merges the parts.
        restarted = IntakeConfig(keys=[KEY], topics=settings.topics, collector_id="intake:attack")
        sink = KafkaSink(settings.kafka_bootstrap, timeout=15)
        await asyncio.sleep(0.01)  # a new epoch (milliseconds)
        try:
            async with TestClient(TestServer(make_app(restarted, sink), host="127.0.0.1")) as client:
                status, answer = await _deliver(client, [forged])
                assert status == 200, answer
            landed_again = await _sessions(settings, want=3)
        finally:
            await sink.close()
        resent = [e for e in landed_again if e.collector.epoch != first.collector.epoch]
        assert [(e.event_id, e.collector.seq) for e in resent] == [(forged["event_id"], 1)]
        _land(chdb, "attack", resent, "second")
        before = verify(lambda sql: run_query(chdb, sql), "attack").to_json()
        for table in ("identity_events", "tool_calls"):
            chdb.command(f"OPTIMIZE TABLE attack.{table} FINAL")
        after = verify(lambda sql: run_query(chdb, sql), "attack").to_json()
        assert before == after
        intake_chain = next(c for c in after["collectors"] if c["collector_id"] == "intake:attack")
        assert (intake_chain["gaps"], intake_chain["events"]) == (0, 2), after
        assert intake_chain["resent"] == 1
        assert not [p for p in after["problems"] if p["kind"] in ("gap", "chain_break", "conflict")], after
    finally:
        chdb.close()


# -- 5. emit ---------------------------------------------------------------------------------------------
def test_attack_5_emit_refuses_empty_identities_and_pasted_tokens(settings: Settings, keys: Keys) -> None:
    env = child_env(settings)
    cli = [sys.executable, "-m", "scopewatch.intake_cli", "emit"]
    token = keys.token("RS256")
    session = str(uuid.uuid4())
    refused = [
        (["bind", "--session-id", session, "--principal", "", "--agent-id", "a"], "--principal must not be empty"),
        (["bind", "--session-id", session, "--principal", "  ", "--agent-id", "a"], "--principal must not be empty"),
        (["bind", "--session-id", session, "--principal", "p", "--agent-id", " "], "--agent-id must not be empty"),
        (["grant", "--principal", "", "--agent-id", "a", "--tool", "fs/*"], "--principal must not be empty"),
        (
            ["bind", "--session-id", session, "--principal", "p", "--agent-id", "a", "--auth-token-id", token],
            "--auth-token-id looks like a JWT",
        ),
        (
            ["bind", "--session-id", session, "--principal", "p", "--agent-id", "a", "--auth-token-id", "x" * 500],
            "--auth-token-id is 500 characters long",
        ),
    ]
    for args, why in refused:
        done = subprocess.run([*cli, *args], env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and why in done.stderr, (args, done.stderr)
        assert done.stdout == "" and token not in done.stderr
    ok = subprocess.run(
        [*cli, "bind", "--session-id", session, "--principal", "p", "--agent-id", "a", "--auth-token-id", "jti-5"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0, ok.stderr
    landed = asyncio.run(_sessions(settings, want=1))
    assert [(e.event_id, e.principal, e.auth) for e in landed] == [
        (json.loads(ok.stdout)["event_id"], "p", {"method": "operator", "token_id": "jti-5"})
    ]
