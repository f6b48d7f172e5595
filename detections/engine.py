"""Delegated-authority decision engine: the pure core (DESIGN.md, "Decision semantics").

A call is judged against the identity and consent state **as of the call's event_time t**,
never the wall clock. Nothing here reads a clock or imports Kafka, Faust or ClickHouse: the
same code runs live (stage 1 and stage 2 of ``stream_jobs``) and offline (``scopewatch replay``).

Pieces, in the order the live pipeline uses them:

* :class:`SessionHistory` -- every ``session_bound``/``session_ended`` of one (tenant, session_id);
  :meth:`SessionHistory.state_at` gives the :class:`SessionState` at t.
* :func:`attribute` -- stage 1 (keyed by session): who the call acts for, and a terminal verdict
  if one of verdicts 1-3 applies.
* :class:`GrantHistory` -- every ``grant_issued``/``grant_revoked`` of one delegation
  (tenant, principal, agent_id); :meth:`GrantHistory.grants_at` gives each grant's
  :class:`GrantState` at t.
* :func:`authorize` -- stage 2 (keyed by delegation): verdicts 4-10 and ``matched_grant_id``.
* :class:`DecisionEngine` -- both histories for all keys, for replay and tests.

For the live pipeline's speed (``detections.live``), the same decisions also come in parts that
can be computed once and shared: :meth:`SessionHistory.state_key` (what an attribution depends on
besides t), :meth:`GrantHistory.slot_at` (the grants over an interval in which nothing about them
changes), :func:`authorize_matched` (:func:`authorize` with pattern matching done by the caller,
so it can keep compiled matchers) and :func:`decision_of` (a decision remade for another instant).
:func:`authorize` itself runs on :func:`authorize_matched`, so replay and live share one code path.

Histories are idempotent by ``event_id`` and independent of arrival order: every tie is broken by
a total order on the facts, so the same set of facts always gives the same :class:`Decision`
(reasons and facts included).

Ambiguities
-----------
Where DESIGN.md is silent or could be read two ways, this module decides as follows.

1. **Identity claims pairing.** "If attested.sub or attested.client_id is present and differs from
   the binding's principal or agent_id" is read pairwise: ``sub`` is compared with ``principal``
   and ``client_id`` with ``agent_id``. "Present" means the key exists with a non-null value; the
   comparison is exact (no case folding, no coercion), so a non-string value is a mismatch.
2. **Identity check on an ended session.** Verdict 2 (identity_mismatch) precedes verdict 3
   (session_expired), and an ended session is "bound but not valid". The binding an ended session
   is compared with is the latest ``session_bound`` that precedes the deciding ``session_ended`` in
   the tie-broken order (a bound at the same instant as the end counts as preceding it). Its
   principal/agent_id are reported on the decision. If no ``session_bound`` precedes the end, there
   is nothing to compare with: no identity mismatch, verdict session_expired, principal null.
3. **Ties between facts of the same kind.** DESIGN only orders ``session_ended`` after
   ``session_bound`` at the same instant. Two ``session_bound`` (or two ``session_ended``) at the
   same instant are ordered by ``event_id`` (the larger one is later and decides); two
   ``grant_issued`` for the same ``grant_id`` at the same instant likewise (larger ``event_id`` is
   the version). This keeps verdicts independent of arrival order.
4. **Which revocation is reported.** A version is revoked by any ``grant_revoked`` in
   [version.event_time, t]; the earliest one (then the smallest event_id) is the one named in the
   reasons and facts. Revocations before the version's issue time do not apply (re-issuing a
   revoked ``grant_id`` makes it usable again).
5. **Revocation of something never issued.** A ``grant_revoked`` whose ``grant_id`` has no version
   at or before t is ignored; it does not count as "a grant issued" for verdict 5 (no_grant).
6. **Grant ids across delegations.** A ``grant_id`` lives inside its delegation (tenant, principal,
   agent_id). The same ``grant_id`` issued to another delegation is a different grant; a
   revocation only touches the delegation it names.
7. **A covering grant both expired and not yet valid** (``expires_at <= t < not_before``) gives
   expired_grant: verdict 7 precedes verdict 8. A covering grant both revoked and expired gives
   revoked_grant for the same reason.
8. **Verdicts 9 and 10** consider every grant issued at or before t, whatever its state
   (revoked, expired, not yet valid). A call with no resources is covered as far as resources go
   (vacuous "every call resource matches"). A grant with an empty ``tools`` list matches no tool.
9. **matched_grant_id** tie-break "latest not_before" uses the ``not_before`` of each grant's
   version at t; remaining ties go to the smallest ``grant_id`` (plain string order).
10. **Compaction and late duplicates.** After :meth:`~SessionHistory.compact`, the ids of dropped
    facts are forgotten, so a duplicate of a dropped fact is accepted again (``add`` returns True).
    Such a fact is dominated by the kept fact, so verdicts for calls at or after the horizon do not
    change; only verdicts for calls before the horizon (which compaction gives up on) may. Facts
    that arrive late after a compaction are fine too, except that revocations of a ``grant_id``
    with no version at or before the horizon cannot be dropped (its ``grant_issued`` may be late),
    so revocations of never-issued grants stay until a version arrives.
11. **Terminal attributions.** :func:`authorize` accepts an attribution that already carries a
    terminal verdict (1-3) and returns it unchanged, ignoring grants, so stage 2 can call it
    unconditionally.
"""

from __future__ import annotations

import bisect
import fnmatch
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final, Literal, TypeAlias, get_args

from detections.approvals import ApprovalHistory, ApprovalStatus
from detections.policy import Outcomes, PolicyCheck, PolicyOutcome, PolicyStore, evaluate
from schemas import (
    ApprovalDecided,
    BaseEvent,
    GrantIssued,
    GrantRevoked,
    PolicyPublished,
    SessionBound,
    SessionEnded,
    ToolCall,
    arguments_digest,
    format_timestamp,
)

__all__ = [
    "TERMINAL_VERDICTS",
    "VERDICTS",
    "Attribution",
    "Decision",
    "DecisionEngine",
    "Fact",
    "GrantFact",
    "GrantHistory",
    "GrantSlot",
    "GrantState",
    "GrantView",
    "SessionFact",
    "SessionHistory",
    "SessionState",
    "Verdict",
    "attribute",
    "attribute_identity",
    "authorize",
    "authorize_delegation",
    "authorize_matched",
    "covers",
    "decision_of",
    "evidence_fields",
    "policy_checks",
    "tool_name",
    "tools_match",
    "uncovered_resources",
]

Verdict: TypeAlias = Literal[
    "unbound_session",
    "identity_mismatch",
    "session_expired",
    "in_scope",
    "approval_denied",
    "approval_missing",
    "no_grant",
    "out_of_policy",
    "revoked_grant",
    "expired_grant",
    "not_yet_valid",
    "out_of_scope_tool",
    "out_of_scope_resource",
]

