"""Lossless collectors: `scopewatch wrap` with the broker stopped, restarted, and the collector killed.

A real MCP client (the `mcp` SDK over stdio) drives `scopewatch wrap` in front of the npm
server-everything; the Kafka broker is this module's own, so it can be stopped and started.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from integration.conftest import own_broker

from collectors.spool import inspect_spool, read_pending
from schemas import SessionBound, SessionEnded, ToolCall, ToolResult, decode
from scopewatch.stack.kafka import KafkaBroker, create_topics
from stream_jobs.runtime.settings import Settings
from support.canaries import CANARY_TEXTS, CUSTOM_ARGUMENTS, CUSTOM_PATTERNS, leaked
from support.kafka import reader
from support.procs import gone, observer_processes
from support.wrap import child_env, wrap_argv

pytestmark = pytest.mark.integration

CALLS = 2000
STALL_SECONDS = 1.0
"""SCOPEWATCH_SPOOL_STALL_SECONDS of these tests: no acknowledgement for this long = Kafka is down."""
SPOOL_BOUND = STALL_SECONDS + 1.0
"""With the broker down, an event is in the spool at most this long after the wrapper relayed it:
the stall time, plus a second for the observer's batching and the publisher's loop on a shared CPU.
Until then it is only in the observer process's memory (read from the copy pipe, queued in the
publisher or handed to the Kafka producer, waiting for an acknowledgement)."""
CLIENTS = ("rdkafka", "aiokafka")
"""SCOPEWATCH_PUBLISHER_CLIENT: both publisher clients keep the spool's guarantees and bound."""


@pytest.fixture(scope="module")
def broker(tmp_path_factory: pytest.TempPathFactory, cache_dir: Path) -> Iterator[KafkaBroker]:
    """A broker of this module's own (tests stop and start it)."""
    with own_broker(tmp_path_factory, cache_dir, "spool-kafka") as broker:
        yield broker


@pytest.fixture
def settings(tmp_path: Path, broker: KafkaBroker, cache_dir: Path) -> Settings:
    broker.ensure_running(timeout=180)
    run = uuid.uuid4().hex[:8]
    values: dict[str, Any] = {
        "home": tmp_path / "home",
        "cache_dir": cache_dir,
        "bootstrap": broker.config.bootstrap,
        "topic_prefix": f"sp{run}.",
        "partitions": 2,
    }
    s = Settings(**values)
    asyncio.run(create_topics(s.kafka_bootstrap, s.topics.all(), s.partitions))
    return s


def _env(settings: Settings, spool: Path, client: str) -> dict[str, str]:
    env = child_env(settings)
    env["SCOPEWATCH_PUBLISHER_CLIENT"] = client
    env["SCOPEWATCH_SPOOL_DIR"] = str(spool)
    env["SCOPEWATCH_SPOOL_FSYNC"] = "interval"
    env["SCOPEWATCH_SPOOL_STALL_SECONDS"] = str(STALL_SECONDS)
    return env


async def _drive(
    argv: list[str], env: dict[str, str], calls: int, each: Callable[[int, Any], Awaitable[None]] | None = None
) -> None:
    """A real MCP client session: list the tools, then ``calls`` echo calls, one after the other."""
    from mcp import Client, StdioServerParameters

    params = StdioServerParameters(command=argv[0], args=argv[1:], env=env)
    async with Client(params, read_timeout_seconds=120) as client:
        await client.list_tools()
        for i in range(calls):
            result = await client.call_tool("echo", {"message": f"call {i}"})
            assert not result.is_error, result
            if each is not None:
                await each(i, client)


def _spooled_calls(spool: Path) -> tuple[dict[str, str], set[str]]:
    """Echo message -> call id of the tool calls in the spool, and the call ids of the results in it."""
    messages: dict[str, str] = {}
    results: set[str] = set()
    for path in sorted(spool.glob("*.seg")) if spool.is_dir() else []:
        try:
            for entry in read_pending(path):
                event = decode(entry.value)
                if isinstance(event, ToolCall):
                    messages[str(event.arguments.get("message"))] = event.call_id
                elif isinstance(event, ToolResult):
                    results.add(event.call_id)
        except FileNotFoundError:  # delivered and removed meanwhile
            continue
    return messages, results


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


