"""Strict HTTP/1.1 request framing for the proxy's lean server (:mod:`collectors.http_lean`).

Pure: bytes in, a parsed request head or a :class:`WireError` out (the status to answer with and
the kind of failure, never the offending bytes). Only what an MCP client sends is accepted, and
everything ambiguous is refused rather than guessed (request smuggling):

* the head ends in ``CRLF CRLF``; lines end in ``CRLF`` only (a bare ``CR`` or ``LF`` is 400);
  no control characters but ``HTAB`` in values; no obsolete line folding; header names are
  RFC 9110 tokens with nothing between the name and the colon;
* request line ``METHOD SP origin-form SP HTTP/1.1`` (or ``HTTP/1.0``); the target starts with
  ``/`` and holds visible ASCII only;
* a request line or header line over ``max_line`` bytes, more than ``max_headers`` headers or a
  head over ``max_head`` bytes: 431;
* ``Transfer-Encoding`` together with ``Content-Length``, on HTTP/1.0, or with any coding but a
  single ``chunked``: 400 / 501; ``Content-Length`` values that are not digits or disagree: 400;
* chunked bodies: hex sizes without whitespace (extensions after ``;`` are ignored), ``CRLF``
  after every chunk, trailers read and dropped; a body over the limit: 413.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = [
    "ChunkedDecoder",
    "RequestHead",
    "ResponseHead",
    "WireError",
    "parse_request_head",
    "parse_response_head",
    "request_bytes",
]

_TOKEN: Final = re.compile(rb"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_CTL: Final = re.compile(rb"[\x00-\x08\x0a-\x1f\x7f]")
_TARGET: Final = re.compile(rb"/[\x21-\x7e]*")
_HEX: Final = re.compile(rb"[0-9A-Fa-f]{1,16}")


class WireError(Exception):
    """A request refused before it reaches the handler: ``status`` and a ``kind`` safe to log."""

    def __init__(self, status: int, kind: str) -> None:
        super().__init__(kind)
        self.status = status
        self.kind = kind


@dataclass(slots=True)
class RequestHead:
    method: str
    target: str
    version: bytes
    headers: list[tuple[str, str]]
    """As sent (names and values latin-1 decoded, values without surrounding whitespace)."""
    content_length: int | None
    chunked: bool
    keep_alive: bool
    expect_continue: bool


def _too_large() -> WireError:
    return WireError(431, "a request line or header over the size limit")


_FIELD: Final = r"([!#$%&'*+\-.^_`|~0-9A-Za-z]+):[ \t]*([^\x00-\x08\x0a-\x1f\x7f]*)\r\n"
_FIELDS: Final = re.compile(r"(?:[!#$%&'*+\-.^_`|~0-9A-Za-z]+:[^\x00-\x08\x0a-\x1f\x7f]*\r\n)*")
_FIELD_RE: Final = re.compile(_FIELD)  # greedy (a lazy value costs twice as much): trailing OWS stripped after
_FRAMING: Final = frozenset({"content-length", "transfer-encoding", "connection", "expect"})


def parse_request_head(head: bytes, *, max_line: int, max_headers: int) -> RequestHead:
    """Parse ``head`` (the bytes before the ``CRLF CRLF``, which the caller found)."""
    lines = head.split(b"\r\n")
    if len(lines) - 1 > max_headers or max(map(len, lines)) > max_line:
        raise _too_large()
    first, _, block = head.partition(b"\r\n")
    parts = first.split(b" ")
    if len(parts) != 3 or _TOKEN.fullmatch(parts[0]) is None:
        raise WireError(400, "malformed HTTP (request line)")
    method, target, version = parts
    if version not in (b"HTTP/1.1", b"HTTP/1.0"):
        raise WireError(505 if version.startswith(b"HTTP/") else 400, "unsupported HTTP version")
    if _TARGET.fullmatch(target) is None:
        raise WireError(400, "malformed HTTP (request target)")
    text = block.decode("latin-1") + "\r\n" if block else ""
    # every line a field (token, colon, value without controls but HTAB), nothing else: no bare CR
    # or LF, no folding, no space before the colon
    if _FIELDS.fullmatch(text) is None:
        raise WireError(400, "malformed HTTP (header line)")
    headers = [(name, value.rstrip(" \t")) for name, value in _FIELD_RE.findall(text)]
    lengths: list[str] = []
    codings: list[str] = []
    connection: list[str] = []
    expect = False
    for name, value in headers:
        lower = name.lower()
        if lower not in _FRAMING:
            continue
        if lower == "content-length":
            lengths.append(value)
        elif lower == "transfer-encoding":
            codings.append(value)
        elif lower == "connection":
            connection.append(value.lower())
        else:
            if value.lower() != "100-continue":
                raise WireError(417, "an unsupported Expect header")
            expect = True
    content_length: int | None = None
    chunked = False
    if codings:
        if lengths or version == b"HTTP/1.0":
            raise WireError(400, "malformed HTTP (ambiguous body framing)")
        if ",".join(codings).strip(" \t").lower() != "chunked":
            raise WireError(501, "an unsupported Transfer-Encoding")
        chunked = True
    elif lengths:
        values = {v.strip(" \t") for joined in lengths for v in joined.split(",")}
        if len(values) != 1:
            raise WireError(400, "malformed HTTP (conflicting Content-Length)")
        (only,) = values
        if not (only.isascii() and only.isdigit()) or len(only) > 18:
            raise WireError(400, "malformed HTTP (Content-Length)")
        content_length = int(only)
    keep_alive = version == b"HTTP/1.1" and "close" not in {t.strip() for v in connection for t in v.split(",")}
    return RequestHead(
        method.decode("ascii"),
        target.decode("ascii"),
        version,
        headers,
        content_length,
        chunked,
        keep_alive,
        expect,
    )


class ChunkedDecoder:
    """Incremental strict ``chunked`` body decoding (see the module); trailers are dropped."""

    __slots__ = ("_buf", "_left", "_state", "_trailer_bytes", "done", "max_line")

    def __init__(self, max_line: int = 4096) -> None:
        self.max_line = max_line
        self.done = False
        self._buf = bytearray()
        self._state = 0  # 0: size line, 1: data, 2: CRLF after data, 3: trailers
        self._left = 0
        self._trailer_bytes = 0

    def feed(self, data: bytes | bytearray) -> tuple[list[bytes], int]:
        """Decode what ``data`` completes: the body pieces and how many bytes of ``data`` were used
        (after the last chunk, the rest belongs to the next request)."""
        buf = self._buf
        buf += data
        out: list[bytes] = []
        pos = 0
        while not self.done:
            if self._state == 0 or self._state == 3:
                end = buf.find(b"\r\n", pos)
                if end < 0:
                    if len(buf) - pos > self.max_line:
                        raise WireError(400, "malformed HTTP (chunk size line)")
                    break
                line = bytes(buf[pos:end])
                pos = end + 2
                if self._state == 3:
                    self._trailer_bytes += len(line) + 2
                    if self._trailer_bytes > 16 * self.max_line:
                        raise WireError(431, "trailers over the size limit")
                    if _CTL.search(line) is not None:
                        raise WireError(400, "malformed HTTP (trailer)")
                    if not line:
                        self.done = True
                    continue
                size = line.split(b";", 1)[0]
                if _HEX.fullmatch(size) is None or _CTL.search(line) is not None:
                    raise WireError(400, "malformed HTTP (chunk size)")
                self._left = int(size, 16)
                self._state = 1 if self._left else 3
            elif self._state == 1:
                take = min(self._left, len(buf) - pos)
                if take <= 0:
                    break
                out.append(bytes(buf[pos : pos + take]))
                pos += take
                self._left -= take
                if not self._left:
                    self._state = 2
            else:
                if len(buf) - pos < 2:
                    break
                if buf[pos : pos + 2] != b"\r\n":
                    raise WireError(400, "malformed HTTP (chunk end)")
                pos += 2
                self._state = 0
        if self.done:
            rest = len(buf) - pos  # bytes after the body: the start of the next request
            buf.clear()
            return out, len(data) - rest
        del buf[:pos]
        return out, len(data)


@dataclass(slots=True)
class ResponseHead:
    status: int
    reason: str
    headers: list[tuple[str, str]]
    content_length: int | None
    chunked: bool
    keep_alive: bool


_STATUS_LINE: Final = re.compile(rb"HTTP/1\.([01]) ([1-9][0-9]{2})(?: ([\t\x20-\x7e\x80-\xff]*))?")


def parse_response_head(head: bytes, *, max_headers: int = 256) -> ResponseHead:
    """Parse an upstream's response head (the bytes before its ``CRLF CRLF``) as strictly as a request's."""
    lines = head.split(b"\r\n")
    if len(lines) - 1 > max_headers:
        raise WireError(502, "too many headers in the response")
    if _CTL.search(head.replace(b"\r\n", b"")) is not None:
        raise WireError(502, "a control character in the response head")
    status_line = _STATUS_LINE.fullmatch(lines[0])
    if status_line is None:
        raise WireError(502, "a malformed status line")
    minor, code, reason = status_line.groups()
    headers: list[tuple[str, str]] = []
    lengths: list[bytes] = []
    codings: list[bytes] = []
    close = minor == b"0"
    for line in lines[1:]:
        name, colon, value = line.partition(b":")
        if not colon or _TOKEN.fullmatch(name) is None:
            raise WireError(502, "a malformed header line in the response")
        value = value.strip(b" \t")
        lower = name.lower()
        if lower == b"content-length":
            lengths.append(value)
        elif lower == b"transfer-encoding":
            codings.append(value)
        elif lower == b"connection":
            tokens = {t.strip().lower() for t in value.split(b",")}
            if b"close" in tokens:
                close = True
            elif minor == b"0" and b"keep-alive" in tokens:
                close = False
        headers.append((name.decode("latin-1"), value.decode("latin-1")))
    content_length: int | None = None
    chunked = False
    if codings:
        if lengths:
            raise WireError(502, "ambiguous response framing")
        if b",".join(codings).strip(b" \t").lower() != b"chunked":
            raise WireError(502, "an unsupported transfer coding in the response")
        chunked = True
    elif lengths:
        values = {v.strip(b" \t") for joined in lengths for v in joined.split(b",")}
        if len(values) != 1:
            raise WireError(502, "conflicting Content-Length in the response")
        (only,) = values
        if not only.isdigit() or len(only) > 18:
            raise WireError(502, "a malformed Content-Length in the response")
        content_length = int(only)
    return ResponseHead(int(code), (reason or b"").decode("latin-1"), headers, content_length, chunked, not close)


def request_bytes(method: str, target: str, headers: list[tuple[str, str]], body: bytes) -> bytes:
    """A request to send (``Content-Length`` framed); refuses anything that could split the head."""
    lines = [f"{method} {target} HTTP/1.1", *(f"{name}: {value}" for name, value in headers)]
    try:
        raw = [line.encode("latin-1") for line in lines]
    except UnicodeEncodeError:
        raise WireError(502, "a header that is not latin-1") from None
    if _CTL.search(b"".join(raw)) is not None or " " in target:
        raise WireError(502, "a control character in the request head")
    return b"\r\n".join(raw) + b"\r\n\r\n" + body
