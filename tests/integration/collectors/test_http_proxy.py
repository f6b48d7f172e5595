"""The HTTP collector (``scopewatch proxy``) in front of a real MCP Streamable HTTP server.

The upstream is the ``mcp`` SDK's own server (``MCPServer`` over streamable-http, in a child
process); the client is the SDK's ``Client`` over its Streamable HTTP transport, in both protocol
eras (handshake sessions with ``Mcp-Session-Id`` and DELETE, and 2026-07-28 single-exchange
requests); the proxy runs as its real command line in a child process; events are read back
from the session's real Kafka broker. Tokens are signed here with freshly generated RSA and EC
keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx2
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from integration.conftest import make_settings
from mcp import Client, MCPError
from mcp.client.streamable_http import streamable_http_client
from mcp.shared._httpx_utils import create_mcp_http_client
from mcp_types import Implementation

from schemas import SessionBound, SessionEnded, ToolCall, ToolResult, decode, key_for, to_canonical_json
from scopewatch.stack import proc
from scopewatch.stack.kafka import KafkaBroker, create_topics
from scopewatch.stack.stack import settings_env
from stream_jobs.runtime.settings import Settings
from support.kafka import reader

pytestmark = pytest.mark.integration

ISSUER = "https://idp.scopewatch.test"
AUDIENCE = "https://mcp.scopewatch.test"
MODERN = "2026-07-28"

UPSTREAM = r"""
import asyncio, pathlib, sys
import anyio
from mcp.server.mcpserver import Context, MCPServer

marks = pathlib.Path(sys.argv[2])
server = MCPServer("scopewatch-upstream")

@server.tool()
def add(a: int, b: int) -> int:
    "Add two numbers."
    return a + b

@server.tool()
async def countdown(steps: int, delay: float, ctx: Context) -> str:
    "Count down, reporting progress after every step."
    for i in range(steps):
        await ctx.report_progress(i + 1, steps, f"step {i + 1}")
        await anyio.sleep(delay)
    return f"done after {steps} steps"

@server.tool()
def fail(reason: str) -> str:
    "Always fails."
    raise ValueError(reason)

@server.tool()
def read_file(path: str) -> str:
    "Pretend to read a file."
    return f"contents of {path}"

@server.tool()
def touch(name: str) -> str:
    "Leave a mark the test can see (proves a call reached the server)."
    (marks / name).write_text("x")
    return name

