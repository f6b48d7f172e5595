"""``scopewatch proxy``: an HTTP collector, a reverse proxy for MCP's Streamable HTTP transport.

The proxy listens (on 127.0.0.1 by default) on one MCP endpoint path and forwards every
request -- POST, GET, DELETE, whatever the method -- to one upstream MCP endpoint. Bodies and
headers pass through unchanged in both directions (``Mcp-Session-Id``, ``MCP-Protocol-Version``,
``Last-Event-ID``, the 2026 routing headers ...), except hop-by-hop headers, ``Host`` (the
upstream's) and ``Accept-Encoding`` (``identity`` towards the upstream, so the collector can
read what it relays). JSON and SSE (``text/event-stream``) responses are streamed chunk by
chunk as the upstream produces them, never buffered whole. ``/.well-known/*`` GETs (OAuth
protected-resource metadata) are passed through unobserved; every other path answers 404.

Modules: the relay is here; the observation side is :mod:`collectors.http_tracker` (the session
tracker and its thread) and :mod:`collectors.http_sse` (the SSE parser); requests to the upstream go
through :mod:`collectors.http_upstream` (keep-alive connections framed by :mod:`collectors.http_wire` for ``http://``,
aiohttp's client for ``https://``).

**Observation.** A copy of each request body and response chunk goes through a queue to one
observer thread (:class:`~collectors.http_tracker.HttpSessionTracker`), which parses JSON bodies, batches and SSE
events and feeds every JSON-RPC message to the :class:`~collectors.observer.McpSessionObserver`
of its MCP session: ``tool_call``/``tool_result`` events with ``transport="http"``, redacted
by the host's redactor. The relay never waits for the observer or for Kafka: it only appends to
the queue, which the observer thread takes every 50 ms (one wake-up per batch, its events handed
to the publisher at once). The queue has a byte budget, and only when the observer falls that far
behind does the relay pause (never dropping evidence).

**Sessions.** ``session_id`` in events is never the raw ``Mcp-Session-Id`` (a credential of
sorts) but a UUID-shaped keyed hash (HMAC-SHA256 with the redaction key) of the upstream URL
and

* the ``Mcp-Session-Id`` (handshake-era sessions: the one the request carries, or the one
  the upstream assigns in its answer to ``initialize``); it is stable across proxy restarts;
* else, for requests without a session (2026-07-28 single-exchange requests, stateless
  servers), the bearer token (one session per token) -- or, without a token, one anonymous
  session per proxy run. In such exchanges JSON-RPC ids are scoped to the HTTP exchange, so
  clients reusing ids never get their calls mixed up.

**Identity.** Bearer JWTs are checked by :class:`~collectors.jwt_verify.JwtVerifier` (if keys
are configured). A tool call's ``attested`` holds the verified claims of the token presented
with *that* request (``iss``, ``sub``, ``client_id``/``azp``, ``act``, ``scope``, ``jti``,
``exp``), else ``null``. ``claimed["auth"]`` says what happened to the token -- never the token:
``{"status": "verified"}``, ``{"status": "absent"}``, ``{"status": "unverified", ...}`` (no
keys configured) or ``{"status": "invalid", "reason": "expired", "unverified": {...}}`` where
``unverified`` holds a few claims and header fields of the rejected token (untrusted,
redacted). With ``require_auth`` a request without a verified token is answered ``401`` with
``WWW-Authenticate: Bearer ...error="invalid_token"`` (no error code when no token was sent)
and never reaches the upstream; its tool calls are still recorded, each with a ``tool_result``
``error`` saying it was rejected.

The first request the upstream accepts with a verified token carrying ``sub`` and
``client_id``/``azp`` binds its session: ``session_bound`` with ``principal = sub``,
``agent_id = client_id``, ``valid_until = exp + leeway`` (the last instant the proxy accepts
the token) and ``auth = {method: "bearer_jwt", issuer, token_id: jti}``. A later token for the
same principal and agent that lives longer re-binds (a refreshed token extends the session); a
token for someone else never re-binds -- its calls carry the other ``attested`` identity, which
the decision pipeline reports as an identity mismatch. ``session_ended`` follows a successful
DELETE, an upstream 404 for the session (it is gone), the session's eviction (idle for
``session_idle_seconds`` or beyond ``max_sessions``) and the proxy's shutdown; the proxy
re-binds a session it sees again with a verified token.

**Unanswered requests.** Calls of an exchange that ends without their response get a
``tool_result`` ``error`` at once when no response can follow (rejected by the proxy, upstream
unreachable or answering an HTTP error or a JSON body without it, or a single-exchange request
whose stream ended -- e.g. the client cancelled by closing it). A handshake-era SSE stream
that ends early may be resumed with ``Last-Event-ID``, so those calls wait: they time out when
the session ends.

A verified token must name its subject (a non-empty ``sub``) and, with an agent claim
configured (``--agent-claim``), the agent; otherwise it is invalid (``missing_subject`` /
``missing_agent``): ``401`` under ``require_auth``, never ``attested``.

Tokens are never logged, put in events or passed to the observer thread (only their keyed
hash is); there is no access log. A token over 16 KiB is invalid (``too_large``, 401 under
``require_auth``); a header line over 32 KiB never reaches the handler: it is answered ``431``
and logged without any of its bytes.

**Servers.** Clients are served by :mod:`collectors.http_lean` (default): an HTTP/1.1 server on
an :class:`asyncio.Protocol` with strict framing (:mod:`collectors.http_wire`: ambiguous or
malformed requests are refused before the handler, bodies over ``max_body_bytes`` get 413) --
a fraction of the per-request work of aiohttp's web server. ``ProxyConfig.server = "aiohttp"``
(``SCOPEWATCH_PROXY_SERVER=aiohttp``) serves with aiohttp's web server instead, its parse errors
answered by :mod:`collectors.http_guard` (aiohttp's own 400 would quote and log the start of the
offending line). Both feed the same relay (:meth:`HttpProxy._exchange`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import itertools
import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, Final, Protocol
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from collectors.http_guard import MAX_HEADER_BYTES, GuardedRunner
from collectors.http_lean import LeanRequest, LeanResponse, LeanServer
from collectors.http_sse import MAX_MESSAGE_BYTES, SseEvent, SseParser
from collectors.http_tracker import PROXY_ERROR_CODE, ExchangeStart, HttpSessionTracker, ObserverThread
from collectors.http_upstream import AiohttpUpstream, H11Upstream, UpstreamBroken, UpstreamUnreachable, upstream_client
from collectors.jwt_verify import REASONS, JwtVerifier, TokenCheck, bearer_token, unverified_check
from collectors.redact import Redactor
from collectors.resources import ResourceExtractor
from schemas import Event

__all__ = [
    "MAX_MESSAGE_BYTES",
    "PROXY_ERROR_CODE",
    "ExchangeStart",
    "HttpProxy",
    "HttpSessionTracker",
    "ProxyConfig",
    "ProxyStats",
    "SseEvent",
    "SseParser",
    "serve",
]

log = logging.getLogger("scopewatch.proxy")

Emit = Callable[[Event], object]
EmitMany = Callable[[list[Event], Callable[[Event, Exception], object]], object]

HOP_BY_HOP: Final = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
    }
)
_NOT_FORWARDED: Final = HOP_BY_HOP | {"host", "content-length", "accept-encoding"}
_NOT_FORWARDED_XFF: Final = _NOT_FORWARDED | {"x-forwarded-for"}  # re-added with the peer
_NOT_RETURNED: Final = HOP_BY_HOP | {"content-length"}


# -- the relay ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ProxyConfig:
    upstream: str
    """URL of the upstream MCP endpoint, e.g. ``http://127.0.0.1:8000/mcp``."""
    host: str = "127.0.0.1"
    port: int = 8787
    path: str | None = None
    """The MCP endpoint path on the proxy (default: the upstream's path)."""
    tenant: str = "default"
    server_label: str | None = None
    require_auth: bool = False
    resource_metadata: str | None = None
    """URL of the protected-resource metadata, announced in ``WWW-Authenticate`` with a 401."""
    max_body_bytes: int = MAX_MESSAGE_BYTES
    max_sessions: int = 10_000
    session_idle_seconds: float = 3600.0
    connect_timeout: float = 10.0
    max_connections: int = 1024
    observer_budget_bytes: int = 256 * 1024 * 1024
    shutdown_timeout: float = 5.0
    server: str = "lean"
    """``lean`` (:mod:`collectors.http_lean`) or ``aiohttp`` (aiohttp's web server): what serves the clients."""

    def __post_init__(self) -> None:
        if self.server not in ("lean", "aiohttp"):
            raise ValueError(f"the proxy server must be lean or aiohttp, got {self.server!r}")
        parts = urlsplit(self.upstream)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the upstream must be an http(s) URL, got {_safe_url(self.upstream)!r}")
        if self.path is not None and not self.path.startswith("/"):
            raise ValueError("the endpoint path must start with /")

    @property
    def endpoint_path(self) -> str:
        return self.path or urlsplit(self.upstream).path or "/"


