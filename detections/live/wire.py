"""Every byte format of the live decisions, in one place: keys, internal messages, stored records.

Formats are JSON arrays, one per line (JSON never contains a raw ``\\n``); positions are part of the
format (changelogs and the internal topic hold them), so each record has a named ``__slots__`` class
here that reads and writes its array, and the stages use the names only.

* **Keys**: session key ``tenant/session_id``, call key ``session key/call_id``, route (the
  delegation key ``tenant/principal/agent_id``, else the session route = the session key); parts
  percent-encoded.
* **Internal message** (:class:`Message`): the head ``[2, kind, call key, attribution version,
  late, ..., attribution digest]`` (``call``: deadline and keep_until before the digest;
  ``handoff``: the owned record's head fields; ``tick``: ``[2, "tick"]``), then for ``call``,
  ``update`` and ``handoff`` the attribution line ``[verdict, principal, agent_id, reasons, facts]``
  (:class:`AttributionLine`) and for ``call`` and ``handoff`` the call line (:class:`CallLine`).
* **Stage-1 open call** (:class:`OpenCall`): one array, tag ``"s1"``.
* **Stage-2 owned call** (:class:`Owned`): the head ``["o", partition, route, call key, attribution
  version, evidence version, last summary, final, deadline, keep_until, attribution digest]`` then
  the attribution and call lines as received (stored without re-encoding); **forwarding record**
  (:class:`Moved`): ``["m", partition, route, call key, attribution version, keep_until, owner
  route]``. Records in any other form (an earlier format) are ignored: they never crash a processor.
* **Stage-2 sequence record** (store ``sequence``, key: route): see :data:`SEQUENCE_FORMAT` and
  :data:`HELD_FORMAT` (read and written by :mod:`detections.live.sequence`).
"""

from __future__ import annotations

import json
import re
from typing import Any, Final, TypeAlias
from urllib.parse import quote

import orjson

from detections.engine import Attribution
from schemas import ToolCall

__all__ = [
    "HELD_FORMAT",
    "HELD_TAG",
    "MESSAGE_FORMAT",
    "MOVED_TAG",
    "OWNED_TAG",
    "SEQUENCE_FORMAT",
    "SEQUENCE_TAG",
    "AttributionLine",
    "Body",
    "CallLine",
    "Message",
    "Moved",
    "OpenCall",
    "Owned",
    "call_key",
    "call_message",
    "dumps",
    "encode_attribution_line",
    "encode_call_line",
    "handoff_message",
    "held_head",
    "key_route",
    "orjson_dumps",
    "parse_head",
    "parse_list",
    "parse_message",
    "parse_open_call",
    "parse_record",
    "quote_part",
    "route_for",
    "route_of",
    "sequence_head",
    "sequence_head_prefix",
    "session_key",
    "session_route",
    "tick_message",
    "update_message",
]

MESSAGE_FORMAT: Final = 2
"""Version of the internal message format (1: the JSON objects of earlier snapshots, not read)."""

# ------------------------------------------------------------------------------- keys

_UNQUOTED: Final = re.compile(r"[A-Za-z0-9_.~-]*").fullmatch


_QUOTED: Final[dict[str, str]] = {}


def quote_part(part: str) -> str:
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
    return f"{quote_part(tenant)}/{quote_part(session_id)}"


session_route = session_key
"""Route of calls whose session names no delegation (2 parts; a delegation key has 3)."""


def call_key(tenant: str, session_id: str, call_id: str) -> str:
    return f"{session_key(tenant, session_id)}/{quote_part(call_id)}"


def route_of(tenant: str, session_id: str, principal: str | None, agent_id: str | None) -> str:
    """The route of a call (or, with ``session_id=""``, of a delegation's grants)."""
    if principal is not None and agent_id is not None:
        # schemas.delegation_key(tenant, principal, agent_id), same text
        return f"{quote_part(tenant)}/{quote_part(principal)}/{quote_part(agent_id)}"
    return session_route(tenant, session_id)


