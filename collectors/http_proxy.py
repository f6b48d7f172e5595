"""``scopewatch proxy``: an HTTP collector, a reverse proxy for MCP's Streamable HTTP transport.

The proxy listens (on 127.0.0.1 by default) on one MCP endpoint path and forwards every
request -- POST, GET, DELETE, whatever the method -- to one upstream MCP endpoint. Bodies and
headers pass through unchanged in both directions (``Mcp-Session-Id``, ``MCP-Protocol-Version``,
``Last-Event-ID``, the 2026 routing headers ...), except hop-by-hop headers, ``Host`` (the
upstream's) and ``Accept-Encoding`` (``identity`` towards the upstream, so the collector can
read what it relays). JSON and SSE (``text/event-stream``) responses are streamed chunk by
chunk as the upstream produces them, never buffered whole. ``/.well-known/*`` GETs (OAuth
protected-resource metadata) are passed through unobserved; every other path answers 404.

**Observation.** A copy of each request body and response chunk goes through a queue to one
observer thread (:class:`HttpSessionTracker`), which parses JSON bodies, batches and SSE
events and feeds every JSON-RPC message to the :class:`~collectors.observer.McpSessionObserver`
of its MCP session: ``tool_call``/``tool_result`` events with ``transport="http"``, redacted
by the host's redactor. The relay never waits for the observer or for Kafka; the queue has a
byte budget, and only when the observer falls that far behind does the relay pause (never
dropping evidence).

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
hash is); the aiohttp access log is off. A token over 16 KiB is invalid (``too_large``, 401
under ``require_auth``); a header line over 32 KiB never reaches the handler: it is answered
``431`` and logged without any of its bytes (aiohttp's own 400 would quote and log its start;
:mod:`collectors.http_guard`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import itertools
import json
import logging
import re
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final
from urllib.parse import urlsplit, urlunsplit

import aiohttp
from aiohttp import web

from collectors.http_guard import GuardedRunner
from collectors.jsonrpc import each_message, rpc_key
from collectors.jwt_verify import REASONS, JwtVerifier, TokenCheck, bearer_token, unverified_check
from collectors.observer import (  # the observer's own reading of JSON-RPC ids and batches
    McpSessionObserver,
    SessionIdentity,
    utc_from_ns,
)
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

MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
"""The largest JSON body or SSE event the observer parses (larger ones are relayed, not observed)."""
PROXY_ERROR_CODE: Final = -32099
"""JSON-RPC error code of the results the proxy records for calls that got no response."""
CLIENT_INFO_META: Final = "io.modelcontextprotocol/clientInfo"
SERVER_INFO_META: Final = "io.modelcontextprotocol/serverInfo"

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
_NOT_RETURNED: Final = HOP_BY_HOP | {"content-length"}


# -- SSE ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SseEvent:
    event: str
    data: str
    id: str | None = None
    retry: int | None = None


_EOL = re.compile(rb"\r\n|\r|\n")


class SseParser:
    """Incremental ``text/event-stream`` parser (WHATWG rules): feed bytes, get complete events.

    Lines end in CRLF, LF or CR (also split across chunks); ``:`` lines are comments; a field
    without ``:`` has an empty value; one space after ``:`` is dropped; ``data`` lines join with
    ``\\n``; an event without data is not dispatched; an unfinished event at the end of the
    stream is discarded. An event (or line) larger than ``max_event_bytes`` is skipped whole
    and counted in ``oversize``.
    """

    def __init__(self, max_event_bytes: int = MAX_MESSAGE_BYTES) -> None:
        self.max_event_bytes = max_event_bytes
        self.oversize = 0
        self.last_event_id: str | None = None
        self._line = bytearray()
        self._line_too_long = False
        self._skip_lf = False
        self._started = False
        self._data: list[str] = []
        self._size = 0
        self._event = ""
        self._retry: int | None = None
        self._too_big = False

    def feed(self, chunk: bytes) -> list[SseEvent]:
        events: list[SseEvent] = []
        if not chunk:
            return events
        if not self._started:
            chunk = bytes(self._line) + chunk
            self._line.clear()
            if len(chunk) < 3 and b"\xef\xbb\xbf".startswith(chunk):
                self._line += chunk  # maybe a BOM split across chunks: decide with the next one
                return events
            self._started = True
            if chunk.startswith(b"\xef\xbb\xbf"):
                chunk = chunk[3:]
        start = 0
        if self._skip_lf and chunk[:1] == b"\n":
            start = 1
        self._skip_lf = False
        for match in _EOL.finditer(chunk, start):
            self._take(chunk[start : match.start()])
            event = self._line_done()
            if event is not None:
                events.append(event)
            start = match.end()
            if match.end() == len(chunk) and match.group() == b"\r":
                self._skip_lf = True
        self._take(chunk[start:])
        return events

    def _take(self, piece: bytes) -> None:
        if self._line_too_long or not piece:
            return
        if len(self._line) + len(piece) > self.max_event_bytes:
            self._line.clear()
            self._line_too_long = True
            return
        self._line += piece

    def _line_done(self) -> SseEvent | None:
        if self._line_too_long:
            self._line_too_long = False
            self._too_big = True
            return None
        line = self._line.decode("utf-8", "replace")
        self._line.clear()
        if not line:
            return self._dispatch()
        if line.startswith(":"):
            return None
        name, colon, value = line.partition(":")
        if colon and value.startswith(" "):
            value = value[1:]
        if name == "data":
            self._size += len(value) + 1
            if self._size > self.max_event_bytes:
                self._too_big = True
                self._data.clear()
            elif not self._too_big:
                self._data.append(value)
        elif name == "event":
            self._event = value
        elif name == "id":
            if "\0" not in value:
                self.last_event_id = value
        elif name == "retry" and value.isascii() and value.isdigit():
            self._retry = int(value)
        return None

    def _dispatch(self) -> SseEvent | None:
        data, event, retry, too_big = self._data, self._event, self._retry, self._too_big
        self._data, self._event, self._retry, self._too_big, self._size = [], "", None, False, 0
        if too_big:
            self.oversize += 1
            return None
        if not data:
            return None
        return SseEvent(event or "message", "\n".join(data), self.last_event_id, retry)


# -- observation (the observer thread) ------------------------------------------------------------
@dataclass(frozen=True)
class ExchangeStart:
    """What the relay knows about a request when it arrives."""

    method: str
    session_header: str | None
    check: TokenCheck
    credential: str
    """``bearer:<keyed hash of the token>`` or ``anon`` (the session of sessionless requests)."""
    body: bytes
    wall_ns: int
    mono: float


@dataclass
class _Session:
    label: str
    observer: McpSessionObserver
    bound: tuple[str, str, float] | None = None  # principal, agent_id, not_after
    open_exchanges: int = 0
    last_used: float = 0.0


@dataclass
class _Exchange:
    start: ExchangeStart
    scope: str | None = None  # id prefix of single-exchange requests
    session: _Session | None = None
    status: int = 0
    kind: str = "other"  # json | sse | other
    note: str | None = None  # why the proxy answered itself
    sse: SseParser | None = None
    body: bytearray = field(default_factory=bytearray)
    body_too_big: bool = False
    requests: dict[tuple[str, Any], Any] = field(default_factory=dict)
    answered: set[tuple[str, Any]] = field(default_factory=set)
    end_session: bool = False


@dataclass
class TrackerStats:
    messages: int = 0
    unparsable: int = 0
    oversize: int = 0
    events: int = 0
    sessions_opened: int = 0
    sessions_closed: int = 0
    observer_errors: int = 0


@dataclass
class HttpSessionTracker:
    """Turns the relayed exchanges into events: one :class:`McpSessionObserver` per MCP session.

    Not thread-safe: one thread calls :meth:`open`, :meth:`head`, :meth:`data`, :meth:`end`,
    :meth:`tick` and :meth:`close`, in the order the relay saw things. Pure apart from ``emit``:
    every call carries its own timestamps.
    """

    emit: Emit
    key: bytes
    upstream: str
    tenant: str = "default"
    server_label: str | None = None
    redactor: Redactor | None = None
    extractor: ResourceExtractor | None = None
    max_sessions: int = 10_000
    session_idle_seconds: float = 3600.0
    new_id: Callable[[], str] = field(default=lambda: str(uuid.uuid4()))
    stats: TrackerStats = field(default_factory=TrackerStats)

    def __post_init__(self) -> None:
        self._sessions: OrderedDict[str, _Session] = OrderedDict()
        self._exchanges: dict[int, _Exchange] = {}
        self._label_fixed = self.server_label is not None
        self._run = uuid.uuid4().hex

    # -- the exchange, step by step ------------------------------------------------------------
    def open(self, ex_id: int, start: ExchangeStart) -> None:
        self._exchanges[ex_id] = _Exchange(start)

    def head(self, ex_id: int, status: int, content_type: str, session_id: str | None, note: str | None = None) -> None:
        """The answer's status line and headers (``note``: the proxy answered itself, and why)."""
        ex = self._exchanges.get(ex_id)
        if ex is None:
            return
        start = ex.start
        ex.status, ex.note = status, note
        media = content_type.split(";", 1)[0].strip().lower()
        ex.kind = "sse" if media == "text/event-stream" else "json" if media == "application/json" else "other"
        if ex.kind == "sse":
            ex.sse = SseParser()
        # a request the proxy rejected joins only a session it already knows: unauthenticated
        # requests with made-up session ids must not crowd real sessions out of the table
        if start.session_header and (note is None or "mcp:" + start.session_header in self._sessions):
            label = "mcp:" + start.session_header
            ex.end_session = (status == 404 and note is None) or (start.method == "DELETE" and 200 <= status < 300)
        elif session_id and status < 400 and note is None:
            label = "mcp:" + session_id  # the upstream just created this session
        else:
            label = start.credential if start.credential != "anon" else "anon:" + self._run
            ex.scope = f"{ex_id}/"
        now = utc_from_ns(start.wall_ns)
        session = self._session(label, now, start.mono)
        session.open_exchanges += 1
        ex.session = session
        if note is None and status < 400 and start.check.verified and start.method != "DELETE":
            self._bind(session, start.check, now)
        if not start.body:
            return
        try:
            message: Any = json.loads(start.body)
        except ValueError:
            self.stats.unparsable += 1
            return
        observer = session.observer
        self._prepare(session, message, start.check)
        for msg in each_message(message):
            key = rpc_key(msg.get("id"))
            if key is not None and "method" in msg:
                ex.requests[key] = msg["id"]
            self.stats.messages += 1
        self._emit(observer.from_client(self._scoped(message, ex.scope), now, start.mono))

    def data(self, ex_id: int, chunk: bytes, wall_ns: int, mono: float) -> None:
        ex = self._exchanges.get(ex_id)
        if ex is None or ex.session is None:
            return
        if ex.sse is not None:
            for event in ex.sse.feed(chunk):
                if event.event == "message":
                    self._server_text(ex, event.data, wall_ns, mono)
        elif ex.kind == "json" and not ex.body_too_big:
            if len(ex.body) + len(chunk) > MAX_MESSAGE_BYTES:
                ex.body_too_big = True
                ex.body.clear()
                self.stats.oversize += 1
            else:
                ex.body += chunk

    def end(self, ex_id: int, wall_ns: int, mono: float, note: str | None = None) -> None:
        """The exchange is over (``note``: it broke off, and why)."""
        ex = self._exchanges.get(ex_id)
        if ex is None:
            return
        if ex.session is None:  # it ended before the upstream answered: record what was asked
            self.head(ex_id, 0, "", None, note or "the exchange ended before the upstream answered")
        del self._exchanges[ex_id]
        session = ex.session
        assert session is not None
        session.open_exchanges -= 1
        session.last_used = mono
        if ex.kind == "json" and ex.body:
            self._server_text(ex, ex.body, wall_ns, mono)
        if ex.sse is not None:
            self.stats.oversize += ex.sse.oversize
        self._unanswered(ex, wall_ns, mono, note)
        if ex.end_session:
            self._finish(session, wall_ns, mono)

    def tick(self, wall_ns: int, mono: float) -> None:
        """End sessions idle for longer than ``session_idle_seconds``."""
        for session in list(self._sessions.values()):
            if session.open_exchanges == 0 and mono - session.last_used > self.session_idle_seconds:
                self._finish(session, wall_ns, mono)

    def close(self, wall_ns: int, mono: float) -> None:
        """Shutdown: every exchange and session ends (pending calls time out)."""
        for ex_id in list(self._exchanges):
            self.end(ex_id, wall_ns, mono, "the proxy shut down")
        for session in list(self._sessions.values()):
            self._finish(session, wall_ns, mono)

    @property
    def sessions(self) -> int:
        return len(self._sessions)

    # -- sessions --------------------------------------------------------------------------------------
    def session_id(self, label: str) -> str:
        """The ``session_id`` of events: a keyed hash of the upstream and the session's label."""
        digest = hmac.new(
            self.key, b"scopewatch-http-session\0" + self.upstream.encode() + b"\0" + label.encode(), hashlib.sha256
        ).digest()
        return str(uuid.UUID(bytes=digest[:16], version=4))

    def _session(self, label: str, now: datetime, mono: float) -> _Session:
        session = self._sessions.get(label)
        if session is not None:
            self._sessions.move_to_end(label)
            session.last_used = mono
            return session
        identity = SessionIdentity(session_id=self.session_id(label), tenant=self.tenant)
        observer = McpSessionObserver(
            identity, transport="http", server_label=self.server_label, new_id=self.new_id, redactor=self.redactor
        )
        if self.extractor is not None:
            observer.extractor = self.extractor
        session = _Session(label, observer, last_used=mono)
        self._sessions[label] = session
        self.stats.sessions_opened += 1
        if len(self._sessions) > self.max_sessions:
            for old in list(self._sessions.values()):
                if len(self._sessions) <= self.max_sessions:
                    break
                if old is not session and old.open_exchanges == 0:
                    self._finish(old, int(now.timestamp() * 1e9), mono)
        return session

    def _finish(self, session: _Session, wall_ns: int, mono: float) -> None:
        if self._sessions.get(session.label) is session:
            del self._sessions[session.label]
            self.stats.sessions_closed += 1
            self._emit(session.observer.finish(utc_from_ns(wall_ns), mono))

    def _bind(self, session: _Session, check: TokenCheck, now: datetime) -> None:
        claims = check.attested or {}
        principal, agent_id = claims.get("sub"), claims.get("client_id")
        if not (isinstance(principal, str) and principal and isinstance(agent_id, str) and agent_id):
            return
        assert check.not_after is not None
        if session.bound is not None:
            same = session.bound[:2] == (principal, agent_id)
            if not same or check.not_after <= session.bound[2]:
                return
        auth = {"method": "bearer_jwt", "issuer": claims.get("iss"), "token_id": claims.get("jti")}
        observer = session.observer
        observer.identity = SessionIdentity(
            session_id=observer.identity.session_id,
            tenant=self.tenant,
            principal=principal,
            agent_id=agent_id,
            valid_until=datetime.fromtimestamp(check.not_after, tz=UTC),
            auth={k: v for k, v in auth.items() if v is not None},
        )
        session.bound = (principal, agent_id, check.not_after)
        self._emit(observer.start(now))

    def _prepare(self, session: _Session, message: Any, check: TokenCheck) -> None:
        """Per request: the token's attested claims and what the client says about itself and its token."""
        observer = session.observer
        redactor = observer.active_redactor
        claimed = {k: v for k, v in observer.claimed.items() if k != "auth"}
        for msg in each_message(message):
            params = msg.get("params")
            meta = params.get("_meta") if isinstance(params, dict) else None
            info = meta.get(CLIENT_INFO_META) if isinstance(meta, dict) else None
            if isinstance(info, dict):  # 2026-07-28 requests describe their client in _meta
                hint = redactor.redact({"client_name": info.get("name"), "client_version": info.get("version")})
                observer.redaction_counts.update(hint.counts)
                claimed.update(hint.value)
        auth = redactor.redact(check.auth_record())
        observer.redaction_counts.update(auth.counts)
        observer.claimed = {**claimed, "auth": auth.value}
        observer.attested = dict(check.attested) if check.verified and check.attested is not None else None

    # -- server messages ---------------------------------------------------------------------------
    def _server_text(self, ex: _Exchange, text: str | bytes | bytearray, wall_ns: int, mono: float) -> None:
        try:
            message: Any = json.loads(text)
        except ValueError:
            self.stats.unparsable += 1
            return
        assert ex.session is not None
        observer = ex.session.observer
        for msg in each_message(message):
            self.stats.messages += 1
            key = rpc_key(msg.get("id"))
            if key is not None and "method" not in msg:
                ex.answered.add(key)
            self._learn_server(msg)
        self._emit(observer.from_server(self._scoped(message, ex.scope), utc_from_ns(wall_ns), mono))
        if not self._label_fixed and self.server_label is None and observer.server_label is not None:
            self._set_server_label(observer.server_label)

    def _learn_server(self, msg: dict[str, Any]) -> None:
        if self.server_label is not None:
            return
        result = msg.get("result")
        meta = result.get("_meta") if isinstance(result, dict) else None
        info = meta.get(SERVER_INFO_META) if isinstance(meta, dict) else None
        if isinstance(info, dict) and isinstance(info.get("name"), str) and info["name"]:
            self._set_server_label(info["name"])

    def _set_server_label(self, label: str) -> None:
        self.server_label = label
        for session in self._sessions.values():
            if session.observer.server_label is None:
                session.observer.server_label = label

    def _unanswered(self, ex: _Exchange, wall_ns: int, mono: float, note: str | None) -> None:
        missing = [(k, v) for k, v in ex.requests.items() if k not in ex.answered]
        if not missing:
            return
        if ex.note is not None:
            reason = ex.note
        elif ex.status >= 300 or ex.status == 202:
            reason = f"the upstream answered HTTP {ex.status} without a response"
        elif ex.kind == "sse" and ex.scope is None:
            return  # a handshake-era stream may be resumed (Last-Event-ID): wait for the session's end
        elif note is not None:
            reason = f"no response: {note}"
        else:
            reason = "no response: the exchange ended without one"
        assert ex.session is not None
        error = {"code": PROXY_ERROR_CODE, "message": f"scopewatch proxy: {reason}"}
        replies = [{"jsonrpc": "2.0", "id": msg_id, "error": error} for _, msg_id in missing]
        self._emit(ex.session.observer.from_server(self._scoped(replies, ex.scope), utc_from_ns(wall_ns), mono))

    @staticmethod
    def _scoped(message: Any, scope: str | None) -> Any:
        """The message with its JSON-RPC ids prefixed by the exchange (single-exchange requests only)."""
        if scope is None:
            return message

        def one(msg: Any) -> Any:
            if not isinstance(msg, dict):
                return msg
            key = rpc_key(msg.get("id"))
            if key is None:
                return msg
            return {**msg, "id": f"{scope}{key[0]}:{key[1]!r}"}

        if isinstance(message, list):
            return [one(m) for m in message]
        return one(message)

    def _emit(self, events: list[Event]) -> None:
        for event in events:
            self.emit(event)
            self.stats.events += 1


