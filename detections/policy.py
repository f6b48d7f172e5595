"""Cedar policies as of t, and the Cedar request of a call (DESIGN.md, "Decision semantics", "Policy").

Pure: no clock, no I/O besides calling Cedar (``cedarpy``, in-process).

* :class:`PolicyHistory` -- every ``policy_published`` of one (tenant, policy_id); the version at t is
  the latest with ``event_time <= t`` (a tie: the larger event_id).
* :class:`PolicyStore` -- the histories of every policy (``consent.policies`` is read whole).
* :func:`compile_version` -- a version's Cedar text with every policy annotated
  ``@id("<policy_id>@<version>#<n>")`` (n counts the policies of the text from 0, in text order),
  once per version; text that does not parse compiles to an error (the version permits nothing).
* :func:`cedar_context` -- the request context of a call under a grant, arguments converted.
* :class:`PolicyCheck` / :func:`evaluate` -- the requests of several (call, grant) pairs, evaluated
  in batches (one ``is_authorized_batch`` per distinct policy set), giving :class:`PolicyOutcome`.
* :class:`Outcomes` -- outcomes asked ahead of their use (live stage 2: the new calls of a batch
  at once), which :func:`evaluate` takes instead of asking Cedar again for the same check.

Choices where DESIGN is silent:

1. A grant naming several policies: their versions at t are joined into one policy set. If one of
   them has no version at t or does not parse, the grant permits nothing (fail closed) and Cedar is
   not asked; the outcome records why in ``errors``.
2. Cedar skips a policy whose evaluation errors (e.g. comparing a Long with a decimal): an erroring
   ``forbid`` does not deny. The decision is Cedar's (DESIGN: permitted iff Cedar answers Allow);
   the error is recorded in the outcome and in the evidence.
3. Argument keys ``__entity`` and ``__extn`` are Cedar JSON escapes; an argument object holding one
   is dropped with an error (it cannot be expressed as a record), so a caller cannot forge an entity.
4. Cedar error texts name policies by the parser's ids (``policy0`` ...); they are rewritten to the
   ``@id`` annotations so the evidence names ``<policy_id>@<version>#<n>``.
"""

from __future__ import annotations

import bisect
import fnmatch
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import ROUND_HALF_EVEN, Decimal, InvalidOperation
from typing import Any, Final

import cedarpy

from schemas import PolicyPublished, ToolCall

__all__ = [
    "DECIMAL_MAX",
    "LONG_MAX",
    "LONG_MIN",
    "CompiledVersion",
    "Outcomes",
    "PolicyCheck",
    "PolicyHistory",
    "PolicyOutcome",
    "PolicyStore",
    "cedar_context",
    "cedar_value",
    "compile_text",
    "compile_version",
    "evaluate",
    "labels_of",
    "split_statements",
]

LONG_MIN: Final = -(2**63)
LONG_MAX: Final = 2**63 - 1
DECIMAL_MAX: Final = Decimal(LONG_MAX) / 10_000
"""Cedar's decimal is a 64-bit integer of ten-thousandths: [-922337203685477.5808, 922337203685477.5807]."""
_DECIMAL_MIN: Final = Decimal(LONG_MIN) / 10_000
_FOUR_PLACES: Final = Decimal("0.0001")
_ESCAPES: Final = frozenset({"__entity", "__extn"})


def _order(event: PolicyPublished) -> tuple[datetime, str]:
    return (event.event_time, event.event_id)


class PolicyHistory:
    """Every ``policy_published`` of one (tenant, policy_id), ordered by (event_time, event_id)."""

    def __init__(self, tenant: str, policy_id: str) -> None:
        self.tenant: Final = tenant
        self.policy_id: Final = policy_id
        self._events: list[PolicyPublished] = []
        self._ids: set[str] = set()

    def __len__(self) -> int:
        return len(self._events)

    def __iter__(self) -> Iterator[PolicyPublished]:
        return iter(list(self._events))

    def add(self, event: PolicyPublished) -> bool:
        """Store a version; False if its event_id is already stored."""
        if (event.tenant, event.policy_id) != (self.tenant, self.policy_id):
            raise ValueError(
                f"policy {event.tenant}/{event.policy_id} added to history of {self.tenant}/{self.policy_id}"
            )
        if event.event_id in self._ids:
            return False
        bisect.insort(self._events, event, key=_order)
        self._ids.add(event.event_id)
        return True

    def version_at(self, t: datetime) -> PolicyPublished | None:
        """The latest version with event_time <= t (None: the policy has no version at t)."""
        n = bisect.bisect_right(self._events, t, key=lambda e: e.event_time)
        return self._events[n - 1] if n else None


