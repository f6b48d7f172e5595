"""The spool file format: framing, CRC, torn and corrupt records, acknowledgements, ownership."""

from __future__ import annotations

import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from collectors.config import state_home
from collectors.spool import (
    FILE_HEADER,
    HEAD_LEN,
    KIND_EVENT,
    KIND_LOSS,
    Segment,
    SpoolConfig,
    SpoolConfigError,
    SpoolDir,
    SpoolFull,
    decode_payload,
    encode_payload,
    encode_record,
    inspect_spool,
    read_pending,
    scan_segment,
)


def _write_segment(path: Path, values: list[bytes], topic: str = "mcp.tool-calls") -> list[int]:
    """A segment with one event per value; returns each record's start offset."""
    seg = Segment.create(path)
    starts = []
    for value in values:
        starts.append(seg.size)
        seg.append([(KIND_EVENT, encode_payload(topic, b"session-1", value))])
    seg.close()
    return starts


def _values(path: Path) -> list[bytes]:
    return [entry.value for entry in read_pending(path)]


@given(
    topic=st.text(max_size=40),
    key=st.none() | st.binary(max_size=50),
    value=st.binary(max_size=300),
)
def test_payload_round_trip(topic: str, key: bytes | None, value: bytes) -> None:
    assert decode_payload(encode_payload(topic, key, value)) == (topic, key, value)


def test_record_layout_is_magic_length_crc_body() -> None:
    record = encode_record(KIND_EVENT, b"abc")
    magic, length, _crc = struct.unpack_from("<4sII", record)
    assert magic == b"SWR1" and length == 4 and record[HEAD_LEN:] == bytes([KIND_EVENT]) + b"abc"


def test_written_records_read_back_in_order(tmp_path: Path) -> None:
    path = tmp_path / "a-000001.seg"
    values = [f"event {i}".encode() for i in range(50)]
    _write_segment(path, values)
    assert path.read_bytes().startswith(FILE_HEADER)
    scan = scan_segment(path)
    assert (scan.count, scan.acked, scan.problems) == (50, 0, [])
    assert _values(path) == values


def test_torn_tail_is_detected_and_reported(tmp_path: Path) -> None:
    path = tmp_path / "a-000001.seg"
    _write_segment(path, [b"one", b"two", b"three" * 20])
    size = path.stat().st_size
    os.truncate(path, size - 7)  # the writer died in the middle of the last record
    scan = scan_segment(path)
    assert scan.count == 2
    [problem] = scan.problems
    assert problem.kind == "torn_tail"
    assert problem.offset + problem.length == size - 7
    assert "incomplete record at the end" in problem.describe()
    assert _values(path) == [b"one", b"two"]


def test_a_partial_record_header_is_a_torn_tail(tmp_path: Path) -> None:
    path = tmp_path / "a-000001.seg"
    _write_segment(path, [b"one"])
    with open(path, "ab") as out:
        out.write(encode_record(KIND_EVENT, b"two")[:5])
    scan = scan_segment(path)
    assert scan.count == 1
    assert [p.kind for p in scan.problems] == ["torn_tail"]
    assert scan.problems[0].length == 5


def test_crc_mismatch_is_reported_and_the_reader_resynchronises(tmp_path: Path) -> None:
    path = tmp_path / "a-000001.seg"
    starts = _write_segment(path, [b"first", b"second", b"third"])
    data = bytearray(path.read_bytes())
    data[starts[1] + HEAD_LEN + 5] ^= 0xFF  # one bit-flip inside the second record's body
    path.write_bytes(bytes(data))
    scan = scan_segment(path)
    [problem] = scan.problems
    assert problem.kind == "corrupt" and "CRC mismatch" in problem.detail
    assert (problem.offset, problem.length) == (starts[1], starts[2] - starts[1])
    assert _values(path) == [b"first", b"third"]


def test_crc_mismatch_in_the_last_record_is_corruption_not_a_torn_write(tmp_path: Path) -> None:
    path = tmp_path / "a-000001.seg"
    _write_segment(path, [b"first", b"second"])
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))
    scan = scan_segment(path)
    assert [p.kind for p in scan.problems] == ["corrupt"]
    assert _values(path) == [b"first"]


