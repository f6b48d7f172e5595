"""Line framing, chain stamping and the redaction configuration of the stdio collector."""

from __future__ import annotations

import json
import stat
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from collectors.chain import ChainStamper, record_hash
from collectors.config import KEY_FILE, CollectorConfig, host_key, key_file
from collectors.config import ConfigError as WrapError
from collectors.observer import McpSessionObserver, SessionIdentity
from collectors.redact import Redactor
from collectors.stdio import LineAssembler, configure_observer
from schemas import SessionEnded, to_canonical_json


def redaction_key(environ: dict[str, str]) -> bytes:
    return CollectorConfig.from_env(environ).key()


@given(st.lists(st.binary(max_size=40).filter(lambda b: b"\n" not in b), max_size=8), st.data())
def test_lines_survive_any_chunking(lines: list[bytes], data: st.DataObject) -> None:
    stream = b"".join(line + b"\n" for line in lines)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=6)))
    assembler = LineAssembler()
    out: list[bytes] = []
    start = 0
    for cut in [*cuts, len(stream)]:
        out += assembler.feed(stream[start:cut])
        start = cut
    assert out == lines


def test_oversize_lines_are_skipped_not_parsed() -> None:
    assembler = LineAssembler(limit=10)
    assert assembler.feed(b"short\n" + b"y" * 8) == [b"short"]
    assert assembler.feed(b"y" * 8) == []  # over the limit: dropped from parsing
    assert assembler.feed(b"yyy\nnext\n") == [b"next"]
    assert assembler.oversize == 1


def ended(i: int) -> SessionEnded:
    return SessionEnded(
        event_id=str(uuid.UUID(int=i)), event_time=datetime(2026, 1, 1, tzinfo=UTC), tenant="t", session_id="s"
    )


def test_chain_links_each_record_to_the_previous_hash() -> None:
    stamper = ChainStamper("c-1", epoch=5)
    a, b, c = (stamper.stamp(ended(i)) for i in range(3))
    assert [e.collector.seq for e in (a, b, c) if e.collector] == [1, 2, 3]
    assert a.collector and a.collector.prev_hash is None and a.collector.epoch == 5
    assert b.collector and b.collector.prev_hash == record_hash(a)
    assert c.collector and c.collector.prev_hash == record_hash(b)
    edited = a.model_copy(update={"tenant": "other"})
    assert record_hash(edited) != b.collector.prev_hash  # an edited record no longer matches the chain


# -- redaction and resource configuration of the wrapper ---------------------------------------------
def test_redaction_key_from_the_environment(tmp_path: Path) -> None:
    env = {"SCOPEWATCH_REDACTION_KEY": "k" * 32, "SCOPEWATCH_HOME": str(tmp_path)}
    assert redaction_key(env) == b"k" * 32
    assert not (tmp_path / KEY_FILE).exists()  # no key file when the key is given
    with pytest.raises(WrapError) as info:
        redaction_key({"SCOPEWATCH_REDACTION_KEY": "too-short-key"})
    assert "too-short-key" not in str(info.value)


def test_a_per_host_key_is_created_once_with_mode_0600(tmp_path: Path) -> None:
    env = {"SCOPEWATCH_HOME": str(tmp_path / "home")}
    first = redaction_key(env)
    path = tmp_path / "home" / KEY_FILE
    assert key_file(env) == path and stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(first) == 64 and redaction_key(env) == first  # reused: fingerprints stay joinable
    assert [p.name for p in path.parent.iterdir()] == [KEY_FILE]  # no temporary file left behind
    assert key_file({}).parent.name == ".scopewatch"


def test_a_key_file_others_can_read_or_a_short_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / KEY_FILE
    path.write_text("x" * 64)
    path.chmod(0o644)
    with pytest.raises(WrapError, match="chmod 600"):
        host_key(path)
    path.write_text("short")
    path.chmod(0o600)
    with pytest.raises(WrapError, match="shorter than") as info:
        host_key(path)
    assert "short\n" not in str(info.value)


def test_configure_observer_from_the_environment(tmp_path: Path) -> None:
    rules = tmp_path / "rules.json"
    rules.write_text(json.dumps([{"tools": ["db/*"], "templates": ["db:{database}"]}]))
    env = {
        "SCOPEWATCH_REDACTION_KEY": "k" * 32,
        "SCOPEWATCH_REDACT_PATTERNS": json.dumps({"acme_ref": r"ACME-\d{4}"}),
        "SCOPEWATCH_REDACT_ARGUMENTS": "launch_code, pin ",
        "SCOPEWATCH_MAX_ARGUMENT_BYTES": "2048",
        "SCOPEWATCH_RESOURCE_RULES": str(rules),
    }
    observer = McpSessionObserver(SessionIdentity("s", "t"), server_label="db")
    configure_observer(observer, env)
    assert observer.redactor is not None and observer.redactor.max_argument_bytes == 2048
    assert observer.redactor == Redactor(
        key=b"k" * 32, patterns={"acme_ref": r"ACME-\d{4}"}, argument_names=("launch_code", "pin")
    ).model_copy(update={"max_argument_bytes": 2048})
    assert observer.redactor != Redactor(key=b"o" * 32, max_argument_bytes=2048)
    msg = {"jsonrpc": "2.0", "id": 1, "method": "tools/call"}
    msg["params"] = {"name": "q", "arguments": {"database": "crm", "pin": "1234", "ref": "ACME-1234"}}
    [call] = observer.from_client(msg, datetime(2026, 1, 1, tzinfo=UTC), 0.0)
    assert call.resources == ["db:crm"] and "1234" not in to_canonical_json(call)
    explicit = Redactor(key=b"e" * 32)
    kept = McpSessionObserver(SessionIdentity("s", "t"), redactor=explicit)
    configure_observer(kept, {"SCOPEWATCH_REDACTION_KEY": "k" * 32})
    assert kept.redactor is explicit  # a redactor given in code wins


@pytest.mark.parametrize(
    ("env", "fragment"),
    [
        ({"SCOPEWATCH_REDACT_PATTERNS": "{not json"}, "not JSON"),
        ({"SCOPEWATCH_REDACT_PATTERNS": json.dumps({"mine": "hunter2("})}, "not a valid regular expression"),
        ({"SCOPEWATCH_MAX_ARGUMENT_BYTES": "12"}, "greater than or equal"),
        ({"SCOPEWATCH_RESOURCE_RULES": "/nonexistent/rules.json"}, "cannot read resource rules"),
    ],
)
def test_bad_settings_stop_the_wrapper_without_echoing_them(env: dict[str, str], fragment: str) -> None:
    observer = McpSessionObserver(SessionIdentity("s", "t"))
    with pytest.raises(WrapError) as info:
        configure_observer(observer, {"SCOPEWATCH_REDACTION_KEY": "secret-key-" + "k" * 32, **env})
    assert fragment in str(info.value)
    assert "hunter2" not in str(info.value) and "secret-key-" not in str(info.value)
