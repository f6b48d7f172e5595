"""Event contract of scopewatch (DESIGN.md, "Event contract (canonical JSON form)").

Every model keeps unknown fields (``extra="allow"``) so they survive a round trip
through the canonical JSON form and through Avro (see :mod:`schemas.codec`).
Timestamps are timezone-aware UTC datetimes truncated to milliseconds.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import uuid
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Any, Final, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    ValidationError,
    model_validator,
)

__all__ = [
    "EVENT_TYPES",
    "ApprovalDecided",
    "BaseEvent",
    "Collector",
    "DeadLetter",
    "Event",
    "EventError",
    "Evidence",
    "GrantIssued",
    "GrantRevoked",
    "PageAttempt",
    "PolicyPublished",
    "SchemaModel",
    "SessionBound",
    "SessionEnded",
    "ToolCall",
    "ToolResult",
    "event_from_json",
    "format_timestamp",
    "parse_event",
    "parse_timestamp",
    "to_canonical_dict",
    "to_canonical_json",
]


class EventError(ValueError):
    """An input line or object is not a valid event (message says why, briefly)."""


# --------------------------------------------------------------------------- timestamps

_RFC3339 = re.compile(r"(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?([Zz]|[+-]\d{2}:\d{2})")


def parse_timestamp(value: object) -> datetime:
    """RFC 3339 string or aware datetime -> aware UTC datetime truncated to ms."""
    if isinstance(value, datetime):
        if value.tzinfo is None or value.utcoffset() is None:
            raise ValueError("naive datetime (no UTC offset)")
        dt = value
    elif isinstance(value, str):
        m = _RFC3339.fullmatch(value)
        if m is None:
            raise ValueError(f"not an RFC 3339 timestamp with offset: {value[:40]!r}")
        year, month, day, hour, minute, second, frac, off = m.groups()
        if off in ("Z", "z"):
            tz = UTC
        else:
            sign = -1 if off[0] == "-" else 1
            oh, om = int(off[1:3]), int(off[4:6])
            if oh > 23 or om > 59:
                raise ValueError(f"invalid UTC offset {off!r}")
            tz = timezone(timedelta(seconds=sign * (oh * 3600 + om * 60)))
        micro = int((frac or "0")[:6].ljust(6, "0"))
        try:
            dt = datetime(
                int(year),
                int(month),
                int(day),
                int(hour),
                int(minute),
                int(second),
                micro,
                tz,
            )
        except ValueError as exc:
            raise ValueError(f"invalid timestamp {value[:40]!r}: {exc}") from None
    else:
        msg = f"expected an RFC 3339 timestamp string, got {type(value).__name__}"
        raise ValueError(msg)  # pydantic turns only ValueError into errors
    try:
        dt = dt.astimezone(UTC)
    except OverflowError:
        raise ValueError("timestamp out of range") from None
    return dt.replace(microsecond=dt.microsecond // 1000 * 1000)


_SECONDS: dict[tuple[int, int, int, int, int, int], str] = {}
_MILLIS_Z = tuple(f"{ms:03d}Z" for ms in range(1000))


def format_timestamp(dt: datetime) -> str:
    """Canonical form: ``YYYY-MM-DDTHH:MM:SS.mmmZ`` (dt must be aware).

    The text up to the second is remembered for the last few hundred seconds (events come in
    bursts of the same second; formatting it anew was most of the cost)."""
    u = dt if dt.tzinfo is UTC else dt.astimezone(UTC)
    second = (u.year, u.month, u.day, u.hour, u.minute, u.second)
    prefix = _SECONDS.get(second)
    if prefix is None:
        if len(_SECONDS) >= 512:
            _SECONDS.clear()
        prefix = _SECONDS[second] = (
            f"{u.year:04d}-{u.month:02d}-{u.day:02d}T{u.hour:02d}:{u.minute:02d}:{u.second:02d}."
        )
    return prefix + _MILLIS_Z[u.microsecond // 1000]


Timestamp = Annotated[
    datetime,
    BeforeValidator(parse_timestamp),
    PlainSerializer(format_timestamp, when_used="json"),
]


# ----------------------------------------------------------------- JSON-valued fields


def _check_json(value: Any, path: str = "") -> None:
    """Raise ValueError unless value is plain JSON (finite floats, str keys)."""
    if value is None or isinstance(value, (str, bool, int)):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"non-finite number at {path or 'top level'}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _check_json(item, f"{path}[{i}]")
    elif isinstance(value, dict):
        for k, item in value.items():
            if not isinstance(k, str):
                msg = f"non-string key {k!r} at {path or 'top level'}"
                raise ValueError(msg)
            _check_json(item, f"{path}.{k}" if path else k)
    else:
        msg = f"not a JSON value ({type(value).__name__}) at {path or 'top level'}"
        raise ValueError(msg)


def _json_object(value: dict[str, Any]) -> dict[str, Any]:
    _check_json(value)
    return value


def _uuid_str(value: str) -> str:
    try:
        ok = str(uuid.UUID(value)) == value.lower()
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(f"not a UUID string: {value[:40]!r}")
    return value


JsonObject = Annotated[dict[str, Any], AfterValidator(_json_object)]
UuidStr = Annotated[str, AfterValidator(_uuid_str)]
NonNegLong = Annotated[int, Field(ge=0, le=2**63 - 1)]


# --------------------------------------------------------------------------- models


class SchemaModel(BaseModel):
    """Base of every contract model: strict, immutable, unknown fields kept."""

    model_config = ConfigDict(extra="allow", frozen=True, strict=True, allow_inf_nan=False)

    @model_validator(mode="after")
    def _extras_are_json(self) -> SchemaModel:
        if self.__pydantic_extra__:
            for key, value in self.__pydantic_extra__.items():
                _check_json(value, key)
        return self


class Collector(SchemaModel):
    """Collector stamp for the hash chain: who emitted the event and where in the chain."""

    id: str
    epoch: NonNegLong
    seq: NonNegLong
    prev_hash: str | None = None


class BaseEvent(SchemaModel):
    """Fields common to every event type."""

    event_type: str
    event_id: UuidStr
    event_time: Timestamp
    tenant: str
    collector: Collector | None = None


class ToolCall(BaseEvent):
    event_type: Literal["tool_call"] = "tool_call"
    call_id: str
    session_id: str
    server: str
    tool: str
    arguments: JsonObject
    resources: list[str]
    transport: Literal["stdio", "http", "sdk"]
    attested: JsonObject | None = None
    claimed: JsonObject = Field(default_factory=dict)
    tool_digest: str | None = None


class ToolResult(BaseEvent):
    event_type: Literal["tool_result"] = "tool_result"
    call_id: str
    session_id: str
    status: Literal["ok", "error", "timeout"]
    duration_ms: float = Field(ge=0)
    error: str | None = None
    result_digest: str | None = None


class SessionBound(BaseEvent):
    event_type: Literal["session_bound"] = "session_bound"
    session_id: str
    principal: str
    agent_id: str
    valid_from: Timestamp
    valid_until: Timestamp | None = None
    auth: JsonObject = Field(default_factory=dict)


class SessionEnded(BaseEvent):
    event_type: Literal["session_ended"] = "session_ended"
    session_id: str


class GrantIssued(BaseEvent):
    event_type: Literal["grant_issued"] = "grant_issued"
    grant_id: str
    principal: str
    agent_id: str
    tools: list[str]
    resources: list[str] = Field(default_factory=list)
    scopes: list[str] = Field(default_factory=list)
    not_before: Timestamp
    expires_at: Timestamp | None = None
    granted_by: str
    purpose: str = ""
    parent_grant_id: str | None = None
    policies: list[str] = Field(default_factory=list)
    """policy_id of each Cedar policy that must permit a call under this grant (empty: no policy condition)."""
    approval_tools: list[str] = Field(default_factory=list)
    """Glob patterns over ``server/tool``: calls to a matching tool under this grant need a human approval."""


class GrantRevoked(BaseEvent):
    event_type: Literal["grant_revoked"] = "grant_revoked"
    grant_id: str
    principal: str
    agent_id: str
    revoked_by: str
    reason: str = ""


def _labels(value: dict[str, list[str]]) -> dict[str, list[str]]:
    _check_json(value)
    return value


class PolicyPublished(BaseEvent):
    """A version of a Cedar policy set (topic consent.policies, key tenant/policy_id)."""

    event_type: Literal["policy_published"] = "policy_published"
    policy_id: str
    version: str
    cedar: str
    labels: Annotated[dict[str, list[str]], AfterValidator(_labels)] = Field(default_factory=dict)
    """label -> glob patterns over resources, e.g. ``{"restricted": ["db:prod/*"]}``."""
    published_by: str


class ApprovalDecided(BaseEvent):
    """A human approval decision for calls of one tool (topic consent.approvals, key tenant/principal/agent_id)."""

    event_type: Literal["approval_decided"] = "approval_decided"
    approval_id: str
    principal: str
    agent_id: str
    tool: str
    """Exact ``server/tool``."""
    arguments_digest: str | None = None
    """SHA-256 hex of the RFC 8785 canonical JSON of the call's arguments; None = any arguments."""
    decision: Literal["approve", "deny"]
    approver: str
    expires_at: Timestamp | None = None
    reason: str = ""


