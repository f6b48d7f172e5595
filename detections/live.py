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

Speed (``bench/profile_decisions.py``): between and inside the stages calls travel as plain JSON
arrays with integer microsecond times; no pydantic model is built until evidence, findings or
rules need one (and then without re-validation); what does not change from call to call is
computed once and shared: the attribution per session state (:attr:`SessionHistory.memo`), the
grant states per interval of time (:meth:`GrantHistory.slot_at`), one compiled regex per grant
pattern list, the part of a decision that depends only on the grants and the tool name (per slot),
the parsed attribution per attribution line (by its digest). Nothing is kept in memory per open
call: objects kept per call for the grace period cost more in garbage collection than parsing the
stored record again at the deadline (measured). (A final call is kept for at most twice
``sequence_slack`` after its deadline, for the sequence rules: see ``Stage2._release``.) Store
writes: one per changed record, never an unchanged value (each write is a changelog message).

Rules: per-call rules run on a call's final verdict at once; sequence rules see final calls
``sequence_slack`` after their deadline, in (event time, call id) order as replay does, so calls of
a delegation that arrive less than the slack apart are counted in event-time order.

Wire and state formats: JSON arrays, one per line (JSON never contains a raw ``\\n``):

* internal message: the head ``[2, kind, call key, attribution version, late, ...,
  attribution digest]`` (``call``: deadline and keep_until before the digest; ``handoff``: the
  owned record's head fields; ``tick``: ``[2, "tick"]``), then for
  ``call``, ``update`` and ``handoff`` the attribution line ``[verdict, principal, agent_id,
  reasons, facts]`` and for ``call`` and ``handoff`` the call line ``[event_id, tenant, call_id,
  session_id, server, tool, resources, transport, event_time_us, attested, tool_digest]`` (the
  event time at millisecond precision, as the canonical timestamp form carries it);
* stage-1 open call: one array (see :data:`_S1_TAG`);
* stage-2 owned call: the head ``["o", partition, route, call key, attribution version, evidence
  version, last summary, final, deadline, keep_until, attribution digest]`` then the attribution
  and call lines as received (stored without re-encoding); forwarding record: ``["m", partition,
  route, call key, attribution version, keep_until, owner route]``. Records in any other form
  (an earlier format) are ignored: they never crash a processor;
* stage-2 sequence record (store ``sequence``, key: route): the sequence rules' state of the
  delegation, each encoded by its rule's versioned codec, and the final calls held for them (see
  :data:`SEQUENCE_FORMAT`, :data:`HELD_FORMAT`); restored by ``Stage2.rebuild``, so a crash or a
  rebalance loses no sequence finding.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import re
import uuid
from collections import OrderedDict, deque
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Generic, Literal, TypeAlias, TypeVar, cast
from urllib.parse import quote

import orjson

from detections.catalog import Detector
from detections.compact import decode_grants, decode_sessions, encode_grants, encode_sessions
from detections.engine import (
    Attribution,
    Decision,
    GrantFact,
    GrantHistory,
    GrantMatch,
    GrantState,
    GrantView,
    SessionFact,
    SessionHistory,
    attribute_identity,
    authorize_matched,
    decision_of,
    evidence_fields,
)
from detections.findings import trusted_model, uuid5_text
from detections.rulebase import StateDecodeError, glob_matcher
from schemas import Evidence, ToolCall, parse_delegation_key, record_hash
from schemas import Finding as FindingRecord

__all__ = [
    "EVIDENCE_NAMESPACE",
    "HELD_FORMAT",
    "SEQUENCE_FORMAT",
    "Forward",
    "LiveConfig",
    "LiveCounters",
    "Output",
    "Stage1",
    "Stage2",
    "build_evidence",
    "call_key",
    "evidence_id_for",
    "route_for",
    "session_key",
    "session_route",
    "tick_message",
]

EVIDENCE_NAMESPACE: Final = uuid.UUID("6f1c2b1e-3c1a-5b7e-9a53-7d5b0c9e2a10")
_EVIDENCE_NS: Final = EVIDENCE_NAMESPACE.bytes
MESSAGE_FORMAT: Final = 2
"""Version of the internal message format (1: the JSON objects of earlier snapshots, not read)."""


@dataclass(frozen=True)
class LiveConfig:
    """Timing of live decisions (all durations on the injected processing clock)."""

    grace: timedelta = timedelta(seconds=15)
    amend_window: timedelta = timedelta(minutes=10)
    retention: timedelta = timedelta(days=7)
    """Facts older than ``now - retention`` that cannot change a newer verdict are compacted."""
    cache_size: int = 4096
    """Decoded histories kept per processor (the stored form is compact bytes)."""
    sequence_slack: timedelta = timedelta(seconds=0.5)
    """How long a final call waits before the sequence rules see it, so that calls finalized a
    little apart reach them in event-time order, as in replay (see :class:`Stage2`)."""

    def __post_init__(self) -> None:
        for name in ("grace", "amend_window", "retention", "sequence_slack"):
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


_new_object: Final = object.__new__
_set_attribute: Final = object.__setattr__


def _output() -> Output:
    """``Output()`` without the dataclass ``__init__`` and its three default factories."""
    out: Output = _new_object(Output)
    _set_attribute(out, "__dict__", {"forwards": [], "evidence": [], "findings": []})
    return out


def _forward(route: str, payload: bytes) -> Forward:
    """``Forward(route, payload)`` without the frozen dataclass's per-field ``object.__setattr__``."""
    fwd: Forward = _new_object(Forward)
    _set_attribute(fwd, "__dict__", {"route": route, "payload": payload})
    return fwd


def _count(counters: LiveCounters, name: str) -> None:
    counts = counters.counts
    counts[name] = counts.get(name, 0) + 1


# ------------------------------------------------------------------------------- time

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO: Final = timedelta(microseconds=1)


def _us(dt: datetime) -> int:
    """Microseconds since the epoch (exact; ``compact.micros``)."""
    return (dt - _EPOCH) // _MICRO


_LAST_NOW: list[Any] = [None, 0]


def _now_us(now: datetime) -> int:
    """:func:`_us` of the processing clock; the same ``now`` is often passed for several events."""
    last = _LAST_NOW
    if now is not last[0]:
        last[1] = (now - _EPOCH) // _MICRO
        last[0] = now
    value: int = last[1]
    return value


_AT_MEMO: Final[dict[int, datetime]] = {}


def _at(us: int) -> datetime:
    """The UTC datetime ``us`` microseconds after the epoch (memoized: calls share their instants)."""
    dt = _AT_MEMO.get(us)
    if dt is None:
        if len(_AT_MEMO) >= 4096:
            _AT_MEMO.clear()
        dt = _AT_MEMO[us] = _EPOCH + timedelta(microseconds=us)
    return dt


# ------------------------------------------------------------------------------- keys

_UNQUOTED: Final = re.compile(r"[A-Za-z0-9_.~-]*").fullmatch


