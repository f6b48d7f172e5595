"""Reading canonical JSONL event files: every bad line is reported with its number, never fatal."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from schemas import Event, EventError, event_from_json

MAX_LINE_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True)
class BadLine:
    line_no: int
    error: str

    def __str__(self) -> str:
        return f"line {self.line_no}: {self.error}"


def open_source(path: str) -> TextIO:
    """A path, or ``-`` for standard input."""
    if path == "-":
        return sys.stdin
    return Path(path).open(encoding="utf-8")


def read_events(stream: TextIO, from_line: int = 1) -> Iterator[tuple[int, Event | BadLine]]:
    """``(line number, event or error)`` for every non-blank line, in input order.

    Lines before ``from_line`` are skipped unread (not parsed, not reported); numbering stays that
    of the whole input, so a position reported by one run means the same line in the next.
    """
    for line_no, line in enumerate(stream, start=1):
        if line_no < from_line or not line.strip():
            continue
        if len(line) > MAX_LINE_BYTES:
            yield line_no, BadLine(line_no, f"line longer than {MAX_LINE_BYTES} bytes")
            continue
        try:
            yield line_no, event_from_json(line)
        except EventError as exc:
            yield line_no, BadLine(line_no, str(exc))