class Evidence(SchemaModel):
    """One verdict version for one call (topic audit.evidence)."""

    evidence_id: str
    call_id: str
    tenant: str
    session_id: str
    principal: str | None = None
    agent_id: str | None = None
    server: str
    tool: str
    call_time: Timestamp
    verdict: str
    matched_grant_id: str | None = None
    reasons: list[str]
    version: int = Field(ge=1, le=2**63 - 1)
    final: bool
    late: bool
    decided_at: Timestamp
    facts: JsonObject = Field(default_factory=dict)
    """The facts the verdict used, copied as JSON: only in records written before fact references."""
    fact_ids: list[str] = Field(default_factory=list)
    """Event ids of the identity and consent facts the verdict rests on (their rows in the raw tables)."""
    fact_hashes: list[str] = Field(default_factory=list)
    """Record hash of each fact in ``fact_ids`` (``schemas.record_hash``; "" when not known)."""
    kind: str = ""
    """provisional, final or amendment ("" in older records)."""
    trigger: str = ""
    """What caused this version: call, update, fact or deadline ("" in older records)."""
    approval_id: str | None = None
    """The approval that authorised (in_scope) or denied (approval_denied) the call."""
    approver: str | None = None
    """Who decided that approval."""
    policy_versions: list[str] = Field(default_factory=list)
    """Each Cedar policy used for the matched grant, as ``policy_id@version``."""
    policy_decision: str | None = None
    """Cedar's decision for the matched grant (Allow/Deny); None when no policy was evaluated."""
    policy_reasons: list[str] = Field(default_factory=list)
    """The ``@id`` of each policy that determined Cedar's decision."""
    policy_errors: list[str] = Field(default_factory=list)
    """Cedar's errors, and policy lookup or parse errors."""
    history_complete: bool = True
    """False when the call is older than the compaction horizon of a history it was judged on
    (DESIGN "Retention"): the verdict may differ from replay's; re-judge it with replay or verify."""