_QUOTED: Final[dict[str, str]] = {}


def _quote(part: str) -> str:
    """``quote(part, safe="")``: parts that need no escaping (the usual) as they are, others memoized."""
    if _UNQUOTED(part):
        return part
    quoted = _QUOTED.get(part)
    if quoted is None:
        if len(_QUOTED) >= 4096:
            _QUOTED.clear()
        quoted = _QUOTED[part] = quote(part, safe="")
    return quoted


def session_key(tenant: str, session_id: str) -> str:
    """Key of a session's history: ``tenant/session_id``, parts percent-encoded (2 parts)."""
    return f"{_quote(tenant)}/{_quote(session_id)}"


session_route = session_key
"""Route of calls whose session names no delegation (2 parts; a delegation key has 3)."""


def call_key(tenant: str, session_id: str, call_id: str) -> str:
    return f"{session_key(tenant, session_id)}/{_quote(call_id)}"


def _route(tenant: str, session_id: str, principal: str | None, agent_id: str | None) -> str:
    if principal is not None and agent_id is not None:
        # schemas.delegation_key(tenant, principal, agent_id), same text
        return f"{_quote(tenant)}/{_quote(principal)}/{_quote(agent_id)}"
    return session_route(tenant, session_id)


def route_for(tenant: str, session_id: str, attribution: Attribution) -> str:
    return _route(tenant, session_id, attribution.principal, attribution.agent_id)


def evidence_id_for(tenant: str, session_id: str, call_id: str, version: int, ckey: str | None = None) -> str:
    """Deterministic: a version re-emitted after a crash has the same id (idempotent sink)."""
    return uuid5_text(_EVIDENCE_NS, f"{ckey or call_key(tenant, session_id, call_id)}#{version}")


# -------------------------------------------------------------------------- patterns


def _matchers(view: GrantView) -> tuple[Callable[[str], object], Callable[[str], object] | None]:
    """The compiled tests of a grant version's tool and resource patterns (kept on the view)."""
    tools = view.tools_match
    if tools is None:
        version = view.version
        tools = view.tools_match = glob_matcher(tuple(version.tools))
        view.resources_match = glob_matcher(tuple(version.resources)) if version.resources else None
    return tools, view.resources_match


# ------------------------------------------------------------------- serialisation


_orjson_dumps: Final = orjson.dumps


def _dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # e.g. an integer beyond 64 bits in attested claims
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def _parse_list(data: bytes, tag: str, size: int) -> list[Any] | None:
    """A stored JSON array with ``tag`` first and ``size`` items; None for anything else (old formats)."""
    try:
        value = orjson.loads(data)
    except ValueError:
        return None
    if type(value) is not list or len(value) != size or value[0] != tag:
        return None
    return value


_EVIDENCE_FIELDS: Final = set(Evidence.model_fields)
_CALL_FIELDS_SET: Final = set(ToolCall.model_fields) - {"event_type", "collector"}
"""What ``model_construct`` records as set for the stripped call of earlier snapshots (all but defaults)."""


def _evidence(
    tenant: str,
    session_id: str,
    call_id: str,
    server: str,
    tool: str,
    call_time: datetime,
    decision: Decision,
    version: int,
    final: bool,
    late: bool,
    decided_at: datetime,
    attribution_version: int,
    reason: str,
    kind: str,
    ckey: str | None,
) -> Evidence:
    fact_ids, fact_hashes = fact_refs(decision.facts)
    values: dict[str, object] = {
        "evidence_id": evidence_id_for(tenant, session_id, call_id, version, ckey),
        "call_id": call_id,
        "tenant": tenant,
        "session_id": session_id,
        "principal": decision.principal,
        "agent_id": decision.agent_id,
        "server": server,
        "tool": tool,
        "call_time": call_time,
        "verdict": decision.verdict,
        "matched_grant_id": decision.matched_grant_id,
        "reasons": list(decision.reasons),
        "version": version,
        "final": final,
        "late": late,
        "decided_at": decided_at,
        "facts": {},
        "fact_ids": fact_ids,
        "fact_hashes": fact_hashes,
        "kind": kind,
        "trigger": reason,
        **evidence_fields(decision),
    }
    return trusted_model(Evidence, values, {}, _EVIDENCE_FIELDS.copy())


def fact_refs(facts: Mapping[str, object]) -> tuple[list[str], list[str]]:
    """The facts a decision rests on, as references: (event ids, record hashes), in decision order.

    The session's deciding fact, then the binding it closed (an ended session), then per grant
    considered its version and the revocation that applied. A hash the history does not know (a
    fact stored in live state before hashes were kept) is ``""``. The raw tables hold the facts
    themselves by event_id, with the same hash in ``_record_hash``.
    """
    ids: list[str] = []
    hashes: list[str] = []
    session = facts.get("session")
    if isinstance(session, dict):
        deciding = session.get("event_id")
        if isinstance(deciding, str):
            ids.append(deciding)
            hashes.append(str(session.get("event_hash") or ""))
            binding = session.get("binding_event_id")
            if isinstance(binding, str) and binding != deciding:
                ids.append(binding)
                hashes.append(str(session.get("binding_hash") or ""))
    grants = facts.get("grants")
    if isinstance(grants, list):
        for g in grants:
            ids.append(g["version_event_id"])
            hashes.append(str(g.get("version_hash") or ""))
            revocation = g.get("revocation_event_id")
            if revocation is not None:
                ids.append(revocation)
                hashes.append(str(g.get("revocation_hash") or ""))
    return ids, hashes


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
    return _evidence(
        call.tenant,
        call.session_id,
        call.call_id,
        call.server,
        call.tool,
        call.event_time,
        decision,
        version,
        final,
        late,
        decided_at,
        attribution_version,
        reason,
        kind,
        ckey,
    )


# ------------------------------------------------------------------------------ cache

H = TypeVar("H", SessionHistory, GrantHistory)


class _HistoryCache(Generic[H]):
    """Decoded histories by store key, valid while the stored bytes object is the same."""

    def __init__(self, size: int) -> None:
        self._size = size
        self._entries: OrderedDict[str, tuple[bytes, H]] = OrderedDict()

    def hit(self, key: str, stored: bytes) -> H | None:
        """The history decoded from ``stored`` if it is cached (the usual case), else None."""
        hit = self._entries.get(key)
        if hit is not None and hit[0] is stored:
            self._entries.move_to_end(key)
            return hit[1]
        return None

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


_heappush: Final = heapq.heappush
_heappop: Final = heapq.heappop


def _due(heap: list[tuple[int, str]], now_us: int) -> Iterator[str]:
    """Pop the keys of a min-heap of (instant, key) due at ``now_us`` (lazy deletion: callers re-check)."""
    while heap and heap[0][0] <= now_us:
        yield _heappop(heap)[1]


# ----------------------------------------------------------------------------- stage 1

