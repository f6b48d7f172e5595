"""The rule catalog: what it holds, and the validator rejecting deliberately broken rules."""

from __future__ import annotations

import itertools
import json
import textwrap
import types
from pathlib import Path

import pytest

from detections.catalog import (
    Catalog,
    CatalogError,
    build_catalog,
    default_catalog,
    load_catalog,
    load_taxonomy,
    run_case,
)
from detections.engine import VERDICTS
from detections.findings import FORENSIC_QUERIES, ForensicQuery
from detections.rulebase import RuleMeta
from detections.rules import revoked_grant

SEQUENCE_RULES = {
    "exfiltration_chain",
    "violation_burst",
    "first_tool_use",
    "tool_rug_pull",
    "use_after_revocation",
    "approval_latency",
}


def test_catalog_has_a_per_call_rule_per_violating_verdict_and_the_sequence_rules() -> None:
    catalog = default_catalog()
    per_call = {r.id for r in catalog if r.meta.kind == "per_call"}
    sequence = {r.id for r in catalog if r.meta.kind == "sequence"}
    assert per_call == set(VERDICTS) - {"in_scope"} | {"history_incomplete"}  # and DESIGN "Retention"
    assert sequence == SEQUENCE_RULES
    assert [r.id for r in catalog] == sorted(per_call | sequence)


def test_severities_fit() -> None:
    severity = {r.id: r.meta.severity for r in default_catalog()}
    assert severity["revoked_grant"] == severity["identity_mismatch"] == "high"
    assert severity["exfiltration_chain"] == severity["use_after_revocation"] == "critical"
    assert severity["first_tool_use"] == "info"


def test_taxonomy_lists_the_ten_owasp_agentic_risks() -> None:
    taxonomy = load_taxonomy()
    assert list(taxonomy.owasp) == [f"ASI{n:02d}" for n in range(1, 11)]
    assert taxonomy.owasp["ASI03"] == "Identity and Privilege Abuse"
    assert taxonomy.atlas["AML.T0053"] == "AI Agent Tool Invocation"


def test_forensic_query_names_are_described() -> None:
    assert set(FORENSIC_QUERIES) == set(ForensicQuery.__args__)  # type: ignore[attr-defined]


def test_runbook_steps_are_numbered() -> None:
    steps = revoked_grant.META.numbered_runbook()
    assert steps[0].startswith("1. ") and steps[-1].startswith(f"{len(steps)}. ")


# ------------------------------------------------------------------- broken rule modules

_packages = itertools.count()

POS = 'positive("p", *delegation(), call("10:00:00", "c1", "db/x"), fires_on=["c1"])'
NEG = 'negative("n", *delegation(), call("10:00:00", "c1"))'


def rule_source(
    rule_id: str,
    *,
    severity: str = "medium",
    runbook: str = '("look",)',
    owasp: str = '("ASI02",)',
    atlas: str = '("AML.T0053",)',
    cases: str = f"{POS}, {NEG}",
) -> str:
    return textwrap.dedent(
        f"""
        from detections.casekit import call, delegation
        from detections.rulebase import RuleMeta, negative, per_call_rule, positive

        META = RuleMeta(
            id={rule_id!r}, version=1, title="t", severity={severity!r}, kind="per_call",
            runbook={runbook}, owasp={owasp}, atlas={atlas},
        )

        def evaluate(call, decision, ctx):
            return ctx.on_verdict(call, decision, "out_of_scope_tool", summary="s", key=(), query="call_evidence")

        RULE = per_call_rule(META, evaluate, [{cases}])
        """
    )


def load_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, modules: dict[str, str]) -> Catalog:
    """Write a package of rule modules under tmp_path and load it as a catalog."""
    name = f"broken_rules_{next(_packages)}"
    package = tmp_path / name
    package.mkdir()
    (package / "__init__.py").write_text("")
    for module, source in modules.items():
        (package / f"{module}.py").write_text(source)
    monkeypatch.syspath_prepend(str(tmp_path))
    return load_catalog(name)


def test_a_well_formed_package_loads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    catalog = load_package(tmp_path, monkeypatch, {"good": rule_source("good"), "_helpers": "X = 1\n"})
    assert [r.id for r in catalog] == ["good"]
    assert all(run_case(catalog.get("good"), case).passed for case in catalog.get("good").cases)


