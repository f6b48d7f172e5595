"""The pager's pure core: grouping, suppression windows, rate limiting, retry decisions, ledger rows.

No I/O and no clock of its own: every method takes ``now`` (epoch seconds), so tests drive time.
:mod:`stream_jobs.pager` is the adapter around it (Kafka in and out, HTTP out).

A **page** is what one dedup key raises in one window. The first finding of a dedup key with no
open window opens one (``window_seconds`` long) and a page to every matching route (severity at
least the route's ``min_severity``, tenant in its ``tenants`` when it names any). Per route:

* while the route's delivery is still pending, further findings are *grouped* into it (the
  attempt rows carry the running count, ``findings_grouped``);
* once the route's delivery is done (delivered, failed or rate limited), further findings in the
  window are *suppressed*: counted, and recorded as one ``suppressed`` row per route every
  ``suppressed_flush_seconds`` (so 500 repeats cost a handful of ledger rows, not 500);
* a new page needs a token from the route's bucket and from the global bucket; without one the
  route's page is ``rate_limited`` (recorded, not sent) and the window still holds.

Every consumed finding is a :class:`Hold` until each route it touched has recorded it in the
ledger; the adapter commits a partition's offset only up to its oldest hold. The page key
(``{dedup_key}#{opened_at_ms}``) and so the webhook id stay the same on every retry, and across a
restart: :meth:`PageBook.restore` rebuilds the windows (done or still pending) from the ledger.
"""

from __future__ import annotations

import email.utils
import math
import uuid
from collections.abc import Callable, Hashable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Final, Literal, TypeAlias

from schemas import Finding, PageAttempt
from stream_jobs.pager_config import SEVERITIES, PagerConfig, Route
from stream_jobs.pager_render import ForensicParams, HttpRequest, PageContent, build_request, render_body

__all__ = [
    "TERMINAL",
    "AttemptResult",
    "Hold",
    "Offer",
    "OffsetTracker",
    "Outcome",
    "Page",
    "PageBook",
    "RateLimiter",
    "RetryPolicy",
    "RouteState",
    "Step",
    "Suppressed",
    "TokenBucket",
    "parse_retry_after",
]

Outcome: TypeAlias = Literal["delivered", "retry", "failed", "suppressed", "rate_limited"]
TERMINAL: Final[frozenset[str]] = frozenset({"delivered", "failed", "rate_limited"})
RANK: Final = {s: i for i, s in enumerate(SEVERITIES)}


# ------------------------------------------------------------------------- rate limiting


class TokenBucket:
    """``burst`` tokens, refilled at ``rate_per_minute``; starts full."""

    def __init__(self, rate_per_minute: float, burst: int, now: float) -> None:
        self.rate = rate_per_minute / 60.0
        self.capacity = float(burst)
        self.tokens = float(burst)
        self.at = now

    def _refill(self, now: float) -> None:
        if now > self.at:
            self.tokens = min(self.capacity, self.tokens + (now - self.at) * self.rate)
            self.at = now

    def available(self, now: float) -> bool:
        self._refill(now)
        return self.tokens >= 1.0

    def take(self, now: float) -> None:
        self._refill(now)
        self.tokens -= 1.0


class RateLimiter:
    """A bucket per route and one over every route; a page goes out only with a token from both."""

    def __init__(self, routes: Sequence[Route], global_rate: float, global_burst: int, now: float) -> None:
        self.overall = TokenBucket(global_rate, global_burst, now)
        self.by_route = {r.name: TokenBucket(r.config.rate_per_minute, r.config.burst, now) for r in routes}

    def allow(self, route: str, now: float) -> bool:
        bucket = self.by_route[route]
        if not (bucket.available(now) and self.overall.available(now)):
            return False
        bucket.take(now)
        self.overall.take(now)
        return True


# -------------------------------------------------------------------------------- retries


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or HTTP-date); None if absent or bad."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now)


