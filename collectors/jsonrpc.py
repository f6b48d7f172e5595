"""JSON-RPC message helpers shared by the collectors (stdio observer, HTTP proxy, SDK middleware)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from typing import Any

import orjson

__all__ = ["each_message", "parse_message", "rpc_key"]

_LONG_DIGITS = re.compile(rb"[0-9]{19}")
"""A run of digits orjson might read as a float (integers beyond 64 bits): json reads those exactly."""
_LONG_TEXT = re.compile("[0-9]{19}")
_DIGITS = bytes(ord("d") if chr(c).isdigit() and c < 128 else ord(".") for c in range(256))
_LONG_RUN = b"d" * 19
"""Bytes translated through :data:`_DIGITS` hold this where the bytes hold a run of 19 ASCII digits
(what :data:`_LONG_DIGITS` finds; one ``translate`` and one substring search instead of a regex
tried at every position)."""


def parse_message(data: bytes | bytearray | str) -> Any:
    """A JSON text, parsed as ``json.loads`` parses it (ValueError if it is not JSON).

    orjson first (several times faster); ``json`` for what orjson reads differently or refuses:
    integers beyond 64 bits (orjson makes floats of them), ``NaN``/``Infinity``, lone surrogates.
    A message must never go unrecorded, or be recorded with other values, because of the parser.
    """
    if isinstance(data, str):
        long_digits = _LONG_TEXT.search(data) is not None
    else:
        long_digits = _LONG_RUN in data.translate(_DIGITS)
    if not long_digits:
        try:
            return orjson.loads(data)
        except orjson.JSONDecodeError:
            pass
    return json.loads(data)


def rpc_key(msg_id: Any) -> tuple[str, Any] | None:
    """The key of a JSON-RPC id: ids are strings or numbers, and 1 and "1" are different requests.
    None for a notification's (absent) id and for ids of any other type."""
    if isinstance(msg_id, bool) or msg_id is None:
        return None
    if isinstance(msg_id, (int, float)):
        return ("n", msg_id)
    if isinstance(msg_id, str):
        return ("s", msg_id)
    return None


def each_message(message: Any) -> Iterable[dict[str, Any]]:
    """A JSON-RPC message, or each message of a batch (anything that is not an object is skipped)."""
    if isinstance(message, dict):
        yield message
    elif isinstance(message, list):
        for item in message:
            if isinstance(item, dict):
                yield item
