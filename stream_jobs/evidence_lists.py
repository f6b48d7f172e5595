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
from typing import Final, cast

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


EVIDENCE: Final = "evidence"


def narrow_columns(columns: Sequence[str]) -> tuple[str, ...]:
    """``evidence_rows``' columns for the evidence spec's ``columns``: each group's columns replaced by its key."""
    first = {cols[0]: name for name, cols in GROUPS}
    rest = {c for _, cols in GROUPS for c in cols[1:]}
    return tuple(key_column(first[c]) if c in first else c for c in columns if c not in rest)


def split_rows(
    columns: Sequence[str], rows: Sequence[tuple[object, ...]]
) -> tuple[list[tuple[object, ...]], list[list[tuple[object, ...]]]]:
    """Evidence row tuples (``columns`` order) as ``evidence_rows`` tuples (:func:`narrow_columns` order) and,
    per group, its distinct values as ``(id, *lists)`` tuples, first-seen order (the per-message path)."""
    index = {c: i for i, c in enumerate(columns)}
    groups = [[index[c] for c in cols] for _, cols in GROUPS]
    firsts = {g[0]: j for j, g in enumerate(groups)}
    rest = {i for g in groups for i in g[1:]}
    seen: list[dict[tuple[tuple[str, ...], ...], bytes]] = [{} for _ in GROUPS]
    lists: list[list[tuple[object, ...]]] = [[] for _ in GROUPS]
    narrow = []
    for row in rows:
        out: list[object] = []
        for i, value in enumerate(row):
            if i in rest:
                continue
            j = firsts.get(i)
            if j is None:
                out.append(value)
                continue
            arrays: tuple[tuple[str, ...], ...] = tuple(tuple(cast("Sequence[str]", row[k])) for k in groups[j])
            key = seen[j].get(arrays)
            if key is None:
                key = seen[j][arrays] = key_of(*arrays)
                lists[j].append((key, *(list(a) for a in arrays)))
            out.append(key)
        narrow.append(tuple(out))
    return narrow, lists


def narrow_insert(sql: str, target: str, values: dict[str, str]) -> str | None:
    """The bulk path's ``INSERT INTO <evidence> (names) SELECT values FROM file(...) ...`` turned into the
    insert of ``evidence_rows`` (``target``): each group's names become its key column, its values
    ``values[group]`` (the file's key column, or :func:`key_sql` over the file's lists). None: not that SQL."""
    head, sep, tail = sql.partition(" FROM file(")
    names, sep2, select = head.partition(") SELECT ")
    into, sep3, names = names.partition(" (")
    if not (sep and sep2 and sep3) or not into.startswith("INSERT INTO "):
        return None
    for group, cols in GROUPS:
        quoted = ", ".join(f"`{c}`" for c in cols)
        if names.count(quoted) != 1 or select.count(quoted) != 1:
            return None
        names = names.replace(quoted, f"`{key_column(group)}`")
        select = select.replace(quoted, values[group])
    return f"INSERT INTO {target} ({names}) SELECT {select}{sep}{tail}"


def lists_from_select(sql: str, database: str, settings: str) -> list[str] | None:
    """For the Avro path: per group, the insert of the distinct lists of the bulk insert ``sql``'s rows (its
    ``SELECT``, checks included, as a subquery; keys in SQL). None: not that SQL."""
    start = sql.find(") SELECT ")
    end = sql.rfind(" SETTINGS ")
    if start < 0 or end < start:
        return None
    select = sql[start + 2 : end]
    out = []
    for group, cols in GROUPS:
        names = ", ".join(f"`{c}`" for c in cols)
        out.append(
            f"INSERT INTO {database}.{list_table(group)} (`id`, {names}) SELECT {key_sql(cols)} AS `id`, {names} "
            f"FROM ({select}) LIMIT 1 BY `id` SETTINGS {settings}"
        )
    return out
