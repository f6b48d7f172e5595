"""The rule catalog: discovery, validation, the evaluator and the case runner.

* :func:`load_catalog` imports every module of ``detections.rules`` (names starting with ``_``
  skipped) and validates it; every problem found is reported at once in one :class:`CatalogError`:
  a module that does not import (metadata failing validation raises at import), no ``RULE``, an
  id that differs from the module name, a duplicate id, a kind that does not fit the rule's state
  (``per_call`` rules keep :class:`NoState`, sequence rules their own), a sequence rule without a
  state codec (``Rule.codec``, how the live job stores its state), ``Rule.verdicts`` naming a
  verdict that does not exist, an OWASP or ATLAS id missing from
  ``detections/taxonomy.json``, no positive or no negative case, duplicate case names, or a
  case expecting a finding on a call it does not contain.
* :class:`Detector` runs the rules over ``(call, decision)`` pairs and keeps the sequence state of
  at most ``config.max_delegations`` delegations (least recently used evicted). It is pure: time is
  each call's event_time. Sequence rules assume each delegation's calls come in event_time order.
  A rule is only called on the verdicts its ``Rule.verdicts`` names (all if None): per-call rules
  name the one verdict they report, so a common in-scope call runs only the sequence rules.
* :func:`judge` is replay semantics (DESIGN.md): all facts known, every call decided, and the
  detector fed the calls in (event_time, call_id, event_id) order, which orders each delegation's
  calls; results come back in input order. ``scopewatch replay`` and the rule cases use it.
"""

from __future__ import annotations

import functools
import importlib
import json
import pkgutil
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from importlib import resources
from types import ModuleType
from typing import Any, Final

from detections.engine import VERDICTS, Decision, DecisionEngine, GrantState
from detections.findings import Finding
from detections.rulebase import Case, DetectionConfig, Lru, NoState, Rule, RuleContext
from schemas import (
    ApprovalDecided,
    BaseEvent,
    GrantIssued,
    GrantRevoked,
    PolicyPublished,
    SessionBound,
    SessionEnded,
    ToolCall,
)

__all__ = [
    "RULES_PACKAGE",
    "CaseResult",
    "Catalog",
    "CatalogError",
    "Detector",
    "Judged",
    "Taxonomy",
    "build_catalog",
    "default_catalog",
    "discover",
    "judge",
    "load_catalog",
    "load_taxonomy",
    "run_case",
]

RULES_PACKAGE: Final = "detections.rules"


class CatalogError(ValueError):
    """The rule catalog is broken; the message lists every problem, one per line."""

    def __init__(self, problems: Sequence[str]) -> None:
        self.problems: Final = tuple(problems)
        super().__init__("invalid rule catalog:\n" + "\n".join(f"  - {p}" for p in problems))


# ---------------------------------------------------------------------------- taxonomy


@dataclass(frozen=True)
class Taxonomy:
    """Allowed mapping ids with their names: OWASP Agentic Top 10 and MITRE ATLAS techniques."""

    owasp: Mapping[str, str]
    atlas: Mapping[str, str]

    @classmethod
    def from_json(cls, text: str) -> Taxonomy:
        data = json.loads(text)
        return cls(owasp=dict(data["owasp_agentic"]["ids"]), atlas=dict(data["mitre_atlas"]["ids"]))


def load_taxonomy() -> Taxonomy:
    """``detections/taxonomy.json``, the taxonomy kept in the repository."""
    return Taxonomy.from_json(resources.files("detections").joinpath("taxonomy.json").read_text(encoding="utf-8"))


# ----------------------------------------------------------------------------- catalog


@dataclass(frozen=True)
class Catalog:
    """Validated rules, ordered by id."""

    rules: tuple[Rule[Any], ...]
    taxonomy: Taxonomy

    def __iter__(self) -> Iterator[Rule[Any]]:
        return iter(self.rules)

    def __len__(self) -> int:
        return len(self.rules)

    def get(self, rule_id: str) -> Rule[Any]:
        for rule in self.rules:
            if rule.id == rule_id:
                return rule
        raise KeyError(rule_id)


