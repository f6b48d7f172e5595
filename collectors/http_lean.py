"""The proxy's lean HTTP/1.1 server: one :class:`asyncio.Protocol` per connection, strict framing.

aiohttp's web server costs a relayed MCP call several hundred microseconds of Python per request
(request and response objects, routing, the payload stream, timers), which was most of what
``scopewatch proxy`` added to a call. This server does only what the proxy needs: it reads one
request at a time (head parsed by :func:`collectors.http_wire.parse_request_head`, body by
``Content-Length`` or ``chunked``, whole, up to ``max_body_bytes``), hands it to the handler, and
writes the handler's response -- ``Content-Length`` framed when the length is known, else
``chunked`` (HTTP/1.1) or up to the close (HTTP/1.0), each piece as soon as the handler gives it,
never buffered whole. Keep-alive and pipelined requests are served in order.

Refusals (before the handler): a request line or header line over ``max_header_bytes``, too many
headers: 431; malformed or ambiguous framing: 400 (501 for an unknown transfer coding, 505 for an
unknown HTTP version, 417 for an unknown ``Expect``); a body over ``max_body_bytes``: 413. Each is
answered with a fixed JSON body, the connection closed, and one line logged naming the peer and
the kind of failure -- never a byte of the request (as :mod:`collectors.http_guard` does for aiohttp).

Timeouts: a request must arrive whole within ``request_timeout`` of its first byte (else 408 and
close); an idle keep-alive connection is closed after ``keepalive_timeout``. A client that goes
away while its request is handled cancels the handler task (like aiohttp's ``handler_cancellation``).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any, Final

from multidict import CIMultiDict

from collectors.http_wire import ChunkedDecoder, RequestHead, WireError, parse_request_head

__all__ = ["LeanRequest", "LeanResponse", "LeanServer"]

_REASONS: Final = {
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
    408: "Request Timeout",
    413: "Payload Too Large",
    417: "Expectation Failed",
    431: "Request Header Fields Too Large",
    500: "Internal Server Error",
    501: "Not Implemented",
    502: "Bad Gateway",
    505: "HTTP Version Not Supported",
}
_ERRORS: Final = {
    400: ("bad_request", "Malformed HTTP"),
    408: ("request_timeout", "The request did not arrive in time"),
    413: ("request_entity_too_large", "The request body is too large"),
    417: ("expectation_failed", "Unsupported Expect header"),
    431: ("request_header_fields_too_large", "A header is too large"),
    501: ("not_implemented", "Unsupported transfer coding"),
    505: ("http_version_not_supported", "HTTP/1.1 only"),
}
_NO_BODY: Final = frozenset({204, 304})
_READ_PAUSE_BYTES: Final = 1 << 20


class LeanRequest:
    __slots__ = ("body", "headers", "host", "method", "path", "query_string", "remote", "scheme")

    def __init__(self, head: RequestHead, body: bytes, remote: str) -> None:
        self.method = head.method
        path, _, query = head.target.partition("?")
        self.path, self.query_string = path, query
        self.headers: CIMultiDict[str] = CIMultiDict(head.headers)
        self.body = body
        self.remote = remote
        self.scheme = "http"
        self.host = self.headers.get("Host", "")


class LeanResponse:
    """What the handler writes to: :meth:`start`, any number of :meth:`write`, :meth:`finish`."""

    __slots__ = ("_chunked", "_conn", "_head", "_no_body", "finished", "started")

    def __init__(self, conn: _Connection) -> None:
        self._conn = conn
        self._head: bytes | None = None
        self._chunked = False
        self._no_body = False
        self.started = False
        self.finished = False

    def start(self, status: int, reason: str, headers: list[tuple[str, str]], length: int | None) -> None:
        """The status line and headers (sent with the first piece of the body, or at :meth:`finish`)."""
        conn = self._conn
        self.started = True
        lines = [f"HTTP/1.1 {status} {reason or _REASONS.get(status, 'Unknown')}"]
        lines += [f"{name}: {value}" for name, value in headers]
        self._no_body = status in _NO_BODY or status < 200 or conn.head_request
        if status in _NO_BODY or status < 200:
            pass
        elif length is not None:
            lines.append(f"Content-Length: {length}")
        elif conn.http11:
            lines.append("Transfer-Encoding: chunked")
            self._chunked = not self._no_body
        else:
            conn.keep_alive = False  # HTTP/1.0: the body ends with the connection
        if not conn.keep_alive:
            lines.append("Connection: close")
        self._head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def send_head(self) -> None:
        """Send the head now, without waiting for a piece of the body to send it with."""
        if self._head is not None:
            data, self._head = self._head, None
            await self._conn.send(data)

    async def write(self, chunk: bytes) -> None:
        if not chunk or self._no_body:
            return
        data = b"%x\r\n%b\r\n" % (len(chunk), chunk) if self._chunked else chunk
        if self._head is not None:
            data, self._head = self._head + data, None
        await self._conn.send(data)

    async def finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        data = b"0\r\n\r\n" if self._chunked else b""
        if self._head is not None:
            data, self._head = self._head + data, None
        if data:
            await self._conn.send(data)

    async def json(self, status: int, body: Any, headers: list[tuple[str, str]] | None = None) -> None:
        payload = json.dumps(body).encode()
        self.start(status, "", [("Content-Type", "application/json; charset=utf-8"), *(headers or [])], len(payload))
        await self.write(payload)
        await self.finish()

    def abort(self) -> None:
        """Drop the connection (the response cannot be completed)."""
        self._conn.keep_alive = False
        self._conn.abort()


Handler = Callable[[LeanRequest, LeanResponse], Awaitable[None]]


class _Connection(asyncio.Protocol):
    def __init__(self, server: LeanServer) -> None:
        self.server = server
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.remote = "?"
        self.buf = bytearray()
        self.head: RequestHead | None = None
        self.body: list[bytes] = []
        self.body_size = 0
        self.chunks: ChunkedDecoder | None = None
        self.continued = False
        self.task: asyncio.Task[None] | None = None
        self.deadline = 0.0  # loop time after which an idle or incomplete connection is dropped (0: none)
        self.keep_alive = True
        self.eof = False
        self.http11 = True
        self.head_request = False
        self.closed = False
        self.paused_reading = False
        self.drain: asyncio.Future[None] | None = None
        self.write_paused = False

    # -- asyncio callbacks -------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple) and peer:
            self.remote = str(peer[0])
        self.server.connections.add(self)
        self._arm(self.server.keepalive_timeout)

    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.buf and self.head is None and self.task is None:
            self._arm(self.server.request_timeout)  # the request's first bytes
        self.buf += data
        if self.task is None:
            self._advance()
        elif len(self.buf) > _READ_PAUSE_BYTES and not self.paused_reading and self.transport is not None:
            self.paused_reading = True  # pipelined requests pile up: wait for the current one
            self.transport.pause_reading()

    def eof_received(self) -> bool | None:
        self.eof = True
        self.keep_alive = False  # the client sends no more: close once it has its answer
        if self.task is None:
            self._close()
        return True  # a half-closed client still gets its answer

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.connections.discard(self)
        if self.task is not None and not self.task.done():
            self.task.cancel()
        if self.drain is not None and not self.drain.done():
            self.drain.set_exception(ConnectionResetError("the client went away"))

    def pause_writing(self) -> None:
        self.write_paused = True

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.drain is not None and not self.drain.done():
            self.drain.set_result(None)

    # -- writing -------------------------------------------------------------------------------------
    async def send(self, data: bytes) -> None:
        if self.closed or self.transport is None or self.transport.is_closing():
            raise ConnectionResetError("the client went away")
        self.transport.write(data)
        if self.write_paused:
            self.drain = self.loop.create_future()
            await self.drain

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _arm(self, seconds: float) -> None:
        # checked by the server's sweep (one timer for all connections, not one per request)
        self.deadline = self.loop.time() + seconds

    def timed_out(self) -> None:
        self.deadline = 0.0
        if self.task is not None or self.closed:
            return
        if self.buf or self.head is not None:
            self._refuse(WireError(408, "the request did not arrive in time"))
        else:
            self._close()  # idle keep-alive connection

    # -- reading -------------------------------------------------------------------------------------
    def _advance(self) -> None:
        """Parse what is buffered; start the handler once a whole request is in."""
        server = self.server
        try:
            if self.head is None:
                end = self.buf.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.buf) > server.max_head_bytes or (
                        len(self.buf) - (self.buf.rfind(b"\r\n") + 1) > server.max_header_bytes + 2
                    ):
                        raise WireError(431, "a request line or header over the size limit")
                    return
                if end > server.max_head_bytes:
                    raise WireError(431, "a request line or header over the size limit")
                head = parse_request_head(
                    bytes(self.buf[:end]), max_line=server.max_header_bytes, max_headers=server.max_headers
                )
                del self.buf[: end + 4]
                self.head = head
                self.http11 = head.version == b"HTTP/1.1"
                self.keep_alive = head.keep_alive and not self.eof
                self.head_request = head.method == "HEAD"
                if head.content_length is not None and head.content_length > server.max_body_bytes:
                    raise WireError(413, "a request body over the size limit")
                if head.chunked:
                    self.chunks = ChunkedDecoder()
                if head.expect_continue and self.http11 and (head.chunked or head.content_length):
                    if not self.buf and self.transport is not None:
                        self.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            head = self.head
            if self.chunks is not None:
                pieces, used = self.chunks.feed(self.buf)
                del self.buf[:used]
                for piece in pieces:
                    self.body_size += len(piece)
                    if self.body_size > server.max_body_bytes:
                        raise WireError(413, "a request body over the size limit")
                    self.body.append(piece)
                if not self.chunks.done:
                    return
                body = b"".join(self.body)
            else:
                length = head.content_length or 0
                if len(self.buf) < length:
                    return
                body = bytes(self.buf[:length])
                del self.buf[:length]
        except WireError as exc:
            self._refuse(exc)
            return
        self.head, self.chunks, self.body, self.body_size = None, None, [], 0
        self.deadline = 0.0
        self.task = self.loop.create_task(self._serve(LeanRequest(head, body, self.remote)))

    def _refuse(self, exc: WireError) -> None:
        self.server.log.warning("refused a request from %s: %s", self.remote, exc.kind)
        error, description = _ERRORS.get(exc.status, ("bad_request", "Malformed HTTP"))
        body = json.dumps({"error": error, "error_description": description}).encode()
        head = (
            f"HTTP/1.1 {exc.status} {_REASONS.get(exc.status, 'Error')}\r\n"
            f"Content-Type: application/json; charset=utf-8\r\nContent-Length: {len(body)}\r\n"
            "Connection: close\r\n\r\n"
        ).encode()
        if self.transport is not None and not self.closed:
            self.transport.write(head + body)
        self.buf.clear()
        self._close()

    async def _serve(self, request: LeanRequest) -> None:
        response = LeanResponse(self)
        try:
            await self.server.handler(request, response)
            if not response.finished:
                await response.finish()
        except asyncio.CancelledError:
            self.abort()
            return
        except (ConnectionError, OSError):
            self.abort()
            return
        except Exception as exc:
            self.server.log.error("error handling a request (%s)", type(exc).__name__, exc_info=True)
            if not response.started and not self.closed:
                self.keep_alive = False
                with contextlib.suppress(ConnectionError, OSError):
                    await response.json(500, {"error": "internal_error"})
            self.abort() if response.started else self._close()
            return
        finally:
            self.task = None
        if self.closed or not self.keep_alive or self.server.closing:
            self._close()
            return
        if self.paused_reading and self.transport is not None:
            self.paused_reading = False
            self.transport.resume_reading()
        if self.buf:
            self._arm(self.server.request_timeout)
            self._advance()
        else:
            self._arm(self.server.keepalive_timeout)


class LeanServer:
    """Serves ``handler`` on ``host:port`` (see the module)."""

    def __init__(
        self,
        handler: Handler,
        *,
        log: logging.Logger,
        max_header_bytes: int,
        max_body_bytes: int,
        max_headers: int = 128,
        keepalive_timeout: float = 75.0,
        request_timeout: float = 60.0,
    ) -> None:
        self.handler = handler
        self.log = log
        self.max_header_bytes = max_header_bytes
        self.max_head_bytes = 4 * max_header_bytes
        self.max_headers = max_headers
        self.max_body_bytes = max_body_bytes
        self.keepalive_timeout = keepalive_timeout
        self.request_timeout = request_timeout
        self.connections: set[_Connection] = set()
        self.closing = False
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self, host: str, port: int) -> int:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), host, port, reuse_address=True)
        self._sweeper = asyncio.create_task(self._sweep())
        return int(self._server.sockets[0].getsockname()[1])

    async def _sweep(self) -> None:
        """Drop connections past their deadline (incomplete requests, idle keep-alive connections)."""
        every = max(0.05, min(1.0, self.request_timeout / 4, self.keepalive_timeout / 4))
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(every)
            now = loop.time()
            for conn in list(self.connections):
                if conn.deadline and now >= conn.deadline:
                    conn.timed_out()

    async def close(self, timeout: float) -> None:
        """Stop accepting; let requests in progress finish for up to ``timeout`` s, then cancel them."""
        self.closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        if self._server is not None:
            self._server.close()
        for conn in list(self.connections):
            if conn.task is None:
                conn._close()
        tasks = [c.task for c in self.connections if c.task is not None]
        if tasks:
            _done, pending = await asyncio.wait(tasks, timeout=timeout)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending, timeout=1.0)
        for conn in list(self.connections):
            conn.abort()
