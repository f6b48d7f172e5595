"""Live decisions: the two-stage protocol the stream job runs, as pure code with an injected clock.

DESIGN.md ("Late facts"): the live pipeline emits a provisional verdict when a call arrives, waits a
grace period for late identity and consent facts, corrects the verdict within grace, then marks it
final; a fact that arrives after grace produces an amendment flagged late. This module holds that
logic. The Faust job (``stream_jobs.app``) only decodes, hands events to these processors with the
wall clock and the Kafka partition, and sends what they return.

Stages
------
* :class:`Stage1` runs per partition of the calls and sessions topics (key: session_id). It keeps the
  session histories and, for each call still open, the little it needs to re-attribute it. It
  forwards every call, with its :class:`~detections.engine.Attribution`, to a **route**: the
  delegation key ``tenant/principal/agent_id`` when the attribution names one, otherwise the
  session route ``tenant/session_id`` (unbound sessions). A session fact re-attributes the open
  calls it can affect; a changed attribution is forwarded with the next attribution version.
* :class:`Stage2` runs per partition of the internal topic and the grants topic (key: the route).
  It keeps grant histories and owns each open call: it decides (:func:`~detections.engine.authorize`),
  numbers evidence versions, corrects on new grant facts and attributions, finalizes at the
  deadline, and amends later (flagged ``late`` when the fact came after the deadline).

Timing: a call's **deadline** is its arrival at stage 1 plus ``grace`` (wall clock, injected). Facts
that reach their stage before the deadline are "within grace": the final verdict then equals
:meth:`DecisionEngine.decide <detections.engine.DecisionEngine.decide>` over all facts, as
``scopewatch replay`` computes it. A call stays open for amendments ``amend_window`` after its
deadline; facts later than that no longer change live evidence (``scopewatch verify`` re-derives
verdicts from the raw events).

Ownership: evidence versions of a call are numbered 1, 2, 3... by whichever stage-2 route owns it.
When a re-attribution moves the call to another route (a session bound late moves it from the
session route to its delegation), the old owner hands the call over with its version counter and
leaves a forwarding record, so later updates sent to the first route still reach the owner. Stage 1
always addresses the route it first sent the call to. Every message carries the attribution
version, so duplicates and stale updates (at-least-once delivery, rebalances) are ignored.

State lives in injected mutable mappings of ``str -> bytes`` (Faust tables in the job, dicts in
tests); in-memory indexes are rebuilt from them with ``rebuild()`` after a recovery.
"""

from __future__ import annotations

import functools
import hashlib
import heapq
import json
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any, Final, Generic, Literal, TypeVar
from urllib.parse import quote

import orjson

from detections.catalog import Detector
from detections.compact import (
    decode_grants,
    decode_sessions,
    encode_grants,
    encode_sessions,
    from_micros,
    micros,
)
from detections.engine import (
    Attribution,
    Decision,
    GrantFact,
    GrantHistory,
    GrantState,
    SessionFact,
    SessionHistory,
    SessionState,
    attribute,
    authorize,
)
from schemas import (
    Evidence,
    ToolCall,
    delegation_key,
    format_timestamp,
    parse_delegation_key,
    parse_timestamp,
)
from schemas import (
    Finding as FindingRecord,
)

__all__ = [
    "EVIDENCE_NAMESPACE",
    "Forward",
    "LiveConfig",
    "LiveCounters",
    "Output",
    "Stage1",
    "Stage2",
    "call_key",
    "evidence_id_for",
    "route_for",
    "session_key",
    "session_route",
]

EVIDENCE_NAMESPACE: Final = uuid.UUID("6f1c2b1e-3c1a-5b7e-9a53-7d5b0c9e2a10")
MESSAGE_FORMAT: Final = 1


