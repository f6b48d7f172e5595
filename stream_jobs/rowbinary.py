"""The bulk container transcoded to RowBinary in C, so that chDB reads its cheapest row format (issue 16).

ClickHouse's generic Avro reader cost ~2.5 µs of CPU per evidence row of the sink's bulk insert
(:mod:`stream_jobs.bulk`). ``stream_jobs/native/avro_rowbinary.c`` (built by ``make install`` into
the virtualenv as a shared library, loaded here with ctypes) reads the same records with a small
*program* derived from the container's writer schema (one opcode per field) and writes RowBinary;
the insert then reads ``file(path, RowBinary, '<structure>')`` with the very same ``SELECT`` list
and checks. It reads the message values straight (``sw_values_to_rowbinary``: the values joined,
where each ends, their offsets and each partition run's ``_prov`` prefix), writing exactly what it
wrote for the container :meth:`stream_jobs.bulk.BulkBlock.payload` builds -- which is now built only
when a block goes in as Avro.

Exactness: the transcoder reads the Avro grammar exactly (the same bytes give the same values) and
refuses anything it cannot read so (a count other than one record per block, malformed or
overlong varints, negative lengths, lengths past the record, union indexes other than 0/1, boolean
bytes other than 0/1, a record not ending exactly where its value ends). A refused
block is inserted as Avro, as before (writer counter ``rowbinary_fallbacks``); the checks of
the ``SELECT`` and the per-message fallback behind them are unchanged.

The switch: ``SCOPEWATCH_SINK_DECODER`` = ``auto`` (RowBinary when the library is built, the
default), ``rowbinary`` (the same; a warning at start when the library is missing), ``avro``.
"""

from __future__ import annotations

import ctypes
import logging
import os
import shutil
import subprocess
import sys
import threading
from array import array
from dataclasses import dataclass
from itertools import accumulate
from pathlib import Path
from typing import Any, Final, Literal

from stream_jobs.bulk import PROV_LEN, AvroBulk, BulkBlock

__all__ = [
    "LIBRARY_NAME",
    "SOURCE",
    "Decoder",
    "RowBinaryCodec",
    "build",
    "codec_for",
    "codec_of",
    "library",
    "transcode_lists_python",
    "transcode_python",
]

log = logging.getLogger(__name__)