VERDICTS: Final[tuple[Verdict, ...]] = get_args(Verdict)
"""The thirteen verdicts, in DESIGN order (first match wins)."""

TERMINAL_VERDICTS: Final[tuple[Verdict, ...]] = VERDICTS[:3]
"""Verdicts decided by stage 1 (attribution) alone."""

SessionFact: TypeAlias = SessionBound | SessionEnded
GrantFact: TypeAlias = GrantIssued | GrantRevoked
Fact: TypeAlias = SessionFact | GrantFact

SessionStatus: TypeAlias = Literal["unbound", "ended", "bound"]
GrantStatus: TypeAlias = Literal["active", "revoked", "expired", "not_yet_valid"]


_TS_MEMO: Final[dict[datetime, str]] = {}


def _ts(dt: datetime | None) -> str:
    """``format_timestamp``, memoized (calls close in time share their instants)."""
    if dt is None:
        return "never"
    text = _TS_MEMO.get(dt)
    if text is None:
        if len(_TS_MEMO) >= 4096:
            _TS_MEMO.clear()
        if dt.tzinfo is UTC:  # isoformat is faster, same text (milliseconds truncated, not rounded)
            text = dt.isoformat(timespec="milliseconds")[:-6] + "Z"
        else:
            text = format_timestamp(dt)
        _TS_MEMO[dt] = text
    return text


# ---------------------------------------------------------------------------- sessions

_BOUND_RANK: Final = 0
_ENDED_RANK: Final = 1
_AFTER_ALL_RANKS: Final = 2

_SessionKey: TypeAlias = tuple[datetime, int, str]


def _session_key(event: SessionFact) -> _SessionKey:
    """Total order of session facts: time, then ended after bound (DESIGN tie rule), then event_id."""
    rank = _ENDED_RANK if isinstance(event, SessionEnded) else _BOUND_RANK
    return (event.event_time, rank, event.event_id)


@dataclass(frozen=True)
class SessionState:
    """The state of one session at instant ``at``.

    ``status`` is ``unbound`` (no fact at or before ``at``), ``ended`` (the latest fact is a
    ``session_ended``: bound but not valid) or ``bound`` (the latest fact is a ``session_bound``;
    ``valid`` tells whether ``valid_from <= at < valid_until``). ``event_id``/``event_time`` name the
    deciding fact; ``binding_event_id`` and the binding fields come from the deciding
    ``session_bound`` or, for an ended session, from the binding the end closed (None if none).
    """

    at: datetime
    status: SessionStatus
    valid: bool = False
    event_id: str | None = None
    event_time: datetime | None = None
    binding_event_id: str | None = None
    principal: str | None = None
    agent_id: str | None = None
    valid_from: datetime | None = None
    valid_until: datetime | None = None
    event_hash: str | None = None
    binding_hash: str | None = None
    """Record hashes (:func:`schemas.record_hash`) of the deciding and binding facts, when the history
    knows them (the live pipeline records them as facts arrive; replay does not need them)."""

    @classmethod
    def unbound(cls, at: datetime) -> SessionState:
        return cls(at=at, status="unbound")

    @classmethod
    def from_facts(
        cls,
        at: datetime,
        deciding: SessionFact | None,
        binding: SessionBound | None,
        hashes: Mapping[str, str] | None = None,
    ) -> SessionState:
        if deciding is None:
            return cls.unbound(at)
        if isinstance(deciding, SessionBound):
            binding = deciding
            status: SessionStatus = "bound"
            valid = deciding.valid_from <= at and (deciding.valid_until is None or at < deciding.valid_until)
        else:
            status = "ended"
            valid = False
        return cls(
            at=at,
            status=status,
            valid=valid,
            event_id=deciding.event_id,
            event_time=deciding.event_time,
            binding_event_id=None if binding is None else binding.event_id,
            principal=None if binding is None else binding.principal,
            agent_id=None if binding is None else binding.agent_id,
            valid_from=None if binding is None else binding.valid_from,
            valid_until=None if binding is None else binding.valid_until,
            event_hash=None if not hashes else hashes.get(deciding.event_id),
            binding_hash=None if not hashes or binding is None else hashes.get(binding.event_id),
        )

    def to_facts(self) -> dict[str, object]:
        """JSON-ready summary for :attr:`Decision.facts` (the record hashes only when known)."""
        facts: dict[str, object] = {
            "status": self.status,
            "valid": self.valid,
            "event_id": self.event_id,
            "binding_event_id": self.binding_event_id,
        }
        if self.event_hash is not None:
            facts["event_hash"] = self.event_hash
        if self.binding_hash is not None:
            facts["binding_hash"] = self.binding_hash
        return facts


