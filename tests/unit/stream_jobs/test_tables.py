"""The table specs (stream_jobs/tables.py) against everything derived from them, no services.

One spec per table says which models land in it and how each column is filled. The row builder
(``rows.to_row``), the insert column layout, the fast readers (``columnar``), the bulk path's
``SELECT`` (``bulk``), ``verify``'s row-to-event function and the sink's topic map are derived from
it. These tests check, for every model, that each derived piece agrees with the spec; that a field
added to a spec (and its model and schema) reaches all of them; that a model field no spec stores
is caught; and that a spec column the migrations never create is caught.
"""

from __future__ import annotations

import dataclasses
import io
import json
import uuid
from datetime import UTC, datetime
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_writer

from schemas import BaseEvent, Collector, Evidence, SchemaModel, ToolCall, encode, record_hash
from schemas.codec import MAGIC, MODELS, _registry
from schemas.topics import Topics
from stream_jobs.bulk import BULK_TABLES, build_bulk, bulk_specs
from stream_jobs.clickhouse import load_migrations
from stream_jobs.columnar import _model_kinds, build_reader, fast_readers
from stream_jobs.rows import COLUMNS, JSON_COLUMNS, LIMITS, TIME_COLUMNS, Provenance, millis, row_values, to_row
from stream_jobs.tables import (
    BY_MODEL,
    BY_TABLE,
    RAW_TABLES,
    SPECS,
    TableSpec,
    migration_columns,
    missing_columns,
    table_topics,
)
from stream_jobs.verify import event_from_row

NOW = datetime(2026, 11, 21, 10, 0, 0, 123000, tzinfo=UTC)
PROV = Provenance("t", 3, 42, NOW)
CONV_OF_KIND = {"json": "json", "strs": "strs", "float": "float", "ts": "time"}


def example(model: type[SchemaModel], *, fill_optional: bool, extra: bool = False) -> SchemaModel:
    """A valid record of ``model`` with every field set (``fill_optional``) or only the required ones."""
    values: dict[str, Any] = {}
    kinds = _model_kinds(model)
    for name, field in model.model_fields.items():
        if name == "event_type" or (not fill_optional and not field.is_required()):
            continue
        kind = kinds[name]
        values[name] = {
            "str": f"{name}-é",
            "uuid": str(uuid.UUID(int=7)),
            "lit": min(kind.values) if kind.values else "x",
            "int": 3,
            "float": 1.25,
            "bool": True,
            "strs": [f"{name}-1", f"{name}-2"],
            "ts": "2026-11-21T10:00:01.234Z",
            "json": {"k": ["v", "w"]} if kind.labels else {"k": [1, "v"]},
            "collector": {"id": "c1", "epoch": 2, "seq": 5, "prev_hash": "sha256:00"},
        }[kind.base]
    if "verdict" in values:
        values["verdict"] = "in_scope"
    if extra:
        values["x_unknown"] = {"a": 1}
    return model.model_validate(values)


EXAMPLES = [
    pytest.param(model, fill, extra, id=f"{model.__name__}-{'all' if fill else 'required'}{'-extra' if extra else ''}")
    for model in MODELS.values()
    for fill in (True, False)
    for extra in ((False, True) if issubclass(model, BaseEvent) else (False,))
]


def test_every_stored_model_has_exactly_one_spec_and_every_table_a_topic() -> None:
    assert set(BY_MODEL) == set(MODELS.values())
    assert sum(len(s.models) for s in SPECS) == len(BY_MODEL)
    assert set(table_topics(Topics())) == set(BY_TABLE) == set(COLUMNS)
    assert set(RAW_TABLES) == {s.table for s in SPECS if issubclass(s.models[0], BaseEvent)}


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.table)
def test_every_model_field_has_a_column_with_the_conversion_of_its_type(spec: TableSpec) -> None:
    """A field added to a model but not to its spec fails here (it would be dropped on the way to ClickHouse)."""
    cols = {c.name: c for c in spec.cols}
    for model in spec.models:
        for name, kind in _model_kinds(model).items():
            if name == "collector":
                assert spec.raw_event
                continue
            if name == "event_type" and len(spec.models) == 1:
                continue  # one model: the table says the type
            assert name in cols, f"{model.__name__}.{name} has no column in the {spec.table} spec"
            assert cols[name].conv == CONV_OF_KIND.get(kind.base, "plain"), (spec.table, name, kind)


@pytest.mark.parametrize("spec", SPECS, ids=lambda s: s.table)
def test_the_layout_tables_are_the_specs(spec: TableSpec) -> None:
    assert COLUMNS[spec.table] == spec.columns
    assert TIME_COLUMNS[spec.table] == spec.time_columns
    assert JSON_COLUMNS.get(spec.table, ()) == spec.json_columns
    assert LIMITS.get(spec.table, {}) == spec.limits
    assert len(set(spec.columns)) == len(spec.columns)


@pytest.mark.parametrize(("model", "fill", "extra"), EXAMPLES)
def test_row_builder_reader_bulk_and_verify_agree_with_the_spec(
    model: type[SchemaModel], fill: bool, extra: bool
) -> None:
    spec = BY_MODEL[model]
    record = example(model, fill_optional=fill, extra=extra)
    table, row = to_row(record, PROV)
    assert table == spec.table
    assert tuple(row) == spec.columns
    for column, value in spec.absent(model).items():
        assert row[column] == value
    values = row_values(table, row)

    # the fast reader of the current schema gives the same tuple (extras take the full path)
    message = encode(record)
    reader = fast_readers()[message[:10]]
    assert reader.table == spec.table
    if not extra:
        assert reader.read(message, PROV.topic, PROV.partition, PROV.offset, millis(NOW)) == values

    # the bulk path inserts the spec's columns
    bulk = bulk_specs().get(message[:10])
    assert (bulk is not None) == (spec.table in BULK_TABLES)
    if bulk is not None:
        assert bulk.columns == spec.columns
        assert all(f"`{c}`" in bulk.select for c in spec.field_names)

    # verify rebuilds the very event, so its record hash (the chain link) is the one stored
    if spec.raw_event:
        assert isinstance(record, BaseEvent)
        rebuilt = event_from_row(table, row)
        assert rebuilt == record
        assert record_hash(rebuilt) == row["_record_hash"]
    else:
        with pytest.raises(ValueError, match="not a raw event table"):
            event_from_row(table, row)


