"""Evidence's repeated lists stored once per distinct value behind an unforgeable key (issue 16).

72 % of an evidence row's raw bytes are its reason texts and its fact references, and chDB's insert and
every merge level cost about 1 ns per raw byte (bench/HISTORY.md, h16c). Those lists repeat: a call's
provisional and final versions carry the same, and so do a session's calls under the same grants. So a
*list group* (``reasons``; ``fact_ids`` with ``fact_hashes``) is stored once per distinct value in a side
table (``evidence_<group>_lists``: ``id`` and the group's columns, ``ReplacingMergeTree`` by ``id``, read
as a set) and the evidence row (``evidence_rows``) keeps the 16-byte key ``<group>_key``.

The key is the first 16 bytes of SHA-256 over the group's RowBinary bytes (each column as ClickHouse
writes it in RowBinary: an array is its LEB128 length then each string's LEB128 length and bytes). The
reasons quote text an agent chose (tool names, resources), so the key must be collision resistant: a
non-cryptographic hash would let an agent make two lists collide and attach other reasons to a call. The
same key is computed by the C transcoder (``stream_jobs/native/avro_rowbinary.c``, OpenSSL's SHA-256),
by :func:`key_of` (Python, the per-message path) and by :func:`key_sql` (ClickHouse's ``SHA256`` over
``formatRowNoNewline('RowBinary', ...)``: the migration and the Avro path); tests check all three agree.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Final

__all__ = ["GROUPS", "KEY_LEN", "ROWS_TABLE", "key_column", "key_of", "key_sql", "list_table", "rowbinary_of"]

KEY_LEN: Final = 16

GROUPS: Final[tuple[tuple[str, tuple[str, ...]], ...]] = (
    ("reason", ("reasons",)),
    ("fact", ("fact_ids", "fact_hashes")),
)
"""(group name, the evidence columns stored once per distinct value), in the columns' order."""

ROWS_TABLE: Final = "evidence_rows"
"""The narrow evidence table (a key per group instead of the lists); ``evidence`` is the view joining them back."""


def list_table(group: str) -> str:
    return f"evidence_{group}_lists"


def key_column(group: str) -> str:
    return f"{group}_key"


def _uleb(n: int, out: bytearray) -> None:
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)


def rowbinary_of(arrays: Sequence[Sequence[str]]) -> bytes:
    """The RowBinary bytes of ``Array(String)`` values one after the other (what the key hashes)."""
    out = bytearray()
    for values in arrays:
        _uleb(len(values), out)
        for value in values:
            data = value.encode("utf-8")
            _uleb(len(data), out)
            out += data
    return bytes(out)


def key_of(*arrays: Sequence[str]) -> bytes:
    """The key of one group value: SHA-256 of its RowBinary bytes, first 16 bytes."""
    return hashlib.sha256(rowbinary_of(arrays)).digest()[:KEY_LEN]


def key_sql(columns: Sequence[str]) -> str:
    """The same key in ClickHouse SQL, over the named ``Array(String)`` columns (FixedString(16))."""
    cols = ", ".join(f"`{c}`" for c in columns)
    return f"toFixedString(substring(SHA256(formatRowNoNewline('RowBinary', {cols})), 1, {KEY_LEN}), {KEY_LEN})"