def route_for(tenant: str, session_id: str, attribution: Attribution) -> str:
    return route_of(tenant, session_id, attribution.principal, attribution.agent_id)


def key_route(key: tuple[str, ...]) -> str:
    """The route of a :func:`~detections.rulebase.delegation_key` (its sequence record's key)."""
    if len(key) == 3:
        return route_of(key[0], "", key[1], key[2])
    return session_route(key[0], key[1][len("session:") :])


# ------------------------------------------------------------------- serialisation

orjson_dumps: Final = orjson.dumps
"""For arrays of plain values only (str, int, bool, None, lists of them)."""


def dumps(value: Any) -> bytes:
    try:
        return orjson.dumps(value)
    except TypeError:  # e.g. an integer beyond 64 bits in attested claims
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def parse_list(data: bytes, tag: str, size: int) -> list[Any] | None:
    """A stored JSON array with ``tag`` first and ``size`` items; None for anything else (old formats)."""
    try:
        value = orjson.loads(data)
    except ValueError:
        return None
    if type(value) is not list or len(value) != size or value[0] != tag:
        return None
    return value


# ------------------------------------------------------------------- the call line


class CallLine:
    """The call as it travels from stage 1 to stage 2 and is stored there: ``[event_id, tenant,
    call_id, session_id, server, tool, resources, transport, event_time_us, attested, tool_digest,
    arguments]`` (the event time at millisecond precision, as the canonical timestamp form carries
    it; ``arguments`` only when not empty: Cedar's context and an approval's arguments digest read
    them. Lines of 11 items, from before arguments were carried, have empty arguments)."""

    __slots__ = (
        "arguments",
        "attested",
        "call_id",
        "event_id",
        "resources",
        "server",
        "session_id",
        "t",
        "tenant",
        "tool",
        "tool_digest",
        "transport",
    )
    event_id: str
    tenant: str
    call_id: str
    session_id: str
    server: str
    tool: str
    resources: list[str]
    transport: str
    t: int
    """Event time, microseconds since the epoch (at millisecond precision)."""
    attested: dict[str, Any] | None
    tool_digest: str | None
    arguments: dict[str, Any]

    def __init__(self, values: list[Any]) -> None:
        self.arguments = values.pop() if len(values) == 12 else {}
        (
            self.event_id,
            self.tenant,
            self.call_id,
            self.session_id,
            self.server,
            self.tool,
            self.resources,
            self.transport,
            self.t,
            self.attested,
            self.tool_digest,
        ) = values

    @staticmethod
    def parse(line: bytes) -> CallLine:
        return CallLine(orjson.loads(line))


def encode_call_line(call: ToolCall, t_us: int) -> bytes:
    """The :class:`CallLine` of ``call`` whose event time is ``t_us``."""
    line: list[Any] = [
        call.event_id,
        call.tenant,
        call.call_id,
        call.session_id,
        call.server,
        call.tool,
        call.resources,
        call.transport,
        t_us - t_us % 1000,  # milliseconds, as the canonical timestamp form carries them
        call.attested,
        call.tool_digest,
    ]
    if call.arguments:
        line.append(call.arguments)
    return dumps(line)


# ------------------------------------------------------------ the attribution line

Body: TypeAlias = tuple[Any, str | None, tuple[str, ...], tuple[dict[str, object], ...]]
"""(verdict, matched_grant_id, reasons, per-grant facts) of a decision ``decision_of`` remakes."""


def encode_attribution_line(a: Attribution) -> bytes:
    return dumps([a.verdict, a.principal, a.agent_id, list(a.reasons), a.facts])


