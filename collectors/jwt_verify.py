"""Bearer JWT verification for the HTTP collector (RS256 and ES256, PyJWT + cryptography).

:class:`JwtVerifier` checks a bearer token's signature against configured public keys (PEM
files: public keys or X.509 certificates) and/or a JWKS file, then its ``iss``, ``aud``,
``exp`` and ``nbf`` (``exp`` is required; ``iat`` must not lie in the future) with a small
leeway. The outcome is a :class:`TokenCheck`:

``verified``
    ``attested`` holds the verified claims the audit records: ``iss``, ``sub``, ``client_id``
    (the configured agent claim, else the ``client_id`` claim, else ``azp``), ``azp``, ``act``,
    ``scope`` (``scp`` joined when there is no ``scope``), ``jti`` and ``exp`` -- those present in
    the token. A token is only verified when it names its subject: ``sub`` must be a non-empty
    string (else ``missing_subject``), and so must the agent claim when one is configured (else
    ``missing_agent``).
``invalid``
    ``reason`` is a short code (:data:`REASONS`); ``hints`` holds a few *unverified* claims
    and the header's ``alg``/``kid``, for forensics only (they are untrusted and end up in
    ``claimed``, redacted).
``absent``
    no ``Authorization: Bearer`` header.
``unverified``
    a token, but no keys are configured (verification is off); ``hints`` as for ``invalid``.

Only ``RS256`` and ``ES256`` (P-256) are accepted: ``none``, HMAC and every other algorithm
are refused before any key is tried, so a public key can never be used as an HMAC secret.
RSA keys need at least 2048 bits; private keys are refused (the proxy needs public keys only).

The token itself is never logged, stored or put into an exception message; the verifier
keeps successful verifications in a small cache keyed by the token's SHA-256 (expiry and
``nbf`` are checked again on every hit).
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal, TypeGuard

import jwt
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

__all__ = [
    "ALGORITHMS",
    "REASONS",
    "JwtConfigError",
    "JwtVerifier",
    "TokenCheck",
    "bearer_token",
    "load_pem_key",
    "unverified_check",
]

ALGORITHMS: Final = ("RS256", "ES256")
DEFAULT_LEEWAY_SECONDS: Final = 30.0
MIN_RSA_BITS: Final = 2048
MAX_TOKEN_CHARS: Final = 16 * 1024
MAX_HINT_CHARS: Final = 256
_CACHE_SIZE: Final = 4096
_JWKS_RECHECK_SECONDS: Final = 5.0

REASONS: Final[Mapping[str, str]] = {
    "malformed": "The access token is malformed",
    "too_large": "The access token is too large",
    "unsupported_alg": "The access token is signed with an unsupported algorithm",
    "unknown_key": "No configured key matches the access token",
    "bad_signature": "The access token signature is invalid",
    "expired": "The access token expired",
    "not_yet_valid": "The access token is not valid yet",
    "bad_iat": "The access token was issued in the future",
    "wrong_audience": "The access token is not meant for this resource",
    "wrong_issuer": "The access token comes from an untrusted issuer",
    "missing_claim": "The access token lacks a required claim",
    "missing_subject": "The access token names no subject (sub)",
    "missing_agent": "The access token names no agent (the configured agent claim)",
    "invalid": "The access token is invalid",
    "multiple_tokens": "More than one access token was presented",
    "bad_scheme": "The Authorization header does not carry a Bearer token",
}
"""Failure codes and the ``error_description`` sent with a 401 (no detail from the token)."""

_ATTESTED: Final = ("iss", "sub", "client_id", "azp", "act", "scope", "jti", "exp")
_HINTED: Final = ("iss", "sub", "client_id", "azp", "aud", "jti", "exp", "nbf", "iat")


class JwtConfigError(ValueError):
    """A key, JWKS file or verifier setting is unusable (message names the file, never key bytes)."""


@dataclass(frozen=True)
class TokenCheck:
    """The outcome of checking one request's bearer token."""

    status: Literal["verified", "invalid", "absent", "unverified"]
    attested: dict[str, Any] | None = None
    reason: str | None = None
    hints: dict[str, Any] = field(default_factory=dict)
    not_after: float | None = None
    """``exp`` plus the leeway (verified only): the last instant the token is accepted."""
    not_before: float | None = None
    """``nbf`` minus the leeway (verified tokens with ``nbf`` only)."""

    @property
    def verified(self) -> bool:
        return self.status == "verified"

    def auth_record(self) -> dict[str, Any]:
        """What ``claimed["auth"]`` of a tool call says about this token (never the token)."""
        record: dict[str, Any] = {"status": self.status}
        if self.reason is not None:
            record["reason"] = self.reason
        if self.hints:
            record["unverified"] = dict(self.hints)
        return record


