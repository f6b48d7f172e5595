"""Stage 2: authorization, evidence versions and finality for one partition of the route-keyed topics
(the internal topic, which stage 1 forwards calls to, and the grants topic)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from datetime import datetime
from fnmatch import fnmatchcase
from typing import Any, Final, Literal, TypeAlias, cast

from detections.approvals import ApprovalHistory
from detections.catalog import Detector
from detections.compact import decode_approvals, decode_grants, encode_approvals, encode_grants
from detections.engine import (
    TERMINAL_VERDICTS,
    Attribution,
    Decision,
    GrantFact,
    GrantHistory,
    GrantMatch,
    GrantState,
    GrantView,
    authorize_delegation,
    authorize_matched,
    decision_of,
    policy_checks,
)
from detections.live.common import (
    MICRO,
    HistoryCache,
    LiveConfig,
    LiveCounters,
    Output,
    incomplete_facts,
    new_forward,
    new_object,
    new_output,
    set_attribute,
)
from detections.live.common import at as _at
from detections.live.common import due as _due
from detections.live.common import heappop as _heappop
from detections.live.common import heappush as _heappush
from detections.live.common import now_us as _now_us
from detections.live.common import us as _us
from detections.live.evidence import make_evidence, tool_call
from detections.live.sequence import SequenceKeeper
from detections.live.wire import (
    AttributionLine,
    Body,
    CallLine,
    Message,
    Moved,
    Owned,
    call_key,
    handoff_message,
    parse_head,
    parse_message,
    parse_record,
    quote_part,
    route_of,
)
from detections.policy import Outcomes, PolicyCheck, PolicyStore, evaluate
from detections.rulebase import glob_matcher
from schemas import ApprovalDecided, GrantIssued, PolicyPublished, ToolCall, parse_delegation_key, record_hash

__all__ = ["Reason", "Stage2"]

Reason = Literal["call", "update", "handoff", "fact", "deadline"]

_MEMO_SIZE: Final = 8192
"""Parsed attribution lines kept per stage-2 processor (one per session state, shared by its calls)."""
_SLOT_MEMO_SIZE: Final = 1024
_AHEAD_SIZE: Final = 65_536
"""Cedar outcomes asked ahead kept at most (a batch's new calls and the calls due with them)."""
_EVIDENCE_COUNTER: Final = {k: f"evidence_{k}" for k in ("amendment", "final", "provisional")}

_GrantPart: TypeAlias = tuple[Any, str | None, tuple[str, ...], tuple[dict[str, object], ...]]
"""A :data:`~detections.live.wire.Body` without the attribution's reasons: what one grants slot
gives one tool name."""


def matchers(view: GrantView) -> tuple[Callable[[str], object], Callable[[str], object] | None]:
    """The compiled tests of a grant version's tool and resource patterns (kept on the view)."""
    tools = view.tools_match
    if tools is None:
        version = view.version
        tools = view.tools_match = glob_matcher(tuple(version.tools))
        view.resources_match = glob_matcher(tuple(version.resources)) if version.resources else None
    return tools, view.resources_match


def remake(t: datetime, body: Body, a: AttributionLine) -> Decision:
    verdict, matched, reasons, grant_facts = body
    return decision_of(t, verdict, matched, reasons, a.principal, a.agent_id, a.facts, grant_facts)


class GrantsAt(Mapping[str, GrantState]):
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
                    state = new_object(GrantState)
                    set_attribute(
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


class Stage2:
    """Authorization, evidence versions and finality for one partition of the route-keyed topics.

    ``grants``: delegation key -> compact grant history. ``calls``: ``route|call key`` -> either an
    owned call (attribution and its version, last emitted summary and version, finality, deadline,
    keep-until, the call) or a forwarding record (the route that owns it now). ``sequence``: route
    -> the sequence rules' state of that delegation and the final calls held for them (see
    :data:`~detections.live.wire.SEQUENCE_FORMAT`), so that a crash or a rebalance loses no sequence finding.

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
        approvals: MutableMapping[str, bytes] | None = None,
        policies: PolicyStore | None = None,
    ) -> None:
        self.partition = partition
        self.grants = grants
        self.approvals: MutableMapping[str, bytes] = {} if approvals is None else approvals
        """Delegation route -> its approvals, compaction horizon and the uses of approvals by calls
        this partition no longer holds (:func:`~detections.compact.encode_approvals`)."""
        self.policies = PolicyStore() if policies is None else policies
        """Every tenant's policies (``consent.policies`` read whole; shared by a worker's partitions)."""
        self.detector = detector if detector is not None else Detector()  # (an empty Detector is falsy: len 0)
        rules, rule_config = self.detector.rules, self.detector.config
        self._per_call = Detector([r for r in rules if r.meta.kind == "per_call"], rule_config, stateless=True)
        self.sequence: MutableMapping[str, bytes] = {} if sequence is None else sequence
        self._deferred = deferred
        self.calls = calls
        self.config = config or LiveConfig()
        self._slack_us = self.config.sequence_slack // MICRO
        self.counters = counters or LiveCounters()
        self.finality_held = False
        """While set, no call becomes final: verdicts are corrected, deadlines wait (the worker sets it
        after an assignment until it has read what its inputs already held)."""
        self.final_horizon_us: int | None = None
        """None, or only calls whose deadline is at most this (µs since the epoch) may become final:
        the latest time up to which every fact on the broker has reached this stage (the worker sets
        it while other workers hold stage-1 partitions, whose updates come through Kafka)."""
        self._seq: Final = SequenceKeeper(
            partition,
            [r for r in rules if r.meta.kind != "per_call"],
            rule_config,
            self.sequence,
            self.counters,
            self._slack_us,
            self._redecide,
        )
        self._cache: HistoryCache[GrantHistory] = HistoryCache(self.config.cache_size)
        self._owned: dict[str, set[str]] = {}  # route -> store keys of calls owned there
        self._deadlines: list[tuple[int, str]] = []  # (deadline, store key) of owned calls not final
        self._expiry: list[tuple[int, str]] = []  # (keep_until, store key)
        self._attributions: dict[str, AttributionLine] = {}  # attribution digest -> parsed line
        self._conditioned: dict[str, tuple[bytes, frozenset[str], tuple[str, ...]]] = {}
        """route -> (stored grants, policy ids, approval tool patterns) of its grant versions."""
        self._groups_judged = 0  # calls judged together so far (their records may have changed)
        self._approval_cache: dict[str, tuple[bytes, tuple[ApprovalHistory, datetime | None, dict[str, str]]]] = {}
        self._ahead = Outcomes()  # Cedar outcomes of the batch's new calls (see prepare)
        self._ahead_calls: dict[bytes, ToolCall] = {}  # call line -> the ToolCall they were asked with

    # -- state

    def rebuild(self) -> None:
        """Rebuild the in-memory indexes from the stores (after recovery or a rebalance): the owned
        calls' deadlines and expiry, the sequence rules' state and the calls held for them."""
        self._owned.clear()
        self._deadlines.clear()
        self._expiry.clear()
        for skey, raw in list(self.calls.items()):
            head = parse_head(raw)
            if head is None or head.partition != self.partition:
                continue
            if isinstance(head, Moved):
                _heappush(self._expiry, (head.keep_until, skey))
            else:
                self._index(skey, head.route, head.final, head.deadline, head.keep_until)
        self._seq.rebuild()

    def flush(self) -> None:
        """Write the sequence record of every delegation whose rule state or held calls changed since
        the last flush (one store write per changed record; a delegation with nothing left is deleted)."""
        self._seq.flush()

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

    def _record(self, skey: str) -> Owned | Moved | None:
        raw = self.calls.get(skey)
        return None if raw is None else parse_record(raw)

    def _attribution(self, digest: str, line: bytes) -> AttributionLine:
        """The parsed attribution line (memoized by its digest, checked against the line itself)."""
        found = self._attributions.get(digest)
        if found is None or found.line != line:
            if len(self._attributions) >= _MEMO_SIZE:
                self._attributions.clear()
            found = self._attributions[digest] = AttributionLine(line)
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

    def due_by(self, limit_us: int, cap: int) -> int:
        """How many owned calls that are not final have a deadline at most ``limit_us``, counted up to
        ``cap`` + 1 (the deadline heap is walked only where its entries are due: O(count))."""
        heap = self._deadlines
        size = len(heap)
        n = 0
        todo = [0] if size else []
        while todo and n <= cap:
            i = todo.pop()
            if heap[i][0] > limit_us:
                continue  # a heap: nothing below this entry is due either
            n += 1
            child = 2 * i + 1
            if child < size:
                todo.append(child)
                if child + 1 < size:
                    todo.append(child + 1)
        return n

    def held_calls(self) -> int:
        """Final calls the sequence rules have not seen yet (at most ``sequence_slack`` old)."""
        return len(self._seq.held)

    def advance(self, now: datetime) -> Output:
        """Finalize calls whose deadline has passed and forget closed ones (run on every event)."""
        out = new_output()
        self._advance(now, _now_us(now), out)
        if self._seq.dirty and not self._deferred:
            self.flush()
        return out

    def _advance(self, now: datetime, now_us: int, out: Output) -> None:
        self._advance_calls(now, now_us, out)
        if self._seq.held:
            self._seq.release(now, now_us, out)

    def _advance_calls(self, now: datetime, now_us: int, out: Output) -> None:
        deadlines = self._deadlines
        horizon = self.final_horizon_us
        limit = now_us if horizon is None or horizon > now_us else horizon
        if deadlines and deadlines[0][0] <= limit and not self.finality_held:
            keys = set()
            while deadlines and deadlines[0][0] <= limit:
                keys.add(_heappop(deadlines)[1])
            due: list[tuple[int, str, str, Owned]] = []
            for skey in keys:
                rec = self._record(skey)
                if not isinstance(rec, Owned) or rec.final or rec.deadline > limit:
                    continue
                call = rec.call
                due.append((call.t, call.call_id, skey, rec))
            # Calls that become final together are decided in event-time order: a deterministic order of
            # their evidence (the sequence rules get them in that order anyway, from the held calls).
            due.sort(key=lambda d: d[:3])
            if len(self.policies):  # their Cedar requests together, not one per call
                self._ask_ahead(
                    [
                        (rec.route, rec.digest, rec.attribution_line, rec.call_line, rec.call)
                        for _t, _cid, _skey, rec in due
                        if self._policy_route(rec.route)
                    ]
                )
            groups = self._groups_judged
            for _t, _cid, skey, rec in due:
                if self._groups_judged != groups:
                    # a call judged with others (approvals) may have finalized this one meanwhile
                    fresh = self._record(skey)
                    if not isinstance(fresh, Owned) or fresh.final:
                        continue
                    rec = fresh
                self._decide(skey, rec, now, now_us, "deadline", False, out)
        if self._expiry and self._expiry[0][0] <= now_us:
            closed = 0
            for skey in _due(self._expiry, now_us):
                raw = self.calls.get(skey)
                head = None if raw is None else parse_head(raw)
                if head is None or head.keep_until > now_us:
                    continue
                del self.calls[skey]
                if isinstance(head, Owned):
                    self._unindex_owned(skey, head.route)
                    last = head.last
                    if last is not None and len(last) > 4 and last[0] == "in_scope" and last[4]:
                        self._record_use(head.route, last[4], head.ckey)
                closed += 1
            if closed:
                self.counters.add("stage2_calls_closed", closed)

    # -- events

    def prepare(self, messages: Sequence[tuple[str, bytes]]) -> None:
        """Ask Cedar ahead for the batch of internal messages about to be handled (``(route,
        payload)``, in order): the new calls whose route's grants name policies, their requests
        evaluated together (one ``is_authorized_batch`` per delegation and policy set, instead of
        one per call as each call is decided). Nothing else changes: the messages are then handled
        one by one as before, and a decision takes an outcome from here only for the same check with
        the same policy versions (:class:`~detections.policy.Outcomes`). Routes without policies
        cost a store lookup; a message that does not parse is left to :meth:`on_message`."""
        self._ahead.clear()
        self._ahead_calls.clear()
        if not len(self.policies):
            return
        wanted: list[tuple[str, str, bytes, bytes, CallLine | None]] = []
        for route, payload in messages:
            if self._policy_route(route):
                try:
                    msg = parse_message(payload)
                except ValueError:
                    continue
                if msg.kind == "call":
                    wanted.append((route, msg.digest, msg.attribution_line, msg.call_line, None))
        self._ask_ahead(wanted)

    def _policy_route(self, route: str) -> bool:
        """Whether some grant version of ``route`` names a policy (its calls need Cedar)."""
        stored = self.grants.get(route)
        if stored is None:
            return False
        conditions = self._conditions(route, stored, None)
        return conditions is not None and bool(conditions[0])

    def _ask_ahead(self, wanted: Sequence[tuple[str, str, bytes, bytes, CallLine | None]]) -> None:
        """Evaluate together the Cedar requests of these calls of policy routes (route, attribution
        digest and line, call line, the parsed call line if at hand) and keep the outcomes for
        their decisions (:class:`~detections.policy.Outcomes`)."""
        if not wanted:
            return
        if len(self._ahead) + len(wanted) > _AHEAD_SIZE:  # prepare not called for a while
            self._ahead.clear()
            self._ahead_calls.clear()
        checks: list[PolicyCheck] = []
        for route, digest, attribution_line, call_line, line in wanted:
            a = self._attribution(digest, attribution_line)
            principal, agent_id = a.principal, a.agent_id
            stored = self.grants.get(route)
            if a.terminal is not None or principal is None or agent_id is None or stored is None:
                continue
            if line is None:
                line = CallLine.parse(call_line)
            call = self._ahead_calls[call_line] = tool_call(line, _at(line.t))
            views = self._grant_history(route, stored).views_at(call.event_time)
            checks.extend(policy_checks(call, principal, agent_id, views, self.policies))
        if checks:
            evaluate(checks)
            for check in checks:
                self._ahead.put(check)
            self.counters.add("stage2_policy_checks_ahead", len(checks))

    def on_message(self, route: str, payload: bytes, now: datetime) -> Output:
        """A message of the internal topic, keyed by ``route``."""
        out = self._on_message(route, payload, now)
        if self._seq.dirty and not self._deferred:
            self.flush()
        return out

    def _on_message(self, route: str, payload: bytes, now: datetime) -> Output:
        out = new_output()
        now_us = _now_us(now)
        if (
            (self._deadlines and self._deadlines[0][0] <= now_us)
            or (self._expiry and self._expiry[0][0] <= now_us)
            or self._seq.held
        ):
            self._advance(now, now_us, out)
        msg = parse_message(payload)
        kind = msg.kind
        if kind == "tick":
            return out
        skey = f"{route}|{msg.ckey}"  # "|" is percent-encoded inside both parts
        rec = self._record(skey)
        if kind == "handoff":
            self._on_handoff(route, skey, rec, msg, now, now_us, out)
            return out
        if rec is None:
            if kind == "update":
                self.counters.add("stage2_update_for_unknown_call")
                return out
            d, k = msg.deadline, msg.keep_until  # a "call" message
            rec = Owned(
                self.partition,
                route,
                msg.ckey,
                msg.attr_version,
                0,
                None,
                False,
                d,
                k,
                msg.digest,
                msg.attribution_line,
                msg.call_line,
            )
            self._index(skey, route, False, d, k)
            counts = self.counters.counts
            counts["stage2_calls"] = counts.get("stage2_calls", 0) + 1
            self._decide(skey, rec, now, now_us, "call", False, out)
            return out
        if isinstance(rec, Moved):
            if msg.attr_version > rec.attr_version:
                self.counters.add("stage2_forwarded")
                out.forwards.append(new_forward(rec.moved, payload))
            elif msg.attr_version == rec.attr_version and rec.handoff is not None:
                # The message that moved the call, delivered again: its handoff may not have reached
                # the broker although this record did (a flush cut short). The new owner ignores a
                # handoff it already has.
                self.counters.add("stage2_handoffs_resent")
                out.forwards.append(new_forward(rec.moved, rec.handoff))
            return out
        if msg.attr_version <= rec.attr_version:
            self.counters.add("stage2_duplicates")
            return out
        rec.attribution_line, rec.attr_version, rec.digest = msg.attribution_line, msg.attr_version, msg.digest
        self._reattributed(route, skey, rec, now, now_us, bool(msg.late), out)
        return out

    def on_fact(self, fact: GrantFact, now: datetime) -> Output:
        out = new_output()
        now_us = _now_us(now)
        self._advance(now, now_us, out)
        if self._seq.dirty and not self._deferred:
            self.flush()
        route = route_of(fact.tenant, "", fact.principal, fact.agent_id)
        stored = self.grants.get(route)
        if stored is None:
            history = GrantHistory(fact.tenant, fact.principal, fact.agent_id)
        else:
            history = self._grant_history(route, stored)
        if not history.add(fact, record_hash(fact)):
            # Delivered again (at-least-once): the grants it made may have reached the changelog
            # without the calls' new versions and their evidence (a worker killed mid-flush): judge
            # the calls again below, as stage 1 resends its updates; an unchanged verdict emits nothing.
            self.counters.add("stage2_duplicate_facts")
            if stored is None:
                return out
        else:
            history.compact(now - self.config.retention)
            encoded = encode_grants(history)
            if encoded != stored:  # a fact compacted away at once changes nothing: no store write
                stored = self.grants[route] = encoded
            assert stored is not None
            self._cache.put(route, stored, history)
            self.counters.add("stage2_facts")
        fact_us = _us(fact.event_time)
        if self._conditions(route, stored, history) is not None:
            self._rejudge(route, None, fact_us, now, now_us, out)
            return out
        for skey in sorted(self._owned.get(route, ())):
            rec = self._record(skey)
            if not isinstance(rec, Owned):
                continue
            if rec.call.t < fact_us or rec.keep_until <= now_us:
                continue
            self._decide(skey, rec, now, now_us, "fact", now_us > rec.deadline, out)
        return out

    def on_approval(self, fact: ApprovalDecided, now: datetime) -> Output:
        """An ``approval_decided`` of a delegation this partition holds (co-partitioned with grants):
        stored, then the delegation's held calls judged again together, in (event_time, call_id) order."""
        out = new_output()
        now_us = _now_us(now)
        self._advance(now, now_us, out)
        if self._seq.dirty and not self._deferred:
            self.flush()
        route = route_of(fact.tenant, "", fact.principal, fact.agent_id)
        history, horizon, used = self._approvals_of(route)
        if not history.add(fact):
            # delivered again: judge the held calls again all the same (see on_fact)
            self.counters.add("stage2_duplicate_facts")
        else:
            history, horizon, used = _compact_approvals(history, horizon, used, now - self.config.retention)
            self._store_approvals(route, history, horizon, used)
            self.counters.add("stage2_approvals")
        stored = self.grants.get(route)
        if stored is not None and self._conditions(route, stored, None) is not None:
            # every tool: versions of one approval_id may name different tools
            self._rejudge(route, None, _us(fact.event_time), now, now_us, out)
        return out

    def on_policy(self, fact: PolicyPublished, now: datetime, *, stored: bool = False) -> Output:
        """A ``policy_published`` (every partition sees all of them): added to the shared store
        (unless the caller did, ``stored``), then the calls of delegations whose grants name the
        policy judged again. Idempotent: calls whose verdict does not change emit nothing."""
        out = new_output()
        now_us = _now_us(now)
        self._advance(now, now_us, out)
        if self._seq.dirty and not self._deferred:
            self.flush()
        if not stored and not self.policies.add(fact):
            self.counters.add("stage2_duplicate_facts")
        prefix = quote_part(fact.tenant) + "/"
        fact_us = _us(fact.event_time)
        for route in sorted(self._owned):
            if not route.startswith(prefix) or route.count("/") != 2:
                continue
            grants = self.grants.get(route)
            conditions = None if grants is None else self._conditions(route, grants, None)
            if conditions is not None and fact.policy_id in conditions[0]:
                self._rejudge(route, None, fact_us, now, now_us, out)
        return out

    def recheck(self, now: datetime) -> Output:
        """Judge again the held calls of every delegation whose grants name a policy (run when the
        partition's state is loaded or taken back): emits only for calls whose verdict changed.

        The policy feed is read whole at each start, but nothing records which policies a
        partition's calls were last judged with: a policy applied just before a crash (or while the
        partition was revoked) whose evidence never reached the broker would otherwise never be
        applied to calls that were already final. Approvals and grants need no such pass: their
        topics are co-partitioned inputs, committed only after the state and evidence are written.
        """
        out = new_output()
        if not len(self.policies):
            return out
        now_us = _now_us(now)
        for route in sorted(self._owned):
            grants = self.grants.get(route)
            conditions = None if grants is None else self._conditions(route, grants, None)
            if conditions is not None and conditions[0]:
                self._rejudge(route, None, 0, now, now_us, out)
        if self._seq.dirty and not self._deferred:
            self.flush()
        return out

    # -- policies and approvals

    def _conditions(
        self, route: str, stored: bytes, history: GrantHistory | None
    ) -> tuple[frozenset[str], tuple[str, ...]] | None:
        """The policy ids and approval tool patterns of the route's grant versions; None when no
        version has any (the usual case: then no call there needs Cedar or an approval)."""
        hit = self._conditioned.get(route)
        if hit is None or hit[0] is not stored:
            if history is None:
                history = self._grant_history(route, stored)
            policies: set[str] = set()
            tools: set[str] = set()
            for fact in history:
                if isinstance(fact, GrantIssued):
                    policies.update(fact.policies)
                    tools.update(fact.approval_tools)
            if len(self._conditioned) >= _MEMO_SIZE:
                self._conditioned.clear()
            hit = self._conditioned[route] = (stored, frozenset(policies), tuple(sorted(tools)))
        if not hit[1] and not hit[2]:
            return None
        return hit[1], hit[2]

    def _approvals_of(self, route: str) -> tuple[ApprovalHistory, datetime | None, dict[str, str]]:
        stored = self.approvals.get(route)
        if stored is None:
            return ApprovalHistory(*parse_delegation_key(route)), None, {}
        hit = self._approval_cache.get(route)
        if hit is not None and hit[0] is stored:
            return hit[1]
        found = decode_approvals(stored, *parse_delegation_key(route))
        if len(self._approval_cache) >= self.config.cache_size:
            self._approval_cache.clear()
        self._approval_cache[route] = (stored, found)
        return found

    def _store_approvals(
        self, route: str, history: ApprovalHistory, horizon: datetime | None, used: dict[str, str]
    ) -> None:
        encoded = encode_approvals(history, horizon, used)
        if encoded != self.approvals.get(route):
            self.approvals[route] = encoded
            self._approval_cache[route] = (encoded, (history, horizon, used))

    def _record_use(self, route: str, approval_id: str, ckey: str) -> None:
        """A call that used ``approval_id`` is no longer held: keep its use (the single-use rule)."""
        history, horizon, used = self._approvals_of(route)
        if used.get(approval_id) != ckey:
            self._store_approvals(route, history, horizon, {**used, approval_id: ckey})

    def _group(
        self, route: str, name: str | None, extra: tuple[str, Owned] | None, gated: tuple[str, ...] = ()
    ) -> list[tuple[str, Owned]]:
        """The owned calls of ``route`` (of tool ``name``, if given; with ``gated``, of every tool that
        needs an approval there: one approval id may be re-decided for another tool, and each id
        authorises one call across tools), ``extra`` in place of its stored record."""
        members: list[tuple[str, Owned]] = []
        for skey in sorted(self._owned.get(route, ())):
            if extra is not None and skey == extra[0]:
                continue
            rec = self._record(skey)
            if not isinstance(rec, Owned):
                continue
            tool = f"{rec.call.server}/{rec.call.tool}"
            if name is None or tool == name or (gated and any(fnmatchcase(tool, p) for p in gated)):
                members.append((skey, rec))
        if extra is not None:
            members.append(extra)
        return members

    def _judge_group(
        self, route: str, members: Sequence[tuple[str, Owned]]
    ) -> list[tuple[Decision, Sequence[tuple[GrantView, Any]]]]:
        """:func:`~detections.engine.authorize_delegation` over calls of one delegation route, with
        its grants, approvals, the shared policies and the uses of calls no longer held."""
        stored = self.grants.get(route)
        grants = None if stored is None else self._grant_history(route, stored)
        approvals, approvals_horizon, used = self._approvals_of(route)
        self._groups_judged += 1
        items: list[tuple[ToolCall, Attribution]] = []
        ahead = self._ahead_calls
        for _skey, rec in members:
            a = self._attribution(rec.digest, rec.attribution_line)
            attribution = Attribution(cast(Any, None), a.principal, a.agent_id, a.terminal, a.reasons, dict(a.facts))
            call = ahead.get(rec.call_line) if ahead else None  # the object its outcome was asked with
            items.append((tool_call(rec.call, _at(rec.call.t)) if call is None else call, attribution))
        outcomes = self._ahead if len(self._ahead) else None
        decisions, _uses = authorize_delegation(items, grants, approvals, self.policies, used, outcomes)
        out: list[tuple[Decision, Sequence[tuple[GrantView, Any]]]] = []
        for (call, _a), decision in zip(items, decisions, strict=True):
            t = call.event_time
            if grants is not None and decision.principal is not None and not _terminal(decision):
                if grants.horizon is not None and t < grants.horizon:
                    decision.facts.update(incomplete_facts(decision.facts, "grants", grants.horizon))
                if approvals_horizon is not None and t < approvals_horizon:
                    decision.facts.update(incomplete_facts(decision.facts, "approvals", approvals_horizon))
            out.append((decision, [] if grants is None else grants.views_at(t)))
        return out

    def _rejudge(self, route: str, name: str | None, since_us: int, now: datetime, now_us: int, out: Output) -> None:
        """A fact of a delegation with policies or approval tools arrived: judge its held calls again
        (of tool ``name``, if given) together, each emitting evidence only if its verdict changed."""
        members = self._group(route, name, None)
        if not any(rec.call.t >= since_us for _skey, rec in members):
            return
        for (skey, rec), (decision, views) in zip(members, self._judge_group(route, members), strict=True):
            self._emit(skey, rec, decision, views, now, now_us, "fact", now_us > rec.deadline, out)

    # -- internals

    def _on_handoff(
        self,
        route: str,
        skey: str,
        rec: Owned | Moved | None,
        msg: Message,
        now: datetime,
        now_us: int,
        out: Output,
    ) -> None:
        if rec is not None and msg.attr_version <= rec.attr_version:
            self.counters.add("stage2_duplicates")
            return
        if isinstance(rec, Owned):
            self._unindex_owned(skey, rec.route)
        new = Owned(
            self.partition,
            route,
            msg.ckey,
            msg.attr_version,
            msg.version,
            msg.last,
            msg.final,
            msg.deadline,
            msg.keep_until,
            msg.digest,
            msg.attribution_line,
            msg.call_line,
        )
        self.counters.add("stage2_handoffs_in")
        self._index(skey, route, msg.final, msg.deadline, msg.keep_until)
        self._reattributed(route, skey, new, now, now_us, bool(msg.late), out)

    def _reattributed(
        self, route: str, skey: str, rec: Owned, now: datetime, now_us: int, late: bool, out: Output
    ) -> None:
        call, attribution = rec.call, self._attribution(rec.digest, rec.attribution_line)
        target = route_of(call.tenant, call.session_id, attribution.principal, attribution.agent_id)
        if target == route:
            self._decide(skey, rec, now, now_us, "update", late, out)
            return
        # The call now belongs to another route: hand it over, keep a forwarding record.
        self._unindex_owned(skey, route)
        handoff = handoff_message(rec, late)
        moved = Moved(self.partition, route, rec.ckey, rec.attr_version, rec.keep_until, target, handoff)
        self.calls[skey] = moved.encode()
        self.counters.add("stage2_handoffs_out")
        out.forwards.append(new_forward(target, handoff))

    def _decision(
        self, route: str, a: AttributionLine, call: CallLine, t: datetime, history: GrantHistory | None = None
    ) -> tuple[Decision, Sequence[tuple[GrantView, Any]]]:
        """:func:`~detections.engine.authorize` of the call at ``route`` (whose grants count: the
        call's owner's), and the grants it used. Decisions that differ only in the call's instant
        (same attribution, grants slot and tool name, every resource covered) are made once.
        ``history``: the route's grant history if the caller has it (else read from the store)."""
        if a.body is not None:
            return remake(t, a.body, a), ()
        name = f"{call.server}/{call.tool}"
        if a.principal is None or a.agent_id is None:
            history = None
        elif history is None:
            stored = self.grants.get(route)
            if stored is not None:
                history = self._grant_history(route, stored)
        if history is None:  # no grant history
            return authorize_matched(t, call.tenant, name, None, a.principal, a.agent_id, a.reasons, a.facts, ()), ()
        slot = history.slot_at(t)
        grants, memo = slot.grants, slot.memo
        tools: tuple[bool, ...] | None = memo.get(name)
        if tools is None:
            if len(memo) >= _SLOT_MEMO_SIZE:  # two entries per tool name
                memo.clear()
            tools = memo[name] = tuple(matchers(view)[0](name) is not None for view, _r, _s in grants)
        missing: list[list[str]] | None = None
        resources = call.resources
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
                return remake(t, (part[0], part[1], a.reasons + part[2], part[3]), a), slot.pairs
        rows: list[GrantMatch] = [
            (view, revocation, t, tools[i], () if missing is None else missing[i])
            for i, (view, revocation, _status) in enumerate(grants)
        ]
        decision = authorize_matched(t, call.tenant, name, None, a.principal, a.agent_id, a.reasons, a.facts, rows)
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
        self, skey: str, rec: Owned, now: datetime, now_us: int, reason: Reason, late: bool, out: Output
    ) -> None:
        """Judge the owned call ``rec`` again and emit what changed."""
        route = rec.route
        stored = self.grants.get(route)
        if stored is not None and (conditions := self._conditions(route, stored, None)) is not None:
            call = rec.call
            name = f"{call.server}/{call.tool}"
            if any(fnmatchcase(name, p) for p in conditions[1]):
                # Calls of this tool may compete for approvals: judge them together, in order.
                members = self._group(route, name, (skey, rec), conditions[1])
            else:
                members = [(skey, rec)]
            for (k, r), (decision, views) in zip(members, self._judge_group(route, members), strict=True):
                if k == skey:
                    self._emit(k, r, decision, views, now, now_us, reason, late, out)
                else:
                    # Another call's arrival changed it: late if that came after its deadline; another
                    # call's deadline only finalizes a due call early (nothing changed since).
                    late_too = reason != "deadline" and now_us > r.deadline
                    self._emit(k, r, decision, views, now, now_us, "fact", late_too, out)
            return
        call = rec.call
        t = _at(call.t)
        history = None if stored is None else self._grant_history(route, stored)  # looked up once
        decision, used = self._decision(route, self._attribution(rec.digest, rec.attribution_line), call, t, history)
        if history is not None:
            horizon = history.horizon
            if horizon is not None and t < horizon and not _terminal(decision):
                decision.facts.update(incomplete_facts(decision.facts, "grants", horizon))
        self._emit(skey, rec, decision, used, now, now_us, reason, late, out)

    def _emit(
        self,
        skey: str,
        rec: Owned,
        decision: Decision,
        used: Sequence[tuple[GrantView, Any]],
        now: datetime,
        now_us: int,
        reason: Reason,
        late: bool,
        out: Output,
    ) -> None:
        """Evidence for ``decision`` of the owned call ``rec`` if it differs from the last emitted
        (or the call becomes final), and the rules on a final verdict."""
        call = rec.call
        t = _at(call.t)
        summary = _summary(decision)
        final = now_us >= rec.deadline and (
            rec.final
            or (not self.finality_held and (self.final_horizon_us is None or rec.deadline <= self.final_horizon_us))
        )
        if rec.version > 0 and summary == rec.last and (rec.final or not final):
            if reason == "update":
                self.calls[skey] = rec.encode()  # a new attribution version, same verdict: keep the record
            return
        was_final = rec.final
        if late and not was_final and not final:
            late = False  # a correction before the call is final changes nothing final (finals held)
        rec.version += 1
        rec.last = summary
        rec.final = final
        self.calls[skey] = rec.encode()
        if was_final and not final:  # only if the clock went back: final again at the deadline
            _heappush(self._deadlines, (rec.deadline, skey))
        kind = "amendment" if was_final else ("final" if final else "provisional")
        counts = self.counters.counts
        name = _EVIDENCE_COUNTER[kind]
        counts[name] = counts.get(name, 0) + 1
        if late:
            counts["evidence_late"] = counts.get("evidence_late", 0) + 1
        out.evidence.append(
            make_evidence(
                call.tenant,
                call.session_id,
                call.call_id,
                call.server,
                call.tool,
                t,
                decision,
                rec.version,
                final,
                late,
                now,
                rec.attr_version,
                reason,
                kind,
                rec.ckey,
            )
        )
        if not final:
            return
        # Final verdicts go through the rules once: the per-call rules now, the sequence rules
        # after the hold (SequenceKeeper.release); an amendment re-runs the per-call rules only (sequence
        # rules have already counted this call).
        rule_call, grants = tool_call(call, t), GrantsAt(used, t)
        if not was_final:
            release = rec.deadline + self._slack_us
            self._seq.hold(rule_call, decision, grants, release, rec.digest, rec.attribution_line, rec.call_line)
        if self._per_call.looks_at(decision.verdict):  # else it finds nothing, whatever the call
            found = self._per_call.evaluate_with(rule_call, decision, grants)
            counts["findings"] = counts.get("findings", 0) + len(found)
            if found:
                out.findings.extend([f.to_record(now) for f in found])
        elif "findings" not in counts:
            counts["findings"] = 0  # as evaluating would have left it

    def _redecide(
        self, route: str, digest: str, attribution_line: bytes, call: CallLine
    ) -> tuple[ToolCall, Decision, Mapping[str, GrantState]]:
        """A held call decided again from its stored lines (restoring the sequence records)."""
        t = _at(call.t)
        stored = self.grants.get(route)
        if stored is not None and (conditions := self._conditions(route, stored, None)) is not None:
            # As when it was final: judged with the route's held gated calls (approvals in order).
            skey = f"{route}|{call_key(call.tenant, call.session_id, call.call_id)}"
            rec = self._record(skey)
            if not isinstance(rec, Owned):
                rec = Owned(self.partition, route, "", 0, 0, None, True, 0, 0, digest, attribution_line, b"")
                rec._call = call
            members = self._group(route, f"{call.server}/{call.tool}", (skey, rec), conditions[1])
            decision, views = self._judge_group(route, members)[-1]
            return tool_call(call, t), decision, GrantsAt(views, t)
        decision, used = self._decision(route, self._attribution(digest, attribution_line), call, t)
        return tool_call(call, t), decision, GrantsAt(used, t)