# ------------------------------------------------------------------ extending a spec


class ToolCallWithTicket(ToolCall):
    ticket: str | None = None


class EvidenceWithTicket(Evidence):
    ticket: str | None = None


def _with_ticket(model: type[SchemaModel], spec: TableSpec) -> tuple[dict[str, Any], TableSpec]:
    schema = json.loads(json.dumps(_registry().current[model.__mro__[1]].source))  # the base model's
    fields = schema["fields"]
    fields.insert(len(fields) - 1, {"name": "ticket", "type": ["null", "string"], "default": None})
    return schema, dataclasses.replace(spec, models=(model,), fields=(*spec.fields, "ticket"))


def _message(schema: dict[str, Any], record: SchemaModel) -> bytes:
    rec = json.loads(record.model_dump_json())
    for name in ("arguments", "attested", "claimed", "facts"):
        if name in rec and rec[name] is not None:
            rec[name] = json.dumps(rec[name], sort_keys=True, separators=(",", ":"))
    for name in ("event_time", "call_time", "decided_at"):
        if name in rec:
            rec[name] = datetime.fromisoformat(rec[name].replace("Z", "+00:00"))
    rec["extra_json"] = None
    buf = io.BytesIO()
    buf.write(MAGIC + b"\x00" * 8)
    schemaless_writer(buf, parse_schema(schema), rec)
    return buf.getvalue()


def test_a_field_added_to_a_spec_reaches_the_row_builder_the_reader_and_verify() -> None:
    schema, spec = _with_ticket(ToolCallWithTicket, BY_TABLE["tool_calls"])
    record = example(ToolCallWithTicket, fill_optional=True)
    assert isinstance(record, ToolCallWithTicket) and record.ticket == "ticket-é"
    row = spec.to_row(record, PROV.columns())
    assert row["ticket"] == "ticket-é"
    assert spec.columns.index("ticket") == spec.columns.index("tool_digest") + 1
    row["_record_hash"] = record_hash(record)

    table, reader = build_reader(ToolCallWithTicket, schema, spec)
    read = reader(_message(schema, record), PROV.topic, PROV.partition, PROV.offset, millis(NOW))
    assert table == "tool_calls"
    assert read == spec.values(row)

    # verify's rebuilt event carries the field, so it hashes to the stored _record_hash (not "edited")
    assert record_hash(spec.event_from_row(row)) == row["_record_hash"]
    assert missing_columns(migration_columns(_scripts()), [spec]) == ["tool_calls.ticket"]


def test_a_field_added_to_a_bulk_spec_reaches_the_bulk_insert() -> None:
    schema, spec = _with_ticket(EvidenceWithTicket, BY_TABLE["evidence"])
    bulk = build_bulk(EvidenceWithTicket, schema, b"\x00" * 8, spec)
    assert bulk.columns == spec.columns and "ticket" in bulk.columns
    utf8 = bulk.select[bulk.select.index("isValidUTF8(") :]
    assert "`ticket`" in utf8[: utf8.index(")) AND")]  # its text is in the row's one UTF-8 test


# ------------------------------------------------------------------ the spec against the migrations


def _scripts() -> list[str]:
    return [";\n".join(m.statements) + ";" for m in load_migrations()]


def test_every_spec_column_is_created_by_the_migrations() -> None:
    tables = migration_columns(_scripts())
    assert missing_columns(tables) == []
    # the parser reads what the migrations say (spot checks, including columns added later by ALTER)
    assert {"fact_ids", "fact_hashes", "kind", "trigger", "facts"} <= tables["evidence"]
    assert "ENGINE" not in tables["tool_calls"] and "event_id" in tables["tool_calls"]


def test_a_spec_column_no_migration_creates_is_caught() -> None:
    tables = migration_columns(_scripts())
    spec = BY_TABLE["findings"]
    wider = dataclasses.replace(spec, fields=(*spec.fields, "escalation_policy"))
    assert missing_columns(tables, [wider]) == ["findings.escalation_policy"]
    renamed = dataclasses.replace(spec, table="findings_v2")
    assert missing_columns(tables, [renamed]) == ["findings_v2 (no such table)"]
    dropped = [*_scripts(), "ALTER TABLE {db}.findings DROP COLUMN IF EXISTS details;"]
    assert missing_columns(migration_columns(dropped), [spec]) == ["findings.details"]


def test_collector_columns_come_from_the_stamp() -> None:
    record = example(ToolCall, fill_optional=True)
    assert isinstance(record, ToolCall) and isinstance(record.collector, Collector)
    _table, row = to_row(record, PROV)
    assert (row["collector_id"], row["collector_epoch"], row["collector_seq"]) == ("c1", 2, 5)
    bare = record.model_copy(update={"collector": None})
    _table, row = to_row(bare, PROV)
    assert (row["collector_id"], row["collector_prev_hash"]) == ("", None)
    assert event_from_row("tool_calls", row).collector is None
