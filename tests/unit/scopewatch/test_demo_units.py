"""The demo's pieces that need no stack: the reason it shows per verdict, its call scripts."""

from __future__ import annotations

import pytest

from schemas import parse_event
from scopewatch.demo import demo_calls, explain
from scopewatch.replay import replay
from support.scenario import story


@pytest.fixture(scope="module")
def decided() -> dict[str, tuple[str, str | None, list[str]]]:
    result = replay(enumerate(parse_event(e) for e in story("d")))
    return {c.call_id: (d.verdict, d.matched_grant_id, list(d.reasons)) for c, d in result.decisions}


@pytest.mark.parametrize(
    ("call_id", "expected"),
    [
        ("d-c-revoked", "grant d-write: revoked at"),
        ("d-c-expired", "grant d-web: expired at"),
        ("d-c-early", "grant d-later: not valid before"),
        ("d-c-res", "grant d-read: resource 'file:/etc/passwd' outside"),
        ("d-c-tool", "out_of_scope_tool: no grant's tools match 'shell/exec'"),
        ("d-c-in", "grant d-read: active"),
        ("d-c-unbound", "session 'd-s4': unbound"),
        ("d-c-nogrant", "no_grant: delegation acme/"),
    ],
)
def test_explain_picks_the_line_that_explains_the_verdict(
    decided: dict[str, tuple[str, str | None, list[str]]], call_id: str, expected: str
) -> None:
    verdict, matched, reasons = decided[call_id]
    assert explain(verdict, matched, reasons).startswith(expected)


def test_demo_scripts() -> None:
    calls = demo_calls(30)
    assert len(calls) == 30 and len({c.tool for c in calls}) >= 8
