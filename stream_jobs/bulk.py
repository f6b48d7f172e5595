"""The sink's bulk path: a batch's Avro bodies handed to ClickHouse as one Avro container, decoded in C++.

The columnar fast path (:mod:`stream_jobs.columnar`) reads every message in Python (about 9-10 µs
per evidence row, half the sink's CPU). For the tables listed in :data:`BULK_TABLES` the sink
instead concatenates the messages' bytes into an Avro Object Container File -- no per-record
decode -- and ClickHouse reads it with ``INSERT ... SELECT ... FROM file(..., Avro)``:

* the container's writer schema is the message schema with two fixed fields around it:
  ``_hdr`` (``fixed(10)``: the single-object header, so each Kafka value goes in unsliced) first
  and ``_prov`` (``fixed(24)``: a random per-batch nonce, topic index, partition, offset) last;
* every message is its own block (count 1, byte length, record, sync marker), so a record can never
  run into the next: a body shorter than its schema fails the read, a body with trailing bytes
  puts them where ``_prov`` is expected and the nonce check fails;
* the provenance columns come from ``_prov``, ``_ingested_at`` is a literal of the batch;
* the ``SELECT`` refuses (``throwIf``) the whole block unless every row passes what the fast reader
  checks for that model (read off the model classes with the same generator the fast reader uses:
  valid UTF-8, Literal values, canonical UUIDs, numeric and timestamp ranges, finite floats, no
  unknown fields) plus the sink's own column checks (the spec's column limits and allowed values). JSON fields
  are accepted only as ``{}`` (what today's writers put in ``facts``); any other text would need the
  canonical-form check, so it refuses the block too.

A refused or unreadable block is never a dead letter by itself: the sink falls back to the
per-message path for that block's messages (:meth:`stream_jobs.sink.ClickHouseSink.rows_of`), which
stores each message or dead-letters it with the reason, exactly as before (counter
``bulk_fallbacks``). One block is inserted as one ClickHouse block (``max_block_size`` and
``min_insert_block_size_rows`` set to its row count), so a refusal writes nothing and the
deduplication token covers the whole insert on every retry.

Raw event tables are not in :data:`BULK_TABLES`: their ``_record_hash`` is a SHA-256 over the
event's canonical JSON, which needs the Python reader.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Final

from schemas import events as ev
from schemas.codec import MAGIC, schema_entries
from stream_jobs.columnar import _AVRO_FOR, _MAX_MS, _MIN_MS, Unsupported, _avro_type, _Kind, _model_kinds
from stream_jobs.tables import BY_MODEL, TableSpec

__all__ = ["BULK_TABLES", "PROV_LEN", "AvroBulk", "BulkBlock", "block_head_for", "bulk_specs"]

BULK_TABLES: Final = frozenset({"evidence"})
"""Tables whose current-schema records take the bulk path (the others keep the Python reader)."""

NONCE_LEN: Final = 8
PROV_LEN: Final = NONCE_LEN + 16  # nonce, topic index (u32), partition (u32), offset (u64), little-endian


def _absent_sql(value: Any) -> str | None:
    """SQL for a spec's value of a column the model has no field for (None: not supported here)."""
    if value is None:
        return "NULL"
    if value == [] and isinstance(value, list):
        return "CAST([] AS Array(String))"
    if isinstance(value, str):
        return _quote(value)
    return None


def _varint(n: int) -> bytes:
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n & ~0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _utf8_text(name: str, kind: _Kind) -> str | None:
    """The text of field ``name`` whose UTF-8 validity the bulk check tests (None: no text field).

    All of a row's text goes into one ``isValidUTF8`` (:func:`_utf8_check`) instead of one call per
    field: each function in the ``SELECT`` costs chDB a fixed share of every insert.
    """
    col = f"`{name}`"
    if kind.base == "str":
        return f"ifNull({col}, '')" if kind.optional else col
    if kind.base == "strs":
        return f"arrayStringConcat({col}, '\\n')"
    return None


