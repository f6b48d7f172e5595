"""JSON-RPC message helpers shared by the collectors (stdio observer, HTTP proxy, SDK middleware)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["each_message", "rpc_key"]


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