async def _consume(settings: Settings, sessions: set[str], want: int, timeout: float = 180.0) -> list[Any]:
    """Every event of ``sessions`` on the call, result and session topics, in partition order."""
    consumer = reader(settings)
    await consumer.start()
    found: list[Any] = []

    async def poll(ms: int) -> None:
        for messages in (await consumer.getmany(timeout_ms=ms, max_records=5000)).values():
            for msg in messages:
                event = decode(msg.value)
                if getattr(event, "session_id", None) in sessions:
                    assert msg.key == event.session_id.encode()  # type: ignore[attr-defined]
                    found.append(event)

    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(found) < want:
            await poll(500)
        await asyncio.sleep(2.0)  # a duplicate would show up now
        await poll(1000)
    finally:
        await consumer.stop()
    return found


def _assert_exactly_once_in_order(events: list[Any], session_id: str, calls: int) -> None:
    mine = [e for e in events if e.session_id == session_id]
    assert len({e.event_id for e in mine}) == len(mine), "duplicates"
    by_type: dict[type, list[Any]] = {}
    for e in mine:
        by_type.setdefault(type(e), []).append(e)
    assert [len(by_type.get(t, [])) for t in (SessionBound, ToolCall, ToolResult, SessionEnded)] == [1, calls, calls, 1]
    # one key, so one partition per topic: each topic holds the session's events in emission order
    for kind in (ToolCall, ToolResult):
        seqs = [e.collector.seq for e in by_type[kind]]
        assert seqs == sorted(seqs), f"{kind.__name__} out of order"
    messages = [c.arguments["message"] for c in by_type[ToolCall]]
    assert messages == [f"call {i}" for i in range(calls)]
    # the collector chain has no gap: every stamped event landed
    assert sorted(e.collector.seq for e in mine) == list(range(1, len(mine) + 1))
    assert {r.call_id for r in by_type[ToolResult]} == {c.call_id for c in by_type[ToolCall]}
    assert all(r.status == "ok" for r in by_type[ToolResult])


@pytest.mark.parametrize("client", CLIENTS)
def test_broker_down_mid_session_all_calls_land_exactly_once_in_order(
    settings: Settings, broker: KafkaBroker, server_everything: list[str], tmp_path: Path, client: str
) -> None:
    spool = tmp_path / "spool"
    session_id = str(uuid.uuid4())
    argv = [sys.executable, *wrap_argv(server_everything, session_id=session_id)[1:]]
    seen_spooled: list[int] = []
    waited: list[float] = []
    tasks: dict[str, asyncio.Task[Any]] = {}

    async def each(i: int, _client: Any) -> None:
        if i == 400:  # the broker goes down while calls keep going through
            tasks["stop"] = asyncio.create_task(asyncio.to_thread(broker.stop))
        elif i == 900:
            await tasks["stop"]
            assert broker.running_record() is None
        elif i == 1500:
            # calls 900..1500 went through with the broker certainly down: within SPOOL_BOUND of the last
            # one, each of them -- up to and including call 1500 itself -- and its result is in the spool
            # (and so would survive a kill -9). A count alone would not say it: events of calls 400..900
            # spooled meanwhile could make up the number while the last ones were still in memory.
            relayed = time.monotonic()
            want = {f"call {n}" for n in range(900, 1501)}

            def all_spooled() -> bool:
                messages, results = _spooled_calls(spool)
                return want <= messages.keys() and {messages[m] for m in want} <= results

            await asyncio.to_thread(_wait_for, all_spooled, 3 * SPOOL_BOUND, "calls 900..1500 to be in the spool")
            waited.append(time.monotonic() - relayed)
            seen_spooled.append(inspect_spool(spool).pending)
            tasks["start"] = asyncio.create_task(asyncio.to_thread(broker.ensure_running, 180))
        elif i == CALLS - 1:
            await tasks["start"]
            # the session stays open until the spool is delivered, as a long agent session would
            await asyncio.to_thread(_wait_for, lambda: inspect_spool(spool).pending == 0, 120, "the spool to drain")

    asyncio.run(_drive(argv, _env(settings, spool, client), CALLS, each))
    assert seen_spooled and seen_spooled[0] >= 2 * (1501 - 900)  # calls and results were spooled meanwhile
    assert waited[0] <= SPOOL_BOUND, f"call 1500 reached the spool {waited[0]:.2f}s after it was relayed"

    events = asyncio.run(_consume(settings, {session_id}, want=2 * CALLS + 2))
    _assert_exactly_once_in_order(events, session_id, CALLS)
    _wait_for(lambda: not spool.exists() or not list(spool.iterdir()), 30, "the collector to remove its files")


