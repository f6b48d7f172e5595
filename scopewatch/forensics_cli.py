"""``scopewatch forensics``: the forensic query pack (``stream_jobs/forensics/*.sql``).

* ``scopewatch forensics list [--json]`` -- every query: its name and the question it answers;
* ``scopewatch forensics NAME --param k=v ... [--format table|json] [--print-sql]`` -- binds the
  parameters (checked against their declared types, client side) and runs the query through
  :func:`scopewatch.sqlclient.run_sql` (the running sink's read-only endpoint, or chDB / a server).
  ``NAME --help`` documents the query's parameters and columns.

Exit codes: 2 for a bad parameter or format, 1 when the query fails. The main CLI mounts this
sub-app with ``app.add_typer(forensics_app, name="forensics")``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Annotated

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from stream_jobs.forensics import ForensicQuery, ForensicsError, bind, load_queries, parse_assignments

forensics_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode=None,
    help="The forensic query pack: named, parameterised SQL over the evidence store.",
)


def _fail(message: str, code: int) -> None:
    Console(stderr=True).print(f"[bold red]error:[/] {escape(message)}", highlight=False, markup=True)
    raise typer.Exit(code)


try:
    QUERIES = load_queries()
    LOAD_ERROR: str | None = None
except ForensicsError as exc:  # a broken query file must not break the rest of the CLI
    QUERIES, LOAD_ERROR = {}, str(exc)


@forensics_app.command("list")
def list_queries(as_json: Annotated[bool, typer.Option("--json", help="print JSON with parameters")] = False) -> None:
    """Show every forensic query: its name and the question it answers."""
    if LOAD_ERROR is not None:
        _fail(LOAD_ERROR, 1)
    if as_json:
        described = [
            {
                "name": q.name,
                "question": q.question,
                "params": [
                    {"name": p.name, "type": p.type, "required": p.required, "default": p.default} for p in q.params
                ],
                "columns": [c.name for c in q.columns],
            }
            for q in QUERIES.values()
        ]
        print(json.dumps(described, indent=2))
        return
    table = Table("name", "question")
    for q in QUERIES.values():
        table.add_row(q.name, q.question)
    Console().print(table)


def _help(query: ForensicQuery) -> str:
    """Click help: paragraphs separated by blank lines; \\b keeps a block's lines as written."""
    params = [
        f"  {p.name} {p.type}"
        + (" (required)" if p.required else f" = {'NULL' if p.default is None else p.default}")
        + f": {p.description}"
        for p in query.params
    ]
    columns = [f"  {c.name}: {c.description}" for c in query.columns]
    blocks = ["\b\nParameters (--param NAME=VALUE):", *params, "", "\b\nColumns:", *columns]
    return "\n\n".join([query.question, *query.notes, "\n".join(blocks)])


def _command(query: ForensicQuery) -> Callable[..., None]:
    def run(
        param: Annotated[
            list[str] | None, typer.Option("--param", "-p", metavar="NAME=VALUE", help="a parameter; repeat for each")
        ] = None,
        fmt: Annotated[str, typer.Option("--format", metavar="FORMAT", help="table | json")] = "table",
        print_sql: Annotated[bool, typer.Option("--print-sql", help="print the bound SQL; do not run it")] = False,
    ) -> None:
        from scopewatch.sqlclient import SqlError, run_sql
        from stream_jobs.runtime.settings import load_settings

        if fmt not in ("table", "json"):
            _fail(f"unknown format {fmt!r}: use table or json", 2)
        settings = load_settings()
        try:
            sql = bind(query, parse_assignments(query, param or []), settings.clickhouse_database)
        except ForensicsError as exc:
            _fail(str(exc), 2)
        if print_sql:
            print(sql)
            return
        try:
            result = run_sql(settings, sql)
        except SqlError as exc:
            _fail(f"{query.name}: {exc}", 1)
        _print(result, fmt)

    return run


def _print(result: dict[str, object], fmt: str) -> None:
    columns, rows = result["columns"], result["rows"]
    assert isinstance(columns, list) and isinstance(rows, list)
    if fmt == "json":
        print(json.dumps([dict(zip(columns, row, strict=True)) for row in rows], ensure_ascii=False))
        return
    if not rows:
        Console(stderr=True).print("no rows")
        return
    table = Table(*columns)
    for column in table.columns:
        column.overflow = "fold"  # never cut a value short: forensic output is evidence
    for row in rows:
        table.add_row(*(Text("" if v is None else v if isinstance(v, str) else json.dumps(v)) for v in row))
    Console().print(table)


for _query in QUERIES.values():
    forensics_app.command(_query.name, help=_help(_query), short_help=_query.question)(_command(_query))