class PolicyStore:
    """The policy histories of every tenant (what every worker reads whole from consent.policies)."""

    def __init__(self) -> None:
        self._histories: dict[tuple[str, str], PolicyHistory] = {}

    def __len__(self) -> int:
        return len(self._histories)

    def add(self, event: PolicyPublished) -> bool:
        key = (event.tenant, event.policy_id)
        history = self._histories.get(key)
        if history is None:
            history = self._histories[key] = PolicyHistory(*key)
        return history.add(event)

    def version_at(self, tenant: str, policy_id: str, t: datetime) -> PolicyPublished | None:
        history = self._histories.get((tenant, policy_id))
        return None if history is None else history.version_at(t)


# ------------------------------------------------------------------------------ compile


@dataclass(frozen=True)
class CompiledVersion:
    """One policy version ready for Cedar: its annotated text and ids, or the parse error."""

    policy_id: str
    version: str
    event_id: str
    text: str
    ids: tuple[str, ...]
    error: str | None = None

    @property
    def label(self) -> str:
        return f"{self.policy_id}@{self.version}"


def compile_text(policy_id: str, version: str, cedar: str) -> tuple[str, tuple[str, ...], str | None]:
    """(annotated text, the @id of each policy in text order, parse error or None) of a Cedar text."""
    try:
        est = json.loads(cedarpy.policies_to_json_str(cedar))
    except ValueError as exc:
        return "", (), f"{policy_id}@{version}: Cedar text does not parse: {exc}"
    statics: dict[str, Any] = est.get("staticPolicies") or {}
    if est.get("templates"):
        return "", (), f"{policy_id}@{version}: policy templates are not supported"
    ids: list[str] = []
    annotated: dict[str, Any] = {}
    for n, (_name, policy) in enumerate(sorted(statics.items(), key=lambda kv: _policy_number(kv[0]))):
        pid = f"{policy_id}@{version}#{n}"
        policy = dict(policy)
        policy["annotations"] = {**(policy.get("annotations") or {}), "id": pid}
        annotated[pid] = policy
        ids.append(pid)
    text = cedarpy.policies_from_json_str(
        json.dumps({"staticPolicies": annotated, "templates": {}, "templateLinks": []})
    )
    return text, tuple(ids), None


def _policy_number(name: str) -> int:
    m = re.fullmatch(r"policy(\d+)", name)
    return int(m.group(1)) if m else 1 << 30


_COMPILED: Final[dict[tuple[str, str], CompiledVersion]] = {}


def compile_version(event: PolicyPublished) -> CompiledVersion:
    """:func:`compile_text` of a ``policy_published``, memoized by event_id and text: a version never changes,
    but ``verify`` re-judges stored rows, and a row edited in place keeps its event_id."""
    key = (event.event_id, event.cedar)
    done = _COMPILED.get(key)
    if done is not None and done.policy_id == event.policy_id and done.version == event.version:
        return done
    text, ids, error = compile_text(event.policy_id, event.version, event.cedar)
    done = CompiledVersion(event.policy_id, event.version, event.event_id, text, ids, error)
    if len(_COMPILED) >= 4096:
        _COMPILED.clear()
    _COMPILED[key] = done
    return done


def split_statements(text: str) -> list[tuple[int, str]]:
    """The policy statements of a Cedar text with the line each starts on (1-based): splits at ``;``
    outside strings and ``//`` comments. For pointing at the statement a parse error is in."""
    out: list[tuple[int, str]] = []
    start, line, start_line = 0, 1, None
    i, n = 0, len(text)
    while i < n:
        ch = text[i]
        if ch == "\n":
            line += 1
        elif ch == "/" and text.startswith("//", i):
            j = text.find("\n", i)
            i = n if j < 0 else j
            continue
        elif ch == '"':
            if start_line is None:
                start_line = line
            i += 1
            while i < n and text[i] != '"':
                if text[i] == "\\":
                    i += 1
                elif text[i] == "\n":
                    line += 1
                i += 1
        elif ch == ";":
            out.append((start_line or line, text[start : i + 1]))
            start, start_line = i + 1, None
        elif not ch.isspace() and start_line is None:
            start_line = line
        i += 1
    if start_line is not None:
        out.append((start_line, text[start:]))
    return out


