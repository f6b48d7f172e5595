"""A realistic benign scenario (tests/data/benign_corpus.jsonl) raises no finding at all."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from detections.catalog import judge
from schemas import ToolCall, event_from_json

CORPUS = Path(__file__).parents[2] / "data" / "benign_corpus.jsonl"


def test_benign_corpus_produces_no_findings() -> None:
    events = [event_from_json(line) for line in CORPUS.read_text().splitlines()]
    calls = [e for e in events if isinstance(e, ToolCall)]
    judged = judge(events)
    assert len(judged) == len(calls) >= 100
    assert Counter(j.decision.verdict for j in judged) == {"in_scope": len(calls)}
    assert [(j.call.call_id, j.rule_ids) for j in judged if j.findings] == []


def test_benign_corpus_is_varied() -> None:
    """Several delegations, servers and tools, sensitive reads, a renewed grant, revocation after use."""
    events = [event_from_json(line) for line in CORPUS.read_text().splitlines()]
    calls = [e for e in events if isinstance(e, ToolCall)]
    kinds = Counter(e.event_type for e in events)
    assert kinds["tool_result"] == len(calls) and kinds["grant_revoked"] >= 1 and kinds["session_ended"] >= 1
    assert {c.server for c in calls} == {"everything", "filesystem"}
    assert {"echo", "get-sum", "read_text_file", "list_directory"} <= {c.tool for c in calls}
    assert len({c.session_id for c in calls}) >= 3
    assert all(c.tool_digest for c in calls)
