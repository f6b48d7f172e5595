"""Redaction: canaries of every kind never leave the observer; fingerprints join; size cap; NaN."""

from __future__ import annotations

import base64
import itertools
import json
import math
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from collectors.observer import McpSessionObserver, SessionIdentity
from collectors.redact import PLACEHOLDER, Redactor, canonical_digest
from schemas import ToolCall, ToolResult, canonical_json, to_canonical_json
from support.canaries import (
    AWS_ID,
    AWS_SECRET,
    BEARER,
    CANARY_TEXTS,
    CUSTOM_ARG,
    CUSTOM_ARGUMENTS,
    CUSTOM_PATTERNS,
    GHP,
    JWT,
    OPENAI,
    PASSWORD,
    PEM,
    SLACK,
    leaked,
    seeded_arguments,
)

T0 = datetime(2026, 11, 21, 10, 0, 0, tzinfo=UTC)
KEY = b"k" * 32
OTHER_KEY = b"o" * 32


def redactor(key: bytes = KEY, **config: Any) -> Redactor:
    return Redactor(key=key, patterns=CUSTOM_PATTERNS, argument_names=CUSTOM_ARGUMENTS, **config)


def make_observer(red: Redactor | None = None, server: str = "fs") -> McpSessionObserver:
    counter = itertools.count()
    return McpSessionObserver(
        SessionIdentity(session_id="s-1", tenant="acme", principal="alice", agent_id="agent-1"),
        server_label=server,
        new_id=lambda: f"00000000-0000-4000-8000-{next(counter):012d}",
        redactor=red,
    )


def call(i: int, tool: str, args: object) -> dict[str, object]:
    return {"jsonrpc": "2.0", "id": i, "method": "tools/call", "params": {"name": tool, "arguments": args}}


# -- the canaries, end to end through the observer ------------------------------------------------
def test_no_canary_reaches_the_tool_call_or_its_result() -> None:
    o = make_observer(redactor())
    [c] = o.from_client(call(1, "write_file", seeded_arguments()), T0, 0.0)
    assert isinstance(c, ToolCall)
    stored = to_canonical_json(c)
    assert leaked(stored) == []
    assert PLACEHOLDER.search(stored)
    assert c.arguments["ratio"] == "NaN" and c.arguments["limits"] == ["Infinity", "-Infinity", 1.5]
    assert c.arguments["config"]["headers"]["Accept"] == "application/json"  # no secret, kept
    assert c.resources and not leaked(" ".join(c.resources))
    assert sum(o.redaction_counts.values()) >= len(CANARY_TEXTS)
    for detector in ("aws_access_key", "private_key", "jwt", "github_token", "acme_ref", "secret_argument"):
        assert o.redaction_counts[detector] >= 1, detector

    error = {"code": -32000, "message": f"upstream refused {CANARY_TEXTS[4]} and {PEM}"}
    [r] = o.from_server({"jsonrpc": "2.0", "id": 1, "error": error}, T0, 1.0)
    assert isinstance(r, ToolResult) and r.status == "error"
    assert leaked(to_canonical_json(r)) == [] and "[redacted:bearer_token:" in (r.error or "")


def test_secrets_in_is_error_results_and_claimed_client_info_are_redacted() -> None:
    o = make_observer(redactor())
    init = {"jsonrpc": "2.0", "id": 0, "method": "initialize", "params": {"clientInfo": {"name": GHP, "version": 1}}}
    o.from_client(init, T0, 0.0)
    [c] = o.from_client(call(1, "x", {}), T0, 0.0)
    assert not leaked(to_canonical_json(c)) and c.claimed["client_version"] == 1
    text = "x" * 5000 + f" failed with {OPENAI}"
    result = {"isError": True, "content": [{"type": "text", "text": text}]}
    [r] = o.from_server({"jsonrpc": "2.0", "id": 1, "result": result}, T0, 0.0)
    assert r.error is not None and len(r.error) == 1024 and not leaked(r.error)