ABSENT: Final = TokenCheck(status="absent")


def bearer_token(values: Sequence[str]) -> tuple[str | None, TokenCheck | None]:
    """The bearer token of the ``Authorization`` header values, or the failed check explaining why not.

    Returns ``(token, None)``, ``(None, ABSENT)`` (no header) or ``(None, invalid check)``.
    """
    if not values:
        return None, ABSENT
    if len(values) > 1:
        return None, TokenCheck(status="invalid", reason="multiple_tokens")
    scheme, _, rest = values[0].strip().partition(" ")
    if scheme.lower() != "bearer":
        return None, TokenCheck(status="invalid", reason="bad_scheme")
    token = rest.strip()
    if not token:
        return None, TokenCheck(status="invalid", reason="malformed")
    return token, None


@dataclass(frozen=True)
class _Key:
    key: Any  # an RSAPublicKey or EllipticCurvePublicKey
    algorithm: str  # "RS256" or "ES256"
    kid: str | None
    source: str  # where it came from (a file name), for messages


def load_pem_key(path: Path) -> _Key:
    """A public key (or certificate) for RS256/ES256 from a PEM file."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise JwtConfigError(f"cannot read key file {path}: {exc.strerror or exc}") from None
    if b"PRIVATE KEY-----" in data:
        raise JwtConfigError(f"{path} holds a private key: give the proxy the public key or certificate only")
    public: Any
    try:
        if b"-----BEGIN CERTIFICATE-----" in data:
            public = x509.load_pem_x509_certificate(data).public_key()
        else:
            public = serialization.load_pem_public_key(data)
    except ValueError:
        raise JwtConfigError(f"{path} is not a PEM public key or certificate") from None
    return _Key(public, _algorithm_for(public, str(path)), None, str(path))


def _algorithm_for(public: Any, source: str) -> str:
    if isinstance(public, rsa.RSAPublicKey):
        if public.key_size < MIN_RSA_BITS:
            raise JwtConfigError(f"{source}: RSA key of {public.key_size} bits, at least {MIN_RSA_BITS} required")
        return "RS256"
    if isinstance(public, ec.EllipticCurvePublicKey):
        if not isinstance(public.curve, ec.SECP256R1):
            raise JwtConfigError(f"{source}: EC key on {public.curve.name}; ES256 needs P-256")
        return "ES256"
    raise JwtConfigError(f"{source}: unsupported key type {type(public).__name__} (RSA or EC P-256 only)")


def load_jwks(path: Path) -> list[_Key]:
    """The usable signature keys of a JWKS file (``{"keys": [...]}``); other keys are skipped."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise JwtConfigError(f"cannot read JWKS file {path}: {exc.strerror or exc}") from None
    except ValueError:
        raise JwtConfigError(f"JWKS file {path} is not JSON") from None
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise JwtConfigError(f'JWKS file {path} has no "keys" list')
    keys: list[_Key] = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue
        if entry.get("d") is not None:
            raise JwtConfigError(f"JWKS file {path}: key #{i} is a private key; publish public keys only")
        if entry.get("alg") is not None and entry.get("alg") not in ALGORITHMS:
            continue
        try:
            public = jwt.PyJWK(entry).key
        except (jwt.PyJWKError, jwt.InvalidKeyError, ValueError, TypeError):
            continue
        kid = entry.get("kid")
        try:
            algorithm = _algorithm_for(public, f"{path} key #{i}")
        except JwtConfigError:
            continue
        if entry.get("alg") is not None and entry["alg"] != algorithm:
            continue
        keys.append(_Key(public, algorithm, kid if isinstance(kid, str) else None, f"{path}#{i}"))
    if not keys:
        raise JwtConfigError(f"JWKS file {path} has no usable RS256/ES256 signature key")
    return keys


