"""The live decision protocol over n partitions, without Kafka: dict stores and FIFO queues.

Stands in for the topology's wiring only (which partition an event goes to, the internal topic as
one FIFO queue per partition); the processors are the real ``detections.live`` ones the Faust job
runs. Used by the property tests (arrival order and interleavings drawn by hypothesis) and the
state-size benchmark.

Crashes: :meth:`LiveSim.commit` is the end of a batch whose offsets the worker committed (the stores
as their changelogs hold them, the internal topic, the outputs sent); :meth:`LiveSim.crash` throws
away everything since (processors, in-memory state, unsent outputs, store writes) and starts new
processors over copies of the committed stores; the caller then delivers again the input events
after the commit (at-least-once). With ``deferred=True`` stage 2 writes its sequence state only
when its store drains (as the worker does, once per batch: ``stream_jobs.state.deferred_stage2``).
"""

from __future__ import annotations

import copy
import random
import zlib
from collections import deque
from collections.abc import MutableMapping
from datetime import datetime
from typing import Any

from detections.live import LiveConfig, LiveCounters, Output, Stage1, Stage2, tick_message
from detections.policy import PolicyStore
from schemas import (
    ApprovalDecided,
    BaseEvent,
    Evidence,
    Finding,
    GrantIssued,
    GrantRevoked,
    PolicyPublished,
    SessionBound,
    SessionEnded,
    ToolCall,
    delegation_key,
)
from stream_jobs.state import ChangelogStore, deferred_stage2


class LiveSim:
    def __init__(self, partitions: int = 4, config: LiveConfig | None = None, *, deferred: bool = False) -> None:
        self.n = partitions
        self.config = config or LiveConfig()
        self.deferred = deferred
        self.counters = LiveCounters()
        self.s1_sessions: dict[str, bytes] = {}
        self.s1_calls: dict[str, bytes] = {}
        self.s2_grants: dict[str, bytes] = {}
        self.s2_calls: dict[str, bytes] = {}
        self.s2_seq: dict[str, bytes] = {}
        """Stage 2's sequence records (with ``deferred``: as of the last :meth:`commit`)."""
        self.s2_approvals: dict[str, bytes] = {}
        self.policies = PolicyStore()
        """The policies read so far (``consent.policies`` is read whole, from the beginning, at every
        start: a crash does not lose them, so they are not part of the committed state)."""
        self.stage1: list[Stage1] = []
        self.stage2: list[Stage2] = []
        self._seq_stores: list[ChangelogStore] = []
        self._new_processors()
        self.queues: list[deque[tuple[str, bytes]]] = [deque() for _ in range(partitions)]
        self.evidence: list[Evidence] = []
        self.findings: list[Finding] = []
        self._committed: dict[str, Any] | None = None

    def _new_processors(self) -> None:
        self.stage1 = [Stage1(p, self.s1_sessions, self.s1_calls, self.config, self.counters) for p in range(self.n)]
        if self.deferred:
            self._seq_stores = [ChangelogStore(dict(self.s2_seq)) for _ in range(self.n)]
            self.stage2 = [
                deferred_stage2(
                    p,
                    self.s2_grants,
                    self.s2_calls,
                    self._seq_stores[p],
                    self.config,
                    self.counters,
                    approvals=self.s2_approvals,
                    policies=self.policies,
                )
                for p in range(self.n)
            ]
        else:
            seq: MutableMapping[str, bytes] = self.s2_seq
            self.stage2 = [
                Stage2(
                    p,
                    self.s2_grants,
                    self.s2_calls,
                    self.config,
                    self.counters,
                    sequence=seq,
                    approvals=self.s2_approvals,
                    policies=self.policies,
                )
                for p in range(self.n)
            ]

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
        elif isinstance(event, ApprovalDecided):  # consent.approvals: co-partitioned with the grants
            key = delegation_key(event.tenant, event.principal, event.agent_id)
            self._collect(self.stage2[self.partition(key)].on_approval(event, now))
        elif isinstance(event, PolicyPublished):  # consent.policies: every worker reads all of it
            self.policies.add(event)
            for s2 in self.stage2:
                self._collect(s2.on_policy(event, now, stored=True))

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
        self._flush()
        self._new_processors()
        for s1 in self.stage1:
            s1.rebuild()
        for s2 in self.stage2:
            s2.rebuild()

    def _flush(self) -> None:
        """Deferred stage 2: drain the sequence stores into :attr:`s2_seq` (their changelog)."""
        for store in self._seq_stores:
            for key, value in store.drain():
                if value is None:
                    self.s2_seq.pop(key, None)
                else:
                    self.s2_seq[key] = value

    def commit(self) -> None:
        """The end of a batch: stores written to their changelogs, outputs sent, offsets committed."""
        self._flush()
        self._committed = {
            "stores": copy.deepcopy(
                (self.s1_sessions, self.s1_calls, self.s2_grants, self.s2_calls, self.s2_seq, self.s2_approvals)
            ),
            "queues": [deque(q) for q in self.queues],
            "evidence": len(self.evidence),
            "findings": len(self.findings),
        }

    def crash(self) -> None:
        """SIGKILL after the last :meth:`commit`: new processors over copies of the committed stores;
        what was done since is lost (the caller delivers those input events again)."""
        assert self._committed is not None, "commit() first"
        saved = self._committed
        stores = copy.deepcopy(saved["stores"])
        self.s1_sessions, self.s1_calls, self.s2_grants, self.s2_calls, self.s2_seq, self.s2_approvals = stores
        self.queues = [deque(q) for q in saved["queues"]]
        del self.evidence[saved["evidence"] :]
        del self.findings[saved["findings"] :]
        self._new_processors()
        for s1 in self.stage1:
            s1.rebuild()
        for s2 in self.stage2:
            s2.rebuild()
