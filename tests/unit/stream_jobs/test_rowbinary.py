"""The Avro -> RowBinary transcoder of the sink's bulk containers (stream_jobs/native/avro_rowbinary.c).

The C library is compiled here (gcc) and compared byte for byte with the Python reference
(:func:`stream_jobs.rowbinary.transcode_python`); chDB reading what it writes is tested in
tests/integration/stream_jobs/test_clickhouse.py (the engine lives in one process there).
"""

from __future__ import annotations

import io
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from schemas import Evidence, encode
from stream_jobs import rowbinary
from stream_jobs.bulk import BulkBlock
from support.bulk_blocks import Msg as _Msg
from support.bulk_blocks import evidence_block as _block
from support.bulk_blocks import evidence_spec as _spec

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the transcoder")


def _evidence() -> list[Evidence]:
    from datetime import UTC, datetime

    t = datetime(2026, 12, 5, 10, 0, 1, 234000, tzinfo=UTC)
    base = Evidence(
        evidence_id="7d0c1c8e-2a5e-4f0a-9d7e-0b8f3c2a1e11",
        call_id="c-1",
        tenant="acme",
        session_id="s-1",
        principal="alice@acme.example",
        agent_id="agent-7",
        server="fs",
        tool="read_file",
        call_time=t,
        verdict="in_scope",
        matched_grant_id="g-1",
        reasons=["grant g-1 covers fs/read_file", "within the grant's window"],
        version=1,
        final=False,
        late=False,
        decided_at=t,
        facts={},
        fact_ids=["g-1", "b-1"],
        fact_hashes=["sha256:" + "a" * 64, "sha256:" + "b" * 64],
    )
    return [
        base,
        base.model_copy(update={"principal": None, "agent_id": None, "matched_grant_id": None, "evidence_id": "ё-😀"}),
        base.model_copy(update={"reasons": [], "fact_ids": [], "fact_hashes": [], "kind": "", "final": True}),
        base.model_copy(update={"reasons": ["r" * 100_000, ""], "version": 2**32 - 1, "late": True}),
        base.model_copy(update={"call_time": datetime(1960, 1, 1, tzinfo=UTC), "tool": "x" * 200}),
    ]


def test_the_evidence_schema_has_a_program_and_structure() -> None:
    codec = rowbinary.codec_for(_spec())
    assert codec is not None
    assert codec.program.startswith(b"k\n") and codec.program.endswith(b"x\x18")
    assert "`principal` Nullable(String)" in codec.structure
    assert "`reasons` Array(String)" in codec.structure
    assert "`call_time` DateTime64(3, 'UTC')" in codec.structure
    assert "`version` Int64" in codec.structure and "`final` Bool" in codec.structure
    assert codec.structure.endswith("`extra_json` Nullable(String), `_prov` FixedString(24)")
    assert "_hdr" not in codec.structure


def test_rewrite_reads_the_file_as_rowbinary() -> None:
    spec, codec = _spec(), rowbinary.codec_for(_spec())
    assert codec is not None
    block = _block([encode(_evidence()[0])])
    sql = spec.sql("db.evidence", "/dev/shm/x'y.avro", block, 0, "max_threads = 1")
    out = codec.rewrite(sql, "/dev/shm/x'y.avro")
    assert out is not None and "Avro)" not in out
    assert "FROM file('/dev/shm/x\\'y.avro', RowBinary, '`evidence_id` String" in out
    # the same SELECT but for the row's UTF-8 test, which the transcoder does itself ('u' strings)
    assert spec.utf8_check is not None and spec.utf8_check.startswith("(isValidUTF8(concat(`evidence_id`, ")
    assert codec.utf8_check == spec.utf8_check and sql.count(spec.utf8_check) == 1
    assert "isValidUTF8" not in out and "isValidUTF8" in sql
    assert out.replace(out[out.index("FROM file(") : out.index(" WHERE")], "") == sql.replace(
        sql[sql.index("FROM file(") : sql.index(" WHERE")], ""
    ).replace(spec.utf8_check, "")
    assert codec.rewrite("SELECT 1", "/dev/shm/x'y.avro") is None


