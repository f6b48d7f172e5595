"""The rule format (DESIGN.md, "Detections").

A rule is one module ``detections/rules/<id>.py`` that defines ``RULE``, a :class:`Rule`:

* ``meta`` -- :class:`RuleMeta`, validated when the module is imported: id (equal to the module
  name, checked by the catalog), version, title, severity, kind (``per_call`` or ``sequence``),
  numbered runbook steps, and mappings to the OWASP Top 10 for Agentic Applications (``ASI01``..
  ``ASI10``) and MITRE ATLAS techniques (``AML.T0053``), checked by the catalog against
  ``detections/taxonomy.json``;
* ``evaluate`` -- the one pure function ``(call, decision, ctx) -> list[Finding]``. It reads no
  clock (time is ``call.event_time``) and does no I/O; a sequence rule keeps what it needs in
  ``ctx.state``, its own bounded per-delegation state object, which it mutates in place;
* ``new_state`` -- makes that state for a new delegation (sized from the configuration);
* ``codec`` -- for a sequence rule, a :class:`StateCodec`: how its state encodes to bytes and
  decodes back, with a version tag first (the live job keeps the state in a changelog, so it
  survives a crash or a rebalance; never pickle);
* ``cases`` -- positive and negative :class:`Case` values: canonical events judged as
  ``scopewatch replay`` judges them, and the call ids on which the rule must fire (none for a
  negative case).

Sequence state is kept per *delegation key* (:func:`delegation_key`): (tenant, principal,
agent_id) when the decision names a principal and agent, else (tenant, session id).
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, Final, Generic, Literal, TypeAlias, TypeVar

import orjson
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints

from detections.engine import Decision, GrantState, Verdict
from detections.findings import Detail, Finding, ForensicQuery, Severity, dedup_key, finding_id, new_finding
from schemas import BaseEvent, ToolCall

__all__ = [
    "DEFAULT_EXTERNAL_SENDS",
    "DEFAULT_SENSITIVE_READS",
    "Case",
    "DetectionConfig",
    "Lru",
    "NoState",
    "Rule",
    "RuleContext",
    "RuleKind",
    "RuleMeta",
    "StateCodec",
    "StateDecodeError",
    "delegation_key",
    "from_micros",
    "glob_matcher",
    "headline",
    "matches",
    "micros",
    "negative",
    "per_call_rule",
    "positive",
    "stored_int",
    "stored_text",
]

RuleKind: TypeAlias = Literal["per_call", "sequence"]

_Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1)]
OwaspId = Annotated[str, StringConstraints(pattern=r"^ASI\d{2}$")]
AtlasId = Annotated[str, StringConstraints(pattern=r"^AML\.T\d{4}(\.\d{3})?$")]


def _unique(values: tuple[str, ...]) -> tuple[str, ...]:
    if len(set(values)) != len(values):
        raise ValueError(f"duplicate entries in {list(values)!r}")
    return values


class RuleMeta(BaseModel):
    """Typed, validated metadata of a rule (strict: tuples, ints and strings only)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    id: Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_]{0,62}$")]
    version: int = Field(ge=1)
    title: Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, max_length=120)]
    severity: Severity
    kind: RuleKind
    runbook: Annotated[tuple[_Text, ...], Field(min_length=1)]
    owasp: Annotated[tuple[OwaspId, ...], Field(min_length=1), AfterValidator(_unique)]
    atlas: Annotated[tuple[AtlasId, ...], Field(min_length=1), AfterValidator(_unique)]

    def numbered_runbook(self) -> list[str]:
        return [f"{n}. {step}" for n, step in enumerate(self.runbook, start=1)]


# ------------------------------------------------------------------------ configuration

DEFAULT_SENSITIVE_READS: Final[tuple[str, ...]] = (
    "*/read_file",
    "*/read_text_file",
    "*/read_media_file",
    "*/read_multiple_files",
    "*/get_file_contents",
    "*/get_secret*",
    "*/read_secret*",
    "*/export_*",
    "*/query_database",
    "vault/*",
)
"""``server/tool`` globs of calls that read sensitive data."""

DEFAULT_EXTERNAL_SENDS: Final[tuple[str, ...]] = (
    "*/send",
    "*/send_*",
    "*/post_*",
    "*/http_request",
    "*/http_post",
    "*/fetch",
    "*/upload*",
    "*/webhook*",
    "*/create_gist",
)
"""``server/tool`` globs of calls that send data out of the organisation."""