def _utf8_check(texts: list[str]) -> str | None:
    """True when every text is valid UTF-8: one test over the texts joined by ``\\n``.

    Joining keeps the answer of each part: an ASCII byte is a whole character, so no multi-byte
    sequence can run across a separator (a lead byte before it, or a continuation byte after it, is
    invalid there too), and the joined text is valid exactly when every part is.
    """
    if not texts:
        return None
    joined = texts[0] if len(texts) == 1 else "concat(" + ", '\\n', ".join(texts) + ")"
    return f"(isValidUTF8({joined}))"


def _check(name: str, kind: _Kind, avro: Any, limit: int | None = None) -> str | None:
    """SQL that is true when the value of field ``name`` passes what the fast reader checks for ``kind``
    (and is at most ``limit``, the spec's column limit), text validity apart (:func:`_utf8_check`)."""
    col = f"`{name}`"
    test: str | None
    if kind.base in ("str", "strs"):
        test = None  # its UTF-8 is tested with the row's other text
    elif kind.base == "uuid":
        test = (
            f"match({col}, '^[0-9a-fA-F]{{8}}-[0-9a-fA-F]{{4}}-[0-9a-fA-F]{{4}}-[0-9a-fA-F]{{4}}-[0-9a-fA-F]{{12}}$')"
        )
    elif kind.base == "lit":
        test = f"{col} IN ({', '.join(_quote(v) for v in sorted(kind.values))})"
    elif kind.base == "int":
        lo, hi = (-(2**31), 2**31 - 1) if avro == "int" else (-(2**63), 2**63 - 1)
        if kind.ge is not None:
            lo = max(lo, math.ceil(kind.ge))
        if kind.le is not None:
            hi = min(hi, math.floor(kind.le))
        if limit is not None:
            hi = min(hi, limit)
        test = f"{col} BETWEEN {lo} AND {hi}"
    elif kind.base == "float":
        test = f"isFinite({col})" + ("" if kind.ge is None else f" AND {col} >= {float(kind.ge)!r}")
    elif kind.base == "bool":
        test = None
    elif kind.base == "ts":
        test = f"toUnixTimestamp64Milli({col}) BETWEEN {_MIN_MS} AND {_MAX_MS}"
    elif kind.base == "json":
        test = f"{col} = '{{}}'"
    else:
        raise Unsupported(f"{name}: {kind.base} has no bulk check")
    if test is None:
        return None
    return f"({col} IS NULL OR {test})" if kind.optional else f"({test})"


@dataclass(frozen=True)
class AvroBulk:
    """The bulk path of one registered schema (one fingerprint) of one table."""

    table: str
    header: bytes
    """The messages' single-object header: marker + fingerprint."""
    schema_json: bytes
    """The container's writer schema."""
    select: str
    """``SELECT`` list over ``file(..., Avro)`` giving the table's columns in ``columns`` order, then the check."""
    columns: tuple[str, ...]
    """The table's insert columns (its spec's)."""
    utf8_check: str | None = None
    """The ``isValidUTF8`` test of the row's text as it stands in :attr:`select`, followed by `` AND ``
    (None: no text field): a reader that validated every string itself may drop exactly this."""

    def container_head(self, sync: bytes) -> bytes:
        meta = {b"avro.schema": self.schema_json, b"avro.codec": b"null"}
        head = bytearray(b"Obj\x01") + _varint(len(meta))
        for k, v in meta.items():
            head += _varint(len(k)) + k + _varint(len(v)) + v
        head += _varint(0) + sync
        return bytes(head)

    def sql(self, target: str, path: str, block: BulkBlock, ingested_ms: int, settings: str) -> str:
        """The ``INSERT ... SELECT`` of ``block`` (written to ``path``) into ``target``."""
        topics = "[" + ", ".join(_quote(t) for t in block.topics) + "]"
        select = self.select.format(
            topics=topics, ingested=int(ingested_ms), nonce=block.nonce.hex(), path=_quote(path), table=self.table
        )
        names = ", ".join(f"`{c}`" for c in self.columns)
        return f"INSERT INTO {target} ({names}) {select} SETTINGS {settings}"


