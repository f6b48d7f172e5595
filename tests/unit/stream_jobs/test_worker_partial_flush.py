"""A worker that dies in the middle of a flush: part of the flush's messages are on the broker.

A flush sends per-partition record batches (possibly in several produce requests), so a SIGKILL,
or a broker that fails part of a request, can leave some of them written and others not. The
outputs (forwards, handoffs, evidence) are what carry a call on; the changelog writes (state) are
what make a redelivered record a duplicate. If the state lands without the outputs it produced, a
redelivery is dropped as a duplicate and the output is never sent again: a call handed over from
its session route to its delegation's (the story's ``c-tenant``: its call first, its binding
later) left a forwarding record and no owner, and stayed provisional for ever.

Here the aiokafka engine's job runs on the real runner with the in-memory adapter; the first flush
holding an internal message of one kind writes only its changelog writes and fails (the runner
then forgets the held partitions' state and reads the batch again, as a survivor does after a
crash). Every call's final verdict equals replay's: a forwarding record keeps its handoff and sends
it again when the message that moved the call comes again, and stage 1 sends the updates of a
session fact again when the fact comes again.

(Sending the changelog writes only after the outputs are acknowledged, tried first, removes this
case but widens the opposite one, outputs without their state: 1 of 3 runs of the SIGKILL
integration test then had two verdicts under one evidence version.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from unit.stream_jobs.test_worker_in_memory import finals

from detections.live.wire import parse_message
from schemas import ToolCall, encode, key_for, parse_event
from schemas.topics import topic_for
from scopewatch.replay import replay
from stream_jobs.decisions import STAGE1_TABLES, STAGE2_TABLES, changelog_topic
from stream_jobs.runner import TP, MemoryBroker, MemoryConsumer, MemoryProducer, Message
from stream_jobs.runtime.settings import Settings
from stream_jobs.state import MemoryChangelogReader
from stream_jobs.worker import build_worker
from support.scenario import bound, story
from support.scenario import tool_call as call


class DiesMidFlush(MemoryProducer):
    """The first send holding an internal message of ``kind`` writes only the messages ``lands``
    picks (changelog writes: ``state``; everything else: ``outputs``), then fails."""

    def __init__(self, broker: MemoryBroker, settings: Settings, kind: str, lands: str) -> None:
        super().__init__(broker)
        self.internal = settings.topics.calls_by_route
        self.state = {changelog_topic(settings, t) for t in (*STAGE1_TABLES, *STAGE2_TABLES)}
        self.kind, self.lands = kind, lands
        self.died = False

    async def send_all(self, out: Sequence[Message]) -> dict[TP, int]:
        if not self.died and any(m[0] == self.internal and parse_message(m[2] or b"").kind == self.kind for m in out):
            self.died = True
            part = [m for m in out if (m[0] in self.state) == (self.lands == "state")]
            if part:
                await super().send_all(part)
            raise ConnectionError("the worker died in the middle of this flush")
        return await super().send_all(out)


def _run(
    tmp_path: Path, events: list[dict[str, Any]], kind: str, lands: str, grace: float = 0.3
) -> tuple[dict[str, tuple[str, str | None]], dict[str, tuple[str, str | None]], DiesMidFlush]:
    """Run the worker over ``events``: the calls first, the facts once stage 2 has the calls."""
    settings = Settings(
        home=tmp_path,
        topic_prefix="m.",
        partitions=2,
        worker_group="m-decisions",
        grace_seconds=grace,
        sequence_slack_seconds=0.0,
        tick_seconds=0.05,
        worker_batch_size=7,
    )
    parsed = [parse_event(e) for e in events]
    expected = {c.call_id: (d.verdict, d.matched_grant_id) for c, d in replay(enumerate(parsed)).decisions}
    broker = MemoryBroker(settings.partitions)

    def publish(calls: bool) -> None:
        for event in parsed:
            if isinstance(event, ToolCall) == calls:
                broker.append(topic_for(event, settings.topics), key_for(event).encode(), encode(event))

    publish(calls=True)
    topics = settings.topics
    inputs = [topics.tool_calls, topics.sessions, topics.calls_by_route, topics.grants, topics.approvals]
    consumer = MemoryConsumer(broker, settings.worker_group, inputs)
    producer = DiesMidFlush(broker, settings, kind, lands)
    runner, job, stats, ready = build_worker(settings, consumer, producer, MemoryChangelogReader(broker))
    stats.path = None
    job.assignor.last_counts = dict.fromkeys(inputs, settings.partitions)

    async def main() -> None:
        ready.set()
        task = asyncio.create_task(runner.run())
        for _ in range(100):  # until stage 2 has every call (each provisional, on its first route)
            await asyncio.sleep(0.01)
            if len(broker.read(settings.topics.calls_by_route)) >= len(expected):
                break
        publish(calls=False)
        for _ in range(200):
            await asyncio.sleep(0.025)
            if len(finals(broker, settings)) >= len(expected):
                break
        await asyncio.sleep(0.2)  # nothing more to come
        runner.stop()
        await task

    asyncio.run(main())
    return finals(broker, settings), expected, producer


@pytest.mark.parametrize("kind", ["handoff", "update"])
def test_a_flush_cut_in_two_loses_no_call(tmp_path: Path, kind: str) -> None:
    """The story: its ``c-tenant`` call is handed over (and others updated) after its binding.

    The cut flush writes its changelog writes and nothing else: they include the forwarding
    records (``handoff``; before the fix c-tenant stayed provisional) or stage 1's re-attributed
    open calls (``update``; before the fix the story's calls were final as ``unbound_session``).
    """
    live, expected, producer = _run(tmp_path, story("cut"), kind, "state")
    assert producer.died, f"no flush held a {kind} message"
    assert live == expected


def test_a_handoff_cut_off_from_its_forwarding_record_is_sent_again(tmp_path: Path) -> None:
    """One call, its binding after it, no grant: the flush that moves it from the session route to
    the delegation's writes the forwarding record and not the handoff (before the fix the call
    stayed provisional: no final verdict at all)."""
    events = [
        call("10:00:10", "solo-call", "solo-s", "fs", "read_file", tenant="globex"),
        bound("10:00:00", "solo-s", "alice@globex.example", "agent-1", tenant="globex"),
    ]
    live, expected, producer = _run(tmp_path, events, "handoff", "state")
    assert producer.died
    assert expected == {"solo-call": ("no_grant", None)}
    assert live == expected


def test_a_forwarding_record_keeps_its_handoff_through_the_changelog() -> None:
    from detections.live.wire import Moved, parse_head, parse_record

    handoff = b'[2,"handoff","k",2,false,1,null,false,5,9,"d"]\n["line"]\n["call"]'
    for stored, kept in ((Moved(1, "r", "k", 2, 9, "t", handoff), handoff), (Moved(1, "r", "k", 2, 9, "t"), None)):
        raw = stored.encode()
        rec, head = parse_record(raw), parse_head(raw)
        assert isinstance(rec, Moved) and isinstance(head, Moved)
        assert (rec.moved, rec.attr_version, rec.keep_until, rec.handoff) == ("t", 2, 9, kept)
        assert (head.moved, head.keep_until, head.partition) == ("t", 9, 1)