class Finding(SchemaModel):
    """A detection rule fired on a call (topic audit.findings); flat, for Avro and ClickHouse."""

    finding_id: str
    dedup_key: str
    rule_id: str
    rule_version: int = Field(ge=1, le=2**31 - 1)
    severity: Literal["info", "low", "medium", "high", "critical"]
    title: str
    summary: str
    tenant: str
    principal: str | None = None
    agent_id: str | None = None
    call_id: str
    call_ids: list[str]
    session_id: str
    grant_id: str | None = None
    forensic_query: str
    first_call_time: Timestamp
    last_call_time: Timestamp
    details: JsonObject = Field(default_factory=dict)
    detected_at: Timestamp


class PageAttempt(SchemaModel):
    """One page delivery attempt, or findings held back from a page (topic audit.pages, table ``pages``).

    ``attempt`` counts HTTP requests of the page to the route (1, 2, ...); 0 when no request was made
    (``suppressed``: findings grouped into a page already sent in the window; ``rate_limited``). The
    route is the configured route's name, never its URL or secret.
    """

    attempt_id: str
    page_key: str
    dedup_key: str
    finding_id: str
    rule_id: str
    severity: Literal["info", "low", "medium", "high", "critical"]
    tenant: str
    channel: Literal["pagerduty", "slack", "webhook"]
    route: str
    attempt: int = Field(ge=0, le=2**32 - 1)
    outcome: Literal["delivered", "retry", "failed", "suppressed", "rate_limited"]
    http_status: int | None = Field(default=None, ge=0, le=2**16 - 1)
    error: str | None = None
    findings_grouped: int = Field(ge=0, le=2**32 - 1)
    attempted_at: Timestamp
    latency_ms: float = Field(ge=0)