asyncio.run(server.run_streamable_http_async(host="127.0.0.1", port=int(sys.argv[1])))
"""


# -- keys and tokens ---------------------------------------------------------------------------------
@dataclass
class Keys:
    rsa: rsa.RSAPrivateKey
    ec: ec.EllipticCurvePrivateKey
    rsa_pem: Path
    jwks: Path

    def token(self, alg: str = "RS256", key: Any = None, **claims: Any) -> str:
        now = int(time.time())
        payload = {
            "iss": ISSUER,
            "aud": AUDIENCE,
            "sub": "alice@example.com",
            "client_id": "agent-7",
            "act": {"sub": "planner"},
            "scope": "tools:call files:read",
            "jti": uuid.uuid4().hex,
            "iat": now,
            "nbf": now,
            "exp": now + 900,
        }
        payload.update(claims)
        payload = {k: v for k, v in payload.items() if v is not None}
        signer = key if key is not None else (self.rsa if alg == "RS256" else self.ec)
        headers = {"kid": "ec-1"} if alg == "ES256" and key is None else None
        return jwt.encode(payload, signer, algorithm=alg, headers=headers)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Keys:
    home = tmp_path_factory.mktemp("keys")
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    rsa_pem = home / "idp-rsa.pem"
    rsa_pem.write_bytes(
        rsa_key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    ec_jwk = {**json.loads(jwt.algorithms.ECAlgorithm.to_jwk(ec_key.public_key())), "kid": "ec-1", "use": "sig"}
    jwks = home / "jwks.json"
    jwks.write_text(json.dumps({"keys": [ec_jwk]}))
    return Keys(rsa_key, ec_key, rsa_pem, jwks)


def claims_of(token: str) -> dict[str, Any]:
    return dict(jwt.decode(token, options={"verify_signature": False}))


# -- the upstream MCP server ---------------------------------------------------------------------------
@dataclass
class Upstream:
    url: str
    marks: Path


def _wait_for_port(port: int, child: subprocess.Popen[bytes], timeout: float = 90.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"the upstream MCP server exited with {child.returncode}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return
        time.sleep(0.1)
    raise RuntimeError(f"nothing listens on port {port} after {timeout} s")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Upstream]:
    home = tmp_path_factory.mktemp("upstream")
    marks = home / "marks"
    marks.mkdir()
    port = proc.free_port()
    with (home / "server.log").open("wb") as log:
        child = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(port), str(marks)], stdout=log, stderr=log)
    try:
        _wait_for_port(port, child)
        yield Upstream(f"http://127.0.0.1:{port}/mcp", marks)
    finally:
        child.terminate()
        try:
            child.wait(timeout=30)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(timeout=30)


# -- the proxy (its real command line) -------------------------------------------------------------------
@pytest.fixture
def settings(tmp_path: Path, kafka_broker: KafkaBroker, cache_dir: Path) -> Settings:
    s = make_settings(tmp_path / "home", kafka_broker.config.bootstrap, cache_dir)
    s.home.mkdir(parents=True, exist_ok=True)
    wanted = [s.topics.tool_calls, s.topics.tool_results, s.topics.sessions]
    asyncio.run(create_topics(s.kafka_bootstrap, wanted, partitions=2))
    return s


@dataclass
class Proxy:
    child: subprocess.Popen[bytes]
    url: str
    stderr: list[bytes] = field(default_factory=list)

    @property
    def log(self) -> str:
        return b"".join(self.stderr).decode("utf-8", "replace")


@contextlib.contextmanager
def running_proxy(settings: Settings, upstream: str, *options: str, server: str = "lean") -> Iterator[Proxy]:
    """The proxy's real command line; ``server``: ``SCOPEWATCH_PROXY_SERVER`` (lean or aiohttp)."""
    port = proc.free_port()
    argv = [
        sys.executable,
        "-m",
        "scopewatch.proxy_cli",
        "--upstream",
        upstream,
        "--listen",
        f"127.0.0.1:{port}",
        "--tenant",
        "acme",
        "--log-level",
        "debug",
        "--flush-timeout",
        "30",
        *options,
    ]
    env = settings_env(settings)
    env["SCOPEWATCH_REDACTION_KEY"] = "integration-test-redaction-key-0123456789"
    env["SCOPEWATCH_PROXY_SERVER"] = server
    child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    proxy = Proxy(child, f"http://127.0.0.1:{port}/mcp")
    ready = threading.Event()

    def drain() -> None:
        assert child.stderr is not None
        for line in child.stderr:
            proxy.stderr.append(line)
            if b"listening on" in line:
                ready.set()
        ready.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert ready.wait(90), "the proxy did not start"
        assert child.poll() is None, proxy.log
        yield proxy
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
        try:
            code = child.wait(timeout=90)
        except subprocess.TimeoutExpired:
            child.kill()
            code = child.wait(timeout=30)
        reader.join(timeout=30)
        assert code == 0, proxy.log
        assert "Traceback" not in proxy.log and "Error handling request" not in proxy.log, proxy.log


def proxy_options(keys: Keys, *extra: str) -> list[str]:
    return [
        "--key",
        str(keys.rsa_pem),
        "--jwks",
        str(keys.jwks),
        "--issuer",
        ISSUER,
        "--audience",
        AUDIENCE,
        *extra,
    ]


# -- the client ------------------------------------------------------------------------------------------
@dataclass
class Transcript:
    results: dict[str, Any]
    tools: list[str]
    progress: list[tuple[float, float | None, str | None]]
    progress_at: list[float]
    countdown_done_at: float
    session_ids: set[str]
    protocol_version: str


async def drive(url: str, token: str | None, mode: str) -> Transcript:
    """A real MCP client session: list tools, call them (one streams progress), then close (DELETE)."""
    session_ids: set[str] = set()

    async def seen(response: httpx2.Response) -> None:
        if response.headers.get("mcp-session-id"):
            session_ids.add(response.headers["mcp-session-id"])

    http = create_mcp_http_client(headers={"Authorization": f"Bearer {token}"} if token else None)
    http.event_hooks["response"].append(seen)
    progress: list[tuple[float, float | None, str | None]] = []
    progress_at: list[float] = []

    async def on_progress(value: float, total: float | None, message: str | None) -> None:
        progress.append((value, total, message))
        progress_at.append(time.monotonic())

    results: dict[str, Any] = {}
    info = Implementation(name="scopewatch-tests", version="1.0")
    async with http, Client(streamable_http_client(url, http_client=http), mode=mode, client_info=info) as client:
        version = client.protocol_version
        listed = await client.list_tools()
        results["add"] = await client.call_tool("add", {"a": 2, "b": 3})
        results["countdown"] = await client.call_tool(
            "countdown", {"steps": 4, "delay": 0.4}, progress_callback=on_progress
        )
        done_at = time.monotonic()
        results["fail"] = await client.call_tool("fail", {"reason": "on purpose"})
        results["read_file"] = await client.call_tool("read_file", {"path": "/srv/data/report.txt"})
    dumped = {name: r.model_dump(mode="json", exclude={"meta"}) for name, r in results.items()}
    return Transcript(
        dumped, sorted(t.name for t in listed.tools), progress, progress_at, done_at, session_ids, version
    )


