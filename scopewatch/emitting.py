"""One event built from command-line fields, printed and published: ``scopewatch emit`` and
``scopewatch policy publish`` share it (neither CLI module imports the other)."""

from __future__ import annotations

import asyncio
import re
import sys
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

import typer

__all__ = ["emit_event", "parse_when"]


def _fail(command: str, message: str, code: int = 2) -> NoReturn:
    sys.stderr.write(f"scopewatch {command}: error: {message}\n")
    raise typer.Exit(code)


def _settings() -> Any:
    from stream_jobs.runtime.settings import load_settings

    return load_settings()


_RELATIVE = re.compile(r"([+-])(\d+(?:\.\d+)?)([smhd])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_when(value: str, now: datetime) -> datetime:
    """RFC 3339, ``now``, or ``+8h`` / ``-5m`` / ``+30s`` / ``+2d`` relative to ``now``."""
    from schemas import parse_timestamp

    text = value.strip()
    if text == "now":
        return now
    m = _RELATIVE.fullmatch(text)
    if m:
        seconds = float(m[2]) * _UNITS[m[3]]
        return now + timedelta(seconds=seconds if m[1] == "+" else -seconds)
    return parse_timestamp(text)


def emit_event(fields: dict[str, Any], times: dict[str, str | None], dry_run: bool, command: str = "emit") -> None:
    """Build, print and (unless ``dry_run``) publish one event; fields of ``times`` are parsed first."""
    from collectors.intake import blank_identity_fields, token_id_problem
    from schemas import EventError, parse_event, to_canonical_json, topic_for

    blank = blank_identity_fields(fields)
    if blank:
        _fail(command, f"--{blank[0].replace('_', '-')} must not be empty or whitespace")
    auth = fields.get("auth")
    token_id = auth.get("token_id") if isinstance(auth, dict) else None
    if token_id is not None:
        problem = token_id_problem(token_id)
        if problem is not None:
            _fail(command, f"--auth-token-id {problem}")
    now = datetime.now(UTC)
    try:
        for name, text in times.items():
            fields[name] = None if text is None else parse_when(text, now)
        event = parse_event({**fields, "event_id": fields.get("event_id") or str(uuid.uuid4())})
    except (ValueError, EventError) as exc:
        _fail(command, str(exc))
    print(to_canonical_json(event), flush=True)
    if dry_run:
        return
    settings = _settings()
    topic = topic_for(event, settings.topics)
    try:
        asyncio.run(_publish(settings, event))
    except Exception as exc:  # noqa: BLE001 - any failure to publish is reported the same way
        _fail(command, f"not published to {topic} ({settings.kafka_bootstrap}): {type(exc).__name__}: {exc}", 1)
    sys.stderr.write(f"scopewatch {command}: published {event.event_type} {event.event_id} to {topic}\n")


async def _publish(settings: Any, event: Any) -> None:
    from scopewatch.publish import publish_events

    # waits for Kafka as `publish` and the services do (SCOPEWATCH_KAFKA_WAIT_SECONDS), then gives up
    await publish_events(
        settings.kafka_bootstrap, settings.topics, [(1, event)], wait_seconds=settings.kafka_wait_seconds
    )
