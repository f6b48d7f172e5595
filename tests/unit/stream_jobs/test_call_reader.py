"""Stage 1's call reader (stream_jobs/call_reader.py) against ``schemas.decode``, no services.

Its contract: the model ``decode`` gives, or ``decode``'s own error. Checked on generated calls of
every shape, the sink reader's hand-made edge cases (accepted and declined), corrupted bytes and
other models' messages; and the fast path must take what producers normally write.
"""

from __future__ import annotations

import random
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from schemas import CodecError, Collector, ToolCall, decode, encode
from stream_jobs.call_reader import call_reader
from tests.unit.stream_jobs.test_columnar import ACCEPTED, DECLINED, mutations, record_dicts, tool_call

READ = call_reader()


def outcome(read: Any, message: bytes) -> tuple[str, Any]:
    try:
        model = read(message)
    except CodecError as exc:
        return "error", str(exc)
    return "model", (type(model), model, model.model_fields_set, model.model_extra, model.__pydantic_private__)


def assert_same(message: bytes) -> None:
    assert outcome(READ, message) == outcome(decode, message)


stamped = st.builds(lambda d, c: {**d, "collector": c}, record_dicts(ToolCall, False), record_dicts(Collector, False))
calls = st.one_of(record_dicts(ToolCall, False), record_dicts(ToolCall, True), stamped).map(ToolCall.model_validate)


@settings(max_examples=500, suppress_health_check=[HealthCheck.too_slow])
@given(calls)
def test_generated_calls_read_as_decode_reads_them(call: ToolCall) -> None:
    assert_same(encode(call))


def test_edge_cases_and_other_models_read_as_decode_reads_them() -> None:
    for record in ACCEPTED.values():
        assert_same(encode(record))
    for message in DECLINED.values():
        assert_same(message)


def test_empty_values_read_as_decode_reads_them() -> None:
    stamp = Collector(id="c", epoch=0, seq=0, prev_hash="")
    for changes in [{"tool_digest": ""}, {"attested": {}}, {"arguments": {}, "resources": [""]}, {"tenant": ""}]:
        call = tool_call(collector=stamp, **changes)
        assert_same(encode(call))
        assert READ(encode(call)) == call


def test_corrupted_calls_read_as_decode_reads_them() -> None:
    rng = random.Random(16)
    stamp = Collector(id="col-1", epoch=3, seq=9, prev_hash="sha256:" + "ab" * 32)
    for message in [encode(tool_call(collector=stamp)), encode(tool_call(collector=stamp, attested={"sub": "a"}))]:
        for mutated in mutations(message, rng):
            assert_same(mutated)
    for junk in [b"", b"\xc3", b"\xc3\x01", b"not avro at all", bytes(10), encode(tool_call())[:-1]]:
        assert_same(junk)


def test_normal_calls_take_the_fast_path() -> None:
    read = call_reader()
    stamp = Collector(id="col-1", epoch=3, seq=9, prev_hash=None)
    normal = [
        tool_call(collector=stamp, call_id=f"c-{i}", attested={"sub": f"u{i}", "client_id": "x"}) for i in range(50)
    ]
    for call in normal:
        model = read(encode(call))
        assert model == call
        assert model.model_fields_set == decode(encode(call)).model_fields_set
    assert (read.fast, read.full) == (50, 0)
    read(encode(tool_call()))  # no collector stamp: the full path
    assert (read.fast, read.full) == (50, 1)
