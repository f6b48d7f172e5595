"""``scopewatch redact-test FILE``: what the collectors would store for an input, and which detectors fired.

Operators check their own secret formats with it before they rely on the collectors: the input
(a JSON value, or any other text) goes through the same :class:`~collectors.redact.Redactor`
the collectors of this host use -- the same extra patterns and argument names
(``SCOPEWATCH_REDACT_PATTERNS``, ``SCOPEWATCH_REDACT_ARGUMENTS``) and, when the host has one,
the same key, so the fingerprints can be compared with stored ones. Without a key (neither
``SCOPEWATCH_REDACTION_KEY`` nor the host key file) a throw-away key is used and no key file is
created. The input itself is never printed.
"""

from __future__ import annotations

import json
import secrets
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

MAX_INPUT_BYTES = 4 * 1024 * 1024


def _fail(message: str) -> None:
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(2)


def _read(source: str) -> str:
    try:
        if source == "-":
            data = sys.stdin.buffer.read(MAX_INPUT_BYTES + 1)
        else:
            with Path(source).open("rb") as f:
                data = f.read(MAX_INPUT_BYTES + 1)
    except OSError as exc:
        _fail(f"cannot read {source}: {exc.strerror or exc}")
    if len(data) > MAX_INPUT_BYTES:
        _fail(f"{source} is larger than {MAX_INPUT_BYTES} bytes")
    return data.decode("utf-8", "replace")


def redact_test(
    source: Annotated[str, typer.Argument(metavar="FILE", help="a JSON value or text; - reads standard input")],
    text: Annotated[bool, typer.Option("--text", help="treat the input as text even if it is JSON")] = False,
    fmt: Annotated[str, typer.Option("--format", help="text (the redacted input, then the detectors) or json")] = (
        "text"
    ),
) -> None:
    """Show what the collectors would store for FILE, and the detectors that fired."""
    from pydantic import SecretStr

    from collectors.config import CollectorConfig, ConfigError
    from collectors.redact import Redacted, Redactor

    if fmt not in ("text", "json"):
        _fail("--format must be text or json")
    raw = _read(source)
    try:
        config = CollectorConfig.from_env()
        throwaway = config.redaction_key is None and not config.key_path.exists()
        if throwaway:  # no host key: create none, fingerprints of this run only
            config = config.model_copy(update={"redaction_key": SecretStr(secrets.token_hex(32))})
        redactor: Redactor = config.redactor()
    except ConfigError as exc:
        _fail(str(exc))

    value: Any = None
    kind = "text"
    if not text:
        try:
            value = json.loads(raw)
            kind = "arguments" if isinstance(value, dict) else "json"
        except ValueError:
            value = None
    result: Redacted[Any]
    if kind == "arguments":
        result = redactor.redact_arguments(value)
    elif kind == "json":
        result = redactor.redact(value)
    else:
        result = redactor.redact_text(raw)
    detectors = dict(sorted(result.counts.items()))
    if fmt == "json":
        out = {"input": kind, "redacted": result.value, "detectors": detectors, "throwaway_key": throwaway}
        typer.echo(json.dumps(out, ensure_ascii=False, indent=2))
        return
    if kind == "text":
        typer.echo(result.value, nl=not str(result.value).endswith("\n"))
    else:
        typer.echo(json.dumps(result.value, ensure_ascii=False, indent=2))
    summary = ", ".join(f"{name} x{n}" for name, n in detectors.items()) or "none"
    typer.echo(f"-- input: {kind}; detectors that fired: {summary}", err=True)
    if throwaway:
        typer.echo("-- no host redaction key: fingerprints use a throw-away key", err=True)
