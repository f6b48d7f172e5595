"""Configuration of ``scopewatch pager``: routes, windows, rate limits and retries (a TOML or JSON file).

The file names secrets only by the environment variable that holds them (``secret_env``,
``url_env``); :func:`resolve_routes` reads them when the pager starts. Resolved secrets live in
:class:`pydantic.SecretStr` (masked in any repr) and go nowhere but into the HTTP request: logs and
the ``pages`` ledger name a route by its ``name`` only. :class:`Redactor` scrubs error texts
(e.g. an HTTP client exception) of every secret and every URL before they are logged or recorded.

Example (TOML; every top-level key but ``routes`` is optional)::

    window_seconds = 600            # one page per dedup key per window
    global_rate_per_minute = 60     # token bucket over every route
    global_burst = 20

    [[routes]]
    name = "oncall-pagerduty"
    channel = "pagerduty"           # POST {url}/v2/enqueue, url defaults to https://events.pagerduty.com
    secret_env = "PAGERDUTY_ROUTING_KEY"
    min_severity = "high"

    [[routes]]
    name = "secops-slack"
    channel = "slack"               # an incoming webhook: its URL carries the token, so url_env
    url_env = "SLACK_WEBHOOK_URL"
    min_severity = "medium"
    tenants = ["acme"]              # empty or absent: every tenant

    [[routes]]
    name = "siem"
    channel = "webhook"             # Standard Webhooks, signed with a whsec_ secret
    url = "https://siem.example.com/hooks/scopewatch"
    secret_env = "SIEM_WEBHOOK_SECRET"
    min_severity = "info"
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal, TypeAlias, get_args
from urllib.parse import urlsplit

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError, field_validator, model_validator

from detections.findings import SEVERITIES, Severity

__all__ = [
    "CHANNELS",
    "PAGERDUTY_DEFAULT_URL",
    "SEVERITIES",
    "Channel",
    "PagerConfig",
    "PagerConfigError",
    "Redactor",
    "Route",
    "RouteConfig",
    "Severity",
    "load_config",
    "resolve_routes",
    "webhook_key",
]

Channel: TypeAlias = Literal["pagerduty", "slack", "webhook"]
CHANNELS: Final[tuple[Channel, ...]] = get_args(Channel)
PAGERDUTY_DEFAULT_URL: Final = "https://events.pagerduty.com"
_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
_ENV = r"^[A-Za-z_][A-Za-z0-9_]*$"


class PagerConfigError(ValueError):
    """The pager configuration is invalid or a secret it names is missing (the message names no secret)."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RouteConfig(_Strict):
    """One destination: where findings of at least ``min_severity`` (of ``tenants``) are paged."""

    name: str = Field(pattern=_NAME, description="what logs and the pages ledger call the route")
    channel: Channel
    url: str | None = Field(default=None, description="endpoint (pagerduty: base URL); prefer url_env for Slack")
    url_env: str | None = Field(default=None, pattern=_ENV, description="environment variable holding the URL")
    secret_env: str | None = Field(
        default=None, pattern=_ENV, description="environment variable holding the routing key / whsec_ secret"
    )
    min_severity: Severity = "high"
    tenants: tuple[str, ...] = Field(default=(), description="only these tenants; empty: every tenant")
    rate_per_minute: float = Field(default=30.0, gt=0, description="token bucket refill of this route")
    burst: int = Field(default=10, ge=1, description="token bucket size of this route")
    timeout_seconds: float = Field(default=10.0, gt=0, description="HTTP request timeout")

    @model_validator(mode="after")
    def _channel_needs(self) -> RouteConfig:
        if self.url is not None and self.url_env is not None:
            raise ValueError("give url or url_env, not both")
        if self.channel in ("slack", "webhook") and self.url is None and self.url_env is None:
            raise ValueError(f"a {self.channel} route needs url_env (or url)")
        if self.channel in ("pagerduty", "webhook") and self.secret_env is None:
            what = "the routing key" if self.channel == "pagerduty" else "the whsec_ signing secret"
            raise ValueError(f"a {self.channel} route needs secret_env (the variable holding {what})")
        if self.channel == "slack" and self.secret_env is not None:
            raise ValueError("a slack route has no secret_env: its URL is the secret (url_env)")
        if self.url is not None:
            _check_url(self.url)
        return self


def _check_url(url: str) -> None:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError("url must be an absolute http(s) URL")