def test_error_text_is_redacted_before_it_is_cut() -> None:
    """A secret straddling the cut would no longer be recognised: redact first, then cut."""
    o = make_observer(redactor())
    o.from_client(call(1, "x", {}), T0, 0.0)
    message = "e" * 1010 + " " + AWS_ID  # "1: " + message: the key straddles character 1024
    [r] = o.from_server({"jsonrpc": "2.0", "id": 1, "error": {"code": 1, "message": message}}, T0, 0.0)
    assert r.error is not None and "AKIAQ3EX" not in r.error and len(r.error) == 1024


def test_nan_argument_no_longer_drops_the_call() -> None:
    o = make_observer()
    [c] = o.from_client(call(1, "get-sum", {"a": math.nan, "b": [math.inf, {"c": -math.inf}]}), T0, 0.0)
    assert c.arguments == {"a": "NaN", "b": ["Infinity", {"c": "-Infinity"}]}
    json.loads(to_canonical_json(c))  # strict JSON, as the schema demands


def test_lone_surrogates_become_replacement_characters() -> None:
    args = json.loads('{"text": "a\\ud800b", "\\udfffkey": 1}')
    out = Redactor(key=KEY).redact_arguments(args).value
    assert out == {"text": "a\ufffdb", "\ufffdkey": 1}
    to_canonical_json(make_observer().from_client(call(1, "x", args), T0, 0.0)[0]).encode("utf-8")


def test_without_a_configured_redactor_the_observer_still_redacts() -> None:
    o = make_observer(None)
    [c] = o.from_client(call(1, "x", {"k": f"Bearer {BEARER}"}), T0, 0.0)
    assert BEARER not in to_canonical_json(c)
    assert o.redactor is None  # a collector can still install the host's redactor


# -- fingerprints -----------------------------------------------------------------------------------
def test_fingerprints_are_stable_for_equal_secrets_and_differ_across_keys() -> None:
    a, b, other = redactor(), redactor(), redactor(OTHER_KEY)
    text = f"first {AWS_ID}, again {AWS_ID}"
    once = a.redact_text(text).value
    marks = PLACEHOLDER.findall(once)
    assert len(marks) == 2 and marks[0] == marks[1]
    assert b.redact_text(text).value == once  # same key, another instance: same fingerprint
    assert other.redact_text(text).value != once
    # the digits depend on key and secret only: a password joins across detectors
    by_name = a.redact({"password": "hunter2"}).value["password"]
    in_url = a.redact_text("mysql://root:hunter2@db/x").value
    in_text = a.redact_text("PASSWORD=hunter2").value
    digits = by_name[-17:]
    assert in_url.count(digits) == 1 and in_text.count(digits) == 1
    assert by_name == a.fingerprint("hunter2", "secret_argument")


def test_the_key_stays_out_of_reprs_and_dumps() -> None:
    key = b"super-secret-redaction-key-0123456789"
    r = Redactor(key=key)
    for shown in (repr(r), str(r), str(r.model_dump()), r.model_dump_json(), repr(r._engine)):
        assert "super-secret" not in shown
    assert r.key.get_secret_value() == key


def test_copies_are_rebuilt_from_their_configuration() -> None:
    r = Redactor(key=KEY)
    other = r.model_copy(update={"key": OTHER_KEY, "argument_names": ("launch_code",)})
    assert other.fingerprint("x", "d") == Redactor(key=OTHER_KEY).fingerprint("x", "d") != r.fingerprint("x", "d")
    assert other.is_secret_name("launch_code") and not r.is_secret_name("launch_code")
    assert r.model_copy() == r and other != r


