"""The collectors' JSON-RPC helpers: parse_message reads every message exactly as json.loads does."""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collectors.jsonrpc import parse_message

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**70), 2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16,
)


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True) and type(a) is type(b)


@settings(max_examples=300, deadline=None)
@given(JSON, st.booleans())
def test_parse_message_equals_json_loads(value: Any, ascii_only: bool) -> None:
    text = json.dumps(value, ensure_ascii=ascii_only)
    for data in (text, text.encode("utf-8")):
        assert _same(parse_message(data), json.loads(data))


@pytest.mark.parametrize(
    "text",
    [
        '{"id": 1, "params": {"n": 123456789012345678901234567890}}',  # orjson would make a float of it
        '{"n": -9223372036854775809, "m": 18446744073709551616}',
        '{"a": NaN, "b": Infinity, "c": -Infinity}',
        '{"s": "\\ud800"}',  # a lone surrogate
        '{"a": 1, "a": 2}',
        '{"x": 1e400}',
    ],
)
def test_what_orjson_reads_differently_goes_to_json(text: str) -> None:
    for data in (text, text.encode("utf-8")):
        got, want = parse_message(data), json.loads(data)
        assert json.dumps(got, sort_keys=True) == json.dumps(want, sort_keys=True)
        if "n" in want and isinstance(want["n"], int):
            assert got["n"] == want["n"] and isinstance(got["n"], int)


def test_not_json_is_a_value_error() -> None:
    for bad in (b"{", b"", b"\xff", "nope"):
        with pytest.raises(ValueError):
            parse_message(bad)
    assert math.isnan(parse_message(b"NaN"))


@settings(max_examples=200, deadline=None)
@given(JSON)
def test_canonical_digest_is_sha256_of_json_dumps(value: Any) -> None:
    import hashlib

    from collectors.redact import canonical_digest

    for v in (value, {"x": value, "nan": math.nan, "obj": complex(1, 2), "when": math.inf}):
        text = json.dumps(v, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
        assert canonical_digest(v) == "sha256:" + hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
