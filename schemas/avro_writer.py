"""A compiled Avro writer: the single-object encoding of a model, byte for byte as
:func:`schemas.encode` writes it, without fastavro's per-call set-up (the decision worker's
evidence and findings; issue 16) and the collectors' events (``collectors.emit``). It lives in
``schemas`` so that every package may use it.

:func:`writer_for` builds, once per model, a function that takes the record as a plain ``dict``
(the Avro field values: strings, ints, floats, ``datetime`` for ``timestamp-millis``, the
canonical JSON text of the object-valued fields, nested records as dicts) and returns the single-
object encoding (``C3 01`` + schema fingerprint + body). It supports what the event schemas use
-- records, strings, ints/longs, doubles, booleans, arrays, ``timestamp-millis`` and unions of
``null`` with one other type -- and returns None for a schema with anything else (the caller then
uses :func:`schemas.encode`). :func:`fast_encode` takes the model itself (the record as
:func:`schemas.encode` builds it) and falls back to :func:`schemas.encode` for a model without a
compiled writer. ``tests/unit/schemas/test_avro_writer.py`` checks the bytes against fastavro's for
every model.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from schemas.codec import JSON_FIELDS, MAGIC, CodecError, _to_record, encode, schema_entries
from schemas.events import SchemaModel, canonical_json

__all__ = ["Writer", "fast_encode", "writer_for"]

Writer = Callable[[dict[str, Any]], bytes]
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_DOUBLE = struct.Struct("<d").pack
_FLOAT = struct.Struct("<f").pack


class _Unsupported(Exception):
    pass


def _long(n: int) -> bytes:
    """The zigzag varint of a long (small ones and the last few hundred large ones looked up)."""
    if type(n) is int:
        if 0 <= n < 4096:
            return _LENGTHS[n]
        known = _LONGS.get(n)
        if known is not None:
            return known
        if len(_LONGS) >= 512:
            _LONGS.clear()
        known = _LONGS[n] = _varint(n)
        return known
    return _varint(n)


def _varint(n: int) -> bytes:
    if not isinstance(n, int):
        raise TypeError(f"expected an int, got {type(n).__name__}")
    if not -(1 << 63) <= n < (1 << 63):
        raise OverflowError("int out of the long range")
    n = (n << 1) ^ (n >> 63)
    out = bytearray()
    while n > 0x7F:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


_TIMESTAMPS: dict[datetime, bytes] = {}
"""Encoded ``timestamp-millis`` of recent instants (a batch's records share their decision instant
and calls share their event times): the dict's equality is the instant's, as ``_millis`` reads it."""


def _timestamp(v: Any) -> bytes:
    """The encoded ``timestamp-millis`` of ``v`` (a datetime; a naive one raises, as ``_millis``)."""
    if v.__class__ is datetime and v.tzinfo is not None:
        known = _TIMESTAMPS.get(v)
        if known is None:
            if len(_TIMESTAMPS) >= 1024:
                _TIMESTAMPS.clear()
            known = _TIMESTAMPS[v] = _long(_millis(v))
        return known
    return _long(_millis(v))


def _int(n: int) -> bytes:
    if isinstance(n, int) and not -(1 << 31) <= n < (1 << 31):
        raise OverflowError("int out of the int range")
    return _long(n)


def _millis(v: Any) -> int:
    if isinstance(v, datetime):
        if v.tzinfo is None:
            raise ValueError("naive datetime")
        d = v - _EPOCH
        return (d.days * 86400 + d.seconds) * 1000 + d.microseconds // 1000
    return int(v) if isinstance(v, int) else v


_LONGS: dict[int, bytes] = {}  # e.g. a collector's epoch, the same in every event
_LENGTHS = [_varint(n) for n in range(4096)]
"""The encoded lengths of short strings and arrays, precomputed."""


class _Gen:
    """Straight-line Python source of one schema's writer (compiled once with ``exec``)."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.n = 0

    def var(self) -> str:
        self.n += 1
        return f"v{self.n}"

    def emit(self, schema: Any, value: str, pad: str) -> None:
        out = self.lines.append
        if isinstance(schema, dict) and schema.get("logicalType") is None and isinstance(schema.get("type"), str):
            if schema["type"] not in ("record", "array"):
                schema = schema["type"]
        if schema == "string":
            b, n = self.var(), self.var()
            out(f"{pad}{b} = {value}.encode('utf-8'); {n} = len({b})")
            out(f"{pad}buf += _LENGTHS[{n}] if {n} < 4096 else _long({n}); buf += {b}")
        elif schema == "long":
            # the usual small non-negative long looked up inline (no call); anything else as before
            v = self.var()
            out(f"{pad}{v} = {value}")
            out(f"{pad}buf += _LENGTHS[{v}] if {v}.__class__ is int and 0 <= {v} < 4096 else _long({v})")
        elif schema == "int":
            out(f"{pad}buf += _int({value})")
        elif schema == "double":
            out(f"{pad}buf += _DOUBLE({value})")
        elif schema == "float":
            out(f"{pad}buf += _FLOAT({value})")
        elif schema == "boolean":
            v = self.var()
            out(f"{pad}{v} = {value}")
            out(f"{pad}buf.append(1 if {v} is True else 0 if {v} is False else _bool({v}))")
        elif schema == "null":
            out(f"{pad}_null({value})")
        elif isinstance(schema, list):
            branches = [b for b in schema if b != "null"]
            if len(schema) != 2 or len(branches) != 1:
                raise _Unsupported("union")
            null_byte, other_byte = (0, 2) if schema[0] == "null" else (2, 0)  # zigzag(0), zigzag(1)
            v = self.var()
            out(f"{pad}{v} = {value}")
            out(f"{pad}if {v} is None:")
            out(f"{pad}    buf.append({null_byte})")
            out(f"{pad}else:")
            out(f"{pad}    buf.append({other_byte})")
            self.emit(branches[0], v, pad + "    ")
        elif isinstance(schema, dict) and schema.get("logicalType") == "timestamp-millis" and schema["type"] == "long":
            out(f"{pad}buf += _timestamp({value})")
        elif isinstance(schema, dict) and schema.get("type") == "array":
            v, x = self.var(), self.var()
            out(f"{pad}{v} = _list({value})")
            out(f"{pad}if {v}:")
            out(f"{pad}    buf += _LENGTHS[len({v})] if len({v}) < 4096 else _long(len({v}))")
            out(f"{pad}    for {x} in {v}:")
            self.emit(schema["items"], x, pad + "        ")
            out(f"{pad}buf.append(0)")
        elif isinstance(schema, dict) and schema.get("type") == "record":
            r = self.var()
            out(f"{pad}{r} = {value}")
            for f in schema["fields"]:
                self.emit(f["type"], f"{r}[{f['name']!r}]", pad)
        else:
            raise _Unsupported(str(schema))