def test_c_writes_what_the_reference_writes(built: Path) -> None:
    codec = rowbinary.codec_for(_spec())
    assert codec is not None
    block = _block([encode(e) for e in _evidence()] * 3)
    ours = codec.transcode(block)
    assert ours is not None
    reference = rowbinary.transcode_python(codec, block)
    assert reference is not None and bytes(ours) == reference
    # the row of the first record, read by hand: evidence_id as LEB128 length + bytes, the ms as Int64
    first = encode(_evidence()[0])
    assert bytes(ours[:37]) == b"\x24" + b"7d0c1c8e-2a5e-4f0a-9d7e-0b8f3c2a1e11"
    assert first[10:11] == b"\x48"  # Avro's zigzag length of the same 36 bytes


def test_every_string_field_is_validated_unless_one_is_bytes() -> None:
    codec = rowbinary.codec_for(_spec())
    assert codec is not None
    assert b"s" not in codec.program.replace(b"x\x18", b"").replace(b"k\n", b"")  # every Avro string: 'u'
    assert codec.program.count(b"u") >= 20
    # a bytes field is copied unchecked ('s'): then the SQL keeps its UTF-8 test
    import dataclasses
    import json

    spec = _spec()
    schema = json.loads(spec.schema_json)
    schema["fields"].insert(1, {"name": "blob", "type": "bytes"})
    other = rowbinary.codec_for(dataclasses.replace(spec, schema_json=json.dumps(schema).encode()))
    assert other is not None and other.utf8_check is None and b"s" in other.program


def _with_text(raw: bytes) -> bytes:
    """An evidence message whose session_id holds ``raw`` (any bytes, of any validity)."""
    marker = "Q" * len(raw) if raw else ""
    value = encode(_evidence()[0].model_copy(update={"session_id": "<" + marker + ">"}))
    assert value.count(b"<" + marker.encode() + b">") == 1
    return value.replace(b"<" + marker.encode() + b">", b"<" + raw + b">")


_UTF8_CASES = {
    # valid, at the edges of each range
    "ascii": (b"hello, world: sixteen+ bytes", True),
    "two bytes U+0080": (b"\xc2\x80", True),
    "U+07FF": (b"\xdf\xbf", True),
    "U+0800": (b"\xe0\xa0\x80", True),
    "U+D7FF": (b"\xed\x9f\xbf", True),
    "U+E000": (b"\xee\x80\x80", True),
    "U+FFFF": (b"\xef\xbf\xbf", True),
    "U+10000": (b"\xf0\x90\x80\x80", True),
    "U+10FFFF": (b"\xf4\x8f\xbf\xbf", True),
    "NUL": (b"a\x00b", True),
    "mixed after 8 ASCII": (b"abcdefgh\xd1\x91-\xf0\x9f\x98\x80", True),
    # invalid
    "lone continuation": (b"\x80", False),
    "overlong 2-byte": (b"\xc0\x80", False),
    "overlong C1": (b"\xc1\xbf", False),
    "overlong 3-byte": (b"\xe0\x9f\xbf", False),
    "surrogate D800": (b"\xed\xa0\x80", False),
    "surrogate DFFF": (b"\xed\xbf\xbf", False),
    "overlong 4-byte": (b"\xf0\x8f\xbf\xbf", False),
    "past U+10FFFF": (b"\xf4\x90\x80\x80", False),
    "F5": (b"\xf5\x80\x80\x80", False),
    "FF": (b"\xff", False),
    "truncated 2-byte at the end": (b"abc\xc3", False),
    "truncated 3-byte": (b"\xe2\x82", False),
    "truncated 4-byte": (b"\xf0\x9f\x98", False),
    "bad second byte": (b"\xc3(", False),
    "bad third byte": (b"\xe2\x82(", False),
    "bad fourth byte": (b"\xf0\x9f\x98(", False),
    "invalid after 8 ASCII": (b"abcdefgh\xff", False),
    "invalid inside 8 bytes": (b"abc\xffdefgh", False),
    "invalid after 32 ASCII": (b"a" * 40 + b"\xc3", False),
    "invalid inside 32 bytes": (b"a" * 20 + b"\xff" + b"a" * 20, False),
    "valid after 64 ASCII": (b"a" * 64 + "é".encode() + b"a" * 33, True),
    # text ending exactly after the 32-byte steps (the byte after it is the next field's, never read)
    "32 ASCII": (b"b" * 30, True),
    "64 ASCII": (b"c" * 62, True),
    "96 ASCII": (b"d" * 94, True),
    "8 ASCII": (b"e" * 6, True),
}


