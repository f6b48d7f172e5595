"""Turns the JSON-RPC messages of one MCP session into scopewatch events.

Pure: no I/O, no clock reads. Every message comes with the instant it was seen (wall
clock for ``event_time``, monotonic for durations) and ids come from an injected
factory, so the same observer serves the stdio wrapper, tests and benchmarks.

Nothing leaves the observer unredacted: tool-call arguments, the client's self-description
(``claimed``) and error texts of results go through the :class:`~collectors.redact.Redactor`
(secrets become keyed fingerprints, arguments are capped in size), and ``resources`` come
from the :class:`~collectors.resources.ResourceExtractor` rules, read from the original
arguments and redacted as well. Without an explicit redactor the observer uses one with a
random key of its own (still redacting, but its fingerprints join only within the session);
collectors pass the host's configured redactor (see :mod:`collectors.stdio`).
"""

from __future__ import annotations

import os
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal, TypeVar

from collectors.jsonrpc import each_message, rpc_key
from collectors.redact import Redactor, canonical_digest
from collectors.resources import ResourceExtractor
from schemas import (
    Event,
    SessionBound,
    SessionEnded,
    ToolCall,
    ToolResult,
)

__all__ = [
    "MAX_ERROR_CHARS",
    "McpSessionObserver",
    "SessionIdentity",
    "canonical_digest",
    "random_uuid",
    "utc_from_ns",
]

MAX_ERROR_CHARS = 1024


@dataclass(frozen=True)
class SessionIdentity:
    """Who the session acts for, as set by whoever launched the agent."""

    session_id: str
    tenant: str
    principal: str | None = None
    agent_id: str | None = None
    valid_until: datetime | None = None
    auth: dict[str, Any] = field(default_factory=dict)


