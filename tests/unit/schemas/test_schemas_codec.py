"""Avro single-object codec: fingerprints, schemas, round trips and hostile input."""

from __future__ import annotations

import json
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any

import fastavro
import pytest
from fastavro.schema import fingerprint, to_parsing_canonical_form
from hypothesis import given
from hypothesis import strategies as st

from schemas import (
    CodecError,
    SchemaModel,
    ToolResult,
    crc64_avro,
    decode,
    encode,
    fingerprint_of,
    register_schema,
    schema_fingerprint,
    to_canonical_json,
)
from schemas.codec import AVRO_DIR, MODELS

Make = Callable[..., dict[str, Any]]
KINDS = list(MODELS)


def model_of(kind: str, data: dict[str, Any]) -> SchemaModel:
    return MODELS[kind].model_validate(data)


# ------------------------------------------------------------------ CRC-64-AVRO

# Signed 64-bit values from Apache Avro's share/test/data/schema-tests.txt.
AVRO_VECTORS = [
    ('"null"', 7195948357588979594),
    ('"boolean"', -6970731678124411036),
    ('"int"', 8247732601305521295),
    ('"long"', -3434872931120570953),
    ('"string"', -8142146995180207161),
    ('{"name":"foo","type":"fixed","size":15}', 1756455273707447556),
    ('{"name":"foo","type":"record","fields":[]}', -4824392279771201922),
    ('["int","boolean"]', 5392556393470105090),
    (
        '{"name":"foo","type":"record","fields":[{"name":"f1","type":"boolean"}]}',
        7843277075252814651,
    ),
]


@pytest.mark.parametrize(("canonical", "signed"), AVRO_VECTORS)
def test_crc64_avro_known_vectors(canonical: str, signed: int) -> None:
    assert crc64_avro(canonical.encode()) == signed % 2**64


@pytest.mark.parametrize(("canonical", "signed"), AVRO_VECTORS)
def test_crc64_avro_matches_fastavro(canonical: str, signed: int) -> None:
    ours = crc64_avro(canonical.encode()).to_bytes(8, "little")
    assert ours.hex() == fingerprint(canonical, "CRC-64-AVRO")


@given(st.text())
def test_crc64_avro_matches_fastavro_on_any_text(text: str) -> None:
    ours = crc64_avro(text.encode()).to_bytes(8, "little")
    assert ours.hex() == fingerprint(text, "CRC-64-AVRO")


def test_crc64_of_empty_input_is_the_seed() -> None:
    assert crc64_avro(b"") == 0xC15D213AA4D7A795


# ------------------------------------------------------------------ schema files


def load(kind: str) -> dict[str, Any]:
    result: dict[str, Any] = json.loads((AVRO_DIR / f"{kind}.avsc").read_text())
    return result


def test_one_schema_file_per_kind() -> None:
    assert sorted(p.stem for p in Path(AVRO_DIR).glob("*.avsc")) == sorted(KINDS)


@pytest.mark.parametrize("kind", KINDS)
def test_schema_file_matches_model(kind: str) -> None:
    schema = load(kind)
    fastavro.parse_schema(schema)
    assert schema["namespace"] == "io.scopewatch.v1"
    assert schema["name"] == MODELS[kind].__name__
    assert schema["doc"]
    names = [f["name"] for f in schema["fields"]]
    assert names == [*MODELS[kind].model_fields, "extra_json"]
    for f in schema["fields"]:
        assert f["doc"], f["name"]
        if isinstance(f["type"], list) and f["type"][0] == "null":
            assert f.get("default", "missing") is None, f["name"]
        model_field = MODELS[kind].model_fields.get(f["name"])
        if model_field is not None and not model_field.is_required():
            assert "default" in f, f"{kind}.{f['name']} needs an Avro default"


