"""Event models, validation errors and the canonical JSON form."""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from pydantic import ValidationError

from schemas import (
    EVENT_TYPES,
    DeadLetter,
    EventError,
    Evidence,
    GrantIssued,
    SessionBound,
    ToolCall,
    ToolResult,
    event_from_json,
    parse_event,
    to_canonical_dict,
    to_canonical_json,
)
from schemas.events import EVENT_MODELS

Make = Callable[..., dict[str, Any]]

REQUIRED = [
    (kind, name)
    for kind, model in EVENT_MODELS.items()
    for name, field in model.model_fields.items()
    if field.is_required()
]


@pytest.mark.parametrize("kind", EVENT_TYPES)
def test_sample_parses_and_canonical_json_round_trips(kind: str, make: Make) -> None:
    event = parse_event(make(kind))
    assert type(event) is EVENT_MODELS[kind]
    assert event.event_type == kind
    text = to_canonical_json(event)
    again = event_from_json(text)
    assert again == event
    assert to_canonical_json(again) == text
    assert event_from_json(text.encode()) == event


def test_canonical_json_is_sorted_compact_and_utf8(make: Make) -> None:
    event = parse_event(make("tool_call", tenant="Zürich"))
    text = to_canonical_json(event)
    assert text == json.dumps(json.loads(text), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    assert "Zürich" in text
    assert '"event_time":"2026-11-21T10:00:00.000Z"' in text


def test_defaults_are_explicit_in_canonical_form(make: Make) -> None:
    data = make("tool_call")
    for name in ("attested", "claimed", "tool_digest", "collector"):
        del data[name]
    d = to_canonical_dict(parse_event(data))
    assert d["attested"] is None
    assert d["claimed"] == {}
    assert d["tool_digest"] is None
    assert d["collector"] is None

    g = make("grant_issued")
    for name in ("resources", "scopes", "expires_at", "purpose", "parent_grant_id"):
        del g[name]
    event = parse_event(g)
    assert isinstance(event, GrantIssued)
    assert (event.resources, event.scopes, event.purpose) == ([], [], "")
    assert event.expires_at is None and event.parent_grant_id is None

    s = make("session_bound")
    del s["valid_until"], s["auth"]
    bound = parse_event(s)
    assert isinstance(bound, SessionBound)
    assert bound.valid_until is None and bound.auth == {}


def test_unknown_fields_are_kept(make: Make) -> None:
    data = make("tool_call", x_trace={"traceparent": "00-ab"}, zz=[1, "two"])
    data["collector"] = {**data["collector"], "host": "h1"}
    event = parse_event(data)
    assert event.model_extra == {"x_trace": {"traceparent": "00-ab"}, "zz": [1, "two"]}
    d = to_canonical_dict(event)
    assert d["x_trace"] == {"traceparent": "00-ab"}
    assert d["collector"]["host"] == "h1"
    again = event_from_json(to_canonical_json(event))
    assert again == event
    assert again.model_extra == event.model_extra


@pytest.mark.parametrize(("kind", "name"), REQUIRED)
def test_missing_required_field_is_named(kind: str, name: str, make: Make) -> None:
    data = make(kind)
    del data[name]
    with pytest.raises(EventError) as err:
        parse_event(data)
    assert str(err.value) == f"{kind}: missing required field '{name}'"


def test_required_fields_match_the_contract() -> None:
    required = {kind: {n for k, n in REQUIRED if k == kind} for kind in EVENT_TYPES}
    common = {"event_id", "event_time", "tenant"}
    assert required == {
        "tool_call": common | {"call_id", "session_id", "server", "tool", "arguments", "resources"} | {"transport"},
        "tool_result": common | {"call_id", "session_id", "status", "duration_ms"},
        "session_bound": common | {"session_id", "principal", "agent_id", "valid_from"},
        "session_ended": common | {"session_id"},
        "grant_issued": common | {"grant_id", "principal", "agent_id", "tools", "not_before", "granted_by"},
        "grant_revoked": common | {"grant_id", "principal", "agent_id", "revoked_by"},
        "policy_published": common | {"policy_id", "version", "cedar", "published_by"},
        "approval_decided": common | {"approval_id", "principal", "agent_id", "tool", "decision", "approver"},
    }


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("[1]", "not a JSON object"),
        ('"x"', "not a JSON object"),
        ("{}", "missing required field 'event_type'"),
        ('{"event_type":"foo"}', "unknown event_type 'foo'"),
        ('{"event_type":7}', "unknown event_type 7"),
        ("{nope", "invalid JSON"),
        ("", "invalid JSON"),
        ('{"event_type":"tool_result","duration_ms":NaN}', "invalid JSON"),
        (b"\xff\xfe{", "not valid UTF-8"),
    ],
)
def test_bad_lines(line: str | bytes, message: str) -> None:
    with pytest.raises(EventError, match=message):
        event_from_json(line)


