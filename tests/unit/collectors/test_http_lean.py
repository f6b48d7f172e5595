"""The proxy's lean HTTP/1.1 server (collectors/http_lean.py) and its strict framing (collectors/http_wire.py),
driven over real loopback sockets with raw bytes."""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable

import pytest

from collectors.http_lean import LeanRequest, LeanResponse, LeanServer
from collectors.http_wire import ChunkedDecoder, WireError, parse_request_head, parse_response_head, request_bytes

Scenario = Callable[[int, list[LeanRequest]], Awaitable[None]]


async def echo(request: LeanRequest, response: LeanResponse) -> None:
    """Answers with the body it got, in pieces of unknown total length (so: chunked), or a fixed-length one."""
    if request.path in ("/fixed", "/later"):
        if request.path == "/later":
            await asyncio.sleep(0.2)  # the client's end of input arrives while its request is handled
        response.start(200, "OK", [("Content-Type", "text/plain")], len(request.body))
        await response.write(request.body)
    elif request.path == "/slow":
        response.start(200, "OK", [("Content-Type", "text/event-stream")], None)
        await response.send_head()
        await asyncio.sleep(30)
    else:
        response.start(200, "OK", [("Content-Type", "text/event-stream"), ("X-Method", request.method)], None)
        for i in range(0, len(request.body), 3):
            await response.write(request.body[i : i + 3])
    await response.finish()


def run(scenario: Scenario, caplog: pytest.LogCaptureFixture | None = None, **options: float) -> list[LeanRequest]:
    seen: list[LeanRequest] = []

    async def handler(request: LeanRequest, response: LeanResponse) -> None:
        seen.append(request)
        await echo(request, response)

    async def main() -> None:
        server = LeanServer(
            handler,
            log=logging.getLogger("test.lean"),
            max_header_bytes=1024,
            max_body_bytes=64,
            **options,  # type: ignore[arg-type]
        )
        port = await server.start("127.0.0.1", 0)
        try:
            await asyncio.wait_for(scenario(port, seen), 20)
        finally:
            await server.close(1.0)

    asyncio.run(main())
    return seen


async def exchange(port: int, data: bytes, *, until_close: bool = True, read: int = 1 << 16) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        if until_close:
            return await reader.read(-1)
        return await reader.read(read)
    finally:
        writer.close()


def post(path: str, body: bytes, *extra: str, version: str = "1.1") -> bytes:
    head = [f"POST {path} HTTP/{version}", "Host: x", f"Content-Length: {len(body)}", *extra, "", ""]
    return "\r\n".join(head).encode() + body


def test_keep_alive_and_pipelined_requests_are_answered_in_order() -> None:
    async def scenario(port: int, seen: list[LeanRequest]) -> None:
        data = post("/fixed", b"one") + post("/mcp?x=1", b"two-two") + post("/fixed", b"3", "Connection: close")
        got = await exchange(port, data)
        assert got.count(b"HTTP/1.1 200 OK\r\n") == 3
        first, second, third = got.split(b"HTTP/1.1 200 OK\r\n")[1:]
        assert first.endswith(b"Content-Length: 3\r\n\r\none")
        assert b"Transfer-Encoding: chunked\r\n" in second and b"X-Method: POST" in second
        assert second.endswith(b"\r\n\r\n3\r\ntwo\r\n3\r\n-tw\r\n1\r\no\r\n0\r\n\r\n")
        assert third.endswith(b"Connection: close\r\n\r\n3")
        assert [(r.path, r.query_string, r.body) for r in seen] == [
            ("/fixed", "", b"one"),
            ("/mcp", "x=1", b"two-two"),
            ("/fixed", "", b"3"),
        ]

    run(scenario)