class SessionHistory:
    """All ``session_bound``/``session_ended`` facts of one (tenant, session_id), ordered."""

    def __init__(self, tenant: str, session_id: str) -> None:
        self.tenant: Final = tenant
        self.session_id: Final = session_id
        self._keys: list[_SessionKey] = []
        self._events: list[SessionFact] = []
        self._ids: set[str] = set()
        self.hashes: dict[str, str] = {}
        """Record hash (:func:`schemas.record_hash`) per stored fact's event_id, where the caller gave one."""
        self.memo: dict[Any, Any] = {}
        """Free for callers to memoize results derived from this history (keyed by :meth:`state_key`);
        cleared whenever the history changes (:meth:`add`, :meth:`compact`)."""
        self.horizon: datetime | None = None
        """The latest horizon at which :meth:`compact` actually dropped facts (None: never): a call
        before it is judged on incomplete history (DESIGN "Retention")."""

    def __len__(self) -> int:
        return len(self._events)

    def __iter__(self) -> Iterator[SessionFact]:
        """The stored facts in decision order (e.g. to persist and rebuild the history)."""
        return iter(list(self._events))

    def add(self, event: SessionFact, record_hash: str | None = None) -> bool:
        """Store a fact (with its record hash, if known); False if its event_id is already stored
        (the first copy is kept)."""
        if not isinstance(event, (SessionBound, SessionEnded)):
            raise TypeError(f"not a session fact: {type(event).__name__}")
        if (event.tenant, event.session_id) != (self.tenant, self.session_id):
            msg = (
                f"fact for session {event.tenant}/{event.session_id} added to history of "
                f"{self.tenant}/{self.session_id}"
            )
            raise ValueError(msg)
        if event.event_id in self._ids:
            return False
        key = _session_key(event)
        i = bisect.bisect_right(self._keys, key)
        self._keys.insert(i, key)
        self._events.insert(i, event)
        self._ids.add(event.event_id)
        if record_hash is not None:
            self.hashes[event.event_id] = record_hash
        self.memo.clear()
        return True

    def _count_upto(self, t: datetime) -> int:
        """Number of facts with event_time <= t (they form a prefix)."""
        return bisect.bisect_right(self._keys, (t, _AFTER_ALL_RANKS, ""))

    def _binding_before(self, index: int) -> int | None:
        for j in range(index - 1, -1, -1):
            if isinstance(self._events[j], SessionBound):
                return j
        return None

    def state_key(self, t: datetime) -> tuple[int, bool, bool]:
        """What :meth:`state_at` depends on besides ``t`` itself: (facts at or before t, valid, before valid_from).

        Two instants with the same key and a non-zero count give the same state except for ``at``, and
        the same :func:`attribute` result for the same call identity (the unbound state, count 0, names t).
        """
        n = bisect.bisect_right(self._keys, (t, _AFTER_ALL_RANKS, ""))
        if n == 0:
            return (0, False, False)
        deciding = self._events[n - 1]
        if isinstance(deciding, SessionBound):
            early = t < deciding.valid_from
            return (n, not early and (deciding.valid_until is None or t < deciding.valid_until), early)
        return (n, False, False)

    def state_at(self, t: datetime) -> SessionState:
        n = self._count_upto(t)
        if n == 0:
            return SessionState.unbound(t)
        deciding = self._events[n - 1]
        binding: SessionBound | None = None
        if isinstance(deciding, SessionEnded):
            j = self._binding_before(n - 1)
            if j is not None:
                found = self._events[j]
                assert isinstance(found, SessionBound)
                binding = found
        return SessionState.from_facts(t, deciding, binding, self.hashes)

    def compact(self, horizon: datetime) -> int:
        """Drop facts that cannot influence ``state_at(t)`` for any t >= horizon; returns how many.

        Kept: every fact after the horizon, the latest fact at or before it and, if that one is a
        ``session_ended``, the binding it closed.
        """
        n = self._count_upto(horizon)
        if n == 0:
            return 0
        keep = {n - 1}
        if isinstance(self._events[n - 1], SessionEnded):
            j = self._binding_before(n - 1)
            if j is not None:
                keep.add(j)
        dropped = [i for i in range(n) if i not in keep]
        for i in dropped:
            self._ids.discard(self._events[i].event_id)
            self.hashes.pop(self._events[i].event_id, None)
        kept_prefix = sorted(keep)
        self._keys = [self._keys[i] for i in kept_prefix] + self._keys[n:]
        self._events = [self._events[i] for i in kept_prefix] + self._events[n:]
        if dropped:
            self.memo.clear()
            self.horizon = horizon if self.horizon is None else max(self.horizon, horizon)
        return len(dropped)


# ------------------------------------------------------------------------------ grants


def _fact_order(event: BaseEvent) -> tuple[datetime, str]:
    return (event.event_time, event.event_id)


def _event_time(event: BaseEvent) -> datetime:
    return event.event_time


@dataclass(frozen=True)
class GrantState:
    """One grant of a delegation at instant ``at``: its version at ``at`` and what applies to it."""

    at: datetime
    version: GrantIssued
    revocation: GrantRevoked | None = None

    @property
    def grant_id(self) -> str:
        return self.version.grant_id

    @property
    def not_before(self) -> datetime:
        return self.version.not_before

    @property
    def expires_at(self) -> datetime | None:
        return self.version.expires_at

    @property
    def revoked(self) -> bool:
        return self.revocation is not None

    @property
    def expired(self) -> bool:
        return self.version.expires_at is not None and self.at >= self.version.expires_at

    @property
    def not_yet_valid(self) -> bool:
        return self.version.not_before > self.at

    @property
    def active(self) -> bool:
        return not self.revoked and not self.expired and not self.not_yet_valid

    @property
    def status(self) -> GrantStatus:
        """Why the grant is (not) usable, in verdict order: revoked, expired, not_yet_valid, active."""
        if self.revoked:
            return "revoked"
        if self.expired:
            return "expired"
        if self.not_yet_valid:
            return "not_yet_valid"
        return "active"

    def describe_status(self) -> str:
        v = self.version
        if self.revocation is not None:
            r = self.revocation
            text = f"revoked at {_ts(r.event_time)} by {r.revoked_by}"
            return f"{text} ({r.reason})" if r.reason else text
        if self.expired:
            return f"expired at {_ts(v.expires_at)}"
        if self.not_yet_valid:
            return f"not valid before {_ts(v.not_before)}"
        return f"active (not_before {_ts(v.not_before)}, expires_at {_ts(v.expires_at)})"


class GrantView:
    """One grant version as deciding reads it: its times and, computed once, the texts of its reasons.

    ``tools_match``/``resources_match`` are free slots for callers that keep compiled pattern
    matchers with the version (the live pipeline); this module matches with ``fnmatch`` itself.
    """

    __slots__ = (
        "_texts",
        "event_id",
        "expires_at",
        "grant_id",
        "hashes",
        "issued",
        "not_before",
        "resources_match",
        "resources_text",
        "tools_match",
        "tools_text",
        "version",
    )

    def __init__(self, version: GrantIssued, hashes: Mapping[str, str] | None = None) -> None:
        self.version: Final = version
        self.hashes: Final = hashes
        """The history's record hashes by event_id (this version's and its revocations'), if it keeps them."""
        self.grant_id: Final = version.grant_id
        self.event_id: Final = version.event_id
        self.issued: Final = version.event_time
        self.not_before: Final = version.not_before
        self.expires_at: Final = version.expires_at
        self.tools_text: Final = repr(list(version.tools))
        self.resources_text: Final = repr(list(version.resources))
        self.tools_match: Callable[[str], object] | None = None
        self.resources_match: Callable[[str], object] | None = None
        self._texts: dict[str, str] = {}

    def status_at(self, at: datetime, revocation: GrantRevoked | None) -> GrantStatus:
        """:attr:`GrantState.status` of this version at ``at`` with ``revocation`` applied."""
        if revocation is not None:
            return "revoked"
        if self.expires_at is not None and at >= self.expires_at:
            return "expired"
        if self.not_before > at:
            return "not_yet_valid"
        return "active"

    def describe(self, status: GrantStatus, revocation: GrantRevoked | None) -> str:
        """:meth:`GrantState.describe_status` for a state with this status and revocation."""
        if revocation is not None:
            r = revocation
            text = f"revoked at {_ts(r.event_time)} by {r.revoked_by}"
            return f"{text} ({r.reason})" if r.reason else text
        cached = self._texts.get(status)
        if cached is not None:
            return cached
        if status == "expired":
            text = f"expired at {_ts(self.expires_at)}"
        elif status == "not_yet_valid":
            text = f"not valid before {_ts(self.not_before)}"
        else:
            text = f"active (not_before {_ts(self.not_before)}, expires_at {_ts(self.expires_at)})"
        self._texts[status] = text
        return text