def build_bulk(
    model: type[ev.SchemaModel],
    schema: dict[str, Any],
    fingerprint: bytes,
    spec: TableSpec | None = None,
    tables: frozenset[str] = BULK_TABLES,
) -> AvroBulk:
    """The bulk path for messages written with ``schema`` (decoding to ``model``; its table's spec,
    ``spec`` or the model's in :data:`stream_jobs.tables.SPECS`); or Unsupported."""
    spec = spec or BY_MODEL.get(model)
    if spec is None or model not in spec.models:
        raise Unsupported(f"no table for {model.__name__}")
    table = spec.table
    if table not in tables:
        raise Unsupported(f"{model.__name__}: table {table} not on the bulk path")
    if spec.raw_event:
        raise Unsupported(f"{model.__name__}: raw events need their record hash (Python reader)")
    kinds = _model_kinds(model)
    fields = schema["fields"]
    names = [f["name"] for f in fields]
    if sorted(names) != sorted([*kinds, "extra_json"]) or {"_hdr", "_prov"} & set(names):
        raise Unsupported(f"{model.__name__}: Avro fields {names} are not the model's fields + extra_json")
    checks = ["`extra_json` IS NULL", f"substring(`_prov`, 1, {NONCE_LEN}) = unhex('{{nonce}}')"]
    texts: list[str] = []
    for f in fields:
        name = f["name"]
        if name == "extra_json":
            if _avro_type(f["type"]) != (True, "string"):
                raise Unsupported("extra_json must be [null, string]")
            continue
        optional, avro = _avro_type(f["type"])
        kind = kinds[name]
        if kind.optional != optional or kind.base not in _AVRO_FOR or avro not in _AVRO_FOR[kind.base]:
            raise Unsupported(f"{model.__name__}.{name}: Avro {f['type']} for a {kind.base} field")
        if (kind.base == "ts") != (name in spec.time_columns):
            raise Unsupported(f"{table}.{name}: time column mismatch")
        limit = spec.limits.get(name)
        if limit is not None and kind.base != "int":
            raise Unsupported(f"{table}.{name}: a column limit on a {kind.base} field")
        test = _check(name, kind, avro, limit)
        if test is not None:
            checks.append(test)
        text = _utf8_text(name, kind)
        if text is not None:
            texts.append(text)
    utf8 = _utf8_check(texts)
    if utf8 is not None:
        checks.insert(2, utf8)  # never last: the allowed-values and column checks follow it
    if set(spec.limits) - set(kinds):
        raise Unsupported(f"{table}: column limits on columns {model.__name__} has no field for")
    for column, allowed in spec.allowed.items():
        checks.append(f"`{column}` IN ({', '.join(_quote(v) for v in sorted(allowed))})")
    p = NONCE_LEN
    provenance = {
        "_topic": f"{{topics}}[reinterpretAsUInt32(substring(`_prov`, {p + 1}, 4)) + 1]",
        "_partition": f"reinterpretAsUInt32(substring(`_prov`, {p + 5}, 4))",
        "_offset": f"reinterpretAsUInt64(substring(`_prov`, {p + 9}, 8))",
        "_ingested_at": "fromUnixTimestamp64Milli(toInt64({ingested}), 'UTC')",
    }
    absent = {name: _absent_sql(value) for name, value in spec.absent(model).items()}
    values = []
    for column in spec.columns:
        if column in kinds:
            values.append(f"`{column}`")
        elif column in provenance:
            values.append(provenance[column])
        elif absent.get(column) is not None:
            values.append(str(absent[column]))
        else:
            raise Unsupported(f"{table}.{column}: no bulk value for {model.__name__}")
    container = dict(schema)
    container["fields"] = [
        {"name": "_hdr", "type": {"type": "fixed", "name": "ScopewatchHeader", "size": 10}},
        *fields,
        {"name": "_prov", "type": {"type": "fixed", "name": "ScopewatchProvenance", "size": PROV_LEN}},
    ]
    condition = " AND ".join(checks).replace("{", "{{").replace("}", "}}").replace("{{nonce}}", "{nonce}")
    select = (
        f"SELECT {', '.join(values)} FROM file({{path}}, Avro) "
        f"WHERE throwIf(NOT ({condition}), 'scopewatch bulk check: a {{table}} row needs the per-message path') = 0"
    )
    utf8_check = None if utf8 is None else utf8 + " AND "
    if utf8_check is not None and select.count(utf8_check) != 1:
        utf8_check = None  # (braces in a field name would have been doubled: keep the check)
    return AvroBulk(table, MAGIC + fingerprint, json.dumps(container).encode(), select, spec.columns, utf8_check)