@dataclass(frozen=True)
class AttemptResult:
    """What one HTTP attempt came back with (error texts already redacted by the adapter)."""

    status: int | None
    latency_ms: float
    retry_after: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class RetryPolicy:
    base: float = 1.0
    ceiling: float = 60.0
    max_age: float = 3600.0
    retry_after_max: float = 300.0
    jitter: float = 0.2

    @classmethod
    def from_config(cls, config: PagerConfig) -> RetryPolicy:
        return cls(
            config.retry_base_seconds,
            config.retry_max_seconds,
            config.max_age_seconds,
            config.retry_after_max_seconds,
            config.retry_jitter,
        )

    def backoff(self, attempts: int, rand: float) -> float:
        """Exponential: base, 2*base, 4*base ... up to the ceiling, shortened by up to ``jitter``."""
        raw = min(self.ceiling, self.base * math.pow(2.0, max(0, attempts - 1)))
        return raw * (1.0 - self.jitter * min(max(rand, 0.0), 1.0))

    def decide(
        self, result: AttemptResult, attempts: int, first_attempt_at: float, now: float, rand: float
    ) -> tuple[Outcome, float | None, str | None]:
        """(outcome, delay before the next attempt, error) of an attempt.

        2xx delivers. 429, 408, 425 and 5xx and no response at all (connection refused or reset,
        timeout) are retried -- after Retry-After when the receiver sent one (capped), else with
        backoff -- until the page is ``max_age`` old. Anything else (3xx, other 4xx) fails at once.
        """
        status = result.status
        if status is not None and 200 <= status < 300:
            return "delivered", None, None
        error = result.error or f"HTTP {status}"
        if status is not None and not (status in (408, 425, 429) or status >= 500):
            return "failed", None, error
        delay = self.backoff(attempts, rand)
        after = parse_retry_after(result.retry_after, now)
        if after is not None:
            delay = min(after, self.retry_after_max)
        age = now - first_attempt_at
        if age + delay > self.max_age:
            return "failed", None, f"{error}; gave up after {attempts} attempts over {age:.0f}s"
        return "retry", delay, error


# ------------------------------------------------------------------------- page state


@dataclass(eq=False)
class Hold:
    """A consumed finding: its offset may be committed once every route it touched recorded it."""

    partition: Hashable
    offset: int
    remaining: int = 0


@dataclass(eq=False)
class RouteState:
    """The page of one window to one route."""

    route: Route
    attempts: int = 0
    outcome: Outcome | None = None
    """Terminal outcome (delivered, failed, rate_limited), None while pending."""
    grouped: int = 0
    held: list[Hold] = field(default_factory=list)
    suppressed: int = 0
    suppressed_held: list[Hold] = field(default_factory=list)
    suppressed_finding: Finding | None = None
    body: bytes | None = None
    first_attempt_at: float | None = None
    active: bool = False
    """A delivery task owns this route's page."""

    @property
    def done(self) -> bool:
        return self.outcome is not None


@dataclass(eq=False)
class Page:
    page_key: str
    dedup_key: str
    finding: Finding | None
    """The finding that opened the page (a page restored from the ledger: the first one re-read)."""
    opened_at: float
    expires_at: float
    routes: dict[str, RouteState]
    restored: bool = False

    @property
    def done(self) -> bool:
        return all(rs.done for rs in self.routes.values())


@dataclass(frozen=True)
class Offer:
    """What a finding did: the routes whose delivery must start now and the rate-limited ones to record."""

    kind: Literal["new", "grouped", "suppressed", "resumed", "unrouted", "stale"]
    page: Page | None = None
    start: tuple[RouteState, ...] = ()
    rate_limited: tuple[RouteState, ...] = ()
    release: tuple[Hold, ...] = ()
    """Holds already fully accounted for (commit them now)."""


@dataclass(frozen=True)
class Step:
    """The result of an attempt: the ledger row, when to try again, the holds its recording releases."""

    row: PageAttempt
    delay: float | None
    holds: tuple[Hold, ...] = ()


