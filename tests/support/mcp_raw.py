"""A scripted raw JSON-RPC client for MCP stdio servers: sends exact bytes, records exact bytes."""

from __future__ import annotations

import json
import os
import select
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PROTOCOL = "2025-06-18"


def initialize(req_id: int = 0) -> dict[str, Any]:
    return {
        "jsonrpc": "2.0",
        "id": req_id,
        "method": "initialize",
        "params": {
            "protocolVersion": PROTOCOL,
            "capabilities": {},
            "clientInfo": {"name": "scopewatch-tests", "version": "1"},
        },
    }


INITIALIZED = {"jsonrpc": "2.0", "method": "notifications/initialized"}


def call(req_id: int | str, tool: str, arguments: dict[str, Any], meta: dict[str, Any] | None = None) -> dict[str, Any]:
    params: dict[str, Any] = {"name": tool, "arguments": arguments}
    if meta:
        params["_meta"] = meta
    return {"jsonrpc": "2.0", "id": req_id, "method": "tools/call", "params": params}


def encode(messages: Sequence[Any]) -> list[bytes]:
    return [json.dumps(m, separators=(",", ":")).encode() + b"\n" for m in messages]


@dataclass
class Transcript:
    sent: bytes
    received: bytes
    returncode: int | None
    stderr: bytes

    def messages(self) -> list[Any]:
        return [json.loads(line) for line in self.received.splitlines() if line.strip()]

    def responses(self) -> dict[Any, Any]:
        return {m["id"]: m for m in self.messages() if isinstance(m, dict) and "id" in m and "method" not in m}


def run_script(
    argv: Sequence[str],
    steps: Sequence[Any],
    *,
    env: dict[str, str] | None = None,
    timeout: float = 60.0,
    settle: float = 0.0,
) -> Transcript:
    """Send each step, waiting for the responses to its requests before the next step;
    then close stdin and collect the rest."""
    proc = subprocess.Popen(
        list(argv), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, bufsize=0
    )
    assert proc.stdin and proc.stdout and proc.stderr
    received = bytearray()
    sent = bytearray()
    deadline = time.monotonic() + timeout

    def pump(wait_for: set[Any]) -> None:
        buf_ids: set[Any] = set()
        while wait_for - buf_ids:
            if time.monotonic() > deadline:
                raise TimeoutError(f"no response for {wait_for - buf_ids}; got {bytes(received)[-2000:]!r}")
            ready, _, _ = select.select([proc.stdout], [], [], 0.5)
            if not ready:
                continue
            chunk = os.read(proc.stdout.fileno(), 1 << 16)
            if not chunk:
                raise EOFError(f"server closed stdout; stderr: {proc.stderr.read()[-2000:]!r}")
            received.extend(chunk)
            for line in bytes(received).splitlines():
                try:
                    msg = json.loads(line)
                except ValueError:
                    continue
                for m in msg if isinstance(msg, list) else [msg]:
                    if isinstance(m, dict) and "method" not in m and "id" in m:
                        buf_ids.add(m["id"])

    for step in steps:
        # a message (dict), a JSON-RPC batch (list, one line) or raw bytes sent as they are
        data = step if isinstance(step, bytes) else json.dumps(step, separators=(",", ":")).encode() + b"\n"
        proc.stdin.write(data)
        sent.extend(data)
        items = step if isinstance(step, list) else [step] if isinstance(step, dict) else []
        pump({m["id"] for m in items if isinstance(m, dict) and "method" in m and "id" in m})
    if settle:
        time.sleep(settle)
    proc.stdin.close()
    while True:  # read to EOF: the server exits once its stdin is closed
        chunk = os.read(proc.stdout.fileno(), 1 << 16)
        if not chunk:
            break
        received.extend(chunk)
    err = proc.stderr.read()
    proc.wait(timeout=max(5.0, deadline - time.monotonic()))
    return Transcript(bytes(sent), bytes(received), proc.returncode, err)