class GrantSlot:
    """The grants of a delegation over one interval of time in which nothing about them changes.

    The intervals are cut at every fact time and at every version's ``not_before`` and
    ``expires_at``, so for every t inside one, :meth:`GrantHistory.grants_at` gives the same
    versions and revocations with the same statuses. ``grants``: (view, revocation, status) per
    grant issued by then, ordered by grant_id; ``memo`` is free for callers to keep results
    derived from them (it lives as long as the history is unchanged).
    """

    __slots__ = ("grants", "memo", "pairs")

    def __init__(self, grants: list[tuple[GrantView, GrantRevoked | None, GrantStatus]]) -> None:
        self.grants: Final = grants
        self.pairs: Final = [(view, revocation) for view, revocation, _status in grants]
        self.memo: dict[Any, Any] = {}


class GrantHistory:
    """All ``grant_issued``/``grant_revoked`` facts of one delegation (tenant, principal, agent_id)."""

    def __init__(self, tenant: str, principal: str, agent_id: str) -> None:
        self.tenant: Final = tenant
        self.principal: Final = principal
        self.agent_id: Final = agent_id
        self._versions: dict[str, list[GrantIssued]] = {}
        self._revocations: dict[str, list[GrantRevoked]] = {}
        self._ids: set[str] = set()
        self.hashes: dict[str, str] = {}
        """Record hash (:func:`schemas.record_hash`) per stored fact's event_id, where the caller gave one."""
        self.horizon: datetime | None = None
        """The latest horizon at which :meth:`compact` actually dropped facts (None: never)."""
        # Derived, rebuilt lazily after a change: the instants where something about the grants
        # changes (see GrantSlot) and the slots between them.
        self._times: list[datetime] | None = None
        self._slots: dict[int, GrantSlot] = {}
        self._views: dict[str, GrantView] = {}

    def _changed(self) -> None:
        self._times = None
        self._slots.clear()

    def __len__(self) -> int:
        return sum(map(len, self._versions.values())) + sum(map(len, self._revocations.values()))

    def __iter__(self) -> Iterator[GrantFact]:
        """The stored facts ordered by (event_time, event_id)."""
        facts: list[GrantFact] = [v for vs in self._versions.values() for v in vs]
        facts.extend(r for rs in self._revocations.values() for r in rs)
        return iter(sorted(facts, key=_fact_order))

    def add(self, event: GrantFact, record_hash: str | None = None) -> bool:
        """Store a fact (with its record hash, if known); False if its event_id is already stored
        (the first copy is kept)."""
        if not isinstance(event, (GrantIssued, GrantRevoked)):
            raise TypeError(f"not a consent fact: {type(event).__name__}")
        if (event.tenant, event.principal, event.agent_id) != (self.tenant, self.principal, self.agent_id):
            msg = (
                f"fact for delegation {event.tenant}/{event.principal}/{event.agent_id} added to history of "
                f"{self.tenant}/{self.principal}/{self.agent_id}"
            )
            raise ValueError(msg)
        if event.event_id in self._ids:
            return False
        if isinstance(event, GrantIssued):
            bisect.insort(self._versions.setdefault(event.grant_id, []), event, key=_fact_order)
        else:
            bisect.insort(self._revocations.setdefault(event.grant_id, []), event, key=_fact_order)
        self._ids.add(event.event_id)
        if record_hash is not None:
            self.hashes[event.event_id] = record_hash
        self._changed()
        return True

    def grants_at(self, t: datetime) -> list[GrantState]:
        """Each grant issued at or before t, at its version at t, ordered by grant_id."""
        return [GrantState(at=t, version=view.version, revocation=revocation) for view, revocation in self.views_at(t)]

    def views_at(self, t: datetime) -> list[tuple[GrantView, GrantRevoked | None]]:
        """:meth:`grants_at` as (version view, revocation) pairs, ordered by grant_id (shared: do not modify)."""
        return self.slot_at(t).pairs

    def slot_at(self, t: datetime) -> GrantSlot:
        """The :class:`GrantSlot` holding t, computed once per interval until the history changes."""
        times = self._times
        if times is None:
            stamps = {f.event_time for fs in self._versions.values() for f in fs}
            stamps.update(f.event_time for fs in self._revocations.values() for f in fs)
            for versions in self._versions.values():
                for v in versions:
                    stamps.add(v.not_before)
                    if v.expires_at is not None:
                        stamps.add(v.expires_at)
            times = self._times = sorted(stamps)
        index = bisect.bisect_right(times, t)
        slot = self._slots.get(index)
        if slot is None:
            grants: list[tuple[GrantView, GrantRevoked | None, GrantStatus]] = []
            for grant_id in sorted(self._versions):
                versions = self._versions[grant_id]
                n = bisect.bisect_right(versions, t, key=_event_time)
                if n == 0:
                    continue
                version = versions[n - 1]
                view = self._views.get(version.event_id)
                if view is None or view.version is not version:
                    view = self._views[version.event_id] = GrantView(version, self.hashes)
                revocation = self._revocation(version, t)
                grants.append((view, revocation, view.status_at(t, revocation)))
            slot = self._slots[index] = GrantSlot(grants)
        return slot

    def _revocation(self, version: GrantIssued, t: datetime) -> GrantRevoked | None:
        """The earliest revocation of this version with version.event_time <= event_time <= t."""
        revocations = self._revocations.get(version.grant_id, [])
        i = bisect.bisect_left(revocations, version.event_time, key=_event_time)
        if i < len(revocations) and revocations[i].event_time <= t:
            return revocations[i]
        return None

    def compact(self, horizon: datetime) -> int:
        """Drop facts that cannot influence ``grants_at(t)`` for any t >= horizon; returns how many.

        Kept per grant_id: every fact after the horizon, the latest version at or before it, and
        the revocations at or after that version's issue time. Revocations of a grant_id with no
        version at or before the horizon are all kept: a late ``grant_issued`` at or before the
        horizon may still arrive, and they would apply to it.
        """
        dropped = 0
        for grant_id in sorted(set(self._versions) | set(self._revocations)):
            versions = self._versions.get(grant_id, [])
            n = bisect.bisect_right(versions, horizon, key=_event_time)
            floor: datetime | None = None
            if n > 0:
                floor = versions[n - 1].event_time
                for old in versions[: n - 1]:
                    self._ids.discard(old.event_id)
                    self.hashes.pop(old.event_id, None)
                dropped += n - 1
                self._versions[grant_id] = versions[n - 1 :]
            revocations = self._revocations.get(grant_id, [])
            if revocations:
                # A revocation at or before the horizon applies only to a version issued at or
                # before it: with a kept version, only to that one or to a later (late) one, so
                # revocations before the kept version are superseded for every t >= horizon.
                def useful(r: GrantRevoked, floor: datetime | None = floor) -> bool:
                    return floor is None or r.event_time >= floor

                kept = [r for r in revocations if useful(r)]
                for r in revocations:
                    if not useful(r):
                        self._ids.discard(r.event_id)
                        self.hashes.pop(r.event_id, None)
                dropped += len(revocations) - len(kept)
                if kept:
                    self._revocations[grant_id] = kept
                else:
                    del self._revocations[grant_id]
        if dropped:
            self._changed()
            self._views.clear()
            self.horizon = horizon if self.horizon is None else max(self.horizon, horizon)
        return dropped


