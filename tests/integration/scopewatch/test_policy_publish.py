"""``scopewatch policy publish`` and ``scopewatch emit approve|deny`` onto the real broker: the events
land on consent.policies (key tenant/policy_id) and consent.approvals (key tenant/principal/agent_id,
the partition consent.grants uses for the delegation); ``scopewatch up`` creates both topics."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from schemas import ApprovalDecided, PolicyPublished, decode, delegation_key, policy_key
from schemas.topics import partition_for
from scopewatch.stack.kafka import KafkaBroker, create_topics
from stream_jobs.runtime.settings import Settings
from support.kafka import reader
from support.wrap import child_env

pytestmark = pytest.mark.integration

POLICY = (
    'permit(principal, action == Action::"call", resource);\n'
    'forbid(principal, action, resource) when { context.labels.contains("restricted") };\n'
)


@pytest.fixture
def settings(tmp_path: Path, kafka_broker: KafkaBroker, cache_dir: Path) -> Settings:
    s = Settings(
        home=tmp_path / "home",
        cache_dir=cache_dir,
        bootstrap=kafka_broker.config.bootstrap,
        topic_prefix=f"pol{uuid.uuid4().hex[:8]}.",
        partitions=3,
    )
    asyncio.run(create_topics(s.kafka_bootstrap, s.topics.all(), s.partitions))
    return s


def scopewatch(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "scopewatch", *args],
        env=child_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def consume(settings: Settings, topic: str, want: int) -> list[tuple[bytes, int, object]]:
    consumer = reader(settings, topic)
    await consumer.start()
    out: list[tuple[bytes, int, object]] = []
    try:
        for _ in range(60):
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                out += [(m.key, m.partition, decode(m.value)) for m in messages]
            if len(out) >= want:
                break
    finally:
        await consumer.stop()
    return out


async def topic_names(settings: Settings) -> set[str]:
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap)
    await admin.start()
    try:
        return set(await admin.list_topics())
    finally:
        await admin.close()


def test_both_topics_exist(settings: Settings) -> None:
    names = asyncio.run(topic_names(settings))
    assert {settings.topics.policies, settings.topics.approvals} <= names


def test_policy_publish_lands_on_consent_policies(settings: Settings, tmp_path: Path) -> None:
    folder = tmp_path / "policies"
    folder.mkdir()
    (folder / "base.cedar").write_text(POLICY)
    (folder / "labels.json").write_text('{"restricted": ["db:prod/*"]}')
    done = scopewatch(settings, "policy", "publish", str(folder), "--id", "data", "--tenant", "acme")
    assert done.returncode == 0, done.stderr
    assert "published policy_published" in done.stderr
    (folder / "bad.cedar").write_text("forbid(")
    refused = scopewatch(settings, "policy", "publish", str(folder), "--id", "data", "--tenant", "acme")
    assert refused.returncode == 1 and "bad.cedar:1: Cedar parse error" in refused.stderr

    got = asyncio.run(consume(settings, settings.topics.policies, 1))
    assert len(got) == 1  # the refused version never reached Kafka
    key, _partition, event = got[0]
    assert isinstance(event, PolicyPublished)
    assert key == policy_key("acme", "data").encode()
    assert event.version.startswith("sha256:") and event.labels == {"restricted": ["db:prod/*"]}
    assert "context.labels.contains" in event.cedar


def test_emit_approve_and_deny_land_on_consent_approvals_co_partitioned(settings: Settings) -> None:
    common = ["--principal", "alice@acme.example", "--agent-id", "agent/x", "--tenant", "acme", "--approver", "bob"]
    ok = scopewatch(settings, "emit", "approve", *common, "--tool", "fs/write_file", "--arguments", '{"path": "/a"}')
    no = scopewatch(settings, "emit", "deny", *common, "--tool", "fs/delete_file", "--approval-id", "ap-2")
    assert ok.returncode == 0 and no.returncode == 0, (ok.stderr, no.stderr)
    got = asyncio.run(consume(settings, settings.topics.approvals, 2))
    assert len(got) == 2
    key = delegation_key("acme", "alice@acme.example", "agent/x").encode()
    assert {k for k, _, _ in got} == {key}
    assert {p for _, p, _ in got} == {partition_for(key, settings.partitions)}  # where consent.grants puts it
    events = sorted((e for _, _, e in got), key=lambda e: e.decision)  # type: ignore[attr-defined]
    assert all(isinstance(e, ApprovalDecided) for e in events)
    approve, deny = events
    assert isinstance(approve, ApprovalDecided) and isinstance(deny, ApprovalDecided)
    assert (approve.decision, approve.tool, approve.arguments_digest is not None) == ("approve", "fs/write_file", True)
    assert (deny.decision, deny.approval_id, deny.arguments_digest) == ("deny", "ap-2", None)
