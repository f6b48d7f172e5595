"""Avro single-object encoding of the contract models (what travels on Kafka).

Message layout (Avro spec, "Single-object encoding")::

    C3 01 | 8-byte little-endian CRC-64-AVRO of the schema's Parsing Canonical Form | body

Free-form objects travel as canonical JSON strings, unknown fields in ``extra_json``
(see ``schemas/avro/*.avsc``). Schemas are parsed on first use and cached; the
registry maps every known fingerprint to (parsed schema, model), so older schema
versions can be registered next to the current one and still be decoded.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, Final

from fastavro import parse_schema, schemaless_reader, schemaless_writer
from fastavro.schema import to_parsing_canonical_form
from pydantic import ValidationError

from schemas.events import (
    EVENT_MODELS,
    Collector,
    DeadLetter,
    Evidence,
    Finding,
    PageAttempt,
    SchemaModel,
    canonical_json,
    describe_errors,
)

__all__ = [
    "CRC64_EMPTY",
    "MAGIC",
    "CodecError",
    "SchemaEntry",
    "crc64_avro",
    "decode",
    "encode",
    "fingerprint_of",
    "register_schema",
    "schema_entries",
    "schema_fingerprint",
]

MAGIC: Final = b"\xc3\x01"
HEADER_LEN: Final = 10
CRC64_EMPTY: Final = 0xC15D213AA4D7A795
AVRO_DIR: Final = Path(__file__).parent / "avro"

#: schema file stem -> model; event types plus the two output records
MODELS: Final[dict[str, type[SchemaModel]]] = {
    **EVENT_MODELS,
    "evidence": Evidence,
    "finding": Finding,
    "page_attempt": PageAttempt,
    "dead_letter": DeadLetter,
}
#: fields that travel as canonical JSON strings
JSON_FIELDS: Final = frozenset({"arguments", "attested", "claimed", "auth", "facts", "details", "labels"})


class CodecError(ValueError):
    """Bytes are not a valid scopewatch Avro message, or a model cannot be encoded."""


# ------------------------------------------------------------------------ CRC-64-AVRO


@functools.cache
def _crc64_table() -> tuple[int, ...]:
    table = []
    for i in range(256):
        fp = i
        for _ in range(8):
            fp = (fp >> 1) ^ (CRC64_EMPTY & -(fp & 1))
        table.append(fp)
    return tuple(table)


def crc64_avro(data: bytes) -> int:
    """CRC-64-AVRO (Rabin) fingerprint as an unsigned 64-bit int (Avro spec algorithm)."""
    table = _crc64_table()
    fp = CRC64_EMPTY
    for byte in data:
        fp = (fp >> 8) ^ table[(fp ^ byte) & 0xFF]
    return fp


def schema_fingerprint(schema: Any) -> bytes:
    """8-byte little-endian CRC-64-AVRO of the schema's Parsing Canonical Form."""
    canonical = to_parsing_canonical_form(schema)
    return crc64_avro(canonical.encode("utf-8")).to_bytes(8, "little")


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class _Entry:
    fingerprint: bytes
    schema: Any  # parsed by fastavro
    model: type[SchemaModel]
    source: dict[str, Any] | None = None  # the schema as JSON, as registered


@dataclass
class _Registry:
    by_fingerprint: dict[bytes, _Entry]
    current: dict[type[SchemaModel], _Entry]


@functools.cache
def _registry() -> _Registry:
    reg = _Registry({}, {})
    for name, model in MODELS.items():
        schema = json.loads((AVRO_DIR / f"{name}.avsc").read_text(encoding="utf-8"))
        _add(reg, schema, model, current=True)
    # Earlier versions (schemas/avro/history/<stem>.v<n>.avsc): records written with them still decode.
    for path in sorted((AVRO_DIR / "history").glob("*.avsc")):
        stem = path.name.split(".", 1)[0]
        _add(reg, json.loads(path.read_text(encoding="utf-8")), MODELS[stem], current=False)
    return reg


def _add(reg: _Registry, schema: dict[str, Any], model: type[SchemaModel], *, current: bool) -> bytes:
    fingerprint = schema_fingerprint(schema)
    source = json.loads(json.dumps(schema))
    entry = _Entry(fingerprint, parse_schema(schema), model, source)
    reg.by_fingerprint[fingerprint] = entry
    if current or model not in reg.current:
        reg.current[model] = entry
    return fingerprint


def register_schema(schema: dict[str, Any], model: type[SchemaModel], *, current: bool = False) -> bytes:
    """Register another schema version for ``model``; returns its fingerprint.

    Messages written with it decode to ``model``; with ``current=True`` encode uses it too.
    """
    return _add(_registry(), schema, model, current=current)


@dataclass(frozen=True)
class SchemaEntry:
    """One registered schema: what a fast reader needs to decode its messages without ``decode``."""

    fingerprint: bytes
    schema: dict[str, Any]  # the schema as JSON (a copy)
    model: type[SchemaModel]
    current: bool  # encode writes this schema for ``model``


def schema_entries() -> list[SchemaEntry]:
    """Every registered schema version, with its model.

    For readers that decode message bodies themselves (the sink's columnar path): they must
    produce what ``decode`` would, so they need the exact schema behind each fingerprint.
    """
    reg = _registry()
    return [
        SchemaEntry(fp, json.loads(json.dumps(entry.source)), entry.model, reg.current.get(entry.model) is entry)
        for fp, entry in reg.by_fingerprint.items()
    ]


