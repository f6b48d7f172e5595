"""Mapping of decoded events to ClickHouse rows (one table per kind of record).

Every layout here is derived from the table specs (:mod:`stream_jobs.tables`). ``to_row`` maps one
decoded model to a dict row; the sink's columnar fast path (:mod:`stream_jobs.columnar`) produces
the same values straight from the Avro bytes, as tuples in the order of :data:`COLUMNS`, with
DateTime64 columns as integer milliseconds (:func:`row_values` turns a dict row into such a
tuple). :func:`check_row` holds the checks the sink adds to the models' own validation: values a
column cannot store, and values outside a closed set (verdict names).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from schemas import record_hash
from stream_jobs.tables import BY_MODEL, BY_TABLE, SPECS, VERDICT_NAMES, table_topics

__all__ = [
    "ALLOWED",
    "COLUMNS",
    "JSON_COLUMNS",
    "LIMITS",
    "TIME_COLUMNS",
    "VERDICT_NAMES",
    "Provenance",
    "RowError",
    "check_row",
    "millis",
    "row_values",
    "table_topics",
    "to_row",
]


@dataclass(frozen=True)
class Provenance:
    topic: str
    partition: int
    offset: int
    ingested_at: datetime

    def columns(self) -> dict[str, Any]:
        return {
            "_topic": self.topic,
            "_partition": self.partition,
            "_offset": self.offset,
            "_ingested_at": self.ingested_at,
        }


def to_row(record: Any, prov: Provenance) -> tuple[str, dict[str, Any]]:
    """The table and the row for one decoded record (its table's :class:`~stream_jobs.tables.TableSpec`)."""
    spec = BY_MODEL.get(type(record))
    if spec is None:
        raise TypeError(f"no table for {type(record).__name__}")
    row = spec.to_row(record, prov.columns())
    if spec.raw_event:
        row["_record_hash"] = record_hash(record)
    return spec.table, row


# ------------------------------------------------------------------ column layout

COLUMNS: Final[dict[str, tuple[str, ...]]] = {s.table: s.columns for s in SPECS}
"""Every table's insert columns, in the order of ``to_row``'s dict and of the fast path's tuples."""

TIME_COLUMNS: Final[dict[str, frozenset[str]]] = {s.table: s.time_columns for s in SPECS}
"""DateTime64(3) columns: in row tuples they hold integer milliseconds since the epoch (UTC)."""

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)


def millis(value: datetime) -> int:
    """Milliseconds since the epoch, rounded down: the DateTime64(3) tick ClickHouse stores for ``value``."""
    return (value - _EPOCH) // _MS


def row_values(table: str, row: dict[str, Any]) -> tuple[Any, ...]:
    """A ``to_row`` dict as the tuple the columnar batch holds (DateTime64 columns as milliseconds)."""
    return BY_TABLE[table].values(row)


# ------------------------------------------------------------------ checks the sink adds

LIMITS: Final[dict[str, dict[str, int]]] = {s.table: s.limits for s in SPECS if s.limits}
"""Upper bounds of UInt32 columns whose model allows more: such a row would fail the whole insert."""

ALLOWED: Final[dict[str, dict[str, frozenset[str]]]] = {s.table: s.allowed for s in SPECS if s.allowed}
"""Columns with a closed set of values the models do not enforce (evidence verdicts)."""

JSON_COLUMNS: Final[dict[str, tuple[str, ...]]] = {s.table: s.json_columns for s in SPECS if s.json_columns}
"""Columns holding canonical JSON text. Python's json reads an escaped lone surrogate (``"\\ud800"``)
into a str that is not valid UTF-8; ClickHouse cannot be sent such a value (the insert would fail
on every retry), so check_row refuses it."""


class RowError(ValueError):
    """A decoded record the sink will not store (it becomes a dead letter)."""


def check_row(table: str, row: dict[str, Any]) -> None:
    """Raise RowError if ``row`` has a value its column cannot hold or a verdict outside the taxonomy."""
    for column, limit in LIMITS.get(table, {}).items():
        if row[column] > limit:
            raise RowError(f"{table}.{column} = {row[column]} does not fit the column (at most {limit})")
    for column, values in ALLOWED.get(table, {}).items():
        if row[column] not in values:
            raise RowError(f"{table}.{column} {str(row[column])[:60]!r} is not a known {column}")
    for column in JSON_COLUMNS.get(table, ()):
        value = row[column]
        if value is not None:
            try:
                value.encode()
            except UnicodeEncodeError:
                raise RowError(f"{table}.{column} holds a lone surrogate (not valid UTF-8)") from None