_S1_TAG: Final = "s1"
"""Stage-1 open call: ``["s1", partition, event_time_us, attested identity claims, attribution
version, attribution digest, first route, deadline, keep_until]`` (the call key names the session)."""
_S1_SIZE: Final = 9
_P1, _T, _ATT, _Q, _H, _R, _D, _K = range(1, 9)

_CLAIMS: Final = ("sub", "client_id")


def _time_or_none(value: datetime | None) -> int | None:
    return None if value is None else _us(value)


class _Attributed:
    """An attribution as stage 1 forwards it: the attribution line, its digest and its route."""

    __slots__ = ("digest", "line", "route")

    def __init__(self, a: Attribution, tenant: str, session_id: str) -> None:
        self.line: Final = _dumps([a.verdict, a.principal, a.agent_id, list(a.reasons), a.facts])
        s = a.session  # `at` is the call's event time: the same for every attribution of one call
        session = [s.status, s.valid, s.event_id, _time_or_none(s.event_time), s.binding_event_id]
        session += [s.principal, s.agent_id, _time_or_none(s.valid_from), _time_or_none(s.valid_until)]
        self.digest: Final = hashlib.blake2b(_dumps(session) + b"\n" + self.line, digest_size=12).hexdigest()
        self.route: Final = _route(tenant, session_id, a.principal, a.agent_id)


_MEMO_LIMIT: Final = 256


def _attributed(history: SessionHistory, t: datetime, attested: dict[str, Any] | None) -> _Attributed:
    """:func:`~detections.engine.attribute` at ``t`` for a call with these attested claims, memoized
    per session state: it depends on t only through :meth:`SessionHistory.state_key` (bound sessions)."""
    n, valid, early = history.state_key(t)
    key = None
    if n:
        sub = client_id = None
        if attested:
            sub, client_id = attested.get("sub"), attested.get("client_id")
        if (sub is None or type(sub) is str) and (client_id is None or type(client_id) is str):
            key = (n, valid, early, sub, client_id)
            hit: _Attributed | None = history.memo.get(key)
            if hit is not None:
                return hit
    sid = history.session_id
    found = _Attributed(attribute_identity(sid, attested, history.state_at(t)), history.tenant, sid)
    if key is not None:
        if len(history.memo) >= _MEMO_LIMIT:
            history.memo.clear()
        history.memo[key] = found
    return found


class Stage1:
    """Attribution for one partition of the session-keyed topics.

    ``sessions``: session key -> compact session history. ``calls``: call key -> open-call record
    (partition, ids, event time, attested identity claims, attribution version and digest, first
    route, deadline, keep-until; see :data:`_S1_TAG`).
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
        self._expiry: list[tuple[int, str]] = []  # (keep_until, call key), min-heap
        self._grace_us = self.config.grace // _MICRO
        self._amend_us = self.config.amend_window // _MICRO

    # -- state

    def rebuild(self) -> None:
        """Rebuild the in-memory index from ``calls`` (after recovery or a rebalance)."""
        self._open.clear()
        self._expiry.clear()
        for ckey, raw in list(self.calls.items()):
            rec = _parse_list(raw, _S1_TAG, _S1_SIZE)
            if rec is not None and rec[_P1] == self.partition:
                self._index(ckey, rec[_K], ckey.rpartition("/")[0])

    def _index(self, ckey: str, keep_until: int, skey: str) -> None:
        members = self._open.get(skey)
        if members is None:
            members = self._open[skey] = set()
        members.add(ckey)
        _heappush(self._expiry, (keep_until, ckey))

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
        return self._sweep(_now_us(now))

    def _sweep(self, now_us: int) -> int:
        dropped = 0
        # Each open record has exactly one heap entry, pushed with its keep_until (which never
        # changes), so a due entry needs no look at the record itself.
        for ckey in _due(self._expiry, now_us):
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
        now_us = _now_us(now)
        if self._expiry and self._expiry[0][0] <= now_us:
            self._sweep(now_us)
        out = _output()
        tenant, session_id, call_id = call.tenant, call.session_id, call.call_id
        skey = f"{_quote(tenant)}/{_quote(session_id)}"  # session_key
        ckey = f"{skey}/{_quote(call_id)}"  # call_key
        t = call.event_time
        t_us = (t - _EPOCH) // _MICRO
        attested = call.attested
        attributed = _attributed(self._history(skey, tenant, session_id), t, attested)
        raw = self.calls.get(ckey)
        rec = None if raw is None else _parse_list(raw, _S1_TAG, _S1_SIZE)
        counts = self.counters.counts
        if rec is not None:
            # Delivered again (at-least-once): send it again so a lost forward is repaired; stage 2
            # ignores it if it already has this attribution version.
            counts["stage1_duplicate_calls"] = counts.get("stage1_duplicate_calls", 0) + 1
            if rec[_H] != attributed.digest:
                rec[_Q], rec[_H] = rec[_Q] + 1, attributed.digest
                self.calls[ckey] = _dumps(rec)
        else:
            deadline = now_us + self._grace_us
            rec = [
                _S1_TAG,
                self.partition,
                t_us,
                None if attested is None else {k: attested[k] for k in _CLAIMS if k in attested},
                1,
                attributed.digest,
                attributed.route,
                deadline,
                deadline + self._amend_us,
            ]
            self.calls[ckey] = _dumps(rec)
            self._index(ckey, rec[_K], skey)
            counts["stage1_calls"] = counts.get("stage1_calls", 0) + 1
        head = _orjson_dumps([MESSAGE_FORMAT, "call", ckey, rec[_Q], False, rec[_D], rec[_K], attributed.digest])
        line = _dumps(
            [
                call.event_id,
                tenant,
                call_id,
                session_id,
                call.server,
                call.tool,
                call.resources,
                call.transport,
                t_us - t_us % 1000,  # milliseconds, as the canonical timestamp form carries them
                attested,
                call.tool_digest,
            ]
        )
        out.forwards.append(_forward(rec[_R], b"\n".join((head, attributed.line, line))))
        return out

    def on_fact(self, fact: SessionFact, now: datetime) -> Output:
        now_us = _now_us(now)
        self._sweep(now_us)
        out = _output()
        skey = session_key(fact.tenant, fact.session_id)
        history = self._history(skey, fact.tenant, fact.session_id)
        if not history.add(fact, record_hash(fact)):
            self.counters.add("stage1_duplicate_facts")
            return out
        history.compact(now - self.config.retention)
        stored = self.sessions.get(skey)
        encoded = encode_sessions(history)
        if encoded != stored:  # a fact compacted away at once changes nothing: no store write
            stored = self.sessions[skey] = encoded
        assert stored is not None
        self._cache.put(skey, stored, history)
        self.counters.add("stage1_facts")
        fact_us = _us(fact.event_time)
        for ckey in sorted(self._open.get(skey, ())):
            raw = self.calls.get(ckey)
            rec = None if raw is None else _parse_list(raw, _S1_TAG, _S1_SIZE)
            if rec is None:
                continue
            if rec[_T] < fact_us or rec[_K] <= now_us:
                continue  # a fact only affects calls at or after its event_time
            attributed = _attributed(history, _at(rec[_T]), rec[_ATT])
            if attributed.digest == rec[_H]:
                continue
            rec[_Q], rec[_H] = rec[_Q] + 1, attributed.digest
            self.calls[ckey] = _dumps(rec)
            late = now_us > rec[_D]
            self.counters.add("stage1_reattributions_late" if late else "stage1_reattributions")
            head = _dumps([MESSAGE_FORMAT, "update", ckey, rec[_Q], late, attributed.digest])
            out.forwards.append(_forward(rec[_R], head + b"\n" + attributed.line))
        return out


# ----------------------------------------------------------------------------- stage 2

Reason = Literal["call", "update", "handoff", "fact", "deadline"]

_OWNED: Final = "o"
_MOVED: Final = "m"
_OWNED_SIZE: Final = 11
_MOVED_SIZE: Final = 7
_MEMO_SIZE: Final = 8192
"""Parsed attribution lines kept per stage-2 processor (one per session state, shared by its calls)."""
_SLOT_MEMO_SIZE: Final = 1024


class _Owned:
    """A call owned by this route, as stored: the head fields and the attribution and call lines."""

    __slots__ = (
        "_call",
        "attribution_line",
        "call_line",
        "ck",
        "d",
        "digest",
        "fin",
        "k",
        "last",
        "p",
        "q",
        "route",
        "ver",
    )

    def __init__(self, head: list[Any], attribution_line: bytes, call_line: bytes) -> None:
        _tag, self.p, self.route, self.ck, self.q, self.ver, last, self.fin, self.d, self.k, self.digest = head
        self.last: tuple[Any, ...] | None = None if last is None else tuple(last)
        self.attribution_line = attribution_line
        self.call_line = call_line
        self._call: list[Any] | None = None

    @property
    def call(self) -> list[Any]:
        """The call line: ``[event_id, tenant, call_id, session_id, server, tool, resources, transport,
        event_time_us, attested, tool_digest]``."""
        call = self._call
        if call is None:
            call = self._call = orjson.loads(self.call_line)
        return call

    def encode(self) -> bytes:
        head = [_OWNED, self.p, self.route, self.ck, self.q, self.ver, self.last, self.fin, self.d, self.k, self.digest]
        return b"\n".join((_orjson_dumps(head), self.attribution_line, self.call_line))  # plain values only


class _Moved:
    """A forwarding record: the call is owned by route ``moved`` now."""

    __slots__ = ("k", "moved", "q")

    def __init__(self, head: list[Any]) -> None:
        self.q, self.k, self.moved = head[4], head[5], head[6]


def _parse_record(raw: bytes) -> _Owned | _Moved | None:
    parts = raw.split(b"\n")
    if len(parts) == 3:
        head = _parse_list(parts[0], _OWNED, _OWNED_SIZE)
        return None if head is None else _Owned(head, parts[1], parts[2])
    if len(parts) == 1:
        head = _parse_list(raw, _MOVED, _MOVED_SIZE)
        return None if head is None else _Moved(head)
    return None


def _parse_head(raw: bytes) -> list[Any] | None:
    end = raw.find(b"\n")
    if end < 0:
        return _parse_list(raw, _MOVED, _MOVED_SIZE)
    return _parse_list(raw[:end], _OWNED, _OWNED_SIZE)


_Body: TypeAlias = tuple[Any, str | None, tuple[str, ...], tuple[dict[str, object], ...]]
"""(verdict, matched_grant_id, reasons, per-grant facts) of a decision :func:`decision_of` remakes."""
_GrantPart: TypeAlias = tuple[Any, str | None, tuple[str, ...], tuple[dict[str, object], ...]]
"""A :data:`_Body` without the attribution's reasons: what one grants slot gives one tool name."""