@pytest.mark.parametrize(
    ("config", "fragment"),
    [
        ({"key": b"short"}, "at least 16 bytes"),
        ({"key": KEY, "patterns": {"bad name": "x"}}, "must match"),
        ({"key": KEY, "patterns": {"jwt": "x"}}, "built in"),
        ({"key": KEY, "patterns": {"mine": "hunter2("}}, "not a valid regular expression"),
        ({"key": KEY, "argument_names": ("--",)}, "no letters"),
        ({"key": KEY, "max_argument_bytes": 10}, "greater than or equal"),
    ],
)
def test_bad_configuration_is_refused(config: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ValidationError) as info:
        Redactor(**config)
    messages = " ".join(e["msg"] for e in info.value.errors())
    assert fragment in messages and "hunter2" not in messages


# -- detectors and names -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("text", "detector"),
    [
        (f"key {AWS_ID}.", "aws_access_key"),
        ("ASIAY34FZKBOKMUTVV7A", "aws_access_key"),
        (f"aws_secret_access_key = {AWS_SECRET}", "aws_secret_key"),
        ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA", "private_key"),  # cut, no END line
        (JWT, "jwt"),
        (f"Bearer {BEARER}", "bearer_token"),
        ("Authorization: Basic YWxhZGRpbjpvcGVuc2VzYW1l", "bearer_token"),
        (GHP, "github_token"),
        ("github_pat_11ABCDEFG0123456789_abcdefghijklmnop", "github_token"),
        (SLACK, "slack_token"),
        (OPENAI, "openai_api_key"),
        ("AIzaSyA-canary0123456789abcdefghijklmnop", "gcp_api_key"),
        ("sk_live_C4n4ryStripeKey0123", "stripe_key"),
        ("redis://:s3cr3t-canary@cache:6379", "url_credentials"),
        ('{"db_password": "two words"}', "password_assignment"),
        ("--passphrase='my phrase'", "password_assignment"),
        ('{\\"client_secret\\": \\"abcdefgh12345\\"}', "credential_assignment"),
        ("X-Api-Key: Zq8canaryApiKeyValue42", "credential_assignment"),
    ],
)
def test_builtin_detectors(text: str, detector: str) -> None:
    out = redactor().redact_text(text)
    assert out.counts.get(detector, 0) >= 1, out
    assert f"[redacted:{detector}:hmac-sha256:" in out.value


@pytest.mark.parametrize(
    "text",
    [
        "Missing Bearer authentication.",
        "Basic Authentication required",
        "max_tokens=4096 and token: expired",
        "see https://example.com:8080/path?page=2",
        "AKIAshort and xAKIAQ3EXAMPLEFAKE7XYZ",
        "the password is required",
        "read /data/a.txt",
        "def connect(user, password=None, token=None):",
        "self._password = self._sasl_plain_password",
        'api_key = os.environ["API_KEY"]',
        "PWD=/home/alice/projects OLDPWD=/home/alice",
        "Authorization: Required for admin endpoints",
    ],
)
def test_ordinary_text_is_left_alone(text: str) -> None:
    assert redactor().redact_text(text).value == text


@pytest.mark.parametrize(
    ("name", "secret"),
    [
        ("password", True),
        ("db_password", True),
        ("userPassword", True),
        ("X-API-KEY", True),
        ("apiKey", True),
        ("access_token", True),
        ("client_secret", True),
        ("Authorization", True),
        ("Set-Cookie", True),
        ("aws_access_key_id", True),
        ("credentials", True),
        ("launch_code", True),  # configured
        ("LaunchCode", True),
        ("max_tokens", False),
        ("tokenizer", False),
        ("path", False),
        ("keyword", False),
        ("monkey", False),
    ],
)
def test_credential_like_argument_names(name: str, secret: bool) -> None:
    assert redactor().is_secret_name(name) is secret


def test_whole_values_under_credential_names_are_fingerprinted_whatever_their_type() -> None:
    r = redactor()
    out = r.redact({"token": {"a": [1, math.nan]}, "password": 1234, "secret": None, "api_key": "", "pin": 7}).value
    assert PLACEHOLDER.fullmatch(out["token"]) and PLACEHOLDER.fullmatch(out["password"])
    assert (out["secret"], out["api_key"], out["pin"]) == (None, "", 7)  # nothing to hide, or not a secret name