# ------------------------------------------------------------------------------- cover


def tool_name(call: ToolCall) -> str:
    """What grant tool patterns match against: ``server/tool``."""
    return f"{call.server}/{call.tool}"


def tools_match(grant: GrantIssued, call: ToolCall) -> bool:
    name = tool_name(call)
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in grant.tools)


def uncovered_resources(grant: GrantIssued, call: ToolCall) -> list[str]:
    """Call resources no pattern of the grant matches (none if the grant's resources are empty)."""
    if not grant.resources:
        return []
    return [r for r in call.resources if not any(fnmatch.fnmatchcase(r, p) for p in grant.resources)]


def covers(grant: GrantIssued, call: ToolCall) -> bool:
    return tools_match(grant, call) and not uncovered_resources(grant, call)


# ----------------------------------------------------------------------------- stage 1


@dataclass(frozen=True)
class Attribution:
    """Stage 1 result: who the call acts for, and a terminal verdict (1-3) or None."""

    session: SessionState
    principal: str | None
    agent_id: str | None
    verdict: Verdict | None
    reasons: tuple[str, ...]
    facts: dict[str, object] = field(default_factory=dict, hash=False)

    @property
    def terminal(self) -> bool:
        return self.verdict is not None


def _session_reason(session_id: str, s: SessionState) -> str:
    who = f"principal {s.principal!r}, agent {s.agent_id!r}"
    if s.status == "unbound":
        return f"session {session_id!r}: unbound at {_ts(s.at)} (no session_bound or session_ended at or before it)"
    if s.status == "ended":
        closed = f"; it closed binding {s.binding_event_id} ({who})" if s.binding_event_id else ""
        return f"session {session_id!r}: ended at {_ts(s.event_time)} by event {s.event_id}{closed}"
    window = f"valid from {_ts(s.valid_from)} until {_ts(s.valid_until)}"
    if s.valid:
        return f"session {session_id!r}: bound to {who} by event {s.event_id} ({window})"
    if s.valid_from is not None and s.at < s.valid_from:
        why = f"not valid until {_ts(s.valid_from)}"
    else:
        why = f"expired at {_ts(s.valid_until)}"
    return f"session {session_id!r}: bound to {who} by event {s.event_id}, but {why} ({window})"


_IDENTITY_CLAIMS: Final[tuple[tuple[str, str], ...]] = (("sub", "principal"), ("client_id", "agent_id"))


def attribute(call: ToolCall, session: SessionState) -> Attribution:
    """Stage 1: the call's identity from the session binding and ``attested`` (verdicts 1-3).

    ``claimed`` is never consulted.
    """
    return attribute_identity(call.session_id, call.attested, session)


def attribute_identity(session_id: str, attested: Mapping[str, Any] | None, session: SessionState) -> Attribution:
    """:func:`attribute` from what it reads of the call: the session id and the ``attested`` claims."""
    reasons = [_session_reason(session_id, session)]
    facts: dict[str, object] = {"session_id": session_id, "session": session.to_facts()}
    if session.status == "unbound":
        return Attribution(session, None, None, "unbound_session", tuple(reasons), facts)

    attested = attested or {}
    compared: dict[str, object] = {}
    mismatches: list[str] = []
    if session.binding_event_id is not None:
        bound = {"principal": session.principal, "agent_id": session.agent_id}
        for claim, attr in _IDENTITY_CLAIMS:
            value = attested.get(claim)
            if value is None:
                continue
            compared[claim] = value
            if value != bound[attr]:
                mismatches.append(f"attested {claim} {value!r} differs from the binding's {attr} {bound[attr]!r}")
    if compared:
        facts["attested"] = compared

    if mismatches:
        return Attribution(
            session, session.principal, session.agent_id, "identity_mismatch", (*reasons, *mismatches), facts
        )
    if not session.valid:
        return Attribution(session, session.principal, session.agent_id, "session_expired", tuple(reasons), facts)
    return Attribution(session, session.principal, session.agent_id, None, tuple(reasons), facts)


# ----------------------------------------------------------------------------- stage 2


@dataclass(frozen=True)
class Decision:
    """The verdict of one call, with the evidence it rests on.

    ``facts`` is JSON-ready: ``as_of`` (t), ``session_id``, ``session`` (status, validity, the
    deciding and binding event ids), ``attested`` (claims compared, if any) and ``grants`` (per
    grant considered: version and revocation event ids, status, whether tools match and whether it
    covers the call, and ``policy`` -- Cedar's outcome -- for an active covering grant with policies;
    empty for verdicts 1-3), and ``approval`` when an approval authorised or denied the call.

    ``approval_id``/``approver``: the approval that authorised (in_scope) or denied
    (approval_denied) the call. ``policy``: Cedar's outcome for the matched grant, when it has
    policies (None otherwise).
    """

    verdict: Verdict
    matched_grant_id: str | None
    reasons: tuple[str, ...]
    principal: str | None
    agent_id: str | None
    facts: dict[str, object] = field(default_factory=dict, hash=False)
    approval_id: str | None = None
    approver: str | None = None
    policy: PolicyOutcome | None = None


def evidence_fields(decision: Decision) -> dict[str, object]:
    """The approval and Cedar fields of an :class:`~schemas.Evidence` record for ``decision``."""
    policy = decision.policy
    return {
        "approval_id": decision.approval_id,
        "approver": decision.approver,
        "policy_versions": [] if policy is None else list(policy.versions),
        "policy_decision": None if policy is None else policy.decision,
        "policy_reasons": [] if policy is None else list(policy.determining),
        "policy_errors": [] if policy is None else list(policy.errors),
    }


GrantMatch: TypeAlias = tuple[GrantView, GrantRevoked | None, datetime, bool, Sequence[str]]
"""One grant as :func:`authorize_matched` takes it: (version view, revocation applying at ``at``, ``at``,
whether its tools match the call, the call resources none of its resource patterns match). The
uncovered resources are only read when the tools match."""


_new_object: Final = object.__new__
_set_attribute: Final = object.__setattr__


def _decision(
    verdict: Verdict,
    matched_grant_id: str | None,
    reasons: tuple[str, ...],
    principal: str | None,
    agent_id: str | None,
    facts: dict[str, object],
    approval: ApprovalDecided | None = None,
    policy: PolicyOutcome | None = None,
) -> Decision:
    """``Decision(...)`` without the frozen dataclass's per-field ``object.__setattr__`` calls."""
    decision = _new_object(Decision)
    _set_attribute(
        decision,
        "__dict__",
        {
            "verdict": verdict,
            "matched_grant_id": matched_grant_id,
            "reasons": reasons,
            "principal": principal,
            "agent_id": agent_id,
            "facts": facts,
            "approval_id": None if approval is None else approval.approval_id,
            "approver": None if approval is None else approval.approver,
            "policy": policy,
        },
    )
    return decision


