"""Kafka administration the services do themselves: create the topics they need, list topics.

:class:`StackError` is the base of every error setting up or running the stack (the CLI's
``scopewatch.stack`` raises its subclasses); a broker refusing to create a topic raises it here.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping

__all__ = ["StackError", "create_topics", "list_topics"]


class StackError(RuntimeError):
    """Base class for errors while setting up or running the local stack."""


async def create_topics(
    bootstrap: str,
    names: list[str],
    partitions: int,
    replication: int = 1,
    configs: Mapping[str, str] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet; return the names actually created.

    Idempotent: topics that already exist (including a concurrent create that
    wins the race) are left alone, whatever their partition count.

    Raises:
        StackError: the broker refused to create a topic.
    """
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    wanted = list(dict.fromkeys(names))
    if not wanted:
        return []
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    await admin.start()
    try:
        existing = set(await admin.list_topics())
        missing = [n for n in wanted if n not in existing]
        if not missing:
            return []
        topic_configs = {k: str(v) for k, v in (configs or {}).items()}
        response = await admin.create_topics(
            [NewTopic(n, partitions, replication, topic_configs=topic_configs) for n in missing]
        )
        created: list[str] = []
        failures: list[str] = []
        for entry in response.topic_errors:
            name, code = entry[0], entry[1]
            message = entry[2] if len(entry) > 2 else None
            if code == 0:
                created.append(name)
            elif code == 36:  # TOPIC_ALREADY_EXISTS
                continue
            else:
                failures.append(f"{name}: error {code} {message or ''}".rstrip())
        if failures:
            raise StackError("could not create Kafka topics: " + "; ".join(failures))
        # The controller answers before the broker's metadata cache knows the new
        # topics; wait until they are visible so callers can use them right away.
        deadline = time.monotonic() + 15.0
        while created and time.monotonic() < deadline:
            if set(created) <= set(await admin.list_topics()):
                break
            await asyncio.sleep(0.05)
        return [n for n in missing if n in created]
    finally:
        await admin.close()


async def list_topics(bootstrap: str) -> set[str]:
    """Names of all topics on the cluster (internal ones such as ``__consumer_offsets`` included)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()
