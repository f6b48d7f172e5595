"""Kafka administration the services do themselves: create the topics they need, list topics.

:class:`StackError` is the base of every error setting up or running the stack (the CLI's
``scopewatch.stack`` raises its subclasses); a broker refusing to create a topic raises it here.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any

__all__ = ["StackError", "create_topics", "list_topics", "topic_configs"]

log = logging.getLogger("scopewatch.kafka")


class StackError(RuntimeError):
    """Base class for errors while setting up or running the local stack."""


async def create_topics(
    bootstrap: str,
    names: list[str],
    partitions: int,
    replication: int = 1,
    configs: Mapping[str, str] | None = None,
    per_topic: Mapping[str, Mapping[str, str]] | None = None,
) -> list[str]:
    """Create the topics that do not exist yet; return the names actually created.

    Idempotent: topics that already exist (including a concurrent create that
    wins the race) are left alone, whatever their partition count, except that the
    ``per_topic`` configs (topic -> configs, on top of ``configs``) are set on an
    existing topic whose values differ (its other dynamic configs are kept).

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
        extra = {n: {k: str(v) for k, v in c.items()} for n, c in (per_topic or {}).items() if n in wanted}
        await _ensure_configs(admin, {n: c for n, c in extra.items() if n in existing})
        if not missing:
            return []
        topic_configs = {k: str(v) for k, v in (configs or {}).items()}
        response = await admin.create_topics(
            [NewTopic(n, partitions, replication, topic_configs={**topic_configs, **extra.get(n, {})}) for n in missing]
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


async def topic_configs(admin: Any, names: list[str]) -> dict[str, dict[str, tuple[str | None, bool]]]:
    """topic -> config name -> (value, set on the topic itself), through DescribeConfigs."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    found: dict[str, dict[str, tuple[str | None, bool]]] = {}
    if not names:
        return found
    responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, n) for n in names])
    for response in responses:
        for resource in response.resources:
            code, _message, _type, name, entries = resource[:5]
            if code != 0:
                raise StackError(f"could not read the configs of topic {name}: error {code}")
            # entry: name, value, read_only, then (v0) is_default / (v1+) config_source, is_sensitive, ...
            found[name] = {e[0]: (e[1], _is_topic_level(response, e)) for e in entries}
    return found


def _is_topic_level(response: Any, entry: tuple[Any, ...]) -> bool:
    if response.API_VERSION == 0:
        return not entry[3]  # is_default
    return bool(entry[3] == 1)  # config_source DYNAMIC_TOPIC_CONFIG


async def _ensure_configs(admin: Any, wanted: Mapping[str, Mapping[str, str]]) -> None:
    """Set ``wanted`` configs on existing topics whose values differ, keeping their other topic-level ones."""
    from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

    if not wanted:
        return
    current = await topic_configs(admin, sorted(wanted))
    resources = []
    for name, configs in sorted(wanted.items()):
        have = current.get(name, {})
        if all(have.get(k, (None, False))[0] == v for k, v in configs.items()):
            continue
        keep = {k: v for k, (v, topic_level) in have.items() if topic_level and v is not None}
        log.warning("topic %s: setting %s", name, ", ".join(f"{k}={v}" for k, v in sorted(configs.items())))
        resources.append(ConfigResource(ConfigResourceType.TOPIC, name, {**keep, **configs}))
    if resources:
        for response in await admin.alter_configs(resources):
            for resource in response.resources:
                if resource[0] != 0:
                    raise StackError(f"could not set the configs of topic {resource[3]}: error {resource[0]}")


async def list_topics(bootstrap: str) -> set[str]:
    """Names of all topics on the cluster (internal ones such as ``__consumer_offsets`` included)."""
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=30000)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()