@dataclass(frozen=True)
class LiveConfig:
    """Timing of live decisions (all durations on the injected processing clock)."""

    grace: timedelta = timedelta(seconds=15)
    amend_window: timedelta = timedelta(minutes=10)
    retention: timedelta = timedelta(days=7)
    """Facts older than ``now - retention`` that cannot change a newer verdict are compacted."""
    cache_size: int = 4096
    """Decoded histories kept per processor (the stored form is compact bytes)."""

    def __post_init__(self) -> None:
        for name in ("grace", "amend_window", "retention"):
            if getattr(self, name) < timedelta(0):
                raise ValueError(f"{name} must not be negative")
        if self.cache_size < 1:
            raise ValueError("cache_size must be at least 1")


@dataclass
class LiveCounters:
    """What the processors did, for metrics (plain counts, merged by the adapter)."""

    counts: dict[str, int] = field(default_factory=dict)

    def add(self, name: str, n: int = 1) -> None:
        self.counts[name] = self.counts.get(name, 0) + n


@dataclass(frozen=True)
class Forward:
    """A message for the internal topic, to the partition of ``route``."""

    route: str
    payload: bytes


@dataclass
class Output:
    forwards: list[Forward] = field(default_factory=list)
    evidence: list[Evidence] = field(default_factory=list)
    findings: list[FindingRecord] = field(default_factory=list)

    def extend(self, other: Output) -> None:
        self.forwards.extend(other.forwards)
        self.evidence.extend(other.evidence)
        self.findings.extend(other.findings)


# ------------------------------------------------------------------------------- keys


@functools.lru_cache(maxsize=65536)
def session_key(tenant: str, session_id: str) -> str:
    """Key of a session's history: ``tenant/session_id``, parts percent-encoded (2 parts)."""
    return f"{quote(tenant, safe='')}/{quote(session_id, safe='')}"


session_route = session_key
"""Route of calls whose session names no delegation (2 parts; a delegation key has 3)."""


def call_key(tenant: str, session_id: str, call_id: str) -> str:
    return f"{session_key(tenant, session_id)}/{quote(call_id, safe='')}"


def route_for(tenant: str, session_id: str, attribution: Attribution) -> str:
    if attribution.principal is not None and attribution.agent_id is not None:
        return delegation_key(tenant, attribution.principal, attribution.agent_id)
    return session_route(tenant, session_id)


def evidence_id_for(tenant: str, session_id: str, call_id: str, version: int, ckey: str | None = None) -> str:
    """Deterministic: a version re-emitted after a crash has the same id (idempotent sink)."""
    return str(uuid.uuid5(EVIDENCE_NAMESPACE, f"{ckey or call_key(tenant, session_id, call_id)}#{version}"))


def _store_key(route: str, ckey: str) -> str:
    return f"{route}|{ckey}"  # "|" is percent-encoded inside both parts


# ------------------------------------------------------------------- serialisation


def _time_or_none(value: datetime | None) -> int | None:
    return None if value is None else micros(value)


def _from_time_or_none(value: int | None) -> datetime | None:
    return None if value is None else from_micros(value)


def _session_to_json(s: SessionState) -> dict[str, Any]:
    return {
        "at": micros(s.at),
        "status": s.status,
        "valid": s.valid,
        "event_id": s.event_id,
        "event_time": _time_or_none(s.event_time),
        "binding_event_id": s.binding_event_id,
        "principal": s.principal,
        "agent_id": s.agent_id,
        "valid_from": _time_or_none(s.valid_from),
        "valid_until": _time_or_none(s.valid_until),
    }


def _session_from_json(d: dict[str, Any]) -> SessionState:
    return SessionState(
        at=from_micros(d["at"]),
        status=d["status"],
        valid=d["valid"],
        event_id=d["event_id"],
        event_time=_from_time_or_none(d["event_time"]),
        binding_event_id=d["binding_event_id"],
        principal=d["principal"],
        agent_id=d["agent_id"],
        valid_from=_from_time_or_none(d["valid_from"]),
        valid_until=_from_time_or_none(d["valid_until"]),
    )


def attribution_to_json(a: Attribution) -> dict[str, Any]:
    return {
        "session": _session_to_json(a.session),
        "principal": a.principal,
        "agent_id": a.agent_id,
        "verdict": a.verdict,
        "reasons": list(a.reasons),
        "facts": a.facts,
    }


