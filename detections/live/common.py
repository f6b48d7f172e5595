"""What both stages share: their configuration and counters, their outputs, the clock in integer
microseconds, the decoded-history cache and the min-heaps of due instants."""

from __future__ import annotations

import heapq
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Final, Generic, TypeVar

from detections.engine import GrantHistory, SessionHistory
from schemas import Evidence
from schemas import Finding as FindingRecord

__all__ = [
    "EPOCH",
    "MICRO",
    "Forward",
    "HistoryCache",
    "LiveConfig",
    "LiveCounters",
    "Output",
    "at",
    "due",
    "heappop",
    "heappush",
    "incomplete_facts",
    "new_forward",
    "new_object",
    "new_output",
    "now_us",
    "set_attribute",
    "us",
]


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


new_object: Final = object.__new__
set_attribute: Final = object.__setattr__


def new_output() -> Output:
    """``Output()`` without the dataclass ``__init__`` and its three default factories."""
    out: Output = new_object(Output)
    set_attribute(out, "__dict__", {"forwards": [], "evidence": [], "findings": []})
    return out


def new_forward(route: str, payload: bytes) -> Forward:
    """``Forward(route, payload)`` without the frozen dataclass's per-field ``object.__setattr__``."""
    fwd: Forward = new_object(Forward)
    set_attribute(fwd, "__dict__", {"route": route, "payload": payload})
    return fwd


# ------------------------------------------------------------------------------- time

EPOCH: Final = datetime(1970, 1, 1, tzinfo=UTC)
MICRO: Final = timedelta(microseconds=1)


def us(dt: datetime) -> int:
    """Microseconds since the epoch (exact; ``compact.micros``)."""
    return (dt - EPOCH) // MICRO


_LAST_NOW: list[Any] = [None, 0]


def now_us(now: datetime) -> int:
    """:func:`us` of the processing clock; the same ``now`` is often passed for several events."""
    last = _LAST_NOW
    if now is not last[0]:
        last[1] = (now - EPOCH) // MICRO
        last[0] = now
    value: int = last[1]
    return value


_AT_MEMO: Final[dict[int, datetime]] = {}


def at(us: int) -> datetime:
    """The UTC datetime ``us`` microseconds after the epoch (memoized: calls share their instants)."""
    dt = _AT_MEMO.get(us)
    if dt is None:
        if len(_AT_MEMO) >= 4096:
            _AT_MEMO.clear()
        dt = _AT_MEMO[us] = EPOCH + timedelta(microseconds=us)
    return dt


# ------------------------------------------------------------------------------ cache

H = TypeVar("H", SessionHistory, GrantHistory)


class HistoryCache(Generic[H]):
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


heappush: Final = heapq.heappush
heappop: Final = heapq.heappop


def due(heap: list[tuple[int, str]], now_us: int) -> Iterator[str]:
    """Pop the keys of a min-heap of (instant, key) due at ``now_us`` (lazy deletion: callers re-check)."""
    while heap and heap[0][0] <= now_us:
        yield heappop(heap)[1]


# -------------------------------------------------------------------------- retention


def incomplete_facts(facts: dict[str, object], history: str, horizon: datetime) -> dict[str, object]:
    """Decision facts saying the call was judged on a compacted ``history`` (session, grants or
    approvals) whose horizon is after it (DESIGN "Retention"): merged into the decision's facts."""
    names = facts.get("history_incomplete")
    listed = list(names) if isinstance(names, list) else []
    if history not in listed:
        listed.append(history)
    horizons = facts.get("history_horizons")
    by_history = dict(horizons) if isinstance(horizons, dict) else {}
    by_history[history] = horizon.isoformat().replace("+00:00", "Z")
    return {"history_complete": False, "history_incomplete": sorted(listed), "history_horizons": by_history}