def decision_of(
    t: datetime,
    verdict: Verdict,
    matched_grant_id: str | None,
    reasons: tuple[str, ...],
    principal: str | None,
    agent_id: str | None,
    attribution_facts: Mapping[str, object],
    grant_facts: Sequence[Mapping[str, object]],
) -> Decision:
    """A decision :func:`authorize_matched` gave for another call at the same ``slot`` (see
    :class:`GrantSlot`), with the same attribution, tool name and every resource covered, remade for
    a call at ``t``: only ``as_of`` differs (fresh copies of the per-grant facts)."""
    facts: dict[str, object] = {"as_of": _ts(t), **attribution_facts, "grants": [dict(g) for g in grant_facts]}
    return _decision(verdict, matched_grant_id, reasons, principal, agent_id, facts)


def _pick(candidates: list[tuple[GrantView, GrantStatus, GrantRevoked | None, bool, Sequence[str]]]) -> GrantView:
    """DESIGN tie-break: the latest not_before, then the smallest grant_id (candidates come ordered by grant_id)."""
    best = candidates[0][0]
    for row in candidates:
        if row[0].not_before > best.not_before:
            best = row[0]
    return best


def _grant_reason(
    view: GrantView,
    status: GrantStatus,
    revocation: GrantRevoked | None,
    tools_ok: bool,
    missing: Sequence[str],
    name: str,
) -> str:
    if not tools_ok:
        text = f"grant {view.grant_id}: tools {view.tools_text} do not match {name!r}"
    elif len(missing) == 1:
        text = f"grant {view.grant_id}: resource {missing[0]!r} outside {view.resources_text}"
    elif missing:
        listed = ", ".join(repr(m) for m in missing)
        text = f"grant {view.grant_id}: resources {listed} outside {view.resources_text}"
    elif status == "active":
        return f"grant {view.grant_id}: {view.describe(status, revocation)}"
    else:
        return f"grant {view.grant_id}: {view.describe(status, revocation)}; it covers {name!r}"
    return text if status == "active" else f"{text}; also {view.describe(status, revocation)}"


def _grant_facts(
    v: GrantView, st: GrantStatus, r: GrantRevoked | None, ok: bool, miss: Sequence[str]
) -> dict[str, object]:
    facts: dict[str, object] = {
        "grant_id": v.grant_id,
        "version_event_id": v.event_id,
        "revocation_event_id": None if r is None else r.event_id,
        "status": st,
        "tools_match": ok,
        "covers": ok and not miss,
    }
    if v.hashes:  # the record hashes, when the history keeps them (live)
        facts["version_hash"] = v.hashes.get(v.event_id)
        if r is not None:
            facts["revocation_hash"] = v.hashes.get(r.event_id)
    return facts


def authorize(call: ToolCall, attribution: Attribution, grants: Sequence[GrantState]) -> Decision:
    """Stage 2: verdicts 4-10 from the delegation's grants at the call's event_time.

    ``grants`` is :meth:`GrantHistory.grants_at` for the attribution's delegation at
    ``call.event_time`` (grants issued after t must not be passed). An attribution that already
    holds a terminal verdict is returned as the decision unchanged.
    """
    matched: list[GrantMatch] = []
    if attribution.verdict is None:
        for g in sorted(grants, key=lambda g: g.grant_id):
            tools_ok = tools_match(g.version, call)
            missing = uncovered_resources(g.version, call) if tools_ok else ()
            matched.append((GrantView(g.version), g.revocation, g.at, tools_ok, missing))
    return authorize_matched(
        call.event_time,
        call.tenant,
        tool_name(call),
        attribution.verdict,
        attribution.principal,
        attribution.agent_id,
        attribution.reasons,
        attribution.facts,
        matched,
    )