@dataclass
class ProxyStats:
    requests: int = 0
    rejected: int = 0
    upstream_errors: int = 0
    client_disconnects: int = 0
    throttled: int = 0

    def as_dict(self) -> dict[str, object]:
        return dict(self.__dict__)


def _connection_tokens(values: Iterable[str]) -> frozenset[str]:
    """Header names a ``Connection`` header lists (hop-by-hop as well)."""
    return frozenset(t.strip().lower() for v in values for t in v.split(",") if t.strip())


def _safe_url(url: str) -> str:
    """``url`` without userinfo (for messages)."""
    parts = urlsplit(url)
    if parts.username is None and parts.password is None:
        return url
    netloc = parts.hostname or ""
    if parts.port is not None:
        netloc += f":{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))


class HttpProxy:
    """The reverse proxy: a lean HTTP/1.1 server (or aiohttp's) in front of one upstream MCP endpoint."""

    def __init__(
        self,
        config: ProxyConfig,
        *,
        emit: Emit,
        redactor: Redactor,
        verifier: JwtVerifier | None = None,
        extractor: ResourceExtractor | None = None,
        emit_many: EmitMany | None = None,
    ) -> None:
        """``emit_many`` (e.g. :meth:`collectors.emit.Emitter.emit_many`): the observer thread hands
        each batch's events over at once with it, instead of one ``emit`` per event."""
        if config.require_auth and verifier is None:
            raise ValueError("require_auth needs verification keys (a JWKS file or PEM keys)")
        self.config = config
        self.verifier = verifier
        self.stats = ProxyStats()
        self._key = redactor.key.get_secret_value()
        pending: list[Event] = []
        flush: Callable[[], None] | None = None
        if emit_many is not None:

            def failed(_event: Event, exc: Exception) -> None:
                self.tracker.stats.observer_errors += 1
                log.warning("observer error (%s): an event could not be encoded", type(exc).__name__)

            def flush() -> None:
                events = pending[:]
                pending.clear()
                emit_many(events, failed)

        self.tracker = HttpSessionTracker(
            emit=emit if emit_many is None else pending.append,
            key=self._key,
            upstream=config.upstream,
            tenant=config.tenant,
            server_label=config.server_label,
            redactor=redactor,
            extractor=extractor,
            max_sessions=config.max_sessions,
            session_idle_seconds=config.session_idle_seconds,
        )
        self._observer = ObserverThread(self.tracker, config.observer_budget_bytes, flush=flush)
        self._ids = itertools.count(1)
        self._client: aiohttp.ClientSession | None = None
        self._upstream: H11Upstream | AiohttpUpstream | None = None
        self._runner: web.AppRunner | None = None
        self._lean: LeanServer | None = None
        self._endpoint = config.endpoint_path
        self._ticker: asyncio.Task[None] | None = None
        self.port: int = config.port
        parts = urlsplit(config.upstream)
        self._origin = urlunsplit((parts.scheme, parts.netloc, "", "", ""))
        self._target = urlunsplit(("", "", parts.path or "/", parts.query, ""))
        self._query_sep = "&" if parts.query else "?"

    @property
    def url(self) -> str:
        host = f"[{self.config.host}]" if ":" in self.config.host else self.config.host
        return f"http://{host}:{self.port}{self.config.endpoint_path}"

    async def start(self) -> None:
        config = self.config
        self._observer.start()
        self._client = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=config.max_connections),
            timeout=aiohttp.ClientTimeout(
                total=None, connect=config.connect_timeout, sock_connect=config.connect_timeout
            ),
            auto_decompress=False,
            cookie_jar=aiohttp.DummyCookieJar(),
        )
        self._upstream = upstream_client(
            config.upstream, self._client, connect_timeout=config.connect_timeout, limit=config.max_connections
        )
        if config.server == "lean":
            self._lean = LeanServer(
                self._handle_lean,
                log=log,
                max_header_bytes=MAX_HEADER_BYTES,
                max_body_bytes=config.max_body_bytes,
            )
            self.port = await self._lean.start(config.host, config.port)
        else:
            app = web.Application(client_max_size=config.max_body_bytes)
            app.router.add_route("*", config.endpoint_path, self._handle_aiohttp)
            app.router.add_route("GET", "/.well-known/{tail:.*}", self._well_known_aiohttp)
            self._runner = GuardedRunner(
                app,
                log=log,
                access_log=None,
                handler_cancellation=True,
                shutdown_timeout=config.shutdown_timeout,
            )
            await self._runner.setup()
            site = web.TCPSite(self._runner, config.host, config.port, shutdown_timeout=config.shutdown_timeout)
            await site.start()
            server = getattr(site, "_server", None)
            sockets = getattr(server, "sockets", None) or []
            if sockets:
                self.port = sockets[0].getsockname()[1]
        self._ticker = asyncio.create_task(self._tick())
        log.info("listening on %s, upstream %s", self.url, _safe_url(config.upstream))

    async def stop(self) -> ProxyStats:
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
        if self._lean is not None:
            await self._lean.close(self.config.shutdown_timeout)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._upstream is not None:
            await self._upstream.close()
        if self._client is not None:
            await self._client.close()
        await asyncio.to_thread(self._observer.stop)
        return self.stats

    async def _tick(self) -> None:
        every = max(1.0, min(60.0, self.config.session_idle_seconds / 4))
        while True:
            await asyncio.sleep(every)
            self._observer.put(("tick", time.time_ns(), time.monotonic()))

    # -- requests ----------------------------------------------------------------------------------------
    async def _handle_aiohttp(self, request: web.Request) -> web.StreamResponse:
        body = await request.read() if request.method == "POST" else b""
        sink = _AiohttpSink(request)
        await self._exchange(request, body, sink)
        return sink.response if sink.response is not None else web.Response(status=500)

    async def _handle_lean(self, request: LeanRequest, response: LeanResponse) -> None:
        if request.path == self._endpoint:
            await self._exchange(request, request.body if request.method == "POST" else b"", response)
        elif request.path.startswith("/.well-known/"):
            if request.method != "GET":
                await response.json(405, {"error": "method_not_allowed"}, [("Allow", "GET")])
                return
            status, headers, body = await self._well_known(request.path, request.headers.get("Accept", "*/*"))
            response.start(status, "", headers, len(body))
            await response.write(body)
            await response.finish()
        else:
            await response.json(404, {"error": "not_found"})

    async def _exchange(self, request: _Request, body: bytes, sink: _Sink) -> None:
        ex_id = next(self._ids)
        wall_ns, mono = time.time_ns(), time.monotonic()
        self.stats.requests += 1
        token, check = bearer_token(request.headers.getall("Authorization", []))
        if token is not None:
            check = self.verifier.check(token) if self.verifier is not None else unverified_check(token)
        assert check is not None
        credential = "anon" if token is None else "bearer:" + self._token_hash(token)
        del token
        start = ExchangeStart(
            method=request.method,
            session_header=request.headers.get("Mcp-Session-Id"),
            check=check,
            credential=credential,
            body=body,
            wall_ns=wall_ns,
            mono=mono,
        )
        if self._observer.over_budget:
            await self._admit()
        self._observer.put(("open", ex_id, start), len(body))
        broke: str | None = None
        try:
            if self.config.require_auth and not check.verified:
                self.stats.rejected += 1
                note = f"rejected: {check.reason or 'no bearer token'} (HTTP 401)"
                self._observer.put(("head", ex_id, 401, "application/json", None, note))
                await self._unauthorized(check, sink)
                return
            broke = await self._forward(request, ex_id, body, sink)
        except asyncio.CancelledError:
            broke = "the client went away"
            self.stats.client_disconnects += 1
            raise
        finally:
            self._observer.put(("end", ex_id, time.time_ns(), time.monotonic(), broke))

    def _token_hash(self, token: str) -> str:
        return hmac.new(
            self._key, b"scopewatch-bearer\0" + token.encode("utf-8", "surrogatepass"), "sha256"
        ).hexdigest()

    async def _admit(self) -> None:
        """Wait while the observer is over its byte budget (backpressure instead of losing evidence)."""
        if self._observer.over_budget:
            self.stats.throttled += 1
            while self._observer.over_budget:
                await asyncio.sleep(0.005)

    async def _unauthorized(self, check: TokenCheck, sink: _Sink) -> None:
        params = ['realm="scopewatch"']
        if check.status == "absent":
            body = {"error": "unauthorized", "error_description": "A bearer access token is required"}
        else:
            description = REASONS.get(check.reason or "invalid", REASONS["invalid"])
            params += ['error="invalid_token"', f'error_description="{description}"']
            body = {"error": "invalid_token", "error_description": description}
        if self.config.resource_metadata:
            params.append(f'resource_metadata="{self.config.resource_metadata}"')
        await sink.json(401, body, [("WWW-Authenticate", "Bearer " + ", ".join(params))])

    def _request_headers(self, request: _Request) -> list[tuple[str, str]]:
        received = request.headers
        listed = received.getall("Connection", ())
        dropped = _NOT_FORWARDED_XFF | _connection_tokens(listed) if listed else _NOT_FORWARDED_XFF
        headers = [(name, value) for name, value in received.items() if name.lower() not in dropped]
        headers.append(("Accept-Encoding", "identity"))
        prior = received.getall("X-Forwarded-For", ())
        peer = request.remote or ""
        if peer:
            headers.append(("X-Forwarded-For", ", ".join([*prior, peer])))
        else:
            headers += [("X-Forwarded-For", value) for value in prior]
        headers.append(("X-Forwarded-Proto", request.scheme))
        if request.host:
            headers.append(("X-Forwarded-Host", request.host))
        return headers

    async def _forward(self, request: _Request, ex_id: int, body: bytes, sink: _Sink) -> str | None:
        """Relay one request; returns why it broke off (``None``: it did not)."""
        assert self._upstream is not None
        target = self._target + (f"{self._query_sep}{request.query_string}" if request.query_string else "")
        try:
            upstream = await self._upstream.request(request.method, target, self._request_headers(request), body)
        except (UpstreamUnreachable, TimeoutError, OSError) as exc:
            self.stats.upstream_errors += 1
            note = f"the upstream is unreachable ({type(exc).__name__}; HTTP 502)"
            self._observer.put(("head", ex_id, 502, "application/json", None, note))
            log.warning("upstream %s unreachable: %s", _safe_url(self.config.upstream), type(exc).__name__)
            error = {"error": "bad_gateway", "error_description": "the upstream MCP server is unreachable"}
            await sink.json(502, error)
            return None
        try:
            headers = upstream.headers
            self._observer.put(
                ("head", ex_id, upstream.status, headers.get("Content-Type", ""), headers.get("Mcp-Session-Id"), None)
            )
            listed = headers.getall("Connection", ())
            dropped = _NOT_RETURNED | _connection_tokens(listed) if listed else _NOT_RETURNED
            length = headers.get("Content-Length")
            sink.start(
                upstream.status,
                upstream.reason,
                [(name, value) for name, value in headers.items() if name.lower() not in dropped],
                int(length) if length is not None and length.isdigit() else None,
            )
            try:
                if not upstream.buffered:
                    await sink.send_head()  # nothing to send it with yet (an SSE stream that waits)
                async for chunk in upstream.chunks():
                    if self._observer.over_budget:
                        await self._admit()
                    self._observer.put(("data", ex_id, chunk, time.time_ns(), time.monotonic()), len(chunk))
                    await sink.write(chunk)
            except UpstreamBroken:
                self.stats.upstream_errors += 1
                sink.abort()
                return "the upstream broke the response off"
            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                self.stats.client_disconnects += 1
                return "the client went away"
            # everything was relayed; a client that hangs up now (the SDK closes an SSE response as
            # soon as it has its answer) has lost nothing
            with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):
                await sink.finish()
            return None
        finally:
            upstream.close()

    async def _well_known_aiohttp(self, request: web.Request) -> web.StreamResponse:
        status, headers, body = await self._well_known(request.path, request.headers.get("Accept", "*/*"))
        return web.Response(body=body, status=status, headers=headers)

    async def _well_known(self, path: str, accept: str) -> tuple[int, list[tuple[str, str]], bytes]:
        """OAuth metadata (``/.well-known/...``): passed through from the upstream's origin, unobserved."""
        assert self._client is not None
        try:
            async with self._client.get(self._origin + path, headers={"Accept": accept}) as upstream:
                body = await upstream.read()
                headers = [
                    (k, v)
                    for k, v in upstream.headers.items()
                    if k.lower() not in _NOT_RETURNED and k.lower() != "content-encoding"
                ]
                return upstream.status, headers, body
        except (aiohttp.ClientError, TimeoutError, OSError):
            return 502, [("Content-Type", "application/json")], b'{"error": "bad_gateway"}'