def run_client(url: str, token: str | None, mode: str) -> Transcript:
    return asyncio.run(asyncio.wait_for(drive(url, token, mode), timeout=120))


def raw_post(url: str, body: dict[str, Any], token: str | None, **headers: str) -> tuple[int, dict[str, str], bytes]:
    """One plain HTTP POST (2026-07-28 style: no session)."""
    request = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST")
    request.add_header("Content-Type", "application/json")
    request.add_header("Accept", "application/json, text/event-stream")
    request.add_header("MCP-Protocol-Version", MODERN)
    for name, value in headers.items():
        request.add_header(name.replace("_", "-"), value)
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, dict(response.headers.items()), response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def http_get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            return response.status, response.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def raw_call(url: str, msg_id: int, tool: str, arguments: dict[str, Any], token: str | None) -> tuple[int, Any, bytes]:
    """A 2026-07-28 ``tools/call`` as one plain POST (routing headers included)."""
    return raw_post(url, modern_call(msg_id, tool, arguments), token, Mcp_Method="tools/call", Mcp_Name=tool)


def modern_call(msg_id: int, tool: str, arguments: dict[str, Any], **meta: Any) -> dict[str, Any]:
    envelope = {
        "io.modelcontextprotocol/protocolVersion": MODERN,
        "io.modelcontextprotocol/clientInfo": {"name": "raw-client", "version": "0"},
        "io.modelcontextprotocol/clientCapabilities": {},
        **meta,
    }
    params = {"name": tool, "arguments": arguments, "_meta": envelope}
    return {"jsonrpc": "2.0", "id": msg_id, "method": "tools/call", "params": params}


# -- Kafka -------------------------------------------------------------------------------------------------
@dataclass
class Landed:
    events: list[Any]
    raw: list[bytes]

    def of(self, kind: type) -> list[Any]:
        return [e for e in self.events if isinstance(e, kind)]


async def _collect(settings: Settings, done: Any, timeout: float) -> Landed:
    consumer = reader(settings)
    await consumer.start()
    landed = Landed([], [])
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not done(landed):
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                for msg in messages:
                    event = decode(msg.value)
                    assert msg.key == key_for(event).encode()
                    landed.events.append(event)
                    landed.raw.append(msg.key or b"")
                    landed.raw.append(msg.value)
        await asyncio.sleep(1.0)  # anything extra (a duplicate) would show up now
        for messages in (await consumer.getmany(timeout_ms=1000)).values():
            for msg in messages:
                landed.events.append(decode(msg.value))
                landed.raw.append(msg.value)
    finally:
        await consumer.stop()
    return landed


def collect(settings: Settings, done: Any, timeout: float = 120.0) -> Landed:
    return asyncio.run(_collect(settings, done, timeout))


def assert_no_token(tokens: list[str], landed: Landed, proxy_log: str) -> None:
    """Neither a token nor its signature appears in any event (decoded or raw) or in the proxy's log."""
    texts = [to_canonical_json(e) for e in landed.events]
    blobs = landed.raw
    for token in tokens:
        signature = token.rsplit(".", 1)[-1]
        for needle in (token, signature):
            assert needle not in proxy_log
            assert not any(needle in text for text in texts)
            assert not any(needle.encode() in blob for blob in blobs)


