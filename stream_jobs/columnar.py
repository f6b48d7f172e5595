"""The sink's columnar fast path: Avro message bytes -> one row tuple, without building models.

``ClickHouseSink`` used to turn every message into a pydantic model (``schemas.decode``: fastavro,
then full validation) and the model into a dict row (``to_row``: re-serialising every JSON
field). That cost about 60 µs per message. This module generates, once per registered Avro
schema, a plain Python function that reads the message body directly and returns the row as a
tuple in the order of :data:`stream_jobs.rows.COLUMNS`, with DateTime64 columns as integer
milliseconds, JSON fields as the text the message carries, and ``_record_hash`` spliced from the
fields. The sink transposes a batch's tuples into columns and inserts them column-oriented.

**Contract.** A fast reader either returns exactly the tuple the full path (``decode`` +
``to_row`` + ``check_row``) would store for that message, or raises. It never decides that a
message is bad: anything it does not accept -- a corrupt body, a failed check, unknown fields
(``extra_json``), a field it does not know how to check -- goes to the full path, which stores it
or dead-letters it with the same reason as before. So the fast path cannot weaken validation,
only skip work on messages that pass all of it.

**What a fast reader checks, per message** (the model's own rules, read off the model classes):

* framing: the ``C3 01`` marker and a fingerprint registered for a supported schema; every byte
  of the body consumed, no trailing bytes; varints minimal and within 64 bits; string lengths
  inside the body; strings valid UTF-8; union branch and boolean bytes valid;
* required fields and types: the Avro schema gives every field a type and there are no missing
  fields in a binary record; the generator refuses schemas whose fields do not match the model's
  fields and types one to one, so such messages take the full path;
* ``Literal`` fields (``event_type``, ``transport``, ``status``, ``severity``, ``channel``,
  ``outcome``) against their allowed values; event ids in canonical UUID form;
* numeric ranges of the model (``ge``/``le``, non-negative collector epoch and sequence,
  Avro ``int`` within 32 bits) and finite floats;
* timestamps within the range a datetime can hold (what ``decode`` can represent);
* JSON fields (``arguments``, ``attested``, ``claimed``, ``auth``, ``facts``, ``details``): parsed
  with orjson, must be a JSON object (no NaN/Infinity, valid UTF-8, no lone surrogates), and must
  already be in canonical form (orjson re-emits the same bytes with sorted keys). Text that is
  valid JSON but not canonical takes the full path, which canonicalises it as before;
* the sink's own column checks (:func:`stream_jobs.rows.check_row`): UInt32 columns whose model
  allows larger values, and evidence verdicts outside ``detections.engine.VERDICTS``.

**What it relies on the producer for.** One thing: number formatting inside JSON fields. orjson
and Python's ``json`` write some floats differently (``0.00001`` vs ``1e-05``, ``1e-7`` vs
``1e-07``). Text written by ``schemas.encode`` (Python's canonical JSON) with such a float does
not survive the orjson round trip, so it takes the full path and is stored exactly as before;
but text written by a foreign producer in orjson's float style is stored as sent instead of in
Python's spelling of the same number (and a raw event's ``_record_hash`` is computed over that
spelling). Every other difference from canonical JSON is caught.

Messages whose schema has no fast reader (a fingerprint registered after the sink started, a
model the generator cannot check) and messages with unknown fields take the full path.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson
from annotated_types import Ge, Le
from pydantic import AfterValidator, BeforeValidator, PlainSerializer

from schemas import events as ev
from schemas.codec import JSON_FIELDS, MAGIC, schema_entries
from stream_jobs.tables import BY_MODEL, TableSpec

__all__ = ["FastReader", "Reject", "Unsupported", "arrow_table", "build_reader", "fast_readers"]

HEADER_LEN: Final = 10


class Reject(Exception):
    """A fast reader declines a message: the full path decides what becomes of it."""


class Unsupported(ValueError):
    """The generator cannot build a reader that checks everything the model checks."""


TABLE_OF: Final[dict[type[ev.SchemaModel], str]] = {model: spec.table for model, spec in BY_MODEL.items()}
"""The table of every model (from the table specs, :mod:`stream_jobs.tables`)."""

_PROVENANCE: Final = {"_topic": "topic", "_partition": "partition", "_offset": "offset", "_ingested_at": "ingested"}

# ------------------------------------------------------------------ runtime helpers

_MIN_MS: Final = (datetime(1, 1, 1, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
_MAX_MS: Final = (datetime(9999, 12, 31, 23, 59, 59, 999000, tzinfo=UTC) - datetime(1970, 1, 1, tzinfo=UTC)) // (
    timedelta(milliseconds=1)
)
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_INF: Final = math.inf
_UUID: Final = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}").fullmatch
_SORT: Final = orjson.OPT_SORT_KEYS
_jstr: Callable[[str], str] = json.encoder.encode_basestring  # what json.dumps(ensure_ascii=False) uses
_frepr: Final = float.__repr__
_unpack_double: Final = struct.Struct("<d").unpack_from


def _long(buf: bytes, pos: int, b: int) -> tuple[int, int]:
    """The rest of a zig-zag varint whose first byte ``b`` (>= 0x80) was read; (value, next position)."""
    n = b & 0x7F
    shift = 7
    while True:
        b = buf[pos]
        pos += 1
        n |= (b & 0x7F) << shift
        if b < 0x80:
            break
        shift += 7
        if shift > 63:
            raise Reject("varint longer than 10 bytes")
    if b == 0 or n >> 64:
        raise Reject("varint not minimal or beyond 64 bits")
    return (n >> 1) ^ -(n & 1), pos


def _length(buf: bytes, pos: int, b: int) -> tuple[int, int]:
    """A string or block length whose first byte ``b`` is not a small non-negative length."""
    if b < 0x80:
        raise Reject("negative length")
    n, pos = _long(buf, pos, b)
    if n < 0:
        raise Reject("negative length")
    return n, pos


def _json(raw: bytes) -> None:
    """Reject unless ``raw`` (UTF-8) is a JSON object in canonical form (see the module doc)."""
    obj = orjson.loads(raw)
    if type(obj) is not dict or orjson.dumps(obj, option=_SORT) != raw:
        raise Reject("JSON field not a canonical JSON object")


def _json_labels(raw: bytes) -> None:
    """:func:`_json`, and the object maps each label to a list of strings (``PolicyPublished.labels``)."""
    obj = orjson.loads(raw)
    if type(obj) is not dict or orjson.dumps(obj, option=_SORT) != raw:
        raise Reject("JSON field not a canonical JSON object")
    for patterns in obj.values():
        if type(patterns) is not list or any(type(p) is not str for p in patterns):
            raise Reject("labels: not label -> list of strings")


_SECONDS: dict[int, str] = {}


def _jts(ms: int) -> str:
    """A millisecond timestamp as the JSON string ``format_timestamp`` gives (cached per second)."""
    sec, rem = divmod(ms, 1000)
    prefix = _SECONDS.get(sec)
    if prefix is None:
        if len(_SECONDS) > 50_000:
            _SECONDS.clear()
        u = _EPOCH + timedelta(seconds=sec)
        prefix = f'"{u.year:04d}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:{u.second:02d}.'
        _SECONDS[sec] = prefix
    return f'{prefix}{rem:03d}Z"'


def _jlist(values: list[str]) -> str:
    return "[" + ",".join(map(_jstr, values)) + "]"


def _sha(text: str) -> str:
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()


_RUNTIME: Final[dict[str, Any]] = {
    "Reject": Reject,
    "_length": _length,
    "_json": _json,
    "_json_labels": _json_labels,
    "_jts": _jts,
    "_jstr": _jstr,
    "_jlist": _jlist,
    "_frepr": _frepr,
    "_sha": _sha,
    "_uuid": _UUID,
    "_unpack_double": _unpack_double,
    "_MIN_MS": _MIN_MS,
    "_MAX_MS": _MAX_MS,
    "_INF": _INF,
}

# ------------------------------------------------------------------ what the model checks


@dataclass(frozen=True)
class _Kind:
    """How one model field is read, checked and written."""

    base: str  # str, uuid, lit, int, float, bool, strs, ts, json, collector
    optional: bool = False
    values: frozenset[str] = frozenset()  # lit
    ge: int | float | None = None
    le: int | float | None = None
    labels: bool = False  # json: an object of label -> list of strings (PolicyPublished.labels)


def _kind(name: str, annotation: Any, metadata: list[Any]) -> _Kind:
    optional = False
    meta = list(metadata)
    base = annotation
    if typing.get_origin(base) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(base) if a is not type(None)]
        if len(args) != 1 or len(typing.get_args(base)) != 2:
            raise Unsupported(f"{name}: union {annotation}")
        optional, base = True, args[0]
    if typing.get_origin(base) is typing.Annotated:
        meta += list(base.__metadata__)
        base = typing.get_args(base)[0]
    ge = le = None
    validators = []
    serializers = []
    for m in meta:
        if isinstance(m, Ge) and isinstance(m.ge, (int, float)):
            ge = m.ge
        elif isinstance(m, Le) and isinstance(m.le, (int, float)):
            le = m.le
        elif isinstance(m, (AfterValidator, BeforeValidator)):
            validators.append(m.func)
        elif isinstance(m, PlainSerializer) and m.when_used == "json":
            serializers.append(m.func)
        else:
            raise Unsupported(f"{name}: constraint {m!r}")
    if base is str and not validators and not serializers and ge is None and le is None:
        return _Kind("str", optional)
    if base is str and validators == [ev._uuid_str] and not serializers:
        return _Kind("uuid", optional)
    if typing.get_origin(base) is typing.Literal and not meta:
        values = typing.get_args(base)
        if all(isinstance(v, str) for v in values):
            return _Kind("lit", optional, frozenset(values))
    if base is int and not validators and not serializers:
        return _Kind("int", optional, ge=ge, le=le)
    if base is float and not validators and not serializers and le is None:
        return _Kind("float", optional, ge=ge)
    if base is bool and not meta:
        return _Kind("bool", optional)
    if base == list[str] and not meta:
        return _Kind("strs", optional)
    if base is datetime and validators == [ev.parse_timestamp] and serializers == [ev.format_timestamp]:
        return _Kind("ts", optional)
    if base == dict[str, Any] and validators == [ev._json_object] and not serializers and name in JSON_FIELDS:
        return _Kind("json", optional)
    if base == dict[str, list[str]] and validators == [ev._labels] and not serializers and name in JSON_FIELDS:
        return _Kind("json", optional, labels=True)
    if base is ev.Collector and not meta and optional:
        return _Kind("collector", optional)
    raise Unsupported(f"{name}: {annotation} {meta}")


def _model_kinds(model: type[ev.SchemaModel]) -> dict[str, _Kind]:
    """The kind of every field, after making sure the model checks nothing else."""
    config = model.model_config
    if not (config.get("strict") and config.get("extra") == "allow" and config.get("allow_inf_nan") is False):
        raise Unsupported(f"{model.__name__}: model config {config}")
    deco = model.__pydantic_decorators__
    if (
        deco.validators
        or deco.field_validators
        or deco.root_validators
        or deco.field_serializers
        or deco.model_serializers
        or deco.computed_fields
        or set(deco.model_validators) != {"_extras_are_json"}
        or model.model_post_init is not ev.SchemaModel.model_post_init
    ):
        raise Unsupported(f"{model.__name__}: validators or serializers beyond the field types")
    out = {}
    for name, field in model.model_fields.items():
        if field.alias is not None or field.validation_alias is not None or field.serialization_alias is not None:
            raise Unsupported(f"{model.__name__}.{name}: aliased")
        out[name] = _kind(name, field.annotation, list(field.metadata))
    return out


# ------------------------------------------------------------------ code generation


def _avro_type(t: Any) -> tuple[bool, Any]:
    """(optional, the non-null type) of an Avro field type; optional means the union ["null", X]."""
    if isinstance(t, list):
        if len(t) == 2 and t[0] == "null":
            return True, _plain(t[1])
        raise Unsupported(f"union {t}")
    return False, _plain(t)


def _plain(t: Any) -> Any:
    if isinstance(t, dict) and set(t) <= {"type", "doc"} and isinstance(t["type"], str):
        return t["type"]
    return t


_AVRO_FOR: Final[dict[str, tuple[Any, ...]]] = {
    "str": ("string",),
    "uuid": ("string",),
    "lit": ("string",),
    "json": ("string",),
    "int": ("long", "int"),
    "float": ("double",),
    "bool": ("boolean",),
    "strs": ({"type": "array", "items": "string"},),
    "ts": ({"type": "long", "logicalType": "timestamp-millis"},),
}


class _Code:
    def __init__(self) -> None:
        self.lines: list[str] = []
        self.consts: dict[str, Any] = {}
        self._n = 0

    def add(self, indent: int, *lines: str) -> None:
        self.lines.extend("    " * indent + line for line in lines)

    def const(self, value: Any) -> str:
        self._n += 1
        name = f"_K{self._n}"
        self.consts[name] = value
        return name

    def long(self, i: int, dst: str) -> None:
        """A zig-zag varint (Avro int/long), unrolled: at most 10 bytes, minimal, within 64 bits."""
        self.add(i, "b = buf[pos]", "pos += 1", "if b < 128:", f"    {dst} = (b >> 1) ^ -(b & 1)", "else:")
        self.add(i + 1, "n = b & 127")
        for k in range(1, 10):
            self.add(i + k, "b = buf[pos]", "pos += 1", f"n |= (b & 127) << {7 * k}", "if b >= 128:")
        self.add(i + 10, "raise Reject")
        for k in range(9, 0, -1):
            self.add(i + k, "elif b == 0:", "    raise Reject")  # not minimal
        self.add(i + 1, "if n >> 64:", "    raise Reject", f"{dst} = (n >> 1) ^ -(n & 1)")

    def string(self, i: int, dst: str, raw: str | None = None) -> None:
        """A string: lengths below 64 (one byte) and below 8192 (two bytes) inline; UTF-8 checked by decode.

        With ``raw``, also keep the undecoded bytes in that variable (for the JSON check).
        """
        self.add(
            i,
            "b = buf[pos]",
            "pos += 1",
            "if b < 128 and not b & 1:",
            "    n = b >> 1",
            "else:",
            "    c = buf[pos]",
            "    if 128 <= b and 0 < c < 128 and not b & 1:",
            "        n = ((b & 127) | (c << 7)) >> 1",
            "        pos += 1",
            "    else:",
            "        n, pos = _length(buf, pos, b)",
            "end = pos + n",
        )
        # No bounds check: lengths are never negative, so ``pos`` only grows; a string past the end
        # makes a later read fail or the final ``pos != size`` check refuse the message.
        if raw is None:
            self.add(i, f"{dst} = buf[pos:end].decode()", "pos = end")
        else:
            self.add(i, f"{raw} = buf[pos:end]", f"{dst} = {raw}.decode()", "pos = end")

    def read(self, i: int, avro: Any, dst: str, raw: str | None = None) -> None:
        if avro == "string":
            self.string(i, dst, raw)
        elif avro in ("long", "int") or avro == {"type": "long", "logicalType": "timestamp-millis"}:
            self.long(i, dst)
        elif avro == "boolean":
            self.add(i, "b = buf[pos]", "pos += 1", "if b > 1:", "    raise Reject", f"{dst} = b == 1")
        elif avro == "double":
            self.add(i, f"{dst} = _unpack_double(buf, pos)[0]", "pos += 8")
        elif avro == {"type": "array", "items": "string"}:
            self.add(i, f"{dst} = []", "while True:")
            self.long(i + 1, "count")
            self.add(i + 1, "if count == 0:", "    break", "if count < 0:", "    count = -count")
            self.long(i + 2, "_size")
            self.add(i + 1, "for _ in range(count):")
            self.string(i + 2, "item")
            self.add(i + 2, f"{dst}.append(item)")
        else:  # pragma: no cover - _check_types refused it
            raise Unsupported(f"Avro type {avro}")

    def field(self, i: int, optional: bool, avro: Any, dst: str, raw: str | None = None) -> None:
        if not optional:
            self.read(i, avro, dst, raw)
            return
        self.add(i, "b = buf[pos]", "pos += 1", "if b == 0:", f"    {dst} = None", "elif b == 2:")
        self.read(i + 1, avro, dst, raw)
        self.add(i, "else:", "    raise Reject")

    def check(self, i: int, kind: _Kind, var: str, avro: Any) -> None:
        """Lines that raise Reject unless ``var`` passes what the model checks for ``kind``."""
        tests = []
        if kind.base == "uuid":
            tests.append(f"_uuid({var}) is None")
        elif kind.base == "lit":
            tests.append(f"{var} not in {self.const(kind.values)}")
        elif kind.base == "int":
            lo, hi = -(2**63), 2**63 - 1
            if avro == "int":
                lo, hi = -(2**31), 2**31 - 1
            if kind.ge is not None:
                lo = max(lo, math.ceil(kind.ge))
            if kind.le is not None:
                hi = min(hi, math.floor(kind.le))
            tests.append(f"not ({lo} <= {var} <= {hi})")
        elif kind.base == "float":
            low = "-_INF <" if kind.ge is None else f"{float(kind.ge)!r} <="
            tests.append(f"not ({low} {var} < _INF)")
        elif kind.base == "ts":
            tests.append(f"not (_MIN_MS <= {var} <= _MAX_MS)")
        elif kind.base == "json":
            test = f"_json_labels({var}_raw)" if kind.labels else f"_json({var}_raw)"
            self.add(i, f"if {var} is not None:", f"    {test}") if kind.optional else self.add(i, test)
            return
        if not tests:
            return
        cond = " or ".join(tests)
        if kind.optional:
            cond = f"{var} is not None and ({cond})"
        self.add(i, f"if {cond}:", "    raise Reject")


def _json_value(kind: _Kind, var: str) -> str:
    """Python source for the canonical JSON text of a checked field value (model_dump, then canonical_json)."""
    if kind.base in ("str", "uuid", "lit"):
        text = f"_jstr({var})"
    elif kind.base == "int":
        text = f"str({var})"
    elif kind.base == "float":
        text = f"_frepr({var})"
    elif kind.base == "bool":
        text = f"('true' if {var} else 'false')"
    elif kind.base == "strs":
        text = f"_jlist({var})"
    elif kind.base == "ts":
        text = f"_jts({var})"
    elif kind.base == "json":
        text = var
    else:  # pragma: no cover
        raise Unsupported(kind.base)
    return f"('null' if {var} is None else {text})" if kind.optional else text


def _read_record(
    code: _Code, i: int, model: type[ev.SchemaModel], schema: dict[str, Any], prefix: str
) -> dict[str, _Kind]:
    """Read and check every field of a record into ``<prefix><field>`` variables; returns the kinds."""
    if not isinstance(schema, dict) or schema.get("type") != "record":
        raise Unsupported("not a record schema")
    kinds = _model_kinds(model)
    fields = schema["fields"]
    names = [f["name"] for f in fields]
    if sorted(names) != sorted([*kinds, "extra_json"]):
        raise Unsupported(f"{model.__name__}: Avro fields {names} are not the model's fields + extra_json")
    avro_of: dict[str, Any] = {}
    for f in fields:
        name = f["name"]
        optional, avro = _avro_type(f["type"])
        if name == "extra_json":
            if not optional or avro != "string":
                raise Unsupported("extra_json must be [null, string]")
            code.field(i, True, "string", f"{prefix}extra_json")
            continue
        kind = kinds[name]
        if kind.optional != optional:
            raise Unsupported(f"{model.__name__}.{name}: nullability differs from the model")
        if kind.base == "collector":
            _read_collector(code, i, avro, f"{prefix}{name}_")
            continue
        if avro not in _AVRO_FOR[kind.base]:
            raise Unsupported(f"{model.__name__}.{name}: Avro {avro} for a {kind.base} field")
        avro_of[name] = avro
        raw = f"{prefix}{name}_raw" if kind.base == "json" else None
        code.field(i, optional, avro, f"{prefix}{name}", raw)
    code.add(i, f"if {prefix}extra_json is not None:", "    raise Reject")
    code.consts.setdefault("_avro_of", {})[prefix] = avro_of
    return kinds


def _read_collector(code: _Code, i: int, avro: Any, prefix: str) -> None:
    """The optional collector stamp: its column values and its canonical JSON (for the record hash)."""
    code.add(i, "b = buf[pos]", "pos += 1", "if b == 0:")
    code.add(
        i + 1,
        f"{prefix}id = ''",
        f"{prefix}epoch = 0",
        f"{prefix}seq = 0",
        f"{prefix}prev_hash = None",
        f"{prefix}json = 'null'",
    )
    code.add(i, "elif b == 2:")
    kinds = _read_record(code, i + 1, ev.Collector, avro, prefix)
    if set(kinds) != {"id", "epoch", "seq", "prev_hash"}:
        raise Unsupported("collector fields changed")
    for name, kind in kinds.items():
        code.check(i + 1, kind, f"{prefix}{name}", code.consts["_avro_of"][prefix][name])
    parts = ",".join(
        f"'{',' if n else '{'}\"{name}\":', {_json_value(kinds[name], prefix + name)}"
        for n, name in enumerate(sorted(kinds))
    )
    code.add(i + 1, f"{prefix}json = ''.join(({parts}, '}}'))")
    code.add(i, "else:", "    raise Reject")


def build_reader(
    model: type[ev.SchemaModel], schema: dict[str, Any], spec: TableSpec | None = None
) -> tuple[str, Callable[..., tuple[Any, ...]]]:
    """(table, reader) for messages written with ``schema`` that decode to ``model``; or Unsupported.

    ``reader(message, topic, partition, offset, ingested_ms)`` returns the row tuple (the columns of
    the table's spec, ``spec`` or the model's in :data:`stream_jobs.tables.SPECS`) or raises (Reject,
    IndexError, UnicodeDecodeError, ...).
    """
    spec = spec or BY_MODEL.get(model)
    if spec is None or model not in spec.models:
        raise Unsupported(f"no table for {model.__name__}")
    table = spec.table
    code = _Code()
    code.add(0, "def reader(buf, topic, partition, offset, ingested):")
    code.add(1, "size = len(buf)", f"pos = {HEADER_LEN}")
    kinds = _read_record(code, 1, model, schema, "f_")
    code.add(1, "if pos != size:", "    raise Reject")
    avro_of = code.consts["_avro_of"]["f_"]
    for name, kind in kinds.items():
        if kind.base != "collector":
            code.check(1, kind, f"f_{name}", avro_of[name])
    for column, limit in spec.limits.items():
        if kinds.get(column, _Kind("")).base != "int":
            raise Unsupported(f"{table}.{column}: limit on a column that is not an int field")
        code.add(1, f"if f_{column} > {limit}:", "    raise Reject")
    for column, allowed in spec.allowed.items():
        if column not in kinds:
            raise Unsupported(f"{table}.{column}: allowed values of a column that is not a field")
        code.add(1, f"if f_{column} not in {code.const(allowed)}:", "    raise Reject")
    if issubclass(model, ev.BaseEvent):
        parts = []
        for n, name in enumerate(sorted(kinds)):
            kind = kinds[name]
            value = "f_collector_json" if kind.base == "collector" else _json_value(kind, f"f_{name}")
            parts.append(f"'{',' if n else '{'}\"{name}\":', {value}")
        code.add(1, f"record_hash = _sha(''.join(({', '.join(parts)}, '}}')))")
    values = []
    absent = {name: repr(value) for name, value in spec.absent(model).items()}
    times = spec.time_columns
    for column in spec.columns:
        if column in kinds and kinds[column].base != "collector":
            if (kinds[column].base == "ts") != (column in times):
                raise Unsupported(f"{table}.{column}: time column mismatch")
            values.append(f"f_{column}")
        elif column.startswith("collector_") and "collector" in kinds:
            values.append(f"f_collector_{column.removeprefix('collector_')}")
        elif column == "extra" and issubclass(model, ev.BaseEvent):
            values.append("'{}'")  # extras take the full path
        elif column in _PROVENANCE:
            values.append(_PROVENANCE[column])
        elif column == "_record_hash" and issubclass(model, ev.BaseEvent):
            values.append("record_hash")
        elif column in absent:
            values.append(absent[column])
        else:
            raise Unsupported(f"{table}.{column}: no value for {model.__name__}")
    code.add(1, f"return ({', '.join(values)},)")
    code.consts.pop("_avro_of")
    source = "\n".join(code.lines)
    namespace: dict[str, Any] = {**_RUNTIME, **code.consts}
    exec(compile(source, f"<fast reader {model.__name__}>", "exec"), namespace)  # noqa: S102 - our own generated code
    reader: Callable[..., tuple[Any, ...]] = namespace["reader"]
    reader.__doc__ = source
    return table, reader


@dataclass(frozen=True)
class FastReader:
    table: str
    read: Callable[..., tuple[Any, ...]]


_FAST_READERS: dict[tuple[bytes, type[ev.SchemaModel]], FastReader | None] = {}
"""The readers built so far, by header and model (generated code is compiled once per process)."""


def fast_readers() -> dict[bytes, FastReader]:
    """A fast reader for every registered schema the generator supports, by header (marker + fingerprint)."""
    out = {}
    for entry in schema_entries():
        header = MAGIC + entry.fingerprint
        key = (header, entry.model)
        if key not in _FAST_READERS:
            try:
                table, reader = build_reader(entry.model, entry.schema)
            except Unsupported:
                _FAST_READERS[key] = None
                continue
            _FAST_READERS[key] = FastReader(table, reader)
        fast = _FAST_READERS[key]
        if fast is not None:
            out[header] = fast
    return out


# ------------------------------------------------------------------ Arrow batches for the embedded engine


def _arrow_type(clickhouse_type: str) -> Any:
    """The Arrow type a ClickHouse column of this type is filled from, or None if not supported here."""
    import pyarrow as pa

    t = clickhouse_type
    if t.startswith("LowCardinality(") and t.endswith(")"):
        t = t[len("LowCardinality(") : -1]
    if t.startswith("Nullable(") and t.endswith(")"):
        t = t[len("Nullable(") : -1]
    if t in ("DateTime64(3, 'UTC')", "DateTime64(3,'UTC')"):
        return pa.timestamp("ms", tz="UTC")
    return {
        "String": pa.string(),
        "Array(String)": pa.list_(pa.string()),
        "Bool": pa.bool_(),
        "UInt16": pa.uint16(),
        "UInt32": pa.uint32(),
        "UInt64": pa.uint64(),
        "Int64": pa.int64(),
        "Float64": pa.float64(),
    }.get(t)


def arrow_table(columns: list[str], types: list[str], data: Any) -> Any:
    """The columns as a pyarrow Table for the embedded engine, or None when a type is not supported here.

    DateTime64(3) columns must hold integer milliseconds (as the sink's row tuples do); every value
    is taken as it is, so the engine stores what the Native insert of clickhouse-connect would (the
    integration tests compare the stored bytes).
    """
    try:
        import pyarrow as pa
    except ImportError:  # pragma: no cover - pyarrow comes with chdb
        return None
    if len(columns) != len(types):
        raise ValueError("one type per column")
    arrays = []
    for clickhouse_type, values in zip(types, data, strict=True):
        arrow_type = _arrow_type(clickhouse_type)
        if arrow_type is None:
            return None
        arrays.append(pa.array(values, type=arrow_type))
    return pa.Table.from_arrays(arrays, names=columns)
