"""``scopewatch pager``: page on-call from ``audit.findings`` (PagerDuty, Slack, signed webhooks).

* ``scopewatch pager [--config FILE] [--group G]`` -- run the pager until SIGINT/SIGTERM;
* ``scopewatch pager check [--config FILE] [--json]`` -- validate the routes file and show each
  route (name, channel, minimum severity, tenants, rate) and whether the environment variables it
  names are set -- never their values;
* ``scopewatch pager send-test ROUTE [--severity high] [--tenant T]`` -- deliver one synthetic page
  through a route now (no Kafka, no ledger) and print the attempts: a check of the routing key,
  webhook secret or Slack URL.

The routes file is ``--config``, else ``$SCOPEWATCH_PAGER_CONFIG``, else ``<home>/pager.toml`` or
``<home>/pager.json`` (format: :mod:`stream_jobs.pager_config`). Kafka comes from the usual
settings (``SCOPEWATCH_BOOTSTRAP``, ``SCOPEWATCH_TOPIC_PREFIX`` ...). Exit codes: 2 for a bad or
missing configuration (the message names a missing variable, never a secret), 1 when a test page
is not delivered. The main CLI mounts this sub-app with ``app.add_typer(pager_app, name="pager")``;
``python -m scopewatch.pager_cli`` runs it standalone.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

pager_app = typer.Typer(
    add_completion=False,
    help="Page on-call from findings: PagerDuty Events v2, Slack webhooks, Standard Webhooks.",
)

CONFIG_ENV = "SCOPEWATCH_PAGER_CONFIG"
GROUP_ENV = "SCOPEWATCH_PAGER_GROUP"
ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", envvar=CONFIG_ENV, help="routes file (.toml/.json); default HOME/pager.toml"),
]


def _fail(message: str, code: int = 2) -> None:
    sys.stderr.write(f"scopewatch pager: error: {message}\n")
    raise typer.Exit(code)


def _settings() -> Any:
    from stream_jobs.runtime.settings import load_settings

    return load_settings()


def _config_path(settings: Any, config: Path | None) -> Path:
    from stream_jobs.pager import find_config

    path = find_config(settings, config)
    if path is None:
        _fail(f"no routes file: pass --config, set {CONFIG_ENV}, or create {settings.home / 'pager.toml'}")
    assert path is not None
    return path


@pager_app.callback(invoke_without_command=True)
def pager(
    ctx: typer.Context,
    config: ConfigOption = None,
    group: Annotated[
        str | None,
        typer.Option(envvar=GROUP_ENV, help="Kafka consumer group (default: the file's, else scopewatch-pager)"),
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug | info | warning | error")] = "info",
) -> None:
    """Run the pager until SIGINT/SIGTERM (or run one of the commands below)."""
    ctx.obj = {"config": config}
    if ctx.invoked_subcommand is not None:
        return
    from stream_jobs.pager import run_pager_service
    from stream_jobs.pager_config import PagerConfigError

    settings = _settings()
    path = _config_path(settings, config)
    try:
        run_pager_service(settings, path, group=group, log_level=log_level)
    except PagerConfigError as exc:
        _fail(str(exc))


def _load(ctx: typer.Context, config: Path | None) -> tuple[Any, Any, Path, dict[str, str]]:
    from stream_jobs.pager_config import PagerConfigError, load_config

    settings = _settings()
    path = _config_path(settings, config or (ctx.obj or {}).get("config"))
    try:
        return settings, load_config(path), path, dict(os.environ)
    except PagerConfigError as exc:
        _fail(str(exc))
        raise AssertionError from None  # unreachable


@pager_app.command("check")
def check(
    ctx: typer.Context,
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
) -> None:
    """Validate the routes file and show the routes; exit 2 if it is invalid or a variable is unset."""
    from stream_jobs.pager_config import PagerConfigError, resolve_routes

    _, cfg, path, environ = _load(ctx, config)
    described = []
    for r in cfg.routes:
        variables = [v for v in (r.url_env, r.secret_env) if v]
        described.append(
            {
                "name": r.name,
                "channel": r.channel,
                "min_severity": r.min_severity,
                "tenants": list(r.tenants),
                "rate_per_minute": r.rate_per_minute,
                "burst": r.burst,
                "variables": {v: bool(environ.get(v, "").strip()) for v in variables},
            }
        )
    problem = None
    try:
        resolve_routes(cfg, environ)
    except PagerConfigError as exc:
        problem = str(exc)
    if as_json:
        print(
            json.dumps(
                {"config": str(path), "window_seconds": cfg.window_seconds, "routes": described, "error": problem},
                indent=2,
            )
        )
    else:
        table = Table("route", "channel", "min severity", "tenants", "rate/min (burst)", "variables")
        for d in described:
            table.add_row(
                d["name"],
                d["channel"],
                d["min_severity"],
                ", ".join(d["tenants"]) or "all",
                f"{d['rate_per_minute']:g} ({d['burst']})",
                ", ".join(f"{v} {'set' if ok else 'MISSING'}" for v, ok in d["variables"].items()),
            )
        Console(width=200).print(table)
        Console(highlight=False).print(f"{path}: window {cfg.window_seconds:g}s, group {cfg.group}")
    if problem is not None:
        _fail(problem)


@pager_app.command("send-test")
def send_test(
    ctx: typer.Context,
    route: Annotated[str, typer.Argument(help="the route's name")],
    config: ConfigOption = None,
    severity: Annotated[str, typer.Option(help="severity of the synthetic finding")] = "critical",
    tenant: Annotated[str, typer.Option(help="tenant of the synthetic finding")] = "default",
) -> None:
    """Send one synthetic page through ROUTE now and print every attempt (exit 1 unless delivered)."""
    from schemas import to_canonical_json
    from stream_jobs.pager import send_test_page, synthetic_finding
    from stream_jobs.pager_config import SEVERITIES, PagerConfigError, resolve_routes

    _, cfg, _path, environ = _load(ctx, config)
    if severity not in SEVERITIES:
        _fail(f"--severity must be one of {', '.join(SEVERITIES)}")
    chosen = [r for r in cfg.routes if r.name == route]
    if not chosen:
        _fail(f"no route named {route!r} (routes: {', '.join(r.name for r in cfg.routes)})")
    sub = cfg.model_copy(update={"routes": tuple(chosen)})
    try:
        (resolved,) = resolve_routes(sub, environ)
        rows = asyncio.run(send_test_page(sub, resolved, synthetic_finding(severity, tenant)))
    except (PagerConfigError, ValueError) as exc:
        _fail(str(exc))
        return
    for row in rows:
        print(to_canonical_json(row))
    if rows[-1].outcome != "delivered":
        raise typer.Exit(1)


if __name__ == "__main__":
    pager_app()
