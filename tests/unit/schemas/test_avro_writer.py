"""The compiled Avro writer (schemas/avro_writer.py) writes exactly what fastavro writes."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from hypothesis import given, settings

from schemas import CodecError, Evidence, SchemaModel, decode, encode
from schemas.avro_writer import fast_encode, writer_for
from schemas.codec import MODELS
from tests.unit.schemas.test_schemas_roundtrip import records

T = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)


def test_every_model_has_a_compiled_writer() -> None:
    assert all(writer_for(model) is not None for model in MODELS.values())


@settings(max_examples=400)
@given(records)
def test_same_bytes_as_fastavro(record: SchemaModel) -> None:
    data = fast_encode(record)
    assert data == encode(record)
    assert decode(data) == record


def evidence(**changes: object) -> Evidence:
    values: dict[str, object] = {
        "evidence_id": "e-1",
        "call_id": "c-1",
        "tenant": "acme",
        "session_id": "s-1",
        "principal": None,
        "agent_id": "agent-7",
        "server": "fs",
        "tool": "read_file",
        "call_time": T,
        "verdict": "in_scope",
        "matched_grant_id": None,
        "reasons": ["ok", "ünïcode " * 600],
        "version": 2**40,
        "final": True,
        "late": False,
        "decided_at": T,
        "facts": {},
        "fact_ids": [f"id-{i}" for i in range(5000)],  # an array length past the precomputed ones
        "fact_hashes": [],
        "kind": "final",
        "trigger": "deadline",
    }
    return Evidence.model_construct(**(values | changes))  # as the worker builds them: trusted, not validated


def test_trusted_evidence_same_bytes() -> None:
    record = evidence()
    assert fast_encode(record) == encode(record)


@pytest.mark.parametrize("changes", [{"version": "1"}, {"tenant": None}, {"version": 2**63}, {"call_time": "now"}])
def test_values_the_schema_cannot_hold_raise_codec_error(changes: dict[str, object]) -> None:
    with pytest.raises(CodecError):
        encode(evidence(**changes))
    with pytest.raises(CodecError):
        fast_encode(evidence(**changes))


def test_values_only_fastavro_takes_are_encoded_as_fastavro_encodes_them() -> None:
    for changes in ({"final": 1}, {"reasons": ("a", "b")}):
        record = evidence(**changes)
        assert fast_encode(record) == encode(record)


def test_inline_longs_booleans_and_remembered_instants_write_fastavros_bytes() -> None:
    """The writer's shortcuts (small longs and booleans inline, encoded instants remembered by value)
    write what fastavro writes, for the values around them too: an instant seen in another time zone
    is the same instant, a naive one is left to fastavro as before, a bool where a long goes is a long."""
    from datetime import timedelta, timezone

    later = T.astimezone(timezone(timedelta(hours=5)))  # equal to T (same instant): same millis
    cases: list[dict[str, object]] = [
        {"version": 0},
        {"version": 4095},
        {"version": 4096},
        {"version": -1},
        {"version": True},
        {"final": False, "late": True},
        {"call_time": later, "decided_at": T + timedelta(microseconds=999)},
        {"call_time": T - timedelta(days=30_000)},  # before the epoch
        {"facts": {"b": 1, "a": [1, 2]}},  # an object's text, not the empty one
    ]
    for changes in cases:
        for _ in range(2):  # the second time from what the writer remembered
            record = evidence(**changes)
            assert fast_encode(record) == encode(record), changes
    naive = evidence(call_time=T.replace(tzinfo=None))  # the writer refuses it: fastavro decides
    assert fast_encode(naive) == encode(naive)
    odd = evidence(final="yes")  # not a bool: the writer refuses it, fastavro decides
    assert fast_encode(odd) == encode(odd)


def test_record_of_is_to_record() -> None:
    """fast_encode's record building equals the codec's for evidence, with and without unknown fields."""
    from schemas.avro_writer import _record_of
    from schemas.codec import _to_record

    for record in (evidence(), evidence(facts={"x": [1]}), Evidence.model_construct(**evidence().__dict__, extra=1)):
        assert _record_of(record) == _to_record(record)
