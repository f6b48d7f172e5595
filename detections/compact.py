"""Compact binary form of session and grant histories, for live state (stream job tables).

The live pipeline keeps one history per session and one per delegation for as long as they
matter, possibly millions of each, so the stored form keeps only what a decision reads:

* ``session_bound``: event_id, event_time, principal, agent_id, valid_from, valid_until;
* ``session_ended``: event_id, event_time;
* ``grant_issued``: event_id, event_time, grant_id, tools, resources, not_before, expires_at, and
  when it has policies or approval tools: those and its purpose (Cedar's context reads it);
* ``grant_revoked``: event_id, event_time, grant_id, revoked_by, reason.

Everything else (``auth``, ``scopes``, ``granted_by``, ``purpose``, ``parent_grant_id``,
collector stamps, unknown fields) stays in the raw events in ClickHouse. The tenant, session id,
principal and agent id of a history are given by its key and are not repeated per fact.

Format 2 adds each fact's record hash (:func:`schemas.record_hash`, the raw table's
``_record_hash``), so evidence can reference the fact by event id and hash: after each fact a flag
byte (0: not known, 1: ``sha256:`` and 32 raw bytes, 2: other text). Format 1 (no hashes) still
decodes; its facts have no known hash.

Format 3 is format 2 preceded by the history's **compaction horizon** (8 bytes, after the version
byte): the latest horizon at which compaction actually dropped facts (``history.horizon``). A call
older than it is judged on incomplete history (DESIGN "Retention"), so the horizon must survive a
restart. A history that was never compacted is still written in format 2 (the same bytes as
before); formats 1 and 2 decode with no horizon.

``approval_decided`` histories (:func:`encode_approvals`) have a format of their own, tagged
``A``: the horizon, then per fact event_id, event_time, approval_id, tool, arguments_digest (or
none), decision, approver, expires_at, then the uses of approvals by calls no longer held
(approval_id -> call_id; see :mod:`detections.live.stage2`).

Layout: a version byte, then per fact a kind byte, the event id (16 bytes when it is a
canonical UUID, else a length-prefixed string), times as signed 64-bit microseconds since the
epoch, strings as varint length + UTF-8. Decoding rebuilds the same history: the same facts in
the same order, so every decision over it is unchanged.
"""

from __future__ import annotations

import struct
import uuid
from datetime import UTC, datetime, timedelta
from typing import Final

from detections.approvals import ApprovalHistory
from detections.engine import GrantHistory, SessionHistory
from schemas import ApprovalDecided, GrantIssued, GrantRevoked, SessionBound, SessionEnded

__all__ = [
    "CompactError",
    "decode_approvals",
    "decode_grants",
    "decode_sessions",
    "encode_approvals",
    "encode_grants",
    "encode_sessions",
]

_FORMAT: Final = 2
_FORMAT_HORIZON: Final = 3
_FORMATS: Final = (1, 2, 3)
_APPROVALS_FORMAT: Final = ord("A")
_SHA256: Final = "sha256:"
_NO_HASH, _SHA_HASH, _TEXT_HASH = 0, 1, 2
_EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
_MICRO: Final = timedelta(microseconds=1)
_NONE_TIME: Final = -(2**63)
_I64: Final = struct.Struct(">q")

_BOUND, _ENDED, _ISSUED, _REVOKED = 0, 1, 2, 3
_ISSUED_WITH_CONDITIONS = 4
"""A ``grant_issued`` with policies, approval tools or a purpose (the Cedar context reads the purpose):
the ``_ISSUED`` fields, then policies, approval_tools and purpose. Grants without them keep ``_ISSUED``,
so the stored form of older histories is unchanged."""
_UUID_FLAG, _TEXT_FLAG = 0, 1


class CompactError(ValueError):
    """Stored state that does not decode (corrupt or from an unknown format)."""


def micros(dt: datetime) -> int:
    return (dt - _EPOCH) // _MICRO


def from_micros(value: int) -> datetime:
    return _EPOCH + timedelta(microseconds=value)


