"""The HTTP collector's observation side: relayed exchanges -> MCP sessions -> events.

:class:`HttpSessionTracker` follows the exchanges :class:`~collectors.http_proxy.HttpProxy`
relays (one :class:`~collectors.observer.McpSessionObserver` per MCP session, keyed-hash session
ids, token binding, calls left unanswered); :class:`ObserverThread` runs it on a thread of its
own, fed through a queue with a byte budget, so the relay never waits for it. See
:mod:`collectors.http_proxy` for the behaviour as a whole.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

from collectors.http_sse import MAX_MESSAGE_BYTES, SseParser
from collectors.jsonrpc import each_message, parse_message, rpc_key
from collectors.jwt_verify import TokenCheck
from collectors.observer import McpSessionObserver, SessionIdentity, utc_from_ns
from collectors.redact import Redactor
from collectors.resources import ResourceExtractor
from schemas import Event

__all__ = [
    "CLIENT_INFO_META",
    "PROXY_ERROR_CODE",
    "SERVER_INFO_META",
    "ExchangeStart",
    "HttpSessionTracker",
    "ObserverThread",
    "TrackerStats",
]

log = logging.getLogger("scopewatch.proxy")

Emit = Callable[[Event], object]

PROXY_ERROR_CODE: Final = -32099
"""JSON-RPC error code of the results the proxy records for calls that got no response."""
CLIENT_INFO_META: Final = "io.modelcontextprotocol/clientInfo"
SERVER_INFO_META: Final = "io.modelcontextprotocol/serverInfo"


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
            message: Any = parse_message(start.body)
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
            message: Any = parse_message(text)
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


class ObserverThread:
    """Runs a :class:`HttpSessionTracker` on its own thread, fed through a queue with a byte budget.

    The relay's :meth:`put` only appends (no wake-up): the thread takes what queued every
    ``batch_seconds`` -- one wake-up per batch, not one per request -- or at once when the queue
    passes its byte budget or closes. Between two items it lets go of the interpreter lock, so the
    relay, whose requests share the GIL with it, waits at most one item's work, never a whole
    batch. After each batch ``flush`` (if given) hands the events recorded to the publisher at once.
    """

    def __init__(
        self,
        tracker: HttpSessionTracker,
        budget_bytes: int,
        batch_seconds: float = 0.05,
        flush: Callable[[], None] | None = None,
    ) -> None:
        self.tracker = tracker
        self.budget_bytes = budget_bytes
        self.batch_seconds = batch_seconds
        self.flush = flush
        self._items: deque[tuple[int, tuple[Any, ...]]] = deque()
        self._cond = threading.Condition()
        # bytes queued = _added - _removed; each counter has one writer (the relay's loop, this thread),
        # so :meth:`put` takes no lock: a deque append is atomic
        self._added = 0
        self._removed = 0
        self._thread = threading.Thread(target=self._run, name="scopewatch-proxy-observer", daemon=True)
        self._closed = False

    def start(self) -> None:
        self._thread.start()

    def put(self, item: tuple[Any, ...], nbytes: int = 0) -> None:
        """Queue ``item`` (from the relay's event loop thread; ``nbytes`` counts against the budget)."""
        self._items.append((nbytes, item))
        if nbytes:
            self._added += nbytes
            if self._added - self._removed > self.budget_bytes:
                with self._cond:
                    self._cond.notify()

    @property
    def over_budget(self) -> bool:
        return self._added - self._removed > self.budget_bytes

    def stop(self, timeout: float = 30.0) -> None:
        self._items.append((0, ("close", time.time_ns(), time.monotonic())))
        with self._cond:
            self._closed = True
            self._cond.notify()
        self._thread.join(timeout)

    def _run(self) -> None:
        items = self._items
        while True:
            with self._cond:
                if not self._closed and not self.over_budget:
                    self._cond.wait(self.batch_seconds)
                closed = self._closed
            taken = len(items)
            try:
                for _ in range(taken):
                    nbytes, item = items.popleft()
                    self._handle(item)
                    self._removed += nbytes
                    if item[0] == "close":
                        return
                    time.sleep(0)  # let a waiting relay have the GIL now, not at the end of the batch
            finally:
                if self.flush is not None and taken:
                    self._flush()
            if not taken and closed:
                return

    def _flush(self) -> None:
        assert self.flush is not None
        try:
            self.flush()
        except Exception as exc:  # noqa: BLE001 - the relay must outlive any publisher problem
            self.tracker.stats.observer_errors += 1
            log.warning("observer error (%s) while handing events over", type(exc).__name__)

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