@pytest.mark.parametrize("kind", KINDS)
def test_fingerprint_of_is_schema_fingerprint(kind: str) -> None:
    fp = fingerprint_of(kind)
    assert len(fp) == 8
    assert fp == schema_fingerprint(load(kind))
    assert fp.hex() == fingerprint(to_parsing_canonical_form(load(kind)), "CRC-64-AVRO")


def test_fingerprints_are_distinct_and_unknown_kind_fails() -> None:
    assert len({fingerprint_of(k) for k in KINDS}) == len(KINDS)
    with pytest.raises(CodecError, match="unknown event type 'nope'"):
        fingerprint_of("nope")


# -------------------------------------------------------------------- round trips


@pytest.mark.parametrize("kind", KINDS)
def test_round_trip(kind: str, make: Make) -> None:
    model = model_of(kind, make(kind))
    data = encode(model)
    assert data[:2] == b"\xc3\x01"
    assert data[2:10] == fingerprint_of(kind)
    back = decode(data)
    assert type(back) is type(model)
    assert back == model
    assert to_canonical_json(back) == to_canonical_json(model)
    assert encode(back) == data


@pytest.mark.parametrize("kind", KINDS)
def test_unknown_fields_survive_avro(kind: str, make: Make) -> None:
    data = make(kind, x_new={"nested": [1, 2.5, "s", None]}, extra_json="literal")
    if "collector" in data:
        data["collector"] = {**data["collector"], "host": "h1"}
    model = model_of(kind, data)
    back = decode(encode(model))
    assert back == model
    assert back.model_extra == {
        "x_new": {"nested": [1, 2.5, "s", None]},
        "extra_json": "literal",
    }


def test_defaults_round_trip(make: Make) -> None:
    data = make("tool_call")
    for name in ("attested", "claimed", "tool_digest", "collector"):
        del data[name]
    model = model_of("tool_call", data)
    assert decode(encode(model)) == model


def test_decode_accepts_bytes_like(make: Make) -> None:
    model = model_of("session_ended", make("session_ended"))
    data = encode(model)
    assert decode(bytearray(data)) == model
    assert decode(memoryview(data)) == model


# ---------------------------------------------------------------- hostile input


@pytest.mark.parametrize("kind", KINDS)
def test_every_truncation_fails_cleanly(kind: str, make: Make) -> None:
    data = encode(model_of(kind, make(kind)))
    for n in range(len(data)):
        with pytest.raises(CodecError):
            decode(data[:n])


def test_error_reasons(make: Make) -> None:
    data = encode(model_of("tool_call", make("tool_call")))
    cases: list[tuple[Any, str]] = [
        (b"", "empty message"),
        (b"\xc3", "too short"),
        (data[:9], "too short"),
        (data[:20], "truncated ToolCall body"),
        (data + b"\x00", "1 trailing bytes after the ToolCall record"),
        (
            b'{"event_type":"tool_call"}',
            r"not Avro single-object encoding.*7b226576656e745f",
        ),
        (b"\x00\x01\x02", "not Avro single-object encoding.*000102"),
        (
            b"\xc3\x01" + b"\x00" * 8 + data[10:],
            "unknown schema fingerprint 0000000000000000",
        ),
        ("text", "expected bytes, got str"),
        (None, "expected bytes, got NoneType"),
    ]
    for value, reason in cases:
        with pytest.raises(CodecError, match=reason):
            decode(value)


def test_other_schemas_fingerprint_is_unknown(make: Make) -> None:
    data = encode(model_of("tool_call", make("tool_call")))
    foreign = b"\xc3\x01" + schema_fingerprint("null") + data[10:]
    with pytest.raises(CodecError, match="unknown schema fingerprint"):
        decode(foreign)


def raw_message(kind: str, record: dict[str, Any]) -> bytes:
    """Encode a raw Avro record with our schema, bypassing model validation."""
    buf = BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(load(kind)), record)
    return b"\xc3\x01" + fingerprint_of(kind) + buf.getvalue()


