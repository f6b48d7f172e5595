"""Fake secrets of every kind (redaction canaries) and the substrings that must never be stored."""

from __future__ import annotations

import base64
import json
import math
from typing import Any

CUSTOM_PATTERNS = {"acme_ref": r"ACME-INTERNAL-(?P<secret>[A-Z]{3}\d{5})"}
"""A configured extra detector ..."""
CUSTOM_ARGUMENTS = ("launch_code",)
"""... and a configured extra credential-like argument name."""


def b64url(obj: object) -> str:
    """base64url without padding, as in a JWT."""
    return base64.urlsafe_b64encode(json.dumps(obj).encode()).rstrip(b"=").decode()


AWS_ID = "AKIA" + "Q3EXAMPLEFAKE7XY"
AWS_SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYFAKEKEYZQ9"
PEM_BODY = ("MIIEpAIBAAKCAQEAcanaryPEMbodyLineOne", "Q2FuYXJ5UEVNYm9keUxpbmVUd28canary")
PEM = "-----BEGIN RSA PRIVATE KEY-----\n" + "\n".join(PEM_BODY) + "\n-----END RSA PRIVATE KEY-----"
JWT_PARTS = (
    b64url({"alg": "HS256", "typ": "JWT", "kid": "canary"}),
    b64url({"sub": "canary-subject", "iat": 1}),
    "SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJVcanary",
)
JWT = ".".join(JWT_PARTS)
BEARER = "c4n4ryBearerT0ken-9f8e7d6c5b4a"
GHP = "ghp_" + "C4n4ryGithubT0kenQRSTUVWXYZabcdefghij"
SLACK = "xoxb-1234567890-canaryslackTOKEN"
OPENAI = "sk-proj-C4n4ryOpenAIKeyQRSTUVWXYZ"
PASSWORD = "hunter2-canary"
TEXT_PASSWORD = "correct-horse-canary"
URL_PASSWORD = "url-canary-pw"
API_KEY_VALUE = "Zq8canaryApiKeyValue42"
COOKIE = "session=cookie-canary-value"
CUSTOM_SECRET = "ZQX77731"
CUSTOM_ARG = "launch-code-canary"

CANARY_TEXTS = (
    f"id {AWS_ID} here",
    f"AWS_SECRET_ACCESS_KEY={AWS_SECRET}",
    PEM,
    f"token {JWT}",
    f"Authorization: Bearer {BEARER}",
    GHP,
    SLACK,
    OPENAI,
    f"DB_PASSWORD={TEXT_PASSWORD}",
    f"postgres://app:{URL_PASSWORD}@db:5432/app",
    f"https://api.example.com/v1/items?api_key={API_KEY_VALUE}&page=2",
    f"ref ACME-INTERNAL-{CUSTOM_SECRET} end",
)
NEEDLES = (
    "Q3EXAMPLEFAKE7XY",
    AWS_SECRET,
    *PEM_BODY,
    *JWT_PARTS,
    BEARER,
    GHP,
    SLACK,
    OPENAI,
    PASSWORD,
    TEXT_PASSWORD,
    URL_PASSWORD,
    API_KEY_VALUE,
    "cookie-canary-value",
    CUSTOM_SECRET,
    CUSTOM_ARG,
)


def seeded_arguments() -> dict[str, Any]:
    """Every kind of canary, nested in objects, arrays, keys and text."""
    return {
        "path": f"/home/u/{AWS_ID}.txt",
        "url": CANARY_TEXTS[10],
        "password": PASSWORD,
        "launchCode": CUSTOM_ARG,
        "config": {
            "env": [CANARY_TEXTS[1], CANARY_TEXTS[8], {"dsn": CANARY_TEXTS[9]}],
            "headers": {"Authorization": f"Bearer {BEARER}", "Cookie": COOKIE, "Accept": "application/json"},
            "json": json.dumps({"password": TEXT_PASSWORD, "api_key": API_KEY_VALUE}),
        },
        "note": f"here is my key:\n{PEM}\nthanks",
        "tokens": [JWT, GHP, SLACK, OPENAI, 42, None, True],
        "nested": [[{"x": {"y": f"bearer {BEARER}", JWT: "jwt as a key"}}]],
        "custom": CANARY_TEXTS[11],
        "ratio": math.nan,
        "limits": [math.inf, -math.inf, 1.5],
    }


def leaked(text: str) -> list[str]:
    """The canary substrings found in ``text`` (should be none)."""
    return [needle for needle in NEEDLES if needle in text]