class _Attribution:
    """An attribution line, parsed once per stage-2 processor and shared by the calls that carry it."""

    __slots__ = ("agent_id", "body", "facts", "line", "principal", "reasons", "terminal")

    def __init__(self, line: bytes) -> None:
        terminal, principal, agent_id, reasons, facts = orjson.loads(line)
        self.line: Final = line
        self.terminal: Final = terminal
        self.principal: Final[str | None] = principal
        self.agent_id: Final[str | None] = agent_id
        self.reasons: Final[tuple[str, ...]] = tuple(reasons)
        self.facts: Final[dict[str, object]] = facts
        self.body: Final[_Body | None] = None if terminal is None else (terminal, None, self.reasons, ())
        """A terminal attribution is the decision, whatever the instant (``as_of`` aside)."""


def _remake(t: datetime, body: _Body, a: _Attribution) -> Decision:
    verdict, matched, reasons, grant_facts = body
    return decision_of(t, verdict, matched, reasons, a.principal, a.agent_id, a.facts, grant_facts)


def _tool_call(c: list[Any], t: datetime) -> ToolCall:
    """The call as rules read it (what stage 2 has of it: no arguments, no claimed hints)."""
    values = {
        "event_type": "tool_call",
        "event_id": c[0],
        "event_time": t,
        "tenant": c[1],
        "collector": None,
        "call_id": c[2],
        "session_id": c[3],
        "server": c[4],
        "tool": c[5],
        "arguments": {},
        "resources": c[6],
        "transport": c[7],
        "attested": c[9],
        "claimed": {},
        "tool_digest": c[10],
    }
    return trusted_model(ToolCall, values, {}, _CALL_FIELDS_SET.copy())


class _GrantsAt(Mapping[str, GrantState]):
    """The grant states a decision used, by grant id; each is built when a rule first asks for it."""

    __slots__ = ("_at", "_states", "_views")

    def __init__(self, views: Sequence[tuple[GrantView, Any]], at: datetime) -> None:
        self._views = views
        self._at = at
        self._states: dict[str, GrantState] = {}

    def __getitem__(self, grant_id: str) -> GrantState:
        state = self._states.get(grant_id)
        if state is None:
            for view, revocation in self._views:
                if view.grant_id == grant_id:
                    # GrantState(at=..., version=..., revocation=...), as the frozen dataclass builds it
                    state = _new_object(GrantState)
                    _set_attribute(
                        state, "__dict__", {"at": self._at, "version": view.version, "revocation": revocation}
                    )
                    self._states[grant_id] = state
                    break
            else:
                raise KeyError(grant_id)
        return state

    def get(self, grant_id: str, default: Any = None) -> Any:
        try:
            return self[grant_id]
        except KeyError:
            return default

    def __iter__(self) -> Iterator[str]:
        return iter([view.grant_id for view, _ in self._views])

    def __len__(self) -> int:
        return len(self._views)


