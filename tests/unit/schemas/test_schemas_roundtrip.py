"""Property tests: generated records survive canonical JSON and Avro unchanged."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from schemas import (
    EVENT_TYPES,
    Collector,
    PolicyPublished,
    SchemaModel,
    decode,
    encode,
    event_from_json,
    parse_event,
    to_canonical_dict,
    to_canonical_json,
)
from schemas.codec import MODELS

LONG = st.integers(0, 2**63 - 1)
TIMESTAMP = st.datetimes(
    min_value=datetime(1, 1, 2),
    max_value=datetime(9999, 12, 30),
    timezones=st.just(UTC),
)
JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
OBJECT = st.dictionaries(st.text(), JSON, max_size=4)
STRINGS = st.lists(st.text(), max_size=4)

FIELDS: dict[str, st.SearchStrategy[Any]] = {
    "event_id": st.uuids().map(str),
    "transport": st.sampled_from(["stdio", "http", "sdk"]),
    "status": st.sampled_from(["ok", "error", "timeout"]),
    "duration_ms": st.floats(min_value=0, allow_nan=False, allow_infinity=False),
    "epoch": LONG,
    "seq": LONG,
    "source_partition": LONG,
    "source_offset": LONG,
    "version": st.integers(1, 2**63 - 1),
    "final": st.booleans(),
    "late": st.booleans(),
    "history_complete": st.booleans(),
    "rule_version": st.integers(1, 2**31 - 1),
    "severity": st.sampled_from(["info", "low", "medium", "high", "critical"]),
    **dict.fromkeys(["arguments", "attested", "claimed", "auth", "facts", "details"], OBJECT),
    **dict.fromkeys(["resources", "tools", "scopes", "reasons", "call_ids", "fact_ids", "fact_hashes"], STRINGS),
    **dict.fromkeys(["policies", "approval_tools", "policy_versions", "policy_reasons", "policy_errors"], STRINGS),
    "labels": st.dictionaries(st.text(), STRINGS, max_size=3),
    "decision": st.sampled_from(["approve", "deny"]),
    **dict.fromkeys(["event_time", "valid_from", "valid_until", "not_before", "expires_at"], TIMESTAMP),
    **dict.fromkeys(["call_time", "decided_at", "failed_at", "first_call_time", "last_call_time"], TIMESTAMP),
    "detected_at": TIMESTAMP,
    "channel": st.sampled_from(["pagerduty", "slack", "webhook"]),
    "outcome": st.sampled_from(["delivered", "retry", "failed", "suppressed", "rate_limited"]),
    "attempt": st.integers(0, 2**32 - 1),
    "findings_grouped": st.integers(0, 2**32 - 1),
    "http_status": st.integers(0, 2**16 - 1),
    "attempted_at": TIMESTAMP,
    "latency_ms": st.floats(min_value=0, allow_nan=False, allow_infinity=False),
}


def record_dicts(model: type[SchemaModel]) -> st.SearchStrategy[dict[str, Any]]:
    """Dicts for ``model``: required fields always, optional ones sometimes, plus extras."""
    required: dict[str, st.SearchStrategy[Any]] = {}
    optional: dict[str, st.SearchStrategy[Any]] = {}
    for name, field in model.model_fields.items():
        if name == "event_type":
            continue
        base = collectors if name == "collector" else FIELDS.get(name, st.text())
        if name == "version" and model is PolicyPublished:  # text there, an int in Evidence
            base = st.text()
        if field.is_required():
            required[name] = base
        else:
            optional[name] = (st.none() | base) if field.default is None else base
    extras = st.dictionaries(st.text().filter(lambda k: k not in model.model_fields), JSON, max_size=3)
    return st.builds(
        lambda fields, extra: {**extra, **fields},
        st.fixed_dictionaries(required, optional=optional),
        extras,
    )


collectors = st.deferred(lambda: record_dicts(Collector))
records = st.sampled_from(list(MODELS.values())).flatmap(lambda model: record_dicts(model).map(model.model_validate))
events = st.sampled_from(list(EVENT_TYPES)).flatmap(
    lambda kind: record_dicts(MODELS[kind]).map(lambda d: parse_event({**d, "event_type": kind}))
)


@settings(max_examples=300)
@given(records)
def test_avro_round_trip(record: SchemaModel) -> None:
    data = encode(record)
    back = decode(data)
    assert type(back) is type(record)
    assert back == record
    assert back.model_extra == record.model_extra
    assert encode(back) == data


@settings(max_examples=300)
@given(events)
def test_canonical_json_round_trip_and_stable(event: SchemaModel) -> None:
    text = to_canonical_json(event)
    back = event_from_json(text)
    assert back == event
    assert to_canonical_json(back) == text
    assert to_canonical_dict(back) == to_canonical_dict(event)


@given(records)
def test_output_records_canonical_round_trip(record: SchemaModel) -> None:
    text = to_canonical_json(record)
    back = type(record).model_validate_json(text)
    assert back == record
    assert to_canonical_json(back) == text
