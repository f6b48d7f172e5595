"""Command lines for running `scopewatch wrap` in tests."""

from __future__ import annotations

import sys

from scopewatch.stack.stack import settings_env
from stream_jobs.runtime.settings import Settings


def wrap_argv(
    server: list[str],
    *,
    session_id: str,
    principal: str | None = "alice@example.com",
    agent_id: str | None = "agent-1",
    tenant: str = "acme",
    extra: list[str] | None = None,
) -> list[str]:
    argv = [
        sys.executable,
        "-m",
        "scopewatch",
        "wrap",
        "--session-id",
        session_id,
        "--tenant",
        tenant,
        "--server",
        "everything",
        "--flush-timeout",
        "20",
    ]
    if principal:
        argv += ["--principal", principal]
    if agent_id:
        argv += ["--agent-id", agent_id]
    return argv + (extra or []) + ["--", *server]


def child_env(settings: Settings) -> dict[str, str]:
    return settings_env(settings)