# -- tests ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("server", ["lean", "aiohttp"])
def test_handshake_session_through_the_proxy(settings: Settings, upstream: Upstream, keys: Keys, server: str) -> None:
    """Mcp-Session-Id session, SSE with progress, DELETE; RS256 token checked against a PEM key."""
    token = keys.token("RS256")
    direct = run_client(upstream.url, None, "legacy")
    with running_proxy(settings, upstream.url, *proxy_options(keys, "--require-auth"), server=server) as proxy:
        via = run_client(proxy.url, token, "legacy")
        [session_header] = via.session_ids
        # the session is gone upstream after the client's DELETE: the upstream's 404 passes through
        ping = {"jsonrpc": "2.0", "id": 99, "method": "ping"}
        status, _, _ = raw_post(
            proxy.url, ping, token, Mcp_Session_Id=session_header, MCP_Protocol_Version=via.protocol_version
        )
        assert status == 404
        landed = collect(settings, lambda got: len(got.of(ToolResult)) >= 4 and got.of(SessionEnded))
        # OAuth metadata passes through unobserved; any other path is not the proxy's to serve
        origin = upstream.url.removesuffix("/mcp")
        well_known = "/.well-known/oauth-protected-resource"
        assert http_get(proxy.url.removesuffix("/mcp") + well_known) == http_get(origin + well_known)
        assert http_get(proxy.url.removesuffix("/mcp") + "/elsewhere")[0] == 404

    # the calls went through unchanged, progress streamed as it happened
    assert via.protocol_version == direct.protocol_version != MODERN
    assert via.results == direct.results
    assert via.tools == direct.tools == ["add", "countdown", "fail", "read_file", "touch"]
    assert via.progress == direct.progress == [(float(i), 4.0, f"step {i}") for i in range(1, 5)]
    assert via.countdown_done_at - via.progress_at[0] > 0.8  # not buffered until the end of the stream
    assert via.results["fail"]["is_error"] is True

    claims = claims_of(token)
    [bound] = landed.of(SessionBound)
    [ended] = landed.of(SessionEnded)
    calls = {c.tool: c for c in landed.of(ToolCall)}
    results = {r.call_id: r for r in landed.of(ToolResult)}
    assert sorted(calls) == ["add", "countdown", "fail", "read_file"] and len(results) == 4
    session_id = bound.session_id
    assert str(uuid.UUID(session_id)) == session_id and session_id != session_header
    assert {e.session_id for e in landed.events} == {session_id}
    assert (bound.tenant, bound.principal, bound.agent_id) == ("acme", "alice@example.com", "agent-7")
    assert bound.auth == {"method": "bearer_jwt", "issuer": ISSUER, "token_id": claims["jti"]}
    assert bound.valid_until is not None and int(bound.valid_until.timestamp()) == claims["exp"] + 30
    expected_attested = {k: claims[k] for k in ("iss", "sub", "client_id", "act", "scope", "jti", "exp")}
    for c in calls.values():
        assert c.transport == "http" and c.server == "scopewatch-upstream" and c.tenant == "acme"
        assert c.attested == expected_attested
        assert c.claimed == {"client_name": "scopewatch-tests", "client_version": "1.0", "auth": {"status": "verified"}}
        assert c.tool_digest and c.tool_digest.startswith("sha256:")  # learned from tools/list
        assert c.collector is not None and c.collector.id.startswith("http:")
        assert bound.event_time <= c.event_time <= ended.event_time
    assert calls["add"].arguments == {"a": 2, "b": 3}
    assert calls["read_file"].resources == ["file:/srv/data/report.txt"]
    assert [results[calls[t].call_id].status for t in ("add", "countdown", "fail", "read_file")] == [
        "ok",
        "ok",
        "error",
        "ok",
    ]
    assert results[calls["countdown"].call_id].duration_ms >= 1000
    assert "Error executing tool fail" in (results[calls["fail"].call_id].error or "")
    seqs = sorted(e.collector.seq for e in landed.events)
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))  # one chain, no gap
    assert_no_token([token], landed, proxy.log)