class AttributionLine:
    """An attribution line ``[verdict, principal, agent_id, reasons, facts]``, parsed once per
    stage-2 processor and shared by the calls that carry it."""

    __slots__ = ("agent_id", "body", "facts", "line", "principal", "reasons", "terminal")

    def __init__(self, line: bytes) -> None:
        terminal, principal, agent_id, reasons, facts = orjson.loads(line)
        self.line: Final = line
        self.terminal: Final = terminal
        self.principal: Final[str | None] = principal
        self.agent_id: Final[str | None] = agent_id
        self.reasons: Final[tuple[str, ...]] = tuple(reasons)
        self.facts: Final[dict[str, object]] = facts
        self.body: Final[Body | None] = None if terminal is None else (terminal, None, self.reasons, ())
        """A terminal attribution is the decision, whatever the instant (``as_of`` aside)."""


# ------------------------------------------------------------------- internal messages

_MESSAGE_SHAPES: Final = {"tick": (2, 1), "call": (8, 3), "update": (6, 2), "handoff": (11, 3)}
"""Items of the head and lines of each kind of internal message."""


class Message:
    """An internal message, parsed. Fields a kind does not carry are None (``tick`` carries none)."""

    __slots__ = (
        "attr_version",
        "attribution_line",
        "call_line",
        "ckey",
        "deadline",
        "digest",
        "final",
        "keep_until",
        "kind",
        "last",
        "late",
        "version",
    )

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self.ckey: str = ""
        self.attr_version: int = 0
        self.late: bool = False
        self.digest: str = ""
        self.deadline: int = 0
        self.keep_until: int = 0
        self.version: int = 0
        self.last: list[Any] | None = None
        self.final: bool = False
        self.attribution_line: bytes = b""
        self.call_line: bytes = b""


def parse_message(payload: bytes) -> Message:
    """The message in ``payload``; ValueError (with the reason) for any other format."""
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
    msg = Message(head[1])
    if kind == "tick":
        return msg
    msg.attribution_line = parts[1]
    if kind == "call":
        _v, _kind, msg.ckey, msg.attr_version, msg.late, msg.deadline, msg.keep_until, msg.digest = head
        msg.call_line = parts[2]
    elif kind == "update":
        _v, _kind, msg.ckey, msg.attr_version, msg.late, msg.digest = head
    else:
        (
            _v,
            _kind,
            msg.ckey,
            msg.attr_version,
            msg.late,
            msg.version,
            msg.last,
            msg.final,
            msg.deadline,
            msg.keep_until,
            msg.digest,
        ) = head
        msg.call_line = parts[2]
    return msg


def call_message(
    ckey: str, attr_version: int, deadline: int, keep_until: int, digest: str, attribution_line: bytes, call_line: bytes
) -> bytes:
    """A call forwarded by stage 1 (never late: a late call is just a call)."""
    head = orjson_dumps([MESSAGE_FORMAT, "call", ckey, attr_version, False, deadline, keep_until, digest])
    return b"\n".join((head, attribution_line, call_line))


def update_message(ckey: str, attr_version: int, late: bool, digest: str, attribution_line: bytes) -> bytes:
    """A new attribution of a call stage 1 has forwarded."""
    return dumps([MESSAGE_FORMAT, "update", ckey, attr_version, late, digest]) + b"\n" + attribution_line


def handoff_message(rec: Owned, late: bool) -> bytes:
    """``rec`` handed over to the route its new attribution names, with its version counter."""
    head = [
        MESSAGE_FORMAT,
        "handoff",
        rec.ckey,
        rec.attr_version,
        late,
        rec.version,
        rec.last,
        rec.final,
        rec.deadline,
        rec.keep_until,
        rec.digest,
    ]
    return b"\n".join((dumps(head), rec.attribution_line, rec.call_line))


def tick_message() -> bytes:
    """A clock tick for a stage-2 partition: lets an idle partition finalize and close calls."""
    return dumps([MESSAGE_FORMAT, "tick"])


# --------------------------------------------------------------- stage-1 records

_S1_TAG: Final = "s1"
_S1_SIZE: Final = 9


