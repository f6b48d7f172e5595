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


def parse_message(data: bytes | bytearray | str) -> Any:
    """A JSON text, parsed as ``json.loads`` parses it (ValueError if it is not JSON).

    orjson first (several times faster); ``json`` for what orjson reads differently or refuses:
    integers beyond 64 bits (orjson makes floats of them), ``NaN``/``Infinity``, lone surrogates.
    A message must never go unrecorded, or be recorded with other values, because of the parser.
    """
    long_digits = _LONG_TEXT.search(data) if isinstance(data, str) else _LONG_DIGITS.search(data)
    if long_digits is None:
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