@pytest.mark.parametrize("case", sorted(_UTF8_CASES))
def test_text_that_is_not_valid_utf8_refuses_the_container(built: Path, case: str) -> None:
    """The C accepts exactly what Python's UTF-8 decoder accepts (the per-message path's reader)."""
    raw, valid = _UTF8_CASES[case]
    try:
        raw.decode("utf-8")
        python_valid = True
    except UnicodeDecodeError:
        python_valid = False
    assert python_valid == valid
    codec = rowbinary.codec_for(_spec())
    assert codec is not None
    block = _block([encode(_evidence()[1]), _with_text(raw)])
    ours = codec.transcode(block)
    assert (ours is not None) == valid
    reference = rowbinary.transcode_python(codec, block)
    assert (reference is not None) == valid
    if ours is not None:
        assert bytes(ours) == reference


@pytest.mark.parametrize("size", [8, 32, 64, 96, 128])
def test_ascii_text_ending_on_a_step_boundary_before_a_long_length(built: Path, size: int) -> None:
    """Text of 8/32/... ASCII bytes followed by a field whose length varint starts with a byte >= 0x80:
    the validator must stop at the text's end (it once read that next byte as the text's own)."""
    reasons = ["a" * size, "b" * 96, "c" * size, "é" * 40]
    block = _block([encode(_evidence()[0].model_copy(update={"reasons": reasons, "tool": "t" * size}))])
    codec = rowbinary.codec_for(_spec())
    assert codec is not None
    ours = codec.transcode(block)
    assert ours is not None
    assert bytes(ours) == rowbinary.transcode_python(codec, block)


def test_utf8_validation_matches_python_on_random_bytes(built: Path) -> None:
    import random

    rng = random.Random(16)
    codec = rowbinary.codec_for(_spec())
    assert codec is not None
    alphabet = [b"a", b"\x00", b"\x7f", b"\x80", b"\xbf", b"\xc2", b"\xdf", b"\xe0", b"\xed", b"\xef", b"\xf0"]
    alphabet += [b"\xf4", b"\xf5", b"\xff", b"\xa0", b"\x9f", b"\x90", b"\x8f", "é".encode(), "😀".encode()]
    seen = {True: 0, False: 0}
    for _ in range(3000):
        raw = b"a" * rng.choice((0, 7, 31, 33)) + b"".join(rng.choice(alphabet) for _ in range(rng.randint(1, 12)))
        try:
            raw.decode("utf-8")
            valid = True
        except UnicodeDecodeError:
            valid = False
        seen[valid] += 1
        assert (codec.transcode(_block([_with_text(raw)])) is not None) == valid, raw
    assert min(seen.values()) > 50


def _corrupt(kind: str) -> bytes:
    value = bytearray(encode(_evidence()[0]))
    if kind == "trailing bytes":
        return bytes(value) + b"\x00"
    if kind == "truncated":
        return bytes(value[:-1])
    if kind == "overlong varint":
        return bytes(value[:10]) + b"\xc8" + b"\x80" * 9 + b"\x00" + bytes(value[11:])
    if kind == "negative length":
        return bytes(value[:10]) + b"\x01" + bytes(value[11:])
    if kind == "length past the end":
        return bytes(value[:10]) + b"\xfe\xff\x03" + bytes(value[11:])
    if kind == "boolean 2":
        value[-2] = 2  # history_complete, before extra_json's null
        return bytes(value)
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind", ["trailing bytes", "truncated", "overlong varint", "negative length", "length past the end", "boolean 2"]
)
def test_a_malformed_record_refuses_the_whole_container(built: Path, kind: str) -> None:
    codec = rowbinary.codec_for(_spec())
    assert codec is not None
    good = encode(_evidence()[1])
    block = _block([good, _corrupt(kind), good])
    assert codec.transcode(block) is None
    assert rowbinary.transcode_python(codec, block) is None
    assert codec.transcode(_block([good, good])) is not None


def test_a_container_not_built_as_the_sink_builds_it_is_refused(built: Path) -> None:
    codec = rowbinary.codec_for(_spec())
    assert codec is not None
    block = _block([encode(e) for e in _evidence()])
    block.messages.append(_Msg(0))  # one row more than the blocks hold
    assert codec.transcode(block) is None
    block = _block([encode(e) for e in _evidence()])
    block.runs.append((0, block.runs[0][1]))  # runs that do not start at increasing rows
    assert codec.transcode(block) is None
    block = _block([encode(e) for e in _evidence()])
    block.runs[0] = (0, b"short")  # a _prov prefix that is not 16 bytes
    assert codec.transcode(block) is None