def discover(package: str = RULES_PACKAGE) -> tuple[list[ModuleType], list[str]]:
    """Import the rule modules of ``package``: (modules, problems of those that did not import)."""
    pkg = importlib.import_module(package)
    modules: list[ModuleType] = []
    problems: list[str] = []
    for info in sorted(pkgutil.iter_modules(pkg.__path__), key=lambda i: i.name):
        if info.name.startswith("_"):
            continue
        try:
            modules.append(importlib.import_module(f"{package}.{info.name}"))
        except (ImportError, SyntaxError, ValueError, TypeError, AttributeError, NameError) as exc:
            detail = " ".join(str(exc).split())
            problems.append(f"{info.name}: cannot import ({type(exc).__name__}: {detail})")
    return modules, problems


def _case_problems(name: str, rule: Rule[Any]) -> list[str]:
    problems = []
    if not any(c.positive for c in rule.cases):
        problems.append(f"{name}: no positive case (a case with fires_on)")
    if not any(not c.positive for c in rule.cases):
        problems.append(f"{name}: no negative case (a case with empty fires_on)")
    names = [c.name for c in rule.cases]
    problems.extend(f"{name}: duplicate case name {n!r}" for n in sorted({n for n in names if names.count(n) > 1}))
    for case in rule.cases:
        if unknown := sorted(set(case.fires_on) - set(case.call_ids)):
            problems.append(f"{name}: case {case.name!r} expects a finding on calls it lacks: {', '.join(unknown)}")
    return problems


def _mapping_problems(name: str, rule: Rule[Any], taxonomy: Taxonomy) -> list[str]:
    problems = [f"{name}: unknown OWASP Agentic id {i!r}" for i in rule.meta.owasp if i not in taxonomy.owasp]
    problems.extend(f"{name}: unknown MITRE ATLAS id {i!r}" for i in rule.meta.atlas if i not in taxonomy.atlas)
    return problems


def build_catalog(modules: Iterable[ModuleType], taxonomy: Taxonomy, problems: Sequence[str] = ()) -> Catalog:
    """Validate rule modules into a catalog; raise :class:`CatalogError` listing every problem."""
    found = list(problems)
    by_id: dict[str, str] = {}
    rules: list[Rule[Any]] = []
    for module in modules:
        name = module.__name__.rpartition(".")[2]
        rule = getattr(module, "RULE", None)
        if not isinstance(rule, Rule):
            found.append(f"{name}: defines no RULE (a detections.rulebase.Rule)")
            continue
        if rule.id != name:
            found.append(f"{name}: rule id {rule.id!r} differs from the module name {name!r}")
        if rule.id in by_id:
            found.append(f"{name}: duplicate rule id {rule.id!r} (also in module {by_id[rule.id]})")
        by_id.setdefault(rule.id, name)
        if (rule.meta.kind == "per_call") != isinstance(rule.new_state(DetectionConfig()), NoState):
            found.append(f"{name}: kind {rule.meta.kind!r} does not fit its state (per_call rules keep NoState)")
        if rule.meta.kind == "sequence" and rule.codec is None:
            found.append(f"{name}: sequence rule without a state codec (Rule.codec, a rulebase.StateCodec)")
        if rule.verdicts is not None and (unknown := sorted(set(rule.verdicts) - set(VERDICTS))):
            found.append(f"{name}: unknown verdicts {unknown!r} in Rule.verdicts")
        found.extend(_mapping_problems(name, rule, taxonomy))
        found.extend(_case_problems(name, rule))
        rules.append(rule)
    if found:
        raise CatalogError(found)
    return Catalog(tuple(sorted(rules, key=lambda r: r.id)), taxonomy)


def load_catalog(package: str = RULES_PACKAGE, taxonomy: Taxonomy | None = None) -> Catalog:
    """Discover and validate the rules of ``package``."""
    modules, problems = discover(package)
    return build_catalog(modules, taxonomy or load_taxonomy(), problems)


@functools.cache
def default_catalog() -> Catalog:
    """The catalog of ``detections.rules`` (loaded once)."""
    return load_catalog()


# ---------------------------------------------------------------------------- detector


