"""Redaction of tool-call arguments and error texts before anything leaves the host.

A :class:`Redactor` is pure configuration plus pure functions: no I/O, no clock, no global
state. It walks a JSON value (objects, arrays, strings, numbers) and replaces every secret
it recognises by a keyed fingerprint::

    [redacted:<detector>:hmac-sha256:<first 16 hex digits of HMAC-SHA256(key, secret)>]

The fingerprint depends only on the key and the secret (not on the detector), so equal
secrets give equal fingerprints wherever they appear -- analysts can join on them -- while
nobody without the key can confirm a guess. The key is a secret itself: it is held in a
:class:`pydantic.SecretBytes` and never shown by ``repr``, ``str`` or ``model_dump``.

What counts as a secret:

* built-in text detectors (:data:`BUILTIN_PATTERNS`): PEM private key blocks (also
  unterminated ones), JWTs, AWS access key ids, AWS secret keys after an ``aws..secret``
  name, GitHub / Slack tokens, common API key formats (``sk-``, ``AIza``, ``sk_live_``,
  ``glpat-``, ...), passwords in URLs (``scheme://user:PASSWORD@host``), ``Bearer`` / ``Basic``
  credentials, and values assigned to credential-like names in text (``api_key=...``,
  ``"password": "..."``, ``DB_PASSWORD=...``);
* configured extra patterns (``patterns``: detector name -> regular expression; if the
  expression has a group whose name starts with ``secret``, only that group is replaced);
* arguments whose *name* is credential-like (:data:`DEFAULT_SECRET_NAMES` plus
  ``argument_names``): the whole value is replaced, whatever its type. Names are compared
  word by word, case-insensitively (``apiKey``, ``X-API-KEY`` and ``api_key`` are the words
  ``api key``; ``db_password`` contains ``password``; ``max_tokens`` does not contain ``token``).

The same pass makes the arguments storable: non-finite floats become the strings ``"NaN"``,
``"Infinity"`` and ``"-Infinity"``, lone UTF-16 surrogates become U+FFFD, values nested
deeper than :data:`MAX_DEPTH` are cut, and arguments larger than ``max_argument_bytes``
(canonical JSON, UTF-8) are cut down: the largest top-level values are replaced, one by one,
by ``{"_truncated": true, "_size_bytes": N, "_digest": "sha256:..."}`` until the rest fits
(or, if that is not enough, the whole object is). Size and digest are those of the
*redacted* value: a plain sha256 of the original would let anyone confirm a guessed secret.

Redaction is idempotent: placeholders are never redacted again, and text is redacted until
nothing changes, so ``redact(redact(x)) == redact(x)``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import math
import re
import secrets
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretBytes, field_validator

from schemas import canonical_json

__all__ = [
    "BUILTIN_PATTERNS",
    "DEFAULT_SECRET_NAMES",
    "MAX_ARGUMENT_BYTES",
    "MAX_DEPTH",
    "MIN_KEY_BYTES",
    "PLACEHOLDER",
    "Redacted",
    "Redactor",
    "canonical_digest",
    "name_words",
]

MAX_ARGUMENT_BYTES = 64 * 1024
MIN_KEY_BYTES = 16
MAX_DEPTH = 64
_MAX_TEXT_PASSES = 8

PLACEHOLDER = re.compile(r"\[redacted:[a-z0-9_]{1,64}:hmac-sha256:[0-9a-f]{16}\]")
_DETECTOR_NAME = re.compile(r"[a-z0-9_]{1,64}")
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")

_B = r"(?<![A-Za-z0-9])"  # a token starts here
_E = r"(?![A-Za-z0-9])"  # and ends here
_ASSIGN = r"\\?[\"']?\s*[:=]\s*"  # `=`, `: `, `": "` or `\": \"` after a name
_VALUE_MIN = (
    r"(?:\\?\"(?P<secret_dq>[^\"\\\r\n]{{{n},}})|'(?P<secret_sq>[^'\r\n]{{{n},}})'"
    r"|(?P<secret>[^\s\"'\\&,;<>()\[\]{{}}]{{{n},}}))"
)

BUILTIN_PATTERNS: dict[str, str] = {
    "private_key": (
        r"-----BEGIN[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----[\s\S]*?"
        r"(?:-----END[A-Z0-9 ]{0,40}PRIVATE KEY(?: BLOCK)?-----|\Z)"
    ),
    "jwt": _B + r"eyJ[A-Za-z0-9_-]{5,}\.[A-Za-z0-9_-]{5,}(?:\.[A-Za-z0-9_-]*){0,3}",
    "aws_access_key": _B + r"(?:AKIA|ASIA|ABIA|ACCA|AGPA|AIDA|AIPA|ANPA|ANVA|AROA|APKA|ASCA)[A-Z0-9]{16}" + _E,
    "aws_secret_key": (
        r"(?i:aws)[A-Za-z0-9_. -]{0,20}?(?i:secret|sk)[A-Za-z0-9_. -]{0,20}?" + _ASSIGN + r"\\?[\"']?"
        r"(?P<secret>[A-Za-z0-9/+]{40})(?![A-Za-z0-9/+=])"
    ),
    "github_token": _B + r"(?:gh[pousr]_[A-Za-z0-9]{20,}|github_pat_[A-Za-z0-9_]{20,})",
    "slack_token": _B + r"xox[abposr]-[A-Za-z0-9-]{10,}",
    "api_key": (
        _B + r"(?:sk-[A-Za-z0-9_-]{20,}|AIza[0-9A-Za-z_-]{35}|(?:sk|rk)_(?:live|test)_[A-Za-z0-9]{16,}"
        r"|glpat-[A-Za-z0-9_-]{20,}|npm_[A-Za-z0-9]{36}|hf_[A-Za-z0-9]{30,})"
    ),
    "url_credentials": r"://[^/\s:@]{0,256}:(?P<secret>[^/\s@]{1,256})@",
    "bearer_token": (
        r"(?i:\b(?:bearer|basic))\s+"
        r"(?P<secret>[A-Za-z0-9._~+/-]{20,}=*|(?=[A-Za-z0-9._~+/-]*[0-9])[A-Za-z0-9._~+/-]{8,}=*)"
    ),
    # a value assigned to a name that ends in a credential word: `DB_PASSWORD=...`, `"api_key": "..."`
    "password_assignment": r"(?i:password|passwd|passphrase)" + _ASSIGN + _VALUE_MIN.format(n=1),
    "credential_assignment": (
        r"(?i:api[_-]?key|access[_-]?key|secret[_-]?key|private[_-]?key|secret|token|credentials?)"
        + _ASSIGN
        + _VALUE_MIN.format(n=8)
    ),
}
"""Built-in text detectors, applied in this order (detector name -> regular expression)."""

_HINTS: dict[str, tuple[str, ...]] = {
    "private_key": ("private key",),
    "jwt": ("eyj",),
    "aws_access_key": ("akia", "asia", "abia", "acca", "agpa", "aida", "aipa", "anpa", "anva", "aroa", "apka", "asca"),
    "aws_secret_key": ("aws",),
    "github_token": ("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_"),
    "slack_token": ("xox",),
    "api_key": ("sk-", "aiza", "_live_", "_test_", "glpat-", "npm_", "hf_"),
    "url_credentials": ("://",),
    "bearer_token": ("bearer", "basic"),
    "password_assignment": ("pass",),
    "credential_assignment": ("key", "secret", "token", "credential"),
}
"""Casefolded substrings, one of which every match of a built-in detector contains (a fast pre-check)."""

DEFAULT_SECRET_NAMES: tuple[str, ...] = (
    "password",
    "passwd",
    "passphrase",
    "secret",
    "token",
    "api_key",
    "apikey",
    "access_key",
    "private_key",
    "authorization",
    "cookie",
    "credential",
    "credentials",
)
"""Argument names whose whole value is a secret (compared word by word, see :func:`name_words`)."""

SECRET_ARGUMENT = "secret_argument"  # noqa: S105 - a detector name, not a password
"""Detector name of values redacted because of their argument name."""

T = TypeVar("T")


@dataclass(frozen=True)
class Redacted(Generic[T]):
    """A redacted value and how many secrets each detector replaced in it."""

    value: T
    counts: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class _Detector:
    name: str
    pattern: re.Pattern[str]
    groups: tuple[str, ...]  # the named groups holding the secret; empty: the whole match
    hints: tuple[str, ...]  # casefolded substrings one of which every match contains; empty: no pre-check


def name_words(name: str) -> tuple[str, ...]:
    """The lower-case words of an identifier: ``X-Api-Key`` and ``apiKey`` both give ``("api", "key")``."""
    return tuple(w.lower() for w in _WORDS.findall(name))


def canonical_digest(value: Any) -> str:
    """sha256 over the canonical JSON of a value (sorted keys, no whitespace)."""
    data = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
    return "sha256:" + hashlib.sha256(data.encode("utf-8", "surrogatepass")).hexdigest()


class Redactor(BaseModel):
    """Redaction policy: the fingerprint key, extra detectors and names, and the size cap.

    ``key`` is required (at least :data:`MIN_KEY_BYTES` bytes); use :meth:`ephemeral` for a
    random one when fingerprints need not be joinable beyond this object's lifetime.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    key: SecretBytes = Field(description="HMAC key of the fingerprints (a secret)")
    patterns: dict[str, str] = Field(
        default_factory=dict, description="extra detectors: name -> regular expression (group `secret...`: the secret)"
    )
    argument_names: tuple[str, ...] = Field(default=(), description="extra credential-like argument names")
    max_argument_bytes: int = Field(default=MAX_ARGUMENT_BYTES, ge=1024, description="size cap of stored arguments")

    _engine: _Engine = PrivateAttr()

    @field_validator("key")
    @classmethod
    def _long_enough(cls, key: SecretBytes) -> SecretBytes:
        if len(key.get_secret_value()) < MIN_KEY_BYTES:
            raise ValueError(f"the redaction key must have at least {MIN_KEY_BYTES} bytes")
        return key

    @field_validator("patterns")
    @classmethod
    def _valid_patterns(cls, patterns: dict[str, str]) -> dict[str, str]:
        for name, expression in patterns.items():
            if not _DETECTOR_NAME.fullmatch(name):
                raise ValueError(f"detector name {name[:64]!r} must match [a-z0-9_]{{1,64}}")
            if name in BUILTIN_PATTERNS or name == SECRET_ARGUMENT:
                raise ValueError(f"detector name {name!r} is built in")
            try:
                re.compile(expression)
            except re.error as exc:  # the message names the position, never the pattern text
                raise ValueError(f"pattern {name!r} is not a valid regular expression: {exc.msg}") from None
        return patterns

    @field_validator("argument_names")
    @classmethod
    def _valid_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            if not name_words(name):
                raise ValueError(f"argument name {name[:64]!r} has no letters or digits")
        return names

    def model_post_init(self, context: Any, /) -> None:
        self._engine = _Engine(self)

    def model_copy(self, *, update: Mapping[str, Any] | None = None, deep: bool = False) -> Redactor:
        """A validated copy (the compiled detectors and key are rebuilt, never shared stale)."""
        return type(self).model_validate({**self.model_dump(), **(update or {})})

    def __eq__(self, other: object) -> bool:
        """Equal configuration (key included), whatever was compiled from it."""
        return isinstance(other, Redactor) and self.model_dump() == other.model_dump()

    __hash__ = None  # type: ignore[assignment]  # configurations hold dicts

    @classmethod
    def ephemeral(cls, **config: Any) -> Redactor:
        """A redactor with a fresh random key: fingerprints only join within its lifetime."""
        return cls(key=SecretBytes(secrets.token_bytes(32)), **config)

    def fingerprint(self, secret: str, detector: str) -> str:
        """The placeholder that replaces ``secret`` (found by ``detector``)."""
        return self._engine.fingerprint(secret, detector)

    def is_secret_name(self, name: str) -> bool:
        """Whether an argument called ``name`` holds a secret as a whole."""
        return self._engine.is_secret_name(name)

    def redact_text(self, text: str) -> Redacted[str]:
        """``text`` with every secret a detector finds replaced by its fingerprint."""
        counts: Counter[str] = Counter()
        return Redacted(self._engine.text(text, counts), dict(counts))

    def redact(self, value: Any) -> Redacted[Any]:
        """A JSON value, redacted and made storable (no size cap)."""
        counts: Counter[str] = Counter()
        return Redacted(self._engine.value(value, counts, 0), dict(counts))

    def redact_field(self, name: str, value: Any) -> Redacted[Any]:
        """``value`` as stored under the argument ``name`` (fingerprinted whole if the name is credential-like)."""
        counts: Counter[str] = Counter()
        return Redacted(self._engine.field(name, value, counts, 0), dict(counts))

    def redact_arguments(self, arguments: Any) -> Redacted[dict[str, Any]]:
        """Tool-call arguments as a storable object: redacted, then capped at ``max_argument_bytes``.

        ``None`` gives ``{}``; a value that is not an object is stored as ``{"_value": value}``.
        """
        if arguments is None:
            arguments = {}
        elif not isinstance(arguments, dict):
            arguments = {"_value": arguments}
        counts: Counter[str] = Counter()
        redacted = self._engine.value(arguments, counts, 0)
        return Redacted(_cap(redacted, self.max_argument_bytes), dict(counts))


