"""Incremental ``text/event-stream`` (SSE) parsing for the HTTP collector (:mod:`collectors.http_proxy`).

Pure: bytes in, complete :class:`SseEvent` objects out. The observer thread of the proxy feeds it
the chunks of an SSE response as the relay forwards them (:mod:`collectors.http_tracker`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = ["MAX_MESSAGE_BYTES", "SseEvent", "SseParser"]

MAX_MESSAGE_BYTES: Final = 16 * 1024 * 1024
"""The largest JSON body or SSE event the observer parses (larger ones are relayed, not observed)."""


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