def _message(payload: bytes) -> tuple[list[Any], list[bytes]]:
    parts = payload.split(b"\n")
    head = orjson.loads(parts[0])
    if type(head) is not list or not head or head[0] != MESSAGE_FORMAT:
        version = head.get("v") if isinstance(head, dict) else head[0] if type(head) is list and head else None
        raise ValueError(f"unknown internal message format {version!r}")
    kind = head[1] if len(head) > 1 else None
    shape = _MESSAGE_SHAPES.get(kind) if type(kind) is str else None
    if shape is None:
        raise ValueError(f"unknown internal message type {kind!r}")
    if len(head) != shape[0] or len(parts) != shape[1]:
        raise ValueError(f"malformed internal message of type {kind!r}")
    return head, parts


_MESSAGE_SHAPES: Final = {"tick": (2, 1), "call": (8, 3), "update": (6, 2), "handoff": (11, 3)}
"""Items of the head and lines of each kind of internal message."""
_EVIDENCE_COUNTER: Final = {k: f"evidence_{k}" for k in ("amendment", "final", "provisional")}


class Stage2:
    """Authorization, evidence versions and finality for one partition of the route-keyed topics.

    ``grants``: delegation key -> compact grant history. ``calls``: ``route|call key`` -> either an
    owned call (attribution and its version, last emitted summary and version, finality, deadline,
    keep-until, the call) or a forwarding record (the route that owns it now). ``sequence``: route
    -> the sequence rules' state of that delegation and the final calls held for them (see
    :data:`SEQUENCE_FORMAT`), so that a crash or a rebalance loses no sequence finding.

    Sequence records are written by :meth:`flush`: after each event, or, with ``deferred``, only
    when the caller calls it (the job: once per batch, just before the stores are drained, so a
    delegation with many calls in a batch costs one encoding and one changelog message).
    """

    def __init__(
        self,
        partition: int,
        grants: MutableMapping[str, bytes],
        calls: MutableMapping[str, bytes],
        config: LiveConfig | None = None,
        counters: LiveCounters | None = None,
        detector: Detector | None = None,
        *,
        sequence: MutableMapping[str, bytes] | None = None,
        deferred: bool = False,
    ) -> None:
        self.partition = partition
        self.grants = grants
        self.detector = detector if detector is not None else Detector()  # (an empty Detector is falsy: len 0)
        rules, rule_config = self.detector.rules, self.detector.config
        self._per_call = Detector([r for r in rules if r.meta.kind == "per_call"], rule_config)
        self._sequence = Detector(
            [r for r in rules if r.meta.kind != "per_call"], rule_config, on_evict=self._seq_states_changed
        )
        # Final calls waiting for the sequence rules: a min-heap by (event time, call id), and
        # their release instants in the order they came (deadline order), see _release.
        # (event time, call id, hold number, release instant, call, decision, grant states, delegation key)
        self._held: list[_Held] = []
        self._held_order: deque[tuple[int, int]] = deque()  # (release instant, hold number)
        self._held_out: set[int] = set()  # hold numbers released before their turn in _held_order
        self._holds = 0
        self.sequence: MutableMapping[str, bytes] = {} if sequence is None else sequence
        self._deferred = deferred
        # What the sequence records hold: per delegation key, its held calls as stored (hold number
        # -> release instant, attribution digest, attribution line, call line); the keys changed
        # since the last flush, and those of them whose rule states changed (else the encoded
        # states are taken from the stored record as they are).
        self._seq_held: dict[tuple[str, ...], dict[int, tuple[int, str, bytes, bytes]]] = {}
        self._seq_dirty: set[tuple[str, ...]] = set()
        self._seq_states: set[tuple[str, ...]] = set()
        self._seq_rule_ids: Final = [r.id for r in self._sequence.sequence_rules]
        self.calls = calls
        self.config = config or LiveConfig()
        self._slack_us = self.config.sequence_slack // _MICRO
        self.counters = counters or LiveCounters()
        self._cache: _HistoryCache[GrantHistory] = _HistoryCache(self.config.cache_size)
        self._owned: dict[str, set[str]] = {}  # route -> store keys of calls owned there
        self._deadlines: list[tuple[int, str]] = []  # (deadline, store key) of owned calls not final
        self._expiry: list[tuple[int, str]] = []  # (keep_until, store key)
        self._attributions: dict[str, _Attribution] = {}  # attribution digest -> parsed line

    # -- state

    def rebuild(self) -> None:
        """Rebuild the in-memory indexes from the stores (after recovery or a rebalance): the owned
        calls' deadlines and expiry, the sequence rules' state and the calls held for them."""
        self._owned.clear()
        self._deadlines.clear()
        self._expiry.clear()
        for skey, raw in list(self.calls.items()):
            head = _parse_head(raw)
            if head is None or head[1] != self.partition:
                continue
            if head[0] == _MOVED:
                _heappush(self._expiry, (head[5], skey))
            else:
                self._index(skey, head[2], head[7], head[8], head[9])
        self._rebuild_sequence()

    def _seq_states_changed(self, key: tuple[str, ...]) -> None:
        self._seq_dirty.add(key)
        self._seq_states.add(key)

    def flush(self) -> None:
        """Write the sequence record of every delegation whose rule state or held calls changed since
        the last flush (one store write per changed record; a delegation with nothing left is deleted)."""
        dirty = self._seq_dirty
        if not dirty:
            return
        states = self._seq_states
        self._seq_dirty, self._seq_states = set(), set()
        store = self.sequence
        for key in dirty:
            route = _key_route(key)
            value = self._encode_sequence(key, route, key in states)
            if value is None:
                if route in store:
                    del store[route]
            elif store.get(route) != value:
                store[route] = value

    def _encode_sequence(self, key: tuple[str, ...], route: str, states_changed: bool) -> bytes | None:
        slots = self._sequence.slots(key)
        held = self._seq_held.get(key)
        if slots is None and not held:
            return None
        rules = self._sequence.sequence_rules if slots is not None else ()
        rule_ids = self._seq_rule_ids if slots is not None else []
        head = [_SEQ, SEQUENCE_FORMAT, self.partition, list(key), rule_ids, len(held) if held else 0]
        lines = [_orjson_dumps(head)]
        if slots is not None:
            stored = None if states_changed else self.sequence.get(route)
            kept = None if stored is None else stored.split(b"\n", len(rules) + 1)
            if kept is not None and len(kept) > len(rules) and kept[0].startswith(self._seq_head_prefix(key)):
                lines.extend(kept[1 : len(rules) + 1])  # only the held calls changed: the states as stored
            else:
                lines.extend([r.codec.encode(slots[r.id]) for r in rules])  # type: ignore[union-attr]
        if held:
            for release, digest, attribution_line, call_line in held.values():
                lines.append(_orjson_dumps([_HELD, HELD_FORMAT, release, digest]))
                lines.append(attribution_line)
                lines.append(call_line)
        return b"\n".join(lines)

    def _seq_head_prefix(self, key: tuple[str, ...]) -> bytes:
        """How a record of ``key`` with every rule's state starts (its held-call count follows)."""
        return _orjson_dumps([_SEQ, SEQUENCE_FORMAT, self.partition, list(key), self._seq_rule_ids])[:-1] + b","

    def _rebuild_sequence(self) -> None:
        self._sequence.clear()
        self._held.clear()
        self._held_order.clear()
        self._held_out.clear()
        self._seq_held.clear()
        self._seq_dirty.clear()
        self._seq_states.clear()
        rules = {r.id: r for r in self._sequence.sequence_rules}
        config = self._sequence.config
        counts = self.counters.counts
        restored: list[tuple[int, int, str, str, str, bytes, bytes]] = []
        rewrite: set[tuple[str, ...]] = set()  # records read only in part: written again in full
        for route, raw in list(self.sequence.items()):
            lines = raw.split(b"\n")
            try:
                head = orjson.loads(lines[0])
            except ValueError:
                head = None
            if type(head) is not list or len(head) != 6 or head[0] != _SEQ:
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
            if rule_ids and rule_ids != self._seq_rule_ids:
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
                self._sequence.restore(key, slots)
            at = 1 + len(rule_ids)
            for _ in range(n_held):
                held_head, attribution_line, call_line = lines[at : at + 3]
                at += 3
                try:
                    h = orjson.loads(held_head)
                except ValueError:
                    h = None
                if type(h) is not list or len(h) < 2 or h[0] != _HELD:
                    counts["sequence_held_malformed"] = counts.get("sequence_held_malformed", 0) + 1
                    rewrite.add(key)
                    continue
                if h[1] != HELD_FORMAT or len(h) != 4:
                    counts["sequence_held_unknown_version"] = counts.get("sequence_held_unknown_version", 0) + 1
                    rewrite.add(key)
                    continue
                try:
                    call = orjson.loads(call_line)
                    restored.append((h[2], call[8], call[2], route, h[3], attribution_line, call_line))
                except (ValueError, TypeError, IndexError, KeyError):
                    counts["sequence_held_malformed"] = counts.get("sequence_held_malformed", 0) + 1
                    rewrite.add(key)
        # Held calls go back in the order they were held (release instant), and decided again from
        # their stored attribution and call lines with this route's grants (what the decision at the
        # deadline used: only a fact after the deadline, an amendment, can make it differ).
        restored.sort(key=lambda h: h[:3])
        for release, _t, _cid, route, digest, attribution_line, call_line in restored:
            try:
                call = orjson.loads(call_line)
                t = _at(call[8])
                decision, used = self._decision(route, self._attribution(digest, attribution_line), call, t)
                self._hold(
                    _tool_call(call, t), decision, _GrantsAt(used, t), release, digest, attribution_line, call_line
                )
            except (ValueError, TypeError, IndexError, KeyError):
                counts["sequence_held_malformed"] = counts.get("sequence_held_malformed", 0) + 1
        counts["sequence_held_restored"] = counts.get("sequence_held_restored", 0) + len(self._held)
        self._seq_dirty.clear()  # what was just read is what is stored, except:
        self._seq_states.clear()
        for key in rewrite:  # records read in part: written again from what could be read
            self._seq_states_changed(key)

    def _index(self, skey: str, route: str, fin: bool, deadline: int, keep_until: int) -> None:
        # One deadline entry per owned call that is not final: it stays not final until that
        # deadline, which finalizes it (amendments keep it final), so no other push is needed.
        _heappush(self._expiry, (keep_until, skey))
        members = self._owned.get(route)
        if members is None:
            members = self._owned[route] = set()
        members.add(skey)
        if not fin:
            _heappush(self._deadlines, (deadline, skey))

    def _unindex_owned(self, skey: str, route: str) -> None:
        members = self._owned.get(route)
        if members is not None:
            members.discard(skey)
            if not members:
                del self._owned[route]

    def _record(self, skey: str) -> _Owned | _Moved | None:
        raw = self.calls.get(skey)
        return None if raw is None else _parse_record(raw)

    def _attribution(self, digest: str, line: bytes) -> _Attribution:
        """The parsed attribution line (memoized by its digest, checked against the line itself)."""
        found = self._attributions.get(digest)
        if found is None or found.line != line:
            if len(self._attributions) >= _MEMO_SIZE:
                self._attributions.clear()
            found = self._attributions[digest] = _Attribution(line)
        return found

    def _grant_history(self, route: str, stored: bytes) -> GrantHistory:
        hit = self._cache.hit(route, stored)
        if hit is not None:
            return hit

        def decode(raw: bytes) -> GrantHistory:
            return decode_grants(raw, *parse_delegation_key(route))

        return self._cache.get(route, stored, decode, _no_history)

    def open_calls(self) -> int:
        return sum(map(len, self._owned.values()))

    def held_calls(self) -> int:
        """Final calls the sequence rules have not seen yet (at most ``sequence_slack`` old)."""
        return len(self._held)

    def advance(self, now: datetime) -> Output:
        """Finalize calls whose deadline has passed and forget closed ones (run on every event)."""
        out = _output()
        self._advance(now, _now_us(now), out)
        if self._seq_dirty and not self._deferred:
            self.flush()
        return out

    def _advance(self, now: datetime, now_us: int, out: Output) -> None:
        self._advance_calls(now, now_us, out)
        if self._held:
            self._release(now, now_us, out)

    def _hold(
        self,
        call: ToolCall,
        decision: Decision,
        grants: Mapping[str, GrantState],
        release: int,
        digest: str,
        attribution_line: bytes,
        call_line: bytes,
    ) -> None:
        self._holds += 1
        number = self._holds
        if decision.principal is not None and decision.agent_id is not None:  # delegation_key(call, decision)
            key: tuple[str, ...] = (call.tenant, decision.principal, decision.agent_id)
        else:
            key = (call.tenant, f"session:{call.session_id}")
        _heappush(self._held, (_now_us(call.event_time), call.call_id, number, release, call, decision, grants, key))
        self._held_order.append((release, number))
        stored = self._seq_held.get(key)
        if stored is None:
            stored = self._seq_held[key] = {}
        stored[number] = (release, digest, attribution_line, call_line)
        self._seq_dirty.add(key)

    def _release(self, now: datetime, now_us: int, out: Output) -> None:
        """Run the sequence rules over held calls, in (event time, call id) order.

        A call is held from its finalization until ``sequence_slack`` after its deadline. The call
        with the earliest event time goes first once its own hold is over, and no held call waits
        more than ``sequence_slack`` beyond its own: when the longest-held one is due, calls go in
        event-time order until it is out. So two calls of a delegation reach the rules in
        event-time order (as in replay) unless they arrived more than ``sequence_slack`` apart.
        """
        held, order, gone = self._held, self._held_order, self._held_out
        overdue = now_us - self._slack_us
        counts = self.counters.counts
        while held:
            while order[0][1] in gone:  # every held call has its entry in order, so never empty here
                gone.discard(order.popleft()[1])
            top = held[0]
            if top[3] > now_us and order[0][0] > overdue:
                break
            _heappop(held)
            number, (call, decision, grants, key) = top[2], top[4:]
            gone.add(number)
            found = self._sequence.evaluate_with(call, decision, grants)
            stored = self._seq_held.get(key)
            if stored is not None:
                stored.pop(number, None)
                if not stored:
                    del self._seq_held[key]
            self._seq_dirty.add(key)
            self._seq_states.add(key)
            if found:
                counts["findings"] = counts.get("findings", 0) + len(found)
                out.findings.extend([f.to_record(now) for f in found])
        while order and order[0][1] in gone:
            gone.discard(order.popleft()[1])

    def _advance_calls(self, now: datetime, now_us: int, out: Output) -> None:
        deadlines = self._deadlines
        if deadlines and deadlines[0][0] <= now_us:
            keys = set()
            while deadlines and deadlines[0][0] <= now_us:
                keys.add(_heappop(deadlines)[1])
            due: list[tuple[int, str, str, _Owned]] = []
            for skey in keys:
                rec = self._record(skey)
                if not isinstance(rec, _Owned) or rec.fin or rec.d > now_us:
                    continue
                call = rec.call
                due.append((call[8], call[2], skey, rec))
            # Calls that become final together are decided in event-time order: a deterministic order of
            # their evidence (the sequence rules get them in that order anyway, from _held).
            due.sort(key=lambda d: d[:3])
            for _t, _cid, skey, rec in due:
                self._decide(skey, rec, now, now_us, "deadline", False, out)
        if self._expiry and self._expiry[0][0] <= now_us:
            closed = 0
            for skey in _due(self._expiry, now_us):
                raw = self.calls.get(skey)
                head = None if raw is None else _parse_head(raw)
                if head is None:
                    continue
                moved = head[0] == _MOVED
                if (head[5] if moved else head[9]) > now_us:
                    continue
                del self.calls[skey]
                if not moved:
                    self._unindex_owned(skey, head[2])
                closed += 1
            if closed:
                self.counters.add("stage2_calls_closed", closed)

    # -- events

    def on_message(self, route: str, payload: bytes, now: datetime) -> Output:
        """A message of the internal topic, keyed by ``route``."""
        out = self._on_message(route, payload, now)
        if self._seq_dirty and not self._deferred:
            self.flush()
        return out

    def _on_message(self, route: str, payload: bytes, now: datetime) -> Output:
        out = _output()
        now_us = _now_us(now)
        if (
            (self._deadlines and self._deadlines[0][0] <= now_us)
            or (self._expiry and self._expiry[0][0] <= now_us)
            or self._held
        ):
            self._advance(now, now_us, out)
        head, parts = _message(payload)
        kind = head[1]
        if kind == "tick":
            return out
        skey = f"{route}|{head[2]}"  # "|" is percent-encoded inside both parts
        rec = self._record(skey)
        if kind == "handoff":
            self._on_handoff(route, skey, rec, head, parts, now, now_us, out)
            return out
        if rec is None:
            if kind == "update":
                self.counters.add("stage2_update_for_unknown_call")
                return out
            # a "call" message: [2, "call", call key, q, late, deadline, keep_until, digest]
            _v, _kind, ck, q, _late, d, k, digest = head
            rec = _Owned([_OWNED, self.partition, route, ck, q, 0, None, False, d, k, digest], parts[1], parts[2])
            self._index(skey, route, False, d, k)
            counts = self.counters.counts
            counts["stage2_calls"] = counts.get("stage2_calls", 0) + 1
            self._decide(skey, rec, now, now_us, "call", False, out)
            return out
        if isinstance(rec, _Moved):
            if head[3] > rec.q:
                self.counters.add("stage2_forwarded")
                out.forwards.append(_forward(rec.moved, payload))
            return out
        if head[3] <= rec.q:
            self.counters.add("stage2_duplicates")
            return out
        rec.attribution_line, rec.q, rec.digest = parts[1], head[3], head[-1]
        self._reattributed(route, skey, rec, now, now_us, bool(head[4]), out)
        return out

    def on_fact(self, fact: GrantFact, now: datetime) -> Output:
        out = _output()
        now_us = _now_us(now)
        self._advance(now, now_us, out)
        if self._seq_dirty and not self._deferred:
            self.flush()
        route = _route(fact.tenant, "", fact.principal, fact.agent_id)
        stored = self.grants.get(route)
        if stored is None:
            history = GrantHistory(fact.tenant, fact.principal, fact.agent_id)
        else:
            history = self._grant_history(route, stored)
        if not history.add(fact, record_hash(fact)):
            self.counters.add("stage2_duplicate_facts")
            return out
        history.compact(now - self.config.retention)
        encoded = encode_grants(history)
        if encoded != stored:  # a fact compacted away at once changes nothing: no store write
            stored = self.grants[route] = encoded
        assert stored is not None
        self._cache.put(route, stored, history)
        self.counters.add("stage2_facts")
        fact_us = _us(fact.event_time)
        for skey in sorted(self._owned.get(route, ())):
            rec = self._record(skey)
            if not isinstance(rec, _Owned):
                continue
            if rec.call[8] < fact_us or rec.k <= now_us:
                continue
            self._decide(skey, rec, now, now_us, "fact", now_us > rec.d, out)
        return out

    # -- internals

    def _on_handoff(
        self,
        route: str,
        skey: str,
        rec: _Owned | _Moved | None,
        head: list[Any],
        parts: list[bytes],
        now: datetime,
        now_us: int,
        out: Output,
    ) -> None:
        if rec is not None and head[3] <= rec.q:
            self.counters.add("stage2_duplicates")
            return
        if isinstance(rec, _Owned):
            self._unindex_owned(skey, rec.route)
        _v, _kind, ck, q, late, ver, last, fin, d, k, digest = head
        new = _Owned([_OWNED, self.partition, route, ck, q, ver, last, fin, d, k, digest], parts[1], parts[2])
        self.counters.add("stage2_handoffs_in")
        self._index(skey, route, fin, d, k)
        self._reattributed(route, skey, new, now, now_us, bool(late), out)

    def _reattributed(
        self, route: str, skey: str, rec: _Owned, now: datetime, now_us: int, late: bool, out: Output
    ) -> None:
        call, attribution = rec.call, self._attribution(rec.digest, rec.attribution_line)
        target = _route(call[1], call[3], attribution.principal, attribution.agent_id)
        if target == route:
            self._decide(skey, rec, now, now_us, "update", late, out)
            return
        # The call now belongs to another route: hand it over, keep a forwarding record.
        self._unindex_owned(skey, route)
        self.calls[skey] = _dumps([_MOVED, self.partition, route, rec.ck, rec.q, rec.k, target])
        self.counters.add("stage2_handoffs_out")
        head = [MESSAGE_FORMAT, "handoff", rec.ck, rec.q, late, rec.ver, rec.last, rec.fin, rec.d, rec.k, rec.digest]
        out.forwards.append(_forward(target, b"\n".join((_dumps(head), rec.attribution_line, rec.call_line))))

    def _decision(
        self, route: str, a: _Attribution, call: list[Any], t: datetime
    ) -> tuple[Decision, Sequence[tuple[GrantView, Any]]]:
        """:func:`~detections.engine.authorize` of the call at ``route`` (whose grants count: the
        call's owner's), and the grants it used. Decisions that differ only in the call's instant
        (same attribution, grants slot and tool name, every resource covered) are made once."""
        if a.body is not None:
            return _remake(t, a.body, a), ()
        name = f"{call[4]}/{call[5]}"
        stored = None if a.principal is None or a.agent_id is None else self.grants.get(route)
        if stored is None:  # no grant history
            return authorize_matched(t, call[1], name, None, a.principal, a.agent_id, a.reasons, a.facts, ()), ()
        slot = self._grant_history(route, stored).slot_at(t)
        grants, memo = slot.grants, slot.memo
        tools: tuple[bool, ...] | None = memo.get(name)
        if tools is None:
            if len(memo) >= _SLOT_MEMO_SIZE:  # two entries per tool name
                memo.clear()
            tools = memo[name] = tuple(_matchers(view)[0](name) is not None for view, _r, _s in grants)
        missing: list[list[str]] | None = None
        resources: list[str] = call[6]
        if resources:
            single = resources[0] if len(resources) == 1 else None
            for i, (view, _r, _s) in enumerate(grants):
                within = view.resources_match  # compiled with tools_match (the tools memo above)
                if tools[i] and within is not None:
                    if single is not None:
                        if within(single) is not None:
                            continue
                        outside = [single]
                    else:
                        outside = [r for r in resources if within(r) is None]
                        if not outside:
                            continue
                    if missing is None:
                        missing = [[] for _ in grants]
                    missing[i] = outside
        if missing is None and grants:
            part: _GrantPart | None = memo.get((name,))
            if part is not None:
                return _remake(t, (part[0], part[1], a.reasons + part[2], part[3]), a), slot.pairs
        rows: list[GrantMatch] = [
            (view, revocation, t, tools[i], () if missing is None else missing[i])
            for i, (view, revocation, _status) in enumerate(grants)
        ]
        decision = authorize_matched(t, call[1], name, None, a.principal, a.agent_id, a.reasons, a.facts, rows)
        if missing is None and grants:
            # What depends on the grants and the tool only: verdict, grant, the reasons after the
            # attribution's, the per-grant facts (a verdict with grants never names t).
            grant_facts = tuple(cast(list[dict[str, object]], decision.facts["grants"]))
            memo[(name,)] = (
                decision.verdict,
                decision.matched_grant_id,
                decision.reasons[len(a.reasons) :],
                grant_facts,
            )
        return decision, slot.pairs

    def _decide(
        self, skey: str, rec: _Owned, now: datetime, now_us: int, reason: Reason, late: bool, out: Output
    ) -> None:
        call = rec.call
        t = _at(call[8])
        decision, used = self._decision(rec.route, self._attribution(rec.digest, rec.attribution_line), call, t)
        summary = (decision.verdict, decision.matched_grant_id, decision.principal, decision.agent_id)
        final = now_us >= rec.d
        if rec.ver > 0 and summary == rec.last and (rec.fin or not final):
            if reason == "update":
                self.calls[skey] = rec.encode()  # a new attribution version, same verdict: keep the record
            return
        was_final = rec.fin
        rec.ver += 1
        rec.last = summary
        rec.fin = final
        self.calls[skey] = rec.encode()
        if was_final and not final:  # only if the clock went back: final again at the deadline
            _heappush(self._deadlines, (rec.d, skey))
        kind = "amendment" if was_final else ("final" if final else "provisional")
        counts = self.counters.counts
        name = _EVIDENCE_COUNTER[kind]
        counts[name] = counts.get(name, 0) + 1
        if late:
            counts["evidence_late"] = counts.get("evidence_late", 0) + 1
        out.evidence.append(
            _evidence(
                call[1],
                call[3],
                call[2],
                call[4],
                call[5],
                t,
                decision,
                rec.ver,
                final,
                late,
                now,
                rec.q,
                reason,
                kind,
                rec.ck,
            )
        )
        if final:
            # Final verdicts go through the rules once: the per-call rules now, the sequence rules
            # after the hold (_release); an amendment re-runs the per-call rules only (sequence
            # rules have already counted this call).
            rule_call, grants = _tool_call(call, t), _GrantsAt(used, t)
            if not was_final:
                release = rec.d + self._slack_us
                self._hold(rule_call, decision, grants, release, rec.digest, rec.attribution_line, rec.call_line)
            found = self._per_call.evaluate_with(rule_call, decision, grants)
            counts["findings"] = counts.get("findings", 0) + len(found)
            if found:
                out.findings.extend([f.to_record(now) for f in found])