class _Request(Protocol):
    """What the relay reads of a request (an aiohttp ``web.Request`` or a :class:`LeanRequest`)."""

    @property
    def method(self) -> str: ...
    @property
    def headers(self) -> CIMultiDictProxy[str] | CIMultiDict[str]: ...
    @property
    def query_string(self) -> str: ...
    @property
    def remote(self) -> str | None: ...
    @property
    def scheme(self) -> str: ...
    @property
    def host(self) -> str: ...


class _Sink(Protocol):
    """Where the relay writes a response (a :class:`LeanResponse` or :class:`_AiohttpSink`)."""

    def start(self, status: int, reason: str, headers: list[tuple[str, str]], length: int | None) -> None: ...
    async def send_head(self) -> None: ...
    async def write(self, chunk: bytes) -> None: ...
    async def finish(self) -> None: ...
    async def json(self, status: int, body: Any, headers: list[tuple[str, str]] | None = None) -> None: ...
    def abort(self) -> None: ...


class _AiohttpSink:
    """The relay's response through aiohttp's ``StreamResponse`` (``SCOPEWATCH_PROXY_SERVER=aiohttp``)."""

    def __init__(self, request: web.Request) -> None:
        self._request = request
        self.response: web.StreamResponse | None = None
        self._prepared = False

    def start(self, status: int, reason: str, headers: list[tuple[str, str]], length: int | None) -> None:
        out = web.StreamResponse(status=status, reason=reason)
        for name, value in headers:
            out.headers.add(name, value)
        if length is not None:
            out.content_length = length
        self.response = out

    async def _prepare(self) -> web.StreamResponse:
        assert self.response is not None
        if not self._prepared:
            self._prepared = True
            await self.response.prepare(self._request)
        return self.response

    async def send_head(self) -> None:
        await self._prepare()

    async def write(self, chunk: bytes) -> None:
        await (await self._prepare()).write(chunk)

    async def finish(self) -> None:
        await (await self._prepare()).write_eof()

    async def json(self, status: int, body: Any, headers: list[tuple[str, str]] | None = None) -> None:
        self.response = web.json_response(body, status=status, headers=dict(headers or []))

    def abort(self) -> None:
        if self.response is not None:
            self.response.force_close()


async def serve(proxy: HttpProxy, stop: asyncio.Event, ready: Callable[[HttpProxy], None] | None = None) -> ProxyStats:
    """Run ``proxy`` until ``stop`` is set."""
    await proxy.start()
    try:
        if ready is not None:
            ready(proxy)
        await stop.wait()
    finally:
        stats = await proxy.stop()
    return stats
