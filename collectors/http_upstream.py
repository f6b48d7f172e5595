"""The proxy's client side: requests to the upstream MCP endpoint (:mod:`collectors.http_proxy`).

For an ``http://`` upstream, a lean HTTP/1.1 client: a pool of keep-alive connections (each an
:class:`asyncio.Protocol`), framed and parsed by :mod:`collectors.http_wire` (strict: ambiguous
framing, control characters and malformed heads are refused) -- a fraction of the per-request work of aiohttp's
client (request objects, tracing, timers) and of ``h11`` (which it used before). For
``https://`` upstreams aiohttp's client is used, behind the same small interface.

Both give an :class:`UpstreamResponse`: status, reason, headers (as the upstream spelled them) and
the body chunk by chunk as it arrives (SSE streams are never buffered whole). A response that ends
before its framing says it is complete raises :class:`UpstreamBroken`; a request that gets no
response head (connection refused, reset, timeout) raises :class:`UpstreamUnreachable`. A request is
retried once, on a new connection, only when a kept-alive connection turned out to be closed before
a single byte of the answer came back (the upstream closed it while idle) *and* its method is
idempotent: a POST (a tool call) is never sent twice -- it gets a 502 instead, as with aiohttp's
client. To make that rare, a connection idle for :data:`IDLE_SECONDS` is not reused (servers' own
keep-alive timeouts are 5 s and more), nor one the upstream closed or asked to close.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
from multidict import CIMultiDict, CIMultiDictProxy

from collectors.http_wire import ChunkedDecoder, ResponseHead, WireError, parse_response_head, request_bytes

__all__ = [
    "AiohttpUpstream",
    "H11Upstream",
    "LeanUpstream",
    "UpstreamBroken",
    "UpstreamResponse",
    "UpstreamUnreachable",
    "upstream_client",
]

BUFFER_BYTES = 1 << 18
"""Bytes read from the upstream and not yet relayed beyond which reading pauses (backpressure)."""
MAX_HEAD_BYTES = 64 * 1024
"""Largest response head (status line and headers) accepted from the upstream."""
IDLE_CONNECTIONS = 64
"""Kept-alive connections kept open beyond those in use."""
IDLE_SECONDS = 2.0
"""A connection idle longer than this is closed instead of reused."""
RETRIED_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})
"""Idempotent methods: retried once on a fresh connection when a reused one was found closed."""


class UpstreamUnreachable(OSError):
    """No response head came back: the upstream is down, refused, reset or timed out."""


class UpstreamBroken(Exception):
    """The upstream broke a response off (its framing says there was more)."""


class UpstreamResponse:
    """One upstream response: ``status``, ``reason``, ``headers``; the body through :meth:`chunks`."""

    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    buffered: bool = False
    """Part of the body (or its end) already came with the head."""

    def chunks(self) -> AsyncIterator[bytes]:  # pragma: no cover - interface
        raise NotImplementedError

    def close(self) -> None:  # pragma: no cover - interface
        raise NotImplementedError


class _Conn(asyncio.Protocol):
    """One connection to the upstream: an :class:`asyncio.Protocol` read with :meth:`read` (no stream
    objects in between); reading pauses while more than :data:`BUFFER_BYTES` wait to be read."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.buf = b""  # read, not yet parsed
        self.idle_since = 0.0
        self._pending: list[bytes] = []
        self._pending_bytes = 0
        self._eof = False
        self._error: Exception | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes > BUFFER_BYTES and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def eof_received(self) -> bool | None:
        self._eof = True
        self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._eof = True
        self._error = exc
        self._wake()

    def _wake(self) -> None:
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def read(self) -> bytes:
        """What arrived since the last read (waiting for it); ``b""`` at the end of the stream."""
        while not self._pending:
            if self._eof:
                if self._error is not None:
                    raise ConnectionResetError(str(self._error) or type(self._error).__name__)
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        data = self._pending[0] if len(self._pending) == 1 else b"".join(self._pending)
        self._pending.clear()
        self._pending_bytes = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return data

    def write(self, data: bytes) -> None:
        if self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the connection is closed")
        self.transport.write(data)

    def usable(self) -> bool:
        return (
            not self.buf
            and not self._pending  # nothing unasked-for arrived
            and not self._eof
            and self.transport is not None
            and not self.transport.is_closing()
            and (not self.idle_since or time.monotonic() - self.idle_since < IDLE_SECONDS)
        )

    def close(self) -> None:
        if self.transport is not None:
            with contextlib.suppress(Exception):
                self.transport.close()