@pytest.mark.parametrize("client", CLIENTS)
def test_kill_9_while_the_broker_is_down_the_next_collector_delivers_the_spool(
    settings: Settings, broker: KafkaBroker, server_everything: list[str], tmp_path: Path, client: str
) -> None:
    spool = tmp_path / "spool"
    env = _env(settings, spool, client)
    env["SCOPEWATCH_REDACT_PATTERNS"] = json.dumps(CUSTOM_PATTERNS)
    env["SCOPEWATCH_REDACT_ARGUMENTS"] = ",".join(CUSTOM_ARGUMENTS)
    pid_file = tmp_path / "wrap.pid"
    first = str(uuid.uuid4())
    calls = 150
    spooled = 1 + 2 * (calls + 1)  # session_bound, the calls and the canary call, their results
    # `exec` keeps the pid: the file names the wrapper process itself
    argv = ["sh", "-c", f'echo $$ > "{pid_file}"; exec "$@"', "sh", sys.executable]
    argv += wrap_argv(server_everything, session_id=first)[1:]
    broker.stop()

    observers: list[int] = []

    async def kill_at_once(i: int, client: Any) -> None:
        if i == 0:  # fake secrets of every kind: redacted before anything is spooled
            await client.call_tool("echo", {"message": " ".join(CANARY_TEXTS), "password": "hunter2-canary"})
        if i == calls - 1:
            # the last response reached the client: kill the wrapper at once, without waiting for anything to
            # be spooled -- whatever it relayed is in the copy pipe or already in its observer's spool
            wrapper = int(pid_file.read_text())
            observers.extend(observer_processes(wrapper))
            os.kill(wrapper, signal.SIGKILL)

    asyncio.run(_drive(argv, env, calls, kill_at_once))
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)  # it is gone
    assert len(observers) == 1
    # its observer process drains the pipe into the spool and exits on its own: no orphan
    _wait_for(lambda: gone(observers[0]), 30, "the observer process to exit")
    left = inspect_spool(spool)
    # session_bound + every call and result: all in the spool, none in Kafka
    assert left.pending == spooled and not left.problems
    assert not any(left.locks.values())  # nobody holds the dead collector's lock
    on_disk = b"".join(path.read_bytes() for path in spool.glob("*.seg")).decode("utf-8", "replace")
    assert leaked(on_disk) == [] and "hunter2-canary" not in on_disk

    broker.ensure_running(timeout=180)
    second = str(uuid.uuid4())
    asyncio.run(_drive([sys.executable, *wrap_argv(server_everything, session_id=second)[1:]], env, 3))
    events = asyncio.run(_consume(settings, {first, second}, want=spooled + 2 * 3 + 2))
    killed = [e for e in events if e.session_id == first]
    assert len(killed) == len({e.event_id for e in killed}) == spooled  # no session_ended: it was killed
    assert sorted(e.collector.seq for e in killed) == list(range(1, spooled + 1))
    calls_seen = [e.arguments["message"] for e in killed if isinstance(e, ToolCall)]
    assert len(calls_seen) == calls + 1
    assert [m for m in calls_seen if m.startswith("call ")] == [f"call {i}" for i in range(calls)]
    _assert_exactly_once_in_order(events, second, 3)
    _wait_for(lambda: inspect_spool(spool).pending == 0, 30, "the spool to be empty")