def test_error_names_the_field_and_is_short(make: Make) -> None:
    with pytest.raises(EventError) as err:
        parse_event(make("tool_result", status="weird", duration_ms=-1))
    msg = str(err.value)
    assert msg.startswith("tool_result: field 'status': ")
    assert "field 'duration_ms'" in msg
    assert "\n" not in msg


@pytest.mark.parametrize(
    "value",
    [
        "2026-11-21T10:00:00",  # no offset: naive
        "2026-11-21T10:00:00.000",
        "2026-11-21",
        "2026-13-01T10:00:00Z",
        "2026-02-30T10:00:00Z",
        "2026-11-21T25:00:00Z",
        "2026-11-21T10:00:00+24:00",
        "2026-11-21T10:00:00.Z",
        "yesterday",
        "",
        1763719200000,
        1763719200.0,
        None,
        datetime(2026, 11, 21, 10, 0),  # naive datetime
    ],
)
def test_bad_timestamps_rejected(value: Any, make: Make) -> None:
    with pytest.raises(EventError, match="session_ended: field 'event_time'"):
        parse_event(make("session_ended", event_time=value))


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2026-11-21T10:00:00Z", "2026-11-21T10:00:00.000Z"),
        ("2026-11-21t10:00:00z", "2026-11-21T10:00:00.000Z"),
        ("2026-11-21T10:00:00.1Z", "2026-11-21T10:00:00.100Z"),
        ("2026-11-21T10:00:00.123999Z", "2026-11-21T10:00:00.123Z"),
        ("2026-11-21T10:00:00.123999999Z", "2026-11-21T10:00:00.123Z"),
        ("2026-11-21T11:30:00.5+01:30", "2026-11-21T10:00:00.500Z"),
        ("2026-11-21T00:00:00-02:00", "2026-11-21T02:00:00.000Z"),
        ("2026-01-01T00:30:00+01:00", "2025-12-31T23:30:00.000Z"),
        ("0001-01-01T00:00:00Z", "0001-01-01T00:00:00.000Z"),
        (datetime(2026, 11, 21, 10, 0, 0, 999999, UTC), "2026-11-21T10:00:00.999Z"),
        (
            datetime(2026, 11, 21, 12, 0, tzinfo=timezone(timedelta(hours=2))),
            "2026-11-21T10:00:00.000Z",
        ),
    ],
)
def test_timestamps_normalised_to_utc_ms(value: Any, expected: str, make: Make) -> None:
    event = parse_event(make("session_ended", event_time=value))
    assert event.event_time.tzinfo is UTC
    assert event.event_time.microsecond % 1000 == 0
    assert to_canonical_dict(event)["event_time"] == expected


def test_out_of_range_timestamp_rejected(make: Make) -> None:
    with pytest.raises(EventError, match="out of range"):
        parse_event(make("session_ended", event_time="9999-12-31T23:30:00-01:00"))