class OpenCall:
    """Stage-1 open call (store ``calls``, key: the call key, which names the session): ``["s1",
    partition, event_time_us, attested identity claims, attribution version, attribution digest,
    first route, deadline, keep_until]``."""

    __slots__ = ("attested", "attr_version", "deadline", "digest", "keep_until", "partition", "route", "t")

    def __init__(
        self,
        partition: int,
        t: int,
        attested: dict[str, Any] | None,
        attr_version: int,
        digest: str,
        route: str,
        deadline: int,
        keep_until: int,
    ) -> None:
        self.partition = partition
        self.t = t
        self.attested = attested
        self.attr_version = attr_version
        self.digest = digest
        self.route = route
        self.deadline = deadline
        self.keep_until = keep_until

    def encode(self) -> bytes:
        return dumps(
            [
                _S1_TAG,
                self.partition,
                self.t,
                self.attested,
                self.attr_version,
                self.digest,
                self.route,
                self.deadline,
                self.keep_until,
            ]
        )


def parse_open_call(raw: bytes) -> OpenCall | None:
    """The stored stage-1 record, None for anything else (an earlier format)."""
    rec = parse_list(raw, _S1_TAG, _S1_SIZE)
    return None if rec is None else OpenCall(*rec[1:])


# --------------------------------------------------------------- stage-2 records

OWNED_TAG: Final = "o"
MOVED_TAG: Final = "m"
_OWNED_SIZE: Final = 11
_MOVED_SIZE: Final = 7


class Owned:
    """A call owned by this route, as stored: the head fields and the attribution and call lines."""

    __slots__ = (
        "_call",
        "attr_version",
        "attribution_line",
        "call_line",
        "ckey",
        "deadline",
        "digest",
        "final",
        "keep_until",
        "last",
        "partition",
        "route",
        "version",
    )

    def __init__(
        self,
        partition: int,
        route: str,
        ckey: str,
        attr_version: int,
        version: int,
        last: list[Any] | tuple[Any, ...] | None,
        final: bool,
        deadline: int,
        keep_until: int,
        digest: str,
        attribution_line: bytes,
        call_line: bytes,
    ) -> None:
        self.partition = partition
        self.route = route
        self.ckey = ckey
        self.attr_version = attr_version
        self.version = version
        """Evidence version last emitted (0: none yet)."""
        self.last: tuple[Any, ...] | None = None if last is None else tuple(last)
        """Summary of the last emitted evidence: (verdict, matched grant, principal, agent_id)."""
        self.final = final
        self.deadline = deadline
        self.keep_until = keep_until
        self.digest = digest
        self.attribution_line = attribution_line
        self.call_line = call_line
        self._call: CallLine | None = None

    @property
    def call(self) -> CallLine:
        """The call line, parsed when first read."""
        call = self._call
        if call is None:
            call = self._call = CallLine(orjson.loads(self.call_line))
        return call

    def encode(self) -> bytes:
        head = [
            OWNED_TAG,
            self.partition,
            self.route,
            self.ckey,
            self.attr_version,
            self.version,
            self.last,
            self.final,
            self.deadline,
            self.keep_until,
            self.digest,
        ]
        return b"\n".join((orjson_dumps(head), self.attribution_line, self.call_line))  # plain values only


class Moved:
    """A forwarding record: the call is owned by route ``moved`` now. ``handoff``: the handoff
    message that moved it (stored after the head line), sent again when the message that caused the
    move is delivered again: the forwarding record may have reached the changelog without the
    handoff reaching the broker (a worker killed mid-flush), and the call would have no owner.
    Records written before it was kept have none."""

    __slots__ = ("attr_version", "ckey", "handoff", "keep_until", "moved", "partition", "route")

    def __init__(
        self,
        partition: int,
        route: str,
        ckey: str,
        attr_version: int,
        keep_until: int,
        moved: str,
        handoff: bytes | None = None,
    ) -> None:
        self.partition = partition
        self.route = route
        self.ckey = ckey
        self.attr_version = attr_version
        self.keep_until = keep_until
        self.moved = moved
        self.handoff = handoff

    def encode(self) -> bytes:
        head = dumps([MOVED_TAG, self.partition, self.route, self.ckey, self.attr_version, self.keep_until, self.moved])
        return head if self.handoff is None else head + b"\n" + self.handoff