class _RandomPool:
    """Random (version 4) UUID strings, made 256 at a time from one ``getrandom`` of 4 KiB."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._ready: list[str] = []

    def take(self) -> str:
        while True:
            try:
                return self._ready.pop()  # atomic: each string is handed out once, whatever the threads
            except IndexError:
                with self._lock:
                    if not self._ready:
                        self._ready = _uuids(os.urandom(4096))

    def reset(self) -> None:  # after a fork: never hand out the parent's numbers again
        self._lock = threading.Lock()
        self._ready = []


def _uuids(raw: bytes) -> list[str]:
    """Version 4 UUID strings, one per 16 bytes of ``raw``, as ``str(uuid.UUID(bytes=..., version=4))``."""
    h = raw.hex()
    return [
        f"{h[i : i + 8]}-{h[i + 8 : i + 12]}-4{h[i + 13 : i + 16]}-"
        f"{'89ab'[int(h[i + 16], 16) & 3]}{h[i + 17 : i + 20]}-{h[i + 20 : i + 32]}"
        for i in range(0, len(h) - 31, 32)
    ]


_POOL = _RandomPool()
os.register_at_fork(after_in_child=_POOL.reset)


def random_uuid() -> str:
    """A random (version 4) UUID string, as ``str(uuid.uuid4())`` but cheaper."""
    return _POOL.take()


def _error_text(result: dict[str, Any]) -> str:
    """The text of a tool result flagged ``isError`` (uncapped: redaction must see all of it)."""
    content = result.get("content")
    items = content if isinstance(content, list) else []
    parts = [c.get("text", "") for c in items if isinstance(c, dict) and c.get("type") == "text"]
    return " ".join(p for p in parts if isinstance(p, str)) or "tool reported isError"


@dataclass
class _Pending:
    call_id: str
    started_mono: float


@dataclass
class McpSessionObserver:
    """Follows one MCP session; returns the events each message gives rise to.

    ``redactor``: the host's redaction policy; ``None`` until a collector sets one, meanwhile
    a redactor with a random key of this observer's own is used. ``extractor``: the
    resource rules (default: :data:`~collectors.resources.DEFAULT_RULES`).
    ``redaction_counts`` sums, per detector, the secrets replaced so far.
    """

    identity: SessionIdentity
    transport: Literal["stdio", "http", "sdk"] = "stdio"
    server_label: str | None = None
    new_id: Callable[[], str] = field(default=lambda: random_uuid())
    attested: dict[str, Any] | None = None
    redactor: Redactor | None = None
    extractor: ResourceExtractor = field(default_factory=ResourceExtractor)

    def __post_init__(self) -> None:
        self._calls: dict[tuple[str, Any], _Pending] = {}
        self._lists: set[tuple[str, Any]] = set()
        self._inits: set[tuple[str, Any]] = set()
        self._own_redactor: Redactor | None = None
        self.tool_digests: dict[str, str] = {}
        self.claimed: dict[str, Any] = {}
        self.calls_seen = 0
        self.results_seen = 0
        self.redaction_counts: Counter[str] = Counter()

    @property
    def active_redactor(self) -> Redactor:
        """The configured redactor, or this observer's own one with a random key."""
        if self.redactor is not None:
            return self.redactor
        if self._own_redactor is None:
            self._own_redactor = Redactor.ephemeral()
        return self._own_redactor

    def redact_text(self, text: str) -> str:
        """``text`` with secrets replaced (for anything the collector logs or records)."""
        redacted = self.active_redactor.redact_text(text)
        if redacted.counts:  # most texts hold no secret: skip Counter.update's Mapping check
            self.redaction_counts.update(redacted.counts)
        return redacted.value

    # -- session lifecycle ----------------------------------------------------------
    def start(self, now: datetime) -> list[Event]:
        ident = self.identity
        if ident.principal is None or ident.agent_id is None:
            return []
        return [
            SessionBound(
                event_id=self.new_id(),
                event_time=now,
                tenant=ident.tenant,
                session_id=ident.session_id,
                principal=ident.principal,
                agent_id=ident.agent_id,
                valid_from=now,
                valid_until=ident.valid_until,
                auth=ident.auth,
            )
        ]

    def finish(self, now: datetime, now_mono: float) -> list[Event]:
        """End of session: calls still waiting for a response time out; the session ends."""
        events: list[Event] = []
        for pending in self._calls.values():
            events.append(self._result(pending, now, now_mono, "timeout", "no response before the session ended", None))
        self._calls.clear()
        if self.identity.principal is not None and self.identity.agent_id is not None:
            events.append(
                SessionEnded(
                    event_id=self.new_id(),
                    event_time=now,
                    tenant=self.identity.tenant,
                    session_id=self.identity.session_id,
                )
            )
        return events

    # -- messages ---------------------------------------------------------------------
    def from_client(self, message: Any, now: datetime, now_mono: float) -> list[Event]:
        events: list[Event] = []
        for msg in each_message(message):
            method = msg.get("method")
            key = rpc_key(msg.get("id"))
            if method == "tools/call" and key is not None:
                events.append(self._call(msg, key, now, now_mono))
            elif method == "tools/list" and key is not None:
                self._lists.add(key)
            elif method == "initialize" and key is not None:
                self._inits.add(key)
                params = msg.get("params")
                info = params.get("clientInfo") if isinstance(params, dict) else None
                if isinstance(info, dict):
                    claimed = {"client_name": info.get("name"), "client_version": info.get("version")}
                    redacted = self.active_redactor.redact(claimed)
                    self.redaction_counts.update(redacted.counts)
                    self.claimed = redacted.value
        return events

    def from_server(self, message: Any, now: datetime, now_mono: float) -> list[Event]:
        events: list[Event] = []
        for msg in each_message(message):
            if "method" in msg:  # a server request or notification, not a response
                continue
            key = rpc_key(msg.get("id"))
            if key is None:
                continue
            pending = self._calls.pop(key, None)
            if pending is not None:
                events.append(self._response(pending, msg, now, now_mono))
            elif key in self._lists:
                self._lists.discard(key)
                self._learn_tools(msg.get("result"))
            elif key in self._inits:
                self._inits.discard(key)
                info = (msg.get("result") or {}).get("serverInfo") if isinstance(msg.get("result"), dict) else None
                if self.server_label is None and isinstance(info, dict) and isinstance(info.get("name"), str):
                    self.server_label = info["name"]
        return events

    # -- helpers ------------------------------------------------------------------------
    def _call(self, msg: dict[str, Any], key: tuple[str, Any], now: datetime, now_mono: float) -> ToolCall:
        params = msg.get("params") if isinstance(msg.get("params"), dict) else {}
        assert isinstance(params, dict)
        tool = params.get("name")
        tool = tool if isinstance(tool, str) else ""
        server = self.server_label or "unknown"
        raw_arguments = params.get("arguments")
        redactor = self.active_redactor
        redacted = redactor.redact_arguments(raw_arguments)
        if redacted.counts:
            self.redaction_counts.update(redacted.counts)
        resources = self.extractor.extract(server, tool, raw_arguments, redactor)
        call_id = self.new_id()
        self._calls[key] = _Pending(call_id, now_mono)
        self.calls_seen += 1
        return _construct(  # trusted values, see _ms
            ToolCall,
            event_type="tool_call",
            event_id=self.new_id(),
            event_time=_ms(now),
            tenant=self.identity.tenant,
            collector=None,
            call_id=call_id,
            session_id=self.identity.session_id,
            server=server,
            # the agent chooses the name it calls: redact it too (a name known clean as it is)
            tool=tool if redactor.known_clean(tool) else self.redact_text(tool),
            arguments=redacted.value,
            resources=resources,
            transport=self.transport,
            attested=self.attested,
            claimed=dict(self.claimed),
            tool_digest=self.tool_digests.get(tool),
        )

    def _response(self, pending: _Pending, msg: dict[str, Any], now: datetime, now_mono: float) -> ToolResult:
        if "error" in msg:
            err = msg.get("error")
            if isinstance(err, dict):
                text = f"{err.get('code')}: {err.get('message')}"
            else:
                text = str(err)
            return self._result(pending, now, now_mono, "error", text, canonical_digest(err))
        result = msg.get("result")
        if isinstance(result, dict) and result.get("isError") is True:
            return self._result(pending, now, now_mono, "error", _error_text(result), canonical_digest(result))
        return self._result(pending, now, now_mono, "ok", None, canonical_digest(result))

    def _result(
        self,
        pending: _Pending,
        now: datetime,
        now_mono: float,
        status: Literal["ok", "error", "timeout"],
        error: str | None,
        digest: str | None,
    ) -> ToolResult:
        self.results_seen += 1
        if error is not None:  # redact before capping: a cut secret might no longer be recognised
            error = self.redact_text(error)[:MAX_ERROR_CHARS]
        return _construct(  # trusted values, see _ms
            ToolResult,
            event_type="tool_result",
            event_id=self.new_id(),
            event_time=_ms(now),
            tenant=self.identity.tenant,
            collector=None,
            call_id=pending.call_id,
            session_id=self.identity.session_id,
            status=status,
            duration_ms=max(0.0, round((now_mono - pending.started_mono) * 1000.0, 3)),
            error=error,
            result_digest=digest,
        )

    def _learn_tools(self, result: Any) -> None:
        if not isinstance(result, dict):
            return
        for tool in result.get("tools") or []:
            if isinstance(tool, dict) and isinstance(tool.get("name"), str):
                self.tool_digests[tool["name"]] = canonical_digest(tool)