def test_a_chunked_request_body_is_decoded_and_http10_is_close_delimited() -> None:
    async def scenario(port: int, seen: list[LeanRequest]) -> None:
        head = b"POST /fixed HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
        data = head + b"2;ext=1\r\nab\r\n1\r\nc\r\n0\r\nT: 1\r\n\r\n"
        got = await exchange(port, data, until_close=False)
        assert got.endswith(b"Content-Length: 3\r\n\r\nabc")
        got = await exchange(port, post("/mcp", b"hello", version="1.0"))
        assert b"Transfer-Encoding" not in got and b"Connection: close" in got and got.endswith(b"\r\n\r\nhello")
        assert [r.body for r in seen] == [b"abc", b"hello"]

    run(scenario)


BAD = {
    "TE and CL": (b"POST /mcp HTTP/1.1\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
    "two lengths": (b"POST /mcp HTTP/1.1\r\nContent-Length: 3\r\nContent-Length: 4\r\n\r\nabcd", 400),
    "signed length": (b"POST /mcp HTTP/1.1\r\nContent-Length: +3\r\n\r\nabc", 400),
    "gzip coding": (b"POST /mcp HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", 501),
    "bare LF": (b"POST /mcp HTTP/1.1\nHost: x\r\nContent-Length: 0\r\n\r\n", 400),
    "obs-fold": (b"POST /mcp HTTP/1.1\r\nX-A: 1\r\n  folded\r\nContent-Length: 0\r\n\r\n", 400),
    "space before colon": (b"POST /mcp HTTP/1.1\r\nContent-Length : 0\r\n\r\n", 400),
    "absolute form": (b"GET http://evil/mcp HTTP/1.1\r\n\r\n", 400),
    "bad chunk size": (b"POST /mcp HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n 2\r\nab\r\n0\r\n\r\n", 400),
    "HTTP/2 preface": (b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", 505),
    "body too large": (post("/mcp", b"x" * 65), 413),
    "chunked body too large": (
        b"POST /mcp HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n" + (b"20\r\n" + b"y" * 32 + b"\r\n") * 3,
        413,
    ),
    "unknown expect": (b"POST /mcp HTTP/1.1\r\nExpect: magic\r\nContent-Length: 0\r\n\r\n", 417),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_malformed_or_ambiguous_requests_are_refused_before_the_handler(
    case: str, caplog: pytest.LogCaptureFixture
) -> None:
    data, status = BAD[case]

    async def scenario(port: int, seen: list[LeanRequest]) -> None:
        got = await exchange(port, data)
        assert got.startswith(b"HTTP/1.1 %d " % status), got
        assert b"Connection: close" in got and got.rstrip().endswith(b"}")

    with caplog.at_level(logging.WARNING, "test.lean"):
        assert run(scenario) == []
    assert "refused a request from 127.0.0.1" in caplog.text


def test_an_oversized_header_is_431_and_none_of_it_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    secret = secrets.token_urlsafe(3000)

    async def scenario(port: int, seen: list[LeanRequest]) -> None:
        for data in (
            post("/mcp", b"{}", f"Authorization: Bearer {secret}"),  # whole head at once
            f"POST /mcp HTTP/1.1\r\nAuthorization: Bearer {secret}".encode(),  # never ends
            post("/mcp", b"{}", *[f"X-{i}: 1" for i in range(200)]),  # too many headers
        ):
            got = await exchange(port, data)
            assert got.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), got[:80]
            assert secret[:16].encode() not in got

    with caplog.at_level(logging.DEBUG):
        assert run(scenario) == []
    assert "over the size limit" in caplog.text
    for i in range(0, 2000, 16):
        assert secret[i : i + 16] not in caplog.text


def test_a_half_closed_client_gets_its_answer_then_the_connection_closes() -> None:
    async def scenario(port: int, seen: list[LeanRequest]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/later", b"bye"))
        writer.write_eof()
        got = await asyncio.wait_for(reader.read(), 5)  # the server closes after the answer, no keep-alive wait
        assert got.startswith(b"HTTP/1.1 200 OK") and got.endswith(b"\r\n\r\nbye")
        writer.close()

    run(scenario)


def test_expect_100_continue_is_answered_before_the_body() -> None:
    async def scenario(port: int, seen: list[LeanRequest]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /fixed HTTP/1.1\r\nContent-Length: 2\r\nExpect: 100-continue\r\n\r\n")
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(b"ok")
        assert (await reader.readuntil(b"ok")).startswith(b"HTTP/1.1 200 OK")
        writer.close()

    run(scenario)


def test_a_client_that_goes_away_cancels_its_handler_and_timeouts_close_connections() -> None:
    async def scenario(port: int, seen: list[LeanRequest]) -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(post("/slow", b""))
        assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200 OK")  # the head came at once
        writer.transport.abort()
        # a request that never completes: 408 after the request timeout
        got = await exchange(port, b"POST /mcp HTTP/1.1\r\nContent-Length: 10\r\n\r\nabc")
        assert got.startswith(b"HTTP/1.1 408 "), got
        # an idle keep-alive connection is closed after the keep-alive timeout
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 5) == b""
        writer.close()

    cancelled: list[bool] = []

    async def watch(port: int, seen: list[LeanRequest]) -> None:
        try:
            await scenario(port, seen)
        finally:
            cancelled.append(True)

    run(watch, request_timeout=0.3, keepalive_timeout=0.3)
    assert cancelled


def test_the_wire_helpers_refuse_what_would_split_or_blur_a_message() -> None:
    head = parse_request_head(
        b"GET /m HTTP/1.1\r\nX-T: \ta\tb \t\r\nY:\r\nConnection: Close", max_line=99, max_headers=9
    )
    assert head.headers == [("X-T", "a\tb"), ("Y", ""), ("Connection", "Close")] and not head.keep_alive
    for bad in (b"GET /m HTTP/1.1\r\nX: a\rb", b"GET /m HTTP/1.1\r\nX: a\x00", b"GET /m HTTP/1.1\r\nX: a\nY: b"):
        with pytest.raises(WireError):
            parse_request_head(bad, max_line=99, max_headers=9)
    with pytest.raises(WireError):
        request_bytes("POST", "/mcp", [("X-A", "1\r\nX-Injected: 2")], b"")
    with pytest.raises(WireError):
        request_bytes("POST", "/mcp x", [], b"")
    assert request_bytes("GET", "/m?a=1", [("Host", "h")], b"") == b"GET /m?a=1 HTTP/1.1\r\nHost: h\r\n\r\n"
    with pytest.raises(WireError):
        parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nTransfer-Encoding: chunked")
    head = parse_response_head(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nConnection: close")
    assert (head.status, head.keep_alive, head.content_length, head.chunked) == (200, False, None, False)
    decoder = ChunkedDecoder()
    assert decoder.feed(b"3\r\nab") == ([b"ab"], 5)
    assert decoder.feed(b"c\r\n0\r\n\r\nNEXT") == ([b"c"], 8)
    assert decoder.done


def test_the_relay_forwards_end_to_end_headers_and_says_who_asked() -> None:
    from collectors.http_proxy import HttpProxy, ProxyConfig
    from collectors.redact import Redactor

    proxy = HttpProxy(
        ProxyConfig(upstream="http://127.0.0.1:9/mcp"), emit=lambda _e: None, redactor=Redactor.ephemeral()
    )
    head = parse_request_head(
        b"POST /mcp HTTP/1.1\r\nHost: p:1\r\nConnection: keep-alive, X-Hop\r\nX-Hop: 1\r\nX-Forwarded-For: 10.0.0.1\r\n"
        b"Accept-Encoding: gzip\r\nTE: trailers\r\nMcp-Session-Id: s\r\nContent-Length: 0",
        max_line=999,
        max_headers=20,
    )
    assert proxy._request_headers(LeanRequest(head, b"", "127.0.0.1")) == [
        ("Mcp-Session-Id", "s"),
        ("Accept-Encoding", "identity"),
        ("X-Forwarded-For", "10.0.0.1, 127.0.0.1"),
        ("X-Forwarded-Proto", "http"),
        ("X-Forwarded-Host", "p:1"),
    ]