_Held: TypeAlias = tuple[int, str, int, int, ToolCall, Decision, Mapping[str, GrantState], tuple[str, ...]]

_SEQ: Final = "q"
SEQUENCE_FORMAT: Final = 1
"""Version of a stage-2 sequence record (store ``sequence``, key: the delegation's route), lines:
the head ``["q", 1, partition, delegation key (list), [rule id, ...], held calls]``, then one line
per rule id: that rule's state as its :class:`~detections.rulebase.StateCodec` encodes it (version
tag first), then three lines per held call (:data:`HELD_FORMAT`). A record of another version is
ignored (counted: ``sequence_records_unknown_version``); a rule state of an unknown version starts
afresh (``sequence_state_unknown_version``); nothing of it ever crashes a processor."""
_HELD: Final = "h"
HELD_FORMAT: Final = 1
"""Version of a held call in a sequence record: ``["h", 1, release instant, attribution digest]``,
then the attribution line and the call line as stage 2 stores them for its owned calls. On recovery
the call is decided again from these lines and the route's grants, and held until its release."""


def _key_route(key: tuple[str, ...]) -> str:
    """The route of a :func:`~detections.rulebase.delegation_key` (its sequence record's key)."""
    if len(key) == 3:
        return _route(key[0], "", key[1], key[2])
    return session_route(key[0], key[1][len("session:") :])


def _no_history() -> GrantHistory:  # never called: a route with no stored grants has no history
    raise AssertionError("no stored grant history")


def tick_message() -> bytes:
    """A clock tick for a stage-2 partition: lets an idle partition finalize and close calls."""
    return _dumps([MESSAGE_FORMAT, "tick"])