# -- size cap --------------------------------------------------------------------------------------------
def test_size_cap_replaces_the_largest_values_with_size_and_digest() -> None:
    r = Redactor(key=KEY, max_argument_bytes=1024)
    content = "x" * 5000 + f" {AWS_ID}"
    out = r.redact_arguments({"path": "/data/a.txt", "content": content, "mode": 420})
    assert out.value["path"] == "/data/a.txt" and out.value["mode"] == 420
    marker = out.value["content"]
    redacted_content = r.redact_text(content).value
    assert marker == {
        "_truncated": True,
        "_size_bytes": len(json.dumps(redacted_content)),
        "_digest": canonical_digest(redacted_content),  # of the redacted value: no guess can be confirmed
    }
    assert len(canonical_json(out.value)) <= 1024 and out.counts == {"aws_access_key": 1}


def test_size_cap_falls_back_to_the_whole_object() -> None:
    r = Redactor(key=KEY, max_argument_bytes=1024)
    args = {f"k{i:04d}": "v" * 20 for i in range(200)}
    out = r.redact_arguments(args).value
    assert out == {"_truncated": True, "_size_bytes": len(canonical_json(args)), "_digest": canonical_digest(args)}
    assert Redactor(key=KEY).redact_arguments(args).value == args  # under the default 64 KiB


def test_arguments_that_are_not_objects() -> None:
    r = Redactor(key=KEY)
    assert r.redact_arguments(None).value == {}
    assert r.redact_arguments([1, math.nan]).value == {"_value": [1, "NaN"]}
    assert r.redact_arguments(f"Bearer {BEARER}").value["_value"].startswith("Bearer [redacted:")


def test_deep_nesting_is_cut_not_a_crash() -> None:
    deep: Any = "leaf"
    for _ in range(500):
        deep = [deep]
    out = Redactor(key=KEY).redact_arguments({"deep": deep}).value
    canonical_json(out)  # serialisable
    assert "nested deeper than" in canonical_json(out)


# -- properties ------------------------------------------------------------------------------------------
json_scalars = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=30)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=25,
)
SECRET_NAMES = st.sampled_from(["password", "apiKey", "Authorization", "session_token", "launch_code"])
safe_words = st.text(alphabet="abcdefghij klmnop,.;!?0123456789", max_size=12)
canary_text = st.lists(st.sampled_from(CANARY_TEXTS) | safe_words, min_size=1, max_size=4).map(" ".join)
seeded_values = st.recursive(
    st.none() | st.integers() | st.floats() | canary_text | st.sampled_from([PASSWORD, CUSTOM_ARG]),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(safe_words | SECRET_NAMES | canary_text, inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None)
@given(json_values)
def test_any_json_value_gives_storable_idempotent_output(value: Any) -> None:
    r = redactor()
    once = r.redact_arguments(value).value
    canonical_json(once).encode("utf-8")  # strict JSON, encodable
    assert r.redact_arguments(once).value == once
    assert r.redact(r.redact(value).value).value == r.redact(value).value


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(safe_words | SECRET_NAMES, seeded_values, max_size=5))
def test_seeded_canaries_never_survive(arguments: dict[str, Any]) -> None:
    r = redactor()
    # a canary password / custom argument is only a secret under a credential-like name
    out = r.redact_arguments({"password": PASSWORD, "launch_code": CUSTOM_ARG, "args": arguments}).value
    assert PLACEHOLDER.fullmatch(out["password"]) and PLACEHOLDER.fullmatch(out["launch_code"])
    assert [n for n in leaked(canonical_json(out)) if n not in (PASSWORD, CUSTOM_ARG)] == []
    assert r.redact_arguments(out).value == out


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=200), st.sampled_from(CANARY_TEXTS), st.text(max_size=200))
def test_text_redaction_is_idempotent_around_canaries(before: str, canary: str, after: str) -> None:
    r = redactor()
    once = r.redact_text(f"{before}\n{canary}\n{after}").value
    assert r.redact_text(once).value == once