@dataclass
class JwtVerifier:
    """Verifies bearer JWTs against fixed keys and an optional JWKS file (re-read when it changes)."""

    issuers: tuple[str, ...]
    audiences: tuple[str, ...]
    keys: list[_Key] = field(default_factory=list)
    jwks_path: Path | None = None
    leeway: float = DEFAULT_LEEWAY_SECONDS
    algorithms: tuple[str, ...] = ALGORITHMS
    agent_claim: str | None = None
    """The claim naming the agent (e.g. ``client_id``, ``azp``): when set, a token without a
    non-empty string in it is invalid (``missing_agent``), and it is what ``attested.client_id``
    records."""

    def __post_init__(self) -> None:
        if not self.issuers:
            raise JwtConfigError("at least one issuer is required to verify tokens")
        if not self.audiences:
            raise JwtConfigError("at least one audience is required to verify tokens")
        if not 0 <= self.leeway <= 300:
            raise JwtConfigError("the leeway must be between 0 and 300 seconds")
        if self.agent_claim is not None and not self.agent_claim.strip():
            raise JwtConfigError("the agent claim must be a claim name, e.g. client_id")
        unknown = [a for a in self.algorithms if a not in ALGORITHMS]
        if unknown or not self.algorithms:
            raise JwtConfigError(f"algorithms must be a subset of {', '.join(ALGORITHMS)}")
        self._lock = threading.Lock()
        self._cache: OrderedDict[bytes, TokenCheck] = OrderedDict()
        self._jwks: list[_Key] = []
        self._jwks_mtime: int | None = None
        self._jwks_checked = 0.0
        if self.jwks_path is not None:
            self._reload_jwks(force=True)
        if not self.keys and not self._jwks:
            raise JwtConfigError("no verification keys configured")

    @classmethod
    def from_files(
        cls,
        *,
        issuers: Iterable[str],
        audiences: Iterable[str],
        pem_files: Iterable[Path] = (),
        jwks_file: Path | None = None,
        leeway: float = DEFAULT_LEEWAY_SECONDS,
        agent_claim: str | None = None,
    ) -> JwtVerifier:
        keys = [load_pem_key(Path(p)) for p in pem_files]
        return cls(
            issuers=tuple(issuers),
            audiences=tuple(audiences),
            keys=keys,
            jwks_path=jwks_file,
            leeway=leeway,
            agent_claim=agent_claim,
        )

    # -- verification --------------------------------------------------------------------
    def check(self, token: str, now: float | None = None) -> TokenCheck:
        """Verify ``token`` as of ``now`` (seconds since the epoch; default: the clock)."""
        now = time.time() if now is None else now
        if len(token) > MAX_TOKEN_CHARS:
            return TokenCheck(status="invalid", reason="too_large")
        digest = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        with self._lock:
            cached = self._cache.get(digest)
            if cached is not None:
                self._cache.move_to_end(digest)
        if cached is not None and self._still_valid(cached, now):
            return cached
        outcome = self._verify(token, now)
        if outcome.verified:
            with self._lock:
                self._cache[digest] = outcome
                while len(self._cache) > _CACHE_SIZE:
                    self._cache.popitem(last=False)
        return outcome

    @staticmethod
    def _still_valid(cached: TokenCheck, now: float) -> bool:
        if cached.not_after is None or now >= cached.not_after:
            return False
        return cached.not_before is None or now >= cached.not_before

    def _verify(self, token: str, now: float) -> TokenCheck:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            return TokenCheck(status="invalid", reason="malformed")
        hints = unverified_hints(token, header)
        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            return TokenCheck(status="invalid", reason="unsupported_alg", hints=hints)
        kid = header.get("kid")
        candidates = self._candidates(alg, kid if isinstance(kid, str) else None)
        if not candidates:
            return TokenCheck(status="invalid", reason="unknown_key", hints=hints)
        for candidate in candidates:
            try:
                claims = _decode(token, candidate, self)
            except jwt.InvalidSignatureError:
                continue
            except jwt.PyJWTError as exc:
                return TokenCheck(status="invalid", reason=_reason(exc), hints=hints)
            failure = _time_failure(claims, now, self.leeway)
            if failure is None:
                failure = self._identity_failure(claims)
            if failure is not None:
                return TokenCheck(status="invalid", reason=failure, hints=hints)
            nbf = claims.get("nbf")
            return TokenCheck(
                status="verified",
                attested=attested_claims(claims, self.agent_claim),
                not_after=float(claims["exp"]) + self.leeway,
                not_before=float(nbf) - self.leeway if _is_number(nbf) else None,
            )
        return TokenCheck(status="invalid", reason="bad_signature", hints=hints)

    def _identity_failure(self, claims: Mapping[str, Any]) -> str | None:
        """A verified token must say whom it is for: a non-empty ``sub`` (and agent claim, if configured).

        Without ``sub`` a call's ``attested`` could never contradict its session binding, so the
        identity-mismatch check could not fire for it.
        """
        if not _named(claims.get("sub")):
            return "missing_subject"
        if self.agent_claim is not None and not _named(claims.get(self.agent_claim)):
            return "missing_agent"
        return None

    def _candidates(self, alg: str, kid: str | None) -> list[_Key]:
        keys = self._all_keys()
        if kid is not None and not any(k.kid == kid for k in keys) and self.jwks_path is not None:
            self._reload_jwks(force=False)  # a key rotation may have added it
            keys = self._all_keys()
        typed = [k for k in keys if k.algorithm == alg]
        if kid is not None and any(k.kid == kid for k in typed):
            return [k for k in typed if k.kid == kid]
        return [k for k in typed if k.kid is None] if kid is not None else typed

    def _all_keys(self) -> list[_Key]:
        with self._lock:
            return [*self.keys, *self._jwks]

    def _reload_jwks(self, *, force: bool) -> None:
        assert self.jwks_path is not None
        mono = time.monotonic()
        if not force and mono - self._jwks_checked < _JWKS_RECHECK_SECONDS:
            return
        self._jwks_checked = mono
        try:
            mtime = self.jwks_path.stat().st_mtime_ns
        except OSError as exc:
            if force:
                raise JwtConfigError(f"cannot read JWKS file {self.jwks_path}: {exc.strerror or exc}") from None
            return
        if not force and mtime == self._jwks_mtime:
            return
        try:
            keys = load_jwks(self.jwks_path)
        except JwtConfigError:
            if force:
                raise
            return  # keep the keys we have when a rotation leaves a broken file behind
        with self._lock:
            self._jwks = keys
            self._jwks_mtime = mtime