def _positive(value: timedelta) -> timedelta:
    if value <= timedelta(0):
        raise ValueError("must be a positive duration")
    return value


def _not_negative(value: timedelta) -> timedelta:
    if value < timedelta(0):
        raise ValueError("must not be negative")
    return value


_Window = Annotated[timedelta, AfterValidator(_positive)]


class DetectionConfig(BaseModel):
    """Knobs of the sequence rules; defaults are what replay and the live job use unless told."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    sensitive_reads: tuple[str, ...] = DEFAULT_SENSITIVE_READS
    external_sends: tuple[str, ...] = DEFAULT_EXTERNAL_SENDS
    exfiltration_window: _Window = timedelta(minutes=10)
    burst_threshold: int = Field(default=5, ge=2)
    burst_window: _Window = timedelta(seconds=60)
    first_use_learning: _Window = timedelta(hours=1)
    revocation_tolerance: Annotated[timedelta, AfterValidator(_not_negative)] = timedelta(seconds=5)
    approval_max_age: Annotated[timedelta, AfterValidator(_not_negative)] = timedelta(hours=1)
    """``approval_latency`` fires on an approval used more than this long after it was given."""
    max_entries: int = Field(default=64, ge=1)
    """Cap on the items one sequence rule remembers for one delegation (oldest evicted first)."""
    max_delegations: int = Field(default=10_000, ge=1)
    """Cap on the delegations a :class:`~detections.catalog.Detector` keeps state for (LRU)."""


K = TypeVar("K")
V = TypeVar("V")


class Lru(OrderedDict[K, V]):
    """A dict of at most ``cap`` keys: a key set becomes the newest, and the oldest is evicted
    (``on_evict`` is told each evicted key)."""

    def __init__(self, cap: int, on_evict: Callable[[K], object] | None = None) -> None:
        super().__init__()
        self.cap: Final = cap
        self.on_evict: Final = on_evict

    def __setitem__(self, key: K, value: V) -> None:
        _setitem(self, key, value)
        self.move_to_end(key)
        if len(self) > self.cap:
            while len(self) > self.cap:
                evicted = self.popitem(last=False)[0]
                if self.on_evict is not None:
                    self.on_evict(evicted)


_setitem: Final = OrderedDict.__setitem__


@functools.lru_cache(maxsize=8192)
def glob_matcher(patterns: tuple[str, ...]) -> Callable[[str], object]:
    """One compiled test for "some glob of ``patterns`` matches" (``fnmatch.fnmatchcase`` semantics).

    The patterns' ``fnmatch.translate`` forms joined by ``|`` (each ends in ``\\Z``; fnmatch keeps
    them joinable), so one regex match replaces one ``fnmatchcase`` per pattern. The test returns
    None (no match) or a match object.
    """
    if not patterns:
        return _no_match
    return re.compile("|".join(fnmatch.translate(p) for p in patterns)).match


def _no_match(_name: str) -> None:
    return None


_MATCHES: dict[int, tuple[object, dict[str, bool]]] = {}  # id(patterns) -> (patterns, name -> result)


def matches(patterns: Iterable[str], name: str) -> bool:
    """Whether some glob (``fnmatch.fnmatchcase``, as grants use) matches ``name``.

    Results are kept per patterns object (a configuration's tuple) and name, the few tool names seen.
    """
    known = _MATCHES.get(id(patterns))
    if known is None or known[0] is not patterns:
        if not isinstance(patterns, tuple):
            return glob_matcher(tuple(patterns))(name) is not None
        if len(_MATCHES) >= 64:
            _MATCHES.clear()
        known = _MATCHES[id(patterns)] = (patterns, {})
    results = known[1]
    found = results.get(name)
    if found is None:
        if len(results) >= 4096:
            results.clear()
        found = results[name] = glob_matcher(tuple(patterns))(name) is not None
    return found


# ----------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """Events judged with all facts known; the rule must fire on exactly ``fires_on``."""

    name: str
    events: tuple[BaseEvent, ...]
    fires_on: tuple[str, ...] = ()
    config: DetectionConfig = field(default_factory=DetectionConfig)
    compact_before: datetime | None = None
    """Judge after compacting the histories at this horizon (as the live pipeline does past its
    retention): for rules about incomplete history."""

    @property
    def positive(self) -> bool:
        return bool(self.fires_on)

    @property
    def call_ids(self) -> tuple[str, ...]:
        return tuple(e.call_id for e in self.events if isinstance(e, ToolCall))


def positive(
    name: str,
    *events: BaseEvent,
    fires_on: Sequence[str],
    config: DetectionConfig | None = None,
    compact_before: datetime | None = None,
) -> Case:
    return Case(name, events, tuple(fires_on), config or DetectionConfig(), compact_before)


def negative(
    name: str, *events: BaseEvent, config: DetectionConfig | None = None, compact_before: datetime | None = None
) -> Case:
    return Case(name, events, (), config or DetectionConfig(), compact_before)


# ----------------------------------------------------------------------------- context


def delegation_key(call: ToolCall, decision: Decision) -> tuple[str, ...]:
    """Whose sequence state a call belongs to: its delegation, or its session if it has none."""
    if decision.principal is not None and decision.agent_id is not None:
        return (call.tenant, decision.principal, decision.agent_id)
    return (call.tenant, f"session:{call.session_id}")


def headline(decision: Decision) -> str | None:
    """The engine's reason that states the verdict (the last reason for verdicts 1-3)."""
    prefix = f"{decision.verdict}:"
    stated = [r for r in decision.reasons if r.startswith(prefix)]
    return stated[0] if stated else (decision.reasons[-1] if decision.reasons else None)


S = TypeVar("S")


@dataclass(frozen=True)
class NoState:
    """The state of a per-call rule: nothing."""


@dataclass
class RuleContext(Generic[S]):
    """What a rule sees besides the call and its decision.

    ``grants`` maps grant ids to their :class:`GrantState` at the call's event_time (what stage 2
    passed to ``authorize``); it may be empty when the caller has none, and rules that need a
    grant's issue or revocation time then stay silent.
    """

    meta: RuleMeta
    config: DetectionConfig
    state: S
    grants: Mapping[str, GrantState] = field(default_factory=dict)

    def grant(self, grant_id: str | None) -> GrantState | None:
        return None if grant_id is None else self.grants.get(grant_id)

    def finding(
        self,
        call: ToolCall,
        decision: Decision,
        *,
        summary: str,
        key: Sequence[str],
        query: ForensicQuery,
        call_ids: Sequence[str] = (),
        grant_id: str | None = None,
        first_call_time: datetime | None = None,
        details: Mapping[str, Detail] | None = None,
    ) -> Finding:
        """A finding of this rule on ``call``; ``key`` discriminates within the delegation.

        ``call_ids`` are earlier calls involved (the triggering call is appended).
        """
        meta = self.meta
        dkey = dedup_key(meta.id, (*delegation_key(call, decision), *key))
        t = call.event_time
        return new_finding(
            finding_id=finding_id(meta.id, dkey, call.call_id),
            dedup_key=dkey,
            rule_id=meta.id,
            rule_version=meta.version,
            severity=meta.severity,
            title=meta.title,
            summary=summary,
            tenant=call.tenant,
            principal=decision.principal,
            agent_id=decision.agent_id,
            call_id=call.call_id,
            first_call_time=min(first_call_time or t, t),
            last_call_time=t,
            call_ids=(*call_ids, call.call_id),
            session_id=call.session_id,
            grant_id=grant_id,
            query=query,
            details=dict(details or {}),
        )

    def on_verdict(
        self,
        call: ToolCall,
        decision: Decision,
        verdict: Verdict,
        *,
        summary: str,
        key: Sequence[str],
        query: ForensicQuery,
    ) -> list[Finding]:
        """The per-call rule shape: one finding iff the decision has ``verdict``."""
        if decision.verdict != verdict:
            return []
        return [
            self.finding(
                call,
                decision,
                summary=summary,
                key=key,
                query=query,
                grant_id=decision.matched_grant_id,
                details={"verdict": verdict, "reason": headline(decision)},
            )
        ]


# ------------------------------------------------------------------------ state codecs

_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO: Final = timedelta(microseconds=1)


_MICROS: Final[dict[datetime, int]] = {}
_MICROS_SIZE: Final = 65_536


def micros(dt: datetime) -> int:
    """Microseconds since the epoch: how state codecs store instants (exact).

    Remembered by instant (a bounded dict; equal instants are equal keys, whatever their time zone,
    and a naive datetime never equals an aware one): a delegation's sequence states are encoded
    again at every batch that changes them, with mostly the same instants each time."""
    value = _MICROS.get(dt)
    if value is None:
        value = (dt - _EPOCH) // _MICRO
        if len(_MICROS) >= _MICROS_SIZE:
            _MICROS.clear()
        _MICROS[dt] = value
    return value


def from_micros(value: int) -> datetime:
    """The UTC instant ``value`` microseconds after the epoch (inverse of :func:`micros`)."""
    if type(value) is not int:
        raise TypeError(f"an instant is an integer number of microseconds, not {type(value).__name__}")
    return _EPOCH + timedelta(microseconds=value)


def stored_text(value: object) -> str:
    """``value`` if it is a string (what a state codec reads back), else TypeError."""
    if type(value) is not str:
        raise TypeError(f"expected a string, got {type(value).__name__}")
    return value


def stored_int(value: object) -> int:
    """``value`` if it is an integer (not a bool), else TypeError."""
    if type(value) is not int:
        raise TypeError(f"expected an integer, got {type(value).__name__}")
    return value


class StateDecodeError(ValueError):
    """Stored sequence state that does not decode: ``reason`` is ``unknown_version`` (a format this
    code does not know, e.g. written by a newer release) or ``malformed``."""

    def __init__(self, reason: Literal["unknown_version", "malformed"], detail: str) -> None:
        self.reason: Final = reason
        super().__init__(f"{reason}: {detail}")


@dataclass(frozen=True)
class StateCodec(Generic[S]):
    """How a sequence rule's state becomes bytes and back, without pickle.

    The bytes are one JSON array ``[version, *dump(state)]``: the version tag first, then what
    ``dump`` makes of the state (JSON values only: strings, integers, lists, null; instants as
    :func:`micros`). ``load`` is the inverse of ``dump`` for ``version``; ``older`` maps earlier
    versions to their own loaders, so a rule that changes its state shape bumps ``version`` and
    keeps reading what was stored before. Any other version raises :class:`StateDecodeError`
    (``unknown_version``): the caller starts that state afresh and counts it, it never crashes.
    The encoding never contains a raw newline (JSON), so stores can frame states by lines.
    """

    version: int
    dump: Callable[[S], list[Any]]
    load: Callable[[list[Any], DetectionConfig], S]
    older: Mapping[int, Callable[[list[Any], DetectionConfig], S]] = field(default_factory=dict)

    def encode(self, state: S) -> bytes:
        return orjson.dumps([self.version, *self.dump(state)])

    def decode(self, data: bytes, config: DetectionConfig) -> S:
        try:
            value = orjson.loads(data)
        except ValueError as exc:
            raise StateDecodeError("malformed", f"not JSON ({exc})") from None
        if type(value) is not list or not value or type(value[0]) is not int:
            raise StateDecodeError("malformed", "not a JSON array with an integer version first")
        version = value[0]
        load = self.load if version == self.version else self.older.get(version)
        if load is None:
            raise StateDecodeError("unknown_version", f"state version {version} (this code reads {self.version})")
        try:
            return load(value[1:], config)
        except (TypeError, ValueError, KeyError, IndexError, OverflowError) as exc:
            raise StateDecodeError("malformed", f"version {version}: {type(exc).__name__}: {exc}") from None


# ------------------------------------------------------------------------------- rules

Evaluate: TypeAlias = Callable[[ToolCall, Decision, RuleContext[S]], list[Finding]]


@dataclass(frozen=True)
class Rule(Generic[S]):
    """A detection rule: metadata, its one pure function, its state factory and its cases."""

    meta: RuleMeta
    evaluate: Evaluate[S]
    cases: tuple[Case, ...]
    new_state: Callable[[DetectionConfig], S]
    verdicts: frozenset[Verdict] | None = None
    """The verdicts on which ``evaluate`` can fire or change its state (None: any). The detector does
    not call it for the others, so a rule that returns early on most verdicts costs nothing there."""
    codec: StateCodec[S] | None = None
    """How the state of a sequence rule is stored (required for them, None for per-call rules)."""

    @property
    def id(self) -> str:
        return self.meta.id


def _no_state(_config: DetectionConfig) -> NoState:
    return NoState()


def per_call_rule(
    meta: RuleMeta, evaluate: Evaluate[NoState], cases: Sequence[Case], verdicts: Iterable[Verdict] | None = None
) -> Rule[NoState]:
    """A rule that looks at one call and its decision only (``verdicts``: see :attr:`Rule.verdicts`)."""
    return Rule(meta, evaluate, tuple(cases), _no_state, None if verdicts is None else frozenset(verdicts))
