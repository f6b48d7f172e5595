"""The identity and consent intake against the real broker: signed deliveries, replays, 503, the CLI."""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from aiohttp.test_utils import TestClient, TestServer

from collectors.chain import record_hash
from collectors.intake import IntakeConfig, KafkaSink, make_app, new_secret, parse_secret, sign
from schemas import GrantIssued, GrantRevoked, SessionBound, SessionEnded, decode, delegation_key, to_canonical_dict
from scopewatch.stack import proc
from scopewatch.stack.kafka import KafkaBroker, create_topics
from stream_jobs.runtime.settings import Settings
from support.kafka import reader
from support.wrap import child_env

pytestmark = pytest.mark.integration

SECRET = new_secret()
KEY = parse_secret(SECRET)


@pytest.fixture
def settings(tmp_path: Path, kafka_broker: KafkaBroker, cache_dir: Path) -> Settings:
    s = Settings(
        home=tmp_path / "home",
        cache_dir=cache_dir,
        bootstrap=kafka_broker.config.bootstrap,
        topic_prefix=f"in{uuid.uuid4().hex[:8]}.",
        partitions=2,
    )
    asyncio.run(create_topics(s.kafka_bootstrap, s.topics.all(), s.partitions))
    return s


@pytest.fixture
async def intake(settings: Settings) -> AsyncIterator[tuple[TestClient[Any, Any], KafkaSink]]:
    sink = KafkaSink(settings.kafka_bootstrap, timeout=15)
    app = make_app(IntakeConfig(keys=[KEY], topics=settings.topics, collector_id="intake:test"), sink)
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        yield client, sink
    await sink.close()


def _common(event_type: str) -> dict[str, Any]:
    return {
        "event_type": event_type,
        "event_id": str(uuid.uuid4()),
        "event_time": "2026-11-21T10:00:00.000Z",
        "tenant": "acme",
    }


def _story(session_id: str, grant_id: str) -> list[dict[str, Any]]:
    who = {"principal": "alice@example.com", "agent_id": "support-copilot"}
    return [
        {**_common("session_bound"), "session_id": session_id, **who, "valid_from": "2026-11-21T10:00:00.000Z"},
        {
            **_common("grant_issued"),
            "grant_id": grant_id,
            **who,
            "tools": ["fs/read_*"],
            "not_before": "2026-11-21T10:00:00.000Z",
            "granted_by": "alice@example.com",
            "x_source": "consent-service",  # unknown fields are kept
        },
        {**_common("grant_revoked"), "grant_id": grant_id, **who, "revoked_by": "alice@example.com"},
        {**_common("session_ended"), "session_id": session_id},
    ]