class _LeanResponse(UpstreamResponse):
    """A response read off a kept-alive connection, framed by ``Content-Length``, ``chunked`` or the close."""

    def __init__(self, pool: LeanUpstream, conn: _Conn, head: ResponseHead, method: str) -> None:
        self._pool = pool
        self._conn: _Conn | None = conn
        self.status = head.status
        self.reason = head.reason
        self.headers = CIMultiDictProxy(CIMultiDict(head.headers))
        self._keep_alive = head.keep_alive
        self._left = 0
        self._decoder: ChunkedDecoder | None = None
        self._to_close = False
        self._done = False
        self._extra = False  # bytes beyond the response arrived: the connection is not reused
        if method == "HEAD" or head.status in (204, 304) or head.status < 200:
            self._done = True
        elif head.chunked:
            self._decoder = ChunkedDecoder()
        elif head.content_length is not None:
            self._left = head.content_length
            self._done = not self._left
        else:
            self._to_close = True
            self._keep_alive = False
        rest, conn.buf = conn.buf, b""
        self._first = self._take(rest) if rest and not self._done else []
        if rest and self._done and not self._first:
            self._extra = True
        self.buffered = bool(self._first) or self._done

    def _take(self, data: bytes) -> list[bytes]:
        if self._decoder is not None:
            try:
                pieces, used = self._decoder.feed(data)
            except WireError as exc:
                raise UpstreamBroken(exc.kind) from None
            if self._decoder.done:
                self._done = True
                self._extra = used < len(data)
            return pieces
        if self._to_close:
            return [data]
        piece = data[: self._left]
        self._left -= len(piece)
        if not self._left:
            self._done = True
            self._extra = len(data) > len(piece)
        return [piece] if piece else []

    async def chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        for chunk in self._first:
            yield chunk
        self._first = []
        while not self._done:
            try:
                data = await conn.read()
            except (ConnectionError, OSError) as exc:
                raise UpstreamBroken(type(exc).__name__) from None
            if not data:
                if self._to_close:
                    self._done = True
                    return
                raise UpstreamBroken("the upstream closed the connection before the end of the body")
            for piece in self._take(data):
                yield piece

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        self._pool._release(conn, reuse=self._done and self._keep_alive and not self._extra)