def _bool(v: Any) -> int:
    if not isinstance(v, bool):
        raise TypeError(f"expected a boolean, got {type(v).__name__}")
    return 1 if v else 0


def _null(v: Any) -> None:
    if v is not None:
        raise TypeError("expected null")


def _list(v: Any) -> Any:
    if not isinstance(v, (list, tuple)):
        raise TypeError(f"expected a list, got {type(v).__name__}")
    return v


def _compile(schema: dict[str, Any], header: bytes) -> Callable[[dict[str, Any]], bytes]:
    gen = _Gen()
    gen.emit(schema, "rec", "    ")
    source = "def write(rec):\n    buf = bytearray(HEADER)\n" + "\n".join(gen.lines) + "\n    return bytes(buf)\n"
    scope: dict[str, Any] = {
        "HEADER": header,
        "_LENGTHS": _LENGTHS,
        "_long": _long,
        "_int": _int,
        "_millis": _millis,
        "_timestamp": _timestamp,
        "_bool": _bool,
        "_null": _null,
        "_list": _list,
        "_DOUBLE": _DOUBLE,
        "_FLOAT": _FLOAT,
    }
    exec(compile(source, f"<avro writer {schema.get('name')}>", "exec"), scope)  # noqa: S102 - our own source
    write: Callable[[dict[str, Any]], bytes] = scope["write"]
    return write


@functools.cache
def writer_for(model: type[SchemaModel]) -> Writer | None:
    """The compiled writer of ``model``'s current schema, or None if it uses an unsupported type."""
    for entry in schema_entries():
        if entry.model is model and entry.current:
            try:
                body = _compile(entry.schema, bytes(MAGIC + entry.fingerprint))
            except _Unsupported:
                return None

            def write(rec: dict[str, Any], body: Callable[[dict[str, Any]], bytes] = body) -> bytes:
                try:
                    return body(rec)
                except (ValueError, TypeError, OverflowError, KeyError, AttributeError) as exc:
                    raise CodecError(f"cannot encode {model.__name__}: {exc}") from None

            return write
    return None


@functools.cache
def _json_fields(model: type[SchemaModel]) -> tuple[str, ...] | None:
    """The object-valued (JSON text) fields of ``model``; None when its records need the general
    :func:`~schemas.codec._to_record` (a nested collector record)."""
    if "collector" in model.model_fields:
        return None
    return tuple(name for name in model.model_fields if name in JSON_FIELDS)


def _record_of(model: SchemaModel) -> dict[str, Any]:
    """``_to_record(model)``, the same dict, with the model's JSON fields known in advance and an empty
    object's text (``{}``: e.g. every evidence record's ``facts``) without the encoder."""
    fields = _json_fields(type(model))
    if fields is None:
        return _to_record(model)
    rec = dict(model.__dict__)
    for name in fields:
        value = rec.get(name)
        if value is not None:
            rec[name] = "{}" if value.__class__ is dict and not value else canonical_json(value)
    extra = model.__pydantic_extra__
    rec["extra_json"] = canonical_json(extra) if extra else None
    return rec


def fast_encode(model: SchemaModel) -> bytes:
    """:func:`schemas.encode` of ``model`` (the same bytes, the same :class:`CodecError` on a value
    its schema cannot hold), through the compiled writer of its type when there is one; a value that
    writer refuses goes to :func:`schemas.encode` (which accepts or raises as it always did)."""
    write = writer_for(type(model))
    if write is None:
        return encode(model)
    try:
        return write(_record_of(model))
    except CodecError:  # the compiled writer is stricter than fastavro on a few types: fastavro decides
        return encode(model)
