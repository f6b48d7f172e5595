"""The sink's columnar fast readers against the full path (decode + to_row + check_row), no services.

The contract (stream_jobs/columnar.py): a fast reader returns exactly the row tuple the full
path stores for a message, or raises and leaves the message to the full path. These tests
check both halves: identical rows whenever the reader accepts (generated records of every type,
hand-made edge cases, randomly corrupted messages), and that it does accept the records a
producer normally writes, so the fast path is not vacuous.
"""

from __future__ import annotations

import io
import json
import random
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from fastavro import schemaless_writer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import Field

from detections.engine import VERDICTS
from schemas import (
    Collector,
    DeadLetter,
    Evidence,
    PolicyPublished,
    SchemaModel,
    ToolCall,
    ToolResult,
    decode,
    encode,
)
from schemas.codec import MAGIC, MODELS, _registry
from stream_jobs.columnar import TABLE_OF, Reject, Unsupported, build_reader, fast_readers
from stream_jobs.rows import COLUMNS, Provenance, check_row, millis, row_values, to_row

NOW = datetime(2026, 11, 21, 10, 0, 0, 123456, tzinfo=UTC)
PROV = Provenance("audit.evidence", 3, 42, NOW)
READERS = fast_readers()


def full_path(message: bytes) -> tuple[str, tuple[Any, ...]] | None:
    """What the sink's full path stores for ``message`` (None: it becomes a dead letter)."""
    try:
        record = decode(message)
        table, row = to_row(record, PROV)
        check_row(table, row)
    except Exception:
        return None
    return table, row_values(table, row)


def fast_path(message: bytes) -> tuple[str, tuple[Any, ...]] | None:
    """What the fast reader returns (None: it declines, the full path decides)."""
    reader = READERS.get(message[:10])
    if reader is None:
        return None
    try:
        return reader.table, reader.read(message, PROV.topic, PROV.partition, PROV.offset, millis(NOW))
    except Exception:
        return None


def assert_same(message: bytes, *, accepted: bool | None = None) -> None:
    fast = fast_path(message)
    if accepted is not None:
        assert (fast is not None) == accepted, (fast, full_path(message))
    if fast is None:
        return
    full = full_path(message)
    assert full is not None, "the fast path accepted a message the full path rejects"
    assert fast[0] == full[0]
    for column, a, b in zip(COLUMNS[fast[0]], fast[1], full[1], strict=True):
        assert type(a) is type(b) and a == b, (column, a, b)


def raw_message(model: type[SchemaModel], record: dict[str, Any]) -> bytes:
    """An Avro message of ``model``'s current schema with exactly these field values (no model checks)."""
    entry = _registry().current[model]
    buf = io.BytesIO()
    buf.write(MAGIC + entry.fingerprint)
    schemaless_writer(buf, entry.schema, record)
    return buf.getvalue()


# ------------------------------------------------------------------ generated records

LONG = st.integers(0, 2**63 - 1)
TIMESTAMP = st.datetimes(min_value=datetime(1, 1, 2), max_value=datetime(9999, 12, 30), timezones=st.just(UTC))
TEXT = st.text() | st.sampled_from(["", "é", "日本語", "😀", "\u2028", "a\x00b", '"\\', "\x7f", "\x1f"])
JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False, allow_infinity=False) | TEXT,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4),
    max_leaves=12,
)
OBJECT = st.dictionaries(TEXT, JSON, max_size=4)
STRINGS = st.lists(TEXT, max_size=4)

FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "event_id": st.uuids().map(str) | st.uuids().map(lambda u: str(u).upper()),
    "transport": st.sampled_from(["stdio", "http", "sdk"]),
    "status": st.sampled_from(["ok", "error", "timeout"]),
    "duration_ms": st.floats(min_value=0, allow_nan=False, allow_infinity=False),
    "epoch": LONG,
    "seq": LONG,
    "source_partition": st.integers(0, 2**32 - 1) | LONG,
    "source_offset": LONG,
    "version": st.integers(1, 2**32 - 1) | st.integers(1, 2**63 - 1),
    "verdict": st.sampled_from(VERDICTS) | TEXT,
    "final": st.booleans(),
    "late": st.booleans(),
    "history_complete": st.booleans(),
    "rule_version": st.integers(1, 2**31 - 1),
    "severity": st.sampled_from(["info", "low", "medium", "high", "critical"]),
    **dict.fromkeys(["arguments", "attested", "claimed", "auth", "facts", "details"], OBJECT),
    **dict.fromkeys(["resources", "tools", "scopes", "reasons", "call_ids", "fact_ids", "fact_hashes"], STRINGS),
    **dict.fromkeys(["policies", "approval_tools", "policy_versions", "policy_reasons", "policy_errors"], STRINGS),
    **dict.fromkeys(
        [
            "event_time",
            "valid_from",
            "valid_until",
            "not_before",
            "expires_at",
            "call_time",
            "decided_at",
            "failed_at",
            "first_call_time",
            "last_call_time",
            "detected_at",
            "attempted_at",
        ],
        TIMESTAMP,
    ),
    "channel": st.sampled_from(["pagerduty", "slack", "webhook"]),
    "outcome": st.sampled_from(["delivered", "retry", "failed", "suppressed", "rate_limited"]),
    "attempt": st.integers(0, 2**32 - 1),
    "findings_grouped": st.integers(0, 2**32 - 1),
    "http_status": st.integers(0, 2**16 - 1),
    "latency_ms": st.floats(min_value=0, allow_nan=False, allow_infinity=False),
    "labels": st.dictionaries(TEXT, STRINGS, max_size=3),
    "decision": st.sampled_from(["approve", "deny"]),
}
MODEL_FIELDS: dict[tuple[str, str], st.SearchStrategy[Any]] = {
    ("PolicyPublished", "version"): TEXT,  # a commit id or content hash, not a verdict version
}


def record_dicts(model: type[SchemaModel], extras: bool) -> st.SearchStrategy[dict[str, Any]]:
    required: dict[str, st.SearchStrategy[Any]] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for name, field in model.model_fields.items():
        if name == "event_type":
            continue
        base = collectors if name == "collector" else MODEL_FIELDS.get((model.__name__, name), FIELDS.get(name, TEXT))
        if field.is_required():
            required[name] = base
        else:
            optional[name] = (st.none() | base) if field.default is None else base
    extra = st.dictionaries(TEXT.filter(lambda k: k not in model.model_fields), JSON, min_size=1, max_size=2)
    return st.builds(
        lambda fields, more: {**more, **fields},
        st.fixed_dictionaries(required, optional=optional),
        extra if extras else st.just({}),
    )


collectors = st.deferred(lambda: st.one_of(record_dicts(Collector, False), record_dicts(Collector, True)))
# The sink stores the models it has a table for (all of them, since policy_events and approval_events).
STORED_MODELS = [m for m in MODELS.values() if m in TABLE_OF]
records = st.sampled_from(STORED_MODELS).flatmap(
    lambda model: st.one_of(record_dicts(model, False), record_dicts(model, True)).map(model.model_validate)
)


def producer_normal(record: SchemaModel) -> bool:
    """What a producer normally writes: the fast reader must take these (and give the same row)."""
    import orjson

    from schemas.codec import JSON_FIELDS
    from schemas.events import canonical_json

    if record.model_extra:
        return False
    collector = getattr(record, "collector", None)
    if collector is not None and collector.model_extra:
        return False
    for name in JSON_FIELDS & set(type(record).model_fields):
        value = getattr(record, name)
        if value is not None:
            text = canonical_json(value)
            if orjson.dumps(orjson.loads(text), option=orjson.OPT_SORT_KEYS) != text.encode():
                return False  # a float Python and orjson spell differently: full path, by design
    if isinstance(record, Evidence) and (record.version > 2**32 - 1 or record.verdict not in VERDICTS):
        return False
    return not (isinstance(record, DeadLetter) and record.source_partition > 2**32 - 1)


@settings(max_examples=600, suppress_health_check=[HealthCheck.too_slow])
@given(records)
def test_fast_reader_gives_the_full_paths_row_for_generated_records(record: SchemaModel) -> None:
    message = encode(record)
    assert_same(message, accepted=producer_normal(record))