def _decode(token: str, key: _Key, verifier: JwtVerifier) -> dict[str, Any]:
    """Signature, ``iss`` and ``aud`` (and that ``exp`` is there) by PyJWT; the times: :func:`_time_failure`."""
    claims: dict[str, Any] = jwt.decode(
        token,
        key.key,
        algorithms=[key.algorithm],
        audience=list(verifier.audiences),
        issuer=list(verifier.issuers),
        leeway=0,
        options={
            "require": ["exp", "iss", "aud"],
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
        },
    )
    return claims


def _time_failure(claims: Mapping[str, Any], now: float, leeway: float) -> str | None:
    """Why ``exp``/``nbf``/``iat`` make the token unacceptable at ``now`` (with ``leeway``), or ``None``."""
    exp = claims.get("exp")
    if not _is_number(exp):
        return "malformed"
    if exp <= now - leeway:
        return "expired"
    for name, reason in (("nbf", "not_yet_valid"), ("iat", "bad_iat")):
        value = claims.get(name)
        if value is not None and (not _is_number(value) or value > now + leeway):
            return reason
    return None


def _is_number(value: Any) -> TypeGuard[int | float]:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


_REASON_OF: Final[tuple[tuple[type[jwt.PyJWTError], str], ...]] = (
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidAudienceError, "wrong_audience"),
    (jwt.InvalidIssuerError, "wrong_issuer"),
    (jwt.MissingRequiredClaimError, "missing_claim"),
    (jwt.InvalidIssuedAtError, "bad_iat"),
    (jwt.InvalidAlgorithmError, "unsupported_alg"),
    (jwt.exceptions.InvalidSubjectError, "missing_subject"),  # sub is not a string
    (jwt.DecodeError, "malformed"),  # last: the base of several others
)