Decoder = Literal["auto", "rowbinary", "avro"]
LIBRARY_NAME: Final = "libscopewatch_avro_rowbinary.so"
SOURCE: Final = Path(__file__).resolve().parent / "native" / "avro_rowbinary.c"
CFLAGS: Final = ("-O2", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC")
LIBS: Final = ("-lcrypto",)
"""Linked after the source: OpenSSL's libcrypto for the list keys' SHA-256 (Debian ``libssl-dev``)."""
HDR_LEN: Final = 10

_SCALARS: Final[dict[Any, tuple[str, str]]] = {
    "string": ("u", "String"),  # validated as UTF-8 in C: the SELECT's isValidUTF8 is dropped
    "bytes": ("s", "String"),
    "long": ("l", "Int64"),
    "int": ("i", "Int32"),
    "boolean": ("z", "Bool"),
    "double": ("d", "Float64"),
    "float": ("f", "Float32"),
}


class Unsupported(ValueError):
    """A schema the transcoder has no program for (its table keeps the Avro container)."""


def _plain(t: Any) -> Any:
    if isinstance(t, dict) and isinstance(t.get("type"), str) and t["type"] not in ("array", "map", "fixed"):
        if t.get("logicalType") == "timestamp-millis" and t["type"] == "long":
            return "timestamp-millis"
        if set(t) - {"type", "doc"}:
            raise Unsupported(f"type {t}")
        return t["type"]
    return t


def _scalar(t: Any) -> tuple[str, str]:
    t = _plain(t)
    if t == "timestamp-millis":
        return "l", "DateTime64(3, 'UTC')"
    if isinstance(t, str) and t in _SCALARS:
        return _SCALARS[t]
    raise Unsupported(f"type {t}")


def _field(t: Any) -> tuple[bytes, str | None]:
    """(opcodes, ClickHouse type; None: the field is dropped) of one Avro field type."""
    if isinstance(t, list):
        if len(t) == 2 and t[0] == "null" and not isinstance(_plain(t[1]), (list, dict)):
            op, ch = _scalar(t[1])
            return b"n" + op.encode(), f"Nullable({ch})"
        raise Unsupported(f"union {t}")
    t = _plain(t)
    if isinstance(t, dict) and t.get("type") == "array":
        op, ch = _scalar(t["items"])
        return b"a" + op.encode(), f"Array({ch})"
    if isinstance(t, dict) and t.get("type") == "fixed":
        size = int(t["size"])
        if not 0 < size < 256:
            raise Unsupported(f"fixed({size})")
        return b"x" + bytes([size]), f"FixedString({size})"
    op, ch = _scalar(t)
    return op.encode(), ch


@dataclass(frozen=True)
class RowBinaryCodec:
    """The transcoding of one :class:`~stream_jobs.bulk.AvroBulk`'s containers."""

    program: bytes
    structure: str
    """The RowBinary columns (name and type), for ``file(path, RowBinary, structure)``."""
    avro_from: str = ", Avro) "
    """What :meth:`rewrite` replaces in the bulk ``SELECT``."""
    utf8_check: str | None = None
    """The bulk ``SELECT``'s ``isValidUTF8`` test (:attr:`stream_jobs.bulk.AvroBulk.utf8_check`) that
    :meth:`rewrite` drops: set only when the program validates every string field itself ('u')."""
    groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
    """List groups (:mod:`stream_jobs.evidence_lists`): each group's fields are replaced in the rows by a
    ``<group>_key FixedString(16)`` column and its distinct values written apart (:meth:`transcode_lists`)."""
    side_structures: tuple[str, ...] = ()
    """Per group, the RowBinary columns of its side output (``id FixedString(16)``, then the group's columns)."""

    def rewrite(self, sql: str, path: str) -> str | None:
        """The bulk insert's SQL reading ``path`` as RowBinary (None: the SQL is not the expected one).

        The row's UTF-8 test is dropped when the transcoder validated every string (a container with
        text that is not valid UTF-8 is refused by :meth:`transcode` and goes in as Avro, checked in SQL).
        """
        quoted = _quote(path)
        avro = f"FROM file({quoted}{self.avro_from}"
        if sql.count(avro) != 1:
            return None
        if self.utf8_check is not None:
            if sql.count(self.utf8_check) != 1:
                return None
            sql = sql.replace(self.utf8_check, "")
        return sql.replace(avro, f"FROM file({quoted}, RowBinary, {_quote(self.structure)}) ")

    def transcode(self, block: BulkBlock) -> memoryview | None:
        """The block's rows as RowBinary, or None when the library is absent or refused a value.

        Read straight from the message values (``sw_values_to_rowbinary``): the Avro container is not built.
        The view is of a per-thread buffer reused by the next call in the same thread: use it first.
        """
        lib = library()
        call = None if lib is None else _Call.of(block, self.program)
        if lib is None or call is None:
            return None
        for factor in (1.25, 8):  # RowBinary is about the values' size (+ 14 bytes of _prov per row, fixed ints)
            buf = _buffer("buf", int(len(call.data) * factor) + 32 * call.rows + 4096)
            n = lib.sw_values_to_rowbinary(*call.head(), *call.out(buf))
            if n >= 0:
                return memoryview(buf)[:n]
            if n != -2:
                call.refused(block, n)
                return None
        return None

    def transcode_lists(self, block: BulkBlock) -> tuple[memoryview, list[bytes]] | None:
        """With list groups: the narrow rows (a key per group) and, per group, its distinct values as RowBinary
        (``id`` then the group's columns, first-seen order). None as :meth:`transcode`."""
        lib = library()
        call = None if lib is None or not self.groups else _Call.of(block, self.program)
        if lib is None or call is None:
            return None
        count = len(self.groups)
        side_lens = (ctypes.c_long * count)()
        # The narrow rows are ~30 % of the values (the lists replaced by keys; a group's bytes sit in the row only
        # until its key replaces them) and the distinct lists a few per cent in production (each session's
        # own): small buffers first, then the sizes that always fit. Each was 1.25 times the values (zeroed, so
        # resident: ~3.5 KB per row of a batch, 0.6 GB at 180,000 rows).
        for factor, side_factor in ((0.5, 0.25), (1.25, 1.25), (8, 8)):
            buf = _buffer("buf", int(len(call.data) * factor) + 48 * call.rows + 4096)
            side_cap = int(len(call.data) * side_factor) + 4096
            side = _buffer("side", side_cap * count, headroom=False)
            n = lib.sw_values_to_rowbinary_lists(
                *call.head(),
                *call.out(buf),
                count,
                ctypes.addressof((ctypes.c_char * len(side)).from_buffer(side)),
                side_cap,
                side_lens,
            )
            if n >= 0:
                lists = [bytes(side[j * side_cap : j * side_cap + side_lens[j]]) for j in range(count)]
                return memoryview(buf)[:n], lists
            if n != -2:
                call.refused(block, n)
                return None
        return None


class _Call:
    """What the C functions read of a block (kept alive for the call: the C gets the arrays' addresses): its
    values joined, where each ends, their offsets, each partition run's first row and 16-byte ``_prov`` prefix."""

    __slots__ = ("data", "ends", "err_at", "offsets", "prefixes", "program", "rows", "runs", "starts")

    def __init__(self, block: BulkBlock, program: bytes, prefixes: bytes) -> None:
        values = block.values
        self.data = b"".join(values)
        self.ends = array("q", accumulate(map(len, values)))
        self.offsets = array("q", [m.offset for m in block.messages])
        self.starts = array("q", [start for start, _ in block.runs])
        self.prefixes = prefixes
        self.rows = len(values)
        self.runs = len(block.runs)
        self.program = program
        self.err_at = ctypes.c_long(-1)

    @classmethod
    def of(cls, block: BulkBlock, program: bytes) -> _Call | None:
        """None when the block is not one the C functions read (values without messages, no partition run)."""
        if len(block.values) != len(block.messages) or not block.runs:
            return None
        prefixes = b"".join(prefix for _, prefix in block.runs)
        if len(prefixes) != 16 * len(block.runs):
            return None
        return cls(block, program, prefixes)

    def head(self) -> tuple[Any, ...]:
        """The arguments both C functions start with."""
        return (
            self.data,
            len(self.data),
            _address(self.ends),
            _address(self.offsets),
            self.rows,
            _address(self.starts),
            self.prefixes,
            self.runs,
            self.program,
            len(self.program),
        )

    def out(self, buf: bytearray) -> tuple[Any, ...]:
        """The output arguments: ``buf``, its size, where a refusal is reported."""
        return ctypes.addressof((ctypes.c_char * len(buf)).from_buffer(buf)), len(buf), ctypes.byref(self.err_at)

    def refused(self, block: BulkBlock, code: int) -> None:
        """Log why the C refused the block (the caller then inserts it as Avro)."""
        if code == -4:
            log.info("a %s block has text that is not valid UTF-8: inserted as Avro, checked in SQL", block.spec.table)
        else:
            log.info(
                "RowBinary transcoder refused a %s block (%d at row %d)", block.spec.table, code, self.err_at.value
            )


def _buffer(name: str, need: int, headroom: bool = True) -> bytearray:
    """This thread's buffer ``name``, at least ``need`` bytes: kept between calls (with half again as much room
    when ``headroom``), since a fresh zeroed one costs ~0.3 µs per row."""
    buf: bytearray | None = getattr(_BUFFERS, name, None)
    if buf is None or len(buf) < need:
        setattr(_BUFFERS, name, None)
        buf = bytearray(need + need // 2 if headroom else need)
        setattr(_BUFFERS, name, buf)
    return buf


def _address(values: array[int]) -> int:
    address, _ = values.buffer_info()
    return address


_BUFFERS = threading.local()
"""Per thread, the transcoder's buffers by name (`buf`: rows, `side`: list groups; :func:`_buffer`)."""


def quote(text: str) -> str:
    """A ClickHouse string literal."""
    return _quote(text)


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def codec_for(spec: AvroBulk, groups: tuple[tuple[str, tuple[str, ...]], ...] = ()) -> RowBinaryCodec | None:
    """The codec of ``spec``'s container schema (None: a type the transcoder does not read); with ``groups``
    (:data:`stream_jobs.evidence_lists.GROUPS`), each group's fields (consecutive in the schema) become a list
    group ('[' ... ']' in the program, a ``<group>_key FixedString(16)`` column in the structure)."""
    import json

    schema = json.loads(spec.schema_json)
    program = bytearray()
    columns = []
    sides = []
    first = {cols[0]: (name, cols) for name, cols in groups}
    try:
        fields = schema["fields"]
        if fields[0]["name"] != "_hdr" or fields[-1]["name"] != "_prov":
            raise Unsupported("not a bulk container schema")
        program += b"k" + bytes([HDR_LEN])
        validated = True
        i = 1
        while i < len(fields):
            f = fields[i]
            if f["name"] in first:
                name, cols = first[f["name"]]
                if [g["name"] for g in fields[i : i + len(cols)]] != list(cols):
                    raise Unsupported(f"group {name}: fields {cols} not consecutive")
                program += b"["
                side = ["`id` FixedString(16)"]
                for g in fields[i : i + len(cols)]:
                    ops, ch = _field(g["type"])
                    if ch is None or ops[:1] not in (b"a", b"u", b"s"):
                        raise Unsupported(f"group {name}: field {g['name']}")
                    program += ops
                    validated = validated and b"s" not in ops
                    side.append(f"`{g['name']}` {ch}")
                program += b"]"
                columns.append(f"`{name}_key` FixedString(16)")
                sides.append(", ".join(side))
                i += len(cols)
                continue
            ops, ch = _field(f["type"])
            program += ops
            if ops[:1] != b"x" and b"s" in ops:
                validated = False
            columns.append(f"`{f['name']}` {ch}")
            i += 1
    except (Unsupported, KeyError, TypeError, ValueError, IndexError) as exc:
        log.debug("no RowBinary codec for %s: %s", spec.table, exc)
        return None
    if not program.endswith(b"x" + bytes([PROV_LEN])) or len(sides) != len(groups):
        return None
    # the SQL's UTF-8 test may go only when no string field is copied unchecked ('s': Avro bytes)
    utf8_check = spec.utf8_check if validated else None
    return RowBinaryCodec(
        bytes(program), ", ".join(columns), utf8_check=utf8_check, groups=groups, side_structures=tuple(sides)
    )


_CODECS: dict[tuple[bytes, tuple[tuple[str, tuple[str, ...]], ...]], RowBinaryCodec | None] = {}


def codec_of(
    spec: AvroBulk, decoder: str, groups: tuple[tuple[str, tuple[str, ...]], ...] = ()
) -> RowBinaryCodec | None:
    """The codec the bulk insert of ``spec`` uses under ``decoder`` (None: insert the Avro container)."""
    if not resolve(decoder):
        return None
    key = (spec.header + spec.schema_json, groups)
    if key not in _CODECS:
        _CODECS[key] = codec_for(spec, groups)
    return _CODECS[key]


# ------------------------------------------------------------------------- the library

_LIB: list[Any] = []


ABI = 4
"""The transcoder's interface version (``sw_avro_rowbinary_abi``): 2 checks every string as UTF-8, which
lets the bulk insert drop its SQL check; 3 reads the message values straight (``sw_values_to_rowbinary``);
4 writes list groups once per distinct value behind a SHA-256/128 key (``sw_values_to_rowbinary_lists``).
A library built from older sources (no such symbol, or another version) is not loaded: the sink reads Avro
with the SQL checks."""


def find_library() -> Path | None:
    """The built library: ``$SCOPEWATCH_AVRO_ROWBINARY_LIB``, else this virtualenv's ``lib`` (``make install``)."""
    env = os.environ.get("SCOPEWATCH_AVRO_ROWBINARY_LIB")
    candidates = [Path(env)] if env else []
    candidates.append(Path(sys.prefix) / "lib" / LIBRARY_NAME)
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    return None


def library() -> Any | None:
    """The loaded transcoder (once per process), or None when it is not built."""
    if _LIB:
        return _LIB[0]
    path = find_library()
    lib = None
    if path is not None:
        try:
            lib = ctypes.CDLL(str(path))
            abi = lib.sw_avro_rowbinary_abi
            abi.restype = ctypes.c_long
            abi.argtypes = []
            if abi() != ABI:
                raise AttributeError(f"interface version {abi()}, this code needs {ABI} (make install)")
            fn = lib.sw_values_to_rowbinary
            fn.restype = ctypes.c_long
            fn.argtypes = [
                ctypes.c_char_p,
                ctypes.c_size_t,
                ctypes.c_void_p,
                ctypes.c_void_p,
                ctypes.c_long,
                ctypes.c_void_p,
                ctypes.c_char_p,
                ctypes.c_long,
                ctypes.c_char_p,
                ctypes.c_size_t,
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.POINTER(ctypes.c_long),
            ]
            lists = lib.sw_values_to_rowbinary_lists
            lists.restype = ctypes.c_long
            lists.argtypes = [
                *fn.argtypes,
                ctypes.c_long,
                ctypes.c_void_p,
                ctypes.c_size_t,
                ctypes.POINTER(ctypes.c_long),
            ]
        except (OSError, AttributeError) as exc:
            log.warning("the RowBinary transcoder %s did not load (%s): the sink reads Avro", path, exc)
            lib = None
    _LIB.append(lib)
    return lib


def resolve(decoder: str) -> bool:
    """Whether the bulk path transcodes to RowBinary under ``decoder`` (auto/rowbinary: when the library loads)."""
    if decoder == "avro":
        return False
    if library() is None:
        if decoder == "rowbinary":
            log.warning(
                "SCOPEWATCH_SINK_DECODER=rowbinary but %s is not built (make install): reading Avro", LIBRARY_NAME
            )
        return False
    return True


def build(dest: Path, cc: str = "gcc") -> Path:
    """Compile the library into ``dest`` (a file path); CalledProcessError/OSError if it cannot be."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    subprocess.run(
        [shutil.which(cc) or cc, *CFLAGS, "-o", str(tmp), str(SOURCE), *LIBS], check=True, capture_output=True
    )
    tmp.replace(dest)
    return dest


# ------------------------------------------------------------------------- reference (tests, bench)


def transcode_python(codec: RowBinaryCodec, block: BulkBlock) -> bytes | None:
    """What the C transcoder writes, in Python (slow; the bench's and the tests' reference)."""
    got = _transcode_python(codec, block)
    return None if got is None else got[0]


def transcode_lists_python(codec: RowBinaryCodec, block: BulkBlock) -> tuple[bytes, list[bytes]] | None:
    """What :meth:`RowBinaryCodec.transcode_lists` returns, in Python (the tests' reference)."""
    return _transcode_python(codec, block)


def _transcode_python(codec: RowBinaryCodec, block: BulkBlock) -> tuple[bytes, list[bytes]] | None:
    import hashlib

    data = block.payload()
    pos = len(block.head())
    out = bytearray()
    sides = [bytearray() for _ in codec.groups]
    seen: list[dict[bytes, bytes]] = [{} for _ in codec.groups]
    group = gstart = -1

    def long_() -> int:
        nonlocal pos
        u = shift = 0
        while True:
            if pos >= end or shift > 63:
                raise ValueError("varint")
            b = data[pos]
            pos += 1
            u |= (b & 0x7F) << shift
            if not b & 0x80:
                break
            shift += 7
        if u >= 1 << 64:
            raise ValueError("varint")
        return (u >> 1) ^ -(u & 1)

    def uleb(n: int) -> None:
        while n >= 0x80:
            out.append((n & 0x7F) | 0x80)
            n >>= 7
        out.append(n)

    def raw(n: int) -> bytes:
        nonlocal pos
        if n < 0 or pos + n > end:
            raise ValueError("length")
        pos += n
        return data[pos - n : pos]

    def scalar(op: int) -> None:
        if op in (ord("s"), ord("u")):
            n = long_()
            text = raw(n)
            if op == ord("u"):
                text.decode("utf-8")  # UnicodeDecodeError (a ValueError): refused, as the C refuses it
            uleb(n)
            out.extend(text)
        elif op == ord("l"):
            out.extend(long_().to_bytes(8, "little", signed=True))
        elif op == ord("i"):
            out.extend(long_().to_bytes(4, "little", signed=True))
        elif op == ord("z"):
            b = raw(1)
            if b[0] > 1:
                raise ValueError("bool")
            out.extend(b)
        elif op == ord("d"):
            out.extend(raw(8))
        elif op == ord("f"):
            out.extend(raw(4))

    prog = codec.program
    try:
        rows = 0
        while pos < len(data):
            end = len(data)
            if long_() != 1:
                return None
            size = long_()
            end = pos + size
            k = 0
            group = -1
            while k < len(prog):
                op = prog[k]
                if op == ord("["):
                    group += 1
                    gstart = len(out)
                elif op == ord("]"):
                    span = bytes(out[gstart:])
                    del out[gstart:]
                    key = seen[group].get(span)
                    if key is None:
                        key = seen[group][span] = hashlib.sha256(span).digest()[:16]
                        sides[group] += key + span
                    out += key
                elif op == ord("n"):
                    k += 1
                    index = long_()
                    if index not in (0, 1):
                        return None
                    out.append(1 - index)
                    if index:
                        scalar(prog[k])
                elif op == ord("a"):
                    k += 1
                    items = bytearray()
                    total = 0
                    saved = out
                    out = items
                    while (count := long_()) != 0:
                        if count < 0:
                            long_()
                            count = -count
                        total += count
                        for _ in range(count):
                            scalar(prog[k])
                    out = saved
                    uleb(total)
                    out.extend(items)
                elif op in (ord("k"), ord("x")):
                    k += 1
                    chunk = raw(prog[k])
                    if op == ord("x"):
                        out.extend(chunk)
                else:
                    scalar(op)
                k += 1
            if pos != end or data[pos : pos + 16] != block.sync:
                return None
            pos += 16
            rows += 1
        return (bytes(out), [bytes(x) for x in sides]) if rows == len(block) else None
    except (ValueError, IndexError, OverflowError):
        return None
