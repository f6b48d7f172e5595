"""Evidence list groups (issue 16): the C transcoder, the Python reference and ClickHouse's SQL compute the
same SHA-256/128 key of a list byte for byte, and the narrow rows plus each batch's distinct lists hold
exactly what the full rows held."""

from __future__ import annotations

import hashlib
import shutil
import tempfile
from pathlib import Path

import pytest

from schemas import Evidence, encode
from stream_jobs import rowbinary
from stream_jobs.evidence_lists import GROUPS, key_of, key_sql, rowbinary_of
from support.bulk_blocks import evidence_block as _block
from support.bulk_blocks import evidence_spec as _spec

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the transcoder")

TRICKY: list[tuple[list[str], list[str]]] = [
    ([], []),
    ([""], []),
    (["a", "bc"], ["x"]),
    (["ab", "c"], ["x"]),  # the same text split elsewhere: another key
    (["abc"], ["x"]),
    (["a\x00b", "\n"], ["", ""]),
    (["ё-😀 grant g-1 covers fs/read_file", "x" * 127], ["y" * 128]),  # LEB128 lengths of 1 and 2 bytes
    (["r" * 70_000, *map(str, range(200))], ["sha256:" + "a" * 64] * 130),  # 3-byte length, 2-byte count
]


def _evidence() -> list[Evidence]:
    from datetime import UTC, datetime

    t = datetime(2026, 12, 5, 10, 0, 1, 234000, tzinfo=UTC)
    base = Evidence(
        evidence_id="7d0c1c8e-2a5e-4f0a-9d7e-0b8f3c2a1e11",
        call_id="c-1",
        tenant="acme",
        session_id="s-1",
        server="fs",
        tool="read_file",
        call_time=t,
        verdict="in_scope",
        reasons=[],
        version=1,
        final=False,
        late=False,
        decided_at=t,
    )
    return [
        base.model_copy(update={"call_id": f"c-{i}", "reasons": r, "fact_ids": f, "fact_hashes": f[::-1]})
        for i, (r, f) in enumerate(TRICKY)
    ]


def _split(rows: bytes, width: int) -> list[bytes]:
    return [rows[i : i + width] for i in range(0, len(rows), width)]


def test_keys_agree_in_c_python_and_sql(built: Path) -> None:
    """The same key from the C transcoder's side output, from key_of and from key_sql in chDB (the migration's
    and the Avro path's), for lists that differ only in where a text is split, with NULs, non-ASCII text and
    multi-byte LEB128 lengths and counts."""
    import chdb

    codec = rowbinary.codec_for(_spec(), GROUPS)
    assert codec is not None and codec.program.count(b"[") == 2 == codec.program.count(b"]")
    events = _evidence()
    got = codec.transcode_lists(_block([encode(e) for e in events]))
    assert got is not None
    _rows, (reasons, facts) = got
    expected_r = [key_of(e.reasons) for e in events]
    expected_f = [key_of(e.fact_ids, e.fact_hashes) for e in events]
    assert len(set(expected_r)) == len(TRICKY)  # ["a", "bc"] and ["ab", "c"] (and ["abc"]) differ
    assert expected_r[0] == hashlib.sha256(b"\x00").digest()[:16]
    assert expected_r[2] == hashlib.sha256(b"\x02\x01a\x02bc").digest()[:16]
    with tempfile.TemporaryDirectory() as folder:
        for name, side, cols, expected in (
            ("r", reasons, ("reasons",), expected_r),
            ("f", facts, ("fact_ids", "fact_hashes"), expected_f),
        ):
            path = Path(folder) / f"{name}.rowbinary"
            path.write_bytes(side)
            structure = codec.side_structures[0 if name == "r" else 1]
            sql = f"SELECT hex(id), hex({key_sql(cols)}) FROM file('{path}', RowBinary, '{structure}')"
            out = [line.split("\t") for line in chdb.query(sql, "TSV").data().splitlines()]
            assert [c for c, _ in out] == [s for s, _ in out]  # C == SQL, each distinct value
            assert [bytes.fromhex(c) for c, _ in out] == list(dict.fromkeys(expected))  # == Python, first-seen


def test_narrow_rows_and_lists_equal_the_reference_and_the_full_rows(built: Path) -> None:
    """C == the Python reference; each distinct list once per batch (in first-seen order); putting each key's
    list back into the narrow rows gives exactly the full transcoder's rows."""
    grouped = rowbinary.codec_for(_spec(), GROUPS)
    full = rowbinary.codec_for(_spec())
    assert grouped is not None and full is not None
    assert "`reason_key` FixedString(16)" in grouped.structure and "`reasons`" not in grouped.structure
    assert "`fact_key` FixedString(16)" in grouped.structure and "`fact_ids`" not in grouped.structure
    events = _evidence() * 5  # every list repeated
    block = _block([encode(e) for e in events])
    ours = grouped.transcode_lists(block)
    reference = rowbinary.transcode_lists_python(grouped, block)
    assert ours is not None and reference is not None
    assert bytes(ours[0]) == reference[0] and ours[1] == reference[1]
    rows = bytes(ours[0])
    whole = rowbinary.transcode_python(full, block)
    assert whole is not None and len(rows) < len(whole)
    lists: dict[bytes, bytes] = {}
    for e in events:
        for key, value in (
            (key_of(e.reasons), rowbinary_of([e.reasons])),
            (key_of(e.fact_ids, e.fact_hashes), rowbinary_of([e.fact_ids, e.fact_hashes])),
        ):
            lists[key] = value
    side_bytes = sum(len(v) + 16 for v in lists.values())
    assert sum(map(len, ours[1])) == side_bytes  # each distinct value once
    rebuilt = rows
    for key, value in lists.items():
        rebuilt = rebuilt.replace(key, value)
    assert rebuilt == whole


def test_a_too_small_side_output_is_retried(built: Path) -> None:
    """Lists larger than the rows' bytes allow for (a first try's side buffer) still come out whole."""
    grouped = rowbinary.codec_for(_spec(), GROUPS)
    assert grouped is not None
    events = [e.model_copy(update={"call_id": f"c-{i}", "reasons": [f"{i}" * 3000]}) for i, e in enumerate(_evidence())]
    block = _block([encode(e) for e in events])
    ours = grouped.transcode_lists(block)
    assert ours is not None and ours[1] == rowbinary.transcode_lists_python(grouped, block)[1]  # type: ignore[index]