class Detector:
    """Runs rules over decided calls, with bounded per-delegation sequence state.

    State: per delegation key, one state object per sequence rule, each bounded by the rule
    (see its module) from ``config``; at most ``config.max_delegations`` delegations, the least
    recently seen evicted first (its sequence rules start afresh if it comes back; ``on_evict`` is
    told the key). :meth:`slots` and :meth:`restore` give and set a delegation's states (the live
    job stores them with each rule's :class:`~detections.rulebase.StateCodec`).
    """

    def __init__(
        self,
        rules: Iterable[Rule[Any]] | None = None,
        config: DetectionConfig | None = None,
        on_evict: Callable[[tuple[str, ...]], object] | None = None,
        *,
        stateless: bool = False,
    ) -> None:
        self.rules: Final = tuple(sorted(default_catalog() if rules is None else rules, key=lambda r: r.id))
        self.config: Final = config or DetectionConfig()
        self._states: Lru[tuple[str, ...], dict[str, Any]] = Lru(self.config.max_delegations, on_evict)
        self._sequence: Final = tuple(r for r in self.rules if r.meta.kind == "sequence")
        if stateless and self._sequence:
            raise ValueError("a stateless detector runs per-call rules only")
        self._keep_states: Final = not stateless
        """``stateless``: no per-delegation record of the calls seen (:meth:`slots` and ``len`` stay
        empty): for a detector of per-call rules whose callers never read it (live stage 2)."""
        self._plans: dict[str, tuple[tuple[Any, ...], ...]] = {}  # verdict -> rules to run

    def __len__(self) -> int:
        """How many delegations state is kept for."""
        return len(self._states)

    @property
    def sequence_rules(self) -> tuple[Rule[Any], ...]:
        return self._sequence

    def slots(self, key: tuple[str, ...]) -> dict[str, Any] | None:
        """The sequence states of delegation ``key`` by rule id (the live objects; None if none)."""
        return self._states.get(key)

    def restore(self, key: tuple[str, ...], slots: Mapping[str, Any]) -> None:
        """Set delegation ``key``'s sequence states (as the newest); rules missing from ``slots``
        start afresh, states of rules this detector does not run are dropped."""
        self._states[key] = {
            rule.id: slots[rule.id] if rule.id in slots else rule.new_state(self.config) for rule in self._sequence
        }

    def clear(self) -> None:
        """Forget every delegation's state (without telling ``on_evict``)."""
        self._states.clear()

    def state_of(self, key: tuple[str, ...], rule_id: str) -> Any:
        """The sequence state rule ``rule_id`` keeps for delegation ``key`` (None if none)."""
        slots = self._states.get(key)
        return None if slots is None else slots.get(rule_id)

    def evaluate(self, call: ToolCall, decision: Decision, grants: Iterable[GrantState] = ()) -> list[Finding]:
        """Findings of every rule on one call, sorted by rule id then finding id.

        ``grants``: the delegation's grant states at the call's event_time, as given to
        ``authorize``; rules that need a grant's issue or revocation time stay silent without them.
        """
        return self.evaluate_with(call, decision, {g.grant_id: g for g in grants})

    def evaluate_with(self, call: ToolCall, decision: Decision, by_id: Mapping[str, GrantState]) -> list[Finding]:
        """:meth:`evaluate` with the grant states already by grant id."""
        slots: dict[str, Any] | None = _NO_SLOTS
        if self._keep_states:
            if decision.principal is not None and decision.agent_id is not None:  # delegation_key(call, decision)
                key: tuple[str, ...] = (call.tenant, decision.principal, decision.agent_id)
            else:
                key = (call.tenant, f"session:{call.session_id}")
            states = self._states
            slots = states.get(key)
            if not slots:
                # Every sequence rule keeps state for a delegation from its first call on, whatever it does.
                slots = {rule.id: rule.new_state(self.config) for rule in self._sequence}
            states[key] = slots  # now the most recently seen delegation
        assert slots is not None
        config, verdict = self.config, decision.verdict
        plan = self._plans.get(verdict)
        if plan is None:
            plan = self._plan(verdict)
        findings: list[Finding] = []
        for evaluate, meta, rule_id, sequence, new_state in plan:
            # RuleContext(meta, config, state, by_id), without the dataclass __init__ call
            ctx: RuleContext[Any] = _new_object(RuleContext)
            _set_attribute(
                ctx,
                "__dict__",
                {
                    "meta": meta,
                    "config": config,
                    "state": slots[rule_id] if sequence else new_state(config),
                    "grants": by_id,
                },
            )
            found = evaluate(call, decision, ctx)
            if found:
                findings.extend(found)
        if len(findings) > 1:
            findings.sort(key=lambda f: (f.rule_id, f.finding_id))
        return findings

    def _plan(self, verdict: str) -> tuple[tuple[Any, ...], ...]:
        """The rules that may fire or change state on this verdict (Rule.verdicts), in id order."""
        plan = self._plans[verdict] = tuple(
            (r.evaluate, r.meta, r.id, r.meta.kind == "sequence", r.new_state)
            for r in self.rules
            if r.verdicts is None or verdict in r.verdicts
        )
        return plan

    def looks_at(self, verdict: str) -> bool:
        """Whether some rule may fire or change state on a call with this verdict (``Rule.verdicts``):
        when not, :meth:`evaluate_with` finds nothing and only marks the delegation as recently seen,
        which matters to sequence rules only (their state and its eviction)."""
        plan = self._plans.get(verdict)
        if plan is None:
            plan = self._plan(verdict)
        return bool(plan)


