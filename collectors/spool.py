"""The collectors' local spool: an append-only, CRC-checked record log on disk.

When Kafka is unreachable, :class:`~collectors.publisher.BackgroundPublisher` writes the events
it cannot deliver to a spool directory and replays them, in order, when the broker returns.
This module owns the file format, the segment files and who may touch them.

File format
    A spool is a set of *segment* files ``<token>-<n>.seg``. A segment starts with the 8-byte
    header ``SWSPOOL1`` followed by records::

        magic "SWR1" | u32 length | u32 crc32(length bytes + body) | body (length bytes)
        body = kind (1 byte) | payload

    kinds: ``1`` event, ``2`` loss record, both with the payload
    ``u16 topic length | topic | i32 key length (-1: no key) | key | value`` (the value is the
    Avro message, exactly what goes to Kafka); ``3`` ack, payload ``u64``: the first *n*
    event/loss records of this segment were delivered. Integers are little-endian.

    A reader checks every record's magic, length and CRC. An incomplete record at the end of
    a file (a *torn* write: the writer died mid-write) and a record whose CRC or magic does
    not match (*corruption*) are both detected and reported as :class:`Problem`\\ s; the reader
    resynchronises on the next valid record, so one bad record never hides the rest.

Ownership
    Each spool user holds an exclusive ``flock`` on ``<token>.lock`` for as long as it runs.
    A lock nobody holds belongs to a collector that is gone (exited or ``kill -9``-ed): the
    next collector started on the same directory takes the lock and *adopts* those segments,
    so their events are delivered. ``flock`` locks die with their process; no pid files.

Durability (``SCOPEWATCH_SPOOL_FSYNC``)
    ``always``
        ``fdatasync`` after every batch of records written (a batch is whatever the publisher
        thread took from memory at once), and the directory after a new segment file.
    ``interval`` (default)
        at most every ``SCOPEWATCH_SPOOL_FSYNC_INTERVAL`` seconds (default 1.0) while there is
        unsynced data.
    ``never``
        leave it to the operating system.

    Whatever the policy, a record is in the kernel's page cache once written, so killing the
    collector (even ``kill -9``) loses nothing that reached the spool; the policy only bounds
    what a crash of the *host* (power loss, kernel panic) can take: nothing acknowledged by
    ``always``, up to the interval with ``interval``, the OS's writeback delay with ``never``.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import re
import secrets
import struct
import time
import zlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from schemas.topics import DEAD_LETTER

__all__ = [
    "FILE_HEADER",
    "KIND_ACK",
    "KIND_EVENT",
    "KIND_LOSS",
    "RECORD_MAGIC",
    "FsyncPolicy",
    "OnFull",
    "Problem",
    "Segment",
    "SpoolConfig",
    "SpoolConfigError",
    "SpoolDir",
    "SpoolEntry",
    "SpoolFull",
    "decode_payload",
    "encode_payload",
    "encode_record",
    "inspect_spool",
    "scan_segment",
]

FsyncPolicy = Literal["always", "interval", "never"]
OnFull = Literal["block", "fail"]

FILE_HEADER = b"SWSPOOL1"
RECORD_MAGIC = b"SWR1"
_RECORD_HEAD = struct.Struct("<4sII")  # magic, body length, crc
HEAD_LEN = _RECORD_HEAD.size
KIND_EVENT = 1
KIND_LOSS = 2
KIND_ACK = 3
DELIVERABLE = (KIND_EVENT, KIND_LOSS)
MAX_RECORD_BYTES = 64 * 1024 * 1024
_SCAN_CHUNK = 1 << 20
_SEGMENT_RE = re.compile(r"^(?P<token>[A-Za-z0-9_.]+)-(?P<n>\d{6,})\.seg$")

GiB = 1 << 30
MiB = 1 << 20


class SpoolFull(Exception):
    """The spool has no room for this record (its size limit is reached)."""


class SpoolConfigError(ValueError):
    """A spool setting in the environment is invalid (message names it, never a secret)."""


# ----------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SpoolConfig:
    """Where and how a publisher spools.

    ``max_bytes``: size limit of the spool (all segments); ``segment_bytes``: a segment is
    closed and a new one started past this size, and a delivered segment is deleted.
    ``on_full``: what :meth:`BackgroundPublisher.publish` does when memory and spool are full:
    ``block`` waits for room (at most ``block_timeout`` seconds, None: as long as it takes),
    ``fail`` refuses the event at once (fail closed: the caller learns it was not recorded).
    Either way every event that is not recorded is counted in a *loss record* that is spooled
    and delivered to ``loss_topic`` (the dead-letter topic) -- never a silent drop.
    """

    dir: Path
    max_bytes: int = 1 * GiB
    segment_bytes: int = 64 * MiB
    fsync: FsyncPolicy = "interval"
    fsync_interval: float = 1.0
    on_full: OnFull = "block"
    block_timeout: float | None = None
    loss_topic: str = DEAD_LETTER
    stall_seconds: float = 1.0
    """Kafka counts as unreachable once an event waits this long for its acknowledgement (or a
    connection attempt takes this long): from then on everything unacknowledged is spooled. This is
    the bound on how long an event stays only in memory while the broker is down -- what a
    ``kill -9`` at that moment could lose."""

    def __post_init__(self) -> None:
        if self.fsync not in ("always", "interval", "never"):
            raise SpoolConfigError(f"fsync policy must be always, interval or never, not {self.fsync!r}")
        if self.on_full not in ("block", "fail"):
            raise SpoolConfigError(f"on_full must be block or fail, not {self.on_full!r}")
        if self.max_bytes < 64 * 1024:
            raise SpoolConfigError("the spool's max_bytes must be at least 64 KiB")
        if self.segment_bytes < 4096:
            raise SpoolConfigError("the spool's segment_bytes must be at least 4 KiB")
        if self.fsync_interval <= 0:
            raise SpoolConfigError("fsync_interval must be positive")
        if not 0 < self.stall_seconds <= 60:
            raise SpoolConfigError("stall_seconds must be positive and at most 60")
        if self.block_timeout is not None and self.block_timeout < 0:
            raise SpoolConfigError("block_timeout must not be negative")

    @property
    def reserve_bytes(self) -> int:
        """Room kept free for loss records: a full spool can always still say what it lost."""
        return min(256 * 1024, self.max_bytes // 8)

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> SpoolConfig:
        """The spool settings of this host (``SCOPEWATCH_SPOOL_*``, read by :mod:`collectors.config`)."""
        from collectors.config import spool_from_env

        return spool_from_env(environ)


# ----------------------------------------------------------------------------- record format


def encode_payload(topic: str, key: bytes | None, value: bytes) -> bytes:
    """The payload of an event or loss record."""
    raw_topic = topic.encode("utf-8")
    if len(raw_topic) > 0xFFFF:
        raise ValueError("topic name too long")
    key_part = struct.pack("<i", -1) if key is None else struct.pack("<i", len(key)) + key
    return struct.pack("<H", len(raw_topic)) + raw_topic + key_part + value


def decode_payload(payload: bytes) -> tuple[str, bytes | None, bytes]:
    """``(topic, key, value)`` of an event or loss record payload; ValueError if malformed."""
    try:
        (topic_len,) = struct.unpack_from("<H", payload, 0)
        pos = 2 + topic_len
        topic = payload[2:pos].decode("utf-8")
        (key_len,) = struct.unpack_from("<i", payload, pos)
    except (struct.error, UnicodeDecodeError) as exc:
        raise ValueError(f"malformed spool payload: {exc}") from None
    pos += 4
    if key_len < -1 or pos + max(key_len, 0) > len(payload):
        raise ValueError("malformed spool payload: bad key length")
    key = None if key_len == -1 else payload[pos : pos + key_len]
    return topic, key, payload[pos + max(key_len, 0) :]


def encode_record(kind: int, payload: bytes) -> bytes:
    """One framed record: magic, length, CRC, body."""
    body = bytes((kind,)) + payload
    length = struct.pack("<I", len(body))
    return RECORD_MAGIC + length + struct.pack("<I", zlib.crc32(length + body)) + body


def _ack_record(count: int) -> bytes:
    return encode_record(KIND_ACK, struct.pack("<Q", count))


@dataclass(frozen=True)
class Problem:
    """A stretch of a segment that holds no valid record."""

    path: Path
    offset: int
    length: int
    kind: Literal["torn_tail", "corrupt"]
    detail: str

    def describe(self) -> str:
        what = "incomplete record at the end" if self.kind == "torn_tail" else "corrupt data"
        return f"{what} of {self.path.name}: {self.length} bytes at offset {self.offset} skipped ({self.detail})"


@dataclass(frozen=True)
class _Parsed:
    status: Literal["ok", "end", "short", "bad"]
    kind: int = 0
    body: bytes = b""
    end: int = 0
    detail: str = ""


def _parse_at(fd: int, offset: int, size: int) -> _Parsed:
    """The record at ``offset`` of a file of ``size`` bytes."""
    if offset >= size:
        return _Parsed("end")
    if size - offset < HEAD_LEN:
        head = os.pread(fd, size - offset, offset)
        if RECORD_MAGIC.startswith(head[:4]):
            return _Parsed("short", detail=f"{size - offset} bytes of a record header")
        return _Parsed("bad", detail="no record magic")
    magic, length, crc = _RECORD_HEAD.unpack(os.pread(fd, HEAD_LEN, offset))
    if magic != RECORD_MAGIC:
        return _Parsed("bad", detail="no record magic")
    if length < 1 or length > MAX_RECORD_BYTES:
        return _Parsed("bad", detail=f"implausible record length {length}")
    end = offset + HEAD_LEN + length
    if end > size:
        return _Parsed("short", detail=f"record of {length} bytes, {size - offset - HEAD_LEN} present")
    body = os.pread(fd, length, offset + HEAD_LEN)
    if len(body) != length:
        return _Parsed("short", detail="file shrank while reading")
    if zlib.crc32(struct.pack("<I", length) + body) != crc:
        return _Parsed("bad", detail="CRC mismatch")
    if body[0] not in (KIND_EVENT, KIND_LOSS, KIND_ACK):
        return _Parsed("bad", detail=f"unknown record kind {body[0]}")
    return _Parsed("ok", kind=body[0], body=body[1:], end=end)


def _resync(fd: int, offset: int, size: int) -> int | None:
    """The offset of the next valid record after ``offset``, or None."""
    pos = offset + 1
    while pos < size:
        chunk = os.pread(fd, min(_SCAN_CHUNK + len(RECORD_MAGIC), size - pos), pos)
        start = 0
        while True:
            hit = chunk.find(RECORD_MAGIC, start)
            if hit < 0:
                break
            if _parse_at(fd, pos + hit, size).status == "ok":
                return pos + hit
            start = hit + 1
        pos += _SCAN_CHUNK
    return None


@dataclass(frozen=True)
class _Step:
    """One step of a reader: a record, or a problem it skipped."""

    offset: int
    parsed: _Parsed | None = None
    problem: Problem | None = None
    end: int = 0


def _walk(fd: int, path: Path, offset: int, size: int) -> Iterator[_Step]:
    """Records from ``offset`` on, resynchronising past bad stretches (which are yielded as problems)."""
    while offset < size:
        parsed = _parse_at(fd, offset, size)
        if parsed.status == "ok":
            yield _Step(offset, parsed=parsed, end=parsed.end)
            offset = parsed.end
            continue
        nxt = _resync(fd, offset, size)
        if nxt is None:
            kind: Literal["torn_tail", "corrupt"] = "torn_tail" if parsed.status == "short" else "corrupt"
            yield _Step(offset, problem=Problem(path, offset, size - offset, kind, parsed.detail), end=size)
            return
        yield _Step(offset, problem=Problem(path, offset, nxt - offset, "corrupt", parsed.detail), end=nxt)
        offset = nxt


@dataclass
class SegmentScan:
    """What a segment holds: ``count`` deliverable records, ``acked`` of them delivered."""

    path: Path
    count: int = 0
    acked: int = 0
    acked_offset: int = 0
    good_end: int = 0
    size: int = 0
    events: int = 0
    losses: int = 0
    problems: list[Problem] = field(default_factory=list)

    @property
    def pending(self) -> int:
        return self.count - self.acked


def _data_start(fd: int, path: Path, size: int, problems: list[Problem]) -> int:
    header = os.pread(fd, len(FILE_HEADER), 0)
    if header == FILE_HEADER:
        return len(FILE_HEADER)
    if size < len(FILE_HEADER) and FILE_HEADER.startswith(header):
        problems.append(Problem(path, 0, size, "torn_tail", "incomplete segment header"))
        return size
    problems.append(Problem(path, 0, 0, "corrupt", "no segment header"))
    return 0


def _scan_fd(fd: int, path: Path) -> SegmentScan:
    size = os.fstat(fd).st_size
    scan = SegmentScan(path, size=size)
    start = _data_start(fd, path, size, scan.problems)
    ends = [start]  # ends[i]: offset after the i-th deliverable record (ends[0]: data start)
    scan.good_end = start
    for step in _walk(fd, path, start, size):
        if step.problem is not None:
            scan.problems.append(step.problem)
            if step.end >= size:
                break
            continue
        assert step.parsed is not None
        scan.good_end = step.end
        if step.parsed.kind == KIND_ACK:
            if len(step.parsed.body) == 8:
                (n,) = struct.unpack("<Q", step.parsed.body)
                scan.acked = max(scan.acked, n)
            continue
        scan.count += 1
        ends.append(step.end)
        if step.parsed.kind == KIND_EVENT:
            scan.events += 1
        else:
            scan.losses += 1
    scan.acked = min(scan.acked, scan.count)
    scan.acked_offset = ends[scan.acked]
    return scan


def scan_segment(path: Path) -> SegmentScan:
    """Read a segment file without changing it: record counts, acknowledgements, problems."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return _scan_fd(fd, path)
    finally:
        os.close(fd)