def bulk_specs() -> dict[bytes, AvroBulk]:
    """The bulk path of every registered schema of a :data:`BULK_TABLES` table that supports it, by header."""
    out = {}
    for entry in schema_entries():
        try:
            bulk = build_bulk(entry.model, entry.schema, entry.fingerprint)
        except Unsupported:
            continue
        out[bulk.header] = bulk
    return out


_BLOCK_HEADS: dict[int, bytes] = {}


def block_head_for(n: int) -> bytes:
    """The start of a one-record block of ``n`` bytes: count 1, then the byte length (cached)."""
    head = _BLOCK_HEADS.get(n)
    if head is None:
        if len(_BLOCK_HEADS) > 100_000:
            _BLOCK_HEADS.clear()
        head = _BLOCK_HEADS[n] = _varint(1) + _varint(n)
    return head


@dataclass
class BulkBlock:
    """The messages of one batch for one :class:`AvroBulk`: their values, offsets and provenance runs.

    The RowBinary transcoder reads the values as they are (:meth:`stream_jobs.rowbinary.RowBinaryCodec.transcode`);
    the Avro container (one block per message, ``_prov`` after each value) is built by :meth:`payload` only
    when the rows go to the engine as Avro (no transcoder, ``SINK_DECODER=avro``, or a value it refused).
    """

    spec: AvroBulk
    nonce: bytes = field(default_factory=lambda: os.urandom(NONCE_LEN))
    sync: bytes = field(default_factory=lambda: os.urandom(16))
    values: list[bytes] = field(default_factory=list)
    """The message values (header included), in arrival order."""
    messages: list[Any] = field(default_factory=list)
    """The consumer records (their ``offset``; the per-message fallback reads them whole), one per value."""
    runs: list[tuple[int, bytes]] = field(default_factory=list)
    """(index of the first value, ``_prov`` prefix) of each run of values from one partition."""
    topics: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.messages)

    def prefix(self, topic: str, partition: int) -> bytes:
        """The constant start of ``_prov`` for one partition's messages."""
        try:
            index = self.topics.index(topic)
        except ValueError:
            index = len(self.topics)
            self.topics.append(topic)
        return self.nonce + index.to_bytes(4, "little") + partition.to_bytes(4, "little")

    def start_run(self, prefix: bytes) -> None:
        """The values added next carry ``prefix`` (the sink calls this once per partition's messages)."""
        if self.runs and self.runs[-1][1] == prefix:
            return
        if self.runs and self.runs[-1][0] == len(self.values):
            self.runs[-1] = (len(self.values), prefix)
        else:
            self.runs.append((len(self.values), prefix))

    def add(self, msg: Any, value: bytes, prefix: bytes) -> None:
        """One message (the sink inlines this in its loop, with one :meth:`start_run` per partition)."""
        self.start_run(prefix)
        self.values.append(value)
        self.messages.append(msg)

    def head(self) -> bytes:
        """The Avro container's header."""
        return self.spec.container_head(self.sync)

    def payload(self) -> bytes:
        """The Avro container of the values: one block per message, ``_prov`` after each value."""
        parts = [self.head()]
        bounds = [start for start, _ in self.runs[1:]] + [len(self.values)]
        heads = _BLOCK_HEADS
        sync = self.sync
        for (start, prefix), end in zip(self.runs, bounds, strict=True):
            for value, msg in zip(self.values[start:end], self.messages[start:end], strict=True):
                n = len(value) + PROV_LEN
                parts += (heads.get(n) or block_head_for(n), value, prefix, msg.offset.to_bytes(8, "little"), sync)
        return b"".join(parts)