def _signed(body: bytes, msg_id: str, key: bytes = KEY, ts: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    return {
        "content-type": "application/json",
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": sign(key, msg_id, ts, body),
    }


async def _consume(settings: Settings, done: Any, timeout: float = 60.0) -> list[tuple[str, bytes, Any]]:
    """(topic, key, event) of everything on the session and grant topics, until ``done(found)``."""
    consumer = reader(settings, settings.topics.sessions, settings.topics.grants)
    await consumer.start()
    found: list[tuple[str, bytes, Any]] = []

    async def poll(ms: int) -> None:
        for tp, messages in (await consumer.getmany(timeout_ms=ms)).items():
            found.extend((tp.topic, m.key, decode(m.value)) for m in messages)

    try:
        deadline = time.monotonic() + timeout
        while not done(found) and time.monotonic() < deadline:
            await poll(500)
        await asyncio.sleep(1.5)  # duplicates would show up now
        await poll(1000)
    finally:
        await consumer.stop()
    return found


def _ids(found: list[tuple[str, bytes, Any]]) -> list[str]:
    return [event.event_id for _t, _k, event in found]


async def test_a_signed_batch_lands_on_its_topics_with_its_keys(
    intake: tuple[TestClient[Any, Any], KafkaSink], settings: Settings
) -> None:
    client, _sink = intake
    session_id, grant_id = str(uuid.uuid4()), str(uuid.uuid4())
    sent = _story(session_id, grant_id)
    body = json.dumps(sent).encode()
    response = await client.post("/v1/events", data=body, headers=_signed(body, "msg_batch"))
    answer = await response.json()
    assert response.status == 200, answer
    topics = settings.topics
    assert answer["accepted"] == 4
    assert [e["topic"] for e in answer["events"]] == [topics.sessions, topics.grants, topics.grants, topics.sessions]

    found = await _consume(settings, lambda f: len(f) >= 4)
    assert sorted(_ids(found)) == sorted(e["event_id"] for e in sent)
    delegation = delegation_key("acme", "alice@example.com", "support-copilot").encode()
    by_id = {event.event_id: (topic, key, event) for topic, key, event in found}
    for original in sent:
        topic, key, event = by_id[original["event_id"]]
        if isinstance(event, SessionBound | SessionEnded):
            assert (topic, key) == (topics.sessions, session_id.encode())
        else:
            assert isinstance(event, GrantIssued | GrantRevoked)
            assert (topic, key) == (topics.grants, delegation)
        landed = to_canonical_dict(event)
        assert landed.pop("collector")["id"] == "intake:test"
        assert {k: v for k, v in landed.items() if k in original} == original
    assert by_id[sent[1]["event_id"]][2].model_extra == {"x_source": "consent-service"}
    # the intake's chain: seq 1..4 in delivery order, each linked to the previous record
    chain = [by_id[e["event_id"]][2] for e in sent]
    assert [e.collector.seq for e in chain] == [1, 2, 3, 4]
    assert all(b.collector.prev_hash == record_hash(a) for a, b in itertools.pairwise(chain))


async def test_policies_and_approvals_land_on_their_topics(
    intake: tuple[TestClient[Any, Any], KafkaSink], settings: Settings
) -> None:
    client, _sink = intake
    who = {"principal": "alice@example.com", "agent_id": "support-copilot"}
    sent = [
        {
            **_common("policy_published"),
            "policy_id": "data",
            "version": "c0ffee",
            "cedar": 'permit(principal, action == Action::"call", resource);',
            "labels": {"restricted": ["db:prod/*"]},
            "published_by": "ci",
        },
        {
            **_common("approval_decided"),
            "approval_id": "ap-1",
            **who,
            "tool": "fs/write_file",
            "decision": "approve",
            "approver": "bob@example.com",
        },
    ]
    body = json.dumps(sent).encode()
    response = await client.post("/v1/events", data=body, headers=_signed(body, "msg_policy_approval"))
    answer = await response.json()
    assert response.status == 200, answer
    topics = settings.topics
    assert [e["topic"] for e in answer["events"]] == [topics.policies, topics.approvals]
    consumer = reader(settings, topics.policies, topics.approvals)
    await consumer.start()
    found: dict[str, tuple[str, bytes]] = {}
    try:
        for _ in range(60):
            for tp, messages in (await consumer.getmany(timeout_ms=500)).items():
                found.update({decode(m.value).event_id: (tp.topic, m.key) for m in messages})  # type: ignore[attr-defined]
            if len(found) >= 2:
                break
    finally:
        await consumer.stop()
    assert found == {
        sent[0]["event_id"]: (topics.policies, b"acme/data"),
        sent[1]["event_id"]: (
            topics.approvals,
            delegation_key("acme", "alice@example.com", "support-copilot").encode(),
        ),
    }
    blank = [{**sent[1], "event_id": str(uuid.uuid4()), "approver": " "}]
    body = json.dumps(blank).encode()
    response = await client.post("/v1/events", data=body, headers=_signed(body, "msg_blank_approver"))
    assert response.status == 422


async def test_a_duplicate_valid_delivery_lands_once(
    intake: tuple[TestClient[Any, Any], KafkaSink], settings: Settings
) -> None:
    client, _sink = intake
    event = _story(str(uuid.uuid4()), "g")[0]
    body = json.dumps(event).encode()
    headers = _signed(body, "msg_dup")
    first = await client.post("/v1/events", data=body, headers=headers)
    assert first.status == 200
    again = await client.post("/v1/events", data=body, headers=headers)  # the very same bytes: a replay
    assert (again.status, (await again.json())["reason"]) == (401, "replayed")
    retry = await client.post("/v1/events", data=body, headers=_signed(body, "msg_dup"))  # fresh signature
    assert retry.status == 401
    other = json.dumps({**event, "event_id": str(uuid.uuid4())}).encode()
    reused = await client.post("/v1/events", data=other, headers=_signed(other, "msg_dup"))
    assert reused.status == 401
    found = await _consume(settings, lambda f: event["event_id"] in _ids(f))
    assert _ids(found).count(event["event_id"]) == 1
    assert len(found) == 1


async def test_rejected_deliveries_publish_nothing(
    intake: tuple[TestClient[Any, Any], KafkaSink], settings: Settings
) -> None:
    client, _sink = intake
    rejected: list[str] = []

    async def post(events: list[dict[str, Any]], headers: dict[str, str] | None, status: int) -> None:
        body = json.dumps(events).encode()
        response = await client.post("/v1/events", data=body, headers=headers or _signed(body, uuid.uuid4().hex))
        assert response.status == status, await response.text()
        rejected.extend(e["event_id"] for e in events)

    story = _story(str(uuid.uuid4()), "g1")
    body = json.dumps(story[:1]).encode()
    await post(story[:1], {"content-type": "application/json"}, 401)  # unsigned
    await post(story[:1], _signed(body, "m1", key=parse_secret(new_secret())), 401)  # wrong secret
    await post(story[:1], _signed(body, "m2", ts=int(time.time()) - 600), 401)  # stale
    await post(story[:1], {**_signed(body, "m3"), "webhook-id": "m4"}, 401)  # signature of another id
    broken = {k: v for k, v in story[1].items() if k != "tools"}
    await post([story[2], broken, story[3]], None, 422)  # one bad event: the good ones are not published
    marker = _story(str(uuid.uuid4()), "g2")[0]
    body = json.dumps(marker).encode()
    assert (await client.post("/v1/events", data=body, headers=_signed(body, "marker"))).status == 200
    found = await _consume(settings, lambda f: marker["event_id"] in _ids(f))
    assert _ids(found) == [marker["event_id"]]
    # a delivery refused as invalid does not consume its webhook-id: fixed and resent, it is accepted
    bad = json.dumps([story[2], broken]).encode()
    assert (await client.post("/v1/events", data=bad, headers=_signed(bad, "fixme"))).status == 422
    fixed = json.dumps([story[2], story[1]]).encode()
    assert (await client.post("/v1/events", data=fixed, headers=_signed(fixed, "fixme"))).status == 200
    assert (await client.post("/v1/events", data=fixed, headers=_signed(fixed, "fixme"))).status == 401


async def test_kafka_not_acknowledging_gives_503_and_the_sender_can_retry(settings: Settings) -> None:
    dead = f"127.0.0.1:{proc.free_port()}"
    sink = KafkaSink(dead, timeout=3)
    app = make_app(IntakeConfig(keys=[KEY], topics=settings.topics, collector_id="intake:retry"), sink)
    event = _story(str(uuid.uuid4()), "g")[0]
    body = json.dumps(event).encode()
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        response = await client.post("/v1/events", data=body, headers=_signed(body, "msg_retry"))
        assert response.status == 503 and response.headers["Retry-After"] == "5"
        sink.bootstrap = settings.kafka_bootstrap  # the broker is back
        response = await client.post("/v1/events", data=body, headers=_signed(body, "msg_retry"))
        assert response.status == 200
    await sink.close()
    found = await _consume(settings, lambda f: event["event_id"] in _ids(f))
    [(_topic, _key, landed)] = found
    assert landed.collector.seq == 1  # the unacknowledged attempt gave its sequence number back


def test_intake_and_emit_commands(settings: Settings, tmp_path: Path) -> None:
    env = child_env(settings)
    env["SCOPEWATCH_INTAKE_SECRETS"] = SECRET
    port = proc.free_port()
    cli = [sys.executable, "-m", "scopewatch.intake_cli"]
    server = subprocess.Popen(
        [*cli, "intake", "--listen", f"127.0.0.1:{port}"], env=env, stderr=subprocess.PIPE, text=True
    )
    try:
        assert server.stderr is not None
        line = server.stderr.readline()
        assert f"listening on http://127.0.0.1:{port}/v1/events" in line, line
        event = _story(str(uuid.uuid4()), "g")[0]
        body = json.dumps(event).encode()

        async def deliver() -> int:
            async with ClientSession() as http:
                url = f"http://127.0.0.1:{port}/v1/events"
                async with http.post(url, data=body, headers=_signed(body, "cli-msg")) as response:
                    return response.status

        assert asyncio.run(deliver()) == 200
    finally:
        server.send_signal(signal.SIGTERM)
        _out, err = server.communicate(timeout=60)
    assert server.returncode == 0
    assert SECRET not in err and SECRET[6:] not in err

    session_id = str(uuid.uuid4())
    emitted = []
    for args in (
        ["bind", "--session-id", session_id, "--principal", "bob", "--agent-id", "a2", "--valid-until", "+1h"],
        ["grant", "--principal", "bob", "--agent-id", "a2", "--tool", "fs/read_*", "--grant-id", "g-cli"],
        ["revoke", "--grant-id", "g-cli", "--principal", "bob", "--agent-id", "a2", "--reason", "done"],
        ["end", "--session-id", session_id],
    ):
        done = subprocess.run([*cli, "emit", *args, "--tenant", "acme"], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        emitted.append(json.loads(done.stdout))
    found = asyncio.run(_consume(settings, lambda f: len(f) >= 5))
    landed = {e.event_id: (t, k, e) for t, k, e in found}
    assert event["event_id"] in landed
    topics = settings.topics
    expected_keys = [session_id.encode(), b"acme/bob/a2", b"acme/bob/a2", session_id.encode()]
    for sent, key in zip(emitted, expected_keys, strict=True):
        topic, got_key, event_model = landed[sent["event_id"]]
        assert got_key == key
        assert topic == (topics.sessions if "session" in sent["event_type"] else topics.grants)
        assert to_canonical_dict(event_model) == sent
    dry = subprocess.run(
        [*cli, "emit", "end", "--session-id", "x", "--dry-run"],
        env={**env, "SCOPEWATCH_BOOTSTRAP": "127.0.0.1:9"},
        capture_output=True,
        text=True,
    )
    assert dry.returncode == 0 and json.loads(dry.stdout)["event_type"] == "session_ended"
    down = subprocess.run(
        [*cli, "emit", "end", "--session-id", "x"],
        env={**env, "SCOPEWATCH_BOOTSTRAP": f"127.0.0.1:{proc.free_port()}", "SCOPEWATCH_KAFKA_WAIT_SECONDS": "2"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert down.returncode == 1 and "not published" in down.stderr


def _raw(port: int, head: bytes) -> tuple[int, bytes]:
    """Send one request head as given (no client library would send these) and read the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as sock:
        sock.sendall(head)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def test_the_intake_answers_bad_headers_without_quoting_or_logging_them(settings: Settings) -> None:
    env = child_env(settings)
    env["SCOPEWATCH_INTAKE_SECRETS"] = SECRET
    port = proc.free_port()
    cli = [sys.executable, "-m", "scopewatch.intake_cli", "intake", "--listen", f"127.0.0.1:{port}"]
    server = subprocess.Popen([*cli, "--log-level", "debug"], env=env, stderr=subprocess.PIPE, text=True)
    # random, so any 16 characters of it found in an answer or the log came from the request
    huge, odd, bad_value = secrets.token_hex(24_000), secrets.token_hex(16), secrets.token_hex(16)
    start = b"POST /v1/events HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 2\r\n"
    early: list[str] = []
    try:
        assert server.stderr is not None
        while not early or "listening on" not in early[-1]:
            early.append(server.stderr.readline())
            assert early[-1], early  # the intake stopped before listening
        status, body = _raw(port, start + f"webhook-signature: v1,{huge}\r\n\r\n{{}}".encode())
        assert status == 431, body
        assert json.loads(body) == {
            "error": "request_header_fields_too_large",
            "error_description": "A header is too large",
        }
        malformed = (
            f"webhook-id {odd}\r\n".encode(),  # no colon
            f"webhook-id: msg_{bad_value}\x01\r\n".encode(),  # a control character in the value
        )
        for header in malformed:
            status, body = _raw(port, start + header + b"\r\n{}")
            assert status == 400, (header, body)
            assert json.loads(body) == {"error": "bad_request", "error_description": "Malformed HTTP"}, body
        # deliveries keep working right after
        event = _story(str(uuid.uuid4()), "g")[0]
        payload = json.dumps(event).encode()

        async def deliver() -> int:
            async with ClientSession() as http:
                url = f"http://127.0.0.1:{port}/v1/events"
                async with http.post(url, data=payload, headers=_signed(payload, "hdr-msg")) as response:
                    return response.status

        assert asyncio.run(deliver()) == 200
    finally:
        server.send_signal(signal.SIGTERM)
        _out, rest = server.communicate(timeout=60)
    err = "".join(early) + rest
    assert server.returncode == 0, err
    assert err.count("refused a request from 127.0.0.1") == 3, err
    assert "over the size limit" in err and "malformed HTTP" in err
    for text in (huge[:4096], odd, bad_value):
        for i in range(0, len(text) - 16, 16):
            assert text[i : i + 16] not in err
