"""`scopewatch replay`: any input order, one line per call in input order, bad lines by number, rule ids."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from scopewatch.cli import app
from support.scenario import bound, grant, jsonl, revoke, tool_call

ALICE, AGENT, S = "alice@acme.example", "copilot", "sess-1"


def scenario() -> list[dict[str, object]]:
    calls = [
        tool_call("10:00:05", "c-in-scope", S, "fs", "read_file", ["file:/data/a.txt"]),
        tool_call("10:00:06", "c-wrong-tool", S, "fs", "delete_file", ["file:/data/a.txt"]),
        tool_call("10:00:07", "c-outside", S, "fs", "read_file", ["file:/etc/shadow"]),
        tool_call("10:00:20", "c-after-revoke", S, "fs", "read_file", ["file:/data/a.txt"]),
        tool_call("10:00:05", "c-unbound", "sess-unknown", "fs", "read_file"),
        tool_call("09:59:59", "c-before-grant", S, "fs", "read_file", ["file:/data/a.txt"]),
    ]
    facts = [
        bound("09:59:00", S, ALICE, AGENT),
        grant("10:00:00", "g-1", ALICE, AGENT, ["fs/read_*"], ["file:/data/*"]),
        revoke("10:00:10", "g-1", ALICE, AGENT),
    ]
    return calls + facts  # facts after the calls they decide: replay knows all facts whatever the order


EXPECTED = [
    ("c-in-scope", "in_scope", "g-1"),
    ("c-wrong-tool", "out_of_scope_tool", None),
    ("c-outside", "out_of_scope_resource", None),
    ("c-after-revoke", "revoked_grant", "g-1"),
    ("c-unbound", "unbound_session", None),
    ("c-before-grant", "no_grant", None),
]

EXPECTED_FINDINGS = {
    "c-in-scope": [],
    "c-wrong-tool": ["out_of_scope_tool"],
    "c-outside": ["out_of_scope_resource"],
    # 10 s after the revocation: past the 5 s revocation tolerance, so the sequence rule fires too
    "c-after-revoke": ["revoked_grant", "use_after_revocation"],
    "c-unbound": ["unbound_session"],
    "c-before-grant": ["no_grant"],
}


def run(tmp_path: Path, text: str) -> tuple[int, list[dict[str, object]], str]:
    path = tmp_path / "events.jsonl"
    path.write_text(text)
    result = CliRunner().invoke(app, ["replay", str(path)])
    lines = [json.loads(line) for line in result.stdout.splitlines() if line.strip()]
    return result.exit_code, lines, result.stderr


def test_replay_prints_one_line_per_call_in_input_order(tmp_path: Path) -> None:
    code, lines, err = run(tmp_path, jsonl(scenario()))
    assert code == 0, err
    assert [(x["call_id"], x["verdict"], x["matched_grant_id"]) for x in lines] == EXPECTED
    assert all(list(x) == ["call_id", "verdict", "matched_grant_id", "approval_id", "findings"] for x in lines)
    assert all(x["approval_id"] is None for x in lines)
    assert {x["call_id"]: x["findings"] for x in lines} == EXPECTED_FINDINGS


def test_replay_does_not_depend_on_input_order(tmp_path: Path) -> None:
    events = scenario()
    _, forward, _ = run(tmp_path, jsonl(events))
    _, backward, _ = run(tmp_path, jsonl(list(reversed(events))))
    assert sorted(map(json.dumps, forward)) == sorted(map(json.dumps, backward))
    assert [x["call_id"] for x in backward] == [c for c, _, _ in reversed(EXPECTED)]  # still input order


def test_bad_lines_are_named_and_the_rest_is_processed(tmp_path: Path) -> None:
    events = scenario()
    text = jsonl(events[:2]) + "not json\n" + '{"event_type": "tool_call", "tenant": "acme"}\n' + jsonl(events[2:])
    code, lines, err = run(tmp_path, text)
    assert code == 2
    assert "line 3:" in err and "line 4:" in err
    assert [x["call_id"] for x in lines] == [c for c, _, _ in EXPECTED]


def test_unknown_fields_are_kept_not_fatal(tmp_path: Path) -> None:
    events = scenario()
    events[0]["x_vendor_field"] = {"anything": 1}
    code, lines, _ = run(tmp_path, jsonl(events))
    assert code == 0 and lines[0]["verdict"] == "in_scope"


def test_sequence_rules_see_calls_in_event_time_order_whatever_the_input_order(tmp_path: Path) -> None:
    """Five denied calls within a minute make a burst; the burst lands on the latest call by event_time."""
    facts = [bound("09:59:00", S, ALICE, AGENT), grant("10:00:00", "g-1", ALICE, AGENT, ["fs/read_*"])]
    calls = [tool_call(f"10:00:{s:02d}", f"c-{s}", S, "db", "drop_table") for s in (50, 10, 40, 20, 30)]
    code, lines, err = run(tmp_path, jsonl(calls + facts))
    assert code == 0, err
    assert [x["call_id"] for x in lines] == ["c-50", "c-10", "c-40", "c-20", "c-30"]
    fired = {x["call_id"]: x["findings"] for x in lines}
    assert fired["c-50"] == ["out_of_scope_tool", "violation_burst"]
    assert all(fired[c] == ["out_of_scope_tool"] for c in ("c-10", "c-20", "c-30", "c-40"))


def test_benign_corpus_replays_without_findings() -> None:
    path = Path(__file__).parents[2] / "data" / "benign_corpus.jsonl"
    result = CliRunner().invoke(app, ["replay", str(path)])
    assert result.exit_code == 0, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(lines) > 100
    assert all(x["verdict"] == "in_scope" and x["findings"] == [] for x in lines)