class _Engine:
    """The compiled form of a :class:`Redactor` (plain attributes: the hot path avoids pydantic)."""

    _CACHE_LIMIT = 4096

    def __init__(self, config: Redactor) -> None:
        self._key = config.key.get_secret_value()
        detectors = [_compile(n, p, _HINTS.get(n, ())) for n, p in BUILTIN_PATTERNS.items()]
        detectors += [_compile(n, p, ()) for n, p in sorted(config.patterns.items())]
        self._detectors = tuple(detectors)
        self._always = tuple(d for d in detectors if not d.hints)
        hints = sorted({h for d in detectors for h in d.hints}, key=lambda h: (-len(h), h))
        self._any_hint = re.compile("|".join(re.escape(h) for h in hints))
        names = sorted({" ".join(name_words(n)) for n in (*DEFAULT_SECRET_NAMES, *config.argument_names)})
        self._secret_name = re.compile(" (?:" + "|".join(re.escape(n) for n in names) + ") ")
        self._name_cache: dict[str, bool] = {}

    def __repr__(self) -> str:
        return "<redaction engine>"

    def fingerprint(self, secret: str, detector: str) -> str:
        mac = hmac.new(self._key, secret.encode("utf-8", "surrogatepass"), hashlib.sha256)
        return f"[redacted:{detector}:hmac-sha256:{mac.hexdigest()[:16]}]"

    def is_secret_name(self, name: str) -> bool:
        known = self._name_cache.get(name)
        if known is None:
            known = self._secret_name.search(" " + " ".join(name_words(name)) + " ") is not None
            if len(self._name_cache) >= self._CACHE_LIMIT:
                self._name_cache.clear()
            self._name_cache[name] = known
        return known

    # -- walking ---------------------------------------------------------------------------
    def value(self, value: Any, counts: Counter[str], depth: int) -> Any:
        if value is None or isinstance(value, (bool, int)):
            return value
        if isinstance(value, float):
            if math.isfinite(value):
                return value
            return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
        if isinstance(value, str):
            return self.text(value, counts)
        if depth >= MAX_DEPTH:
            return f"[truncated: nested deeper than {MAX_DEPTH} levels]"
        if isinstance(value, dict):
            out: dict[str, Any] = {}
            for raw_key, item in value.items():
                key = self.text(raw_key if isinstance(raw_key, str) else str(raw_key), counts)
                out[key] = self.field(key, item, counts, depth + 1)
            return out
        if isinstance(value, (list, tuple)):
            return [self.value(item, counts, depth + 1) for item in value]
        return self.text(str(value), counts)

    def field(self, name: str, value: Any, counts: Counter[str], depth: int) -> Any:
        if value is not None and value != "" and self.is_secret_name(name):
            return self._whole(value, counts)
        return self.value(value, counts, depth)

    def _whole(self, value: Any, counts: Counter[str]) -> str:
        """The fingerprint of a whole value held under a credential-like name."""
        if isinstance(value, str):
            if PLACEHOLDER.fullmatch(value):
                return value
            secret = value
        else:
            secret = canonical_json(self.value(value, Counter(), 0))
        counts[SECRET_ARGUMENT] += 1
        return self.fingerprint(secret, SECRET_ARGUMENT)

    def text(self, text: str, counts: Counter[str]) -> str:
        if _SURROGATE.search(text):
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        for _ in range(_MAX_TEXT_PASSES):
            folded = text.casefold()
            detectors = self._detectors if self._any_hint.search(folded) else self._always
            changed = text
            for detector in detectors:
                if detector.hints and not any(hint in folded for hint in detector.hints):
                    continue
                changed = self._apply(detector, changed, counts)
            if changed == text:
                break
            text = changed
        return text

    def _apply(self, detector: _Detector, text: str, counts: Counter[str]) -> str:
        """Run one detector over the parts of ``text`` that are not placeholders already."""
        if "[redacted:" not in text:
            return self._sub(detector, text, counts)
        parts: list[str] = []
        start = 0
        for placeholder in PLACEHOLDER.finditer(text):
            parts.append(self._sub(detector, text[start : placeholder.start()], counts))
            parts.append(placeholder.group(0))
            start = placeholder.end()
        parts.append(self._sub(detector, text[start:], counts))
        return "".join(parts)

    def _sub(self, detector: _Detector, text: str, counts: Counter[str]) -> str:
        if not text:
            return text

        def replace(match: re.Match[str]) -> str:
            group = next((g for g in detector.groups if match.start(g) >= 0), None) or 0
            start, end = match.span(group)
            if start == end:
                return match.group(0)
            counts[detector.name] += 1
            whole_start, whole_end = match.span()
            return text[whole_start:start] + self.fingerprint(match.group(group), detector.name) + text[end:whole_end]

        return detector.pattern.sub(replace, text)


def _compile(name: str, expression: str, hints: tuple[str, ...]) -> _Detector:
    pattern = re.compile(expression)
    groups = tuple(g for g in pattern.groupindex if g.startswith("secret"))
    return _Detector(name, pattern, groups, hints)


def _json_size(value: Any) -> int:
    return len(canonical_json(value).encode("utf-8"))


def _cap(arguments: dict[str, Any], limit: int) -> dict[str, Any]:
    """Replace the largest top-level values by a digest until ``arguments`` fit ``limit`` bytes."""
    size = _json_size(arguments)
    if size <= limit:
        return arguments
    sizes = {key: _json_size(value) for key, value in arguments.items()}
    capped = dict(arguments)
    for key in sorted(sizes, key=lambda k: (-sizes[k], k)):
        if size <= limit:
            break
        marker = _truncated(arguments[key], sizes[key])
        shrink = sizes[key] - _json_size(marker)
        if shrink > 0:
            capped[key] = marker
            size -= shrink
    if size <= limit:
        return capped
    return _truncated(arguments, _json_size(arguments))


def _truncated(value: Any, size: int) -> dict[str, Any]:
    return {"_truncated": True, "_size_bytes": size, "_digest": canonical_digest(value)}