BROKEN = {
    "id differs from module name": ({"good": rule_source("other")}, "rule id 'other' differs from the module name"),
    "unknown OWASP id": ({"r": rule_source("r", owasp='("ASI11",)')}, "unknown OWASP Agentic id 'ASI11'"),
    "unknown ATLAS id": ({"r": rule_source("r", atlas='("AML.T9999",)')}, "unknown MITRE ATLAS id 'AML.T9999'"),
    "no positive case": ({"r": rule_source("r", cases=NEG)}, "r: no positive case"),
    "no negative case": ({"r": rule_source("r", cases=POS)}, "r: no negative case"),
    "no cases at all": ({"r": rule_source("r", cases="")}, "r: no positive case"),
    "case expects an absent call": (
        {"r": rule_source("r", cases=f'{NEG}, positive("p", call("10:00:00", "c1"), fires_on=["c9"])')},
        "expects a finding on calls it lacks: c9",
    ),
    "duplicate case names": ({"r": rule_source("r", cases=f"{POS}, {NEG}, {NEG}")}, "duplicate case name 'n'"),
    "unknown severity": ({"r": rule_source("r", severity="urgent")}, "r: cannot import (ValidationError"),
    "empty runbook": ({"r": rule_source("r", runbook="()")}, "r: cannot import (ValidationError"),
    "malformed ATLAS id": ({"r": rule_source("r", atlas='("T0053",)')}, "r: cannot import (ValidationError"),
    "sequence kind without state": (
        {"r": rule_source("r").replace('kind="per_call"', 'kind="sequence"')},
        "r: kind 'sequence' does not fit its state",
    ),
    "sequence rule without a state codec": (
        {
            "r": "from dataclasses import replace\n"
            "from detections.rules import exfiltration_chain as x\n"
            'RULE = replace(x.RULE, meta=x.RULE.meta.model_copy(update={"id": "r"}), codec=None)\n'
        },
        "r: sequence rule without a state codec",
    ),
    "no RULE": ({"r": "X = 1\n"}, "r: defines no RULE"),
    "syntax error": ({"r": "def (:\n"}, "r: cannot import (SyntaxError"),
}


@pytest.mark.parametrize(("modules", "message"), BROKEN.values(), ids=BROKEN.keys())
def test_the_validator_rejects_a_broken_rule(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, modules: dict[str, str], message: str
) -> None:
    with pytest.raises(CatalogError) as caught:
        load_package(tmp_path, monkeypatch, {"fine": rule_source("fine"), **modules})
    assert any(message in p for p in caught.value.problems), caught.value
    assert not any(p.startswith("fine:") for p in caught.value.problems)


def test_every_problem_is_reported_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    modules = {"a": rule_source("b"), "c": rule_source("c", cases=POS, atlas='("AML.T9999",)')}
    with pytest.raises(CatalogError) as caught:
        load_package(tmp_path, monkeypatch, modules)
    assert len(caught.value.problems) == 3
    assert "invalid rule catalog:" in str(caught.value)


def test_duplicate_ids_are_rejected() -> None:
    """Two in-memory modules of the same name in different packages define the same rule id."""
    twins = []
    for package in ("pack_one", "pack_two"):
        module = types.ModuleType(f"{package}.revoked_grant")
        module.RULE = revoked_grant.RULE  # type: ignore[attr-defined]
        twins.append(module)
    with pytest.raises(CatalogError, match="duplicate rule id 'revoked_grant'"):
        build_catalog(twins, load_taxonomy())


def test_metadata_is_strict() -> None:
    good = revoked_grant.META.model_dump()
    for field, bad in [("version", "1"), ("version", 0), ("runbook", ["a list"]), ("owasp", ("ASI02", "ASI02"))]:
        with pytest.raises(ValueError, match=field):
            RuleMeta(**{**good, field: bad})


def test_taxonomy_file_is_what_the_catalog_checks_against() -> None:
    data = json.loads((Path(__file__).parents[3] / "detections" / "taxonomy.json").read_text())
    used = {i for r in default_catalog() for i in r.meta.atlas}
    assert used <= set(data["mitre_atlas"]["ids"])
