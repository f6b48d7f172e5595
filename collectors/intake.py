"""Intake for identity and consent events: signed webhooks in, Avro on Kafka out.

An identity provider or consent service POSTs canonical events (DESIGN.md, "Event contract") --
one JSON object, or a JSON array of them -- to ``POST /v1/events``. Only the identity and consent
types are accepted: ``session_bound``, ``session_ended``, ``grant_issued``, ``grant_revoked``,
``policy_published``, ``approval_decided``.

Authentication follows Standard Webhooks (standardwebhooks.com): the request carries
``webhook-id``, ``webhook-timestamp`` (Unix seconds) and ``webhook-signature``, a space-separated
list of ``v1,<base64 HMAC-SHA256 over "<id>.<timestamp>.<raw body>">``; the HMAC key is the
base64 part of a ``whsec_...`` secret. Several secrets may be configured (rotation): one valid
signature under any of them suffices, compared in constant time.

Answers, in the order they are checked:

=====  ==========================================================================================
413    body larger than ``max_body_bytes`` (checked before reading it), or more than ``max_batch``
       events
401    unsigned (a header missing), malformed or stale timestamp (more than ``tolerance`` seconds
       from the intake's clock, either way), no valid signature
400    the body is not JSON, not an object or array, or an empty array
422    one or more events are invalid: ``errors`` lists ``{index, event_id, error}`` for each bad
       event. **Nothing of the delivery is published** (fail whole batch): a webhook-id is either
       fully accepted or not at all, so the sender can fix and resend without duplicates.
401    ``replayed``: this webhook-id was already accepted (or is being published right now)
409    ``duplicate_event``: an event_id of the delivery was accepted before (under any webhook-id,
       within the event-id window); ``errors`` names them. Nothing of the delivery is published.
503    Kafka did not acknowledge in ``publish_timeout`` seconds: nothing is recorded as accepted,
       the sender retries later (``Retry-After``)
200    every event is acknowledged by Kafka (``acks=all``), on its topic with its key
       (:func:`schemas.topic_for` / :func:`schemas.key_for`)
=====  ==========================================================================================

Replays: webhook-ids of accepted deliveries are remembered until their timestamp leaves the
tolerance window -- after that the timestamp check rejects a replay anyway -- so the cache is
bounded by the delivery rate over ten minutes; past ``replay_cache_size`` live entries the intake
answers 503 rather than forget an id (fail closed). With a ``replay_file`` the ids also survive
a restart. A duplicate delivery of an accepted message is thus answered 401 ``replayed`` and
publishes nothing: it lands once. (Senders that retry after a lost 200 see that 401; its
``reason`` tells them the message was accepted before.)

Re-sent events: the event_ids of accepted events are remembered for ``event_id_window_seconds``
(default 24 h), at most ``event_id_window_size`` of them (default 200,000, a few tens of MB; past
that the oldest are forgotten first), in memory only. A delivery repeating one is answered 409.
Beyond that window (or after a restart) a re-sent event is published again; ``scopewatch verify``
still counts it once.

The intake is a collector: **every** event it publishes gets this intake's chain stamp
(:class:`~collectors.chain.ChainStamper`), so ``scopewatch verify`` sees gaps. A sender cannot
write into another collector's chain: a ``collector`` the sender put on an event is moved to the
extra field ``claimed_collector`` (untrusted, kept like any unknown field) and replaced by the
intake's stamp. Empty or whitespace-only ``principal``, ``agent_id``, ``session_id``,
``granted_by`` and ``revoked_by`` are invalid (422). Deliveries are published one at a time; a
delivery Kafka did not acknowledge gives its sequence numbers back.

Secrets and signatures are never logged; neither are bodies (only counts, types and ids).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import heapq
import hmac
import json
import logging
import os
import re
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from aiohttp import web
from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from collectors.chain import ChainStamper
from collectors.emit import Emitter
from collectors.http_guard import GuardedRunner
from schemas import Event, EventError, Topics, parse_event, to_canonical_dict

__all__ = [
    "ACCEPTED_TYPES",
    "CLAIMED_COLLECTOR",
    "INTAKE",
    "DuplicateEvents",
    "EventIdWindow",
    "Intake",
    "IntakeConfig",
    "KafkaSink",
    "PublishError",
    "ReplayCache",
    "Unauthorized",
    "blank_identity_fields",
    "make_app",
    "make_runner",
    "new_secret",
    "parse_secret",
    "sign",
    "token_id_problem",
    "verify_signature",
]

log = logging.getLogger("scopewatch.intake")

ACCEPTED_TYPES = frozenset(
    {"session_bound", "session_ended", "grant_issued", "grant_revoked", "policy_published", "approval_decided"}
)
SECRET_PREFIX = "whsec_"  # noqa: S105 - the format prefix, not a secret
MIN_SECRET_BYTES = 16
MAX_ID_CHARS = 256
DEFAULT_PATH = "/v1/events"
MAX_TOKEN_ID_CHARS = 128
"""The longest ``auth.token_id`` accepted (a jti, a UUID, a handle -- never a token)."""
CLAIMED_COLLECTOR = "claimed_collector"
"""Extra field keeping the ``collector`` stamp a sender put on an event (untrusted)."""
IDENTITY_FIELDS = ("principal", "agent_id", "session_id", "granted_by", "revoked_by", "approver", "published_by")


# ----------------------------------------------------------------------------- input checks


def blank_identity_fields(fields: Mapping[str, Any]) -> list[str]:
    """The identity fields of an event (or of emit's options) that are present but empty or whitespace."""
    return [name for name in IDENTITY_FIELDS if isinstance(fields.get(name), str) and not fields[name].strip()]


def _b64url_json_object(segment: str) -> bool:
    try:
        decoded = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
        return isinstance(json.loads(decoded), dict)
    except (binascii.Error, ValueError, RecursionError):
        return False


_B64URL_SEGMENTS = re.compile(r"[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]*){2,4}")


def token_id_problem(value: str) -> str | None:
    """Why ``value`` cannot be an ``auth.token_id`` (it looks like a token or secret), or ``None``.

    The message never repeats the value. A token id is at most :data:`MAX_TOKEN_ID_CHARS`
    printable characters without spaces; a JWT/JWS/JWE (dot-separated base64url segments whose
    first decodes to a JSON object) or anything :mod:`collectors.redact`'s detectors call a
    secret is refused.
    """
    from collectors.redact import Redactor

    text = value.strip()
    if not text:
        return "is empty"
    if _B64URL_SEGMENTS.fullmatch(text) and _b64url_json_object(text.split(".", 1)[0]):
        return "looks like a JWT (the token itself); pass its jti claim, never the token"
    found = Redactor.ephemeral().redact_text(text[: 64 * 1024]).counts
    if found:
        return f"looks like a secret ({', '.join(sorted(found))}); pass the token's id, never a credential"
    if len(text) > MAX_TOKEN_ID_CHARS:
        return f"is {len(text)} characters long; a token id (jti) has at most {MAX_TOKEN_ID_CHARS}"
    if not text.isprintable() or any(c.isspace() for c in text):
        return "holds spaces or control characters; a token id (jti) has none"
    return None


# ----------------------------------------------------------------------------- signatures


def parse_secret(text: str) -> bytes:
    """The HMAC key of a ``whsec_<base64>`` secret; ValueError (naming no secret) otherwise."""
    text = text.strip()
    if not text.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret has the form {SECRET_PREFIX}<base64>")
    try:
        key = base64.b64decode(text[len(SECRET_PREFIX) :], validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"the part after {SECRET_PREFIX} is not base64") from None
    if len(key) < MIN_SECRET_BYTES:
        raise ValueError(f"a webhook secret must hold at least {MIN_SECRET_BYTES} bytes")
    return key


def new_secret() -> str:
    """A fresh random secret (32 bytes), to give to the sender and the intake."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(32)).decode("ascii")


def _mac(key: bytes, msg_id: str, timestamp: str, body: bytes) -> bytes:
    return hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value of a delivery (what a sender computes)."""
    return "v1," + base64.b64encode(_mac(key, msg_id, str(timestamp), body)).decode("ascii")


class Unauthorized(Exception):
    """A delivery failed authentication; ``reason`` is a stable code for the response."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


def verify_signature(
    keys: Sequence[bytes], headers: Mapping[str, str], body: bytes, now: float, tolerance: float
) -> tuple[str, int]:
    """``(webhook-id, timestamp)`` of an authentic, fresh delivery; :class:`Unauthorized` otherwise."""
    msg_id = headers.get("webhook-id", "")
    stamp = headers.get("webhook-timestamp", "")
    signature = headers.get("webhook-signature", "")
    if not msg_id or not stamp or not signature:
        raise Unauthorized("unsigned", "missing webhook-id, webhook-timestamp or webhook-signature")
    if len(msg_id) > MAX_ID_CHARS or not msg_id.isprintable():
        raise Unauthorized("bad_id", f"webhook-id must be at most {MAX_ID_CHARS} printable characters")
    if not stamp.isdigit() or len(stamp) > 12:
        raise Unauthorized("bad_timestamp", "webhook-timestamp must be integer Unix seconds")
    if abs(now - int(stamp)) > tolerance:
        raise Unauthorized("stale_timestamp", f"webhook-timestamp is more than {tolerance:g}s from the intake's clock")
    expected = [_mac(key, msg_id, stamp, body) for key in keys]
    for part in signature.split():
        version, _, value = part.partition(",")
        if version != "v1":
            continue
        try:
            given = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            continue
        if any(hmac.compare_digest(given, mac) for mac in expected):
            return msg_id, int(stamp)
    raise Unauthorized("bad_signature", "no valid v1 signature")


# ----------------------------------------------------------------------------- replay cache


class ReplayCache:
    """webhook-ids seen, each until its expiry; bounded; optionally kept in an append-only file."""

    def __init__(self, max_entries: int = 100_000, path: Path | None = None) -> None:
        self.max_entries = max_entries
        self.path = path
        self._entries: dict[str, tuple[float, bool]] = {}  # id -> (expires, committed)
        self._heap: list[tuple[float, str]] = []
        if path is not None:
            self._load(path)

    def _load(self, path: Path) -> None:
        now = time.time()
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            lines = []
        for line in lines:
            expires, _, msg_id = line.partition(" ")
            with contextlib.suppress(ValueError):
                if float(expires) > now and msg_id:
                    self._put(msg_id, float(expires), True)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text("".join(f"{e:.0f} {i}\n" for i, (e, _c) in self._entries.items()), encoding="utf-8")
        os.replace(tmp, path)  # compacted: expired ids are gone

    def _put(self, msg_id: str, expires: float, committed: bool) -> None:
        self._entries[msg_id] = (expires, committed)
        heapq.heappush(self._heap, (expires, msg_id))

    def _purge(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            expires, msg_id = heapq.heappop(self._heap)
            entry = self._entries.get(msg_id)
            if entry is not None and entry[0] == expires:
                del self._entries[msg_id]

    def seen(self, msg_id: str, now: float) -> bool:
        self._purge(now)
        return msg_id in self._entries

    def reserve(self, msg_id: str, expires: float, now: float) -> Literal["ok", "replayed", "full"]:
        """Claim ``msg_id`` for a delivery being published."""
        self._purge(now)
        if msg_id in self._entries:
            return "replayed"
        if len(self._entries) >= self.max_entries:
            return "full"
        self._put(msg_id, expires, False)
        return "ok"

    def commit(self, msg_id: str) -> None:
        """The delivery is published: the id stays until it expires (and survives a restart)."""
        expires, _ = self._entries[msg_id]
        self._entries[msg_id] = (expires, True)
        if self.path is not None:
            with open(self.path, "a", encoding="utf-8") as out:
                out.write(f"{expires:.0f} {msg_id}\n")

    def release(self, msg_id: str) -> None:
        """The delivery failed: the sender may retry with the same id."""
        self._entries.pop(msg_id, None)

    def __len__(self) -> int:
        return len(self._entries)


class EventIdWindow:
    """event_ids of accepted events, each for ``seconds`` and at most ``max_entries`` of them.

    Bounded memory: ids leave after ``seconds``, and when more than ``max_entries`` were accepted
    within that time the oldest leave first. Only this intake process remembers them (a restart
    forgets); ``scopewatch verify`` and the tables' FINAL views count a re-sent event once anyway.
    """

    def __init__(self, max_entries: int = 200_000, seconds: float = 86_400.0) -> None:
        self.max_entries = max_entries
        self.seconds = seconds
        self._ids: OrderedDict[str, float] = OrderedDict()  # event_id -> accepted at (oldest first)

    def _purge(self, now: float) -> None:
        horizon = now - self.seconds
        while self._ids:
            oldest, at = next(iter(self._ids.items()))
            if at > horizon and len(self._ids) <= self.max_entries:
                return
            del self._ids[oldest]

    def seen(self, event_id: str, now: float) -> bool:
        self._purge(now)
        return event_id in self._ids

    def add(self, event_ids: Iterable[str], now: float) -> None:
        for event_id in event_ids:
            self._ids[event_id] = now
            self._ids.move_to_end(event_id)
        self._purge(now)

    def __len__(self) -> int:
        return len(self._ids)


# ----------------------------------------------------------------------------- Kafka


class PublishError(RuntimeError):
    """Kafka did not acknowledge a delivery."""


class DuplicateEvents(Exception):
    """Events of a delivery were accepted before (by event_id); ``errors`` as in a 422 answer."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        super().__init__(f"{len(errors)} events were accepted before")
        self.errors = errors


Record = tuple[str, bytes, bytes]  # topic, key, value
Sink = Callable[[list[Record]], Awaitable[None]]


@dataclass
class KafkaSink:
    """Sends a delivery's records in order and returns once Kafka acknowledged all (``acks=all``).

    Connects lazily, so the intake starts (and answers 503) while the broker is down. After a
    failure the producer is closed before the error is reported, so nothing of a delivery
    answered 503 is still queued to land later.
    """

    bootstrap: str
    timeout: float = 10.0
    client_id: str = "scopewatch-intake"
    _producer: AIOKafkaProducer | None = field(default=None, init=False, repr=False)

    async def __call__(self, records: list[Record]) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                producer = await self._connect()
                futures = [await producer.send(topic, value=value, key=key) for topic, key, value in records]
                await asyncio.gather(*futures)
        except (TimeoutError, KafkaError, OSError) as exc:
            await self.close()
            raise PublishError(f"Kafka did not acknowledge: {type(exc).__name__}: {exc}") from None

    async def _connect(self) -> AIOKafkaProducer:
        if self._producer is None:
            producer = AIOKafkaProducer(
                bootstrap_servers=self.bootstrap,
                client_id=self.client_id,
                acks="all",
                enable_idempotence=True,
                linger_ms=1,
                request_timeout_ms=max(1000, int(self.timeout * 1000)),
            )
            try:
                await producer.start()
            except BaseException:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(producer.stop(), 5.0)
                raise
            self._producer = producer
        return self._producer

    async def close(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(producer.stop(), 5.0)


# ----------------------------------------------------------------------------- the app


@dataclass
class IntakeConfig:
    """What the intake accepts; ``keys`` are the HMAC keys of the configured ``whsec_`` secrets."""

    keys: list[bytes]
    topics: Topics = field(default_factory=Topics)
    path: str = DEFAULT_PATH
    max_body_bytes: int = 1 << 20
    max_batch: int = 1000
    tolerance: float = 300.0
    replay_cache_size: int = 100_000
    replay_file: Path | None = None
    event_id_window_size: int = 200_000
    event_id_window_seconds: float = 86_400.0
    collector_id: str = field(default_factory=lambda: f"intake:{socket.gethostname()}")

    def __post_init__(self) -> None:
        if not self.keys:
            raise ValueError("the intake needs at least one webhook secret")

    def __repr__(self) -> str:  # never show the keys
        return f"IntakeConfig(path={self.path!r}, secrets={len(self.keys)}, topics={self.topics!r})"


def _error(status: int, message: str, **extra: Any) -> web.Response:
    headers = {"Retry-After": "5"} if status == 503 else None
    return web.json_response({"error": message, **extra}, status=status, headers=headers)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


@dataclass
class _Delivery:
    events: list[Event]
    errors: list[dict[str, Any]]


def _validate(items: list[Any]) -> _Delivery:
    """Every item must be an identity or consent event, with an event_id unique in the delivery."""
    events: list[Event] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for index, obj in enumerate(items):
        event_id = obj.get("event_id") if isinstance(obj, dict) else None
        where: dict[str, Any] = {"index": index, "event_id": event_id if isinstance(event_id, str) else None}
        event_type = obj.get("event_type") if isinstance(obj, dict) else None
        if isinstance(event_type, str) and event_type not in ACCEPTED_TYPES:
            errors.append({**where, "error": f"event_type {event_type!r} is not accepted here (identity and consent)"})
            continue
        try:
            event = parse_event(obj)
        except EventError as exc:
            errors.append({**where, "error": str(exc)})
            continue
        if event.event_id in seen:
            errors.append({**where, "error": "event_id repeats an earlier event of this delivery"})
            continue
        blank = blank_identity_fields(event.__dict__)
        if blank:
            errors.append({**where, "error": f"field '{blank[0]}' is empty"})
            continue
        try:
            event = _untrusted_stamp(event)
        except EventError as exc:
            errors.append({**where, "error": str(exc)})
            continue
        seen.add(event.event_id)
        events.append(event)
    return _Delivery(events, errors)


def _untrusted_stamp(event: Event) -> Event:
    """``event`` without the sender's ``collector`` stamp, which is kept as ``claimed_collector``.

    Only the intake stamps what it publishes: a sender cannot write into another collector's chain.
    """
    if event.collector is None:
        return event
    extra = event.model_extra or {}
    if CLAIMED_COLLECTOR in extra:
        raise EventError(f"both 'collector' and '{CLAIMED_COLLECTOR}' are set; send at most one")
    fields = to_canonical_dict(event)
    fields[CLAIMED_COLLECTOR] = fields.pop("collector")
    return parse_event(fields)


class Intake:
    """The request handler and the state it keeps (replay cache, chain stamper)."""

    def __init__(self, config: IntakeConfig, sink: Sink, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.sink = sink
        self.clock = clock
        self.replays = ReplayCache(config.replay_cache_size, config.replay_file)
        self.event_ids = EventIdWindow(config.event_id_window_size, config.event_id_window_seconds)
        self.stamper = ChainStamper(config.collector_id, epoch=time.time_ns() // 1_000_000)
        self._lock = asyncio.Lock()
        self.counters: dict[str, int] = {"accepted_deliveries": 0, "accepted_events": 0}

    def _count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n

    async def handle(self, request: web.Request) -> web.Response:
        peer = request.remote or "?"
        limit = self.config.max_body_bytes
        if request.content_length is not None and request.content_length > limit:
            self._count("rejected_too_large")
            return _error(413, f"body larger than {limit} bytes")
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            self._count("rejected_too_large")
            return _error(413, f"body larger than {limit} bytes")
        now = self.clock()
        try:
            msg_id, stamp = verify_signature(self.config.keys, request.headers, body, now, self.config.tolerance)
        except Unauthorized as exc:
            self._count(f"rejected_{exc.reason}")
            log.warning("rejected a delivery from %s: %s (%s)", peer, exc.reason, exc)
            return _error(401, str(exc), reason=exc.reason)
        try:
            payload = json.loads(body, parse_constant=_reject_constant)
        except (ValueError, RecursionError) as exc:
            self._count("rejected_bad_json")
            return _error(400, f"the body is not JSON: {str(exc)[:200]}")
        items = payload if isinstance(payload, list) else [payload] if isinstance(payload, dict) else None
        if items is None or not items:
            self._count("rejected_bad_json")
            return _error(400, "the body must be an event object or a non-empty array of events")
        if len(items) > self.config.max_batch:
            self._count("rejected_too_large")
            return _error(413, f"{len(items)} events in one delivery; at most {self.config.max_batch}")
        delivery = _validate(items)
        if delivery.errors:
            self._count("rejected_invalid")
            log.warning("rejected delivery %s from %s: %d invalid events", msg_id, peer, len(delivery.errors))
            return _error(422, "invalid events; nothing was published", errors=delivery.errors)
        claim = self.replays.reserve(msg_id, stamp + self.config.tolerance + 1, now)
        if claim == "replayed":
            self._count("rejected_replayed")
            log.warning("rejected delivery %s from %s: replayed webhook-id", msg_id, peer)
            return _error(401, "this webhook-id was already accepted", reason="replayed")
        if claim == "full":
            self._count("rejected_cache_full")
            log.error("replay cache full (%d ids): refusing deliveries", len(self.replays))
            return _error(503, "too many deliveries in the replay window; retry later")
        try:
            placed = await self._publish(delivery.events)
        except DuplicateEvents as exc:
            self.replays.release(msg_id)
            self._count("rejected_duplicate_event")
            log.warning("rejected delivery %s from %s: %d events accepted before", msg_id, peer, len(exc.errors))
            return _error(
                409, "events were accepted before; nothing was published", reason="duplicate_event", errors=exc.errors
            )
        except PublishError as exc:
            self.replays.release(msg_id)
            self._count("failed_publish")
            log.error("delivery %s not published: %s", msg_id, exc)
            return _error(503, "Kafka did not acknowledge the events; nothing was accepted, retry later")
        self.replays.commit(msg_id)
        self._count("accepted_deliveries")
        self._count("accepted_events", len(placed))
        log.info(
            "accepted delivery %s from %s: %s", msg_id, peer, ", ".join(f"{e.event_type}" for e in delivery.events)
        )
        return web.json_response({"accepted": len(placed), "webhook_id": msg_id, "events": placed})

    async def _publish(self, events: list[Event]) -> list[dict[str, str]]:
        topics = self.config.topics
        async with self._lock:  # one delivery at a time: chain order is Kafka order
            now = self.clock()
            repeated = [
                {"index": i, "event_id": e.event_id, "error": "event_id was accepted before (an earlier delivery)"}
                for i, e in enumerate(events)
                if self.event_ids.seen(e.event_id, now)
            ]
            if repeated:
                raise DuplicateEvents(repeated)
            seq, prev_hash = self.stamper.seq, self.stamper.prev_hash
            made = Emitter(topics, self.stamper).records(events)  # senders' stamps were moved aside
            stamped = [e for e, _record in made]
            records = [record for _e, record in made]
            try:
                await self.sink(records)
            except PublishError:
                self.stamper.seq, self.stamper.prev_hash = seq, prev_hash
                raise
            self.event_ids.add((e.event_id for e in stamped), now)
        return [{"event_id": e.event_id, "topic": topic} for e, (topic, _k, _v) in zip(stamped, records, strict=True)]

    async def health(self, _request: web.Request) -> web.Response:
        return web.json_response(
            {"ok": True, **self.counters, "replay_cache": len(self.replays), "event_ids": len(self.event_ids)}
        )


INTAKE = web.AppKey("intake", Intake)
"""The app's :class:`Intake` (counters, replay cache): ``app[INTAKE]``."""


def make_app(config: IntakeConfig, sink: Sink, clock: Callable[[], float] = time.time) -> web.Application:
    """The aiohttp application: ``POST config.path`` and ``GET /healthz``."""
    intake = Intake(config, sink, clock)
    app = web.Application(client_max_size=config.max_body_bytes)
    app[INTAKE] = intake
    app.router.add_post(config.path, intake.handle)
    app.router.add_get("/healthz", intake.health)
    return app


def make_runner(app: web.Application) -> web.AppRunner:
    """The runner to serve ``app`` with: a malformed or oversized header line (over 32 KiB) is
    answered 400/431 with a fixed body and logged without any of its bytes (aiohttp's own 400
    quotes it in the answer and the log), and there is no access log (it quotes ``User-Agent``)."""
    return GuardedRunner(app, log=log)
