"""Live state keeps each fact's record hash (compact format 2); format-1 state still decodes."""

from __future__ import annotations

import json
from io import BytesIO

from fastavro import parse_schema, schemaless_writer

from detections.compact import decode_grants, decode_sessions, encode_grants, encode_sessions
from detections.engine import GrantHistory, SessionHistory
from schemas import Evidence, decode, parse_event, record_hash
from schemas.codec import AVRO_DIR, MAGIC, schema_fingerprint
from support.scenario import bound, ended, grant, revoke


def test_session_and_grant_hashes_survive_encoding() -> None:
    b, e = parse_event(bound("10:00:00", "s1", "alice", "a1")), parse_event(ended("10:00:10", "s1"))
    sessions = SessionHistory("acme", "s1")
    sessions.add(b, record_hash(b))
    sessions.add(e)  # hash not known
    back = decode_sessions(encode_sessions(sessions), "acme", "s1")
    assert back.hashes == {b.event_id: record_hash(b)}
    state = back.state_at(e.event_time)
    assert (state.event_hash, state.binding_hash) == (None, record_hash(b))

    g = parse_event(grant("10:00:00", "g1", "alice", "a1", ["fs/*"]))
    r = parse_event(revoke("10:00:05", "g1", "alice", "a1"))
    grants = GrantHistory("acme", "alice", "a1")
    grants.add(g, record_hash(g))
    grants.add(r, record_hash(r))
    back_g = decode_grants(encode_grants(grants), "acme", "alice", "a1")
    assert back_g.hashes == {g.event_id: record_hash(g), r.event_id: record_hash(r)}


def test_format_1_state_decodes_without_hashes() -> None:
    b = parse_event(bound("10:00:00", "s1", "alice", "a1"))
    sessions = SessionHistory("acme", "s1")
    sessions.add(b, record_hash(b))
    v2 = encode_sessions(sessions)
    v1 = b"\x01" + v2[1:-33]  # format 1: the same fact without the hash flag and hash
    back = decode_sessions(v1, "acme", "s1")
    assert [f.event_id for f in back] == [b.event_id] and back.hashes == {}


def test_evidence_written_with_schema_v1_still_decodes() -> None:
    schema = json.loads((AVRO_DIR / "history" / "evidence.v1.avsc").read_text())
    facts = {"grants": [{"grant_id": "g1", "version_event_id": "e1"}], "kind": "final"}
    rec = {
        "evidence_id": "ev1", "call_id": "c1", "tenant": "acme", "session_id": "s1", "principal": "alice",
        "agent_id": "a1", "server": "fs", "tool": "read_file", "call_time": 1_700_000_000_000, "verdict": "in_scope",
        "matched_grant_id": "g1", "reasons": ["r"], "version": 2, "final": True, "late": False,
        "decided_at": 1_700_000_000_500, "facts": json.dumps(facts, sort_keys=True, separators=(",", ":")),
        "extra_json": None,
    }  # fmt: skip
    buf = BytesIO()
    buf.write(MAGIC + schema_fingerprint(schema))
    schemaless_writer(buf, parse_schema(schema), rec)
    old = decode(buf.getvalue())
    assert isinstance(old, Evidence)
    assert old.facts == facts and old.fact_ids == [] and old.fact_hashes == [] and old.kind == ""
