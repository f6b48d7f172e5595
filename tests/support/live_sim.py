"""The live decision protocol over n partitions, without Kafka: dict stores and FIFO queues.

Stands in for the topology's wiring only (which partition an event goes to, the internal topic as
one FIFO queue per partition); the processors are the real ``detections.live`` ones the Faust job
runs. Used by the property tests (arrival order and interleavings drawn by hypothesis) and the
state-size benchmark.
"""

from __future__ import annotations

import random
import zlib
from collections import deque
from datetime import datetime

from detections.live import LiveConfig, LiveCounters, Output, Stage1, Stage2, tick_message
from schemas import (
    BaseEvent,
    Evidence,
    Finding,
    GrantIssued,
    GrantRevoked,
    SessionBound,
    SessionEnded,
    ToolCall,
    delegation_key,
)


class LiveSim:
    def __init__(self, partitions: int = 4, config: LiveConfig | None = None) -> None:
        self.n = partitions
        self.config = config or LiveConfig()
        self.counters = LiveCounters()
        self.s1_sessions: dict[str, bytes] = {}
        self.s1_calls: dict[str, bytes] = {}
        self.s2_grants: dict[str, bytes] = {}
        self.s2_calls: dict[str, bytes] = {}
        self.stage1 = [
            Stage1(p, self.s1_sessions, self.s1_calls, self.config, self.counters) for p in range(partitions)
        ]
        self.stage2 = [Stage2(p, self.s2_grants, self.s2_calls, self.config, self.counters) for p in range(partitions)]
        self.queues: list[deque[tuple[str, bytes]]] = [deque() for _ in range(partitions)]
        self.evidence: list[Evidence] = []
        self.findings: list[Finding] = []

    def partition(self, key: str) -> int:
        return zlib.crc32(key.encode("utf-8")) % self.n

    def _collect(self, out: Output) -> None:
        self.evidence.extend(out.evidence)
        self.findings.extend(out.findings)
        for fwd in out.forwards:
            self.queues[self.partition(fwd.route)].append((fwd.route, fwd.payload))

    def deliver(self, event: BaseEvent, now: datetime) -> None:
        """An event of an input topic reaches its stage."""
        if isinstance(event, ToolCall):
            self._collect(self.stage1[self.partition(event.session_id)].on_call(event, now))
        elif isinstance(event, (SessionBound, SessionEnded)):
            self._collect(self.stage1[self.partition(event.session_id)].on_fact(event, now))
        elif isinstance(event, (GrantIssued, GrantRevoked)):
            key = delegation_key(event.tenant, event.principal, event.agent_id)
            self._collect(self.stage2[self.partition(key)].on_fact(event, now))

    def step(self, now: datetime, rng: random.Random | None = None) -> bool:
        """Process the head of one non-empty internal partition (random one if ``rng``)."""
        ready = [p for p in range(self.n) if self.queues[p]]
        if not ready:
            return False
        p = rng.choice(ready) if rng is not None else ready[0]
        route, payload = self.queues[p].popleft()
        self._collect(self.stage2[p].on_message(route, payload, now))
        return True

    def drain(self, now: datetime, rng: random.Random | None = None) -> None:
        while self.step(now, rng):
            pass

    def tick(self, now: datetime) -> None:
        for p in range(self.n):
            self._collect(self.stage2[p].on_message("", tick_message(), now))
        self.drain(now)

    def latest(self) -> dict[str, Evidence]:
        """The highest version per call id."""
        best: dict[str, Evidence] = {}
        for e in self.evidence:
            if e.call_id not in best or e.version > best[e.call_id].version:
                best[e.call_id] = e
        return best

    def versions(self) -> dict[str, list[int]]:
        out: dict[str, list[int]] = {}
        for e in self.evidence:
            out.setdefault(e.call_id, []).append(e.version)
        return out

    def rebuild(self) -> None:
        """As after a crash: new processors over the same stores (what changelog recovery gives)."""
        self.stage1 = [Stage1(p, self.s1_sessions, self.s1_calls, self.config, self.counters) for p in range(self.n)]
        self.stage2 = [Stage2(p, self.s2_grants, self.s2_calls, self.config, self.counters) for p in range(self.n)]
        for s1 in self.stage1:
            s1.rebuild()
        for s2 in self.stage2:
            s2.rebuild()
