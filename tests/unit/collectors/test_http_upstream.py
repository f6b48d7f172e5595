"""The proxy's lean upstream client (collectors/http_upstream.py) against a raw HTTP/1.1 server on a socket."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

import pytest

from collectors import http_upstream as upstream_module
from collectors.http_upstream import H11Upstream, UpstreamBroken, UpstreamUnreachable

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":", 1)[1])
    return head, await reader.readexactly(length)


def run(handler: Handler, scenario: Callable[[H11Upstream, list[int]], Awaitable[None]]) -> list[int]:
    """Serve ``handler`` on a free port and run ``scenario``; returns the connection count in a list."""
    connections = [0]

    async def main() -> None:
        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            connections[0] += 1
            try:
                await handler(reader, writer)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = H11Upstream(f"http://127.0.0.1:{port}/mcp", connect_timeout=5, limit=8)
        try:
            await asyncio.wait_for(scenario(client, connections), 20)
        finally:
            await client.close()
            server.close()

    asyncio.run(main())
    return connections


async def body_of(client: H11Upstream, method: str = "POST", body: bytes = b"{}") -> tuple[int, bytes, dict[str, str]]:
    response = await client.request(method, "/mcp", [("Content-Type", "application/json")], body)
    try:
        data = b"".join([chunk async for chunk in response.chunks()])
        return response.status, data, dict(response.headers)
    finally:
        response.close()


async def echo_forever(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while True:
        head, body = await read_request(reader)
        assert head.startswith(b"POST /mcp HTTP/1.1\r\n") and b"\r\nHost: 127.0.0.1:" in head
        writer.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nMcp-Session-Id: s-1\r\n"
            + b"Content-Length: %d\r\n\r\n" % len(body)
            + body
        )
        await writer.drain()


def test_keep_alive_one_connection_for_many_requests_and_header_case_kept() -> None:
    async def scenario(client: H11Upstream, _connections: list[int]) -> None:
        for i in range(20):
            status, data, headers = await body_of(client, body=b'{"id":%d}' % i)
            assert (status, data) == (200, b'{"id":%d}' % i)
            assert headers["Mcp-Session-Id"] == "s-1"  # as the upstream spelled it

    assert run(echo_forever, scenario) == [1]


async def once_then_close(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    await read_request(reader)
    writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    await writer.drain()
    # keep-alive was not refused, but the connection is closed right after: a stale idle connection


def test_a_connection_the_upstream_closed_while_idle_is_replaced() -> None:
    async def scenario(client: H11Upstream, _connections: list[int]) -> None:
        for _ in range(5):
            assert (await body_of(client))[:2] == (200, b"ok")
            await asyncio.sleep(0.05)  # the upstream's close has arrived: the connection is not reused

    assert run(once_then_close, scenario) == [5]


def test_idempotent_requests_are_retried_on_a_stale_connection_posts_never() -> None:
    async def scenario(client: H11Upstream, _connections: list[int]) -> None:
        for _ in range(5):  # at once, before the close arrives: GET is sent again on a new connection
            assert (await body_of(client, "GET", b""))[:2] == (200, b"ok")
        posts, unreachable = 0, 0
        for _ in range(5):
            try:
                await body_of(client)
                posts += 1
            except UpstreamUnreachable:
                unreachable += 1  # never sent twice: a 502 for the client instead
        assert posts + unreachable == 5 and posts >= 1

    connections = run(once_then_close, scenario)
    assert 6 <= connections[0] <= 10


def test_a_connection_idle_too_long_is_not_reused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(upstream_module, "IDLE_SECONDS", 0.05)

    async def scenario(client: H11Upstream, _connections: list[int]) -> None:
        for _ in range(3):
            assert (await body_of(client))[:2] == (200, b"{}")
            await asyncio.sleep(0.1)

    assert run(echo_forever, scenario) == [3]


def test_a_response_broken_off_raises_and_the_connection_is_not_reused() -> None:
    async def short(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
        await writer.drain()

    async def scenario(client: H11Upstream, _connections: list[int]) -> None:
        response = await client.request("POST", "/mcp", [], b"{}")
        got = []
        with pytest.raises(UpstreamBroken):
            async for chunk in response.chunks():
                got.append(chunk)
        response.close()
        assert b"".join(got) == b"0123456789"
        with pytest.raises(UpstreamBroken):  # a new connection, broken off again
            await body_of(client)

    assert run(short, scenario) == [2]


def test_an_sse_stream_is_handed_out_as_it_arrives() -> None:
    release = asyncio.Event()

    async def sse(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head, _ = await read_request(reader)
        assert head.startswith(b"GET /mcp ") and b"content-length" not in head.lower()
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
        writer.write(b"8\r\ndata: 1\n\r\n")
        await writer.drain()
        await release.wait()
        writer.write(b"8\r\ndata: 2\n\r\n0\r\n\r\n")
        await writer.drain()
        await asyncio.sleep(0.5)

    async def scenario(client: H11Upstream, _connections: list[int]) -> None:
        response = await client.request("GET", "/mcp", [("Accept", "text/event-stream")], b"")
        assert response.headers["content-type"] == "text/event-stream"
        chunks = response.chunks()
        assert await anext(chunks) == b"data: 1\n"  # before the server sent the rest
        release.set()
        assert [c async for c in chunks] == [b"data: 2\n"]
        response.close()

    run(sse, scenario)


def test_an_unreachable_upstream_raises_unreachable() -> None:
    async def main() -> None:
        client = H11Upstream("http://127.0.0.1:9/mcp", connect_timeout=5, limit=2)
        for _ in range(3):  # the connection slot is given back each time
            with pytest.raises(UpstreamUnreachable):
                await client.request("POST", "/mcp", [], b"{}")

    asyncio.run(main())