class DeadLetter(SchemaModel):
    """A record the pipeline could not process (topic audit.dead-letter)."""

    dead_letter_id: str
    source_topic: str
    source_partition: NonNegLong
    source_offset: NonNegLong
    key: str | None = None
    reason: str
    stage: str
    payload_b64: str
    failed_at: Timestamp


Event = Annotated[
    ToolCall
    | ToolResult
    | SessionBound
    | SessionEnded
    | GrantIssued
    | GrantRevoked
    | PolicyPublished
    | ApprovalDecided,
    Field(discriminator="event_type"),
]

EVENT_MODELS: Final[dict[str, type[BaseEvent]]] = {
    "tool_call": ToolCall,
    "tool_result": ToolResult,
    "session_bound": SessionBound,
    "session_ended": SessionEnded,
    "grant_issued": GrantIssued,
    "grant_revoked": GrantRevoked,
    "policy_published": PolicyPublished,
    "approval_decided": ApprovalDecided,
}
EVENT_TYPES: Final[tuple[str, ...]] = tuple(EVENT_MODELS)


# ------------------------------------------------------------------- parse / render


def describe_errors(exc: ValidationError, limit: int = 3) -> str:
    """Short one-line summary of a pydantic ValidationError."""
    parts = []
    for err in exc.errors()[:limit]:
        loc = ".".join(str(p) for p in err["loc"])
        if err["type"] == "missing":
            parts.append(f"missing required field '{loc}'")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            parts.append(f"field '{loc}': {msg}")
    more = exc.error_count() - limit
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")