def test_nullable_timestamp(make: Make) -> None:
    event = parse_event(make("session_bound", valid_until=None))
    assert isinstance(event, SessionBound)
    assert event.valid_until is None
    with pytest.raises(EventError, match="valid_until"):
        parse_event(make("session_bound", valid_until="2026-11-21T10:00:00"))


@pytest.mark.parametrize(
    "value",
    ["x", "0b6f2a4e2f7e4a8e9c2b1d2e3f4a5b6c", "{0b6f2a4e-2f7e-4a8e-9c2b-1d2e3f4a5b6c}"],
)
def test_event_id_must_be_uuid_string(value: str, make: Make) -> None:
    with pytest.raises(EventError, match="field 'event_id': not a UUID"):
        parse_event(make("session_ended", event_id=value))


def test_event_id_kept_as_given(make: Make) -> None:
    upper = "0B6F2A4E-2F7E-4A8E-9C2B-1D2E3F4A5B6C"
    assert parse_event(make("session_ended", event_id=upper)).event_id == upper


@pytest.mark.parametrize(
    ("kind", "field", "value"),
    [
        ("tool_call", "transport", "grpc"),
        ("tool_call", "arguments", None),
        ("tool_call", "arguments", ["not", "an", "object"]),
        ("tool_call", "arguments", {"x": float("nan")}),
        ("tool_call", "arguments", {"x": (1, 2)}),
        ("tool_call", "resources", "file:/a"),
        ("tool_call", "tenant", 5),
        ("tool_call", "collector", {"id": "c", "epoch": "1", "seq": 0}),
        ("tool_call", "collector", {"id": "c", "epoch": True, "seq": 0}),
        ("tool_call", "collector", {"id": "c", "epoch": 0, "seq": -1}),
        ("tool_result", "duration_ms", -0.5),
        ("tool_result", "duration_ms", float("inf")),
        ("tool_result", "duration_ms", "12"),
        ("tool_result", "status", "OK"),
    ],
)
def test_invalid_values_rejected(kind: str, field: str, value: Any, make: Make) -> None:
    with pytest.raises(EventError, match=f"^{kind}: field '{field}"):
        parse_event(make(kind, **{field: value}))


def test_unknown_field_must_be_json(make: Make) -> None:
    with pytest.raises(EventError, match="non-finite"):
        parse_event(make("session_ended", x=float("inf")))


def test_int_duration_accepted(make: Make) -> None:
    event = parse_event(make("tool_result", duration_ms=12))
    assert isinstance(event, ToolResult)
    assert event.duration_ms == 12.0


def test_models_are_frozen(make: Make) -> None:
    event = parse_event(make("tool_call"))
    with pytest.raises(ValidationError):
        event.tenant = "other"


def test_construct_in_python() -> None:
    event = ToolCall(
        event_id="0b6f2a4e-2f7e-4a8e-9c2b-1d2e3f4a5b6c",
        event_time=datetime(2026, 11, 21, 10, 0, 0, 123456, UTC),
        tenant="acme",
        call_id="c",
        session_id="s",
        server="fs",
        tool="t",
        arguments={},
        resources=[],
        transport="sdk",
    )
    assert event.event_type == "tool_call"
    assert event.event_time.microsecond == 123000
    assert event_from_json(to_canonical_json(event)) == event


@pytest.mark.parametrize(("kind", "model"), [("evidence", Evidence), ("dead_letter", DeadLetter)])
def test_output_records_round_trip(kind: str, model: type[Evidence | DeadLetter], make: Make) -> None:
    record = model.model_validate(make(kind, extra_field={"a": 1}))
    text = to_canonical_json(record)
    assert model.model_validate(json.loads(text)) == record
    assert json.loads(text)["extra_field"] == {"a": 1}


def test_evidence_version_starts_at_one(make: Make) -> None:
    with pytest.raises(ValidationError):
        Evidence.model_validate(make("evidence", version=0))
    with pytest.raises(ValidationError):
        Evidence.model_validate(make("evidence", call_time="2026-11-21T10:00:00"))