def test_garbage_between_records_is_skipped_with_its_exact_extent(tmp_path: Path) -> None:
    path = tmp_path / "a-000001.seg"
    _write_segment(path, [b"first"])
    garbage = b"\x00" * 37 + b"SWR1" + b"\xff" * 11  # even a stray magic does not fool the reader
    with open(path, "ab") as out:
        offset = out.tell()
        out.write(garbage + encode_record(KIND_EVENT, encode_payload("t", None, b"after")))
    scan = scan_segment(path)
    [problem] = scan.problems
    assert (problem.kind, problem.offset, problem.length) == ("corrupt", offset, len(garbage))
    assert _values(path) == [b"first", b"after"]


def test_a_file_without_segment_header_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "a-000001.seg"
    path.write_bytes(encode_record(KIND_EVENT, encode_payload("t", None, b"x")))
    scan = scan_segment(path)
    assert scan.count == 1
    assert [p.detail for p in scan.problems] == ["no segment header"]


@settings(max_examples=60, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cut=st.integers(min_value=0, max_value=400), flip=st.none() | st.integers(min_value=0, max_value=400))
def test_any_damage_yields_a_subsequence_and_never_raises(tmp_path: Path, cut: int, flip: int | None) -> None:
    path = tmp_path / f"x{cut}-{flip}-000001.seg"
    values = [f"value-{i}".encode() * 3 for i in range(8)]
    _write_segment(path, values)
    data = bytearray(path.read_bytes())
    if flip is not None and flip < len(data):
        data[flip] ^= 0x5A
    path.write_bytes(bytes(data[: max(0, len(data) - cut)]))
    got = _values(path)
    it = iter(values)
    assert all(v in it for v in got)  # in order, nothing invented
    scan = scan_segment(path)
    damaged = cut > 0 or (flip is not None and flip < len(data))
    assert (scan.count == len(values) and not scan.problems) or damaged
    path.unlink()


def test_ack_markers_mark_delivered_records(tmp_path: Path) -> None:
    path = tmp_path / "a-000001.seg"
    seg = Segment.create(path)
    placed = seg.append([(KIND_EVENT, encode_payload("t", None, str(i).encode())) for i in range(5)])
    seg.mark_acked(*placed[2])
    seg.write_ack()
    seg.write_ack()  # unchanged: no second marker
    seg.append([(KIND_LOSS, encode_payload("dl", None, b"loss"))])
    seg.close()
    scan = scan_segment(path)
    assert (scan.count, scan.acked, scan.pending, scan.events, scan.losses) == (6, 3, 3, 5, 1)
    assert [(e.kind, e.value) for e in read_pending(path)] == [
        (KIND_EVENT, b"3"),
        (KIND_EVENT, b"4"),
        (KIND_LOSS, b"loss"),
    ]


def test_unread_and_rewind_hand_records_out_again(tmp_path: Path) -> None:
    seg = Segment.create(tmp_path / "a-000001.seg")
    seg.append([(KIND_EVENT, encode_payload("t", None, str(i).encode())) for i in range(3)])
    first = seg.read_next()
    second = seg.read_next()
    assert first is not None and second is not None and (first.value, second.value) == (b"0", b"1")
    seg.unread(second)
    again = seg.read_next()
    assert again is not None and again.value == b"1"
    seg.mark_acked(first.index, first.end)
    seg.rewind()
    assert [seg.read_next().value for _ in range(2)] == [b"1", b"2"]  # type: ignore[union-attr]
    assert seg.read_next() is None
    seg.close()


def _config(tmp_path: Path, **kw: object) -> SpoolConfig:
    return SpoolConfig(tmp_path / "spool", **kw)  # type: ignore[arg-type]


def test_a_full_spool_refuses_events_but_keeps_room_for_loss_records(tmp_path: Path) -> None:
    spool = SpoolDir(_config(tmp_path, max_bytes=64 * 1024))
    spool.open()
    event = (KIND_EVENT, encode_payload("t", None, b"x" * 1000))
    with pytest.raises(SpoolFull):
        for _ in range(100):
            spool.append([event])
    assert spool.bytes_used <= spool.config.max_bytes - spool.config.reserve_bytes
    spool.append([(KIND_LOSS, encode_payload("dl", None, b"lost 40"))], reserve_ok=True)
    spool.close(keep=True)