def attribution_from_json(d: dict[str, Any]) -> Attribution:
    return Attribution(
        session=_session_from_json(d["session"]),
        principal=d["principal"],
        agent_id=d["agent_id"],
        verdict=d["verdict"],
        reasons=tuple(d["reasons"]),
        facts=d["facts"],
    )


def _digest(value: Any) -> str:
    try:
        data = orjson.dumps(value, option=orjson.OPT_SORT_KEYS)
    except TypeError:
        data = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return hashlib.blake2b(data, digest_size=12).hexdigest()


_CALL_FIELDS: Final = ("event_id", "tenant", "call_id", "session_id", "server", "tool", "resources", "transport")


def strip_call(call: ToolCall) -> dict[str, Any]:
    """What stage 2 needs of a call: no arguments, no claimed hints (they stay in the raw event)."""
    d: dict[str, Any] = {name: getattr(call, name) for name in _CALL_FIELDS}
    d["resources"] = list(call.resources)
    d["event_time"] = format_timestamp(call.event_time)
    d["attested"] = call.attested
    d["tool_digest"] = call.tool_digest
    return d


def unstrip_call(d: dict[str, Any]) -> ToolCall:
    """The stripped call as a ToolCall (validated when stage 1 decoded it; not validated again)."""
    fields = dict(d)
    fields["event_time"] = parse_timestamp(d["event_time"])
    return ToolCall.model_construct(arguments={}, claimed={}, **fields)


def _dumps(value: dict[str, Any]) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # e.g. an integer beyond 64 bits in attested claims
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _loads(data: bytes) -> dict[str, Any]:
    value = orjson.loads(data)
    if not isinstance(value, dict):
        raise ValueError("state record is not an object")
    return value


# ------------------------------------------------------------------------------ cache

H = TypeVar("H", SessionHistory, GrantHistory)


class _HistoryCache(Generic[H]):
    """Decoded histories by store key, valid while the stored bytes object is the same."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[str, tuple[bytes, H]] = OrderedDict()

    def get(self, key: str, stored: bytes | None, decode: Callable[[bytes], H], empty: Callable[[], H]) -> H:
        if stored is None:
            self._entries.pop(key, None)
            return empty()
        hit = self._entries.get(key)
        if hit is not None and hit[0] is stored:
            self._entries.move_to_end(key)
            return hit[1]
        history = decode(stored)
        self.put(key, stored, history)
        return history

    def put(self, key: str, stored: bytes, history: H) -> None:
        self._entries[key] = (stored, history)
        self._entries.move_to_end(key)
        while len(self._entries) > self._size:
            self._entries.popitem(last=False)

    def drop(self, key: str) -> None:
        self._entries.pop(key, None)


class _Timers:
    """Min-heap of (instant, key) with lazy deletion: callers re-check the record."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, str]] = []

    def push(self, at: int, key: str) -> None:
        heapq.heappush(self._heap, (at, key))

    def due(self, now: int) -> Iterator[str]:
        while self._heap and self._heap[0][0] <= now:
            yield heapq.heappop(self._heap)[1]

    def clear(self) -> None:
        self._heap.clear()

    def __len__(self) -> int:
        return len(self._heap)


# ----------------------------------------------------------------------------- stage 1


