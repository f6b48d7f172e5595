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

* the detector catalog (:mod:`collectors.secret_catalog`, about 80 formats: key material,
  JWTs, cloud, source-hosting, registry, CI, AI, payment and messaging provider tokens, URL and
  DSN passwords -- also ``scheme:/user:pw@host`` --, HTTP credentials, and values assigned to
  credential-like names in text). One Aho-Corasick pass finds the catalog's keywords; only the
  detectors of keywords present run, at the keyword (see :class:`_Engine`);
* canonical views of every text: a secret is also found JSON-escaped (``\\"``, ``\\u0041``),
  %-encoded (``%3D``) or inside a base64 run (up to :data:`MAX_BASE64_DEPTH` levels); the encoded
  form is what gets replaced, by the fingerprint of the decoded secret (so it joins);
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

import base64
import binascii
import bisect
import functools
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

import ahocorasick_rs
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, SecretBytes, field_validator

from collectors.secret_catalog import BARE_DETECTORS, CATALOG, CatalogEntry
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
_PLACEHOLDER_START = "[redacted:"
_SURROGATE = re.compile(r"[\ud800-\udfff]")
_WORDS = re.compile(r"[A-Z]+(?![a-z])|[A-Z]?[a-z]+|[0-9]+")

BUILTIN_PATTERNS: dict[str, str] = {e.name: e.pattern for e in (*CATALOG, *BARE_DETECTORS)}
"""Built-in detectors of :mod:`collectors.secret_catalog` (detector name -> regular expression)."""

MAX_DECODE_CHARS = 256 * 1024
"""Texts longer than this are matched as they are only (no decoded views, no base64 look-inside)."""
MAX_BASE64_DEPTH = 2
"""base64 inside base64 is looked into this many levels deep."""
_MAX_BASE64_RUNS = 32
_SHORTEST_MATCH = 5  # no built-in detector matches fewer characters (`pwd=x`)
_CLEAN_CACHE_CHARS = 256  # texts up to this long in which nothing was found are remembered
_MIN_BASE64 = 24  # characters: 18 bytes, shorter than any secret format worth decoding
_BARE_RUN = (40, 80)  # token runs of this length are candidates for the bare detectors
_TOKEN_CHARS = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/_-")
_RUNS = bytes(ord("a") if chr(c) in _TOKEN_CHARS else ord("b") for c in range(256))
_ASCII_LOWER = str.maketrans({chr(c): chr(c + 32) for c in range(65, 91)})
_JSON_ESCAPE = re.compile(r"\\(?:u[0-9a-fA-F]{4}|[\"\\/bfnrt])")
_JSON_CHARS = {'"': '"', "\\": "\\", "/": "/", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t"}
_PERCENT = re.compile(r"%[0-9A-Fa-f]{2}")

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
    back: int = 0  # > 0: searched from `back` characters before the keyword ...
    span: int = 0  # ... to `span` characters after it; 0: matched at the keyword
    boundary: bool = False  # the match must not follow a letter or digit
    min_entropy: float = 0.0  # bits per character the secret must reach


@dataclass(frozen=True)
class Finding:
    """A secret found in a text: where it is (``start``, ``end``), which detector found it, the secret."""

    start: int
    end: int
    detector: str
    secret: str


def name_words(name: str) -> tuple[str, ...]:
    """The lower-case words of an identifier: ``X-Api-Key`` and ``apiKey`` both give ``("api", "key")``."""
    return tuple(w.lower() for w in _WORDS.findall(name))


_DIGEST_JSON = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode
"""``json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)``, with
the encoder built once (``json.dumps`` with arguments builds one per call: most of a small digest's cost)."""


def _digest_encoder() -> Any:
    """:data:`_DIGEST_JSON` without building the C encoder object anew on every call (the same C
    code and arguments as ``JSONEncoder.iterencode`` passes it, a fresh circular-reference memo each
    call); None where there is no C encoder."""
    make = getattr(json.encoder, "c_make_encoder", None)
    basestring = getattr(json.encoder, "c_encode_basestring", None)
    if make is None or basestring is None:
        return None

    def encode(value: Any) -> str:
        if isinstance(value, str):
            return str(basestring(value))
        return "".join(make({}, str, basestring, None, ":", ",", True, False, True)(value, 0))

    return encode


_DIGEST_FAST = _digest_encoder() or _DIGEST_JSON


def canonical_digest(value: Any) -> str:
    """sha256 over the canonical JSON of a value (sorted keys, no whitespace)."""
    data = _DIGEST_FAST(value)
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

    @property
    def _fast_engine(self) -> _Engine:
        """``self._engine`` without pydantic's ``__getattr__`` (a dictionary look-up instead of a
        search through the model's private attributes: a microsecond per call on the hot path)."""
        engine: _Engine = self.__pydantic_private__["_engine"]  # type: ignore[index]
        return engine

    def known_clean(self, text: str) -> bool:
        """True when :meth:`redact_text` is known to return ``text`` unchanged, with no finding,
        without running the detectors (a short text seen clean before); False means: not known."""
        return self._fast_engine.known_clean(text)

    def fingerprint(self, secret: str, detector: str) -> str:
        """The placeholder that replaces ``secret`` (found by ``detector``)."""
        return self._fast_engine.fingerprint(secret, detector)

    def is_secret_name(self, name: str) -> bool:
        """Whether an argument called ``name`` holds a secret as a whole."""
        return self._fast_engine.is_secret_name(name)

    def redact_text(self, text: str) -> Redacted[str]:
        """``text`` with every secret a detector finds replaced by its fingerprint."""
        counts: Counter[str] = Counter()
        return Redacted(self._fast_engine.text(text, counts), dict(counts))

    def redact(self, value: Any) -> Redacted[Any]:
        """A JSON value, redacted and made storable (no size cap)."""
        counts: Counter[str] = Counter()
        return Redacted(self._fast_engine.value(value, counts, 0), dict(counts))

    def redact_field(self, name: str, value: Any) -> Redacted[Any]:
        """``value`` as stored under the argument ``name`` (fingerprinted whole if the name is credential-like)."""
        counts: Counter[str] = Counter()
        return Redacted(self._fast_engine.field(name, value, counts, 0), dict(counts))

    def redact_arguments(self, arguments: Any) -> Redacted[dict[str, Any]]:
        """Tool-call arguments as a storable object: redacted, then capped at ``max_argument_bytes``.

        ``None`` gives ``{}``; a value that is not an object is stored as ``{"_value": value}``.
        """
        if arguments is None:
            arguments = {}
        elif not isinstance(arguments, dict):
            arguments = {"_value": arguments}
        counts: Counter[str] = Counter()
        redacted = self._fast_engine.value(arguments, counts, 0)
        return Redacted(_cap(redacted, self.max_argument_bytes), dict(counts))


class _Engine:
    """The compiled form of a :class:`Redactor` (plain attributes: the hot path avoids pydantic).

    Matching a text: one Aho-Corasick pass over its ASCII-lower-cased form finds every keyword
    of the catalog; each detector of a keyword found is tried *at* that place (bounded work);
    the bare detectors run only over runs of 40-80 token characters (found by a translation
    to a two-letter alphabet and ``str.find``); configured patterns run over the whole text.
    Then the same over the canonical views of the text: JSON escapes and %-escapes decoded
    (a secret found there replaces its encoded form), and base64 runs decoded (a run that holds
    a secret is replaced by the fingerprints of what it held).
    """

    _CACHE_LIMIT = 4096

    def __init__(self, config: Redactor) -> None:
        self._key = config.key.get_secret_value()
        catalog = _compiled_catalog()
        self._detectors, self._bare = catalog.detectors, catalog.bare
        self._keyword_detectors = catalog.keyword_detectors
        self._keywords_str, self._keywords_bytes = catalog.keywords_str, catalog.keywords_bytes
        self._custom = tuple(_compile(n, p) for n, p in sorted(config.patterns.items()))
        names = sorted({" ".join(name_words(n)) for n in (*DEFAULT_SECRET_NAMES, *config.argument_names)})
        self._secret_name = re.compile(" (?:" + "|".join(re.escape(n) for n in names) + ") ")
        self._name_cache: dict[str, bool] = {}
        self._clean: set[str] = set()  # short texts in which nothing was found

    def __repr__(self) -> str:
        return "<redaction engine>"

    def fingerprint(self, secret: str, detector: str) -> str:
        mac = hmac.digest(self._key, secret.encode("utf-8", "surrogatepass"), "sha256")  # one-shot, in C
        return f"[redacted:{detector}:hmac-sha256:{mac[:8].hex()}]"

    def known_clean(self, text: str) -> bool:
        if text in self._clean:
            return True
        return len(text) < _SHORTEST_MATCH and not self._custom and text.isascii()

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

    # -- text ------------------------------------------------------------------------------
    def text(self, text: str, counts: Counter[str], level: int = 0) -> str:
        short = level == 0 and len(text) <= _CLEAN_CACHE_CHARS  # (inner levels look into less)
        if short and text in self._clean:
            return text
        original = text
        if not text.isascii() and _SURROGATE.search(text):
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        if len(text) < _SHORTEST_MATCH and not self._custom:
            return text
        for _ in range(_MAX_TEXT_PASSES):
            changed = self._pass(text, counts, level)
            if changed == text:
                break
            text = changed
        if short and text is original:  # nothing found: remember (bounded), keys and paths repeat
            if len(self._clean) >= self._CACHE_LIMIT:
                self._clean.clear()
            self._clean.add(text)
        return text

    def _pass(self, text: str, counts: Counter[str], level: int) -> str:
        runs = _runs(text) if len(text) >= _MIN_BASE64 else b""
        found = self.find(text, runs)
        if found:
            text = self._replace(text, found, counts)
        if len(text) > MAX_DECODE_CHARS:
            return text
        if "\\" in text:
            text = self._decoded_view(text, _JSON_ESCAPE, _json_char, counts)
        if "%" in text:
            text = self._decoded_view(text, _PERCENT, _percent_char, counts)
        if level < MAX_BASE64_DEPTH and b"a" * _MIN_BASE64 in runs:
            text = self._base64_view(text, _runs(text), counts, level)  # the runs of the text as it is now
        return text

    def find(self, text: str, runs: bytes | None = None) -> list[Finding]:
        """The secrets in ``text`` (not overlapping each other or a placeholder), in order."""
        if text.isascii():
            hits = self._keywords_bytes.find_matches_as_indexes(text.lower().encode("ascii"), overlapping=True)
        else:
            hits = self._keywords_str.find_matches_as_indexes(text.translate(_ASCII_LOWER), overlapping=True)
        if not hits and not self._custom and not (self._bare and len(text) >= _BARE_RUN[0]):
            return []  # no keyword, too short for the bare detectors, no configured pattern: nothing to find
        taken = _Spans()
        if _PLACEHOLDER_START in text:
            for placeholder in PLACEHOLDER.finditer(text):
                taken.add(*placeholder.span())
        found: list[Finding] = []
        if hits:
            kd = self._keyword_detectors
            # at one place the first detector of the catalog that matches wins; a keyword inside a
            # secret found already, or inside a placeholder ("[redacted:aws_secret_key:..."), starts
            # nothing, but one in the rest of a match does (a token as the user name of a URL)
            for start, d in sorted({(start, d) for k, start, _ in hits for d in kd[k]}):
                if taken.overlaps(start, start + 1):
                    continue
                detector = self._detectors[d]
                if detector.back:
                    hi = min(len(text), start + detector.span)
                    m = detector.pattern.search(text, max(0, start - detector.back), hi)
                    if m is not None and m.end() == hi < len(text):  # cut by the window: match it whole
                        m = detector.pattern.match(text, m.start())
                    if m is None or m.start() > start:
                        continue
                else:
                    m = detector.pattern.match(text, start)
                    if m is None:
                        continue
                if detector.boundary and m.start() > 0 and text[m.start() - 1].isalnum():
                    continue
                self._take(detector, m, found, taken)
        if self._bare and len(text) >= _BARE_RUN[0]:
            runs = runs or _runs(text)
            shortest, longest = _BARE_RUN
            i = runs.find(b"a" * shortest)
            while i != -1:
                j = runs.find(b"b", i + shortest)
                j = len(runs) if j == -1 else j
                if j - i <= longest:
                    for detector in self._bare:
                        for m in detector.pattern.finditer(text, i, min(len(text), j + 1)):
                            self._take(detector, m, found, taken)
                i = runs.find(b"a" * shortest, j)
        for detector in self._custom:
            for m in detector.pattern.finditer(text):
                self._take(detector, m, found, taken)
        found.sort(key=lambda f: f.start)
        return found

    @staticmethod
    def _take(detector: _Detector, m: re.Match[str], found: list[Finding], taken: _Spans) -> None:
        finding = _finding(detector, m)
        if finding is not None and not taken.overlaps(finding.start, finding.end):
            found.append(finding)
            taken.add(finding.start, finding.end)

    def _replace(self, text: str, found: list[Finding], counts: Counter[str]) -> str:
        if not found:
            return text
        parts: list[str] = []
        at = 0
        for f in found:
            parts.append(text[at : f.start])
            parts.append(self.fingerprint(f.secret, f.detector))
            counts[f.detector] += 1
            at = f.end
        parts.append(text[at:])
        return "".join(parts)

    def _decoded_view(self, text: str, escape: re.Pattern[str], decode: Any, counts: Counter[str]) -> str:
        """Find secrets in ``text`` with its escapes decoded; replace their encoded form."""
        segments: list[tuple[int, int, int]] = []  # (decoded start, raw start, raw length of one escape or 0)
        out: list[str] = []
        at = decoded = 0
        for m in escape.finditer(text):
            if m.start() > at:
                segments.append((decoded, at, 0))
                out.append(text[at : m.start()])
                decoded += m.start() - at
            segments.append((decoded, m.start(), m.end() - m.start()))
            out.append(decode(m.group(0)))
            decoded += 1
            at = m.end()
        if not segments:
            return text
        if at < len(text):
            segments.append((decoded, at, 0))
            out.append(text[at:])
        view = "".join(out)
        found = self.find(view)
        if not found:
            return text
        starts = [s[0] for s in segments]

        def raw(index: int, end: bool) -> int:
            dec, raw_start, escape_len = segments[bisect.bisect_right(starts, index) - 1]
            if escape_len:
                return raw_start + (escape_len if end else 0)
            return raw_start + index - dec + (1 if end else 0)

        mapped = [Finding(raw(f.start, False), raw(f.end - 1, True), f.detector, f.secret) for f in found]
        return self._replace(text, mapped, counts)

    def _base64_view(self, text: str, runs: bytes, counts: Counter[str], level: int) -> str:
        """Replace each base64 run that decodes to text holding a secret by the fingerprints of its secrets."""
        found: list[Finding] = []
        want = b"a" * _MIN_BASE64
        i = runs.find(want)
        for _ in range(_MAX_BASE64_RUNS):
            if i == -1:
                break
            j = runs.find(b"b", i + _MIN_BASE64)
            j = len(runs) if j == -1 else j
            end = j
            while end < len(text) and end - j < 2 and text[end] == "=":
                end += 1
            decoded = _b64_text(text[i:end])
            if decoded is not None:
                inner: Counter[str] = Counter()
                redacted = self.text(decoded, inner, level + 1)
                if inner:
                    counts.update(inner)
                    found.append(Finding(i, end, "", " ".join(PLACEHOLDER.findall(redacted))))
            i = runs.find(want, j)
        if not found:
            return text
        parts: list[str] = []
        at = 0
        for f in found:
            parts += [text[at : f.start], f.secret]
            at = f.end
        parts.append(text[at:])
        return "".join(parts)


def _b64_text(run: str) -> str | None:
    """The text a base64 (or base64url) run encodes, if it is mostly printable UTF-8; else None."""
    altchars = b"-_" if ("-" in run or "_" in run) else None
    body = run.rstrip("=")
    try:
        probe = base64.b64decode(body[:32], altchars=altchars) if len(body) >= 32 else None
        if probe is not None and not _printable(probe):
            return None
        data = base64.b64decode(body + "=" * (-len(body) % 4), altchars=altchars)
        decoded = data.decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    return decoded if _printable(data) else None


def _printable(data: bytes) -> bool:
    if not data:
        return False
    good = sum(1 for b in data if 32 <= b < 127 or b in (9, 10, 13) or b >= 128)
    return good >= 0.95 * len(data)


def _runs(text: str) -> bytes:
    """``text`` over two letters, one byte per character: ``a`` for a token character (base64 / base64url),
    ``b`` for any other."""
    return text.encode("ascii", "replace").translate(_RUNS)


def _json_char(escape: str) -> str:
    return chr(int(escape[2:], 16)) if escape[1] == "u" else _JSON_CHARS[escape[1]]


def _percent_char(escape: str) -> str:
    return chr(int(escape[1:], 16))


class _Spans:
    """Disjoint ``[start, end)`` spans, sorted: overlap tests and inserts in O(log n) (plus a memmove)."""

    __slots__ = ("ends", "starts")

    def __init__(self) -> None:
        self.starts: list[int] = []
        self.ends: list[int] = []

    def __bool__(self) -> bool:
        return bool(self.starts)

    def overlaps(self, start: int, end: int) -> bool:
        i = bisect.bisect_left(self.starts, end) - 1  # the last span starting before `end`
        return i >= 0 and self.ends[i] > start

    def add(self, start: int, end: int) -> None:
        i = bisect.bisect_left(self.starts, start)
        self.starts.insert(i, start)
        self.ends.insert(i, end)


def _finding(detector: _Detector, m: re.Match[str]) -> Finding | None:
    group = next((g for g in detector.groups if m.start(g) >= 0), None) or 0
    start, end = m.span(group)
    if start == end:
        return None
    secret = m.group(group)
    if detector.min_entropy and _entropy(secret) < detector.min_entropy:
        return None
    return Finding(start, end, detector.name, secret)


def _entropy(text: str) -> float:
    n = len(text)
    return -sum(c / n * math.log2(c / n) for c in Counter(text).values())


@dataclass(frozen=True)
class _Catalog:
    detectors: tuple[_Detector, ...]
    bare: tuple[_Detector, ...]
    keyword_detectors: tuple[tuple[int, ...], ...]  # per keyword (sorted), the detectors it starts
    keywords_str: Any  # ahocorasick_rs.AhoCorasick over the sorted keywords
    keywords_bytes: Any  # the same over bytes (ASCII texts)


@functools.cache
def _compiled_catalog() -> _Catalog:
    """The catalog compiled once per process (it does not depend on a redactor's configuration)."""
    by_keyword: dict[str, list[int]] = {}
    for index, entry in enumerate(CATALOG):
        for keyword in entry.keywords:
            by_keyword.setdefault(keyword, []).append(index)
    keywords = sorted(by_keyword)
    return _Catalog(
        tuple(_from_entry(e) for e in CATALOG),
        tuple(_from_entry(e) for e in BARE_DETECTORS),
        tuple(tuple(by_keyword[k]) for k in keywords),
        ahocorasick_rs.AhoCorasick(keywords, implementation=ahocorasick_rs.Implementation.DFA),
        ahocorasick_rs.BytesAhoCorasick(  # a DFA: about 3x faster than the default NFA here
            [k.encode("ascii") for k in keywords], implementation=ahocorasick_rs.Implementation.DFA
        ),
    )


def _from_entry(entry: CatalogEntry) -> _Detector:
    pattern = re.compile(entry.pattern)
    groups = tuple(g for g in pattern.groupindex if g.startswith("secret"))
    return _Detector(entry.name, pattern, groups, entry.back, entry.span, entry.boundary, entry.min_entropy)


def _compile(name: str, expression: str) -> _Detector:
    pattern = re.compile(expression)
    groups = tuple(g for g in pattern.groupindex if g.startswith("secret"))
    return _Detector(name, pattern, groups)


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