# ----------------------------------------------------------------------------- segments


@dataclass(frozen=True)
class SpoolEntry:
    """One deliverable record read back from a segment."""

    segment: Segment
    index: int
    start: int
    end: int
    kind: int
    topic: str
    key: bytes | None
    value: bytes

    @property
    def size(self) -> int:
        return len(self.value) + len(self.topic) + (len(self.key) if self.key else 0)


class Segment:
    """One open segment file: appends (own segments), reads in order, acknowledgements.

    Positions: ``acked`` records (up to byte ``acked_offset``) are delivered; ``read_index``
    records (up to ``read_offset``) were handed to the producer; ``count`` exist.
    """

    def __init__(self, path: Path, fd: int, *, size: int, count: int, acked: int, acked_offset: int) -> None:
        self.path = path
        self.fd = fd
        self.size = size
        self.count = count
        self.acked = acked
        self.acked_offset = acked_offset
        self.read_index = acked
        self.read_offset = acked_offset
        self.sealed = False
        self.dirty = False  # written since the last fsync
        self._acked_on_disk = acked
        self.problems: list[Problem] = []
        self._problem_offsets: set[int] = set()

    # -- opening ---------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path) -> Segment:
        fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT | os.O_EXCL, 0o600)
        os.write(fd, FILE_HEADER)
        seg = cls(path, fd, size=len(FILE_HEADER), count=0, acked=0, acked_offset=len(FILE_HEADER))
        seg.dirty = True
        return seg

    @classmethod
    def adopt(cls, path: Path) -> Segment:
        """Open a segment another (dead) collector wrote; cuts off a torn or corrupt tail."""
        fd = os.open(path, os.O_RDWR | os.O_APPEND)
        try:
            scan = _scan_fd(fd, path)
            if scan.good_end < scan.size:
                os.ftruncate(fd, scan.good_end)  # appends (acks) must start on a record boundary
            if scan.good_end < len(FILE_HEADER):  # not even a header: make it a valid empty segment
                os.ftruncate(fd, 0)
                os.write(fd, FILE_HEADER)
                scan.good_end = scan.acked_offset = len(FILE_HEADER)
        except BaseException:
            os.close(fd)
            raise
        seg = cls(path, fd, size=scan.good_end, count=scan.count, acked=scan.acked, acked_offset=scan.acked_offset)
        seg.sealed = True
        seg.problems = list(scan.problems)
        seg._problem_offsets = {p.offset for p in scan.problems}
        return seg

    # -- writing -----------------------------------------------------------------------
    def append(self, records: list[tuple[int, bytes]]) -> list[tuple[int, int]]:
        """Append deliverable records ``(kind, payload)`` in one write; their ``(index, end)``."""
        framed = [encode_record(kind, payload) for kind, payload in records]
        _write_all(self.fd, b"".join(framed))
        out: list[tuple[int, int]] = []
        for blob in framed:
            self.size += len(blob)
            out.append((self.count, self.size))
            self.count += 1
        self.dirty = True
        return out

    def write_ack(self) -> None:
        """Record on disk how many records are delivered (if that changed)."""
        if self.acked != self._acked_on_disk:
            blob = _ack_record(self.acked)
            _write_all(self.fd, blob)
            self.size += len(blob)
            self._acked_on_disk = self.acked
            self.dirty = True

    def sync(self) -> None:
        if self.dirty:
            os.fdatasync(self.fd)
            self.dirty = False

    # -- reading -----------------------------------------------------------------------
    def read_next(self) -> SpoolEntry | None:
        """The next record not yet handed out (skips acks and bad stretches)."""
        for step in _walk(self.fd, self.path, self.read_offset, self.size):
            if step.problem is not None:
                if step.offset not in self._problem_offsets:
                    self._problem_offsets.add(step.offset)
                    self.problems.append(step.problem)
                self.read_offset = step.end
                continue
            assert step.parsed is not None
            self.read_offset = step.end
            if step.parsed.kind == KIND_ACK:
                continue
            index = self.read_index
            self.read_index += 1
            try:
                topic, key, value = decode_payload(step.parsed.body)
            except ValueError as exc:  # a valid CRC over a bad payload: report and skip it
                problem = Problem(self.path, step.offset, step.end - step.offset, "corrupt", str(exc))
                self.problems.append(problem)
                self._problem_offsets.add(step.offset)
                self.mark_acked(index, step.end)
                continue
            return SpoolEntry(self, index, step.offset, step.end, step.parsed.kind, topic, key, value)
        self.read_index = self.count  # anything unreadable at the end is reported, not retried
        return None

    def mark_acked(self, index: int, end: int) -> None:
        if index + 1 > self.acked:
            self.acked = index + 1
            self.acked_offset = end

    def unread(self, entry: SpoolEntry) -> None:
        """Hand ``entry`` out again next time (it was the last one read)."""
        self.read_index = entry.index
        self.read_offset = entry.start

    def rewind(self) -> None:
        """Hand out again everything not acknowledged (after the producer was replaced)."""
        self.read_index = self.acked
        self.read_offset = self.acked_offset

    @property
    def pending(self) -> int:
        return self.count - self.acked

    @property
    def unsent(self) -> int:
        return self.count - self.read_index

    def close(self) -> None:
        with contextlib.suppress(OSError):
            os.close(self.fd)

    def delete(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


# ----------------------------------------------------------------------------- the directory


def _new_token() -> str:
    return f"{time.time_ns():020d}.{os.getpid()}.{secrets.token_hex(4)}"


def _try_lock(path: Path) -> int | None:
    """An fd holding the exclusive flock of ``path`` (created if missing), or None if someone holds it."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            return None
        raise
    return fd


class SpoolDir:
    """This process's share of a spool directory: its own segments and the ones it adopted."""

    def __init__(self, config: SpoolConfig) -> None:
        self.config = config
        self.dir = config.dir
        self.token = _new_token()
        self._lock_fd: int | None = None
        self._adopted_locks: dict[str, int] = {}
        self._next = 1
        self.active: Segment | None = None
        self.segments: list[Segment] = []  # in delivery order: adopted first, then own
        self.last_dir_sync = 0.0

    # -- lifecycle ------------------------------------------------------------------------
    def lock(self) -> None:
        """Create the directory (mode 0700) and take this process's lock."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = self.dir / f".{self.token}.lock.tmp"
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            os.rename(tmp, self.dir / f"{self.token}.lock")  # visible to others only once locked
        except BaseException:
            os.close(fd)
            raise
        self._lock_fd = fd

    def open(self) -> list[Segment]:
        """:meth:`lock`, then :meth:`adopt`."""
        self.lock()
        return self.adopt()

    def adopt(self) -> list[Segment]:
        """Adopt the segments of collectors that are gone (their lock is free); they are delivered first."""
        adopted = self._adopt()
        self.segments[:0] = adopted
        return adopted

    def _adopt(self) -> list[Segment]:
        by_token: dict[str, list[tuple[int, Path]]] = {}
        for path in self.dir.iterdir():
            m = _SEGMENT_RE.match(path.name)
            if m and m["token"] != self.token:
                by_token.setdefault(m["token"], []).append((int(m["n"]), path))
        for path in self.dir.glob("*.lock"):
            by_token.setdefault(path.name.removesuffix(".lock"), [])
        adopted: list[Segment] = []
        for token in sorted(by_token):  # tokens start with their creation time: oldest first
            if token == self.token:
                continue
            fd = _try_lock(self.dir / f"{token}.lock")
            if fd is None:
                continue  # a live collector's
            self._adopted_locks[token] = fd
            for _n, path in sorted(by_token[token]):
                if path.exists():  # another adopter may have delivered and deleted it meanwhile
                    adopted.append(Segment.adopt(path))
            if not any(self._token_of(s) == token for s in adopted):
                self._release(token)
        return adopted

    @staticmethod
    def _token_of(seg: Segment) -> str:
        m = _SEGMENT_RE.match(seg.path.name)
        return m["token"] if m else ""

    def _release(self, token: str) -> None:
        fd = self._adopted_locks.pop(token, None)
        if fd is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.dir / f"{token}.lock").unlink()  # while still holding it
            os.close(fd)

    def close(self, *, keep: bool) -> None:
        """Close every file; without ``keep`` (nothing pending) remove this process's files too."""
        kept: set[str] = set()
        for seg in self.segments:
            if keep and seg.pending:
                kept.add(self._token_of(seg))
                seg.close()
            else:
                seg.delete()
        self.segments.clear()
        self.active = None
        for token in list(self._adopted_locks):
            if token in kept:  # still undelivered: unlock, so the next collector adopts it
                os.close(self._adopted_locks.pop(token))
            else:
                self._release(token)
        if self._lock_fd is not None:
            if self.token not in kept:
                with contextlib.suppress(FileNotFoundError):
                    (self.dir / f"{self.token}.lock").unlink()
            os.close(self._lock_fd)
            self._lock_fd = None

    # -- writing --------------------------------------------------------------------------
    @property
    def bytes_used(self) -> int:
        return sum(seg.size for seg in self.segments)

    def writer(self, need: int) -> Segment:
        """The segment to append ``need`` bytes to (rolls over past ``segment_bytes``)."""
        seg = self.active
        if seg is None or (seg.size + need > self.config.segment_bytes and seg.count > 0):
            if seg is not None:
                seg.sealed = True
            seg = Segment.create(self.dir / f"{self.token}-{self._next:06d}.seg")
            self._next += 1
            self.active = seg
            self.segments.append(seg)
            self.sync_dir_if(self.config.fsync != "never")
        return seg

    def append(self, records: list[tuple[int, bytes]], *, reserve_ok: bool = False) -> list[tuple[Segment, int, int]]:
        """Append records in order; SpoolFull (nothing written) if they do not fit.

        ``reserve_ok``: loss records may use the reserve kept free for them.
        """
        framed = sum(HEAD_LEN + 1 + len(p) for _k, p in records)
        limit = self.config.max_bytes - (0 if reserve_ok else self.config.reserve_bytes)
        if self.bytes_used + framed > limit:
            raise SpoolFull(f"spool at {self.bytes_used} of {self.config.max_bytes} bytes")
        seg = self.writer(framed)
        return [(seg, index, end) for index, end in seg.append(records)]

    def sync_dir_if(self, wanted: bool) -> None:
        if wanted:
            fd = os.open(self.dir, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
            self.last_dir_sync = time.monotonic()

    def drop_delivered(self) -> None:
        """Delete segments that are delivered and will not grow again."""
        keep: list[Segment] = []
        for seg in self.segments:
            if seg.pending == 0:
                if seg is self.active:
                    self.active = None
                seg.delete()
            else:
                keep.append(seg)
        self.segments = keep
        for token in list(self._adopted_locks):
            if not any(self._token_of(s) == token for s in self.segments):
                self._release(token)

    def pending(self) -> int:
        return sum(seg.pending for seg in self.segments)

    def unsent(self) -> int:
        return sum(seg.unsent for seg in self.segments)


# ----------------------------------------------------------------------------- inspection


@dataclass
class SpoolReport:
    """What a spool directory holds (for operators and tests); nothing is changed."""

    dir: Path
    segments: list[SegmentScan]
    locks: dict[str, bool]  # token -> held by a live process

    @property
    def pending(self) -> int:
        return sum(s.pending for s in self.segments)

    @property
    def problems(self) -> list[Problem]:
        return [p for s in self.segments for p in s.problems]


def inspect_spool(directory: Path) -> SpoolReport:
    """Scan every segment of a spool directory (read-only, safe while collectors run)."""
    segments: list[SegmentScan] = []
    locks: dict[str, bool] = {}
    if not directory.is_dir():
        return SpoolReport(directory, segments, locks)
    for path in sorted(directory.glob("*.seg")):
        with contextlib.suppress(FileNotFoundError):
            segments.append(scan_segment(path))
    for path in sorted(directory.glob("*.lock")):
        fd = _try_lock(path)
        if fd is not None:
            os.close(fd)
        locks[path.name.removesuffix(".lock")] = fd is None
    return SpoolReport(directory, segments, locks)


def read_pending(path: Path) -> Iterator[SpoolEntry]:
    """The undelivered records of a segment file, in order (read-only)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        scan = _scan_fd(fd, path)
        seg = Segment(path, fd, size=scan.good_end, count=scan.count, acked=scan.acked, acked_offset=scan.acked_offset)
        while True:
            entry = seg.read_next()
            if entry is None:
                return
            yield entry
    finally:
        os.close(fd)