class PagerConfig(_Strict):
    """The whole pager configuration file."""

    group: str = Field(default="scopewatch-pager", min_length=1, description="Kafka consumer group")
    window_seconds: float = Field(default=600.0, gt=0, description="one page per dedup key per window")
    max_age_seconds: float = Field(default=3600.0, gt=0, description="retry a page this long, then fail it")
    retry_base_seconds: float = Field(default=1.0, gt=0, description="first backoff (doubling per attempt)")
    retry_max_seconds: float = Field(default=60.0, gt=0, description="backoff ceiling")
    retry_after_max_seconds: float = Field(default=300.0, gt=0, description="longest Retry-After honoured")
    retry_jitter: float = Field(default=0.2, ge=0, le=1, description="backoff shortened by up to this fraction")
    global_rate_per_minute: float = Field(default=60.0, gt=0, description="token bucket refill over all routes")
    global_burst: int = Field(default=20, ge=1, description="token bucket size over all routes")
    stale_after_seconds: float = Field(default=86400.0, gt=0, description="findings detected longer ago: not paged")
    suppressed_flush_seconds: float = Field(default=2.0, gt=0, description="how often held-back counts are recorded")
    max_pending_pages: int = Field(default=1000, ge=1, description="deliveries in flight before consumption pauses")
    max_held_findings: int = Field(default=50_000, ge=1, description="uncommitted findings before consumption pauses")
    max_windows: int = Field(default=100_000, ge=1, description="dedup-key windows remembered (oldest done go first)")
    source: str = Field(default="scopewatch", min_length=1, description="PagerDuty payload.source prefix")
    routes: tuple[RouteConfig, ...] = Field(min_length=1)

    @field_validator("routes")
    @classmethod
    def _unique_names(cls, routes: tuple[RouteConfig, ...]) -> tuple[RouteConfig, ...]:
        seen: set[str] = set()
        for route in routes:
            if route.name in seen:
                raise ValueError(f"two routes are named {route.name!r}")
            seen.add(route.name)
        return routes


def load_config(path: Path) -> PagerConfig:
    """Read a ``.toml`` or ``.json`` pager configuration; PagerConfigError says what is wrong."""
    if path.suffix not in (".toml", ".json"):
        raise PagerConfigError(f"{path}: the pager configuration is a .toml or .json file")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise PagerConfigError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except ValueError as exc:  # tomllib.TOMLDecodeError and json.JSONDecodeError are ValueErrors
        raise PagerConfigError(f"{path}: not valid {path.suffix[1:].upper()}: {exc}") from None
    if not isinstance(data, dict):
        raise PagerConfigError(f"{path}: expected an object at the top level")
    try:
        return PagerConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors()[:5]:
            loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
            problems.append(f"{loc}: {err['msg'].removeprefix('Value error, ')}")
        raise PagerConfigError(f"{path}: " + "; ".join(problems)) from None


@dataclass(frozen=True)
class Route:
    """A route with its secrets read from the environment (masked in every repr)."""

    config: RouteConfig
    url: SecretStr
    """The full endpoint POSTed to (pagerduty: ``{base}/v2/enqueue``)."""
    secret: SecretStr | None
    """PagerDuty routing key, or the webhook's ``whsec_`` secret."""

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def channel(self) -> Channel:
        return self.config.channel

    def secrets(self) -> list[str]:
        """Every secret text of the route (for :class:`Redactor`)."""
        out = [self.url.get_secret_value()]
        parts = urlsplit(out[0])
        if parts.path not in ("", "/"):
            out.append(parts.path + (f"?{parts.query}" if parts.query else ""))
        if parts.query:
            out.append(parts.query)
        if self.secret is not None:
            value = self.secret.get_secret_value()
            out += [value, value.removeprefix("whsec_")]
        return [s for s in out if len(s) >= 4]


def webhook_key(secret: str) -> bytes:
    """The HMAC key of a Standard Webhooks ``whsec_<base64>`` secret (the intake's rules: at least 16 bytes)."""
    from schemas.webhooks import parse_secret

    try:
        return parse_secret(secret)
    except ValueError as exc:
        raise PagerConfigError(str(exc)) from None


def resolve_routes(config: PagerConfig, environ: Mapping[str, str]) -> list[Route]:
    """Read every route's secrets from ``environ``; PagerConfigError names a missing variable, never a value."""
    routes = []
    for rc in config.routes:
        if rc.url_env is not None:
            url = environ.get(rc.url_env, "").strip()
            if not url:
                raise PagerConfigError(f"route {rc.name}: environment variable {rc.url_env} is not set")
            try:
                _check_url(url)
            except ValueError:
                raise PagerConfigError(f"route {rc.name}: {rc.url_env} does not hold an absolute http(s) URL") from None
        else:
            url = rc.url or PAGERDUTY_DEFAULT_URL
        if rc.channel == "pagerduty":
            url = url.rstrip("/") + "/v2/enqueue"
        secret: SecretStr | None = None
        if rc.secret_env is not None:
            value = environ.get(rc.secret_env, "").strip()
            if not value:
                raise PagerConfigError(f"route {rc.name}: environment variable {rc.secret_env} is not set")
            if rc.channel == "webhook":
                try:
                    webhook_key(value)
                except PagerConfigError as exc:
                    raise PagerConfigError(f"route {rc.name}: {rc.secret_env}: {exc}") from None
            secret = SecretStr(value)
        routes.append(Route(rc, SecretStr(url), secret))
    return routes


_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


class Redactor:
    """Removes secrets and URLs from texts that are logged or recorded (error messages, response bodies)."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self._secrets = sorted({s for s in secrets if s}, key=len, reverse=True)

    @classmethod
    def for_routes(cls, routes: Iterable[Route]) -> Redactor:
        return cls(s for r in routes for s in r.secrets())

    def __call__(self, text: str, limit: int = 300) -> str:
        for secret in self._secrets:
            text = text.replace(secret, "***")
        text = _URL.sub("<url>", text)
        text = " ".join(text.split())
        return text if len(text) <= limit else text[: limit - 1] + "…"