def test_every_current_schema_has_a_fast_reader() -> None:
    assert {reader.table for reader in READERS.values()} == set(COLUMNS)
    assert {MAGIC + _registry().current[model].fingerprint for model in STORED_MODELS} <= set(READERS)


# ------------------------------------------------------------------ edge cases by hand

T = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)


def evidence(**overrides: Any) -> Evidence:
    fields: dict[str, Any] = {
        "evidence_id": "c-1#1",
        "call_id": "c-1",
        "tenant": "acme",
        "session_id": "s-1",
        "server": "fs",
        "tool": "read_file",
        "call_time": T,
        "verdict": "in_scope",
        "reasons": ["grant g-1 covers fs/read_file"],
        "version": 1,
        "final": False,
        "late": False,
        "decided_at": T,
        "facts": {"grants": [{"grant_id": "g-1", "covers": True}], "as_of": "2026-11-21T10:00:00.000Z"},
    }
    fields.update(overrides)
    return Evidence(**fields)


def tool_call(**overrides: Any) -> ToolCall:
    fields: dict[str, Any] = {
        "event_id": str(uuid.uuid4()),
        "event_time": T,
        "tenant": "acme",
        "call_id": "c-1",
        "session_id": "s-1",
        "server": "fs",
        "tool": "read_file",
        "arguments": {"path": "/data/ä.txt"},
        "resources": ["file:/data/ä.txt"],
        "transport": "stdio",
    }
    fields.update(overrides)
    return ToolCall(**fields)


BIG_FACTS = {f"k{i:05d}": {"grant_id": str(uuid.UUID(int=i)), "n": i, "ok": i % 2 == 0} for i in range(3000)}

ACCEPTED = {
    "evidence, unicode everywhere": evidence(tenant="äcme", principal="渡辺", reasons=["😀", "\u2028", "a\x00b"]),
    "evidence, empty optionals and lists": evidence(principal=None, agent_id=None, matched_grant_id=None, reasons=[]),
    "evidence, big facts (about 200 KB)": evidence(facts=BIG_FACTS),
    "evidence, empty facts": evidence(facts={}),
    "evidence, version at the UInt32 limit": evidence(version=2**32 - 1),
    "evidence, time limits": evidence(
        call_time=datetime(1, 1, 1, tzinfo=UTC), decided_at=datetime.max.replace(tzinfo=UTC)
    ),
    "evidence, before 1970": evidence(call_time=datetime(1969, 12, 31, 23, 59, 59, 999000, tzinfo=UTC)),
    "tool call, nested collector stamp": tool_call(
        collector=Collector(id="col-ü", epoch=2**63 - 1, seq=0, prev_hash="sha256:" + "ab" * 32)
    ),
    "tool call, first record of a chain": tool_call(collector=Collector(id="c", epoch=0, seq=0, prev_hash=None)),
    "tool call, all optionals empty": tool_call(attested=None, claimed={}, tool_digest=None, resources=[]),
    "tool call, JSON with escapes": tool_call(arguments={"q": 'say "hi"\n\t\\', "ctl": "\x01\x1f", "é": [None, True]}),
    "tool call, big integers in JSON": tool_call(arguments={"n": 2**64 - 1, "m": -(2**63)}),
    "tool call, floats orjson and Python spell alike": tool_call(arguments={"a": 1e16, "b": 0.5, "c": -2.5e-3}),
    "policy, labels with unicode patterns": PolicyPublished(
        event_id=str(uuid.uuid4()),
        event_time=T,
        tenant="acme",
        policy_id="no-restricted",
        version="3f2a",
        cedar='forbid(principal, action, resource) when { context.labels.contains("restricted") };',
        labels={"restricted": ["db:prod/*", "file:/données/*"], "public": []},
        published_by="ci",
    ),
    "tool result, negative zero duration": ToolResult(
        event_id=str(uuid.uuid4()),
        event_time=T,
        tenant="acme",
        call_id="c",
        session_id="s",
        status="timeout",
        duration_ms=-0.0,
    ),
}