def _reason(exc: jwt.PyJWTError) -> str:
    return next((reason for kind, reason in _REASON_OF if isinstance(exc, kind)), "invalid")


def _named(value: Any) -> bool:
    return isinstance(value, str) and bool(value.strip())


def attested_claims(claims: Mapping[str, Any], agent_claim: str | None = None) -> dict[str, Any]:
    """The verified claims recorded on tool calls (``client_id``: the ``agent_claim`` if given, else
    ``client_id``, else ``azp``)."""
    picked: dict[str, Any] = {}
    for name in _ATTESTED:
        value = claims.get(name)
        if value is not None:
            picked[name] = value
    if agent_claim is not None and _named(claims.get(agent_claim)):
        picked["client_id"] = claims[agent_claim]
    if "client_id" not in picked and isinstance(claims.get("azp"), str):
        picked["client_id"] = claims["azp"]
    if "scope" not in picked:
        scp = claims.get("scp")
        if isinstance(scp, list) and all(isinstance(s, str) for s in scp):
            picked["scope"] = " ".join(scp)
        elif isinstance(scp, str):
            picked["scope"] = scp
    return picked


def unverified_check(token: str) -> TokenCheck:
    """The check of a token when no keys are configured: recorded as unverified, with hints."""
    if len(token) > MAX_TOKEN_CHARS:
        return TokenCheck(status="unverified", reason="too_large")
    try:
        header = jwt.get_unverified_header(token)
    except jwt.PyJWTError:
        return TokenCheck(status="unverified", reason="malformed")
    return TokenCheck(status="unverified", hints=unverified_hints(token, header))


def unverified_hints(token: str, header: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A few claims and header fields of a token that did not verify: untrusted, scalars only, short."""
    hints: dict[str, Any] = {}
    if header is not None:
        for name in ("alg", "kid"):
            if isinstance(header.get(name), str):
                hints[name] = header[name][:MAX_HINT_CHARS]
    try:
        payload = jwt.decode(token, options={"verify_signature": False})
    except jwt.PyJWTError:
        return hints
    if not isinstance(payload, dict):
        return hints
    for name in _HINTED:
        value = payload.get(name)
        if isinstance(value, str):
            hints[name] = value[:MAX_HINT_CHARS]
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int) or (isinstance(value, float) and value == value and abs(value) < 1e18):
            hints[name] = value
        elif name == "aud" and isinstance(value, list):
            hints[name] = [v[:MAX_HINT_CHARS] for v in value[:8] if isinstance(v, str)]
    return hints
