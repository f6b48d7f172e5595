"""Stage 2's sequence-rule state: the final calls held for the sequence rules, the rules' per-delegation
state, and the sequence records (store ``sequence``, key: route) that keep both across a crash or a
rebalance (formats: :data:`~detections.live.wire.SEQUENCE_FORMAT`, :data:`~detections.live.wire.HELD_FORMAT`)."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping, MutableMapping
from datetime import datetime
from typing import Any, Final, TypeAlias

import orjson

from detections.catalog import Detector
from detections.engine import Decision, GrantState
from detections.live.common import LiveCounters, Output, heappop, heappush, now_us
from detections.live.wire import (
    HELD_FORMAT,
    HELD_TAG,
    SEQUENCE_FORMAT,
    SEQUENCE_TAG,
    CallLine,
    held_head,
    key_route,
    sequence_head,
    sequence_head_prefix,
)
from detections.rulebase import DetectionConfig, Rule, StateDecodeError
from schemas import ToolCall

__all__ = ["Held", "Redecide", "SequenceKeeper"]

Held: TypeAlias = tuple[int, str, int, int, ToolCall, Decision, Mapping[str, GrantState], tuple[str, ...]]
"""A held call, a min-heap entry: (event time, call id, hold number, release instant, call, decision,
grant states, delegation key)."""

Redecide: TypeAlias = Callable[[str, str, bytes, CallLine], tuple[ToolCall, Decision, Mapping[str, GrantState]]]
"""Stage 2's decision of a stored call again: (route, attribution digest, attribution line, call) ->
(the call as rules read it, its decision, the grant states it used)."""


class SequenceKeeper:
    """The sequence rules of one stage-2 partition, the final calls held for them, and their records.

    Sequence records are written by :meth:`flush` (the stage calls it after each event, or, deferred,
    once per batch): one store write per changed record.
    """

    def __init__(
        self,
        partition: int,
        rules: list[Rule[Any]],
        rule_config: DetectionConfig,
        store: MutableMapping[str, bytes],
        counters: LiveCounters,
        slack_us: int,
        redecide: Redecide,
    ) -> None:
        self.partition = partition
        self.detector = Detector(rules, rule_config, on_evict=self._states_changed)
        # Final calls waiting for the sequence rules: a min-heap by (event time, call id), and
        # their release instants in the order they came (deadline order), see release.
        self.held: list[Held] = []
        self._held_order: deque[tuple[int, int]] = deque()  # (release instant, hold number)
        self._held_out: set[int] = set()  # hold numbers released before their turn in _held_order
        self._holds = 0
        self.store = store
        # What the sequence records hold: per delegation key, its held calls as stored (hold number
        # -> its encoded held head (release instant, attribution digest), attribution line, call line); the keys changed
        # since the last flush, and those of them whose rule states changed (else the encoded
        # states are taken from the stored record as they are).
        self._stored_held: dict[tuple[str, ...], dict[int, tuple[bytes, bytes, bytes]]] = {}
        self.dirty: set[tuple[str, ...]] = set()
        self._states: set[tuple[str, ...]] = set()
        self._rule_ids: Final = [r.id for r in self.detector.sequence_rules]
        self._counters = counters
        self._slack_us = slack_us
        self._redecide = redecide

    def _states_changed(self, key: tuple[str, ...]) -> None:
        self.dirty.add(key)
        self._states.add(key)

    # -- records

    def flush(self) -> None:
        """Write the sequence record of every delegation whose rule state or held calls changed since
        the last flush (one store write per changed record; a delegation with nothing left is deleted)."""
        dirty = self.dirty
        if not dirty:
            return
        states = self._states
        self.dirty, self._states = set(), set()
        store = self.store
        for key in dirty:
            route = key_route(key)
            value = self._encode(key, route, key in states)
            if value is None:
                if route in store:
                    del store[route]
            elif store.get(route) != value:
                store[route] = value

    def _encode(self, key: tuple[str, ...], route: str, states_changed: bool) -> bytes | None:
        slots = self.detector.slots(key)
        held = self._stored_held.get(key)
        if slots is None and not held:
            return None
        rules = self.detector.sequence_rules if slots is not None else ()
        rule_ids = self._rule_ids if slots is not None else []
        lines = [sequence_head(self.partition, key, rule_ids, len(held) if held else 0)]
        if slots is not None:
            stored = None if states_changed else self.store.get(route)
            kept = None if stored is None else stored.split(b"\n", len(rules) + 1)
            if (
                kept is not None
                and len(kept) > len(rules)
                and kept[0].startswith(sequence_head_prefix(self.partition, key, self._rule_ids))
            ):
                lines.extend(kept[1 : len(rules) + 1])  # only the held calls changed: the states as stored
            else:
                lines.extend([r.codec.encode(slots[r.id]) for r in rules])  # type: ignore[union-attr]
        if held:
            for held_call in held.values():
                lines.extend(held_call)
        return b"\n".join(lines)

    def rebuild(self) -> None:
        """The rules' state and the held calls again from the records (after recovery or a rebalance)."""
        self.detector.clear()
        self.held.clear()
        self._held_order.clear()
        self._held_out.clear()
        self._stored_held.clear()
        self.dirty.clear()
        self._states.clear()
        rules = {r.id: r for r in self.detector.sequence_rules}
        config = self.detector.config
        counts = self._counters.counts
        restored: list[tuple[int, int, str, str, str, bytes, bytes]] = []
        rewrite: set[tuple[str, ...]] = set()  # records read only in part: written again in full
        for route, raw in list(self.store.items()):
            lines = raw.split(b"\n")
            try:
                head = orjson.loads(lines[0])
            except ValueError:
                head = None
            if type(head) is not list or len(head) != 6 or head[0] != SEQUENCE_TAG:
                counts["sequence_records_malformed"] = counts.get("sequence_records_malformed", 0) + 1
                continue
            if head[1] != SEQUENCE_FORMAT:
                counts["sequence_records_unknown_version"] = counts.get("sequence_records_unknown_version", 0) + 1
                continue
            _tag, _v, partition, key_parts, rule_ids, n_held = head
            if partition != self.partition:
                continue
            if len(lines) != 1 + len(rule_ids) + 3 * n_held:
                counts["sequence_records_malformed"] = counts.get("sequence_records_malformed", 0) + 1
                continue
            key = tuple(key_parts)
            if rule_ids and rule_ids != self._rule_ids:
                rewrite.add(key)
            if rule_ids:
                slots: dict[str, Any] = {}
                for rule_id, data in zip(rule_ids, lines[1 : 1 + len(rule_ids)], strict=True):
                    rule = rules.get(rule_id)
                    if rule is None or rule.codec is None:
                        counts["sequence_state_unknown_rule"] = counts.get("sequence_state_unknown_rule", 0) + 1
                        continue
                    try:
                        slots[rule_id] = rule.codec.decode(data, config)
                    except StateDecodeError as exc:
                        name = f"sequence_state_{exc.reason}"
                        counts[name] = counts.get(name, 0) + 1
                        rewrite.add(key)
                self.detector.restore(key, slots)
            at = 1 + len(rule_ids)
            for _ in range(n_held):
                held_line, attribution_line, call_line = lines[at : at + 3]
                at += 3
                try:
                    h = orjson.loads(held_line)
                except ValueError:
                    h = None
                if type(h) is not list or len(h) < 2 or h[0] != HELD_TAG:
                    counts["sequence_held_malformed"] = counts.get("sequence_held_malformed", 0) + 1
                    rewrite.add(key)
                    continue
                if h[1] != HELD_FORMAT or len(h) != 4:
                    counts["sequence_held_unknown_version"] = counts.get("sequence_held_unknown_version", 0) + 1
                    rewrite.add(key)
                    continue
                try:
                    call = CallLine.parse(call_line)
                    restored.append((h[2], call.t, call.call_id, route, h[3], attribution_line, call_line))
                except (ValueError, TypeError, IndexError, KeyError):
                    counts["sequence_held_malformed"] = counts.get("sequence_held_malformed", 0) + 1
                    rewrite.add(key)
        # Held calls go back in the order they were held (release instant), and decided again from
        # their stored attribution and call lines with this route's grants (what the decision at the
        # deadline used: only a fact after the deadline, an amendment, can make it differ).
        restored.sort(key=lambda h: h[:3])
        for release, _t, _cid, route, digest, attribution_line, call_line in restored:
            try:
                rule_call, decision, grants = self._redecide(route, digest, attribution_line, CallLine.parse(call_line))
                self.hold(rule_call, decision, grants, release, digest, attribution_line, call_line)
            except (ValueError, TypeError, IndexError, KeyError):
                counts["sequence_held_malformed"] = counts.get("sequence_held_malformed", 0) + 1
        counts["sequence_held_restored"] = counts.get("sequence_held_restored", 0) + len(self.held)
        self.dirty.clear()  # what was just read is what is stored, except:
        self._states.clear()
        for key in rewrite:  # records read in part: written again from what could be read
            self._states_changed(key)

    # -- held calls

    def hold(
        self,
        call: ToolCall,
        decision: Decision,
        grants: Mapping[str, GrantState],
        release: int,
        digest: str,
        attribution_line: bytes,
        call_line: bytes,
    ) -> None:
        """Hold a final call for the sequence rules until ``release`` (see :meth:`release`)."""
        self._holds += 1
        number = self._holds
        if decision.principal is not None and decision.agent_id is not None:  # delegation_key(call, decision)
            key: tuple[str, ...] = (call.tenant, decision.principal, decision.agent_id)
        else:
            key = (call.tenant, f"session:{call.session_id}")
        heappush(self.held, (now_us(call.event_time), call.call_id, number, release, call, decision, grants, key))
        self._held_order.append((release, number))
        stored = self._stored_held.get(key)
        if stored is None:
            stored = self._stored_held[key] = {}
        stored[number] = (held_head(release, digest), attribution_line, call_line)  # encoded once
        self.dirty.add(key)

    def release(self, now: datetime, n_us: int, out: Output) -> None:
        """Run the sequence rules over held calls, in (event time, call id) order.

        A call is held from its finalization until ``sequence_slack`` after its deadline. The call
        with the earliest event time goes first once its own hold is over, and no held call waits
        more than ``sequence_slack`` beyond its own: when the longest-held one is due, calls go in
        event-time order until it is out. So two calls of a delegation reach the rules in
        event-time order (as in replay) unless they arrived more than ``sequence_slack`` apart.
        """
        held, order, gone = self.held, self._held_order, self._held_out
        overdue = n_us - self._slack_us
        counts = self._counters.counts
        while held:
            while order[0][1] in gone:  # every held call has its entry in order, so never empty here
                gone.discard(order.popleft()[1])
            _t, _cid, number, release, call, decision, grants, key = held[0]
            if release > n_us and order[0][0] > overdue:
                break
            heappop(held)
            gone.add(number)
            found = self.detector.evaluate_with(call, decision, grants)
            stored = self._stored_held.get(key)
            if stored is not None:
                stored.pop(number, None)
                if not stored:
                    del self._stored_held[key]
            self.dirty.add(key)
            self._states.add(key)
            if found:
                counts["findings"] = counts.get("findings", 0) + len(found)
                out.findings.extend([f.to_record(now) for f in found])
        while order and order[0][1] in gone:
            gone.discard(order.popleft()[1])
