"""Dead-letter records for Kafka messages that could not be processed."""

from __future__ import annotations

import base64
import uuid
from datetime import datetime

from schemas import DeadLetter

MAX_REASON_CHARS = 2000
MAX_PAYLOAD_B64_CHARS = 1_000_000


def dead_letter_for(
    topic: str,
    partition: int,
    offset: int,
    key: bytes | None,
    value: bytes | None,
    stage: str,
    reason: str,
    now: datetime,
) -> DeadLetter:
    """The dead letter for one message; its id is stable, so a redelivered message gives the same record."""
    return DeadLetter(
        dead_letter_id=str(uuid.uuid5(uuid.NAMESPACE_URL, f"{stage}:{topic}:{partition}:{offset}")),
        source_topic=topic,
        source_partition=partition,
        source_offset=offset,
        key=key.decode("utf-8", "replace") if key is not None else None,
        reason=reason[:MAX_REASON_CHARS],
        stage=stage,
        payload_b64=base64.b64encode(value or b"").decode("ascii")[:MAX_PAYLOAD_B64_CHARS],
        failed_at=now,
    )
