"""The pager without services: configuration, request building, windows, rate limits, retries, offsets.

Time is injected everywhere (``now`` in epoch seconds), so windows, buckets and backoff are exact.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import shlex
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from detections.findings import FORENSIC_QUERIES
from schemas import Finding, PageAttempt, decode, encode
from scopewatch.pager_cli import pager_app
from stream_jobs.clickhouse import load_migrations
from stream_jobs.forensics import bind, load_queries, parse_assignments
from stream_jobs.pager import forensic_params
from stream_jobs.pager_config import (
    PagerConfig,
    PagerConfigError,
    Redactor,
    Route,
    load_config,
    resolve_routes,
)
from stream_jobs.pager_core import (
    AttemptResult,
    Hold,
    OffsetTracker,
    PageBook,
    RateLimiter,
    RetryPolicy,
    TokenBucket,
    parse_retry_after,
)
from stream_jobs.pager_render import (
    PAGERDUTY_SEVERITY,
    PageContent,
    build_request,
    forensic_command,
    render_body,
    sign,
    webhook_id,
)
from stream_jobs.rows import Provenance, to_row

T0 = 1_795_255_200.0  # 2026-11-21T10:00:00Z
PD_KEY = "R0UT1NGKEY0000000000000000000001"
WH_SECRET = "whsec_" + base64.b64encode(b"k" * 32).decode()
SLACK_URL = "https://hooks.slack.com/services/T0000/B0000/XXXXSECRETXXXX"
ENV = {"PD_KEY": PD_KEY, "WH_SECRET": WH_SECRET, "SLACK_URL": SLACK_URL}


def finding(n: int = 0, **over: Any) -> Finding:
    at = datetime.fromtimestamp(T0, UTC)
    data: dict[str, Any] = {
        "finding_id": f"f-{n}",
        "dedup_key": "revoked_grant|acme|alice|agent-7|g-1",
        "rule_id": "revoked_grant",
        "rule_version": 2,
        "severity": "high",
        "title": "Tool call under a revoked grant",
        "summary": "agent-7 called fs/read_file for alice under revoked grant g-1",
        "tenant": "acme",
        "principal": "alice",
        "agent_id": "agent-7",
        "call_id": f"c-{n}",
        "call_ids": [f"c-{n}"],
        "session_id": "s-1",
        "grant_id": "g-1",
        "forensic_query": "grant_history",
        "first_call_time": at - timedelta(seconds=2),
        "last_call_time": at - timedelta(seconds=1),
        "details": {"seconds_after_revocation": 1.5},
        "detected_at": at,
    }
    data.update(over)
    return Finding.model_validate(data)


def config(**over: Any) -> PagerConfig:
    data: dict[str, Any] = {
        "window_seconds": 600,
        "retry_base_seconds": 1,
        "retry_max_seconds": 8,
        "max_age_seconds": 60,
        "retry_jitter": 0,
        "routes": [
            {"name": "pd", "channel": "pagerduty", "url": "http://127.0.0.1:1", "secret_env": "PD_KEY"},
            {"name": "chat", "channel": "slack", "url_env": "SLACK_URL", "min_severity": "medium", "tenants": ["acme"]},
            {
                "name": "siem",
                "channel": "webhook",
                "url": "http://127.0.0.1:1/h",
                "secret_env": "WH_SECRET",
                "min_severity": "info",
            },
        ],
    }
    data.update(over)
    return PagerConfig.model_validate(data)


def book(cfg: PagerConfig | None = None, now: float = T0) -> tuple[PageBook, list[Route]]:
    cfg = cfg or config()
    routes = resolve_routes(cfg, ENV)
    ids = iter(range(1_000_000))
    return PageBook(cfg, routes, now, new_id=lambda: f"a-{next(ids)}"), routes


OK = AttemptResult(202, 5.0)


# ----------------------------------------------------------------------------- configuration


def test_toml_and_json_configs_load_the_same(tmp_path: Path) -> None:
    toml = tmp_path / "pager.toml"
    toml.write_text(
        'window_seconds = 120\n[[routes]]\nname = "pd"\nchannel = "pagerduty"\nsecret_env = "PD_KEY"\n'
        'tenants = ["acme"]\n'
    )
    js = tmp_path / "pager.json"
    js.write_text(
        json.dumps(
            {
                "window_seconds": 120,
                "routes": [{"name": "pd", "channel": "pagerduty", "secret_env": "PD_KEY", "tenants": ["acme"]}],
            }
        )
    )
    assert load_config(toml) == load_config(js)
    (route,) = resolve_routes(load_config(toml), {"PD_KEY": PD_KEY})
    assert route.url.get_secret_value() == "https://events.pagerduty.com/v2/enqueue"
    assert route.config.min_severity == "high"


@pytest.mark.parametrize(
    ("route", "message"),
    [
        ({"name": "x", "channel": "sms", "url": "http://h"}, "routes.0.channel"),
        ({"name": "x", "channel": "pagerduty"}, "needs secret_env"),
        ({"name": "x", "channel": "webhook", "url": "http://h"}, "needs secret_env"),
        ({"name": "x", "channel": "slack"}, "needs url_env"),
        ({"name": "x", "channel": "slack", "url_env": "U", "secret_env": "S"}, "its URL is the secret"),
        ({"name": "x", "channel": "slack", "url_env": "U", "url": "http://h"}, "not both"),
        ({"name": "x", "channel": "webhook", "url": "ftp://h", "secret_env": "S"}, "absolute http"),
        ({"name": "bad name", "channel": "slack", "url_env": "U"}, "routes.0.name"),
        ({"name": "x", "channel": "slack", "url_env": "U", "colour": "red"}, "routes.0.colour"),
    ],
)
def test_bad_routes_are_refused(tmp_path: Path, route: dict[str, Any], message: str) -> None:
    path = tmp_path / "pager.json"
    path.write_text(json.dumps({"routes": [route]}))
    with pytest.raises(PagerConfigError, match=re.escape(message)):
        load_config(path)


def test_config_file_errors(tmp_path: Path) -> None:
    dup = tmp_path / "dup.json"
    route = {"name": "x", "channel": "slack", "url_env": "U"}
    dup.write_text(json.dumps({"routes": [route, route]}))
    with pytest.raises(PagerConfigError, match="two routes are named 'x'"):
        load_config(dup)
    with pytest.raises(PagerConfigError, match=r"\.toml or \.json"):
        load_config(tmp_path / "x.yaml")
    bad = tmp_path / "bad.toml"
    bad.write_text("routes = [")
    with pytest.raises(PagerConfigError, match="not valid TOML"):
        load_config(bad)
    empty = tmp_path / "empty.json"
    empty.write_text("{}")
    with pytest.raises(PagerConfigError, match="routes"):
        load_config(empty)


def test_missing_or_bad_secrets_are_named_by_variable_never_by_value() -> None:
    cfg = config()
    with pytest.raises(PagerConfigError, match="route pd: environment variable PD_KEY is not set"):
        resolve_routes(cfg, {**ENV, "PD_KEY": " "})
    with pytest.raises(PagerConfigError, match="route chat: environment variable SLACK_URL is not set"):
        resolve_routes(cfg, {k: v for k, v in ENV.items() if k != "SLACK_URL"})
    with pytest.raises(PagerConfigError, match="SLACK_URL does not hold an absolute") as info:
        resolve_routes(cfg, {**ENV, "SLACK_URL": "hooks.slack.com/services/T/B/SECRETVALUE"})
    assert "SECRETVALUE" not in str(info.value)
    for bad in ("notwhsec-abc", "whsec_!!!notbase64", "whsec_" + base64.b64encode(b"short").decode()):
        with pytest.raises(PagerConfigError, match="route siem: WH_SECRET") as info:
            resolve_routes(cfg, {**ENV, "WH_SECRET": bad})
        assert bad not in str(info.value) and bad.removeprefix("whsec_") not in str(info.value)


def test_routes_and_redactor_keep_secrets_out_of_texts() -> None:
    routes = resolve_routes(config(), ENV)
    for route in routes:
        text = repr(route) + str(route)
        assert PD_KEY not in text and WH_SECRET not in text and "XXXXSECRETXXXX" not in text
    redact = Redactor.for_routes(routes)
    message = (
        f"ClientConnectorError: Cannot connect to {SLACK_URL} with key {PD_KEY}; body said "
        f"'/services/T0000/B0000/XXXXSECRETXXXX' and {WH_SECRET.removeprefix('whsec_')}"
    )
    clean = redact(message)
    assert PD_KEY not in clean and "XXXXSECRETXXXX" not in clean and WH_SECRET.removeprefix("whsec_") not in clean
    assert "Cannot connect to" in clean
    assert len(redact("x" * 1000, limit=50)) == 50


# ---------------------------------------------------------------------------------- requests


def test_standard_webhooks_signature_matches_the_spec_vector() -> None:
    # The test vector of the Standard Webhooks reference libraries.
    secret = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw"
    body = b'{"test": 2432232314}'
    assert sign(secret, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, body) == (
        "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE="
    )


def content(f: Finding | None = None, grouped: int = 1) -> PageContent:
    return PageContent(f or finding(), "revoked_grant|acme|alice|agent-7|g-1#1795255200000", grouped, T0)


@pytest.mark.parametrize(("ours", "theirs"), list(PAGERDUTY_SEVERITY.items()))
def test_pagerduty_event(ours: str, theirs: str) -> None:
    pd = resolve_routes(config(), ENV)[0]
    f = finding(severity=ours)
    body = json.loads(render_body(content(f), pd))
    details = body["payload"].pop("custom_details")
    assert body == {
        "routing_key": PD_KEY,
        "event_action": "trigger",
        "dedup_key": "revoked_grant|acme|alice|agent-7|g-1",
        "client": "scopewatch",
        "payload": {
            "summary": "[acme] Tool call under a revoked grant: agent-7 called fs/read_file for alice under revoked "
            "grant g-1",
            "source": "scopewatch/acme",
            "severity": theirs,
            "timestamp": "2026-11-21T09:59:59.000Z",
            "component": "agent-7",
            "group": "acme",
            "class": "revoked_grant",
        },
    }
    assert details["rule_id"] == "revoked_grant" and details["principal"] == "alice"
    assert details["agent_id"] == "agent-7" and details["call_ids"] == ["c-0"] and details["grant_id"] == "g-1"
    assert details["forensic_command"].startswith("scopewatch forensics grant_history --param tenant=acme")
    assert details["page_key"].endswith("#1795255200000") and details["findings_grouped"] == 1
    request = build_request(pd, render_body(content(f), pd), "k#1", T0)
    assert (request.method, request.url) == ("POST", "http://127.0.0.1:1/v2/enqueue")
    assert request.headers == {"Content-Type": "application/json", "User-Agent": "scopewatch-pager/1"}
    assert PD_KEY not in repr(request)


def test_pagerduty_summary_is_cut_to_its_limit() -> None:
    pd = resolve_routes(config(), ENV)[0]
    body = json.loads(render_body(content(finding(summary="y" * 5000)), pd))
    assert len(body["payload"]["summary"]) == 1024


def test_slack_message_has_text_and_blocks_and_escapes() -> None:
    slack = resolve_routes(config(), ENV)[1]
    f = finding(summary="agent <b> & co", call_ids=[f"c-{i}" for i in range(8)])
    body = json.loads(render_body(content(f, grouped=3), slack))
    assert set(body) == {"text", "blocks"}
    assert body["text"] == "[HIGH] Tool call under a revoked grant (acme): agent &lt;b&gt; &amp; co"
    assert [b["type"] for b in body["blocks"]] == ["header", "section", "section", "section", "context"]
    fields = {f["text"].split("\n")[0]: f["text"].split("\n")[1] for f in body["blocks"][2]["fields"]}
    assert fields["*Calls*"] == "c-3, c-4, c-5, c-6, c-7 (+3 more)"
    assert fields["*Findings grouped*"] == "3"
    assert "scopewatch forensics grant_history" in body["blocks"][3]["text"]["text"]
    assert build_request(slack, b"{}", "k#1", T0).url == SLACK_URL


def test_webhook_request_is_signed_and_keeps_its_id_across_attempts() -> None:
    hook = resolve_routes(config(), ENV)[2]
    body = render_body(content(), hook)
    payload = json.loads(body)
    assert payload["type"] == "scopewatch.page" and payload["timestamp"] == "2026-11-21T10:00:00.000Z"
    assert payload["data"]["finding_id"] == "f-0"
    first = build_request(hook, body, "revoked_grant|acme|alice|agent-7|g-1#1795255200000", T0)
    later = build_request(hook, body, "revoked_grant|acme|alice|agent-7|g-1#1795255200000", T0 + 30)
    assert first.url == "http://127.0.0.1:1/h" and first.body == later.body
    assert first.headers["webhook-id"] == later.headers["webhook-id"]
    assert re.fullmatch(r"msg_[0-9a-f]{32}", first.headers["webhook-id"])
    assert (first.headers["webhook-timestamp"], later.headers["webhook-timestamp"]) == (str(int(T0)), str(int(T0) + 30))
    for req in (first, later):  # verified by hand, not with the code under test
        key = base64.b64decode(WH_SECRET.removeprefix("whsec_"))
        signed = f"{req.headers['webhook-id']}.{req.headers['webhook-timestamp']}.".encode() + req.body
        mac = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        assert req.headers["webhook-signature"] == f"v1,{mac}"
    assert webhook_id("a#1", "siem") != webhook_id("a#1", "other") != webhook_id("a#2", "siem")


@pytest.mark.parametrize("query", sorted(FORENSIC_QUERIES))
@pytest.mark.parametrize("declared", ["loaded", "fallback"])
def test_forensic_command_runs_as_given(query: str, declared: str) -> None:
    """The command line in a page parses and binds with the real query pack (each query a finding can name)."""
    queries = load_queries()
    f = finding(
        forensic_query=query,
        call_ids=["c-1", "c 2"],
        session_id="s-1",
        details={"server": "fs", "tool": "read_file"},
    )
    params = forensic_params() if declared == "loaded" else None
    argv = shlex.split(forensic_command(f, params))
    assert argv[:3] == ["scopewatch", "forensics", query]
    items = [argv[i + 1] for i, a in enumerate(argv) if a == "--param"]
    assert "<" not in " ".join(items)
    bind(queries[query], parse_assignments(queries[query], items), "scopewatch")


def test_forensic_command_marks_what_the_finding_lacks() -> None:
    command = forensic_command(finding(forensic_query="delegation_timeline", principal=None))
    assert "--param 'principal=<principal>'" in command


# ------------------------------------------------------------------------------ rate limits


def test_token_bucket_spends_its_burst_then_refills() -> None:
    bucket = TokenBucket(rate_per_minute=6, burst=2, now=T0)
    assert bucket.available(T0)
    bucket.take(T0)
    bucket.take(T0)
    assert not bucket.available(T0 + 9.9)
    assert bucket.available(T0 + 10.0)
    assert TokenBucket(6, 2, T0).available(T0 - 5)  # a clock stepping back takes nothing


def test_rate_limiter_needs_the_route_and_the_global_bucket() -> None:
    routes = resolve_routes(config(), ENV)
    limiter = RateLimiter(routes, global_rate=60, global_burst=3, now=T0)
    assert [limiter.allow("pd", T0) for _ in range(3)] == [True, True, True]
    assert not limiter.allow("siem", T0)  # global spent, siem's own bucket full
    assert limiter.allow("siem", T0 + 1.0)


# -------------------------------------------------------------------------------- windows


def test_a_new_dedup_key_opens_a_page_to_the_matching_routes() -> None:
    b, _ = book()
    offer = b.offer(finding(), Hold("p0", 0), T0)
    assert offer.kind == "new" and offer.page is not None
    assert [rs.route.name for rs in offer.start] == ["pd", "chat", "siem"]
    assert offer.page.page_key == "revoked_grant|acme|alice|agent-7|g-1#1795255200000"
    low = b.offer(finding(1, dedup_key="k2", severity="low", tenant="other"), Hold("p0", 1), T0)
    assert [rs.route.name for rs in low.start] == ["siem"]
    medium_other = b.offer(finding(2, dedup_key="k3", severity="medium", tenant="other"), Hold("p0", 2), T0)
    assert [rs.route.name for rs in medium_other.start] == ["siem"]


def test_unrouted_and_stale_findings_are_released_at_once() -> None:
    cfg = config(routes=[{"name": "pd", "channel": "pagerduty", "secret_env": "PD_KEY"}])
    b, _ = book(cfg)
    unrouted = b.offer(finding(severity="medium"), Hold("p", 0), T0)
    assert unrouted.kind == "unrouted" and len(unrouted.release) == 1
    stale = b.offer(finding(), Hold("p", 1), T0 + 86400 + 1)
    assert stale.kind == "stale" and len(stale.release) == 1
    assert not b.windows


def test_findings_group_while_pending_then_are_suppressed_and_counted() -> None:
    cfg = config(
        routes=[
            {
                "name": "siem",
                "channel": "webhook",
                "url": "http://h/x",
                "secret_env": "WH_SECRET",
                "min_severity": "info",
            }
        ]
    )
    b, _ = book(cfg)
    tracker = OffsetTracker()
    holds = []
    for i in range(500):
        hold = Hold("p0", i)
        tracker.seen("p0", i)
        holds.append(hold)
        offer = b.offer(finding(i), hold, T0 + i * 0.01)
        if i == 0:
            assert offer.kind == "new" and b.pending == 1
            page, (rs,) = offer.page, offer.start
            b.begin_attempt(page, rs, T0)
        elif i < 100:
            assert offer.kind == "grouped" and not offer.start
        else:
            assert offer.kind == "suppressed" and not offer.start
        if i == 99:
            step = b.end_attempt(page, rs, OK, T0 + 1)
            assert (step.row.outcome, step.row.findings_grouped, step.delay) == ("delivered", 100, None)
            assert b.pending == 0
            for h in b.release(step.holds):
                tracker.done(h.partition, h.offset)
            assert tracker.committable() == {"p0": 100}
    (held_back,) = b.take_suppressed(T0 + 7)
    assert (held_back.row.outcome, held_back.row.findings_grouped, held_back.row.attempt) == ("suppressed", 400, 0)
    assert held_back.row.finding_id == "f-499" and held_back.row.route == "siem"
    for h in b.release(held_back.holds):
        tracker.done(h.partition, h.offset)
    assert tracker.committable() == {"p0": 500}
    assert b.take_suppressed(T0 + 8) == []


def test_one_page_per_window() -> None:
    b, _ = book(config(window_seconds=60))
    first = b.offer(finding(0), Hold("p", 0), T0)
    for rs in first.start:
        b.begin_attempt(first.page, rs, T0)
        b.end_attempt(first.page, rs, OK, T0 + 1)
    assert b.offer(finding(1), Hold("p", 1), T0 + 59).kind == "suppressed"
    second = b.offer(finding(2), Hold("p", 2), T0 + 60)
    assert second.kind == "new" and second.page is not first.page
    assert second.page.page_key != first.page.page_key
    assert b.expire(T0 + 200) == 0  # the second page is still pending
    for rs in second.start:
        b.begin_attempt(second.page, rs, T0 + 60)
        b.end_attempt(second.page, rs, OK, T0 + 61)
    assert b.expire(T0 + 119) == 0
    assert b.expire(T0 + 120) == 1 and not b.windows


def test_a_page_still_retrying_after_its_window_keeps_grouping() -> None:
    b, _ = book(config(window_seconds=10, max_age_seconds=3600))
    first = b.offer(finding(0), Hold("p", 0), T0)
    for rs in first.start:
        b.begin_attempt(first.page, rs, T0)
        step = b.end_attempt(first.page, rs, AttemptResult(503, 1.0), T0 + 1)
        assert step.row.outcome == "retry"
    later = b.offer(finding(1), Hold("p", 1), T0 + 30)
    assert later.kind == "grouped" and later.page is first.page
    assert b.expire(T0 + 30) == 0


def test_rate_limited_pages_are_recorded_and_hold_the_window() -> None:
    cfg = config(
        global_burst=1,
        routes=[{"name": "pd", "channel": "pagerduty", "secret_env": "PD_KEY", "burst": 5}],
    )
    b, _ = book(cfg)
    assert b.offer(finding(0, dedup_key="a"), Hold("p", 0), T0).kind == "new"
    limited = b.offer(finding(1, dedup_key="b"), Hold("p", 1), T0 + 0.5)
    assert limited.kind == "new" and not limited.start
    (rs,) = limited.rate_limited
    step = b.rate_limited_row(limited.page, rs, T0 + 0.5)
    assert (step.row.outcome, step.row.attempt, step.row.http_status) == ("rate_limited", 0, None)
    assert [h.offset for h in b.release(step.holds)] == [1]
    assert b.offer(finding(2, dedup_key="b"), Hold("p", 2), T0 + 2).kind == "suppressed"
    assert b.offer(finding(3, dedup_key="c"), Hold("p", 3), T0 + 61).kind == "new"


# -------------------------------------------------------------------------------- retries


def test_retry_decisions() -> None:
    policy = RetryPolicy(base=1, ceiling=8, max_age=60, retry_after_max=30, jitter=0.5)
    decide = policy.decide
    assert decide(AttemptResult(202, 1), 1, T0, T0, 0.0) == ("delivered", None, None)
    assert decide(AttemptResult(429, 1, "7"), 1, T0, T0, 0.9) == ("retry", 7.0, "HTTP 429")
    assert decide(AttemptResult(429, 1, "3600"), 1, T0, T0, 0.9)[1] == 30.0
    date = format_datetime(datetime.fromtimestamp(T0 + 12, UTC), usegmt=True)
    assert decide(AttemptResult(503, 1, date), 1, T0, T0, 0.0)[:2] == ("retry", 12.0)
    assert [decide(AttemptResult(500, 1), n, T0, T0, 0.0)[1] for n in (1, 2, 3, 4, 5, 9)] == [1, 2, 4, 8, 8, 8]
    assert decide(AttemptResult(502, 1), 3, T0, T0, 1.0)[1] == 2.0  # jitter shortens by up to half
    assert decide(AttemptResult(None, 1, None, "ClientConnectorError: refused"), 1, T0, T0, 0.0) == (
        "retry",
        1.0,
        "ClientConnectorError: refused",
    )
    assert decide(AttemptResult(408, 1), 1, T0, T0, 0)[0] == "retry"
    assert decide(AttemptResult(400, 1, None, "HTTP 400: invalid event"), 1, T0, T0, 0.0) == (
        "failed",
        None,
        "HTTP 400: invalid event",
    )
    assert decide(AttemptResult(301, 1), 1, T0, T0, 0)[0] == "failed"
    assert decide(AttemptResult(404, 1), 1, T0, T0, 0)[0] == "failed"
    outcome, delay, error = decide(AttemptResult(503, 1), 7, T0, T0 + 55, 0.0)
    assert (outcome, delay) == ("failed", None) and "gave up after 7 attempts over 55s" in (error or "")


def test_parse_retry_after() -> None:
    assert parse_retry_after(None, T0) is None
    assert parse_retry_after(" 5 ", T0) == 5.0
    assert parse_retry_after("soon", T0) is None
    past = format_datetime(datetime.fromtimestamp(T0 - 100, UTC), usegmt=True)
    assert parse_retry_after(past, T0) == 0.0


def test_retries_keep_the_body_and_count_attempts() -> None:
    b, _ = book()
    offer = b.offer(finding(0), Hold("p", 0), T0)
    page, rs = offer.page, offer.start[2]  # siem (webhook)
    first = b.begin_attempt(page, rs, T0)
    step = b.end_attempt(page, rs, AttemptResult(429, 3.0, "1", "HTTP 429"), T0 + 0.1)
    assert (step.row.outcome, step.row.attempt, step.row.http_status, step.delay) == ("retry", 1, 429, 1.0)
    assert step.holds == ()
    b.offer(finding(1), Hold("p", 1), T0 + 0.5)
    second = b.begin_attempt(page, rs, T0 + 1.1)
    assert second.body == first.body and second.headers["webhook-id"] == first.headers["webhook-id"]
    step = b.end_attempt(page, rs, OK, T0 + 1.2)
    assert (step.row.outcome, step.row.attempt, step.row.findings_grouped) == ("delivered", 2, 2)
    assert sorted(h.offset for h in step.holds) == [0, 1]
    assert step.row.page_key == page.page_key and step.row.route == "siem" and step.row.channel == "webhook"


# ------------------------------------------------------------------------- restart, ledger


def attempt_row(page_key: str, route: str, channel: str, attempt: int, outcome: str, at: float) -> PageAttempt:
    return PageAttempt(
        attempt_id=f"{page_key}/{route}/{attempt}/{outcome}",
        page_key=page_key,
        dedup_key=page_key.split("#")[0],
        finding_id="f-0",
        rule_id="revoked_grant",
        severity="high",
        tenant="acme",
        channel=channel,  # type: ignore[arg-type]
        route=route,
        attempt=attempt,
        outcome=outcome,  # type: ignore[arg-type]
        http_status=None,
        error=None,
        findings_grouped=1,
        attempted_at=datetime.fromtimestamp(at, UTC),
        latency_ms=1.0,
    )


def test_restore_suppresses_pages_already_delivered_in_the_window() -> None:
    cfg = config(routes=[{"name": "pd", "channel": "pagerduty", "secret_env": "PD_KEY"}])
    b, _ = book(cfg, now=T0)
    key = "revoked_grant|acme|alice|agent-7|g-1#1795255140000"
    rows = [
        attempt_row(key, "pd", "pagerduty", 1, "retry", T0 - 60),
        attempt_row(key, "pd", "pagerduty", 2, "delivered", T0 - 58),
        attempt_row("old|key#1", "pd", "pagerduty", 1, "delivered", T0 - 3600),
        attempt_row("gone|route#1", "removed", "slack", 1, "delivered", T0 - 10),
    ]
    assert b.restore(rows, T0) == 2
    assert set(b.windows) == {"revoked_grant|acme|alice|agent-7|g-1", "gone|route"}
    assert b.offer(finding(1), Hold("p", 0), T0).kind == "suppressed"
    (held_back,) = b.take_suppressed(T0 + 1)
    assert held_back.row.page_key == key and held_back.row.findings_grouped == 1


def test_restore_resumes_a_pending_page_with_its_key_and_attempt_count() -> None:
    cfg = config(routes=[{"name": "siem", "channel": "webhook", "url": "http://h/x", "secret_env": "WH_SECRET"}])
    b, _ = book(cfg, now=T0)
    key = "revoked_grant|acme|alice|agent-7|g-1#1795255190000"
    rows = [attempt_row(key, "siem", "webhook", n, "retry", T0 - 10 + n) for n in (1, 2, 3)]
    assert b.restore(rows, T0) == 1
    offer = b.offer(finding(0), Hold("p", 5), T0 + 700)  # the window is over; the page still is not
    assert offer.kind == "resumed" and offer.page.page_key == key
    (rs,) = offer.start
    request = b.begin_attempt(offer.page, rs, T0 + 700)
    assert request.headers["webhook-id"] == webhook_id(key, "siem")
    step = b.end_attempt(offer.page, rs, OK, T0 + 701)
    assert (step.row.attempt, step.row.outcome, step.row.page_key) == (4, "delivered", key)
    assert b.offer(finding(1), Hold("p", 6), T0 + 702).kind == "new"  # window over and done: a new page


def test_restore_drops_pending_pages_past_their_max_age() -> None:
    b, _ = book(config(max_age_seconds=60))
    rows = [attempt_row("k#1", "siem", "webhook", 1, "retry", T0 - 61)]
    assert b.restore(rows, T0) == 0


def test_forget_hands_windows_over_and_frees_their_pending_slots() -> None:
    b, _ = book()
    first = b.offer(finding(0), Hold("p0", 0), T0)
    other = b.offer(finding(1, dedup_key="k2"), Hold("p1", 0), T0)
    assert first.page is not None and other.page is not None and b.pending == 6  # 3 routes each
    assert b.forget(lambda key: key == "k2") == 1
    assert set(b.windows) == {first.page.dedup_key} and b.pending == 3
    # whoever owns k2 now decides about it; here a finding of k2 would open a new page
    assert b.offer(finding(2, dedup_key="k2"), Hold("p1", 1), T0 + 1).kind == "new"


def test_offsets_commit_up_to_the_oldest_held_finding() -> None:
    tracker = OffsetTracker()
    for offset in range(5):
        tracker.seen("p0", offset)
    tracker.seen("p1", 7)
    assert tracker.committable() == {"p0": 0, "p1": 7}
    for offset in (0, 1, 3):
        tracker.done("p0", offset)
    tracker.done("p1", 7)
    assert tracker.committable() == {"p0": 2, "p1": 8}
    tracker.committed({"p0": 2, "p1": 8})
    assert tracker.committable() == {} and tracker.held == 2
    tracker.done("p0", 2)
    tracker.done("p0", 4)
    assert tracker.committable() == {"p0": 5}
    tracker.forget(["p0"])
    assert tracker.held == 0


def test_a_page_attempt_row_fills_exactly_the_pages_table() -> None:
    sql = "\n".join(s for m in load_migrations() for s in m.statements if ".pages" in s.split("(")[0])
    columns = re.findall(r"^\s{4}(\w+)\s+\S", sql.split("(", 1)[1], flags=re.M)
    b, _ = book()
    offer = b.offer(finding(), Hold("p", 0), T0)
    row = b.end_attempt(offer.page, offer.start[0], AttemptResult(None, 2.0, None, "refused"), T0).row
    assert decode(encode(row)) == row
    table, mapped = to_row(row, Provenance("audit.pages", 0, 9, datetime.fromtimestamp(T0, UTC)))
    assert table == "pages"
    assert list(mapped) == columns
    assert mapped["http_status"] is None and mapped["error"] == "refused" and mapped["route"] == "pd"


# ------------------------------------------------------------------------------------ CLI


def test_check_names_variables_and_never_shows_secrets(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "pager.toml"
    path.write_text(
        '[[routes]]\nname = "pd"\nchannel = "pagerduty"\nsecret_env = "T_PD_KEY"\n'
        '[[routes]]\nname = "chat"\nchannel = "slack"\nurl_env = "T_SLACK_URL"\n'
    )
    monkeypatch.setenv("SCOPEWATCH_HOME", str(tmp_path))
    monkeypatch.setenv("T_PD_KEY", PD_KEY)
    monkeypatch.delenv("T_SLACK_URL", raising=False)
    runner = CliRunner()
    result = runner.invoke(pager_app, ["check", "--json"])
    assert result.exit_code == 2
    report = json.loads(result.stdout)
    assert report["routes"][0]["variables"] == {"T_PD_KEY": True}
    assert report["routes"][1]["variables"] == {"T_SLACK_URL": False}
    assert "T_SLACK_URL is not set" in report["error"]
    monkeypatch.setenv("T_SLACK_URL", SLACK_URL)
    result = runner.invoke(pager_app, ["--config", str(path), "check"])
    assert result.exit_code == 0, result.output
    assert PD_KEY not in result.output and "XXXXSECRETXXXX" not in result.output
    assert runner.invoke(pager_app, ["send-test", "nope", "--config", str(path)]).exit_code == 2


def test_no_routes_file_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCOPEWATCH_HOME", str(tmp_path))
    monkeypatch.delenv("SCOPEWATCH_PAGER_CONFIG", raising=False)
    result = CliRunner().invoke(pager_app, ["check"])
    assert result.exit_code == 2
    assert "no routes file" in result.output