BASE_END = {
    "event_type": "session_ended",
    "event_id": "3b6f2a4e-2f7e-4a8e-9c2b-1d2e3f4a5b6c",
    "event_time": 0,
    "tenant": "t",
    "collector": None,
    "session_id": "s",
    "extra_json": None,
}


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({}, None),
        ({"event_id": "x"}, "fails validation: SessionEnded: field 'event_id'"),
        (
            {"event_type": "tool_call"},
            "fails validation: SessionEnded: field 'event_type'",
        ),
        ({"extra_json": "[1]"}, "extra_json is not an object"),
        ({"extra_json": "{bad"}, "field 'extra_json' is not valid JSON"),
        ({"extra_json": '{"x":NaN}'}, "field 'extra_json' is not valid JSON"),
        ({"extra_json": '{"tenant":"evil"}'}, "extra_json repeats field 'tenant'"),
        ({"extra_json": "[" * 100_000}, "not valid JSON"),
    ],
)
def test_body_that_fails_validation(change: dict[str, Any], reason: str | None) -> None:
    data = raw_message("session_ended", {**BASE_END, **change})
    if reason is None:
        assert decode(data).event_type == "session_ended"  # type: ignore[attr-defined]
    else:
        with pytest.raises(CodecError, match=reason):
            decode(data)


def test_bad_json_field_in_body(make: Make) -> None:
    model = model_of("tool_call", make("tool_call"))
    good = encode(model)
    record = fastavro.schemaless_reader(BytesIO(good[10:]), fastavro.parse_schema(load("tool_call")))
    assert isinstance(record, dict)
    for value, reason in [
        ("nope", "'arguments' is not valid JSON"),
        ("[]", "arguments"),
    ]:
        with pytest.raises(CodecError, match=reason):
            decode(raw_message("tool_call", {**record, "arguments": value}))


def test_encode_unknown_model_fails() -> None:
    with pytest.raises(CodecError, match="no Avro schema for SchemaModel"):
        encode(SchemaModel())


@given(st.binary(max_size=200))
def test_random_bytes_only_raise_codec_error(data: bytes) -> None:
    with pytest.raises(CodecError):
        decode(data)


@pytest.mark.parametrize("kind", ["tool_call", "evidence"])
@given(data=st.data())
def test_corrupted_body_only_raises_codec_error(
    kind: str, samples: dict[str, dict[str, Any]], data: st.DataObject
) -> None:
    msg = bytearray(encode(model_of(kind, samples[kind])))
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(10, len(msg) - 1))
        msg[pos] = data.draw(st.integers(0, 255))
    try:
        decode(bytes(msg))
    except CodecError:
        pass


@given(st.binary(max_size=300))
def test_known_header_random_body_only_raises_codec_error(body: bytes) -> None:
    try:
        decode(b"\xc3\x01" + fingerprint_of("grant_issued") + body)
    except CodecError:
        pass


# ---------------------------------------------------------------- schema versions


def test_older_schema_version_still_decodes(make: Make) -> None:
    old = load("tool_result")
    old["fields"] = [f for f in old["fields"] if f["name"] != "result_digest"]
    old_fp = register_schema(old, ToolResult)
    assert old_fp != fingerprint_of("tool_result")
    record = {
        "event_type": "tool_result",
        "event_id": "1b6f2a4e-2f7e-4a8e-9c2b-1d2e3f4a5b6c",
        "event_time": 1000,
        "tenant": "t",
        "collector": None,
        "call_id": "c",
        "session_id": "s",
        "status": "ok",
        "duration_ms": 1.5,
        "error": None,
        "extra_json": None,
    }
    buf = BytesIO()
    fastavro.schemaless_writer(buf, fastavro.parse_schema(old), record)
    back = decode(b"\xc3\x01" + old_fp + buf.getvalue())
    assert isinstance(back, ToolResult)
    assert back.result_digest is None
    assert back.event_time.year == 1970
    # encoding still uses the current schema
    assert encode(back)[2:10] == fingerprint_of("tool_result")