_new_object: Final = object.__new__
_set_attribute: Final = object.__setattr__
_NO_SLOTS: Final[dict[str, Any]] = {}
"""The sequence states of a detector that keeps none (it has no sequence rules)."""


@dataclass(frozen=True)
class Judged:
    call: ToolCall
    decision: Decision
    findings: tuple[Finding, ...] = field(default=())

    @property
    def rule_ids(self) -> list[str]:
        """The sorted rule ids that fired (what ``scopewatch replay`` prints)."""
        return sorted({f.rule_id for f in self.findings})


_FACTS: Final = (SessionBound, SessionEnded, GrantIssued, GrantRevoked, ApprovalDecided, PolicyPublished)


def judge(
    events: Iterable[BaseEvent], detector: Detector | None = None, *, compact_before: datetime | None = None
) -> list[Judged]:
    """Replay semantics: one :class:`Judged` per ``tool_call`` in input order (see module doc).

    Facts are all loaded first (any order); ``tool_result`` and other events are ignored. A call
    repeated with the same event_id is evaluated once; its copies get the same result.
    """
    engine = DecisionEngine()
    calls: list[ToolCall] = []
    for event in events:
        if isinstance(event, ToolCall):
            calls.append(event)
        elif isinstance(event, _FACTS):
            engine.add_fact(event)
    if compact_before is not None:
        engine.compact(compact_before)
    if detector is None:
        detector = Detector()
    done: dict[str, Judged] = {}
    unique: dict[str, ToolCall] = {}
    for call in sorted(calls, key=lambda c: (c.event_time, c.call_id, c.event_id)):
        unique.setdefault(call.event_id, call)
    ordered = list(unique.values())
    # All calls decided together: each delegation's Cedar requests batched, approvals used in order.
    decided = dict(zip((c.event_id for c in ordered), engine.decide_all(ordered), strict=True))
    for call in ordered:
        decision = decided[call.event_id]
        grants: list[GrantState] = []
        if decision.principal is not None and decision.agent_id is not None:
            grants = engine.grants_at(call.tenant, decision.principal, decision.agent_id, call.event_time)
        done[call.event_id] = Judged(call, decision, tuple(detector.evaluate(call, decision, grants)))
    return [done[c.event_id] for c in calls]


# ------------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class CaseResult:
    rule_id: str
    case: Case
    fired_on: tuple[str, ...]

    @property
    def passed(self) -> bool:
        return sorted(self.fired_on) == sorted(self.case.fires_on)

    def describe(self) -> str:
        kind = "positive" if self.case.positive else "negative"
        verdict = "ok" if self.passed else "FAILED"
        text = f"{self.rule_id}: {kind} case {self.case.name!r} {verdict}"
        if not self.passed:
            text += f": expected findings on {list(self.case.fires_on)}, got {list(self.fired_on)}"
        return text


def run_case(rule: Rule[Any], case: Case) -> CaseResult:
    """Judge the case's events with this rule alone and its config; which calls it fired on."""
    judged = judge(case.events, Detector([rule], case.config), compact_before=case.compact_before)
    return CaseResult(rule.id, case, tuple(j.call.call_id for j in judged if j.findings))
