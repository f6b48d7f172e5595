"""Stage 1: attribution for one partition of the session-keyed topics (calls and sessions)."""

from __future__ import annotations

import hashlib
from collections.abc import MutableMapping
from dataclasses import replace
from datetime import datetime
from typing import Any, Final

from detections.compact import decode_sessions, encode_sessions
from detections.engine import Attribution, SessionFact, SessionHistory, attribute_identity
from detections.live.common import (
    EPOCH,
    MICRO,
    HistoryCache,
    LiveConfig,
    LiveCounters,
    Output,
    at,
    due,
    heappush,
    incomplete_facts,
    new_forward,
    new_output,
    now_us,
    us,
)
from detections.live.wire import (
    OpenCall,
    call_message,
    dumps,
    encode_attribution_line,
    encode_call_line,
    parse_open_call,
    quote_part,
    route_of,
    session_key,
    update_message,
)
from schemas import ToolCall, record_hash

__all__ = ["Stage1"]

_CLAIMS: Final = ("sub", "client_id")


def _time_or_none(value: datetime | None) -> int | None:
    return None if value is None else us(value)


class Attributed:
    """An attribution as stage 1 forwards it: the attribution line, its digest and its route."""

    __slots__ = ("digest", "line", "route")

    def __init__(self, a: Attribution, tenant: str, session_id: str) -> None:
        self.line: Final = encode_attribution_line(a)
        s = a.session  # `at` is the call's event time: the same for every attribution of one call
        session = [s.status, s.valid, s.event_id, _time_or_none(s.event_time), s.binding_event_id]
        session += [s.principal, s.agent_id, _time_or_none(s.valid_from), _time_or_none(s.valid_until)]
        self.digest: Final = hashlib.blake2b(dumps(session) + b"\n" + self.line, digest_size=12).hexdigest()
        self.route: Final = route_of(tenant, session_id, a.principal, a.agent_id)


_MEMO_LIMIT: Final = 256


def attributed(history: SessionHistory, t: datetime, attested: dict[str, Any] | None) -> Attributed:
    """:func:`~detections.engine.attribute` at ``t`` for a call with these attested claims, memoized
    per session state: it depends on t only through :meth:`SessionHistory.state_key` (bound sessions).

    A call older than the history's compaction horizon is attributed on incomplete history (DESIGN
    "Retention"): its attribution facts say so (``history_complete: false`` and the horizon), which
    stage 2 carries into the evidence; such attributions are not memoized."""
    horizon = history.horizon
    if horizon is not None and t < horizon:
        a = attribute_identity(history.session_id, attested, history.state_at(t))
        facts = {**a.facts, **incomplete_facts(a.facts, "session", horizon)}
        return Attributed(replace(a, facts=facts), history.tenant, history.session_id)
    n, valid, early = history.state_key(t)
    key = None
    if n:
        sub = client_id = None
        if attested:
            sub, client_id = attested.get("sub"), attested.get("client_id")
        if (sub is None or type(sub) is str) and (client_id is None or type(client_id) is str):
            key = (n, valid, early, sub, client_id)
            hit: Attributed | None = history.memo.get(key)
            if hit is not None:
                return hit
    sid = history.session_id
    found = Attributed(attribute_identity(sid, attested, history.state_at(t)), history.tenant, sid)
    if key is not None:
        if len(history.memo) >= _MEMO_LIMIT:
            history.memo.clear()
        history.memo[key] = found
    return found


