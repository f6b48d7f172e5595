"""Standard Webhooks signing (https://www.standardwebhooks.com/): one wire format, two users.

The intake (``collectors.intake``) checks the signatures of the deliveries it receives, and the
pager (``stream_jobs.pager_*``) signs the webhooks it sends. Both take the secret in the same
``whsec_<base64>`` form, so the format lives here, below both.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
from typing import Final

__all__ = ["MIN_SECRET_BYTES", "SECRET_PREFIX", "mac", "new_secret", "parse_secret", "sign"]

SECRET_PREFIX: Final = "whsec_"  # noqa: S105 - the format prefix, not a secret
MIN_SECRET_BYTES: Final = 16


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
    """A fresh random secret (32 bytes), to give to the sender and the receiver."""
    return SECRET_PREFIX + base64.b64encode(os.urandom(32)).decode("ascii")


def mac(key: bytes, msg_id: str, timestamp: str, body: bytes) -> bytes:
    """The raw HMAC-SHA256 over ``msg_id.timestamp.body``."""
    return hmac.new(key, f"{msg_id}.{timestamp}.".encode() + body, hashlib.sha256).digest()


def sign(key: bytes, msg_id: str, timestamp: int, body: bytes) -> str:
    """The ``webhook-signature`` value of a delivery (what a sender computes)."""
    return "v1," + base64.b64encode(mac(key, msg_id, str(timestamp), body)).decode("ascii")
