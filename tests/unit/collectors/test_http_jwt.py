"""Bearer JWT verification of the HTTP collector: RS256/ES256, iss/aud/exp/nbf, keys and JWKS files."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from collectors.jwt_verify import (
    REASONS,
    JwtConfigError,
    JwtVerifier,
    TokenCheck,
    attested_claims,
    bearer_token,
    load_jwks,
    load_pem_key,
    unverified_check,
)

ISS = "https://idp.example.test"
AUD = "https://mcp.example.test"
NOW = 1_900_000_000.0


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def ec_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def pem(key: Any) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def jwk(key: Any, kid: str, alg: str) -> dict[str, Any]:
    algo = jwt.algorithms.RSAAlgorithm if alg == "RS256" else jwt.algorithms.ECAlgorithm
    return {**json.loads(algo.to_jwk(key.public_key())), "kid": kid, "alg": alg, "use": "sig"}


def claims(**extra: Any) -> dict[str, Any]:
    base = {
        "iss": ISS,
        "aud": AUD,
        "sub": "alice@example.com",
        "client_id": "agent-7",
        "jti": "tok-1",
        "scope": "files:read repo:write",
        "act": {"sub": "planner-agent"},
        "iat": int(NOW) - 10,
        "nbf": int(NOW) - 10,
        "exp": int(NOW) + 600,
    }
    base.update(extra)
    return {k: v for k, v in base.items() if v is not None}


def sign(key: Any, alg: str, payload: dict[str, Any], kid: str | None = None, **headers: Any) -> str:
    return jwt.encode(payload, key, algorithm=alg, headers={**({"kid": kid} if kid else {}), **headers})


@pytest.fixture
def files(tmp_path: Path, rsa_key: rsa.RSAPrivateKey, ec_key: ec.EllipticCurvePrivateKey) -> dict[str, Path]:
    rsa_pem = tmp_path / "rsa.pem"
    rsa_pem.write_bytes(pem(rsa_key))
    jwks = tmp_path / "jwks.json"
    jwks.write_text(json.dumps({"keys": [jwk(ec_key, "ec-1", "ES256"), jwk(rsa_key, "rsa-1", "RS256")]}))
    return {"rsa_pem": rsa_pem, "jwks": jwks}


@pytest.fixture
def verifier(files: dict[str, Path]) -> JwtVerifier:
    return JwtVerifier.from_files(
        issuers=[ISS], audiences=[AUD, "other-aud"], pem_files=[files["rsa_pem"]], jwks_file=files["jwks"]
    )


def test_rs256_with_a_pem_key_records_the_verified_claims(verifier: JwtVerifier, rsa_key: Any) -> None:
    check = verifier.check(sign(rsa_key, "RS256", claims()), now=NOW)
    assert check.status == "verified" and check.reason is None
    assert check.attested == {
        "iss": ISS,
        "sub": "alice@example.com",
        "client_id": "agent-7",
        "act": {"sub": "planner-agent"},
        "scope": "files:read repo:write",
        "jti": "tok-1",
        "exp": int(NOW) + 600,
    }
    assert check.not_after == NOW + 600 + 30
    assert check.auth_record() == {"status": "verified"}


def test_es256_with_a_jwks_key_by_kid(verifier: JwtVerifier, ec_key: Any) -> None:
    check = verifier.check(sign(ec_key, "ES256", claims(aud=["x", "other-aud"]), kid="ec-1"), now=NOW)
    assert check.verified
    assert check.attested is not None and check.attested["sub"] == "alice@example.com"


def test_rs256_with_a_jwks_kid(tmp_path: Path, rsa_key: Any, files: dict[str, Path]) -> None:
    only_jwks = JwtVerifier.from_files(issuers=[ISS], audiences=[AUD], jwks_file=files["jwks"])
    assert only_jwks.check(sign(rsa_key, "RS256", claims(), kid="rsa-1"), now=NOW).verified
    assert only_jwks.check(sign(rsa_key, "RS256", claims()), now=NOW).verified  # no kid: every RSA key is tried


def test_azp_stands_in_for_client_id_and_scp_for_scope(verifier: JwtVerifier, rsa_key: Any) -> None:
    token = sign(rsa_key, "RS256", claims(client_id=None, scope=None, azp="agent-azp", scp=["a", "b"]))
    check = verifier.check(token, now=NOW)
    assert check.attested is not None
    assert check.attested["client_id"] == "agent-azp" and check.attested["azp"] == "agent-azp"
    assert check.attested["scope"] == "a b"
    assert attested_claims({"client_id": "c", "azp": "z"}) == {"client_id": "c", "azp": "z"}


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (claims(exp=int(NOW) - 31), "expired"),
        (claims(nbf=int(NOW) + 31), "not_yet_valid"),
        (claims(iat=int(NOW) + 31), "bad_iat"),
        (claims(aud="https://elsewhere.test"), "wrong_audience"),
        (claims(iss="https://evil.test"), "wrong_issuer"),
        (claims(exp=None), "missing_claim"),
        (claims(aud=None), "missing_claim"),
        (claims(iss=None), "missing_claim"),
    ],
)
def test_claim_failures(verifier: JwtVerifier, rsa_key: Any, payload: dict[str, Any], reason: str) -> None:
    check = verifier.check(sign(rsa_key, "RS256", payload), now=NOW)
    assert (check.status, check.reason, check.attested) == ("invalid", reason, None)
    assert reason in REASONS


def test_leeway_accepts_small_clock_skew(verifier: JwtVerifier, rsa_key: Any) -> None:
    assert verifier.check(sign(rsa_key, "RS256", claims(exp=int(NOW) - 29)), now=NOW).verified
    assert verifier.check(sign(rsa_key, "RS256", claims(nbf=int(NOW) + 29, iat=int(NOW))), now=NOW).verified


def test_bad_signatures_and_unknown_keys(verifier: JwtVerifier, rsa_key: Any, ec_key: Any) -> None:
    stranger_rsa = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    stranger_ec = ec.generate_private_key(ec.SECP256R1())
    assert verifier.check(sign(stranger_rsa, "RS256", claims()), now=NOW).reason == "bad_signature"
    assert verifier.check(sign(stranger_ec, "ES256", claims(), kid="ec-1"), now=NOW).reason == "bad_signature"
    # a kid nobody knows falls back to the PEM keys (no kid) of the right type only
    assert verifier.check(sign(stranger_ec, "ES256", claims(), kid="ec-9"), now=NOW).reason == "unknown_key"
    assert verifier.check(sign(rsa_key, "RS256", claims(), kid="rsa-9"), now=NOW).verified  # the PEM key
    # tampering with the payload breaks the signature
    header, _payload, signature = sign(rsa_key, "RS256", claims()).split(".")
    forged = base64.urlsafe_b64encode(json.dumps(claims(sub="mallory")).encode()).rstrip(b"=").decode()
    assert verifier.check(f"{header}.{forged}.{signature}", now=NOW).reason == "bad_signature"


def test_alg_none_hmac_and_other_algorithms_are_refused(verifier: JwtVerifier, rsa_key: Any) -> None:
    unsigned = jwt.encode(claims(), None, algorithm="none")
    assert verifier.check(unsigned, now=NOW).reason == "unsupported_alg"
    # the classic confusion: the RSA public key used as an HMAC secret
    hmac_token = sign(b"k" * 64, "HS256", claims())
    assert verifier.check(hmac_token, now=NOW).reason == "unsupported_alg"
    assert verifier.check(sign(rsa_key, "RS512", claims()), now=NOW).reason == "unsupported_alg"
    assert verifier.check(sign(rsa_key, "PS256", claims()), now=NOW).reason == "unsupported_alg"


def test_garbage_and_size_limits(verifier: JwtVerifier) -> None:
    assert verifier.check("not-a-jwt", now=NOW).reason == "malformed"
    assert verifier.check("a.b.c", now=NOW).reason == "malformed"
    assert verifier.check("x" * 20_000, now=NOW).reason == "too_large"


def test_invalid_tokens_keep_short_untrusted_hints(verifier: JwtVerifier) -> None:
    stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    token = sign(stranger, "RS256", claims(sub="s" * 1000, extra_secret="do-not-copy"), kid="k1")
    check = verifier.check(token, now=NOW)
    assert check.reason == "bad_signature"
    assert check.hints["sub"] == "s" * 256
    assert check.hints["alg"] == "RS256" and check.hints["kid"] == "k1"
    assert check.hints["client_id"] == "agent-7" and check.hints["aud"] == AUD
    assert "extra_secret" not in check.hints and "act" not in check.hints
    record = check.auth_record()
    assert record["status"] == "invalid" and record["reason"] == "bad_signature"
    assert token not in json.dumps(record)
    assert token not in repr(check)


def test_cached_verifications_are_rechecked_for_expiry(verifier: JwtVerifier, rsa_key: Any) -> None:
    token = sign(rsa_key, "RS256", claims(exp=int(NOW) + 60))
    assert verifier.check(token, now=NOW).verified
    assert verifier.check(token, now=NOW + 60 + 29).verified  # cached, within leeway
    late = verifier.check(token, now=NOW + 60 + 31)
    assert (late.status, late.reason) == ("invalid", "expired")
    early_token = sign(rsa_key, "RS256", claims(nbf=int(NOW) + 100, iat=int(NOW)))
    assert verifier.check(early_token, now=NOW + 100).verified
    assert verifier.check(early_token, now=NOW).reason == "not_yet_valid"  # the cache honours nbf too


def test_jwks_rotation_is_picked_up(files: dict[str, Path], ec_key: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    verifier = JwtVerifier.from_files(issuers=[ISS], audiences=[AUD], jwks_file=files["jwks"])
    rotated = ec.generate_private_key(ec.SECP256R1())
    token = sign(rotated, "ES256", claims(), kid="ec-2")
    assert verifier.check(token, now=NOW).reason == "unknown_key"
    files["jwks"].write_text(json.dumps({"keys": [jwk(ec_key, "ec-1", "ES256"), jwk(rotated, "ec-2", "ES256")]}))
    stat = files["jwks"].stat()
    os.utime(files["jwks"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
    monkeypatch.setattr("collectors.jwt_verify._JWKS_RECHECK_SECONDS", 0.0)
    assert verifier.check(token, now=NOW).verified
    files["jwks"].write_text("{broken")  # a broken rotation keeps the keys we have
    os.utime(files["jwks"], ns=(stat.st_atime_ns, stat.st_mtime_ns + 2_000_000_000))
    assert verifier.check(sign(ec_key, "ES256", claims(jti="t2"), kid="ec-1"), now=NOW).verified
    assert verifier.check(sign(rotated, "ES256", claims(jti="t3"), kid="ec-9"), now=NOW).reason == "unknown_key"


def test_key_files_are_checked(tmp_path: Path, rsa_key: Any) -> None:
    private = tmp_path / "private.pem"
    private.write_bytes(
        rsa_key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    with pytest.raises(JwtConfigError, match="private key"):
        load_pem_key(private)
    small = tmp_path / "small.pem"
    small.write_bytes(pem(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
    with pytest.raises(JwtConfigError, match="at least 2048"):
        load_pem_key(small)
    p384 = tmp_path / "p384.pem"
    p384.write_bytes(pem(ec.generate_private_key(ec.SECP384R1())))
    with pytest.raises(JwtConfigError, match="P-256"):
        load_pem_key(p384)
    junk = tmp_path / "junk.pem"
    junk.write_text("-----BEGIN PUBLIC KEY-----\nnope\n-----END PUBLIC KEY-----\n")
    with pytest.raises(JwtConfigError, match="not a PEM public key"):
        load_pem_key(junk)
    with pytest.raises(JwtConfigError, match="cannot read"):
        load_pem_key(tmp_path / "missing.pem")


def test_certificates_are_accepted(tmp_path: Path, ec_key: Any) -> None:
    import datetime

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes
    from cryptography.x509.oid import NameOID

    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "idp")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(ec_key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(ec_key, hashes.SHA256())
    )
    path = tmp_path / "idp.crt"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    verifier = JwtVerifier.from_files(issuers=[ISS], audiences=[AUD], pem_files=[path])
    assert verifier.check(sign(ec_key, "ES256", claims()), now=NOW).verified


def test_jwks_files_are_checked(tmp_path: Path, rsa_key: Any) -> None:
    path = tmp_path / "jwks.json"
    path.write_text("[]")
    with pytest.raises(JwtConfigError, match="keys"):
        load_jwks(path)
    private = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(rsa_key))
    path.write_text(json.dumps({"keys": [private]}))
    with pytest.raises(JwtConfigError, match="private key"):
        load_jwks(path)
    enc_only = {**jwk(rsa_key, "e", "RS256"), "use": "enc"}
    hmac_key = {"kty": "oct", "k": "c2VjcmV0", "kid": "h"}
    path.write_text(json.dumps({"keys": [enc_only, hmac_key]}))
    with pytest.raises(JwtConfigError, match="no usable"):
        load_jwks(path)
    path.write_text(json.dumps({"keys": [enc_only, hmac_key, jwk(rsa_key, "ok", "RS256")]}))
    assert [k.kid for k in load_jwks(path)] == ["ok"]


def test_verifier_settings_are_checked(files: dict[str, Path]) -> None:
    with pytest.raises(JwtConfigError, match="issuer"):
        JwtVerifier.from_files(issuers=[], audiences=[AUD], jwks_file=files["jwks"])
    with pytest.raises(JwtConfigError, match="audience"):
        JwtVerifier.from_files(issuers=[ISS], audiences=[], jwks_file=files["jwks"])
    with pytest.raises(JwtConfigError, match="no verification keys"):
        JwtVerifier.from_files(issuers=[ISS], audiences=[AUD])
    with pytest.raises(JwtConfigError, match="leeway"):
        JwtVerifier.from_files(issuers=[ISS], audiences=[AUD], jwks_file=files["jwks"], leeway=3600)


def test_bearer_header_parsing() -> None:
    assert bearer_token([]) == (None, TokenCheck(status="absent"))
    assert bearer_token(["Bearer abc.def.ghi"]) == ("abc.def.ghi", None)
    assert bearer_token(["bearer   abc "]) == ("abc", None)
    assert bearer_token(["Basic dXNlcjpwdw=="])[1] == TokenCheck(status="invalid", reason="bad_scheme")
    assert bearer_token(["Bearer"])[1] == TokenCheck(status="invalid", reason="malformed")
    assert bearer_token(["Bearer a", "Bearer b"])[1] == TokenCheck(status="invalid", reason="multiple_tokens")


def test_unverified_check_without_keys(rsa_key: Any) -> None:
    check = unverified_check(sign(rsa_key, "RS256", claims()))
    assert check.status == "unverified" and check.attested is None
    assert check.hints["sub"] == "alice@example.com"
    assert unverified_check("garbage").reason == "malformed"


def test_the_real_clock_is_the_default(verifier: JwtVerifier, rsa_key: Any) -> None:
    now = int(time.time())
    assert verifier.check(sign(rsa_key, "RS256", claims(iat=now, nbf=now, exp=now + 60))).verified
    assert verifier.check(sign(rsa_key, "RS256", claims(iat=now - 600, nbf=now - 600, exp=now - 120))).reason == (
        "expired"
    )


@pytest.mark.parametrize("sub", [None, "", "   ", 42])
def test_a_token_must_name_its_subject(verifier: JwtVerifier, rsa_key: Any, sub: Any) -> None:
    payload = claims(sub=None)
    if sub is not None:
        payload["sub"] = sub
    token = jwt.encode(payload, rsa_key, algorithm="RS256")  # PyJWT itself checks no sub here
    check = verifier.check(token, now=NOW)
    assert (check.status, check.reason, check.attested) == ("invalid", "missing_subject", None)
    assert check.reason in REASONS


def test_a_configured_agent_claim_is_required_and_recorded(files: dict[str, Path], rsa_key: Any) -> None:
    strict = JwtVerifier.from_files(issuers=[ISS], audiences=[AUD], pem_files=[files["rsa_pem"]], agent_claim="azp")
    for azp in (None, "", " "):
        check = strict.check(sign(rsa_key, "RS256", claims(azp=azp)), now=NOW)
        assert (check.status, check.reason) == ("invalid", "missing_agent"), azp
    check = strict.check(sign(rsa_key, "RS256", claims(azp="agent-azp")), now=NOW)
    assert check.verified and check.attested is not None and check.attested["client_id"] == "agent-azp"
    with pytest.raises(JwtConfigError, match="agent claim"):
        JwtVerifier.from_files(issuers=[ISS], audiences=[AUD], pem_files=[files["rsa_pem"]], agent_claim=" ")
