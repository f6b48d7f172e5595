"""The policy and approval contract: new events, new grant fields, old records still decode."""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Callable
from typing import Any

import pytest
from fastavro import parse_schema, schemaless_writer

from schemas import (
    ApprovalDecided,
    EventError,
    GrantIssued,
    PolicyPublished,
    Topics,
    arguments_digest,
    decode,
    encode,
    event_from_json,
    key_for,
    parse_event,
    topic_for,
)
from schemas.codec import AVRO_DIR, MAGIC, schema_fingerprint
from schemas.events import jcs

Make = Callable[..., dict[str, Any]]


def test_old_json_grant_has_no_policies_nor_approval_tools(make: Make) -> None:
    data = make("grant_issued")
    del data["policies"], data["approval_tools"]
    grant = parse_event(data)
    assert isinstance(grant, GrantIssued)
    assert grant.policies == [] and grant.approval_tools == []


def test_a_grant_written_with_the_old_avro_schema_decodes_with_the_new_reader(make: Make) -> None:
    old = json.loads((AVRO_DIR / "history" / "grant_issued.v1.avsc").read_text())
    assert "policies" not in {f["name"] for f in old["fields"]}
    data = make("grant_issued")
    del data["policies"], data["approval_tools"]
    grant = GrantIssued.model_validate(data)
    record = {k: v for k, v in grant.__dict__.items() if k != "collector"}
    record["collector"] = dict(grant.collector.__dict__, extra_json=None) if grant.collector else None
    record["extra_json"] = None
    buf = io.BytesIO()
    buf.write(MAGIC + schema_fingerprint(old))
    schemaless_writer(buf, parse_schema(old), record)
    back = decode(buf.getvalue())
    assert back == grant
    assert isinstance(back, GrantIssued) and back.policies == [] and back.approval_tools == []


def test_new_grant_fields_round_trip(make: Make) -> None:
    grant = parse_event(make("grant_issued"))
    assert decode(encode(grant)) == grant
    assert isinstance(grant, GrantIssued) and grant.policies == ["pol/prod"]


@pytest.mark.parametrize("kind", ["policy_published", "approval_decided"])
def test_new_events_round_trip_in_json_and_avro(kind: str, make: Make) -> None:
    event = parse_event(make(kind))
    assert decode(encode(event)) == event
    assert event_from_json(json.dumps(make(kind))) == event


def test_topics_and_keys(make: Make) -> None:
    policy = parse_event(make("policy_published"))
    approval = parse_event(make("approval_decided"))
    grant = parse_event(make("grant_issued"))
    assert isinstance(policy, PolicyPublished) and isinstance(approval, ApprovalDecided)
    assert topic_for(policy) == "consent.policies" and key_for(policy) == "acme/pol%2Fprod"
    assert topic_for(approval) == "consent.approvals"
    assert key_for(approval) == key_for(grant)  # co-partitioned with consent.grants
    assert {"consent.policies", "consent.approvals"} <= set(Topics().all())


def test_approval_decision_is_approve_or_deny(make: Make) -> None:
    with pytest.raises(EventError, match="decision"):
        parse_event(make("approval_decided", decision="maybe"))


def test_labels_must_map_to_lists_of_strings(make: Make) -> None:
    with pytest.raises(EventError, match="labels"):
        parse_event(make("policy_published", labels={"restricted": "db:prod/*"}))


def test_arguments_digest_is_sha256_of_rfc8785_json() -> None:
    args = {"b": [1, 2.0, None, True], "a": {"z": "é", "y": 1e21}, "c": 0.000001}
    text = '{"a":{"y":1e+21,"z":"é"},"b":[1,2,null,true],"c":0.000001}'
    assert jcs(args) == text
    assert arguments_digest(args) == hashlib.sha256(text.encode()).hexdigest()


@pytest.mark.parametrize(
    ("number", "text"),
    [(1.0, "1"), (0.5, "0.5"), (1e21, "1e+21"), (1e20, "100000000000000000000"), (1e-7, "1e-7"), (4.5e-5, "0.000045")],
)
def test_rfc8785_numbers(number: float, text: str) -> None:
    assert jcs(number) == text


def test_rfc8785_sorts_keys_by_utf16_code_units() -> None:
    assert jcs({"\uffff": 1, "\U0001f600": 2}) == '{"\U0001f600":2,"\uffff":1}'
