"""``scopewatch rules``: the detection rule catalog (``detections/rules``).

* ``scopewatch rules list [--json]`` -- id, version, kind, severity, title and mappings per rule;
* ``scopewatch rules test [RULE_ID...]`` -- runs every rule's positive and negative cases, prints
  one result line per rule (and each failing case), exits 1 if any case fails.

Both exit 1 with the list of problems when the catalog does not validate. The main CLI mounts
this sub-app with ``app.add_typer(rules_app, name="rules")``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from detections.catalog import Catalog, CatalogError, load_catalog, run_case
from detections.rulebase import Rule

rules_app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="The detection rule catalog: list the rules, run their cases.",
)


def _catalog() -> Catalog:
    try:
        return load_catalog()
    except CatalogError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] {exc}", highlight=False, markup=True)
        raise typer.Exit(1) from None


def _describe(rule: Rule[Any]) -> dict[str, Any]:
    meta = rule.meta
    return {
        "id": meta.id,
        "version": meta.version,
        "kind": meta.kind,
        "severity": meta.severity,
        "title": meta.title,
        "owasp": list(meta.owasp),
        "atlas": list(meta.atlas),
        "runbook": meta.numbered_runbook(),
        "cases": len(rule.cases),
    }


@rules_app.command("list")
def list_rules(as_json: Annotated[bool, typer.Option("--json", help="print JSON (runbooks included)")] = False) -> None:
    """Show every rule: id, version, kind, severity, title, OWASP Agentic and MITRE ATLAS mappings."""
    catalog = _catalog()
    if as_json:
        print(json.dumps([_describe(r) for r in catalog], indent=2))
        return
    table = Table("id", "version", "kind", "severity", "title", "OWASP", "ATLAS")
    for rule in catalog:
        m = rule.meta
        table.add_row(m.id, str(m.version), m.kind, m.severity, m.title, ", ".join(m.owasp), ", ".join(m.atlas))
    Console(width=200).print(table)


@rules_app.command("test")
def test_rules(
    rule_ids: Annotated[list[str] | None, typer.Argument(help="only these rules (default: all)")] = None,
) -> None:
    """Run every rule's positive and negative cases; exit 1 if any fails."""
    catalog = _catalog()
    try:
        rules = [catalog.get(i) for i in rule_ids] if rule_ids else list(catalog)
    except KeyError as exc:
        Console(stderr=True).print(f"[bold red]error:[/] no rule {exc.args[0]!r}", highlight=False, markup=True)
        raise typer.Exit(2) from None
    out = Console(highlight=False, soft_wrap=True)
    failed = 0
    for rule in rules:
        results = [run_case(rule, case) for case in rule.cases]
        bad = [r for r in results if not r.passed]
        failed += len(bad)
        status = "[red]FAIL[/]" if bad else "[green]ok[/]  "
        out.print(f"{status} {rule.id} ({len(results) - len(bad)}/{len(results)} cases)")
        for result in bad:
            out.print(f"     {result.describe()}", markup=False)
    total = sum(len(r.cases) for r in rules)
    out.print(f"{len(rules)} rules, {total} cases, {failed} failed")
    if failed:
        raise typer.Exit(1)