def test_single_exchange_requests_with_an_es256_token(settings: Settings, upstream: Upstream, keys: Keys) -> None:
    """2026-07-28 requests (no Mcp-Session-Id): one session per token; ES256 checked against the JWKS file."""
    token = keys.token("ES256", client_id=None, azp="agent-azp")
    direct = run_client(upstream.url, None, "auto")
    with running_proxy(settings, upstream.url, *proxy_options(keys, "--require-auth")) as proxy:
        via = run_client(proxy.url, token, "auto")
        again = run_client(proxy.url, token, "auto")  # same token: same session
        landed_live = collect(settings, lambda got: len(got.of(ToolResult)) >= 8)
    landed = collect(settings, lambda got: got.of(SessionEnded))  # ended when the proxy stopped

    assert via.protocol_version == MODERN and not via.session_ids
    assert via.results == direct.results == again.results
    assert via.progress == direct.progress
    assert via.countdown_done_at - via.progress_at[0] > 0.8
    calls = landed_live.of(ToolCall)
    assert len(calls) == 8 and len(landed_live.of(ToolResult)) == 8
    [bound] = landed.of(SessionBound)
    assert (bound.principal, bound.agent_id) == ("alice@example.com", "agent-azp")
    assert {c.session_id for c in calls} == {bound.session_id}
    for c in calls:
        assert c.attested["client_id"] == c.attested["azp"] == "agent-azp"
        assert c.server == "scopewatch-upstream"  # from the serverInfo stamp in _meta
        assert c.claimed["client_name"] == "scopewatch-tests" and c.claimed["auth"] == {"status": "verified"}
    statuses = sorted(r.status for r in landed_live.of(ToolResult))
    assert statuses == ["error", "error", "ok", "ok", "ok", "ok", "ok", "ok"]
    [ended] = landed.of(SessionEnded)
    assert ended.session_id == bound.session_id
    assert_no_token([token], landed, proxy.log)


def test_bad_tokens_are_rejected_with_401_and_recorded(settings: Settings, upstream: Upstream, keys: Keys) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = int(time.time())
    bad = {
        "bad_signature": keys.token("RS256", key=stranger),
        "expired": keys.token("RS256", iat=now - 7200, nbf=now - 7200, exp=now - 3600),
        "wrong_audience": keys.token("ES256", aud="https://some-other-api.test"),
        "wrong_issuer": keys.token("RS256", iss="https://evil.test"),
        "unsupported_alg": jwt.encode({"iss": ISSUER, "aud": AUDIENCE, "exp": now + 60}, "k" * 40, algorithm="HS256"),
    }
    good = keys.token("ES256")
    with running_proxy(settings, upstream.url, *proxy_options(keys, "--require-auth")) as proxy:
        for i, (reason, token) in enumerate(bad.items()):
            status, headers, body = raw_call(proxy.url, i, "touch", {"name": reason}, token)
            assert status == 401, reason
            challenge = headers["WWW-Authenticate"]
            assert challenge.startswith("Bearer ") and 'error="invalid_token"' in challenge, challenge
            assert json.loads(body)["error"] == "invalid_token"
        status, headers, _ = raw_call(proxy.url, 10, "touch", {"name": "no_token"}, None)
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Bearer ") and "error=" not in headers["WWW-Authenticate"]
        # the SDK client cannot even connect with an expired token
        with pytest.raises(ExceptionGroup) as refused:
            run_client(proxy.url, bad["expired"], "legacy")
        assert refused.group_contains(MCPError, match="error response", depth=None)
        status, _, body = raw_call(proxy.url, 11, "touch", {"name": "good"}, good)
        assert status == 200, body
        landed = collect(settings, lambda got: len(got.of(ToolResult)) >= 7)

    assert sorted(p.name for p in upstream.marks.iterdir()) == ["good"]  # nothing rejected reached the server
    calls = {c.arguments["name"]: c for c in landed.of(ToolCall)}
    results = {r.call_id: r for r in landed.of(ToolResult)}
    assert sorted(calls) == sorted([*bad, "no_token", "good"])
    for reason in bad:
        call = calls[reason]
        assert call.attested is None
        assert call.claimed["auth"]["status"] == "invalid" and call.claimed["auth"]["reason"] == reason
        assert call.claimed["client_name"] == "raw-client"
        result = results[call.call_id]
        assert result.status == "error" and f"rejected: {reason} (HTTP 401)" in (result.error or "")
    assert calls["expired"].claimed["auth"]["unverified"]["sub"] == "alice@example.com"  # a hint, untrusted
    assert calls["no_token"].claimed["auth"] == {"status": "absent"}
    assert calls["good"].attested is not None and results[calls["good"].call_id].status == "ok"
    bindings = landed.of(SessionBound)
    assert [b.session_id for b in bindings] == [calls["good"].session_id]  # only the verified token binds
    assert_no_token([*bad.values(), good], landed, proxy.log)


