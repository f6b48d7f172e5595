"""The one emit path: stamp -> encode -> publish, each event serialised once."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from collectors.chain import ChainStamper
from collectors.emit import Emitter
from schemas import Topics, decode, parse_event, record_hash
from schemas.codec import CodecError

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**62), 2**62)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


def call(i: int, arguments: dict[str, Any], **extra: Any) -> Any:
    return parse_event(
        {
            "event_type": "tool_call",
            "event_id": f"00000000-0000-4000-8000-{i:012d}",
            "event_time": "2026-12-05T10:00:00.123Z",
            "tenant": "acme",
            "call_id": str(i),
            "session_id": "s-1",
            "server": "fs",
            "tool": "read_file",
            "arguments": arguments,
            "resources": ["file:/data/ä.txt"],
            "transport": "stdio",
            "attested": {"sub": "alice", "exp": 1.5},
            "claimed": {"user": "ålice"},
            **extra,
        }
    )


class Sink:
    def __init__(self) -> None:
        self.records: list[tuple[str, bytes | None, bytes]] = []
        self.batches = 0

    def publish_many(self, records: list[tuple[str, bytes | None, bytes]]) -> int:
        self.batches += 1
        self.records.extend(records)
        return len(records)

    def publish(self, topic: str, key: bytes | None, value: bytes) -> bool:
        self.records.append((topic, key, value))
        return True


@settings(max_examples=150, deadline=None)
@given(
    st.dictionaries(st.text(max_size=10), JSON, max_size=5), st.dictionaries(st.sampled_from(["x_a", "zz", "aa"]), JSON)
)
def test_the_chain_hash_is_record_hash_and_the_record_decodes_to_the_stamped_event(
    arguments: dict[str, Any], extra: dict[str, Any]
) -> None:
    emitter = Emitter(Topics.with_prefix("p."), ChainStamper("c-1", epoch=7))
    first, (topic, key, value) = emitter.record(call(1, arguments, **extra))
    assert (topic, key) == ("p.mcp.tool-calls", b"s-1")
    assert emitter.stamper.prev_hash == record_hash(first)  # what scopewatch verify recomputes
    assert decode(value) == first
    second, _ = emitter.record(call(2, {}))
    assert second.collector is not None and second.collector.prev_hash == record_hash(first)
    assert second.collector.seq == 2 and second.collector.epoch == 7


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_emit_publishes_in_order_and_a_failed_encoding_leaves_no_gap() -> None:
    sink = Sink()
    emitter = Emitter(Topics(), ChainStamper("c-1", epoch=1), sink)
    assert emitter.emit(call(1, {"a": 1}))
    bad = call(2, {}).model_copy(update={"collector": None, "call_id": 12})  # not a string: Avro refuses it
    with pytest.raises(CodecError):
        emitter.emit(bad)
    assert emitter.emit(call(3, {"b": 2}))
    seqs = [decode(v).collector.seq for _t, _k, v in sink.records]  # type: ignore[union-attr]
    assert seqs == [1, 2]


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_emit_many_hands_over_once_and_a_bad_event_costs_only_itself() -> None:
    sink = Sink()
    emitter = Emitter(Topics(), ChainStamper("c-1", epoch=1), sink)
    bad = call(2, {}).model_copy(update={"collector": None, "call_id": 12})  # not a string: Avro refuses it
    failed: list[tuple[Any, Exception]] = []
    accepted = emitter.emit_many([call(1, {"a": 1}), bad, call(3, {"b": 2})], lambda e, x: failed.append((e, x)))
    assert accepted == 2 and sink.batches == 1
    assert [e for e, _x in failed] == [bad] and isinstance(failed[0][1], CodecError)
    decoded = [decode(v) for _t, _k, v in sink.records]
    assert [d.collector.seq for d in decoded] == [1, 2]  # type: ignore[union-attr]
    assert [d.call_id for d in decoded] == ["1", "3"]  # type: ignore[union-attr]
    assert decoded[1].collector.prev_hash == record_hash(decoded[0])  # type: ignore[union-attr]
    assert emitter.emit_many([], lambda e, x: None) == 0 and sink.batches == 1


def _samples(arguments: dict[str, Any]) -> list[Any]:
    base = {"event_id": "00000000-0000-4000-8000-000000000001", "event_time": "2026-12-05T10:00:00.123Z"}
    return [
        call(1, arguments),
        call(2, arguments, attested=None, claimed={}),
        call(3, arguments, tool="\0arguments\0", server="\0claimed\0\0claimed\0"),  # the slots, in values
        parse_event(
            {
                **base,
                "event_type": "tool_result",
                "tenant": "acme",
                "call_id": "c",
                "session_id": "s",
                "status": "ok",
                "duration_ms": 1.25,
                "error": None,
                "result_digest": "sha256:ab",
            }
        ),
        parse_event(
            {
                **base,
                "event_type": "tool_result",
                "tenant": "t",
                "call_id": "c",
                "session_id": "s",
                "status": "error",
                "duration_ms": 0.0,
                "error": "é" * 70,
            }
        ),
        parse_event(
            {
                **base,
                "event_type": "session_bound",
                "tenant": "t",
                "session_id": "s",
                "principal": "p",
                "agent_id": "a",
                "valid_from": "2026-12-05T10:00:00.123Z",
                "valid_until": None,
                "auth": arguments,
            }
        ),
        parse_event({**base, "event_type": "session_ended", "tenant": "t", "session_id": "s"}),
        parse_event(
            {
                **base,
                "event_type": "grant_issued",
                "tenant": "t",
                "grant_id": "g",
                "principal": "p",
                "agent_id": "a",
                "tools": ["x", "y"],
                "resources": [],
                "not_before": "1969-12-31T23:59:59.001Z",
                "granted_by": "admin",
                "scopes": ["s"] * 70,
            }
        ),
        parse_event(
            {
                **base,
                "event_type": "grant_revoked",
                "tenant": "t",
                "grant_id": "g",
                "principal": "p",
                "agent_id": "a",
                "revoked_by": "admin",
            }
        ),
    ]


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(st.text(max_size=10), JSON, max_size=5))
def test_the_fast_path_writes_the_bytes_and_hashes_of_the_general_path(arguments: dict[str, Any]) -> None:
    """The compiled writer (schemas.avro_writer) and the plain-dict canonical JSON give exactly
    what fastavro and model_dump give, for every event type a collector emits."""
    import collectors.emit as emit

    samples = _samples(arguments)
    assert {type(e) for e in samples} <= set(emit._FAST) and len(emit._FAST) == 6
    fast, slow = ChainStamper("c-1", epoch=3, seq=5, prev_hash="sha256:00"), ChainStamper("c-1", epoch=3, seq=5)
    slow.prev_hash = fast.prev_hash
    for event in samples:
        value = emit._stamp_encode(fast, event)
        saved, emit._FAST = emit._FAST, {}
        try:
            stamped, expected = emit.stamp_and_encode(slow, event)
        finally:
            emit._FAST = saved
        assert value == expected
        assert fast.prev_hash == slow.prev_hash == record_hash(stamped) and fast.seq == slow.seq
        assert decode(value) == stamped


def test_a_value_that_is_not_plain_json_fails_its_event_only() -> None:
    """Events built without validation (the observer's tool calls) may carry a NaN or an object
    JSON cannot hold: encoding refuses that event, and the chain goes on without a gap."""
    sink = Sink()
    emitter = Emitter(Topics(), ChainStamper("c-1", epoch=1), sink)
    good = call(1, {"a": 1})
    nan = good.model_copy(update={"arguments": {"x": float("nan")}})
    odd = good.model_copy(update={"arguments": {"x": object()}})
    failed: list[tuple[Any, Exception]] = []
    assert emitter.emit_many([nan, good, odd, good], lambda e, x: failed.append((e, x))) == 2
    assert [type(x) for _e, x in failed] == [ValueError, TypeError]
    assert [decode(v).collector.seq for _t, _k, v in sink.records] == [1, 2]  # type: ignore[union-attr]


@settings(max_examples=60, deadline=None)
@given(
    st.text(max_size=12),
    st.floats(min_value=0, allow_nan=False, allow_infinity=False),
    st.integers(0, 2**62),
    st.sampled_from(["2026-12-05T10:00:00.123Z", "0001-01-01T00:00:00.000Z", "9999-12-31T23:59:59.999Z"]),
)
def test_the_generated_canonical_json_matches_the_encoder_for_any_top_level_value(
    text: str, duration: float, seq: int, when: str
) -> None:
    """The canonical JSON written field by field (emit._compile_canon) is the one the encoder writes
    for the whole event: strings with quotes, control characters, NUL slots and non-ASCII, any
    float, any chain position, timestamps at the ends of the range -- compared through the hash."""
    import collectors.emit as emit

    tool_call = call(1, {"k": text}, tool=text, server=text, tool_digest=text or None, event_time=when)
    result = parse_event(
        {
            "event_type": "tool_result",
            "event_id": "00000000-0000-4000-8000-000000000001",
            "event_time": when,
            "tenant": text,
            "call_id": text,
            "session_id": "s",
            "status": "error",
            "duration_ms": duration,
            "error": text,
            "result_digest": None,
        }
    )
    for event in (tool_call, result):
        fast, slow = ChainStamper(text, epoch=seq, seq=seq), ChainStamper(text, epoch=seq, seq=seq)
        value = emit._stamp_encode(fast, event)
        saved, emit._FAST = emit._FAST, {}
        try:
            stamped, expected = emit.stamp_and_encode(slow, event)
        finally:
            emit._FAST = saved
        assert value == expected and fast.prev_hash == record_hash(stamped)


class _CountingDict(dict[str, Any]):
    """A dict that counts how often it is serialised (the JSON encoder asks a dict subclass for its items)."""

    serialised = 0

    def items(self) -> Any:
        type(self).serialised += 1
        return super().items()


@pytest.mark.parametrize("extra", [{}, {"x_unknown": 1}], ids=["fast path", "general path"])
def test_each_object_valued_field_is_serialised_once_for_hash_and_avro(extra: dict[str, Any]) -> None:
    """Issue 17: the chain hash and the Avro record share one canonical JSON of ``arguments``,
    ``attested`` and ``claimed``: serialising an event a second time for the hash would show here."""
    event = call(1, {"path": "/data/a.txt", "n": [1, 2, {"deep": True}]}, **extra)
    counted = {name: _CountingDict(getattr(event, name)) for name in ("arguments", "attested", "claimed")}
    for name, value in counted.items():
        event.__dict__[name] = value  # as validated, but countable
    _CountingDict.serialised = 0
    emitter = Emitter(Topics(), ChainStamper("c-1", epoch=7))
    stamped, (_topic, _key, value) = emitter.record(event)
    assert _CountingDict.serialised == len(counted)  # once each, not once for the hash and again for Avro
    assert emitter.stamper.prev_hash == record_hash(stamped) and decode(value) == stamped


def test_stamp_encode_publish_is_written_once() -> None:
    """Issue 17: the observer process, the SDK middleware, intake and the proxy all emit through
    collectors.emit; no other collector module stamps (``.stamp(``), hashes (``record_hash``) or
    Avro-encodes (``schemas.encode``) an event itself. (publisher.py encodes its own loss records,
    which are not chain-stamped events; chain.py keeps ``ChainStamper.stamp`` as the reference the
    emit tests compare with.)"""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    allowed = {("collectors/publisher.py", "encode"), ("collectors/chain.py", "record_hash")}
    found = []
    for path in sorted((root / "collectors").glob("*.py")) + sorted((root / "scopewatch").glob("*_cli.py")):
        where = str(path.relative_to(root))
        if where == "collectors/emit.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "schemas":
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "stamp":
                names = ["stamp"]
            found += [
                (where, n) for n in names if n in ("encode", "record_hash", "stamp") and (where, n) not in allowed
            ]
    assert found == []
    users = {"collectors/observer_process.py", "collectors/sdk.py", "collectors/intake.py", "scopewatch/proxy_cli.py"}
    assert all("collectors.emit import Emitter" in (root / u).read_text(encoding="utf-8") for u in users)