def _terminal(decision: Decision) -> bool:
    return decision.verdict in TERMINAL_VERDICTS


def _summary(decision: Decision) -> tuple[Any, ...]:
    """What evidence versions are compared by: (verdict, matched grant, principal, agent_id), then,
    only when there is any, the approval used, the policies and Cedar's decision, and whether the
    history was complete (so that a plain call's stored summary keeps its four items)."""
    base = (decision.verdict, decision.matched_grant_id, decision.principal, decision.agent_id)
    policy = decision.policy
    incomplete = decision.facts.get("history_complete") is False
    if decision.approval_id is None and policy is None and not incomplete:
        return base
    policy_text = None if policy is None else f"{','.join(policy.versions)}:{policy.decision}"
    return (*base, decision.approval_id, policy_text, incomplete)


def _compact_approvals(
    history: ApprovalHistory, horizon: datetime | None, used: dict[str, str], before: datetime
) -> tuple[ApprovalHistory, datetime | None, dict[str, str]]:
    """Drop approvals no call at or after ``before`` can have as a candidate (every version of the
    approval expired by then); the horizon moves when something was dropped."""
    versions: dict[str, list[ApprovalDecided]] = {}
    for fact in history:
        versions.setdefault(fact.approval_id, []).append(fact)
    gone = {
        aid
        for aid, facts in versions.items()
        if all(f.expires_at is not None and f.expires_at <= before for f in facts)
    }
    if not gone:
        return history, horizon, used
    kept = ApprovalHistory(history.tenant, history.principal, history.agent_id)
    for fact in history:
        if fact.approval_id not in gone:
            kept.add(fact)
    used = {aid: ckey for aid, ckey in used.items() if aid not in gone}
    return kept, before if horizon is None else max(horizon, before), used


def _no_history() -> GrantHistory:  # never called: a route with no stored grants has no history
    raise AssertionError("no stored grant history")