class LeanUpstream:
    """Keep-alive connections to one ``http://`` upstream, at most ``limit`` in use at once."""

    def __init__(self, url: str, *, connect_timeout: float, limit: int) -> None:
        parts = urlsplit(url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.host_header = parts.netloc.rpartition("@")[2]
        self.connect_timeout = connect_timeout
        self._idle: deque[_Conn] = deque()
        self._slots = asyncio.Semaphore(limit)
        self._closed = False

    async def _connect(self) -> _Conn:
        try:
            _transport, conn = await asyncio.wait_for(
                asyncio.get_running_loop().create_connection(_Conn, self.host, self.port), self.connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            raise UpstreamUnreachable(f"cannot connect ({type(exc).__name__})") from None
        return conn

    def _release(self, conn: _Conn, *, reuse: bool) -> None:
        if reuse and not self._closed and len(self._idle) < IDLE_CONNECTIONS and conn.usable():
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
        self._slots.release()

    async def request(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> UpstreamResponse:
        send = [("Host", self.host_header), *headers]
        if body or method in ("POST", "PUT", "PATCH"):
            send.append(("Content-Length", str(len(body))))
        try:
            data = request_bytes(method, target, send, body)
        except WireError as exc:
            raise UpstreamUnreachable(f"cannot send the request ({exc.kind})") from None
        await self._slots.acquire()
        try:
            for attempt in (0, 1):
                conn, reused = None, False
                while self._idle:
                    candidate = self._idle.pop()
                    if candidate.usable():
                        conn, reused = candidate, True
                        break
                    candidate.close()
                if conn is None:
                    conn = await self._connect()
                try:
                    return await self._exchange(conn, method, data)
                except _Stale:
                    conn.close()
                    if not reused or attempt or method not in RETRIED_METHODS:
                        raise UpstreamUnreachable("the upstream closed the connection") from None
                except BaseException:
                    conn.close()
                    raise
            raise UpstreamUnreachable("unreachable")  # not reached
        except BaseException:
            self._slots.release()
            raise

    async def _exchange(self, conn: _Conn, method: str, data: bytes) -> UpstreamResponse:
        got_bytes = False
        try:
            conn.write(data)
            buf = b""
            while True:
                end = buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        raise UpstreamUnreachable("the upstream's response head is too large")
                    chunk = await conn.read()
                    if not chunk:
                        if not got_bytes:
                            raise _Stale
                        raise UpstreamUnreachable("the upstream closed the connection before its response head")
                    got_bytes = True
                    buf += chunk
                    continue
                try:
                    head = parse_response_head(buf[:end])
                except WireError as exc:
                    raise UpstreamUnreachable(f"bad response from the upstream ({exc.kind})") from None
                buf = buf[end + 4 :]
                if 100 <= head.status < 200:
                    if head.status == 101:
                        raise UpstreamUnreachable("unexpected protocol switch from the upstream")
                    continue  # an interim response: the real one follows
                conn.buf = buf
                return _LeanResponse(self, conn, head, method)
        except (ConnectionError, BrokenPipeError) as exc:
            if not got_bytes:
                raise _Stale from None
            raise UpstreamUnreachable(type(exc).__name__) from None

    async def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()


H11Upstream = LeanUpstream
"""The former name (the client parsed with h11 before :mod:`collectors.http_wire`)."""


class _Stale(Exception):
    """A connection gave no byte back (closed by the upstream while it sat idle)."""


class _AiohttpResponse(UpstreamResponse):
    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.reason = response.reason or ""
        self.headers = response.headers

    async def chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except aiohttp.ClientPayloadError as exc:
            raise UpstreamBroken(str(exc)) from None

    def close(self) -> None:
        self._response.close()


class AiohttpUpstream:
    """aiohttp's client behind the same interface (``https://`` upstreams)."""

    def __init__(self, session: aiohttp.ClientSession, url: str) -> None:
        self._session = session
        self._url = url

    async def request(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> UpstreamResponse:
        parts = urlsplit(self._url)
        url = f"{parts.scheme}://{parts.netloc}{target}"
        try:
            response = await self._session.request(
                method,
                url,
                headers=headers,
                data=body if body else None,
                allow_redirects=False,
                skip_auto_headers=("User-Agent", "Content-Type", "Accept"),
            )
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise UpstreamUnreachable(type(exc).__name__) from None
        return _AiohttpResponse(response)

    async def close(self) -> None:
        pass  # the session is closed by its owner


def upstream_client(
    url: str, session: aiohttp.ClientSession, *, connect_timeout: float, limit: int
) -> LeanUpstream | AiohttpUpstream:
    """The lean client for ``http://`` upstreams, aiohttp's for ``https://``."""
    if urlsplit(url).scheme == "http":
        return LeanUpstream(url, connect_timeout=connect_timeout, limit=limit)
    return AiohttpUpstream(session, url)
