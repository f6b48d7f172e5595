"""One declarative spec per ClickHouse table: which models land in it and how each column is filled.

Everything the sink and ``verify`` need about a table is derived from its :class:`TableSpec`:

* the insert column order (:data:`stream_jobs.rows.COLUMNS`), the DateTime64 columns, the JSON
  columns, the sink's column checks (limits, allowed values) -- :mod:`stream_jobs.rows`;
* the dict row of a decoded model (``rows.to_row``) and its inverse, the event a raw row was made
  from (:meth:`TableSpec.event_from_row`, used by ``verify``);
* the model -> table map, the values of columns a model has no field for, and the topic each table's
  records must come from (the columnar reader and the bulk path generate their code from these);
* the columns the ClickHouse table must have (:func:`missing_columns`, checked against the
  migrations by a unit test and against the live table when the sink starts).

**Adding a field** to a model that is already stored: add its column to the spec (with its
:class:`Col` conversion) and a migration adding the column. **Adding an event type**: a model, its
Avro schema, a migration creating its table, a :class:`TableSpec` in :data:`SPECS` (and its topic in
``schemas.topics.Topics``). Raw events (``BaseEvent`` models) get the collector stamp columns,
``extra``, the Kafka provenance and ``_record_hash`` appended by the spec itself.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Literal

from detections.engine import VERDICTS
from schemas import (
    ApprovalDecided,
    BaseEvent,
    DeadLetter,
    Evidence,
    Finding,
    GrantIssued,
    GrantRevoked,
    PageAttempt,
    PolicyPublished,
    SchemaModel,
    SessionBound,
    SessionEnded,
    ToolCall,
    ToolResult,
    canonical_json,
    parse_event,
)
from schemas.topics import Topics

Conv = Literal["plain", "json", "strs", "float", "time"]
"""How a model value becomes a column value: as is; canonical JSON text (None stays None); a list
of strings; a float; a DateTime64(3) (a datetime in dict rows, integer milliseconds in row tuples)."""

PROVENANCE: Final = ("_topic", "_partition", "_offset", "_ingested_at")
COLLECTOR: Final = ("collector_id", "collector_epoch", "collector_seq", "collector_prev_hash")
UINT32_MAX: Final = 2**32 - 1
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MS: Final = timedelta(milliseconds=1)


@dataclass(frozen=True)
class Col:
    """One column filled from the model field of the same name."""

    name: str
    conv: Conv = "plain"
    absent: Any = None
    """The value for a record whose model has no such field (one table, several models)."""
    limit: int | None = None
    """Upper bound of the column (a UInt32 column whose model allows more): a larger value is a dead letter."""
    allowed: frozenset[str] | None = None
    """The only values the column may hold (evidence verdicts): any other is a dead letter."""


def json_(name: str, absent: Any = None) -> Col:
    return Col(name, "json", absent)


def strs(name: str) -> Col:
    return Col(name, "strs", [])


def time(name: str) -> Col:
    return Col(name, "time")


def num(name: str) -> Col:
    return Col(name, "float")


@dataclass(frozen=True)
class TableSpec:
    """A ClickHouse table and the models stored in it."""

    table: str
    topic: str
    """The ``schemas.topics.Topics`` attribute naming the only topic this table's records come from."""
    models: tuple[type[SchemaModel], ...]
    fields: tuple[Col | str, ...]
    """The model-field columns in insert order (a bare string is a plain ``Col``)."""
    provenance: tuple[str, ...] = PROVENANCE
    """The Kafka provenance columns the table has (``pages`` keeps only ``_ingested_at``)."""
    fact: bool = False
    """Identity, consent, policy or approval facts: ``verify`` reads all of them whatever ``--since``
    says (older facts decide newer calls), re-judges calls on them, and resolves evidence fact
    references against them."""
    cols: tuple[Col, ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "cols", tuple(c if isinstance(c, Col) else Col(c) for c in self.fields))
        raw = [issubclass(m, BaseEvent) for m in self.models]
        if any(raw) and not all(raw):
            raise ValueError(f"{self.table}: raw events and other records in one table")
        if len(self.models) > 1 and "event_type" not in self.field_names:
            raise ValueError(f"{self.table}: several models need an event_type column to tell them apart")

    # -- the layout

    @property
    def raw_event(self) -> bool:
        """Raw events carry the collector stamp, unknown fields (``extra``) and ``_record_hash``."""
        return issubclass(self.models[0], BaseEvent)

    @property
    def field_names(self) -> tuple[str, ...]:
        return tuple(c.name for c in self.cols)

    @property
    def columns(self) -> tuple[str, ...]:
        """Every insert column, in the order of ``to_row``'s dict and of the fast path's tuples."""
        if self.raw_event:
            return (*self.field_names, *COLLECTOR, "extra", *self.provenance, "_record_hash")
        return (*self.field_names, *self.provenance)

    @property
    def time_columns(self) -> frozenset[str]:
        times = {c.name for c in self.cols if c.conv == "time"}
        return frozenset(times | ({"_ingested_at"} & set(self.provenance)))

    @property
    def json_columns(self) -> tuple[str, ...]:
        names = tuple(c.name for c in self.cols if c.conv == "json")
        return (*names, "extra") if self.raw_event else names

    @property
    def limits(self) -> dict[str, int]:
        return {c.name: c.limit for c in self.cols if c.limit is not None}

    @property
    def allowed(self) -> dict[str, frozenset[str]]:
        return {c.name: c.allowed for c in self.cols if c.allowed is not None}

    def absent(self, model: type[SchemaModel]) -> dict[str, Any]:
        """The columns ``model`` has no field for, with the value stored for them."""
        return {c.name: c.absent for c in self.cols if c.name not in model.model_fields}

    # -- rows

    def to_row(self, record: SchemaModel, prov: Mapping[str, Any]) -> dict[str, Any]:
        """The dict row of ``record`` (``prov``: the provenance columns; ``_record_hash`` is the caller's)."""
        fields = type(record).model_fields
        row: dict[str, Any] = {}
        for c in self.cols:
            if c.name not in fields:
                row[c.name] = list(c.absent) if isinstance(c.absent, list) else c.absent
                continue
            value = getattr(record, c.name)
            if value is not None:
                if c.conv == "json":
                    value = canonical_json(value)
                elif c.conv == "strs":
                    value = list(value)
                elif c.conv == "float":
                    value = float(value)
            row[c.name] = value
        if self.raw_event:
            stamp = getattr(record, "collector", None)
            if stamp is None:
                row.update(collector_id="", collector_epoch=0, collector_seq=0, collector_prev_hash=None)
            else:
                row.update(
                    collector_id=stamp.id,
                    collector_epoch=stamp.epoch,
                    collector_seq=stamp.seq,
                    collector_prev_hash=stamp.prev_hash,
                )
            extra = record.model_extra
            row["extra"] = canonical_json(extra) if extra else "{}"
        for name in self.provenance:
            row[name] = prov[name]
        return row

    def values(self, row: Mapping[str, Any]) -> tuple[Any, ...]:
        """A :meth:`to_row` dict (with its ``_record_hash``) as the tuple the columnar batch holds
        (DateTime64 columns as integer milliseconds)."""
        times = self.time_columns
        return tuple(
            (None if row[c] is None else (row[c] - _EPOCH) // _MS) if c in times else row[c] for c in self.columns
        )

    def model_of_row(self, row: Mapping[str, Any]) -> type[SchemaModel]:
        if len(self.models) == 1:
            return self.models[0]
        for model in self.models:
            if model.model_fields["event_type"].default == row["event_type"]:
                return model
        raise ValueError(f"{self.table}: unknown event_type {row['event_type']!r}")

    def event_from_row(self, row: Mapping[str, Any]) -> BaseEvent:
        """The canonical event a raw row was made from (the inverse of :meth:`to_row`)."""
        if not self.raw_event:
            raise ValueError(f"not a raw event table: {self.table}")
        model = self.model_of_row(row)
        d: dict[str, Any] = {"event_type": model.model_fields["event_type"].default}
        for c in self.cols:
            if c.name not in model.model_fields:
                continue
            value = row[c.name]
            if value is not None:
                if c.conv == "json":
                    value = json.loads(value)
                elif c.conv == "strs":
                    value = list(value)
                elif c.conv == "float":
                    value = float(value)
            d[c.name] = value
        if row.get("collector_id"):
            d["collector"] = {
                "id": row["collector_id"],
                "epoch": int(row["collector_epoch"]),
                "seq": int(row["collector_seq"]),
                "prev_hash": row["collector_prev_hash"],
            }
        extra_text = row.get("extra")
        extra = (json.loads(extra_text) if extra_text is not None else None) or {}
        return parse_event({**extra, **d})


# ------------------------------------------------------------------ the tables

VERDICT_NAMES: Final[frozenset[str]] = frozenset(VERDICTS)

_EVENT: Final = ("event_id", time("event_time"), "tenant")

SPECS: Final[tuple[TableSpec, ...]] = (
    TableSpec(
        "tool_calls",
        "tool_calls",
        (ToolCall,),
        (
            *_EVENT, "call_id", "session_id", "server", "tool", json_("arguments"), strs("resources"), "transport",
            json_("attested"), json_("claimed"), "tool_digest",
        ),
    ),
    TableSpec(
        "tool_results",
        "tool_results",
        (ToolResult,),
        (*_EVENT, "call_id", "session_id", "status", num("duration_ms"), "error", "result_digest"),
    ),
    TableSpec(
        "identity_events",
        "sessions",
        (SessionBound, SessionEnded),
        (
            "event_id", "event_type", time("event_time"), "tenant", "session_id", "principal", "agent_id",
            time("valid_from"), time("valid_until"), json_("auth", absent="{}"),
        ),
        fact=True,
    ),
    TableSpec(
        "consent_events",
        "grants",
        (GrantIssued, GrantRevoked),
        (
            "event_id", "event_type", time("event_time"), "tenant", "grant_id", "principal", "agent_id",
            strs("tools"), strs("resources"), strs("scopes"), time("not_before"), time("expires_at"), "granted_by",
            "purpose", "parent_grant_id", "revoked_by", "reason", strs("policies"), strs("approval_tools"),
        ),
        fact=True,
    ),
    TableSpec(
        "policy_events",
        "policies",
        (PolicyPublished,),
        ("event_id", "event_type", time("event_time"), "tenant", "policy_id", "version", "cedar", json_("labels"),
         "published_by"),
        fact=True,
    ),
    TableSpec(
        "approval_events",
        "approvals",
        (ApprovalDecided,),
        (
            "event_id", "event_type", time("event_time"), "tenant", "approval_id", "principal", "agent_id", "tool",
            "arguments_digest", "decision", "approver", time("expires_at"), "reason",
        ),
        fact=True,
    ),
    TableSpec(
        "evidence",
        "evidence",
        (Evidence,),
        (
            "evidence_id", "call_id", "tenant", "session_id", "principal", "agent_id", "server", "tool",
            time("call_time"), Col("verdict", allowed=VERDICT_NAMES), "matched_grant_id", strs("reasons"),
            Col("version", limit=UINT32_MAX), "final", "late", time("decided_at"), json_("facts"),
            strs("fact_ids"), strs("fact_hashes"), Col("kind", absent=""), Col("trigger", absent=""),
            "approval_id", "approver", strs("policy_versions"), "policy_decision", strs("policy_reasons"),
            strs("policy_errors"), "history_complete",
        ),
    ),
    TableSpec(
        "findings",
        "findings",
        (Finding,),
        (
            "finding_id", "dedup_key", "rule_id", "rule_version", "severity", "title", "summary", "tenant",
            "principal", "agent_id", "call_id", strs("call_ids"), "session_id", "grant_id", "forensic_query",
            time("first_call_time"), time("last_call_time"), json_("details"), time("detected_at"),
        ),
    ),
    TableSpec(
        "pages",
        "pages",
        (PageAttempt,),
        (
            "attempt_id", "page_key", "dedup_key", "finding_id", "rule_id", "severity", "tenant", "channel", "route",
            "attempt", "outcome", "http_status", "error", "findings_grouped", time("attempted_at"),
            num("latency_ms"),
        ),
        provenance=("_ingested_at",),
    ),
    TableSpec(
        "dead_letters",
        "dead_letter",
        (DeadLetter,),
        (
            "dead_letter_id", "source_topic", Col("source_partition", limit=UINT32_MAX), "source_offset", "key",
            "reason", "stage", "payload_b64", time("failed_at"),
        ),
    ),
)  # fmt: skip
"""Every table the sink writes, in the order of the sink's topics."""

BY_TABLE: Final[dict[str, TableSpec]] = {s.table: s for s in SPECS}
BY_MODEL: Final[dict[type[SchemaModel], TableSpec]] = {m: s for s in SPECS for m in s.models}
RAW_TABLES: Final[tuple[str, ...]] = tuple(s.table for s in SPECS if s.raw_event)
FACT_TABLES: Final[tuple[str, ...]] = tuple(s.table for s in SPECS if s.fact)


def table_topics(topics: Topics, specs: Iterable[TableSpec] = SPECS) -> dict[str, str]:
    """Each table's topic: tool_calls only from the tool-calls topic, consent_events from the grants topic..."""
    return {s.table: getattr(topics, s.topic) for s in specs}


# ------------------------------------------------------------------ the tables ClickHouse has

_CREATE: Final = re.compile(
    r"CREATE\s+TABLE\s+(?:IF\s+NOT\s+EXISTS\s+)?(?:\{db\}\.)?(\w+)\s*\((.*?)\)\s*ENGINE", re.S | re.I
)
_ADD: Final = re.compile(r"ALTER\s+TABLE\s+(?:\{db\}\.)?(\w+)\s+ADD\s+COLUMN\s+(?:IF\s+NOT\s+EXISTS\s+)?(\w+)", re.I)
_DROP: Final = re.compile(r"ALTER\s+TABLE\s+(?:\{db\}\.)?(\w+)\s+DROP\s+COLUMN\s+(?:IF\s+EXISTS\s+)?(\w+)", re.I)
_COLUMN: Final = re.compile(r"^\s*`?(\w+)`?\s+\w", re.M)


def migration_columns(scripts: Iterable[str]) -> dict[str, set[str]]:
    """The columns of every table the migration scripts (in order) create, add to and drop from."""
    out: dict[str, set[str]] = {}
    for sql in scripts:
        sql = re.sub(r"--[^\n]*", "", sql)
        events: list[tuple[int, str, str, str]] = []
        for m in _CREATE.finditer(sql):
            for c in _COLUMN.finditer(m.group(2)):
                if c.group(1).upper() not in ("INDEX", "PROJECTION", "CONSTRAINT"):
                    events.append((m.start(), "add", m.group(1), c.group(1)))
        events += [(m.start(), "add", m.group(1), m.group(2)) for m in _ADD.finditer(sql)]
        events += [(m.start(), "drop", m.group(1), m.group(2)) for m in _DROP.finditer(sql)]
        for _pos, op, table, column in sorted(events):
            columns = out.setdefault(table, set())
            if op == "add":
                columns.add(column)
            else:
                columns.discard(column)
    return out


def missing_columns(existing: Mapping[str, Iterable[str]], specs: Iterable[TableSpec] = SPECS) -> list[str]:
    """``table.column`` of every spec column the tables (``existing``: table -> its columns) lack."""
    out = []
    for spec in specs:
        have = set(existing.get(spec.table, ()))
        if not have:
            out.append(f"{spec.table} (no such table)")
            continue
        out += [f"{spec.table}.{c}" for c in spec.columns if c not in have]
    return out