# -- canonical views --------------------------------------------------------------------------------------
def test_json_escaped_secret_is_replaced_in_place_and_the_escapes_around_it_stay() -> None:
    r = redactor()
    text = '{\\"dsn\\": \\"mysql:\\/\\/root:s3cr3t-canary@db\\/shop\\", \\"n\\": 1}'
    out = r.redact_text(text).value
    assert (
        out
        == '{\\"dsn\\": \\"mysql:\\/\\/root:'
        + r.fingerprint("s3cr3t-canary", "url_credentials")
        + '@db\\/shop\\", \\"n\\": 1}'
    )


def test_percent_encoded_secret_gets_the_fingerprint_of_the_decoded_secret() -> None:
    r = redactor()
    out = r.redact_text("next=%2Fcb%3Fdsn%3Dpostgres%3A%2F%2Fapp%3Apw%252Bx%40db%2Fapp&x=1").value
    # %25 2B is a literal "%2B" in the decoded password: the secret is "pw%2Bx"
    assert (
        out
        == "next=%2Fcb%3Fdsn%3Dpostgres%3A%2F%2Fapp%3A" + r.fingerprint("pw%2Bx", "url_credentials") + "%40db%2Fapp&x=1"
    )


def test_base64_run_holding_a_secret_becomes_its_fingerprints_and_plain_base64_stays() -> None:
    r = redactor()
    wrapped = base64.b64encode(f"the deploy key is {GHP}\n".encode()).decode()
    out = r.redact_text(f"config: {wrapped} end")
    assert out.value == f"config: {r.fingerprint(GHP, 'github_token')} end" and out.counts == {"github_token": 1}
    plain = base64.b64encode(b"just an ordinary sentence, nothing to hide here").decode()
    assert r.redact_text(plain).value == plain


@pytest.mark.parametrize(
    "text",
    [
        "could not connect: postgres:/app:pw-canary-1@db:5432/app",
        "amqp:/guest:pw-canary-1@rabbit/vhost",
        "redis:///:pw-canary-1@cache",
    ],
)
def test_one_to_three_slash_urls_lose_their_password(text: str) -> None:
    out = redactor().redact_text(text)
    assert "pw-canary-1" not in out.value and out.counts == {"url_credentials": 1}


def test_bare_aws_secret_key_is_found_but_hashes_paths_and_names_are_not() -> None:
    r = redactor()
    assert r.redact_text(f"key {AWS_SECRET} end").counts == {"aws_secret_key": 1}
    for benign in (
        "0123456789abcdef0123456789abcdef01234567",  # SHA-1 / git
        "0123456789ABCDEF0123456789ABCDEF01234567",
        "data/Reports2026/QuarterlyTotals/EUWest1",  # 40 characters, mixed case, a digit: low entropy
    ):
        assert r.redact_text(f"see {benign} here").value == f"see {benign} here", benign


def test_a_token_used_as_the_user_name_of_a_url_is_found_too() -> None:
    out = redactor().redact_text(f"git clone https://{GHP}:x-oauth-basic@github.com/acme/web.git")
    assert GHP not in out.value and out.counts == {"github_token": 1, "url_credentials": 1}


def test_texts_seen_clean_deep_inside_base64_are_not_taken_as_clean_at_the_top() -> None:
    """Two base64 levels down nothing looks into base64 any more: what it saw there proves nothing."""
    r = redactor()

    def b64(text: str) -> str:
        return base64.b64encode(text.encode()).decode()

    inner = "note " + b64(f"DB_PASSWORD={PASSWORD}")
    r.redact_text(b64(b64(inner)))  # `inner` is looked at on the third level, without base64 views
    out = r.redact_text(inner)
    assert out.counts == {"password_assignment": 1} and out.value == "note " + r.fingerprint(
        PASSWORD, "password_assignment"
    )