# ------------------------------------------------------------------------------ context


def labels_of(labels: Mapping[str, Sequence[str]], resources: Iterable[str]) -> set[str]:
    """The labels whose glob patterns match some resource."""
    resources = list(resources)
    return {
        label
        for label, patterns in labels.items()
        if any(fnmatch.fnmatchcase(r, p) for r in resources for p in patterns)
    }


def cedar_value(value: Any, path: str, errors: list[str]) -> Any:
    """A JSON value as Cedar's JSON form; None when it is dropped (nulls; numbers out of range, with
    an error appended). Objects -> records, arrays -> sets, integral numbers within Long -> Long,
    other numbers -> ``decimal`` with 4 places (half to even)."""
    if value is None:
        return None
    if isinstance(value, bool | str):
        return value
    if isinstance(value, int | float):
        if isinstance(value, int) and LONG_MIN <= value <= LONG_MAX:
            return value
        if isinstance(value, float) and value.is_integer() and LONG_MIN <= value <= LONG_MAX:
            return int(value)
        try:
            d = Decimal(repr(value) if isinstance(value, float) else value).quantize(_FOUR_PLACES, ROUND_HALF_EVEN)
        except InvalidOperation:
            d = None
        if d is None or not (_DECIMAL_MIN <= d <= DECIMAL_MAX):
            errors.append(f"argument {path}: number {value!r} is out of Cedar's range, dropped")
            return None
        if d == 0:
            d = Decimal("0.0000")
        return {"__extn": {"fn": "decimal", "arg": f"{d:f}"}}
    if isinstance(value, list):
        items = [cedar_value(v, f"{path}[{i}]", errors) for i, v in enumerate(value)]
        return [v for v in items if v is not None]
    if isinstance(value, dict):
        if bad := sorted(_ESCAPES.intersection(value)):
            errors.append(f"argument {path}: key {bad[0]!r} is reserved by Cedar's JSON form, object dropped")
            return None
        record = {}
        for k, v in value.items():
            converted = cedar_value(v, f"{path}.{k}", errors)
            if converted is not None:
                record[k] = converted
        return record
    errors.append(f"argument {path}: not a JSON value, dropped")
    return None


def cedar_context(
    call: ToolCall, grant_id: str, purpose: str, labels: Iterable[str], errors: list[str]
) -> dict[str, Any]:
    """The request context DESIGN.md specifies for ``call`` under grant ``grant_id``."""
    arguments = cedar_value(call.arguments, "arguments", errors)
    attested = call.attested or {}
    t = call.event_time
    return {
        "tenant": call.tenant,
        "session_id": call.session_id,
        "grant_id": grant_id,
        "purpose": purpose,
        "transport": call.transport,
        "attested": any(v is not None for v in attested.values()),
        "resources": list(call.resources),
        "labels": sorted(labels),
        "arguments": arguments if arguments is not None else {},
        "hour": t.hour,
        "weekday": t.isoweekday(),
    }


# ------------------------------------------------------------------------------ evaluate


@dataclass(frozen=True)
class PolicyOutcome:
    """Cedar's answer for one (call, grant): whether the grant's policies permit the call, and why.

    ``versions``: ``policy_id@version`` of each policy used (the grant's, at t); ``decision``:
    ``Allow``/``Deny`` from Cedar, or None when Cedar was not asked (a policy missing or unparseable:
    not permitted); ``determining``: the ``@id`` of the policies that decided; ``errors``: Cedar's
    errors, and lookup, parse and argument conversion errors.
    """

    permitted: bool
    versions: tuple[str, ...]
    decision: str | None
    determining: tuple[str, ...] = ()
    errors: tuple[str, ...] = ()
    event_ids: tuple[str, ...] = ()

    def to_facts(self) -> dict[str, object]:
        return {
            "versions": list(self.versions),
            "event_ids": list(self.event_ids),
            "decision": self.decision,
            "determining": list(self.determining),
            "errors": list(self.errors),
            "permitted": self.permitted,
        }