def test_segments_roll_over_and_delivered_ones_are_deleted(tmp_path: Path) -> None:
    spool = SpoolDir(_config(tmp_path, segment_bytes=4096))
    spool.open()
    placed = [spool.append([(KIND_EVENT, encode_payload("t", None, b"y" * 500))])[0] for _ in range(20)]
    assert len(spool.segments) >= 3
    first = spool.segments[0]
    for seg, index, end in placed:
        if seg is first:
            seg.mark_acked(index, end)
    spool.drop_delivered()
    assert first not in spool.segments and not first.path.exists()
    spool.close(keep=True)
    assert inspect_spool(tmp_path / "spool").pending == 20 - sum(1 for s, _i, _e in placed if s is first)


def test_a_live_owner_keeps_its_segments_and_a_dead_ones_are_adopted(tmp_path: Path) -> None:
    config = _config(tmp_path)
    owner = SpoolDir(config)
    owner.open()
    owner.append([(KIND_EVENT, encode_payload("t", None, b"from the first collector"))])
    other = SpoolDir(config)
    assert other.open() == []  # the owner's flock is held (another open file description)
    report = inspect_spool(config.dir)
    assert report.locks == {owner.token: True, other.token: True}
    owner.close(keep=True)  # as after kill -9: the lock is free, the files stay
    heir = SpoolDir(config)
    [adopted] = heir.open()
    assert adopted.pending == 1 and adopted.read_next().value == b"from the first collector"  # type: ignore[union-attr]
    assert other.adopt() == []  # the heir holds it now
    adopted.mark_acked(0, adopted.size)
    heir.drop_delivered()
    assert not adopted.path.exists() and not (config.dir / f"{owner.token}.lock").exists()
    for spool in (other, heir):
        spool.close(keep=False)
    assert list(config.dir.iterdir()) == []


def test_adoption_cuts_a_torn_tail_before_appending_acks(tmp_path: Path) -> None:
    config = _config(tmp_path)
    config.dir.mkdir(parents=True)
    path = config.dir / "00000000000000000001.1.deadbeef-000001.seg"
    _write_segment(path, [b"a", b"b"])
    with open(path, "ab") as out:
        out.write(encode_record(KIND_EVENT, encode_payload("t", None, b"c"))[:-3])
    heir = SpoolDir(config)
    [seg] = heir.open()
    assert [p.kind for p in seg.problems] == ["torn_tail"]
    first = seg.read_next()
    assert first is not None
    seg.mark_acked(first.index, first.end)
    seg.write_ack()
    heir.close(keep=True)
    scan = scan_segment(path)
    assert (scan.count, scan.acked, scan.problems) == (2, 1, [])


def test_config_from_the_environment(tmp_path: Path) -> None:
    config = SpoolConfig.from_env({"SCOPEWATCH_HOME": str(tmp_path), "SCOPEWATCH_TOPIC_PREFIX": "t1."})
    assert config.dir == tmp_path.resolve() / "spool"
    assert (config.fsync, config.on_full, config.loss_topic) == ("interval", "block", "t1.audit.dead-letter")
    assert state_home({}) == Path.home() / ".scopewatch"
    config = SpoolConfig.from_env(
        {
            "SCOPEWATCH_SPOOL_DIR": str(tmp_path / "s"),
            "SCOPEWATCH_SPOOL_FSYNC": "Always",
            "SCOPEWATCH_SPOOL_ON_FULL": "fail",
            "SCOPEWATCH_SPOOL_MAX_BYTES": "1048576",
            "SCOPEWATCH_SPOOL_BLOCK_TIMEOUT": "2.5",
            "SCOPEWATCH_SPOOL_STALL_SECONDS": "0.5",
        }
    )
    assert (config.dir, config.fsync, config.on_full, config.max_bytes, config.block_timeout, config.stall_seconds) == (
        tmp_path / "s",
        "always",
        "fail",
        1 << 20,
        2.5,
        0.5,
    )
    with pytest.raises(SpoolConfigError, match="stall_seconds"):
        SpoolConfig.from_env({"SCOPEWATCH_SPOOL_STALL_SECONDS": "0"})
    with pytest.raises(SpoolConfigError, match="fsync policy"):
        SpoolConfig.from_env({"SCOPEWATCH_SPOOL_FSYNC": "sometimes"})
    with pytest.raises(SpoolConfigError, match="SCOPEWATCH_SPOOL_MAX_BYTES: Input should be a valid integer"):
        SpoolConfig.from_env({"SCOPEWATCH_SPOOL_MAX_BYTES": "lots"})