class _ObserverThread:
    """Runs a :class:`HttpSessionTracker` on its own thread, fed through a queue with a byte budget."""

    def __init__(self, tracker: HttpSessionTracker, budget_bytes: int) -> None:
        self.tracker = tracker
        self.budget_bytes = budget_bytes
        self._items: list[tuple[Any, ...]] = []
        self._cond = threading.Condition()
        self._queued_bytes = 0
        self._thread = threading.Thread(target=self._run, name="scopewatch-proxy-observer", daemon=True)
        self._closed = False

    def start(self) -> None:
        self._thread.start()

    def put(self, item: tuple[Any, ...], nbytes: int = 0) -> None:
        with self._cond:
            self._items.append((nbytes, item))
            self._queued_bytes += nbytes
            self._cond.notify()

    @property
    def over_budget(self) -> bool:
        return self._queued_bytes > self.budget_bytes

    def stop(self, timeout: float = 30.0) -> None:
        self.put(("close", time.time_ns(), time.monotonic()))
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._items and not self._closed:
                    self._cond.wait()
                batch, self._items = self._items, []
            for nbytes, item in batch:
                self._handle(item)
                if nbytes:
                    with self._cond:
                        self._queued_bytes -= nbytes
                if item[0] == "close":
                    return
            if not batch:
                return

    def _handle(self, item: tuple[Any, ...]) -> None:
        kind, args = item[0], item[1:]
        tracker = self.tracker
        try:
            if kind == "open":
                tracker.open(*args)
            elif kind == "head":
                tracker.head(*args)
            elif kind == "data":
                tracker.data(*args)
            elif kind == "end":
                tracker.end(*args)
            elif kind == "tick":
                tracker.tick(*args)
            elif kind == "close":
                tracker.close(*args)
        except Exception as exc:  # noqa: BLE001 - the relay must outlive any observer bug
            tracker.stats.observer_errors += 1
            redactor = tracker.redactor or Redactor.ephemeral()
            try:
                text = redactor.redact_text(str(exc)).value[:300]
            except Exception:  # noqa: BLE001 - never let a log line take the observer down
                text = "(message withheld)"
            log.warning("observer error (%s): %s", type(exc).__name__, text)


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

    def __post_init__(self) -> None:
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
    """The reverse proxy: an aiohttp server in front of one upstream MCP endpoint."""

    def __init__(
        self,
        config: ProxyConfig,
        *,
        emit: Emit,
        redactor: Redactor,
        verifier: JwtVerifier | None = None,
        extractor: ResourceExtractor | None = None,
    ) -> None:
        if config.require_auth and verifier is None:
            raise ValueError("require_auth needs verification keys (a JWKS file or PEM keys)")
        self.config = config
        self.verifier = verifier
        self.stats = ProxyStats()
        self._key = redactor.key.get_secret_value()
        self.tracker = HttpSessionTracker(
            emit=emit,
            key=self._key,
            upstream=config.upstream,
            tenant=config.tenant,
            server_label=config.server_label,
            redactor=redactor,
            extractor=extractor,
            max_sessions=config.max_sessions,
            session_idle_seconds=config.session_idle_seconds,
        )
        self._observer = _ObserverThread(self.tracker, config.observer_budget_bytes)
        self._ids = itertools.count(1)
        self._client: aiohttp.ClientSession | None = None
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None
        self.port: int = config.port
        parts = urlsplit(config.upstream)
        self._origin = urlunsplit((parts.scheme, parts.netloc, "", "", ""))

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
        app = web.Application(client_max_size=config.max_body_bytes)
        app.router.add_route("*", config.endpoint_path, self._handle)
        app.router.add_route("GET", "/.well-known/{tail:.*}", self._well_known)
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
        if self._runner is not None:
            await self._runner.cleanup()
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
    async def _handle(self, request: web.Request) -> web.StreamResponse:
        ex_id = next(self._ids)
        wall_ns, mono = time.time_ns(), time.monotonic()
        self.stats.requests += 1
        token, check = bearer_token(request.headers.getall("Authorization", []))
        if token is not None:
            check = self.verifier.check(token) if self.verifier is not None else unverified_check(token)
        assert check is not None
        credential = "anon" if token is None else "bearer:" + self._token_hash(token)
        del token
        body = await request.read() if request.method == "POST" else b""
        start = ExchangeStart(
            method=request.method,
            session_header=request.headers.get("Mcp-Session-Id"),
            check=check,
            credential=credential,
            body=body,
            wall_ns=wall_ns,
            mono=mono,
        )
        await self._admit()
        self._observer.put(("open", ex_id, start), len(body))
        broke: str | None = None
        try:
            if self.config.require_auth and not check.verified:
                self.stats.rejected += 1
                note = f"rejected: {check.reason or 'no bearer token'} (HTTP 401)"
                self._observer.put(("head", ex_id, 401, "application/json", None, note))
                log.debug("%s %s -> 401 (%s)", request.method, request.path, check.reason or "no token")
                return self._unauthorized(check)
            response, broke = await self._forward(request, ex_id, body)
            return response
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

    def _unauthorized(self, check: TokenCheck) -> web.Response:
        params = ['realm="scopewatch"']
        if check.status == "absent":
            body = {"error": "unauthorized", "error_description": "A bearer access token is required"}
        else:
            description = REASONS.get(check.reason or "invalid", REASONS["invalid"])
            params += ['error="invalid_token"', f'error_description="{description}"']
            body = {"error": "invalid_token", "error_description": description}
        if self.config.resource_metadata:
            params.append(f'resource_metadata="{self.config.resource_metadata}"')
        return web.json_response(body, status=401, headers={"WWW-Authenticate": "Bearer " + ", ".join(params)})

    def _request_headers(self, request: web.Request) -> list[tuple[str, str]]:
        dropped = _NOT_FORWARDED | _connection_tokens(request.headers.getall("Connection", []))
        headers = [(name, value) for name, value in request.headers.items() if name.lower() not in dropped]
        headers.append(("Accept-Encoding", "identity"))
        peer = request.remote or ""
        forwarded_for = ", ".join([*request.headers.getall("X-Forwarded-For", []), peer]) if peer else None
        if forwarded_for:
            headers = [(n, v) for n, v in headers if n.lower() != "x-forwarded-for"]
            headers.append(("X-Forwarded-For", forwarded_for))
        headers.append(("X-Forwarded-Proto", request.scheme))
        if request.host:
            headers.append(("X-Forwarded-Host", request.host))
        return headers

    async def _forward(self, request: web.Request, ex_id: int, body: bytes) -> tuple[web.StreamResponse, str | None]:
        """Relay one request; returns the response and why it broke off (``None``: it did not)."""
        assert self._client is not None
        target = self.config.upstream + (f"?{request.query_string}" if request.query_string else "")
        try:
            upstream = await self._client.request(
                request.method,
                target,
                headers=self._request_headers(request),
                data=body if body else None,
                allow_redirects=False,
                skip_auto_headers=("User-Agent", "Content-Type", "Accept"),
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            self.stats.upstream_errors += 1
            note = f"the upstream is unreachable ({type(exc).__name__}; HTTP 502)"
            self._observer.put(("head", ex_id, 502, "application/json", None, note))
            log.warning("upstream %s unreachable: %s", _safe_url(self.config.upstream), type(exc).__name__)
            error = {"error": "bad_gateway", "error_description": "the upstream MCP server is unreachable"}
            return web.json_response(error, status=502), None
        broke: str | None = None
        try:
            headers = upstream.headers
            self._observer.put(
                ("head", ex_id, upstream.status, headers.get("Content-Type", ""), headers.get("Mcp-Session-Id"), None)
            )
            out = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            dropped = _NOT_RETURNED | _connection_tokens(headers.getall("Connection", []))
            for name, value in headers.items():
                if name.lower() not in dropped:
                    out.headers.add(name, value)
            length = headers.get("Content-Length")
            if length is not None and length.isdigit():
                out.content_length = int(length)
            await out.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await self._admit()
                    self._observer.put(("data", ex_id, chunk, time.time_ns(), time.monotonic()), len(chunk))
                    await out.write(chunk)
            except aiohttp.ClientPayloadError:
                broke = "the upstream broke the response off"
                self.stats.upstream_errors += 1
                out.force_close()
                return out, broke
            except (ConnectionResetError, aiohttp.ClientConnectionResetError):
                broke = "the client went away"
                self.stats.client_disconnects += 1
                return out, broke
            # everything was relayed; a client that hangs up now (the SDK closes an SSE response as
            # soon as it has its answer) has lost nothing
            with contextlib.suppress(ConnectionResetError, aiohttp.ClientConnectionResetError):
                await out.write_eof()
            return out, None
        finally:
            upstream.close()
            log.debug("%s %s -> %s%s", request.method, request.path, upstream.status, f" ({broke})" if broke else "")

    async def _well_known(self, request: web.Request) -> web.StreamResponse:
        """OAuth metadata (``/.well-known/...``): passed through from the upstream's origin, unobserved."""
        assert self._client is not None
        try:
            async with self._client.get(
                self._origin + request.path, headers={"Accept": request.headers.get("Accept", "*/*")}
            ) as upstream:
                body = await upstream.read()
                headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _NOT_RETURNED}
                headers.pop("Content-Encoding", None)
                return web.Response(body=body, status=upstream.status, headers=headers)
        except (aiohttp.ClientError, TimeoutError, OSError):
            return web.json_response({"error": "bad_gateway"}, status=502)


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
