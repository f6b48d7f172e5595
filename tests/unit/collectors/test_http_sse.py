"""The incremental text/event-stream parser of the HTTP collector."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from collectors.http_sse import SseEvent, SseParser


def parse_all(data: bytes, pieces: list[int] | None = None, **kwargs: int) -> list[SseEvent]:
    parser = SseParser(**kwargs)
    if pieces is None:
        return parser.feed(data)
    out: list[SseEvent] = []
    at = 0
    for size in pieces:
        out += parser.feed(data[at : at + size])
        at += size
    out += parser.feed(data[at:])
    return out


def test_the_sdk_servers_stream() -> None:
    stream = (
        b"event: message\r\ndata: "
        b'{"jsonrpc":"2.0","method":"notifications/progress","params":{"progressToken":4,"progress":1}}\r\n\r\n'
        b'event: message\r\ndata: {"jsonrpc":"2.0","id":4,"result":{}}\r\n\r\n'
    )
    events = parse_all(stream)
    assert [e.event for e in events] == ["message", "message"]
    assert events[0].data.startswith('{"jsonrpc":"2.0","method":"notifications/progress"')
    assert events[1].data == '{"jsonrpc":"2.0","id":4,"result":{}}'


def test_line_endings_lf_crlf_and_cr() -> None:
    for eol in (b"\n", b"\r\n", b"\r"):
        stream = b"data: a" + eol + b"data: b" + eol + eol + b"data:c" + eol + eol
        assert [e.data for e in parse_all(stream)] == ["a\nb", "c"], eol


def test_crlf_split_across_chunks_is_one_line_end() -> None:
    parser = SseParser()
    assert parser.feed(b"data: x\r") == []
    assert parser.feed(b"\n") == []  # the LF completes the CR: not a blank line
    assert parser.feed(b"\r") == [SseEvent("message", "x")]
    assert parser.feed(b"\n") == []


def test_comments_fields_without_colon_and_unknown_fields() -> None:
    stream = b": keep-alive\ndata\ndata:  two spaces\nfoo: bar\nevent:custom\n\n"
    [event] = parse_all(stream)
    assert event == SseEvent("custom", "\n two spaces")


def test_id_persists_and_retry_is_per_event() -> None:
    stream = b"id: 7\nretry: 1500\ndata: a\n\ndata: b\n\nid: bad\0id\nretry: x\ndata: c\n\n"
    events = parse_all(stream)
    assert [(e.data, e.id, e.retry) for e in events] == [("a", "7", 1500), ("b", "7", None), ("c", "7", None)]


def test_priming_event_without_data_is_not_dispatched() -> None:
    parser = SseParser()
    assert parser.feed(b"id: resume-1\nevent: message\n\n") == []
    assert parser.last_event_id == "resume-1"
    assert parser.feed(b"event: message\ndata: {}\n\n") == [SseEvent("message", "{}", "resume-1")]


def test_unfinished_event_at_end_is_discarded() -> None:
    assert parse_all(b"data: done\n\ndata: half") == [SseEvent("message", "done")]
    assert parse_all(b"data: half\n") == []


def test_bom_is_dropped_even_when_split() -> None:
    assert parse_all(b"\xef\xbb\xbfdata: a\n\n") == [SseEvent("message", "a")]
    assert parse_all(b"\xef\xbb\xbfdata: a\n\n", pieces=[1, 1, 1]) == [SseEvent("message", "a")]
    assert parse_all(b"\xef\xbb", pieces=[1]) == []


def test_utf8_split_inside_a_character() -> None:
    text = "data: h\u00e9llo \u2603\n\n".encode()
    assert parse_all(text, pieces=[1] * len(text)) == [SseEvent("message", "h\u00e9llo \u2603")]


def test_oversize_events_are_skipped_and_counted() -> None:
    parser = SseParser(max_event_bytes=64)
    big = b"data: " + b"x" * 100 + b"\n\n"
    many = b"".join(b"data: " + b"y" * 20 + b"\n" for _ in range(5)) + b"\n"
    events = parser.feed(big + many + b"data: ok\n\n")
    assert events == [SseEvent("message", "ok")]
    assert parser.oversize == 2


def test_oversize_line_without_end_does_not_grow_memory() -> None:
    parser = SseParser(max_event_bytes=1024)
    for _ in range(100):
        assert parser.feed(b"z" * 1000) == []
    assert len(parser._line) <= 1024
    assert parser.feed(b"\n\ndata: next\n\n") == [SseEvent("message", "next")]


_lines = st.lists(
    st.tuples(
        st.sampled_from(["data", "event", "id", "retry", ":", "x"]),
        st.text(alphabet=st.characters(blacklist_characters="\r\n\0", blacklist_categories=("Cs",)), max_size=12),
        st.sampled_from([b"\n", b"\r\n", b"\r", b"\n\n", b"\r\n\r\n"]),
    ),
    max_size=30,
)


@settings(max_examples=200, deadline=None)
@given(lines=_lines, cuts=st.lists(st.integers(min_value=1, max_value=7), max_size=60))
def test_chunking_never_changes_the_events(lines: list[tuple[str, str, bytes]], cuts: list[int]) -> None:
    stream = b"".join((f"{name}:{value}" if name != ":" else f":{value}").encode() + eol for name, value, eol in lines)
    assert parse_all(stream, pieces=cuts) == parse_all(stream)
    assert parse_all(stream, pieces=[1] * len(stream)) == parse_all(stream)