class Stage1:
    """Attribution for one partition of the session-keyed topics.

    ``sessions``: session key -> compact session history. ``calls``: call key -> open-call record
    (JSON: partition, ids, event time, attested identity claims, attribution version and digest,
    first route, deadline, keep-until).
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
        self._cache: _HistoryCache[SessionHistory] = _HistoryCache(self.config.cache_size)
        self._open: dict[str, set[str]] = {}  # session key -> open call keys
        self._expiry = _Timers()

    # -- state

    def rebuild(self) -> None:
        """Rebuild the in-memory index from ``calls`` (after recovery or a rebalance)."""
        self._open.clear()
        self._expiry.clear()
        for ckey, raw in list(self.calls.items()):
            rec = _loads(raw)
            if rec["p"] == self.partition:
                self._index(ckey, rec)

    def _index(self, ckey: str, rec: dict[str, Any]) -> None:
        self._open.setdefault(rec["sk"], set()).add(ckey)
        self._expiry.push(rec["k"], ckey)

    def _history(self, tenant: str, session_id: str) -> SessionHistory:
        skey = session_key(tenant, session_id)
        return self._cache.get(
            skey,
            self.sessions.get(skey),
            lambda raw: decode_sessions(raw, tenant, session_id),
            lambda: SessionHistory(tenant, session_id),
        )

    def open_calls(self) -> int:
        return sum(map(len, self._open.values()))

    def sweep(self, now: datetime) -> int:
        """Forget calls whose amendment window has closed; returns how many."""
        now_us, dropped = micros(now), 0
        for ckey in self._expiry.due(now_us):
            raw = self.calls.get(ckey)
            if raw is None:
                continue
            rec = _loads(raw)
            if rec["k"] > now_us:
                continue
            del self.calls[ckey]
            members = self._open.get(rec["sk"])
            if members is not None:
                members.discard(ckey)
                if not members:
                    del self._open[rec["sk"]]
            dropped += 1
        if dropped:
            self.counters.add("stage1_calls_closed", dropped)
        return dropped

    # -- events

    def on_call(self, call: ToolCall, now: datetime) -> Output:
        self.sweep(now)
        out = Output()
        ckey = call_key(call.tenant, call.session_id, call.call_id)
        history = self._history(call.tenant, call.session_id)
        attribution = attribute(call, history.state_at(call.event_time))
        digest = _digest(attribution_to_json(attribution))
        raw = self.calls.get(ckey)
        if raw is not None:
            # Delivered again (at-least-once): send it again so a lost forward is repaired; stage 2
            # ignores it if it already has this attribution version.
            rec = _loads(raw)
            self.counters.add("stage1_duplicate_calls")
            if rec["h"] != digest:
                rec["q"], rec["h"] = rec["q"] + 1, digest
                self.calls[ckey] = _dumps(rec)
        else:
            now_us = micros(now)
            deadline = now_us + self.config.grace // timedelta(microseconds=1)
            rec = {
                "p": self.partition,
                "sk": session_key(call.tenant, call.session_id),
                "tenant": call.tenant,
                "sid": call.session_id,
                "cid": call.call_id,
                "t": micros(call.event_time),
                "att": _identity_claims(call.attested),
                "q": 1,
                "h": digest,
                "r": route_for(call.tenant, call.session_id, attribution),
                "d": deadline,
                "k": deadline + self.config.amend_window // timedelta(microseconds=1),
            }
            self.calls[ckey] = _dumps(rec)
            self._index(ckey, rec)
            self.counters.add("stage1_calls")
        message = {
            "v": MESSAGE_FORMAT,
            "type": "call",
            "ck": ckey,
            "q": rec["q"],
            "d": rec["d"],
            "k": rec["k"],
            "late": False,
            "attr": attribution_to_json(attribution),
            "call": strip_call(call),
        }
        out.forwards.append(Forward(rec["r"], _dumps(message)))
        return out

    def on_fact(self, fact: SessionFact, now: datetime) -> Output:
        self.sweep(now)
        out = Output()
        history = self._history(fact.tenant, fact.session_id)
        if not history.add(fact):
            self.counters.add("stage1_duplicate_facts")
            return out
        history.compact(now - self.config.retention)
        skey = session_key(fact.tenant, fact.session_id)
        stored = encode_sessions(history)
        self.sessions[skey] = stored
        self._cache.put(skey, stored, history)
        self.counters.add("stage1_facts")
        now_us, fact_us = micros(now), micros(fact.event_time)
        for ckey in sorted(self._open.get(skey, ())):
            raw = self.calls.get(ckey)
            if raw is None:
                continue
            rec = _loads(raw)
            if rec["t"] < fact_us or rec["k"] <= now_us:
                continue  # a fact only affects calls at or after its event_time
            call = _identity_call(rec)
            attribution = attribute(call, history.state_at(call.event_time))
            digest = _digest(attribution_to_json(attribution))
            if digest == rec["h"]:
                continue
            rec["q"], rec["h"] = rec["q"] + 1, digest
            self.calls[ckey] = _dumps(rec)
            late = now_us > rec["d"]
            self.counters.add("stage1_reattributions_late" if late else "stage1_reattributions")
            message = {
                "v": MESSAGE_FORMAT,
                "type": "update",
                "ck": ckey,
                "q": rec["q"],
                "late": late,
                "attr": attribution_to_json(attribution),
            }
            out.forwards.append(Forward(rec["r"], _dumps(message)))
        return out


_CLAIMS: Final = ("sub", "client_id")


def _identity_claims(attested: dict[str, Any] | None) -> dict[str, Any] | None:
    """The attested claims attribution reads (None when the call had no attested object)."""
    if attested is None:
        return None
    return {k: attested[k] for k in _CLAIMS if k in attested}


def _identity_call(rec: dict[str, Any]) -> ToolCall:
    """A ToolCall carrying only what :func:`attribute` reads."""
    return ToolCall.model_construct(
        tenant=rec["tenant"],
        session_id=rec["sid"],
        call_id=rec["cid"],
        event_time=from_micros(rec["t"]),
        attested=rec["att"],
    )


# ----------------------------------------------------------------------------- stage 2

Reason = Literal["call", "update", "handoff", "fact", "deadline"]


class Stage2:
    """Authorization, evidence versions and finality for one partition of the route-keyed topics.

    ``grants``: delegation key -> compact grant history. ``calls``: ``route|call key`` -> either an
    owned call (stripped call, attribution and its version, last emitted summary and version,
    finality, deadline, keep-until) or a forwarding record (``moved``: the route that owns it now).
    """

    def __init__(
        self,
        partition: int,
        grants: MutableMapping[str, bytes],
        calls: MutableMapping[str, bytes],
        config: LiveConfig | None = None,
        counters: LiveCounters | None = None,
        detector: Detector | None = None,
    ) -> None:
        self.partition = partition
        self.grants = grants
        self.detector = detector or Detector()
        self._per_call = Detector([r for r in self.detector.rules if r.meta.kind == "per_call"], self.detector.config)
        self.calls = calls
        self.config = config or LiveConfig()
        self.counters = counters or LiveCounters()
        self._cache: _HistoryCache[GrantHistory] = _HistoryCache(self.config.cache_size)
        self._owned: dict[str, set[str]] = {}  # route -> store keys of calls owned there
        self._deadlines = _Timers()
        self._expiry = _Timers()

    # -- state

    def rebuild(self) -> None:
        self._owned.clear()
        self._deadlines.clear()
        self._expiry.clear()
        for skey, raw in list(self.calls.items()):
            rec = _loads(raw)
            if rec["p"] == self.partition:
                self._index(skey, rec)

    def _index(self, skey: str, rec: dict[str, Any]) -> None:
        self._expiry.push(rec["k"], skey)
        if rec.get("moved") is None:
            self._owned.setdefault(rec["route"], set()).add(skey)
            if not rec["fin"]:
                self._deadlines.push(rec["d"], skey)

    def _unindex_owned(self, skey: str, route: str) -> None:
        members = self._owned.get(route)
        if members is not None:
            members.discard(skey)
            if not members:
                del self._owned[route]

    def _grant_history(self, route: str) -> GrantHistory | None:
        try:
            tenant, principal, agent_id = parse_delegation_key(route)
        except ValueError:
            return None  # a session route: no delegation, no grants
        return self._cache.get(
            route,
            self.grants.get(route),
            lambda raw: decode_grants(raw, tenant, principal, agent_id),
            lambda: GrantHistory(tenant, principal, agent_id),
        )

    def open_calls(self) -> int:
        return sum(map(len, self._owned.values()))

    def advance(self, now: datetime) -> Output:
        """Finalize calls whose deadline has passed and forget closed ones (run on every event)."""
        out = Output()
        now_us = micros(now)
        due: list[tuple[int, str, str, dict[str, Any]]] = []
        for skey in set(self._deadlines.due(now_us)):
            raw = self.calls.get(skey)
            if raw is None:
                continue
            rec = _loads(raw)
            if rec.get("moved") is not None or rec["fin"] or rec["d"] > now_us:
                continue
            due.append((rec["call"]["_t"], rec["call"]["call_id"], skey, rec))
        # Calls that become final together go to the sequence rules in event-time order, as in replay.
        for _t, _cid, skey, rec in sorted(due, key=lambda d: d[:3]):
            out.extend(self._decide(skey, rec, now, "deadline", late=False))
        closed = 0
        for skey in self._expiry.due(now_us):
            raw = self.calls.get(skey)
            if raw is None:
                continue
            rec = _loads(raw)
            if rec["k"] > now_us:
                continue
            del self.calls[skey]
            if rec.get("moved") is None:
                self._unindex_owned(skey, rec["route"])
            closed += 1
        if closed:
            self.counters.add("stage2_calls_closed", closed)
        return out

    # -- events

    def on_message(self, route: str, payload: bytes, now: datetime) -> Output:
        """A message of the internal topic, keyed by ``route``."""
        out = self.advance(now)
        msg = _loads(payload)
        if msg.get("v") != MESSAGE_FORMAT:
            raise ValueError(f"unknown internal message format {msg.get('v')!r}")
        kind = msg["type"]
        if kind == "tick":
            return out
        skey = _store_key(route, msg["ck"])
        raw = self.calls.get(skey)
        rec = None if raw is None else _loads(raw)
        if kind == "handoff":
            out.extend(self._on_handoff(route, skey, rec, msg, now))
            return out
        if kind not in ("call", "update"):
            raise ValueError(f"unknown internal message type {kind!r}")
        if rec is None:
            if kind == "update":
                self.counters.add("stage2_update_for_unknown_call")
                return out
            rec = self._new_record(route, msg)
            self._index(skey, rec)
            self.counters.add("stage2_calls")
            out.extend(self._decide(skey, rec, now, "call", late=False))
            return out
        if rec.get("moved") is not None:
            if msg["q"] > rec["q"]:
                self.counters.add("stage2_forwarded")
                out.forwards.append(Forward(rec["moved"], payload))
            return out
        if msg["q"] <= rec["q"]:
            self.counters.add("stage2_duplicates")
            return out
        rec["attr"], rec["q"] = msg["attr"], msg["q"]
        out.extend(self._reattributed(route, skey, rec, now, late=bool(msg["late"])))
        return out

    def on_fact(self, fact: GrantFact, now: datetime) -> Output:
        out = self.advance(now)
        route = delegation_key(fact.tenant, fact.principal, fact.agent_id)
        history = self._grant_history(route)
        assert history is not None
        if not history.add(fact):
            self.counters.add("stage2_duplicate_facts")
            return out
        history.compact(now - self.config.retention)
        stored = encode_grants(history)
        self.grants[route] = stored
        self._cache.put(route, stored, history)
        self.counters.add("stage2_facts")
        now_us, fact_us = micros(now), micros(fact.event_time)
        for skey in sorted(self._owned.get(route, ())):
            raw = self.calls.get(skey)
            if raw is None:
                continue
            rec = _loads(raw)
            if rec["call"]["_t"] < fact_us or rec["k"] <= now_us:
                continue
            out.extend(self._decide(skey, rec, now, "fact", late=now_us > rec["d"]))
        return out

    # -- internals

    def _new_record(self, route: str, msg: dict[str, Any]) -> dict[str, Any]:
        call = dict(msg["call"])
        call["_t"] = micros(parse_timestamp(call["event_time"]))
        return {
            "p": self.partition,
            "route": route,
            "ck": msg["ck"],
            "call": call,
            "attr": msg["attr"],
            "q": msg["q"],
            "ver": 0,
            "last": None,
            "fin": False,
            "d": msg["d"],
            "k": msg["k"],
            "moved": None,
        }

    def _on_handoff(
        self, route: str, skey: str, rec: dict[str, Any] | None, msg: dict[str, Any], now: datetime
    ) -> Output:
        if rec is not None and msg["q"] <= rec["q"]:
            self.counters.add("stage2_duplicates")
            return Output()
        if rec is not None and rec.get("moved") is None:
            self._unindex_owned(skey, rec["route"])
        new = msg["rec"]
        new.update(p=self.partition, route=route, moved=None)
        self.counters.add("stage2_handoffs_in")
        self._index(skey, new)
        return self._reattributed(route, skey, new, now, late=bool(msg["late"]))

    def _reattributed(self, route: str, skey: str, rec: dict[str, Any], now: datetime, late: bool) -> Output:
        call = rec["call"]
        target = route_for(call["tenant"], call["session_id"], attribution_from_json(rec["attr"]))
        if target == route:
            return self._decide(skey, rec, now, "update", late=late)
        # The call now belongs to another route: hand it over, keep a forwarding record.
        self._unindex_owned(skey, route)
        self.calls[skey] = _dumps({"p": self.partition, "route": route, "moved": target, "q": rec["q"], "k": rec["k"]})
        self.counters.add("stage2_handoffs_out")
        handoff = {"v": MESSAGE_FORMAT, "type": "handoff", "ck": rec["ck"], "q": rec["q"], "late": late, "rec": rec}
        return Output(forwards=[Forward(target, _dumps(handoff))])

    def _decide(self, skey: str, rec: dict[str, Any], now: datetime, reason: Reason, late: bool) -> Output:
        call = unstrip_call({k: v for k, v in rec["call"].items() if k != "_t"})
        attribution = attribution_from_json(rec["attr"])
        grants: list[GrantState] = []
        if not attribution.terminal and attribution.principal is not None and attribution.agent_id is not None:
            history = self._grant_history(rec["route"])
            if history is not None:
                grants = history.grants_at(call.event_time)
        decision = authorize(call, attribution, grants)
        summary = [decision.verdict, decision.matched_grant_id, decision.principal, decision.agent_id]
        now_us = micros(now)
        final = now_us >= rec["d"]
        if rec["ver"] > 0 and summary == rec["last"] and (rec["fin"] or not final):
            if reason == "update":
                self.calls[skey] = _dumps(rec)  # a new attribution version, same verdict: keep the record
            return Output()
        was_final = rec["fin"]
        rec["ver"] += 1
        rec["last"] = summary
        rec["fin"] = final
        self.calls[skey] = _dumps(rec)
        if not final:
            self._deadlines.push(rec["d"], skey)
        kind = "amendment" if was_final else ("final" if final else "provisional")
        self.counters.add(f"evidence_{kind}")
        if late:
            self.counters.add("evidence_late")
        evidence = build_evidence(call, decision, rec["ver"], final, late, now, rec["q"], reason, kind, rec["ck"])
        findings: list[FindingRecord] = []
        if final:
            # Final verdicts go through the rules once; an amendment re-runs the per-call rules only
            # (sequence rules have already counted this call).
            detector = self._per_call if was_final else self.detector
            findings = [f.to_record(now) for f in detector.evaluate(call, decision, grants)]
            self.counters.add("findings", len(findings))
        return Output(evidence=[evidence], findings=findings)


def build_evidence(
    call: ToolCall,
    decision: Decision,
    version: int,
    final: bool,
    late: bool,
    decided_at: datetime,
    attribution_version: int,
    reason: str,
    kind: str,
    ckey: str | None = None,
) -> Evidence:
    facts = dict(decision.facts)
    facts["attribution_version"] = attribution_version
    facts["trigger"] = reason
    facts["kind"] = kind
    return Evidence.model_construct(
        evidence_id=evidence_id_for(call.tenant, call.session_id, call.call_id, version, ckey),
        call_id=call.call_id,
        tenant=call.tenant,
        session_id=call.session_id,
        principal=decision.principal,
        agent_id=decision.agent_id,
        server=call.server,
        tool=call.tool,
        call_time=call.event_time,
        verdict=decision.verdict,
        matched_grant_id=decision.matched_grant_id,
        reasons=list(decision.reasons),
        version=version,
        final=final,
        late=late,
        decided_at=decided_at,
        facts=facts,
    )


def tick_message() -> bytes:
    """A clock tick for a stage-2 partition: lets an idle partition finalize and close calls."""
    return _dumps({"v": MESSAGE_FORMAT, "type": "tick"})