def _owned(head: list[Any], attribution_line: bytes, call_line: bytes) -> Owned:
    _tag, partition, route, ckey, attr_version, version, last, final, deadline, keep_until, digest = head
    return Owned(
        partition,
        route,
        ckey,
        attr_version,
        version,
        last,
        final,
        deadline,
        keep_until,
        digest,
        attribution_line,
        call_line,
    )


def parse_record(raw: bytes) -> Owned | Moved | None:
    """A stored stage-2 call record; None for anything else (an earlier format)."""
    parts = raw.split(b"\n")
    if len(parts) == 3:
        head = parse_list(parts[0], OWNED_TAG, _OWNED_SIZE)
        return None if head is None else _owned(head, parts[1], parts[2])
    if len(parts) == 1:
        head = parse_list(raw, MOVED_TAG, _MOVED_SIZE)
        return None if head is None else Moved(*head[1:])
    if len(parts) == 4:  # a forwarding record with its handoff message (three lines)
        head = parse_list(parts[0], MOVED_TAG, _MOVED_SIZE)
        if head is None:
            return None
        _tag, partition, route, ckey, attr_version, keep_until, moved = head
        return Moved(partition, route, ckey, attr_version, keep_until, moved, b"\n".join(parts[1:]))
    return None


def parse_head(raw: bytes) -> Owned | Moved | None:
    """Like :func:`parse_record` from the first line only: an :class:`Owned` has empty lines here."""
    end = raw.find(b"\n")
    if end < 0:
        head = parse_list(raw, MOVED_TAG, _MOVED_SIZE)
        return None if head is None else Moved(*head[1:])
    head = parse_list(raw[:end], OWNED_TAG, _OWNED_SIZE)
    if head is None:
        moved = parse_list(raw[:end], MOVED_TAG, _MOVED_SIZE)  # with its handoff after the head
        return None if moved is None else Moved(*moved[1:])
    return _owned(head, b"", b"")


# ------------------------------------------------------------- sequence records

SEQUENCE_TAG: Final = "q"
SEQUENCE_FORMAT: Final = 1
"""Version of a stage-2 sequence record (store ``sequence``, key: the delegation's route), lines:
the head ``["q", 1, partition, delegation key (list), [rule id, ...], held calls]``, then one line
per rule id: that rule's state as its :class:`~detections.rulebase.StateCodec` encodes it (version
tag first), then three lines per held call (:data:`HELD_FORMAT`). A record of another version is
ignored (counted: ``sequence_records_unknown_version``); a rule state of an unknown version starts
afresh (``sequence_state_unknown_version``); nothing of it ever crashes a processor."""
HELD_TAG: Final = "h"
HELD_FORMAT: Final = 1
"""Version of a held call in a sequence record: ``["h", 1, release instant, attribution digest]``,
then the attribution line and the call line as stage 2 stores them for its owned calls. On recovery
the call is decided again from these lines and the route's grants, and held until its release."""


def sequence_head(partition: int, key: tuple[str, ...], rule_ids: list[str], n_held: int) -> bytes:
    return orjson_dumps([SEQUENCE_TAG, SEQUENCE_FORMAT, partition, list(key), rule_ids, n_held])


def sequence_head_prefix(partition: int, key: tuple[str, ...], rule_ids: list[str]) -> bytes:
    """How a record of ``key`` with these rule states starts (its held-call count follows)."""
    return orjson_dumps([SEQUENCE_TAG, SEQUENCE_FORMAT, partition, list(key), rule_ids])[:-1] + b","


def held_head(release: int, digest: str) -> bytes:
    return orjson_dumps([HELD_TAG, HELD_FORMAT, release, digest])