@pytest.mark.parametrize("name", list(ACCEPTED))
def test_fast_reader_takes_normal_edge_cases_with_the_same_row(name: str) -> None:
    assert_same(encode(ACCEPTED[name]), accepted=True)


def evidence_record(**overrides: Any) -> dict[str, Any]:
    """The Avro record of a valid evidence message, for changing single fields past the model."""
    rec = evidence().model_dump()
    rec["facts"] = json.dumps(rec["facts"], sort_keys=True, separators=(",", ":"))
    rec["extra_json"] = None
    rec.update(overrides)
    return rec


def tool_call_record(**overrides: Any) -> dict[str, Any]:
    rec = tool_call().model_dump()
    for name in ("arguments", "claimed"):
        rec[name] = json.dumps(rec[name], sort_keys=True, separators=(",", ":"))
    rec["extra_json"] = None
    rec.update(overrides)
    return rec


RESULT = {
    **ToolResult(
        event_id=str(uuid.uuid4()), event_time=T, tenant="t", call_id="c", session_id="s", status="ok", duration_ms=1
    ).model_dump(),
    "extra_json": None,
}


def policy_record(labels: str) -> dict[str, Any]:
    return {
        "event_id": str(uuid.uuid4()),
        "event_type": "policy_published",
        "event_time": T,
        "tenant": "acme",
        "collector": None,
        "policy_id": "p",
        "version": "v1",
        "cedar": "permit(principal, action, resource);",
        "labels": labels,
        "published_by": "ci",
        "extra_json": None,
    }


DECLINED = {
    # the full path stores these, canonicalised or with their unknown fields
    "JSON not canonical (spaces)": raw_message(Evidence, evidence_record(facts='{"b": 1, "a": 2}')),
    "JSON not canonical (key order)": raw_message(Evidence, evidence_record(facts='{"b":1,"a":2}')),
    "JSON with an escaped non-ASCII char": raw_message(Evidence, evidence_record(facts='{"a":"\\u00e9"}')),
    "JSON float Python writes as 1e-05": encode(evidence(facts={"x": 1e-05})),
    "JSON integer beyond 64 bits": encode(evidence(facts={"x": 2**70})),
    "unknown fields (extra_json)": encode(Evidence(**evidence().model_dump(), color="blue")),
    "unknown collector fields": encode(tool_call(collector=Collector(id="c", epoch=1, seq=1, zone="eu"))),
    # the full path turns these into dead letters
    "event id not a UUID": raw_message(ToolCall, tool_call_record(event_id="not-a-uuid")),
    "event id UUID without hyphens": raw_message(ToolCall, tool_call_record(event_id=uuid.uuid4().hex)),
    "transport outside the Literal": raw_message(ToolCall, tool_call_record(transport="pigeon")),
    "event_type of another type": raw_message(ToolCall, tool_call_record(event_type="tool_result")),
    "JSON field not an object": raw_message(Evidence, evidence_record(facts="[1,2]")),
    "JSON field not JSON": raw_message(Evidence, evidence_record(facts="{nope")),
    "JSON field with NaN": raw_message(Evidence, evidence_record(facts='{"x":NaN}')),
    "JSON number overflowing to infinity": raw_message(Evidence, evidence_record(facts='{"x":1e999}')),
    "JSON with a lone surrogate": raw_message(Evidence, evidence_record(facts='{"x":"\\ud800"}')),
    "version 0": raw_message(Evidence, evidence_record(version=0)),
    "version beyond UInt32": raw_message(Evidence, evidence_record(version=2**32)),
    "unknown verdict": raw_message(Evidence, evidence_record(verdict="maybe")),
    "negative collector epoch": raw_message(
        ToolCall, tool_call_record(collector={"id": "c", "epoch": -1, "seq": 0, "prev_hash": None, "extra_json": None})
    ),
    "negative duration": raw_message(ToolResult, {**RESULT, "duration_ms": -1.0}),
    "NaN duration": raw_message(ToolResult, {**RESULT, "duration_ms": float("nan")}),
    "timestamp beyond year 9999": raw_message(Evidence, evidence_record(call_time=253402300800000)),
    "policy labels: a pattern not a string": raw_message(PolicyPublished, policy_record('{"restricted":[1]}')),
    "policy labels: patterns not a list": raw_message(PolicyPublished, policy_record('{"restricted":"db:*"}')),
}