@dataclass
class PolicyCheck:
    """The Cedar request of one call under one grant with policies (see :func:`evaluate`)."""

    call: ToolCall
    principal: str
    agent_id: str
    grant_id: str
    purpose: str
    policies: Sequence[str]
    store: PolicyStore | None
    outcome: PolicyOutcome | None = field(default=None)


class Outcomes:
    """Cedar outcomes asked ahead of their use, by check.

    Live stage 2 decides a batch's calls one at a time (in order, as replay would); asking Cedar
    then would cost one ``is_authorized_batch`` per call. It asks first for the batch's new calls
    together (:func:`evaluate`: one request batch per delegation and policy set) and keeps the
    outcomes here; :func:`evaluate` takes an outcome from here instead of asking Cedar only for the
    same check -- the same call (the same object or an equal one), delegation, grant, purpose and
    policy ids -- with the same policy versions at the call's time (their event ids), so a verdict
    never depends on whether it was asked ahead. Outcomes Cedar was not asked for (a policy missing
    or unparseable) are not kept: :func:`evaluate` makes them without Cedar anyway.
    """

    __slots__ = ("_found",)

    def __init__(self) -> None:
        self._found: dict[tuple[Any, ...], tuple[ToolCall, PolicyOutcome]] = {}

    def __len__(self) -> int:
        return len(self._found)

    def clear(self) -> None:
        self._found.clear()

    @staticmethod
    def _key(check: PolicyCheck) -> tuple[Any, ...]:
        call = check.call
        return (
            call.tenant,
            call.call_id,
            call.event_id,
            check.principal,
            check.agent_id,
            check.grant_id,
            check.purpose,
            tuple(check.policies),
        )

    def put(self, check: PolicyCheck) -> None:
        """Keep the outcome :func:`evaluate` set on ``check`` (if Cedar was asked)."""
        if check.outcome is not None and check.outcome.decision is not None:
            self._found[self._key(check)] = (check.call, check.outcome)

    def get(self, check: PolicyCheck, event_ids: tuple[str, ...]) -> PolicyOutcome | None:
        """The kept outcome of the same check with these policy versions, or None."""
        hit = self._found.get(self._key(check))
        if hit is None:
            return None
        call, outcome = hit
        if outcome.event_ids != event_ids or (call is not check.call and call != check.call):
            return None
        return outcome


_POLICY_SETS: Final[dict[str, Any]] = {}


def _policy_set(text: str) -> Any:
    """A pre-parsed ``cedarpy.PolicySet`` of a joined text, kept (Cedar would parse the text per batch)."""
    parsed = _POLICY_SETS.get(text)
    if parsed is None:
        if len(_POLICY_SETS) >= 256:
            _POLICY_SETS.clear()
        parsed = _POLICY_SETS[text] = cedarpy.PolicySet.from_str(text)
    return parsed


_ENTITIES: Final[dict[tuple[str, str, tuple[tuple[str, str], ...]], Any]] = {}


def _entity_set(principal: str, agent_id: str, tools: Mapping[str, dict[str, Any]]) -> Any:
    """A pre-parsed ``cedarpy.Entities`` of a delegation and these Tool entities, kept (a live
    batch often has one call of a delegation: parsing the entities was a good part of its request)."""
    key = (principal, agent_id, tuple((t["attrs"]["server"], t["attrs"]["tool"]) for t in tools.values()))
    parsed = _ENTITIES.get(key)
    if parsed is None:
        if len(_ENTITIES) >= 4096:
            _ENTITIES.clear()
        entities = [*_entities(principal, agent_id, "", "")[:2], *tools.values()]
        parsed = _ENTITIES[key] = cedarpy.Entities.from_json_str(json.dumps(entities))
    return parsed


def _entities(principal: str, agent_id: str, server: str, tool: str) -> list[dict[str, Any]]:
    return [
        {"uid": {"type": "Agent", "id": agent_id}, "attrs": {}, "parents": [{"type": "User", "id": principal}]},
        {"uid": {"type": "User", "id": principal}, "attrs": {}, "parents": []},
        {"uid": {"type": "Tool", "id": f"{server}/{tool}"}, "attrs": {"server": server, "tool": tool}, "parents": []},
    ]


