"""`scopewatch rules list` and `scopewatch rules test` (the typer sub-app, before it is mounted)."""

from __future__ import annotations

import dataclasses
import json

import pytest
from typer.testing import CliRunner, Result

from detections.casekit import call, delegation, revoke
from detections.catalog import Catalog, CatalogError, default_catalog, load_taxonomy
from detections.rulebase import negative
from scopewatch import rules_cli
from scopewatch.rules_cli import rules_app


def invoke(*args: str) -> Result:
    return CliRunner().invoke(rules_app, list(args))


def test_list_shows_every_rule() -> None:
    result = invoke("list")
    assert result.exit_code == 0, result.output
    for rule in default_catalog():
        assert rule.id in result.stdout
    assert "AML.T0086" in result.stdout and "ASI03" in result.stdout


def test_list_json_has_metadata_and_numbered_runbooks() -> None:
    result = invoke("list", "--json")
    assert result.exit_code == 0, result.output
    rules = {r["id"]: r for r in json.loads(result.stdout)}
    assert set(rules) == {r.id for r in default_catalog()}
    revoked = rules["revoked_grant"]
    assert (revoked["severity"], revoked["version"], revoked["kind"]) == ("high", 1, "per_call")
    assert revoked["runbook"][0].startswith("1. ") and revoked["owasp"] and revoked["atlas"]


def test_test_runs_every_case_and_passes() -> None:
    result = invoke("test")
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert len([line for line in lines if line.startswith("ok")]) == len(default_catalog())
    assert lines[-1].endswith(" 0 failed")


def test_test_can_select_rules_and_names_unknown_ones() -> None:
    result = invoke("test", "tool_rug_pull")
    assert result.exit_code == 0 and result.stdout.startswith("ok   tool_rug_pull (5/5 cases)")
    assert invoke("test", "no_such_rule").exit_code == 2


def test_test_fails_on_a_failing_case(monkeypatch: pytest.MonkeyPatch) -> None:
    good = default_catalog().get("revoked_grant")
    wrong = negative("claims a revoked use is fine", *delegation(), revoke("10:00:00"), call("10:00:05", "c1"))
    broken = dataclasses.replace(good, cases=(*good.cases, wrong))
    broken_catalog = Catalog((broken,), load_taxonomy())
    monkeypatch.setattr(rules_cli, "load_catalog", lambda: broken_catalog)
    result = invoke("test")
    assert result.exit_code == 1
    assert "FAIL revoked_grant (3/4 cases)" in result.stdout
    assert "negative case 'claims a revoked use is fine' FAILED: expected findings on [], got ['c1']" in result.stdout
    assert result.stdout.splitlines()[-1] == "1 rules, 4 cases, 1 failed"


def test_an_invalid_catalog_is_an_error(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken() -> Catalog:
        raise CatalogError(["r: no negative case (a case with empty fires_on)"])

    monkeypatch.setattr(rules_cli, "load_catalog", broken)
    for command in ("list", "test"):
        result = invoke(command)
        assert result.exit_code == 1
        assert "r: no negative case" in result.stderr
