"""The proxy's client side: requests to the upstream MCP endpoint (:mod:`collectors.http_proxy`).

For an ``http://`` upstream, a lean HTTP/1.1 client: a pool of keep-alive connections on asyncio
streams, framed and parsed by ``h11`` -- a fraction of the per-request work of aiohttp's client
(request objects, tracing, timers), which was most of what the proxy added to a call. For
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
import h11
from multidict import CIMultiDict, CIMultiDictProxy

__all__ = [
    "AiohttpUpstream",
    "H11Upstream",
    "UpstreamBroken",
    "UpstreamResponse",
    "UpstreamUnreachable",
    "upstream_client",
]

READ_BYTES = 1 << 16
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


class _Conn:
    __slots__ = ("h11", "idle_since", "reader", "writer")

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.h11 = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD_BYTES)
        self.idle_since = 0.0

    def usable(self) -> bool:
        return (
            not self.writer.transport.is_closing()
            and not self.reader.at_eof()
            and not self.reader._buffer  # type: ignore[attr-defined]  # nothing unasked-for arrived
            and (not self.idle_since or time.monotonic() - self.idle_since < IDLE_SECONDS)
        )

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.writer.close()


class _H11Response(UpstreamResponse):
    def __init__(self, pool: H11Upstream, conn: _Conn, head: h11.Response, first: list[bytes]) -> None:
        self._pool = pool
        self._conn: _Conn | None = conn
        self.status = head.status_code
        self.reason = head.reason.decode("latin-1")
        self.headers = CIMultiDictProxy(
            CIMultiDict((name.decode("latin-1"), value.decode("latin-1")) for name, value in head.headers.raw_items())
        )
        self._first = first
        self._done = False
        self.buffered = bool(first)

    async def chunks(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        for chunk in self._first:
            yield chunk
        self._first = []
        if self._done:
            return
        while True:
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as exc:
                raise UpstreamBroken(str(exc)) from None
            if event is h11.NEED_DATA:
                try:
                    data = await conn.reader.read(READ_BYTES)
                except (ConnectionError, OSError) as exc:
                    raise UpstreamBroken(type(exc).__name__) from None
                conn.h11.receive_data(data)
                continue
            if isinstance(event, h11.Data):
                if event.data:
                    yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                self._done = True
                return
            else:  # ConnectionClosed before the end of the message, or something unexpected
                raise UpstreamBroken(type(event).__name__)

    def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if self._done and conn.h11.our_state is h11.DONE and conn.h11.their_state is h11.DONE:
            try:
                conn.h11.start_next_cycle()
            except h11.LocalProtocolError:
                self._pool._release(conn, reuse=False)
                return
            self._pool._release(conn, reuse=True)
        else:
            self._pool._release(conn, reuse=False)


class H11Upstream:
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
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(self.host, self.port, limit=READ_BYTES * 4), self.connect_timeout
            )
        except (OSError, TimeoutError) as exc:
            raise UpstreamUnreachable(f"cannot connect ({type(exc).__name__})") from None
        return _Conn(reader, writer)

    def _release(self, conn: _Conn, *, reuse: bool) -> None:
        if reuse and not self._closed and len(self._idle) < IDLE_CONNECTIONS and conn.usable():
            conn.idle_since = time.monotonic()
            self._idle.append(conn)
        else:
            conn.close()
        self._slots.release()

    async def request(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> UpstreamResponse:
        await self._slots.acquire()
        try:
            send = [("Host", self.host_header), *headers]
            if body or method in ("POST", "PUT", "PATCH"):
                send.append(("Content-Length", str(len(body))))
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
                    return await self._exchange(conn, method, target, send, body)
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

    async def _exchange(
        self, conn: _Conn, method: str, target: str, headers: list[tuple[str, str]], body: bytes
    ) -> UpstreamResponse:
        c = conn.h11
        try:
            data = c.send(h11.Request(method=method, target=target, headers=headers))
            if body:
                data += c.send(h11.Data(data=body))
            data += c.send(h11.EndOfMessage())
        except h11.LocalProtocolError as exc:
            raise UpstreamUnreachable(f"cannot send the request ({exc})") from None
        got_bytes = False
        try:
            conn.writer.write(data)
            first: list[bytes] = []
            while True:
                event = c.next_event()
                if event is h11.NEED_DATA:
                    chunk = await conn.reader.read(READ_BYTES)
                    if chunk:
                        got_bytes = True
                    elif not got_bytes:
                        raise _Stale
                    c.receive_data(chunk)
                    continue
                if isinstance(event, h11.InformationalResponse):
                    continue
                if isinstance(event, h11.Response):
                    # what came with the head is handed out first
                    while True:
                        more = c.next_event()
                        if isinstance(more, h11.Data):
                            if more.data:
                                first.append(bytes(more.data))
                            continue
                        break
                    response = _H11Response(self, conn, event, first)
                    if isinstance(more, h11.EndOfMessage):
                        response._done = response.buffered = True  # the whole body came with the head
                    elif more is not h11.NEED_DATA:
                        raise UpstreamUnreachable(f"unexpected {type(more).__name__} from the upstream")
                    return response
                raise UpstreamUnreachable(f"unexpected {type(event).__name__} from the upstream")
        except (ConnectionError, BrokenPipeError) as exc:
            if not got_bytes:
                raise _Stale from None
            raise UpstreamUnreachable(type(exc).__name__) from None
        except h11.RemoteProtocolError as exc:
            if not got_bytes:
                raise _Stale from None
            raise UpstreamUnreachable(f"bad response from the upstream ({exc})") from None

    async def close(self) -> None:
        self._closed = True
        while self._idle:
            self._idle.pop().close()


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
) -> H11Upstream | AiohttpUpstream:
    """The lean client for ``http://`` upstreams, aiohttp's for ``https://``."""
    if urlsplit(url).scheme == "http":
        return H11Upstream(url, connect_timeout=connect_timeout, limit=limit)
    return AiohttpUpstream(session, url)