class _Writer:
    def __init__(self, horizon: datetime | None = None) -> None:
        if horizon is None:
            self.buf = bytearray([_FORMAT])
        else:
            self.buf = bytearray([_FORMAT_HORIZON])
            self.time(horizon)

    def byte(self, value: int) -> None:
        self.buf.append(value)

    def varint(self, value: int) -> None:
        while value >= 0x80:
            self.buf.append((value & 0x7F) | 0x80)
            value >>= 7
        self.buf.append(value)

    def text(self, value: str) -> None:
        data = value.encode("utf-8")
        self.varint(len(data))
        self.buf += data

    def texts(self, values: list[str]) -> None:
        self.varint(len(values))
        for v in values:
            self.text(v)

    def time(self, value: datetime | None) -> None:
        self.buf += _I64.pack(_NONE_TIME if value is None else micros(value))

    def event_id(self, value: str) -> None:
        try:
            parsed = uuid.UUID(value)
        except ValueError:
            parsed = None
        if parsed is not None and str(parsed) == value:
            self.buf.append(_UUID_FLAG)
            self.buf += parsed.bytes
        else:
            self.buf.append(_TEXT_FLAG)
            self.text(value)

    def record_hash(self, value: str | None) -> None:
        if value is None:
            self.buf.append(_NO_HASH)
            return
        if value.startswith(_SHA256) and len(value) == len(_SHA256) + 64:
            try:
                raw = bytes.fromhex(value[len(_SHA256) :])
            except ValueError:
                raw = b""
            if len(raw) == 32 and raw.hex() == value[len(_SHA256) :]:
                self.buf.append(_SHA_HASH)
                self.buf += raw
                return
        self.buf.append(_TEXT_HASH)
        self.text(value)


class _Reader:
    def __init__(self, data: bytes, formats: tuple[int, ...] = _FORMATS) -> None:
        if not data or data[0] not in formats:
            raise CompactError(f"unknown state format {data[:1]!r}")
        self.hashes = data[0] >= 2
        self.data = data
        self.pos = 1
        self.horizon: datetime | None = None
        """The compaction horizon stored with the history (format 3 and approvals), else None."""
        if data[0] in (_FORMAT_HORIZON, _APPROVALS_FORMAT):
            self.horizon = self.time()

    def more(self) -> bool:
        return self.pos < len(self.data)

    def _take(self, n: int) -> bytes:
        end = self.pos + n
        if end > len(self.data):
            raise CompactError("truncated state")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def byte(self) -> int:
        return self._take(1)[0]

    def varint(self) -> int:
        shift = result = 0
        while True:
            b = self.byte()
            result |= (b & 0x7F) << shift
            if b < 0x80:
                return result
            shift += 7
            if shift > 63:
                raise CompactError("varint too long")

    def text(self) -> str:
        try:
            return self._take(self.varint()).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise CompactError(f"bad text in state: {exc}") from None

    def texts(self) -> list[str]:
        return [self.text() for _ in range(self.varint())]

    def time(self) -> datetime | None:
        (value,) = _I64.unpack(self._take(8))
        return None if value == _NONE_TIME else from_micros(value)

    def required_time(self) -> datetime:
        value = self.time()
        if value is None:
            raise CompactError("missing time in state")
        return value

    def record_hash(self) -> str | None:
        if not self.hashes:
            return None
        flag = self.byte()
        if flag == _NO_HASH:
            return None
        if flag == _SHA_HASH:
            return _SHA256 + self._take(32).hex()
        if flag == _TEXT_HASH:
            return self.text()
        raise CompactError(f"bad record hash flag {flag}")

    def event_id(self) -> str:
        flag = self.byte()
        if flag == _UUID_FLAG:
            return str(uuid.UUID(bytes=self._take(16)))
        if flag == _TEXT_FLAG:
            return self.text()
        raise CompactError(f"bad event id flag {flag}")


def encode_sessions(history: SessionHistory) -> bytes:
    w = _Writer(history.horizon)
    for fact in history:
        w.byte(_BOUND if isinstance(fact, SessionBound) else _ENDED)
        w.event_id(fact.event_id)
        w.time(fact.event_time)
        if isinstance(fact, SessionBound):
            w.text(fact.principal)
            w.text(fact.agent_id)
            w.time(fact.valid_from)
            w.time(fact.valid_until)
        w.record_hash(history.hashes.get(fact.event_id))
    return bytes(w.buf)


def decode_sessions(data: bytes, tenant: str, session_id: str) -> SessionHistory:
    r = _Reader(data)
    history = SessionHistory(tenant, session_id)
    while r.more():
        kind = r.byte()
        event_id, event_time = r.event_id(), r.required_time()
        fact: SessionBound | SessionEnded
        if kind == _BOUND:
            fact = SessionBound.model_construct(
                event_id=event_id,
                event_time=event_time,
                principal=r.text(),
                agent_id=r.text(),
                valid_from=r.required_time(),
                valid_until=r.time(),
                tenant=tenant,
                session_id=session_id,
                auth={},  # given, not defaulted: a default_factory costs pydantic a signature check per call
            )
        elif kind == _ENDED:
            fact = SessionEnded.model_construct(
                event_id=event_id, event_time=event_time, tenant=tenant, session_id=session_id
            )
        else:
            raise CompactError(f"bad session fact kind {kind}")
        history.add(fact, r.record_hash())
    history.horizon = r.horizon
    return history