def parse_event(obj: object) -> Event:
    """Validate a JSON-like dict into the event model named by its ``event_type``."""
    if not isinstance(obj, dict):
        raise EventError("not a JSON object")
    if "event_type" not in obj:
        raise EventError("missing required field 'event_type'")
    event_type = obj["event_type"]
    model = EVENT_MODELS.get(event_type) if isinstance(event_type, str) else None
    if model is None:
        raise EventError(f"unknown event_type {event_type!r}")
    try:
        return model.model_validate(obj)  # type: ignore[return-value]
    except ValidationError as exc:
        raise EventError(f"{event_type}: {describe_errors(exc)}") from None
    except RecursionError:
        raise EventError(f"{event_type}: nested too deeply") from None


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def event_from_json(line: str | bytes) -> Event:
    """Parse one JSONL line (str or UTF-8 bytes) into an event."""
    try:
        obj = json.loads(line, parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise EventError("not valid UTF-8") from None
    except ValueError as exc:  # includes json.JSONDecodeError
        raise EventError(f"invalid JSON: {exc}") from None
    except RecursionError:
        raise EventError("invalid JSON: nested too deeply") from None
    return parse_event(obj)


def to_canonical_dict(model: SchemaModel) -> dict[str, Any]:
    """JSON-ready dict: every field (defaults included), unknown fields, ms timestamps."""
    return model.model_dump(mode="json")


def to_canonical_json(model: SchemaModel) -> str:
    """Deterministic JSON text (sorted keys, no spaces, UTF-8) -- what a hash chain hashes."""
    return canonical_json(to_canonical_dict(model))


def record_hash(event: BaseEvent) -> str:
    """The chain hash of one event: sha256 over its canonical JSON (collector stamp included).

    A collector stamps each event with the previous event's hash (``collector.prev_hash``), so an
    edited, deleted or reordered record breaks the chain (``scopewatch verify``).
    """
    return "sha256:" + hashlib.sha256(to_canonical_json(event).encode("utf-8")).hexdigest()


_CANONICAL = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def canonical_json(value: Any) -> str:
    """Canonical JSON text of a plain JSON value (``json.dumps`` with sorted keys, no spaces, no
    ASCII escaping, no NaN; the encoder is built once, not per call)."""
    return _CANONICAL.encode(value)


def arguments_digest(arguments: dict[str, Any]) -> str:
    """SHA-256 hex of the RFC 8785 canonical JSON of a call's ``arguments`` (what ``approval_decided``
    binds to with ``arguments_digest``)."""
    return hashlib.sha256(jcs(arguments).encode("utf-8")).hexdigest()


def jcs(value: Any) -> str:
    """RFC 8785 (JSON Canonicalization Scheme) text of a plain JSON value.

    Keys sorted by their UTF-16 code units, no whitespace, strings escaped as ECMAScript's
    ``JSON.stringify`` does, numbers in ECMAScript's shortest form (``1.0`` -> ``1``, ``1e21``,
    ``1e-7``). Integers beyond 2**53 are written as the double they round to, as RFC 8785 requires.
    """
    parts: list[str] = []
    _jcs(value, parts)
    return "".join(parts)


def _jcs(value: Any, out: list[str]) -> None:
    if value is None:
        out.append("null")
    elif value is True:
        out.append("true")
    elif value is False:
        out.append("false")
    elif isinstance(value, str):
        out.append(json.dumps(value, ensure_ascii=False))
    elif isinstance(value, int):
        out.append(str(value) if abs(value) <= 2**53 else _es_number(float(value)))
    elif isinstance(value, float):
        out.append(_es_number(value))
    elif isinstance(value, list):
        out.append("[")
        for i, item in enumerate(value):
            if i:
                out.append(",")
            _jcs(item, out)
        out.append("]")
    elif isinstance(value, dict):
        out.append("{")
        for i, key in enumerate(sorted(value, key=lambda k: k.encode("utf-16-be"))):
            if i:
                out.append(",")
            out.append(json.dumps(key, ensure_ascii=False))
            out.append(":")
            _jcs(value[key], out)
        out.append("}")
    else:
        raise ValueError(f"not a JSON value: {type(value).__name__}")


def _es_number(x: float) -> str:
    """ECMAScript Number::toString of a finite double (RFC 8785, section 3.2.2.3)."""
    if not math.isfinite(x):
        raise ValueError("non-finite number")
    if x == 0:
        return "0"
    sign = "-" if x < 0 else ""
    mantissa, _, exp_text = repr(abs(x)).partition("e")
    int_part, _, frac_part = mantissa.partition(".")
    digits = (int_part + frac_part).lstrip("0")
    # value = 0.<digits> x 10**n
    n = (
        len(int_part) + int(exp_text or 0)
        if int_part != "0"
        else int(exp_text or 0) - (len(frac_part) - len(frac_part.lstrip("0")))
    )
    digits = digits.rstrip("0") or "0"
    k = len(digits)
    if k <= n <= 21:
        text = digits + "0" * (n - k)
    elif 0 < n <= 21:
        text = digits[:n] + "." + digits[n:]
    elif -6 < n <= 0:
        text = "0." + "0" * (-n) + digits
    else:
        e = n - 1
        text = digits[0] + ("." + digits[1:] if k > 1 else "") + "e" + ("+" if e >= 0 else "-") + str(abs(e))
    return sign + text
