"""Every rule's positive and negative cases, one test each (DESIGN.md, "Detections")."""

from __future__ import annotations

from typing import Any

import pytest

from detections.catalog import default_catalog, run_case
from detections.rulebase import Case, Rule

CASES = [(rule, case) for rule in default_catalog() for case in rule.cases]


@pytest.mark.parametrize(
    ("rule", "case"), CASES, ids=[f"{r.id}:{'pos' if c.positive else 'neg'}:{c.name}" for r, c in CASES]
)
def test_rule_case(rule: Rule[Any], case: Case) -> None:
    result = run_case(rule, case)
    assert result.passed, result.describe()