def test_without_require_auth_invalid_tokens_pass_unattested(
    settings: Settings, upstream: Upstream, keys: Keys
) -> None:
    now = int(time.time())
    expired = keys.token("RS256", iat=now - 7200, nbf=now - 7200, exp=now - 3600)
    direct = run_client(upstream.url, None, "legacy")
    with running_proxy(settings, upstream.url, *proxy_options(keys)) as proxy:
        via = run_client(proxy.url, expired, "legacy")
        landed = collect(settings, lambda got: len(got.of(ToolResult)) >= 4)
    assert via.results == direct.results
    calls = landed.of(ToolCall)
    assert len(calls) == 4
    for c in calls:
        assert c.attested is None
        assert c.claimed["auth"]["status"] == "invalid" and c.claimed["auth"]["reason"] == "expired"
    assert landed.of(SessionBound) == [] and landed.of(SessionEnded) == []  # never bound, so nothing ends
    assert_no_token([expired], landed, proxy.log)


def test_an_unreachable_upstream_gives_502_and_the_attempt_is_recorded(settings: Settings, keys: Keys) -> None:
    dead = f"http://127.0.0.1:{proc.free_port()}/mcp"
    token = keys.token("RS256")
    with running_proxy(settings, dead, *proxy_options(keys)) as proxy:
        status, _, body = raw_call(proxy.url, 1, "add", {"a": 1, "b": 1}, token)
        assert status == 502 and json.loads(body)["error"] == "bad_gateway"
        landed = collect(settings, lambda got: len(got.of(ToolResult)) >= 1)
    [call] = landed.of(ToolCall)
    [result] = landed.of(ToolResult)
    assert call.tool == "add" and call.attested is not None
    assert result.call_id == call.call_id and result.status == "error"
    assert "the upstream is unreachable" in (result.error or "")
    assert landed.of(SessionBound) == []  # the upstream never accepted the session
    assert_no_token([token], landed, proxy.log)


def test_bad_configuration_stops_the_proxy_before_it_listens(tmp_path: Path, keys: Keys) -> None:
    base = [sys.executable, "-m", "scopewatch.proxy_cli", "--upstream", "http://127.0.0.1:9/mcp"]
    env = dict(os.environ, SCOPEWATCH_BOOTSTRAP="127.0.0.1:9", SCOPEWATCH_HOME=str(tmp_path))
    private = tmp_path / "private.pem"
    private.write_bytes(
        keys.rsa.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    cases = {
        "--require-auth needs keys": ["--require-auth"],
        "issuer is required": ["--key", str(keys.rsa_pem), "--audience", AUDIENCE],
        "private key": ["--key", str(private), "--issuer", ISSUER, "--audience", AUDIENCE],
        "--listen wants HOST:PORT": ["--listen", "nowhere"],
    }
    for message, options in cases.items():
        done = subprocess.run([*base, *options], env=env, capture_output=True, timeout=120, check=False)
        assert done.returncode == 2, (message, done.stderr)
        assert message in done.stderr.decode(), done.stderr


async def _cancel_after_first_progress(url: str, token: str) -> bytes:
    """POST a long tools/call (2026-07-28: closing the response stream cancels it); hang up after one event."""
    body = modern_call(7, "countdown", {"steps": 50, "delay": 0.2}, progressToken="p1")
    headers = {
        "Authorization": f"Bearer {token}",
        "Accept": "application/json, text/event-stream",
        "MCP-Protocol-Version": MODERN,
        "Mcp-Method": "tools/call",
        "Mcp-Name": "countdown",
    }
    async with httpx2.AsyncClient(timeout=60) as http, http.stream("POST", url, json=body, headers=headers) as answer:
        assert answer.status_code == 200
        assert answer.headers["content-type"].startswith("text/event-stream")
        first = b""
        async for chunk in answer.aiter_bytes():
            first += chunk
            if b"\n\n" in first.replace(b"\r\n", b"\n"):
                return first
    return first


@pytest.mark.parametrize("server", ["lean", "aiohttp"])
def test_a_client_hanging_up_mid_stream_is_recorded(
    settings: Settings, upstream: Upstream, keys: Keys, server: str
) -> None:
    token = keys.token("RS256")
    with running_proxy(settings, upstream.url, *proxy_options(keys, "--require-auth"), server=server) as proxy:
        started = time.monotonic()
        first = asyncio.run(_cancel_after_first_progress(proxy.url, token))
        assert b"notifications/progress" in first
        assert time.monotonic() - started < 5  # streamed as it came, not after the 10 s the tool would take
        landed = collect(settings, lambda got: len(got.of(ToolResult)) >= 1)
    [call] = landed.of(ToolCall)
    [result] = landed.of(ToolResult)
    assert call.tool == "countdown" and result.call_id == call.call_id
    assert result.status == "error" and "no response: the client went away" in (result.error or "")
    assert result.duration_ms < 5000
    assert_no_token([token], landed, proxy.log)
