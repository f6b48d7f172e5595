"""In-process collector for servers built with the ``mcp`` Python SDK (2.x): a server middleware.

    from collectors.sdk import SdkCollector

    collector = SdkCollector.start(tenant="acme", server="files")   # Kafka + spool from SCOPEWATCH_*
    collector.install(server)        # a low-level ``mcp.server.Server`` or an ``MCPServer``
    ...                              # serve as usual (stdio, Streamable HTTP, in-process)
    collector.close()                # ends open sessions, flushes (or spools) the events

:class:`ScopewatchMiddleware` is a context-tier ``ServerMiddleware``: the SDK calls it for every
inbound request. It watches ``initialize``, ``tools/list`` and ``tools/call``, feeds them -- and
the result or error the handler produced -- to the same :class:`~collectors.observer.McpSessionObserver`
the stdio and HTTP collectors use, and emits ``tool_call`` / ``tool_result`` events with transport
``sdk`` (redacted, resources extracted, tool digests learned from ``tools/list``). Emitting never
awaits the broker: events go to a :class:`~collectors.publisher.BackgroundPublisher` (spooled to
disk while Kafka is away).

Sessions: a handshake connection (stdio, Streamable HTTP with ``initialize``, in-memory streams)
is one session; its id is the transport's ``Mcp-Session-Id`` when there is one, else a new UUID.
It emits ``session_bound`` when first seen (if principal and agent are known) and ``session_ended``
-- plus ``timeout`` results for calls still running -- when the connection closes. The stateless
2026-07-28 protocol has no connection: its requests share one session per middleware (ended by
:meth:`ScopewatchMiddleware.close`), and the client's self-description of each request is recorded.

Identity: ``principal`` / ``agent_id`` given to the middleware, or -- when the SDK verified a
bearer token (``auth=`` / ``token_verifier=`` on the server) -- the token's subject and client id,
recorded as ``attested`` on every call.

Fail closed: with ``fail_closed`` (default: when the spool is configured ``on_full=fail``) a call
whose ``tool_call`` event could not be recorded is refused with an MCP error instead of running.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from mcp.server.context import CallNext, HandlerResult, ServerRequestContext
from mcp.shared.exceptions import MCPError
from mcp_types import INTERNAL_ERROR, INVALID_PARAMS
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import BaseModel, ValidationError

from collectors.chain import ChainStamper
from collectors.config import CollectorConfig
from collectors.emit import Emitter
from collectors.observer import McpSessionObserver, SessionIdentity, utc_from_ns
from collectors.publisher import BackgroundPublisher, PublisherError, PublisherStats
from collectors.redact import Redactor
from collectors.resources import ResourceExtractor
from collectors.spool import SpoolConfigError
from schemas import Event, Topics

__all__ = ["Record", "ScopewatchMiddleware", "SdkCollector", "attested_from_token", "recorder"]

log = logging.getLogger("scopewatch.sdk")

Record = Callable[[Event], object]
"""Hands one event on; a result of ``False`` means it was *not* recorded (spool full, fail closed)."""

WATCHED = frozenset({"initialize", "tools/list", "tools/call"})
_STATE_KEY = "scopewatch.session"


def attested_from_token() -> dict[str, Any] | None:
    """Claims of the bearer token the SDK verified for this request (never the token itself)."""
    try:
        from mcp.server.auth.middleware.auth_context import get_access_token
    except ImportError:  # pragma: no cover - the SDK without its auth extras
        return None
    token = get_access_token()
    if token is None:
        return None
    claims = dict(token.claims or {})
    attested = {
        "sub": token.subject or claims.get("sub"),
        "client_id": token.client_id,
        "scope": " ".join(token.scopes) if token.scopes else None,
        "exp": token.expires_at,
        "iss": claims.get("iss"),
        "jti": claims.get("jti"),
        "act": claims.get("act"),
        "verified_by": "mcp-sdk",
    }
    return {k: v for k, v in attested.items() if v is not None}


@dataclass
class _Session:
    observer: McpSessionObserver
    last_claim: Any = None
    ended: bool = False


def _as_dict(result: HandlerResult) -> dict[str, Any]:
    if result is None:
        return {}
    if isinstance(result, BaseModel):
        return result.model_dump(by_alias=True, mode="json", exclude_none=True)
    return dict(result)


@dataclass
class ScopewatchMiddleware:
    """Observes tool calls of an ``mcp`` SDK server; see the module docstring."""

    record: Record
    tenant: str = "default"
    principal: str | None = None
    agent_id: str | None = None
    server_label: str | None = None
    redactor: Redactor | None = None
    extractor: ResourceExtractor = field(default_factory=ResourceExtractor)
    fail_closed: bool = False
    session_id: str | None = None  # of the shared session (stateless protocol)
    new_id: Callable[[], str] = field(default=lambda: str(uuid.uuid4()))

    def __post_init__(self) -> None:
        self._ids = itertools.count(1)
        self._shared: _Session | None = None
        self._open: dict[int, _Session] = {}
        self.refused = 0

    # -- the middleware ---------------------------------------------------------------
    async def __call__(self, ctx: ServerRequestContext[Any, Any], call_next: CallNext) -> HandlerResult:
        if ctx.method not in WATCHED:
            return await call_next(ctx)
        session = self._session_for(ctx)
        observer = session.observer
        rid = f"scopewatch-{next(self._ids)}"  # ours: unique even where the wire ids repeat
        params = dict(ctx.params or {})
        if ctx.method == "tools/call":
            observer.attested = attested_from_token()
            self._claim(session, ctx)
        recorded = self._emit(observer.from_client({"id": rid, "method": ctx.method, "params": params}, *_now()))
        if ctx.method == "tools/call" and not recorded and self.fail_closed:
            self.refused += 1
            message = "refused: the call could not be recorded in the audit trail (scopewatch fails closed)"
            self._respond(observer, rid, {"error": {"code": INTERNAL_ERROR, "message": message}})
            raise MCPError(code=INTERNAL_ERROR, message=message)
        try:
            result = await call_next(ctx)
        except MCPError as exc:
            self._respond(observer, rid, {"error": {"code": exc.error.code, "message": exc.error.message}})
            raise
        except ValidationError:
            self._respond(observer, rid, {"error": {"code": INVALID_PARAMS, "message": "Invalid request parameters"}})
            raise
        except BaseException as exc:
            text = "cancelled" if isinstance(exc, asyncio.CancelledError) else f"{type(exc).__name__}: {exc}"
            self._respond(observer, rid, {"error": {"code": INTERNAL_ERROR, "message": text}})
            raise
        self._respond(observer, rid, {"result": _as_dict(result)})
        return result

    def _respond(self, observer: McpSessionObserver, rid: str, reply: dict[str, Any]) -> None:
        self._emit(observer.from_server({"id": rid, **reply}, *_now()))

    def _emit(self, events: Iterable[Event]) -> bool:
        """Record events; False if any was refused. Never raises into the server."""
        ok = True
        for event in events:
            try:
                ok = self.record(event) is not False and ok
            except Exception:  # a collector bug must not take the server down
                log.exception("scopewatch could not record a %s event", event.event_type)
                ok = False
        return ok

    # -- sessions ----------------------------------------------------------------------
    def _session_for(self, ctx: ServerRequestContext[Any, Any]) -> _Session:
        connection = getattr(ctx.session, "_connection", None)  # no public accessor in the SDK yet
        state = getattr(connection, "state", None)
        if ctx.protocol_version in MODERN_PROTOCOL_VERSIONS or not isinstance(state, dict):
            if self._shared is None:
                self._shared = self._new_session(self.session_id or self.new_id())
            return self._shared
        session = state.get(_STATE_KEY)
        if session is None:
            session = self._new_session(getattr(connection, "session_id", None) or self.new_id())
            state[_STATE_KEY] = session
            self._open[id(session)] = session
            exit_stack = getattr(connection, "exit_stack", None)
            if exit_stack is not None:
                exit_stack.callback(self._end, session)
        return session

    def _new_session(self, session_id: str) -> _Session:
        attested = attested_from_token()
        principal = self.principal or (attested or {}).get("sub")
        agent_id = self.agent_id or (attested or {}).get("client_id")
        auth: dict[str, Any] = {"method": "sdk", "host": socket.gethostname()}
        if attested and not self.principal:
            auth = {"method": "bearer", "issuer": attested.get("iss"), "token_id": attested.get("jti")}
        identity = SessionIdentity(session_id, self.tenant, principal, agent_id, auth=auth)
        observer = McpSessionObserver(
            identity,
            transport="sdk",
            server_label=self.server_label,
            new_id=self.new_id,
            attested=attested,
            redactor=self.redactor,
            extractor=self.extractor,
        )
        session = _Session(observer)
        self._emit(observer.start(utc_from_ns(time.time_ns())))
        return session

    def _claim(self, session: _Session, ctx: ServerRequestContext[Any, Any]) -> None:
        """On the stateless protocol every request describes its client: record that description."""
        if ctx.protocol_version not in MODERN_PROTOCOL_VERSIONS:
            return
        params = getattr(ctx.session, "client_params", None)
        info = getattr(params, "client_info", None)
        if info is None or info == session.last_claim:
            return
        session.last_claim = info
        rid = f"scopewatch-{next(self._ids)}"
        described = {"name": info.name, "version": info.version}
        session.observer.from_client({"id": rid, "method": "initialize", "params": {"clientInfo": described}}, *_now())
        session.observer.from_server({"id": rid, "result": {}}, *_now())

    def _end(self, session: _Session) -> None:
        if not session.ended:
            session.ended = True
            self._open.pop(id(session), None)
            self._emit(session.observer.finish(*_now()))

    def close(self) -> None:
        """End every session still open (calls in flight time out)."""
        for session in list(self._open.values()):
            self._end(session)
        if self._shared is not None:
            self._end(self._shared)
            self._shared = None


def _now() -> tuple[Any, float]:
    return utc_from_ns(time.time_ns()), time.monotonic()


def recorder(publisher: BackgroundPublisher, topics: Topics, stamper: ChainStamper) -> Record:
    """Stamp, encode and queue each event; False when the publisher refused it (a counted loss)."""
    return Emitter(topics, stamper, publisher).emit


@dataclass
class SdkCollector:
    """A middleware wired to Kafka: publisher (with its spool), chain stamper, host redaction."""

    middleware: ScopewatchMiddleware
    publisher: BackgroundPublisher

    @classmethod
    def start(
        cls,
        *,
        bootstrap: str | None = None,
        topics: Topics | None = None,
        tenant: str = "default",
        principal: str | None = None,
        agent_id: str | None = None,
        server: str | None = None,
        collector_id: str | None = None,
        fail_closed: bool | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> SdkCollector:
        """Build it from the ``SCOPEWATCH_*`` environment (the settings' variables), overridden by arguments.

        Raises :class:`~collectors.config.ConfigError` for a bad setting and
        :class:`~collectors.publisher.PublisherError` for an unusable spool (fail closed at start).
        """
        config = CollectorConfig.from_env(environ)
        bootstrap = bootstrap or config.kafka_bootstrap
        topics = topics or config.topics
        redactor = config.redactor()
        extractor = config.extractor() or ResourceExtractor()
        try:
            spool = config.spool()
        except SpoolConfigError as exc:
            raise PublisherError(f"spool settings: {exc}") from None
        publisher = BackgroundPublisher(bootstrap, client_id="scopewatch-sdk", spool=spool).start()
        cid = collector_id or f"sdk:{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        stamper = ChainStamper(cid, epoch=time.time_ns() // 1_000_000)
        middleware = ScopewatchMiddleware(
            recorder(publisher, topics, stamper),
            tenant=tenant,
            principal=principal,
            agent_id=agent_id,
            server_label=server,
            redactor=redactor,
            extractor=extractor,
            fail_closed=publisher.config.on_full == "fail" if fail_closed is None else fail_closed,
        )
        return cls(middleware, publisher)

    def install(self, server: Any) -> None:
        """Add the middleware to a low-level ``Server`` or an ``MCPServer`` (innermost position)."""
        if self.middleware.server_label is None:
            self.middleware.server_label = getattr(server, "name", None)
        server.middleware.append(self.middleware)

    def close(self, timeout: float = 15.0) -> PublisherStats:
        """End open sessions, then deliver (or spool) every event; returns the publisher's counters."""
        self.middleware.close()
        return self.publisher.close(timeout)