def test_values_of_several_partitions_and_topics_are_read_without_the_container(
    built: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The transcoder reads the message values straight (no Avro container built): each partition's run
    gets its own _prov prefix, byte for byte what the container path (the Python reference) writes."""
    codec = rowbinary.codec_for(_spec())
    assert codec is not None
    values = [encode(e) for e in _evidence()]
    block = BulkBlock(_spec())
    # the sink adds one partition's messages at a time; a partition may come back in a later fetch
    for topic, partition, count in [("a", 0, 3), ("a", 1, 1), ("b", 0, 2), ("a", 0, 4), ("a", 0, 1), ("a", 1, 2)]:
        prefix = block.prefix(topic, partition)
        for _ in range(count):
            block.add(_Msg(len(block) * 7 + partition), values[len(block) % len(values)], prefix)
    assert len(block.runs) == 5  # ("a", 0) twice in a row makes one run
    reference = rowbinary.transcode_python(codec, block)
    assert reference is not None

    def no_container(self: BulkBlock) -> bytes:
        raise AssertionError("the container was built")

    monkeypatch.setattr(BulkBlock, "payload", no_container)
    ours = codec.transcode(block)
    assert ours is not None and bytes(ours) == reference
    # row 3 is partition 1 of topic "a" (index 0), offset 3 * 7 + 1, at the end of its row
    rows = bytes(ours)
    assert block.nonce + (0).to_bytes(4, "little") + (1).to_bytes(4, "little") + (22).to_bytes(8, "little") in rows
    assert block.nonce + (1).to_bytes(4, "little") + (0).to_bytes(4, "little") + (28).to_bytes(8, "little") in rows


def test_without_the_library_the_writer_keeps_avro(monkeypatch: pytest.MonkeyPatch) -> None:
    from stream_jobs.sink import ClickHouseWriter

    monkeypatch.setattr(rowbinary, "_LIB", [None])
    spec = _spec()
    assert rowbinary.codec_of(spec, "auto") is None
    assert rowbinary.codec_of(spec, "rowbinary") is None
    writer: Any = ClickHouseWriter.__new__(ClickHouseWriter)
    writer.decoder, writer.rowbinary_fallbacks = "auto", 0
    block = _block([encode(_evidence()[0])])
    out = io.BytesIO()
    assert writer._write_container(out, block, "/p", "SQL FROM file('/p', Avro) x") == "SQL FROM file('/p', Avro) x"
    assert out.getvalue() == block.payload()


def test_the_avro_decoder_is_never_transcoded(built: Path) -> None:
    assert rowbinary.codec_of(_spec(), "avro") is None
    assert rowbinary.codec_of(_spec(), "auto") is not None


@pytest.mark.parametrize(
    ("edit", "why"),
    [
        (lambda src: src.replace("long sw_avro_rowbinary_abi(void) { return 4; }", ""), "built before the UTF-8 check"),
        (lambda src: src.replace("{ return 4; }", "{ return 2; }"), "built before the values path"),
        (lambda src: src.replace("{ return 4; }", "{ return 3; }"), "built before the list groups"),
    ],
)
def test_a_library_of_other_sources_is_not_loaded(
    edit: Any, why: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A stale library (built before the C transcoder checked UTF-8) would let invalid text in with
    the SQL check dropped: the loader refuses it and the sink reads Avro, checked in SQL."""
    source = tmp_path / "old.c"
    source.write_text(edit(rowbinary.SOURCE.read_text()))
    assert source.read_text() != rowbinary.SOURCE.read_text(), why
    lib = tmp_path / rowbinary.LIBRARY_NAME
    subprocess.run(
        ["gcc", *rowbinary.CFLAGS, "-o", str(lib), str(source), *rowbinary.LIBS], check=True, capture_output=True
    )
    monkeypatch.setenv("SCOPEWATCH_AVRO_ROWBINARY_LIB", str(lib))
    monkeypatch.setattr(rowbinary, "_LIB", [])
    assert rowbinary.library() is None
    assert rowbinary.codec_of(_spec(), "auto") is None
    assert "did not load" in caplog.text
