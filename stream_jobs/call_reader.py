"""Stage 1's tool calls without a second validation: the sink's fast reader, then a trusted model.

``schemas.decode`` of a call costs about 27 µs: fastavro (9), the JSON-valued fields parsed with
``json`` (8) and pydantic validation of what the Avro schema already typed (9). The sink's
generated reader (:mod:`stream_jobs.columnar`) does the same checks on the bytes in about 12 µs
and hands back the ``tool_calls`` row, with the JSON fields as canonical text it has verified.
:func:`read_call` builds the :class:`~schemas.ToolCall` from that row with
:func:`detections.findings.trusted_model` (no validation), parsing the JSON fields with orjson.

**Contract**: it returns a model equal to ``decode(value)`` -- every field, the fields set, no
extras -- or it returns ``decode(value)`` itself. The fast reader never accepts a message the full
path refuses (its own contract: anything it is not sure of raises); a message it refuses, one
with extra fields, one without a collector stamp (the row cannot tell a missing stamp from an
empty one), a schema it has no reader for: all go to ``decode``, which accepts them or raises the
:class:`~schemas.CodecError` that dead-letters them, as before. So stage 1 sees the same calls
and refuses the same messages with the same reasons. ``tests/unit/stream_jobs/test_call_reader.py``
compares the two paths.
"""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, Final

import orjson

from detections.findings import trusted_model
from schemas import Collector, SchemaModel, ToolCall, decode
from schemas.codec import HEADER_LEN
from stream_jobs.columnar import fast_readers
from stream_jobs.rows import COLUMNS

__all__ = ["CallReader", "call_reader"]

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)
_CALL_FIELDS: Final = tuple(ToolCall.model_fields)
_COLLECTOR_FIELDS: Final = frozenset(Collector.model_fields)


class CallReader:
    """``reader(value)``: the message decoded as :func:`schemas.decode` decodes it (module docstring);
    ``fast`` and ``full`` count the messages each path decoded."""

    def __init__(self, read: Callable[[bytes], SchemaModel], counts: list[int]) -> None:
        self._read = read
        self._counts = counts  # [fast, full]

    def __call__(self, value: bytes) -> SchemaModel:
        return self._read(value)

    @property
    def fast(self) -> int:
        return self._counts[0]

    @property
    def full(self) -> int:
        return self._counts[1]


def call_reader() -> CallReader:
    """A :class:`CallReader` over the fast readers of every registered ``ToolCall`` schema."""
    counts = [0, 0]
    col = {name: i for i, name in enumerate(COLUMNS["tool_calls"])}
    readers = {
        header: fr.read for header, fr in fast_readers().items() if fr.table == "tool_calls"
    }  # header = marker + fingerprint
    i_event_id, i_time, i_tenant = col["event_id"], col["event_time"], col["tenant"]
    i_call, i_session, i_server, i_tool = col["call_id"], col["session_id"], col["server"], col["tool"]
    i_args, i_res, i_transport = col["arguments"], col["resources"], col["transport"]
    i_attested, i_claimed, i_digest = col["attested"], col["claimed"], col["tool_digest"]
    i_cid, i_epoch, i_seq, i_prev = (
        col["collector_id"],
        col["collector_epoch"],
        col["collector_seq"],
        col["collector_prev_hash"],
    )
    loads, epoch, ms = orjson.loads, _EPOCH, _MS
    assert set(_CALL_FIELDS) == {
        "event_type",
        "event_id",
        "event_time",
        "tenant",
        "collector",
        "call_id",
        "session_id",
        "server",
        "tool",
        "arguments",
        "resources",
        "transport",
        "attested",
        "claimed",
        "tool_digest",
    }, "ToolCall changed: teach stream_jobs/call_reader.py its fields"

    def full(value: bytes) -> SchemaModel:
        counts[1] += 1
        return decode(value)

    def read(value: bytes) -> SchemaModel:
        reader = readers.get(value[:HEADER_LEN]) if type(value) is bytes else None
        if reader is None:
            return full(value)
        try:
            row: Any = reader(value, "", 0, 0, 0)
            if not row[i_cid]:
                return full(value)  # no collector stamp, or an empty one: the row cannot tell which
            attested = row[i_attested]
            collector = trusted_model(
                Collector,
                {"id": row[i_cid], "epoch": row[i_epoch], "seq": row[i_seq], "prev_hash": row[i_prev]},
                {},
                set(_COLLECTOR_FIELDS),
            )
            values = {
                "event_type": "tool_call",
                "event_id": row[i_event_id],
                "event_time": epoch + row[i_time] * ms,
                "tenant": row[i_tenant],
                "collector": collector,
                "call_id": row[i_call],
                "session_id": row[i_session],
                "server": row[i_server],
                "tool": row[i_tool],
                "arguments": loads(row[i_args]),
                "resources": row[i_res],
                "transport": row[i_transport],
                "attested": None if attested is None else loads(attested),
                "claimed": loads(row[i_claimed]),
                "tool_digest": row[i_digest],
            }
        except Exception:  # noqa: BLE001 - anything the fast path is not sure of: the full path decides
            return full(value)
        counts[0] += 1
        return trusted_model(ToolCall, values, {}, set(_CALL_FIELDS))

    return CallReader(read, counts)