def authorize_matched(
    t: datetime,
    tenant: str,
    name: str,
    terminal: Verdict | None,
    principal: str | None,
    agent_id: str | None,
    reasons: tuple[str, ...],
    attribution_facts: Mapping[str, object],
    grants: Sequence[GrantMatch],
    *,
    permits: Mapping[str, PolicyOutcome] | None = None,
    approval_of: Callable[[], ApprovalStatus] | None = None,
) -> Decision:
    """:func:`authorize` from the parts of the call and attribution it reads, pattern matching done.

    ``name`` is :func:`tool_name` of the call; ``terminal``, ``principal``, ``agent_id``, ``reasons``
    and ``attribution_facts`` are the attribution's; ``grants`` are ordered by grant_id. Matching is
    left to the caller so that it can keep compiled matchers per grant version.

    ``permits``: Cedar's outcome by grant_id for the active covering grants that have policies
    (:func:`policy_checks` and :func:`detections.policy.evaluate` make them); a grant with policies
    and no outcome here permits nothing (fail closed). ``approval_of``: called (at most once) when the
    call needs an approval under every active covering permitting grant, for the call's
    :class:`~detections.approvals.ApprovalStatus` given the approvals earlier calls used; None: no
    approval exists. Without grants that have policies or approval tools neither is read.
    """
    base_facts: dict[str, object] = {"as_of": _ts(t), **attribution_facts}
    if terminal is not None:
        return _decision(terminal, None, reasons, principal, agent_id, {**base_facts, "grants": []})
    rows: list[tuple[GrantView, GrantStatus, GrantRevoked | None, bool, Sequence[str]]] = []
    covering: list[tuple[GrantView, GrantStatus, GrantRevoked | None, bool, Sequence[str]]] = []
    for view, revocation, at, tools_ok, missing in grants:
        if view.issued > t:
            continue
        row = (view, view.status_at(at, revocation), revocation, tools_ok, missing)
        rows.append(row)
        if tools_ok and not missing:
            covering.append(row)

    verdict: Verdict
    matched: GrantView | None = None
    approval: ApprovalDecided | None = None
    status: ApprovalStatus | None = None
    active = [row for row in covering if row[1] == "active"]
    if active and not any(row[0].version.policies or row[0].version.approval_tools for row in active):
        verdict, matched = "in_scope", _pick(active)
        headline = f"in_scope: grant {matched.grant_id} is active and covers {name!r}"
    elif active:
        permitting = [row for row in active if _permits(row[0], permits)]
        if not permitting:
            verdict, matched = "out_of_policy", _pick(active)
            headline = f"out_of_policy: grant {matched.grant_id} covers {name!r} but its policies do not permit it"
        elif free := [row for row in permitting if not _needs_approval(row[0], name)]:
            verdict, matched = "in_scope", _pick(free)
            headline = f"in_scope: grant {matched.grant_id} is active, covers and permits {name!r}"
        else:
            matched = _pick(permitting)
            status = approval_of() if approval_of is not None else ApprovalStatus()
            if status.denied is not None:
                verdict, approval = "approval_denied", status.denied
                headline = (
                    f"approval_denied: grant {matched.grant_id} needs an approval for {name!r} and "
                    f"{approval.approver} denied it (approval {approval.approval_id})"
                )
            elif status.available is not None:
                verdict, approval = "in_scope", status.available
                headline = (
                    f"in_scope: grant {matched.grant_id} covers and permits {name!r}, approved by "
                    f"{approval.approver} (approval {approval.approval_id}, now used)"
                )
            else:
                verdict = "approval_missing"
                headline = (
                    f"approval_missing: grant {matched.grant_id} needs an approval for {name!r} and no unused "
                    f"approval authorises it ({status.candidates} candidate(s) at {_ts(t)})"
                )
    elif not rows:
        verdict = "no_grant"
        headline = f"no_grant: delegation {tenant}/{principal}/{agent_id} has no grant issued at or before {_ts(t)}"
    elif revoked := [row for row in covering if row[1] == "revoked"]:
        verdict, matched = "revoked_grant", _pick(revoked)
        headline = f"revoked_grant: grant {matched.grant_id} covers {name!r} but is revoked"
    elif expired := [row for row in covering if row[1] == "expired"]:
        # no covering grant is revoked here, so "expired" is GrantState.expired
        verdict, matched = "expired_grant", _pick(expired)
        headline = f"expired_grant: grant {matched.grant_id} covers {name!r} but has expired"
    elif early := [row for row in covering if row[1] == "not_yet_valid"]:
        verdict, matched = "not_yet_valid", _pick(early)
        headline = f"not_yet_valid: grant {matched.grant_id} covers {name!r} but is not valid yet"
    elif not any(row[3] for row in rows):
        verdict = "out_of_scope_tool"
        headline = f"out_of_scope_tool: no grant's tools match {name!r}"
    else:
        verdict = "out_of_scope_resource"
        headline = f"out_of_scope_resource: a grant's tools match {name!r}, but not every resource is covered"

    grant_reasons = [_grant_reason(v, st, r, ok, miss, name) for v, st, r, ok, miss in rows]
    grant_facts = [_grant_facts(v, st, r, ok, miss) for v, st, r, ok, miss in rows]
    policy: PolicyOutcome | None = None
    if active:
        # Cedar's outcomes (and the fail-closed ones) of the active covering grants with policies.
        for i, (v, st, _r, ok, miss) in enumerate(rows):
            if not (v.version.policies and st == "active" and ok and not miss):
                continue
            outcome = _outcome_of(v, permits)
            grant_facts[i]["policy"] = outcome.to_facts()
            grant_reasons[i] += f"; {_policy_reason(outcome)}"
            if matched is not None and v.grant_id == matched.grant_id:
                policy = outcome
    facts: dict[str, object] = {**base_facts, "grants": grant_facts}
    if status is not None:
        shown = approval or status.denied or status.available
        facts["approval"] = {
            "needed": True,
            "approval_id": None if shown is None else shown.approval_id,
            "event_id": None if shown is None else shown.event_id,
            "decision": None if shown is None else shown.decision,
            "approver": None if shown is None else shown.approver,
            "decided_at": None if shown is None else _ts(shown.event_time),
            "candidates": status.candidates,
        }
    return _decision(
        verdict,
        None if matched is None else matched.grant_id,
        (*reasons, headline, *grant_reasons),
        principal,
        agent_id,
        facts,
        approval,
        policy,
    )


def _outcome_of(view: GrantView, permits: Mapping[str, PolicyOutcome] | None) -> PolicyOutcome:
    outcome = None if permits is None else permits.get(view.grant_id)
    if outcome is None:
        return PolicyOutcome(False, (), None, (), ("policies were not evaluated for this call (fail closed)",))
    return outcome


def _permits(view: GrantView, permits: Mapping[str, PolicyOutcome] | None) -> bool:
    """Whether the grant's policies permit the call (a grant without policies permits every call it covers)."""
    if not view.version.policies:
        return True
    outcome = None if permits is None else permits.get(view.grant_id)
    return outcome is not None and outcome.permitted


def _needs_approval(view: GrantView, name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in view.version.approval_tools)


def _policy_reason(outcome: PolicyOutcome) -> str:
    used = ", ".join(outcome.versions) or "none"
    if outcome.decision is None:
        text = f"policies [{used}] permit nothing here (fail closed)"
    else:
        text = f"policies [{used}]: Cedar says {outcome.decision}"
        if outcome.determining:
            text += f" (determined by {', '.join(outcome.determining)})"
    if outcome.errors:
        text += f"; errors: {'; '.join(outcome.errors)}"
    return text


# ------------------------------------------------------------------------- delegations


def policy_checks(
    call: ToolCall,
    principal: str,
    agent_id: str,
    grants: Sequence[tuple[GrantView, GrantRevoked | None]],
    store: PolicyStore | None,
) -> list[PolicyCheck]:
    """The Cedar requests a call needs: one per active grant that covers it and has policies.

    ``grants`` is :meth:`GrantHistory.views_at` at the call's event_time. Evaluate them (batched,
    with other calls' checks) with :func:`detections.policy.evaluate`, then pass
    ``{c.grant_id: c.outcome for c in checks}`` as ``permits`` to :func:`authorize_matched`.
    """
    t = call.event_time
    checks: list[PolicyCheck] = []
    for view, revocation in grants:
        version = view.version
        if not version.policies or view.issued > t or view.status_at(t, revocation) != "active":
            continue
        if tools_match(version, call) and not uncovered_resources(version, call):
            checks.append(
                PolicyCheck(call, principal, agent_id, view.grant_id, version.purpose, version.policies, store)
            )
    return checks


