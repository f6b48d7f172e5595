"""The collectors' one emit path: chain-stamp -> encode -> publish.

Every collector (``wrap``'s observer process, ``proxy``, the SDK middleware, ``intake``) turns
an event into a Kafka record here: :meth:`Emitter.record` stamps it with the collector chain
(:class:`~collectors.chain.ChainStamper`), hashes it and Avro-encodes it, and :meth:`Emitter.emit`
/ :meth:`Emitter.emit_many` hand the records to a publisher.

Each event is serialised once: the canonical JSON of its object-valued fields (``arguments``,
``attested``, ``claimed``, ``auth`` ...) -- most of its bytes -- is written once and used both
in the chain hash (the canonical JSON of the whole event, :func:`schemas.record_hash`) and in
the Avro record (where those fields travel as canonical JSON text). The hash is the same as
:func:`schemas.record_hash` of the stamped event; ``scopewatch verify`` recomputes it that way.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol, TypeVar, cast

from collectors.chain import ChainStamper
from schemas import (
    Collector,
    Event,
    GrantIssued,
    GrantRevoked,
    SessionBound,
    SessionEnded,
    ToolCall,
    ToolResult,
    Topics,
    canonical_json,
    encode,
    key_for,
    topic_for,
)
from schemas.avro_writer import Writer, writer_for
from schemas.codec import JSON_FIELDS
from schemas.events import format_timestamp

__all__ = ["BatchPublisher", "Emitter", "Publisher", "Record", "stamp_and_encode"]

E = TypeVar("E", bound=Event)
_ENCODE = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode
"""The encoder of :func:`schemas.canonical_json`, built once."""


def _not_json(value: object) -> object:
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def _c_encoder() -> Callable[[Any], str]:
    """:data:`_ENCODE` without the C encoder object ``JSONEncoder.encode`` builds on every call (the
    same C code, the same text; no circular-reference check: a collector's values are trees)."""
    make = getattr(json.encoder, "c_make_encoder", None)
    basestring = getattr(json.encoder, "c_encode_basestring", None)
    if make is None or basestring is None:
        return _ENCODE
    iterencode = make(None, _not_json, basestring, None, ":", ",", True, False, False)

    def encode(value: Any) -> str:
        return "".join(iterencode(value, 0))

    return encode


_ENCODE_FAST = _c_encoder()
_ENCODE_STR: Callable[[str], str] = (
    getattr(json.encoder, "c_encode_basestring", None) or json.encoder.py_encode_basestring
)
"""The string encoder the C encoder of :data:`_ENCODE_FAST` uses (``ensure_ascii=False``)."""
_FAST: dict[type[Event], Writer] = {
    model: w
    for model in (ToolCall, ToolResult, SessionBound, SessionEnded, GrantIssued, GrantRevoked)
    if (w := writer_for(model)) is not None
}
"""The event types with a compiled Avro writer (the fast path of :func:`_stamp_encode`)."""
_SLOT = {name: f"\0{name}\0" for name in JSON_FIELDS}
_SLOT_JSON = {name: _ENCODE(slot) for name, slot in _SLOT.items()}
Record = tuple[str, bytes, bytes]


def _json_text(v: Any) -> str:
    """The canonical JSON of one top-level event value, as the C encoder of :data:`_ENCODE_FAST` writes
    it inside the whole event (the same C functions: strings, ints; a timestamp as its canonical text)."""
    t = type(v)
    if t is str:
        return _ENCODE_STR(v)
    if v is None:
        return "null"
    if t is datetime:
        return _ENCODE_STR(format_timestamp(v))
    if t is int:
        return int.__repr__(v)
    return _ENCODE_FAST(v)


def _text_or_null(text: str | None) -> str:
    return "null" if text is None else text


Canon = Callable[[dict[str, Any], int, str, str | None, int], str]


def _compile_canon(model: type[Event]) -> tuple[frozenset[str], tuple[str, ...], Canon]:
    """The canonical JSON of ``model``'s events written by one generated expression: its fields'
    keys in sorted order (fixed per model), each value encoded on its own -- what the encoder does
    for the whole event (sorting the keys, dispatching on each value's type) without doing it anew
    for every event. Takes the event's values (object-valued fields already as their canonical JSON
    text, see :func:`_stamp_encode`) and the chain stamp."""
    fields = frozenset(model.model_fields)
    consts: dict[str, Any] = {"_json_text": _json_text, "_text_or_null": _text_or_null, "_S": _ENCODE_STR}
    parts: list[str] = []
    for i, name in enumerate(sorted(fields)):
        consts[f"K{i}"] = ("{" if i == 0 else ",") + _ENCODE_STR(name) + ":"
        if name == "collector":
            value = (
                "'{\"epoch\":' + _json_text(epoch) + ',\"id\":' + _json_text(cid)"
                " + ',\"prev_hash\":' + _json_text(prev) + ',\"seq\":' + _json_text(seq) + '}'"
            )
        elif name in JSON_FIELDS:
            value = f"_text_or_null(rec[{name!r}])"
        else:  # most values are strings: encoded here without a call of _json_text
            value = f"(_S(v) if type(v := rec[{name!r}]) is str else _json_text(v))"
        parts.append(f"K{i}, {value}")
    source = "def canon(rec, epoch, cid, prev, seq):\n    return ''.join((" + ", ".join(parts) + ", '}'))\n"
    exec(compile(source, f"<canonical JSON of {model.__name__}>", "exec"), consts)  # noqa: S102 - our own source
    return fields, tuple(sorted(JSON_FIELDS & fields)), consts["canon"]


_CANON = {model: _compile_canon(model) for model in _FAST}
"""Per event type of :data:`_FAST`: its field names, its object-valued fields and its canonical JSON writer."""
"""``(topic, key, value)``: what a publisher takes."""


class Publisher(Protocol):
    def publish(self, topic: str, key: bytes | None, value: bytes) -> bool: ...


class BatchPublisher(Publisher, Protocol):
    def publish_many(self, records: Iterable[tuple[str, bytes | None, bytes]]) -> int: ...


def stamp_and_encode(stamper: ChainStamper, event: E) -> tuple[E, bytes]:
    """``event`` with the next chain stamp, and its Avro encoding (serialised once, see the module)."""
    collector = Collector(
        id=stamper.collector_id, epoch=stamper.epoch, seq=stamper.seq + 1, prev_hash=stamper.prev_hash
    )
    value = _stamp_encode(stamper, event)
    return cast(E, event.model_copy(update={"collector": collector})), value


def _stamp_encode(stamper: ChainStamper, event: Event) -> bytes:
    """The Avro encoding of ``event`` with the next chain stamp; advances the stamper.

    The fast path (the event types collectors emit, without unknown fields): the event's values
    (object-valued fields as their canonical JSON), the canonical JSON of the whole event for the
    hash written from them by the event type's generated writer (:func:`_compile_canon`; a plain
    dict and one encoder call when the event lacks a field), and the compiled Avro writer of
    :mod:`schemas.avro_writer` -- no model copy, no ``model_dump``, no fastavro call set-up. The
    bytes and the hash are those of the general path (the tests compare).
    """
    seq = stamper.seq + 1
    prev = stamper.prev_hash
    writer = _FAST.get(type(event))
    if writer is None or event.__pydantic_extra__:
        collector = Collector(id=stamper.collector_id, epoch=stamper.epoch, seq=seq, prev_hash=prev)
        stamped = event.model_copy(update={"collector": collector})
        fields = stamped.__dict__
        texts = {
            name: canonical_json(fields[name]) for name in JSON_FIELDS.intersection(fields) if fields[name] is not None
        }
        plain = stamped.model_dump(mode="json", exclude=set(texts))
        text = _canonical_object(plain, texts)
        value = encode(stamped, texts)
    else:
        rec = dict(event.__dict__)
        canon = _CANON.get(type(event))
        if canon is not None and rec.keys() == canon[0]:
            for name in canon[1]:  # the object-valued fields: their canonical JSON, once
                v = rec[name]
                if v is not None:
                    rec[name] = _ENCODE_FAST(v)
            text = canon[2](rec, stamper.epoch, stamper.collector_id, prev, seq)
        else:
            plain = {}
            texts = {}
            for name, v in rec.items():
                if name in JSON_FIELDS:
                    if v is not None:
                        texts[name] = rec[name] = _ENCODE_FAST(v)
                        plain[name] = _SLOT[name]
                        continue
                elif type(v) is datetime:
                    plain[name] = format_timestamp(v)
                    continue
                plain[name] = v
            plain["collector"] = {"epoch": stamper.epoch, "id": stamper.collector_id, "prev_hash": prev, "seq": seq}
            text = _with_texts(plain, texts)
        rec["collector"] = {
            "epoch": stamper.epoch,
            "id": stamper.collector_id,
            "prev_hash": prev,
            "seq": seq,
            "extra_json": None,
        }
        rec["extra_json"] = None
        value = writer(rec)
    stamper.seq = seq  # only once the event is encoded: a failure leaves no gap in the chain
    stamper.prev_hash = "sha256:" + hashlib.sha256(text.encode("utf-8")).hexdigest()
    return value


def _with_texts(plain: dict[str, Any], texts: dict[str, str]) -> str:
    """The canonical JSON of the event: ``plain`` holds a slot string (:data:`_SLOT`) where each of
    ``texts`` goes; one encoder call for the whole event, then each slot is replaced by its text.
    A slot must appear exactly once in the output -- it could appear again only inside a value
    (a string holding NUL characters and the slot's name): then :func:`_canonical_object` does it."""
    out = _ENCODE_FAST(plain)
    for name, text in texts.items():
        parts = out.split(_SLOT_JSON[name])
        if len(parts) != 2:
            for n in texts:
                del plain[n]
            return _canonical_object(plain, texts)
        out = parts[0] + text + parts[1]
    return out


def _canonical_object(plain: dict[str, Any], texts: dict[str, str]) -> str:
    """``canonical_json({**plain, **parsed texts})`` without parsing or re-serialising ``texts``.

    One encoder call per stretch of ``plain``'s keys between two of ``texts``' keys (in the sorted
    key order), not one per key and value: a handful of calls per event instead of dozens.
    """
    if not texts:
        return _ENCODE(plain)
    pieces: list[str] = []
    run: dict[str, Any] = {}
    for key in sorted(plain.keys() | texts.keys()):
        if key in texts:
            if run:
                pieces.append(_ENCODE(run)[1:-1])
                run = {}
            pieces.append(f"{_ENCODE(key)}:{texts[key]}")
        else:
            run[key] = plain[key]
    if run:
        pieces.append(_ENCODE(run)[1:-1])
    return "{" + ",".join(pieces) + "}"


@dataclass
class Emitter:
    """Stamps, encodes and (with a publisher) publishes the events of one collector chain."""

    topics: Topics
    stamper: ChainStamper
    publisher: Publisher | None = None

    def record(self, event: Event) -> tuple[Event, Record]:
        """The stamped event and its Kafka record."""
        stamped, value = stamp_and_encode(self.stamper, event)
        return stamped, (topic_for(stamped, self.topics), key_for(stamped).encode("utf-8"), value)

    def _record(self, event: Event) -> Record:
        """The Kafka record of ``event`` with the next stamp (no stamped model is built)."""
        value = _stamp_encode(self.stamper, event)
        return topic_for(event, self.topics), key_for(event).encode("utf-8"), value

    def records(self, events: Iterable[Event]) -> list[tuple[Event, Record]]:
        return [self.record(event) for event in events]

    def emit(self, event: Event) -> bool:
        """Stamp, encode and queue one event; False when the publisher refused it (a counted loss)."""
        assert self.publisher is not None, "an Emitter without a publisher only makes records"
        topic, key, value = self._record(event)
        return self.publisher.publish(topic, key, value)

    def emit_many(self, events: Iterable[Event], on_error: Callable[[Event, Exception], object]) -> int:
        """Stamp and encode ``events`` in order and hand all their records to the publisher at once
        (one lock and at most one wake-up of its thread, with a publisher that has ``publish_many``).

        An event that cannot be encoded is passed to ``on_error`` and skipped (it takes no chain
        number: no gap); the others still go. Returns how many records the publisher accepted.
        """
        assert self.publisher is not None, "an Emitter without a publisher only makes records"
        records: list[tuple[str, bytes | None, bytes]] = []
        for event in events:
            try:
                records.append(self._record(event))
            except Exception as exc:  # noqa: BLE001 - one bad event must not cost the others
                on_error(event, exc)
        if not records:
            return 0
        many = getattr(self.publisher, "publish_many", None)
        if many is not None:
            return int(many(records))
        return sum(self.publisher.publish(topic, key, value) for topic, key, value in records)