def encode_grants(history: GrantHistory) -> bytes:
    w = _Writer(history.horizon)
    for fact in history:
        conditions = isinstance(fact, GrantIssued) and bool(fact.policies or fact.approval_tools)
        if isinstance(fact, GrantIssued):
            w.byte(_ISSUED_WITH_CONDITIONS if conditions else _ISSUED)
        else:
            w.byte(_REVOKED)
        w.event_id(fact.event_id)
        w.time(fact.event_time)
        w.text(fact.grant_id)
        if isinstance(fact, GrantIssued):
            w.texts(list(fact.tools))
            w.texts(list(fact.resources))
            w.time(fact.not_before)
            w.time(fact.expires_at)
            if conditions:
                w.texts(list(fact.policies))
                w.texts(list(fact.approval_tools))
                w.text(fact.purpose)
        else:
            w.text(fact.revoked_by)
            w.text(fact.reason)
        w.record_hash(history.hashes.get(fact.event_id))
    return bytes(w.buf)


def decode_grants(data: bytes, tenant: str, principal: str, agent_id: str) -> GrantHistory:
    r = _Reader(data)
    history = GrantHistory(tenant, principal, agent_id)
    while r.more():
        kind = r.byte()
        event_id, event_time, grant_id = r.event_id(), r.required_time(), r.text()
        fact: GrantIssued | GrantRevoked
        if kind in (_ISSUED, _ISSUED_WITH_CONDITIONS):
            tools, resources, not_before, expires_at = r.texts(), r.texts(), r.required_time(), r.time()
            policies: list[str] = []
            approval_tools: list[str] = []
            purpose = ""  # GrantIssued's default: only grants with conditions keep theirs in state
            if kind == _ISSUED_WITH_CONDITIONS:
                policies, approval_tools, purpose = r.texts(), r.texts(), r.text()
            fact = GrantIssued.model_construct(
                event_id=event_id,
                event_time=event_time,
                grant_id=grant_id,
                tools=tools,
                resources=resources,
                not_before=not_before,
                expires_at=expires_at,
                tenant=tenant,
                principal=principal,
                agent_id=agent_id,
                scopes=[],  # not kept in state; given, not defaulted (pydantic: 175 -> 14 us per construct)
                policies=policies,
                approval_tools=approval_tools,
                purpose=purpose,
            )
        elif kind == _REVOKED:
            fact = GrantRevoked.model_construct(
                event_id=event_id,
                event_time=event_time,
                grant_id=grant_id,
                revoked_by=r.text(),
                reason=r.text(),
                tenant=tenant,
                principal=principal,
                agent_id=agent_id,
            )
        else:
            raise CompactError(f"bad grant fact kind {kind}")
        history.add(fact, r.record_hash())
    history.horizon = r.horizon
    return history


def encode_approvals(history: ApprovalHistory, horizon: datetime | None, used: dict[str, str]) -> bytes:
    """An approval history with its compaction horizon and the uses of approvals by calls no longer
    held (approval_id -> call_id). The approvals' ``reason`` is not kept (no decision reads it)."""
    w = _Writer()
    w.buf[0] = _APPROVALS_FORMAT
    w.time(horizon)
    facts = list(history)
    w.varint(len(facts))
    for fact in facts:
        w.event_id(fact.event_id)
        w.time(fact.event_time)
        w.text(fact.approval_id)
        w.text(fact.tool)
        if fact.arguments_digest is None:
            w.byte(0)
        else:
            w.byte(1)
            w.text(fact.arguments_digest)
        w.byte(1 if fact.decision == "approve" else 0)
        w.text(fact.approver)
        w.time(fact.expires_at)
    w.varint(len(used))
    for approval_id in sorted(used):
        w.text(approval_id)
        w.text(used[approval_id])
    return bytes(w.buf)


def decode_approvals(
    data: bytes, tenant: str, principal: str, agent_id: str
) -> tuple[ApprovalHistory, datetime | None, dict[str, str]]:
    """What :func:`encode_approvals` wrote: (history, horizon, uses by calls no longer held)."""
    r = _Reader(data, (_APPROVALS_FORMAT,))
    history = ApprovalHistory(tenant, principal, agent_id)
    for _ in range(r.varint()):
        event_id, event_time, approval_id, tool = r.event_id(), r.required_time(), r.text(), r.text()
        digest = r.text() if r.byte() else None
        decision = "approve" if r.byte() else "deny"
        history.add(
            ApprovalDecided.model_construct(
                event_id=event_id,
                event_time=event_time,
                tenant=tenant,
                principal=principal,
                agent_id=agent_id,
                approval_id=approval_id,
                tool=tool,
                arguments_digest=digest,
                decision=decision,
                approver=r.text(),
                expires_at=r.time(),
                reason="",
            )
        )
    used = {}
    for _ in range(r.varint()):
        approval_id = r.text()
        used[approval_id] = r.text()
    if r.more():
        raise CompactError("trailing bytes in approval state")
    return history, r.horizon, used