def fingerprint_of(event_type: str) -> bytes:
    """Header fingerprint (8 bytes, little-endian) of the current schema of a type.

    ``event_type`` is one of EVENT_TYPES, or "evidence" / "dead_letter".
    """
    model = MODELS.get(event_type)
    if model is None:
        raise CodecError(f"unknown event type {event_type!r}")
    return _registry().current[model].fingerprint


# ----------------------------------------------------------------------- encode/decode


def _to_record(model: SchemaModel, json_texts: dict[str, str] | None = None) -> dict[str, Any]:
    rec = dict(model.__dict__)  # declared fields only; unknown ones live in model_extra
    for name in JSON_FIELDS.intersection(rec):
        if rec[name] is not None:
            rec[name] = json_texts[name] if json_texts and name in json_texts else canonical_json(rec[name])
    if isinstance(rec.get("collector"), Collector):
        rec["collector"] = _to_record(rec["collector"])
    extra = model.model_extra
    rec["extra_json"] = canonical_json(extra) if extra else None
    return rec


def _from_record(rec: dict[str, Any]) -> dict[str, Any]:
    extra_json = rec.pop("extra_json", None)
    for name in JSON_FIELDS.intersection(rec):
        if rec[name] is not None:
            rec[name] = _loads(rec[name], name)
    if isinstance(rec.get("collector"), dict):
        rec["collector"] = _from_record(rec["collector"])
    if extra_json is not None:
        extra = _loads(extra_json, "extra_json")
        if not isinstance(extra, dict):
            raise CodecError("body decodes but fails validation: extra_json is not an object")
        clash = sorted(set(extra) & set(rec))
        if clash:
            raise CodecError(f"body decodes but fails validation: extra_json repeats field {clash[0]!r}")
        rec.update(extra)
    return rec


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


_JSON_DECODER: Final = json.JSONDecoder(parse_constant=_reject_constant)
"""Built once: ``json.loads`` with an argument builds a decoder per call."""


def _loads(text: str, field: str) -> Any:
    if not isinstance(text, str):  # json.loads also takes bytes; the Avro strings here are str
        raise CodecError(f"body decodes but fails validation: field '{field}' is not valid JSON")
    try:
        return _JSON_DECODER.decode(text)
    except (ValueError, RecursionError):
        raise CodecError(f"body decodes but fails validation: field '{field}' is not valid JSON") from None


def encode(model: SchemaModel, json_texts: dict[str, str] | None = None) -> bytes:
    """Avro single-object encoding of an event, Evidence or DeadLetter.

    ``json_texts``: the canonical JSON of some of its object-valued fields (``arguments`` ...), when
    the caller has it already (the collectors' emit path serialises them once, for the chain hash too).
    """
    entry = _registry().current.get(type(model))
    if entry is None:
        raise CodecError(f"no Avro schema for {type(model).__name__}")
    buf = BytesIO()
    buf.write(MAGIC)
    buf.write(entry.fingerprint)
    try:
        schemaless_writer(buf, entry.schema, _to_record(model, json_texts))
    except (ValueError, TypeError, OverflowError) as exc:
        raise CodecError(f"cannot encode {type(model).__name__}: {exc}") from None
    return buf.getvalue()


def decode(data: bytes | bytearray | memoryview) -> SchemaModel:
    """Decode one single-object-encoded message into its model; only raises CodecError."""
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise CodecError(f"expected bytes, got {type(data).__name__}")
    data = bytes(data)
    if not data:
        raise CodecError("empty message")
    if not data.startswith(MAGIC) and not MAGIC.startswith(data):
        raise CodecError(
            "not Avro single-object encoding: expected marker c301, "
            f"got {data[:8].hex()}{'...' if len(data) > 8 else ''}"
        )
    if len(data) < HEADER_LEN:
        raise CodecError(f"message too short: {len(data)} bytes, header alone is {HEADER_LEN}")
    entry = _registry().by_fingerprint.get(data[2:HEADER_LEN])
    if entry is None:
        raise CodecError(f"unknown schema fingerprint {data[2:HEADER_LEN].hex()}")
    name = entry.model.__name__
    buf = BytesIO(data)
    buf.seek(HEADER_LEN)
    try:
        rec = schemaless_reader(buf, entry.schema, None)
    except EOFError:
        raise CodecError(f"truncated {name} body") from None
    except Exception as exc:  # noqa: BLE001 -- fastavro raises many types on garbage
        detail = f"{type(exc).__name__}: {exc}"[:120]
        raise CodecError(f"corrupt {name} body: {detail}") from None
    if buf.tell() != len(data):
        raise CodecError(f"{len(data) - buf.tell()} trailing bytes after the {name} record")
    if not isinstance(rec, dict):
        raise CodecError(f"corrupt {name} body: not a record")
    fields = _from_record(rec)
    try:
        return entry.model.model_validate(fields)
    except ValidationError as exc:
        raise CodecError(f"body decodes but fails validation: {name}: {describe_errors(exc)}") from None
    except RecursionError:
        raise CodecError(f"body decodes but fails validation: {name}: nested too deeply") from None