@pytest.mark.parametrize("name", list(DECLINED))
def test_fast_reader_declines_what_it_cannot_store_as_is(name: str) -> None:
    message = DECLINED[name]
    assert message[:10] in READERS
    assert fast_path(message) is None
    assert_same(message)


def test_declined_messages_are_stored_or_dead_lettered_as_the_full_path_says() -> None:
    stored = {name for name, message in DECLINED.items() if full_path(message) is not None}
    assert stored == {
        "JSON not canonical (spaces)",
        "JSON not canonical (key order)",
        "JSON with an escaped non-ASCII char",
        "JSON float Python writes as 1e-05",
        "JSON integer beyond 64 bits",
        "unknown fields (extra_json)",
        "unknown collector fields",
    }
    table, row = full_path(DECLINED["JSON not canonical (spaces)"]) or ("", ())
    assert row[COLUMNS[table].index("facts")] == '{"a":2,"b":1}'


# ------------------------------------------------------------------ corrupted bytes


def mutations(message: bytes, rng: random.Random) -> list[bytes]:
    out = [message[:cut] for cut in range(10, len(message), max(1, len(message) // 40))]
    out += [message + b"\x00", message + message[10:]]
    for _ in range(60):
        data = bytearray(message)
        for _ in range(rng.choice([1, 1, 2, 3])):
            pos = rng.randrange(10, len(data))
            data[pos] = rng.choice([0, 1, 2, 0x7F, 0x80, 0xFF, rng.randrange(256), data[pos] ^ (1 << rng.randrange(8))])
        out.append(bytes(data))
    return out


def test_corrupted_messages_are_declined_or_read_exactly_as_the_full_path_reads_them() -> None:
    rng = random.Random(4)
    samples = [encode(record) for record in ACCEPTED.values() if len(encode(record)) < 5000]
    accepted = 0
    for message in samples:
        for mutated in mutations(message, rng):
            assert_same(mutated)
            accepted += fast_path(mutated) is not None
    assert accepted > 50  # many byte changes land in string contents and stay valid


# ------------------------------------------------------------------ the generator refuses what it cannot check


def test_generator_refuses_models_with_checks_it_does_not_know() -> None:
    class Strict(Evidence):
        tool: str = Field(min_length=3)

    schema = json.loads(json.dumps(_registry().current[Evidence].source))
    with pytest.raises(Unsupported):
        build_reader(Strict, schema)
    fewer = {**schema, "fields": [f for f in schema["fields"] if f["name"] != "late"]}
    with pytest.raises(Unsupported):
        build_reader(Evidence, fewer)


def test_reject_is_raised_for_trailing_bytes() -> None:
    message = encode(evidence())
    reader = READERS[message[:10]]
    with pytest.raises(Reject):
        reader.read(message + b"\x00", "t", 0, 0, 0)


def test_time_columns_hold_the_ticks_clickhouse_stores() -> None:
    moment = datetime(2026, 11, 21, 10, 0, 0, 999999, tzinfo=UTC)
    assert millis(moment) == 1795255200999
    assert millis(datetime(1969, 12, 31, 23, 59, 59, 999500, tzinfo=UTC)) == -1
    assert millis(moment - timedelta(days=1)) == 1795255200999 - 86_400_000


def test_arrow_table_types_follow_the_clickhouse_columns() -> None:
    import pyarrow as pa

    from stream_jobs.columnar import arrow_table

    table = arrow_table(
        ["s", "lc", "n", "a", "t", "nt", "u", "b", "f", "h"],
        [
            "String",
            "LowCardinality(String)",
            "Nullable(String)",
            "Array(String)",
            "DateTime64(3, 'UTC')",
            "Nullable(DateTime64(3, 'UTC'))",
            "UInt32",
            "Bool",
            "Float64",
            "Nullable(UInt16)",
        ],
        [["x"], ["acme"], [None], [["r1", "ü"]], [1795255200123], [None], [2**32 - 1], [True], [-0.0], [None]],
    )
    assert table.schema.field("t").type == pa.timestamp("ms", tz="UTC")
    assert table.column("t").cast(pa.int64()).to_pylist() == [1795255200123]
    assert table.to_pylist()[0]["a"] == ["r1", "ü"]
    assert arrow_table(["m"], ["Map(String, String)"], [[{}]]) is None  # not supported here: Native insert


# ------------------------------------------------------------------ the facts' record hash: worker == sink

FACT_MODELS = [
    m for m in MODELS.values() if m.__name__ in ("SessionBound", "SessionEnded", "GrantIssued", "GrantRevoked")
]


def _sink_hashes(message: bytes) -> tuple[str, str | None]:
    """``_record_hash`` as the sink's full path stores it, and as its fast reader does (None: declined)."""
    full = full_path(message)
    assert full is not None
    fast = fast_path(message)
    column = COLUMNS[full[0]].index("_record_hash")
    return full[1][column], None if fast is None else fast[1][column]


def _worker_hash(message: bytes) -> str:
    """The record hash the decision worker keeps for a fact: decoded as the worker decodes it, through the
    stage that owns it, read back from the stage's stored (compact) state."""
    from detections.compact import decode_grants, decode_sessions
    from detections.live import Stage1, Stage2
    from schemas import GrantIssued, GrantRevoked, SessionBound, SessionEnded, decode, parse_delegation_key

    fact = decode(message)
    assert isinstance(fact, (SessionBound, SessionEnded, GrantIssued, GrantRevoked))
    if isinstance(fact, (SessionBound, SessionEnded)):
        s1 = Stage1(0, {}, {})
        s1.on_fact(fact, fact.event_time)
        (state,) = s1.sessions.values()
        hashes = decode_sessions(state, fact.tenant, fact.session_id).hashes
    else:
        s2 = Stage2(0, {}, {})
        s2.on_fact(fact, fact.event_time)
        ((route, state),) = s2.grants.items()
        hashes = decode_grants(state, *parse_delegation_key(route)).hashes
    return hashes[fact.event_id]


def _hand_facts() -> list[SchemaModel]:
    from collectors.chain import ChainStamper
    from schemas import parse_event
    from support.scenario import bound, ended, grant, revoke

    stamper = ChainStamper("intake:test", epoch=3)
    facts = [
        parse_event(bound("10:00:00.123", "s-é", "alice@acme.example", "agent-日本")),
        parse_event({**bound("10:00:00", "s2", "bob", "a2"), "valid_until": "2026-11-21T11:00:00.5Z", "note": "x"}),
        parse_event(ended("10:00:10", "s2")),
        parse_event(grant("10:00:00", "g1", "alice", "a1", ["fs/read_*", "😀/*"], ["file:/data/*"])),
        parse_event({**grant("10:00:00", "g2", "alice", "a1", ["*"]), "expires_at": None, "policies": ["p1"]}),
        parse_event(revoke("10:00:05", "g1", "alice", "a1")),
    ]
    return [*facts, *(stamper.stamp(f) for f in facts)]


@pytest.mark.parametrize("fact", _hand_facts(), ids=lambda f: f"{f.event_type}")
def test_worker_and_both_sink_paths_compute_the_same_record_hash_for_a_fact(fact: SchemaModel) -> None:
    message = encode(fact)
    full, fast = _sink_hashes(message)
    assert (fast is not None) == producer_normal(fact)  # unknown fields: the full path, by design
    assert _worker_hash(message) == full and full.startswith("sha256:")
    assert fast is None or fast == full


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from(FACT_MODELS).flatmap(
        lambda model: st.one_of(record_dicts(model, False), record_dicts(model, True)).map(model.model_validate)
    )
)
def test_generated_facts_hash_the_same_in_the_worker_and_the_sink(record: SchemaModel) -> None:
    message = encode(record)
    full, fast = _sink_hashes(message)
    from schemas import decode, record_hash

    assert record_hash(decode(message)) == full  # what Stage1/Stage2.on_fact store (live.py: record_hash(fact))
    assert fast is None or fast == full
    assert (fast is not None) == producer_normal(record)