@dataclass(frozen=True)
class Suppressed:
    page: Page
    state: RouteState
    row: PageAttempt
    holds: tuple[Hold, ...]


def _dt(epoch: float) -> datetime:
    return datetime.fromtimestamp(epoch, UTC)


class PageBook:
    """Open windows by dedup key, each with its page's per-route state."""

    def __init__(
        self,
        config: PagerConfig,
        routes: Sequence[Route],
        now: float,
        forensic_params: ForensicParams | None = None,
        new_id: Callable[[], str] = lambda: str(uuid.uuid4()),
    ) -> None:
        self.config = config
        self.routes = list(routes)
        self.by_name = {r.name: r for r in routes}
        self.limiter = RateLimiter(routes, config.global_rate_per_minute, config.global_burst, now)
        self.policy = RetryPolicy.from_config(config)
        self.forensic_params = forensic_params
        self.new_id = new_id
        self.windows: dict[str, Page] = {}
        self._dirty: dict[int, tuple[Page, RouteState]] = {}  # route states with suppressed counts to record
        self.pending = 0
        """Route deliveries in flight (a task owns them)."""

    # -- routing

    def matching(self, finding: Finding) -> list[Route]:
        rank = RANK[finding.severity]
        return [
            r
            for r in self.routes
            if rank >= RANK[r.config.min_severity] and (not r.config.tenants or finding.tenant in r.config.tenants)
        ]

    # -- findings in

    def offer(self, finding: Finding, hold: Hold, now: float) -> Offer:
        """Account for one finding: open a page, group it into a pending one, or suppress it."""
        if now - finding.detected_at.timestamp() > self.config.stale_after_seconds:
            return Offer("stale", release=(hold,))
        routes = self.matching(finding)
        page = self.windows.get(finding.dedup_key)
        if page is not None and page.expires_at <= now and page.done:
            del self.windows[finding.dedup_key]
            page = None
        if page is None:
            if not routes:
                return Offer("unrouted", release=(hold,))
            return self._open(finding, routes, hold, now)
        if page.restored:
            if page.finding is None:
                page.finding = finding
            for r in routes:
                page.routes.setdefault(r.name, RouteState(r))
        hold.remaining = len(page.routes)
        start = []
        for rs in page.routes.values():
            if rs.done:
                rs.suppressed += 1
                rs.suppressed_held.append(hold)
                rs.suppressed_finding = finding
                self._dirty[id(rs)] = (page, rs)
            else:
                rs.grouped += 1
                rs.held.append(hold)
                if not rs.active:
                    self._set_active(rs, True)
                    start.append(rs)
        release = (hold,) if hold.remaining == 0 else ()
        kind: Literal["resumed", "suppressed", "grouped"] = (
            "resumed" if start else "suppressed" if page.done else "grouped"
        )
        return Offer(kind, page, tuple(start), release=release)

    def _open(self, finding: Finding, routes: list[Route], hold: Hold, now: float) -> Offer:
        page = Page(
            page_key=f"{finding.dedup_key}#{int(now * 1000)}",
            dedup_key=finding.dedup_key,
            finding=finding,
            opened_at=now,
            expires_at=now + self.config.window_seconds,
            routes={},
        )
        hold.remaining = len(routes)
        start, limited = [], []
        for r in routes:
            rs = RouteState(r, grouped=1, held=[hold])
            page.routes[r.name] = rs
            if self.limiter.allow(r.name, now):
                self._set_active(rs, True)
                start.append(rs)
            else:
                rs.outcome = "rate_limited"
                limited.append(rs)
        self.windows[finding.dedup_key] = page
        self._evict()
        return Offer("new", page, tuple(start), tuple(limited))

    def _evict(self) -> None:
        excess = len(self.windows) - self.config.max_windows
        if excess <= 0:
            return
        for key in [k for k, p in self.windows.items() if p.done][:excess]:
            del self.windows[key]

    def expire(self, now: float) -> int:
        """Forget windows that are over and whose pages are done (restored pending ones: after max age)."""
        max_age = self.config.max_age_seconds
        gone = [
            k
            for k, p in self.windows.items()
            if p.expires_at <= now
            and not any(rs.active for rs in p.routes.values())
            and (p.done or (p.restored and p.opened_at + max_age <= now))
        ]
        for key in gone:
            del self.windows[key]
        return len(gone)

    def forget(self, moved: Callable[[str], bool]) -> int:
        """Drop the windows of dedup keys for which ``moved(key)`` holds (their partition went to
        another pager of the group, which rebuilds them from the ledger). Their deliveries must
        have stopped (:meth:`abandon`). Returns the number dropped."""
        gone = [key for key in self.windows if moved(key)]
        for key in gone:
            page = self.windows.pop(key)
            for rs in page.routes.values():
                self._set_active(rs, False)
                self._dirty.pop(id(rs), None)
        return len(gone)

    # -- deliveries

    def content(self, page: Page, rs: RouteState) -> PageContent:
        assert page.finding is not None
        return PageContent(
            finding=page.finding,
            page_key=page.page_key,
            findings_grouped=max(1, rs.grouped),
            opened_at=page.opened_at,
            source=self.config.source,
            forensic_params=self.forensic_params or {},
        )

    def begin_attempt(self, page: Page, rs: RouteState, now: float) -> HttpRequest:
        """The request of the next attempt; the body is built on the first and kept for every retry."""
        if rs.body is None:
            rs.body = render_body(self.content(page, rs), rs.route)
        if rs.first_attempt_at is None:
            rs.first_attempt_at = now
        rs.attempts += 1
        return build_request(rs.route, rs.body, page.page_key, now)

    def end_attempt(self, page: Page, rs: RouteState, result: AttemptResult, now: float, rand: float = 0.5) -> Step:
        """Decide retry/delivered/failed; a terminal outcome hands back the holds its row releases."""
        first = rs.first_attempt_at if rs.first_attempt_at is not None else now
        outcome, delay, error = self.policy.decide(result, rs.attempts, first, now, rand)
        row = self.row(page, rs, outcome, rs.attempts, result.status, error, rs.grouped, now, result.latency_ms)
        holds: tuple[Hold, ...] = ()
        if outcome in TERMINAL:
            rs.outcome = outcome
            self._set_active(rs, False)
            holds, rs.held = tuple(rs.held), []
        return Step(row, delay, holds)

    def abandon(self, rs: RouteState) -> None:
        """The delivery task stopped without a terminal outcome (shutdown): the page stays uncommitted."""
        self._set_active(rs, False)

    def rate_limited_row(self, page: Page, rs: RouteState, now: float) -> Step:
        error = f"rate limited: route {rs.route.name} or the global page budget is spent"
        row = self.row(page, rs, "rate_limited", 0, None, error, rs.grouped, now, 0.0)
        holds, rs.held = tuple(rs.held), []
        return Step(row, None, holds)

    def take_suppressed(self, now: float) -> list[Suppressed]:
        """One ``suppressed`` row per route that held findings back since the last call."""
        out = []
        for page, rs in self._dirty.values():
            if rs.suppressed:
                row = self.row(page, rs, "suppressed", 0, None, None, rs.suppressed, now, 0.0, rs.suppressed_finding)
                out.append(Suppressed(page, rs, row, tuple(rs.suppressed_held)))
                rs.suppressed, rs.suppressed_held, rs.suppressed_finding = 0, [], None
        self._dirty.clear()
        return out

    @staticmethod
    def release(holds: Iterable[Hold]) -> list[Hold]:
        """Count one recording against each hold; the holds now fully accounted for."""
        out = []
        for hold in holds:
            hold.remaining -= 1
            if hold.remaining == 0:
                out.append(hold)
        return out

    def _set_active(self, rs: RouteState, active: bool) -> None:
        if rs.active != active:
            rs.active = active
            self.pending += 1 if active else -1

    # -- the ledger

    def row(
        self,
        page: Page,
        rs: RouteState,
        outcome: Outcome,
        attempt: int,
        status: int | None,
        error: str | None,
        grouped: int,
        now: float,
        latency_ms: float,
        finding: Finding | None = None,
    ) -> PageAttempt:
        f = finding or page.finding
        assert f is not None
        return PageAttempt(
            attempt_id=self.new_id(),
            page_key=page.page_key,
            dedup_key=page.dedup_key,
            finding_id=f.finding_id,
            rule_id=f.rule_id,
            severity=f.severity,
            tenant=f.tenant,
            channel=rs.route.channel,
            route=rs.route.name,
            attempt=attempt,
            outcome=outcome,
            http_status=status,
            error=error,
            findings_grouped=grouped,
            attempted_at=_dt(now),
            latency_ms=max(0.0, float(latency_ms)),
        )

    def restore(self, rows: Iterable[PageAttempt], now: float) -> int:
        """Rebuild windows from ledger rows (a restart): done pages suppress, pending ones resume.

        A page whose window is over and whose routes are all done is left out; so is one still
        pending but older than ``max_age_seconds``. Routes no longer configured are dropped.
        Returns the number of windows restored.
        """
        by_key: dict[str, list[PageAttempt]] = {}
        for row in rows:
            by_key.setdefault(row.page_key, []).append(row)
        restored = 0
        for key, page_rows in by_key.items():
            opened = min(r.attempted_at.timestamp() for r in page_rows)
            states: dict[str, RouteState] = {}
            for r in page_rows:
                route = self.by_name.get(r.route)
                if route is None:
                    continue
                rs = states.setdefault(r.route, RouteState(route))
                rs.attempts = max(rs.attempts, r.attempt)
                if r.outcome in TERMINAL:
                    rs.outcome = r.outcome
                if r.attempt >= 1:
                    at = r.attempted_at.timestamp()
                    rs.first_attempt_at = at if rs.first_attempt_at is None else min(rs.first_attempt_at, at)
            all_done = all(rs.done for rs in states.values())
            if all_done and opened + self.config.window_seconds <= now:
                continue
            if not all_done and opened + self.config.max_age_seconds <= now:
                continue
            dedup = page_rows[0].dedup_key
            current = self.windows.get(dedup)
            if current is not None and current.opened_at >= opened:
                continue
            self.windows[dedup] = Page(
                page_key=key,
                dedup_key=dedup,
                finding=None,
                opened_at=opened,
                expires_at=opened + self.config.window_seconds,
                routes=states,
                restored=True,
            )
            restored += 1
        return restored


