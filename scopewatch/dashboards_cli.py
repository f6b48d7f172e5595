"""``scopewatch dashboards``: Grafana dashboards and alert rules as code (``dashboards/``).

* ``scopewatch dashboards build [--out DIR]`` -- writes the dashboard JSON and the provisioning files
  a Grafana reads at start (what ``compose/`` does);
* ``scopewatch dashboards provision --url URL --token TOKEN`` -- creates or updates the datasource,
  folder, dashboards and alert rules in a running Grafana through its HTTP API; a second run writes
  nothing. The token (``GRAFANA_TOKEN``) and the ClickHouse password are never printed.

The main CLI mounts this sub-app with ``app.add_typer(dashboards_app, name="dashboards")``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlparse

import typer
from rich.console import Console

from dashboards.build import Bundle, ClickHouseConnection, write_files

dashboards_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Grafana dashboards and alert rules as code: write provisioning files, or provision a Grafana.",
)
err = Console(stderr=True)
PASSWORD_ENV = "GRAFANA_CLICKHOUSE_PASSWORD"  # noqa: S105 -- the name of a variable, not a password

Database = Annotated[str, typer.Option(envvar="SCOPEWATCH_CLICKHOUSE_DATABASE", help="database the SQL reads")]
ChHost = Annotated[str, typer.Option(help="ClickHouse host as Grafana reaches it")]
ChPort = Annotated[int, typer.Option(help="ClickHouse port as Grafana reaches it (HTTP 8123, native 9000)")]
ChProtocol = Annotated[str, typer.Option(help="http or native")]
ChSecure = Annotated[bool, typer.Option(help="TLS to ClickHouse")]
ChUser = Annotated[str, typer.Option(help="ClickHouse user of the datasource (read-only)")]


def _bundle(database: str, host: str, port: int, protocol: str, secure: bool, user: str) -> Bundle:
    if protocol not in ("http", "native"):
        raise typer.BadParameter("use http or native", param_hint="--clickhouse-protocol")
    kind: Literal["http", "native"] = "http" if protocol == "http" else "native"
    try:
        return Bundle(database=database, connection=ClickHouseConnection(host, port, kind, secure, user))
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--database") from None


@dashboards_app.command("build")
def build(
    out: Annotated[Path, typer.Option(help="folder to write into")] = Path("grafana"),
    grafana_dir: Annotated[str, typer.Option(help="where Grafana sees OUT (the dashboard provider's path)")] = (
        "/etc/scopewatch-grafana"
    ),
    password_env: Annotated[
        str, typer.Option(help="environment variable Grafana expands into the datasource password")
    ] = PASSWORD_ENV,
    database: Database = "scopewatch",
    clickhouse_host: ChHost = "clickhouse",
    clickhouse_port: ChPort = 8123,
    clickhouse_protocol: ChProtocol = "http",
    clickhouse_secure: ChSecure = False,
    clickhouse_user: ChUser = "grafana",
) -> None:
    """Write dashboard JSON and Grafana provisioning files (datasource, dashboards, alert rules)."""
    bundle = _bundle(
        database, clickhouse_host, clickhouse_port, clickhouse_protocol, clickhouse_secure, clickhouse_user
    )
    written = write_files(bundle, out, grafana_dir, password_env)
    for path in written:
        print(path)
    err.print(f"wrote {len(written)} files under {out}", highlight=False)


@dashboards_app.command("provision")
def provision(
    url: Annotated[str, typer.Option(envvar="GRAFANA_URL", help="Grafana base URL, e.g. http://localhost:3000")],
    token: Annotated[
        str, typer.Option(envvar="GRAFANA_TOKEN", help="service account token (never printed)", show_default=False)
    ],
    clickhouse_password: Annotated[
        str | None,
        typer.Option(
            envvar="GRAFANA_CLICKHOUSE_PASSWORD",
            help="password of the datasource's ClickHouse user (never printed)",
            show_default=False,
        ),
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="only report what would change")] = False,
    timeout: Annotated[float, typer.Option(help="seconds per HTTP request")] = 10.0,
    database: Database = "scopewatch",
    clickhouse_host: ChHost = "clickhouse",
    clickhouse_port: ChPort = 8123,
    clickhouse_protocol: ChProtocol = "http",
    clickhouse_secure: ChSecure = False,
    clickhouse_user: ChUser = "grafana",
) -> None:
    """Create or update the datasource, folder, dashboards and alert rules in Grafana (idempotent)."""
    from grafana_client.api import GrafanaApi

    from dashboards.provision import ProvisionError
    from dashboards.provision import provision as run

    bundle = _bundle(
        database, clickhouse_host, clickhouse_port, clickhouse_protocol, clickhouse_secure, clickhouse_user
    )
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or parsed.username or parsed.password:
        raise typer.BadParameter(
            "use an http(s):// URL without credentials (the token authenticates)", param_hint="--url"
        )
    api = GrafanaApi.from_url(url, credential=token, timeout=timeout)
    try:
        report = run(api, bundle, password=clickhouse_password, dry_run=dry_run)
    except ProvisionError as exc:
        err.print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
        raise typer.Exit(1) from None
    for change in report.changes:
        print(change)
    verb = "would write" if dry_run else "wrote"
    err.print(f"{url}: {verb} {report.writes} of {len(report.changes)} objects", highlight=False)