class Stage1:
    """Attribution for one partition of the session-keyed topics.

    ``sessions``: session key -> compact session history. ``calls``: call key -> open-call record
    (partition, ids, event time, attested identity claims, attribution version and digest, first
    route, deadline, keep-until; see :class:`~detections.live.wire.OpenCall`).
    """

    def __init__(
        self,
        partition: int,
        sessions: MutableMapping[str, bytes],
        calls: MutableMapping[str, bytes],
        config: LiveConfig | None = None,
        counters: LiveCounters | None = None,
    ) -> None:
        self.partition = partition
        self.sessions = sessions
        self.calls = calls
        self.config = config or LiveConfig()
        self.counters = counters or LiveCounters()
        self._cache: HistoryCache[SessionHistory] = HistoryCache(self.config.cache_size)
        self._open: dict[str, set[str]] = {}  # session key -> open call keys
        self._expiry: list[tuple[int, str]] = []  # (keep_until, call key), min-heap
        self._grace_us = self.config.grace // MICRO
        self._amend_us = self.config.amend_window // MICRO

    # -- state

    def rebuild(self) -> None:
        """Rebuild the in-memory index from ``calls`` (after recovery or a rebalance)."""
        self._open.clear()
        self._expiry.clear()
        for ckey, raw in list(self.calls.items()):
            rec = parse_open_call(raw)
            if rec is not None and rec.partition == self.partition:
                self._index(ckey, rec.keep_until, ckey.rpartition("/")[0])

    def _index(self, ckey: str, keep_until: int, skey: str) -> None:
        members = self._open.get(skey)
        if members is None:
            members = self._open[skey] = set()
        members.add(ckey)
        heappush(self._expiry, (keep_until, ckey))

    def _history(self, skey: str, tenant: str, session_id: str) -> SessionHistory:
        stored = self.sessions.get(skey)
        if stored is not None:
            hit = self._cache.hit(skey, stored)
            if hit is not None:
                return hit
        return self._cache.get(
            skey,
            stored,
            lambda raw: decode_sessions(raw, tenant, session_id),
            lambda: SessionHistory(tenant, session_id),
        )

    def open_calls(self) -> int:
        return sum(map(len, self._open.values()))

    def sweep(self, now: datetime) -> int:
        """Forget calls whose amendment window has closed; returns how many."""
        return self._sweep(now_us(now))

    def _sweep(self, now_us: int) -> int:
        dropped = 0
        # Each open record has exactly one heap entry, pushed with its keep_until (which never
        # changes), so a due entry needs no look at the record itself.
        for ckey in due(self._expiry, now_us):
            if ckey not in self.calls:
                continue
            del self.calls[ckey]
            # A call key is "<session key>/<quoted call id>": quoting leaves no "/" in the call id.
            skey = ckey.rpartition("/")[0]
            members = self._open.get(skey)
            if members is not None:
                members.discard(ckey)
                if not members:
                    del self._open[skey]
            dropped += 1
        if dropped:
            self.counters.add("stage1_calls_closed", dropped)
        return dropped

    # -- events

    def on_call(self, call: ToolCall, now: datetime) -> Output:
        n_us = now_us(now)
        if self._expiry and self._expiry[0][0] <= n_us:
            self._sweep(n_us)
        out = new_output()
        tenant, session_id, call_id = call.tenant, call.session_id, call.call_id
        skey = f"{quote_part(tenant)}/{quote_part(session_id)}"  # session_key
        ckey = f"{skey}/{quote_part(call_id)}"  # call_key
        t = call.event_time
        t_us = (t - EPOCH) // MICRO
        attested = call.attested
        found = attributed(self._history(skey, tenant, session_id), t, attested)
        raw = self.calls.get(ckey)
        rec = None if raw is None else parse_open_call(raw)
        counts = self.counters.counts
        if rec is not None:
            # Delivered again (at-least-once): send it again so a lost forward is repaired; stage 2
            # ignores it if it already has this attribution version.
            counts["stage1_duplicate_calls"] = counts.get("stage1_duplicate_calls", 0) + 1
            if rec.digest != found.digest:
                rec.attr_version, rec.digest = rec.attr_version + 1, found.digest
                self.calls[ckey] = rec.encode()
        else:
            deadline = n_us + self._grace_us
            rec = OpenCall(
                self.partition,
                t_us,
                None if attested is None else {k: attested[k] for k in _CLAIMS if k in attested},
                1,
                found.digest,
                found.route,
                deadline,
                deadline + self._amend_us,
            )
            self.calls[ckey] = rec.encode()
            self._index(ckey, rec.keep_until, skey)
            counts["stage1_calls"] = counts.get("stage1_calls", 0) + 1
        payload = call_message(
            ckey, rec.attr_version, rec.deadline, rec.keep_until, found.digest, found.line, encode_call_line(call, t_us)
        )
        out.forwards.append(new_forward(rec.route, payload))
        return out

    def on_fact(self, fact: SessionFact, now: datetime) -> Output:
        n_us = now_us(now)
        self._sweep(n_us)
        out = new_output()
        skey = session_key(fact.tenant, fact.session_id)
        history = self._history(skey, fact.tenant, fact.session_id)
        again = not history.add(fact, record_hash(fact))
        if again:
            # Delivered again (at-least-once): the state it made may have reached the changelogs
            # without the updates it sent (a worker killed mid-flush): send them again below; stage
            # 2 ignores an attribution version it already has.
            self.counters.add("stage1_duplicate_facts")
        else:
            history.compact(now - self.config.retention)
            stored = self.sessions.get(skey)
            encoded = encode_sessions(history)
            if encoded != stored:  # a fact compacted away at once changes nothing: no store write
                stored = self.sessions[skey] = encoded
            assert stored is not None
            self._cache.put(skey, stored, history)
            self.counters.add("stage1_facts")
        fact_us = us(fact.event_time)
        for ckey in sorted(self._open.get(skey, ())):
            raw = self.calls.get(ckey)
            rec = None if raw is None else parse_open_call(raw)
            if rec is None:
                continue
            if rec.t < fact_us or rec.keep_until <= n_us:
                continue  # a fact only affects calls at or after its event_time
            found = attributed(history, at(rec.t), rec.attested)
            if found.digest == rec.digest:
                if again and rec.attr_version > 1:
                    self.counters.add("stage1_updates_resent")
                    payload = update_message(ckey, rec.attr_version, n_us > rec.deadline, found.digest, found.line)
                    out.forwards.append(new_forward(rec.route, payload))
                continue
            rec.attr_version, rec.digest = rec.attr_version + 1, found.digest
            self.calls[ckey] = rec.encode()
            late = n_us > rec.deadline
            self.counters.add("stage1_reattributions_late" if late else "stage1_reattributions")
            payload = update_message(ckey, rec.attr_version, late, found.digest, found.line)
            out.forwards.append(new_forward(rec.route, payload))
        return out