# ---------------------------------------------------------------------------- offsets


class OffsetTracker:
    """Per partition: which consumed offsets are still held; what may be committed."""

    def __init__(self) -> None:
        self._held: dict[Hashable, set[int]] = {}
        self._next: dict[Hashable, int] = {}
        self._committed: dict[Hashable, int] = {}

    def seen(self, partition: Hashable, offset: int) -> None:
        self._held.setdefault(partition, set()).add(offset)
        self._next[partition] = max(self._next.get(partition, 0), offset + 1)

    def done(self, partition: Hashable, offset: int) -> None:
        held = self._held.get(partition)
        if held is not None:
            held.discard(offset)

    def committable(self) -> dict[Hashable, int]:
        """Partition -> offset to commit (oldest held, else past the last seen), where it moved forward."""
        out = {}
        for partition, nxt in self._next.items():
            held = self._held.get(partition)
            position = min(held) if held else nxt
            if position > self._committed.get(partition, -1):
                out[partition] = position
        return out

    def committed(self, offsets: dict[Hashable, int]) -> None:
        for partition, position in offsets.items():
            self._committed[partition] = max(self._committed.get(partition, -1), position)

    def forget(self, partitions: Iterable[Hashable]) -> None:
        for partition in partitions:
            self._held.pop(partition, None)
            self._next.pop(partition, None)
            self._committed.pop(partition, None)

    @property
    def held(self) -> int:
        return sum(len(h) for h in self._held.values())
