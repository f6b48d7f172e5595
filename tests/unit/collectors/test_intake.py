"""The intake's authentication, replay cache and validation, and its HTTP answers before Kafka."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer

from collectors.intake import (
    IntakeConfig,
    ReplayCache,
    Unauthorized,
    new_secret,
    parse_secret,
    sign,
    verify_signature,
)
from scopewatch.emitting import parse_when
from scopewatch.intake_cli import load_secrets

VECTOR_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
VECTOR_ID = "msg_p5jXN8AQM9LWM0D4loKWxJek"
VECTOR_TS = 1614265330
VECTOR_BODY = b'{"test": 2432232314}'
VECTOR_SIGNATURE = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="


def test_signatures_match_the_standard_webhooks_test_vector() -> None:
    key = parse_secret(VECTOR_SECRET)
    assert sign(key, VECTOR_ID, VECTOR_TS, VECTOR_BODY) == VECTOR_SIGNATURE
    headers = {"webhook-id": VECTOR_ID, "webhook-timestamp": str(VECTOR_TS), "webhook-signature": VECTOR_SIGNATURE}
    assert verify_signature([key], headers, VECTOR_BODY, VECTOR_TS + 10, 300) == (VECTOR_ID, VECTOR_TS)


def test_secrets_must_be_whsec_base64_and_long_enough() -> None:
    assert len(parse_secret(new_secret())) == 32
    for bad, why in (
        ("MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw", "whsec_<base64>"),
        ("whsec_not*base64!", "not base64"),
        ("whsec_c2hvcnQ=", "at least 16 bytes"),
    ):
        with pytest.raises(ValueError, match=why) as info:
            parse_secret(bad)
        assert bad not in str(info.value)


def _headers(key: bytes, body: bytes, msg_id: str = "msg_1", ts: int | None = None) -> dict[str, str]:
    ts = int(time.time()) if ts is None else ts
    return {"webhook-id": msg_id, "webhook-timestamp": str(ts), "webhook-signature": sign(key, msg_id, ts, body)}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        (lambda h, b: ({k: v for k, v in h.items() if k != "webhook-signature"}, b), "unsigned"),
        (lambda h, b: ({k: v for k, v in h.items() if k != "webhook-id"}, b), "unsigned"),
        (lambda h, b: (h, b + b" "), "bad_signature"),  # tampered body
        (lambda h, b: ({**h, "webhook-id": "msg_2"}, b), "bad_signature"),  # the id is signed too
        (lambda h, b: ({**h, "webhook-timestamp": str(int(h["webhook-timestamp"]) + 1)}, b), "bad_signature"),
        (lambda h, b: ({**h, "webhook-timestamp": "soon"}, b), "bad_timestamp"),
        (lambda h, b: ({**h, "webhook-signature": "v1,!!!"}, b), "bad_signature"),
        (lambda h, b: ({**h, "webhook-signature": h["webhook-signature"].replace("v1,", "v2,")}, b), "bad_signature"),
    ],
)
def test_forged_or_incomplete_deliveries_are_unauthorized(change: Any, reason: str) -> None:
    key = parse_secret(new_secret())
    body = b'{"a": 1}'
    headers, body = change(_headers(key, body), body)
    with pytest.raises(Unauthorized) as info:
        verify_signature([key], headers, body, time.time(), 300)
    assert info.value.reason == reason


@pytest.mark.parametrize("skew", [-301, 301, -3600])
def test_stale_or_future_timestamps_are_unauthorized(skew: int) -> None:
    key = parse_secret(new_secret())
    now = int(time.time())
    headers = _headers(key, b"{}", ts=now + skew)
    with pytest.raises(Unauthorized) as info:
        verify_signature([key], headers, b"{}", now, 300)
    assert info.value.reason == "stale_timestamp"
    assert verify_signature([key], _headers(key, b"{}", ts=now - 299), b"{}", now, 300)


def test_a_wrong_secret_fails_and_rotation_accepts_any_configured_secret() -> None:
    old, new, other = (parse_secret(new_secret()) for _ in range(3))
    headers = _headers(new, b"{}")
    with pytest.raises(Unauthorized):
        verify_signature([old, other], headers, b"{}", time.time(), 300)
    assert verify_signature([old, new], headers, b"{}", time.time(), 300)
    # several signatures in one header: one valid is enough
    both = {**headers, "webhook-signature": f"v1,Zm9yZ2Vk {headers['webhook-signature']}"}
    assert verify_signature([new], both, b"{}", time.time(), 300)


def test_replay_cache_remembers_ids_until_they_expire(tmp_path: Path) -> None:
    cache = ReplayCache(max_entries=2, path=tmp_path / "ids")
    assert cache.reserve("a", expires=100, now=0) == "ok"
    assert cache.reserve("a", expires=100, now=1) == "replayed"  # even while being published
    cache.release("a")  # publishing failed: the sender may retry with the same id
    assert cache.reserve("a", expires=100, now=2) == "ok"
    cache.commit("a")
    assert cache.reserve("b", expires=50, now=3) == "ok"
    assert cache.reserve("c", expires=100, now=4) == "full"  # fail closed rather than forget "a"
    assert cache.reserve("c", expires=100, now=60) == "ok"  # "b" expired
    assert cache.seen("a", now=99) and not cache.seen("a", now=100)


def test_replay_cache_survives_a_restart(tmp_path: Path) -> None:
    path = tmp_path / "intake" / "ids"
    now = time.time()
    cache = ReplayCache(path=path)
    for msg_id, expires in (("live", now + 300), ("old", now - 1)):
        assert cache.reserve(msg_id, expires, now - 10) == "ok"
        cache.commit(msg_id)
    cache.reserve("uncommitted", now + 300, now)
    again = ReplayCache(path=path)
    assert again.seen("live", now) and not again.seen("old", now) and not again.seen("uncommitted", now)
    assert path.read_text().count("\n") == 1  # compacted at start


# -- HTTP ------------------------------------------------------------------------------------------
SECRET = new_secret()


async def _never(_records: list[Any]) -> None:
    raise AssertionError("nothing may be published")


@pytest.fixture
async def client() -> AsyncIterator[TestClient[Any, Any]]:
    from collectors.intake import make_app

    config = IntakeConfig(keys=[parse_secret(SECRET)], max_body_bytes=4096, max_batch=3)
    async with TestClient(TestServer(make_app(config, _never))) as test_client:
        yield test_client


def _bound(**extra: Any) -> dict[str, Any]:
    return {
        "event_type": "session_bound",
        "event_id": str(uuid.uuid4()),
        "event_time": "2026-11-21T10:00:00.000Z",
        "tenant": "acme",
        "session_id": "s-1",
        "principal": "alice@example.com",
        "agent_id": "agent-1",
        "valid_from": "2026-11-21T10:00:00.000Z",
        **extra,
    }


async def _post(client: TestClient[Any, Any], payload: Any, **kw: Any) -> tuple[int, dict[str, Any]]:
    body = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    headers = kw.pop("headers", None) or _headers(parse_secret(SECRET), body, msg_id=f"msg_{uuid.uuid4().hex}")
    response = await client.post("/v1/events", data=body, headers={"content-type": "application/json", **headers})
    return response.status, await response.json()


async def test_unsigned_and_badly_signed_deliveries_get_401(client: TestClient[Any, Any]) -> None:
    assert (await _post(client, _bound(), headers={"x": "y"}))[0] == 401
    body = json.dumps(_bound()).encode()
    forged = _headers(parse_secret(new_secret()), body)
    status, answer = await _post(client, body, headers=forged)
    assert (status, answer["reason"]) == (401, "bad_signature")
    stale = _headers(parse_secret(SECRET), body, ts=int(time.time()) - 3600)
    status, answer = await _post(client, body, headers=stale)
    assert (status, answer["reason"]) == (401, "stale_timestamp")
    assert SECRET not in json.dumps(answer)


async def test_oversized_bodies_get_413_before_anything_else(client: TestClient[Any, Any]) -> None:
    status, answer = await _post(client, b"x" * 5000, headers={"x": "unsigned"})
    assert status == 413 and "4096 bytes" in answer["error"]

    async def chunks() -> AsyncIterator[bytes]:  # no content-length: the limit holds while reading
        for _ in range(10):
            yield b"y" * 1000

    response = await client.post("/v1/events", data=chunks())
    assert response.status == 413
    status, answer = await _post(client, [_bound(), _bound(), _bound(), _bound()])
    assert status == 413 and "at most 3" in answer["error"]


async def test_bodies_that_are_not_events_get_400(client: TestClient[Any, Any]) -> None:
    for payload in (b"not json", b"[]", b'"a string"', b"[1, NaN]"):
        assert (await _post(client, payload))[0] == 400


async def test_a_batch_with_invalid_events_gets_422_naming_each_and_publishes_nothing(
    client: TestClient[Any, Any],
) -> None:
    good = _bound()
    call = {**_bound(), "event_type": "tool_call"}
    missing = {k: v for k, v in _bound().items() if k != "principal"}
    status, answer = await _post(client, [good, call, missing])
    assert status == 422 and "nothing was published" in answer["error"]
    errors = {e["index"]: e for e in answer["errors"]}
    assert set(errors) == {1, 2}
    assert "'tool_call' is not accepted here" in errors[1]["error"]
    assert errors[2]["event_id"] == missing["event_id"] and "principal" in errors[2]["error"]
    status, answer = await _post(client, [good, {**_bound(), "event_id": good["event_id"]}])
    assert status == 422 and answer["errors"][0]["index"] == 1 and "repeats" in answer["errors"][0]["error"]


async def test_health_shows_counters(client: TestClient[Any, Any]) -> None:
    await _post(client, _bound(), headers={"x": "y"})
    response = await client.get("/healthz")
    body = await response.json()
    assert response.status == 200 and body["rejected_unsigned"] == 1


# -- the CLI's helpers -----------------------------------------------------------------------------
def test_secrets_come_from_the_environment_and_private_files(tmp_path: Path) -> None:
    first, second = new_secret(), new_secret()
    secret_file = tmp_path / "secrets"
    secret_file.write_text(f"# rotation\n{second}\n")
    secret_file.chmod(0o600)
    keys = load_secrets({"SCOPEWATCH_INTAKE_SECRETS": f" {first} "}, [secret_file])
    assert keys == [parse_secret(first), parse_secret(second)]
    secret_file.chmod(0o644)
    with pytest.raises(ValueError, match="chmod 600"):
        load_secrets({}, [secret_file])
    with pytest.raises(ValueError, match="SCOPEWATCH_INTAKE_SECRETS: a webhook secret has the form") as info:
        load_secrets({"SCOPEWATCH_INTAKE_SECRETS": "hunter2-is-not-a-secret"}, [])
    assert "hunter2" not in str(info.value)


def test_times_are_rfc3339_now_or_relative() -> None:
    now = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
    assert parse_when("now", now) == now
    assert parse_when("+8h", now) == datetime(2026, 11, 21, 18, 0, tzinfo=UTC)
    assert parse_when("-90s", now) == datetime(2026, 11, 21, 9, 58, 30, tzinfo=UTC)
    assert parse_when("+1.5d", now) == datetime(2026, 11, 22, 22, 0, tzinfo=UTC)
    assert parse_when("2026-11-21T11:00:00+01:00", now) == now
    with pytest.raises(ValueError):
        parse_when("tomorrow", now)


# -- what the intake trusts -------------------------------------------------------------------------
def test_the_event_id_window_is_bounded_by_time_and_by_count() -> None:
    from collectors.intake import EventIdWindow

    window = EventIdWindow(max_entries=3, seconds=100)
    window.add(["a", "b"], now=0)
    assert window.seen("a", 50) and window.seen("b", 99.9)
    assert not window.seen("a", 100.1) and len(window) == 0  # expired
    window.add(["c", "d", "e", "f"], now=200)  # over the count: the oldest goes first
    assert not window.seen("c", 200) and all(window.seen(i, 200) for i in "def") and len(window) == 3


def test_token_ids_refuse_tokens_and_secrets_without_repeating_them() -> None:
    import jwt as pyjwt

    from collectors.intake import MAX_TOKEN_ID_CHARS, token_id_problem

    token = pyjwt.encode({"sub": "alice", "jti": "j-1"}, "k" * 32, algorithm="HS256")
    for bad, why in (
        (token, "looks like a JWT"),
        ("eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJhIn0", "looks like a secret (jwt)"),  # two segments: the detector
        ("ghp_" + "a" * 36, "looks like a secret (github_token)"),
        ("x" * (MAX_TOKEN_ID_CHARS + 1), "characters long"),
        ("   ", "is empty"),
        ("jti 1", "spaces"),
    ):
        problem = token_id_problem(bad)
        assert problem is not None and why in problem, (bad, problem)
        assert bad.strip() == "" or bad not in problem
    for good in ("j-1", "550e8400-e29b-41d4-a716-446655440000", "release.2026.1", "AbC_123"):
        assert token_id_problem(good) is None, good


def test_blank_identity_fields_are_named() -> None:
    from collectors.intake import blank_identity_fields

    assert blank_identity_fields({"principal": "", "agent_id": " \t", "session_id": "s", "tools": []}) == [
        "principal",
        "agent_id",
    ]
    assert blank_identity_fields({"principal": "alice", "granted_by": None}) == []


async def test_the_intake_stamps_every_event_and_keeps_a_senders_stamp_only_as_claimed() -> None:
    from collectors.intake import make_app
    from schemas import decode

    published: list[Any] = []

    async def record(records: list[Any]) -> None:
        published.extend(records)

    config = IntakeConfig(keys=[parse_secret(SECRET)], collector_id="intake:unit")
    async with TestClient(TestServer(make_app(config, record))) as c:
        forged = _bound(collector={"id": "stdio-victim", "epoch": 1, "seq": 999999, "prev_hash": None})
        status, answer = await _post(c, [forged, _bound()])
        assert status == 200, answer
        events: list[Any] = [decode(value) for _topic, _key, value in published]
        assert [(e.collector.id, e.collector.seq) for e in events] == [("intake:unit", 1), ("intake:unit", 2)]
        assert events[0].model_extra["claimed_collector"]["id"] == "stdio-victim"
        assert "claimed_collector" not in (events[1].model_extra or {})
        # both a stamp and a claimed stamp: refused, nothing published
        both = _bound(collector={"id": "x", "epoch": 1, "seq": 1}, claimed_collector={"id": "y"})
        status, answer = await _post(c, [both])
        assert status == 422 and "claimed_collector" in answer["errors"][0]["error"] and len(published) == 2
        # an empty principal or agent: refused
        status, answer = await _post(c, [_bound(principal=" "), _bound(agent_id="")])
        assert status == 422 and [e["index"] for e in answer["errors"]] == [0, 1] and len(published) == 2


async def test_a_re_sent_event_id_is_refused_under_a_new_webhook_id() -> None:
    from collectors.intake import make_app

    published: list[Any] = []

    async def record(records: list[Any]) -> None:
        published.extend(records)

    config = IntakeConfig(keys=[parse_secret(SECRET)], collector_id="intake:unit")
    async with TestClient(TestServer(make_app(config, record))) as c:
        first, second = _bound(), _bound()
        assert (await _post(c, [first]))[0] == 200
        status, answer = await _post(c, [second, first])  # new webhook-id (each _post signs a fresh one)
        assert (status, answer["reason"]) == (409, "duplicate_event")
        assert answer["errors"] == [
            {"index": 1, "event_id": first["event_id"], "error": "event_id was accepted before (an earlier delivery)"}
        ]
        assert len(published) == 1
        assert (await _post(c, [second]))[0] == 200  # the sender drops the repeat and resends
        assert len(published) == 2