def authorize_delegation(
    items: Sequence[tuple[ToolCall, Attribution]],
    grants: GrantHistory | None,
    approvals: ApprovalHistory | None = None,
    policies: PolicyStore | None = None,
    used: Mapping[str, str] | None = None,
    ahead: Outcomes | None = None,
) -> tuple[list[Decision], dict[str, str]]:
    """Stage 2 for several calls of one delegation at once: verdicts 4-13, policies and approvals.

    ``items``: calls with their attributions (a terminal attribution is returned unchanged).
    ``grants``/``approvals``: the delegation's histories; ``policies``: every tenant's policies.
    ``used``: approval_id -> call_id of approvals used by calls *before* these (already final).
    ``ahead``: Cedar outcomes asked ahead (:class:`~detections.policy.Outcomes`; same verdicts).

    Cedar requests of all the calls are evaluated first, in batches; then the calls are judged in
    (event_time, call_id, event_id) order, each taking the earliest-issued unused approval it needs
    (DESIGN's single-use rule). Returns the decisions in input order and the uses after them
    (``used`` plus the approvals these calls used, approval_id -> call_id).

    **Live use (stage 2).** Keep per delegation the grant and approval histories, the global
    :class:`~detections.policy.PolicyStore`, the uses of calls already final, and the open calls
    (within grace) in order. When a call or a fact of the delegation arrives, call this with *every
    open call of the delegation* (sorted or not) and the uses of the final calls before them: a late
    approval, or an earlier-event-time call that arrives after a later one and takes its approval,
    then changes the later call's verdict as replay would. When a call becomes final, move its use
    (if ``decision.approval_id`` and the verdict is ``in_scope``) into the final uses. A call whose
    facts arrive after grace keeps its final verdict (an amendment is recorded). With no policies and
    no approval tools on the grants, the decisions equal :func:`authorize`'s.
    """
    ledger: dict[str, str] = dict(used or {})
    order = sorted(range(len(items)), key=lambda i: (items[i][0].event_time, items[i][0].call_id, items[i][0].event_id))
    views: dict[int, list[tuple[GrantView, GrantRevoked | None]]] = {}
    checks: dict[int, list[PolicyCheck]] = {}
    for i, (call, a) in enumerate(items):
        if a.verdict is not None or a.principal is None or a.agent_id is None:
            continue
        views[i] = [] if grants is None else grants.views_at(call.event_time)
        checks[i] = policy_checks(call, a.principal, a.agent_id, views[i], policies)
    evaluate([c for cs in checks.values() for c in cs], ahead)
    decisions: list[Decision | None] = [None] * len(items)
    for i in order:
        call, a = items[i]
        if i not in views:
            decisions[i] = authorize(call, a, [])
            continue
        t, name = call.event_time, tool_name(call)
        matched: list[GrantMatch] = []
        for view, revocation in views[i]:
            ok = tools_match(view.version, call)
            matched.append((view, revocation, t, ok, uncovered_resources(view.version, call) if ok else ()))
        permits = {c.grant_id: c.outcome for c in checks[i] if c.outcome is not None}

        def approval_of(call: ToolCall = call, name: str = name) -> ApprovalStatus:
            if approvals is None or not len(approvals):
                return ApprovalStatus()
            return approvals.status(name, arguments_digest(call.arguments), call.event_time, ledger)

        decision = authorize_matched(
            t,
            call.tenant,
            name,
            None,
            a.principal,
            a.agent_id,
            a.reasons,
            a.facts,
            matched,
            permits=permits,
            approval_of=approval_of,
        )
        if decision.verdict == "in_scope" and decision.approval_id is not None:
            ledger[decision.approval_id] = call.call_id
        decisions[i] = decision
    return [d for d in decisions if d is not None], ledger


# ------------------------------------------------------------------------------ engine


class DecisionEngine:
    """Session, consent, approval and policy histories for every key, and the full decision over them.

    Tenants never mix: sessions are keyed by (tenant, session_id), delegations (grants, approvals) by
    (tenant, principal, agent_id) and policies by (tenant, policy_id).
    """

    def __init__(self) -> None:
        self._sessions: dict[tuple[str, str], SessionHistory] = {}
        self._grants: dict[tuple[str, str, str], GrantHistory] = {}
        self._approvals: dict[tuple[str, str, str], ApprovalHistory] = {}
        self.policies: Final = PolicyStore()

    def add_fact(self, event: BaseEvent) -> bool:
        """Store a session, consent, approval or policy fact; False for a duplicate event_id.

        Raises TypeError for anything else (``tool_call``/``tool_result`` are not facts).
        """
        if isinstance(event, (SessionBound, SessionEnded)):
            skey = (event.tenant, event.session_id)
            history = self._sessions.get(skey)
            if history is None:
                history = self._sessions[skey] = SessionHistory(*skey)
            return history.add(event)
        if isinstance(event, (GrantIssued, GrantRevoked)):
            gkey = (event.tenant, event.principal, event.agent_id)
            grants = self._grants.get(gkey)
            if grants is None:
                grants = self._grants[gkey] = GrantHistory(*gkey)
            return grants.add(event)
        if isinstance(event, ApprovalDecided):
            akey = (event.tenant, event.principal, event.agent_id)
            approvals = self._approvals.get(akey)
            if approvals is None:
                approvals = self._approvals[akey] = ApprovalHistory(*akey)
            return approvals.add(event)
        if isinstance(event, PolicyPublished):
            return self.policies.add(event)
        raise TypeError(f"not a session or consent fact: {type(event).__name__}")

    def session_state(self, tenant: str, session_id: str, t: datetime) -> SessionState:
        history = self._sessions.get((tenant, session_id))
        return SessionState.unbound(t) if history is None else history.state_at(t)

    def grants_at(self, tenant: str, principal: str, agent_id: str, t: datetime) -> list[GrantState]:
        history = self._grants.get((tenant, principal, agent_id))
        return [] if history is None else history.grants_at(t)

    def decide(self, call: ToolCall) -> Decision:
        """The decision of one call judged alone (no other call has used an approval; see :meth:`decide_all`)."""
        return self.decide_all([call])[0]

    def decide_all(self, calls: Sequence[ToolCall]) -> list[Decision]:
        """Replay semantics for a set of calls: each delegation's calls judged together (Cedar batched,
        approvals used in (event_time, call_id) order). Decisions in input order."""
        by_delegation: dict[tuple[str, str, str] | None, list[int]] = {}
        attributions: list[Attribution] = []
        for i, call in enumerate(calls):
            a = attribute(call, self.session_state(call.tenant, call.session_id, call.event_time))
            attributions.append(a)
            key = (
                None
                if a.terminal or a.principal is None or a.agent_id is None
                else (call.tenant, a.principal, a.agent_id)
            )
            by_delegation.setdefault(key, []).append(i)
        out: list[Decision | None] = [None] * len(calls)
        for key, indexes in by_delegation.items():
            items = [(calls[i], attributions[i]) for i in indexes]
            if key is None:
                decisions = [authorize(c, a, []) for c, a in items]
            else:
                decisions, _used = authorize_delegation(
                    items, self._grants.get(key), self._approvals.get(key), self.policies
                )
            for i, d in zip(indexes, decisions, strict=True):
                out[i] = d
        for call, found in zip(calls, out, strict=True):
            # DESIGN "Retention": a call before the horizon of a compacted history it was judged on.
            assert found is not None
            d = found
            incomplete = []
            session = self._sessions.get((call.tenant, call.session_id))
            if session is not None and session.horizon is not None and call.event_time < session.horizon:
                incomplete.append("session")
            if d.verdict not in TERMINAL_VERDICTS and d.principal is not None and d.agent_id is not None:
                grants = self._grants.get((call.tenant, d.principal, d.agent_id))
                if grants is not None and grants.horizon is not None and call.event_time < grants.horizon:
                    incomplete.append("grants")
            if incomplete:
                d.facts.update({"history_complete": False, "history_incomplete": incomplete})
        return [d for d in out if d is not None]

    def compact(self, horizon: datetime) -> int:
        """Forget facts that cannot change a verdict for calls at or after ``horizon``."""
        dropped = 0
        for sk in list(self._sessions):
            dropped += self._sessions[sk].compact(horizon)
        for gk in list(self._grants):
            dropped += self._grants[gk].compact(horizon)
        return dropped