_PARSER_ID: Final = re.compile(r"\bpolicy(\d+)\b")


def evaluate(checks: Sequence[PolicyCheck], ahead: Outcomes | None = None) -> None:
    """Set ``outcome`` on every check, asking Cedar once per batch: checks with the same policy set
    and the same (principal, agent_id) go in one ``is_authorized_batch`` call. A check whose
    outcome ``ahead`` holds (:class:`Outcomes`) takes it and is not asked again."""
    groups: dict[tuple[str, str, str], tuple[tuple[str, ...], list[tuple[PolicyCheck, dict[str, Any], _Parts]]]] = {}
    for check in checks:
        call, t = check.call, check.call.event_time
        found: list[PolicyPublished] = []
        errors: list[str] = []
        closed = False
        for policy_id in check.policies:
            version = None if check.store is None else check.store.version_at(call.tenant, policy_id, t)
            if version is None:
                errors.append(f"policy {policy_id}: no version published at or before the call")
                closed = True
            else:
                found.append(version)
        compiled = [compile_version(v) for v in found]
        errors.extend(c.error for c in compiled if c.error is not None)
        closed = closed or any(c.error is not None for c in compiled)
        parts = _Parts(tuple(c.label for c in compiled), tuple(c.event_id for c in compiled), errors)
        if closed:
            check.outcome = PolicyOutcome(False, parts.versions, None, (), tuple(errors), parts.event_ids)
            continue
        if ahead is not None and (known := ahead.get(check, parts.event_ids)) is not None:
            check.outcome = known
            continue
        labels: set[str] = set()
        for version in found:
            labels |= labels_of(version.labels, call.resources)
        request = {
            "principal": {"type": "Agent", "id": check.agent_id},
            "action": {"type": "Action", "id": "call"},
            "resource": {"type": "Tool", "id": f"{call.server}/{call.tool}"},
            "context": cedar_context(call, check.grant_id, check.purpose, labels, errors),
        }
        text = "\n".join(c.text for c in compiled)
        key = (text, check.principal, check.agent_id)
        if key not in groups:
            groups[key] = (tuple(i for c in compiled for i in c.ids), [])
        groups[key][1].append((check, request, parts))
    for (text, principal, agent_id), (ids, items) in groups.items():
        tools: dict[str, dict[str, Any]] = {}
        for check, _request, _parts in items:
            server, name = check.call.server, check.call.tool
            tool: dict[str, Any] = {
                "uid": {"type": "Tool", "id": f"{server}/{name}"},
                "attrs": {"server": server, "tool": name},
                "parents": [],
            }
            if tools.setdefault(tool["uid"]["id"], tool) != tool:
                break  # the same Tool id from another (server, tool) split: ask one by one
        else:
            requests = [request for _, request, _ in items]
            results = cedarpy.is_authorized_batch(requests, _policy_set(text), _entity_set(principal, agent_id, tools))
            for (check, _request, parts), result in zip(items, results, strict=True):
                check.outcome = _outcome(result, parts, ids)
            continue
        for check, request, parts in items:
            result = cedarpy.is_authorized(
                request, text, _entities(principal, agent_id, check.call.server, check.call.tool)
            )
            check.outcome = _outcome(result, parts, ids)


@dataclass(frozen=True)
class _Parts:
    versions: tuple[str, ...]
    event_ids: tuple[str, ...]
    errors: list[str]


def _outcome(result: Any, parts: _Parts, ids: tuple[str, ...]) -> PolicyOutcome:
    def name(m: re.Match[str]) -> str:
        n = int(m.group(1))
        return ids[n] if n < len(ids) else m.group(0)

    diagnostics = result.diagnostics
    by_reason = diagnostics.id_annotations_by_reason
    determining = tuple(sorted(by_reason.get(r, _PARSER_ID.sub(name, r)) for r in diagnostics.reasons))
    cedar_errors = [_PARSER_ID.sub(name, str(e)) for e in diagnostics.errors]
    decision = result.decision.value
    return PolicyOutcome(
        decision == "Allow", parts.versions, decision, determining, (*parts.errors, *cedar_errors), parts.event_ids
    )