_set = object.__setattr__
M = TypeVar("M", bound=Event)


def _construct(model: type[M], **values: Any) -> M:
    """``model.model_construct(**values)`` for values naming every field (in declared order): what
    pydantic's ``model_construct`` does, without its per-field walk over defaults and aliases."""
    event = model.__new__(model)
    _set(event, "__dict__", values)
    _set(event, "__pydantic_fields_set__", set(values))
    _set(event, "__pydantic_extra__", {})
    _set(event, "__pydantic_private__", None)
    return event


def _ms(now: datetime) -> datetime:
    """``now`` as a validated event timestamp holds it: truncated to milliseconds, in UTC.

    Tool calls and results -- the events of every call -- are built with :func:`_construct`: their
    values are trusted (ids from :func:`random_uuid`, parsed JSON, the redactor's output, literals
    of this module), so pydantic's validation of each would only cost time. A value that is not
    plain JSON after all (e.g. a NaN in the arguments) still fails, when the event is encoded.
    """
    if now.tzinfo is not UTC:
        if now.tzinfo is None:
            raise ValueError("naive datetime (no UTC offset)")
        now = now.astimezone(UTC)
    micro = now.microsecond
    return now if micro % 1000 == 0 else now.replace(microsecond=micro - micro % 1000)


def utc_from_ns(ns: int) -> datetime:
    """The UTC instant ``ns`` (nanoseconds since the epoch), truncated to milliseconds as every
    event timestamp is (``schemas.parse_timestamp``): events built without validation stay exact."""
    ms = ns // 1_000_000
    return datetime.fromtimestamp(ms // 1000, tz=UTC).replace(microsecond=(ms % 1000) * 1000)
