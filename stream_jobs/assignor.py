"""Co-partitioned partition assignment for the decision worker's consumer group.

DESIGN.md: both inputs of a stage are co-partitioned (the same key, equal partition counts) and
partition p of both goes to the same worker, with any number of workers. Faust passes aiokafka's
``RoundRobinPartitionAssignor`` unless an app has changelog tables (ours has none: see
``stream_jobs.state``), and round robin splits partition p of two topics across members whenever
the sorted topic names interleave that way. So the worker brings its own assignor.

The pure core:

* :func:`assign` lays out one **co-partition group** (the input topics of one stage) at a time:
  partition index p of every topic of the group goes to one member. Members are ordered by their
  slot (the stable name a worker declares, e.g. its static group instance id) and then by member
  id, and indexes are dealt round robin, continuing across groups so several stages spread over
  the members. A topic outside every group is dealt per partition the same way. A group some of
  whose topics have no metadata yet is not assigned at all (the leader re-assigns when the
  topic appears): half a stage is never handed out.
* :func:`check` is what every member runs on its own assignment: for each group, equal partition
  counts (as the leader saw them) and the same partition indexes of every topic. Anything else is
  a violation the worker must not process through.

:class:`CoPartitionedAssignor` adapts both to aiokafka's ``AbstractPartitionAssignor``: members
send their slot in the subscription's user data, the leader sends back, in each member's
assignment, the partition counts it assigned from, so :func:`check` compares against exactly what
the assignment was computed with.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from aiokafka.coordinator.assignors.abstract import AbstractPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberAssignment, ConsumerProtocolMemberMetadata

log = logging.getLogger("scopewatch.stream.assignor")

NAME = "scopewatch-copartitioned"
VERSION = 1

Groups = Sequence[Sequence[str]]
Assignment = dict[str, dict[str, list[int]]]  # member id -> topic -> partitions


@dataclass(frozen=True)
class Member:
    member_id: str
    subscription: frozenset[str]
    slot: str = ""


def assign(members: Sequence[Member], counts: Mapping[str, int], groups: Groups) -> Assignment:
    """Assign every partition of the subscribed topics whose counts are known.

    ``counts`` maps topic -> partition count for the topics with metadata. Partition p of every
    topic of a group goes to one member that subscribes to the whole group.
    """
    out: Assignment = {m.member_id: {} for m in members}
    ordered = sorted(members, key=lambda m: (m.slot, m.member_id))
    subscribed = set().union(*(m.subscription for m in members)) if members else set()
    grouped: set[str] = set()
    turn = 0
    for group in groups:
        topics = [t for t in group if t in subscribed]
        grouped.update(group)
        if not topics:
            continue
        if any(t not in counts for t in topics) or len(topics) < len(group):
            log.warning("co-partition group %s not assigned: no metadata or no subscriber for some topic", list(group))
            continue
        eligible = [m for m in ordered if all(t in m.subscription for t in topics)]
        if not eligible:
            continue
        for p in range(max(counts[t] for t in topics)):
            member = eligible[turn % len(eligible)]
            turn += 1
            for t in topics:
                if p < counts[t]:  # unequal counts: check() makes every member refuse this group
                    out[member.member_id].setdefault(t, []).append(p)
    for topic in sorted(subscribed - grouped):
        if topic not in counts:
            continue
        eligible = [m for m in ordered if topic in m.subscription]
        for p in range(counts[topic]):
            member = eligible[turn % len(eligible)]
            turn += 1
            out[member.member_id].setdefault(topic, []).append(p)
    return out


@dataclass(frozen=True)
class Verdict:
    """What a member concludes from its assignment: ``problems`` forbid processing anything."""

    problems: list[str] = field(default_factory=list)
    waiting: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check(assigned: Iterable[tuple[str, int]], counts: Mapping[str, int] | None, groups: Groups) -> Verdict:
    """Is this member's assignment co-partitioned? ``counts`` are the leader's partition counts."""
    held: dict[str, set[int]] = {}
    for topic, partition in assigned:
        held.setdefault(topic, set()).add(partition)
    if counts is None:
        if held:
            return Verdict([f"assignment of {sorted(held)} was not made by {NAME} (no partition counts in it)"])
        return Verdict()
    problems: list[str] = []
    waiting: list[str] = []
    for group in groups:
        missing = [t for t in group if t not in counts]
        if missing:
            if any(held.get(t) for t in group):
                problems.append(f"holds partitions of {list(group)} but the leader has no metadata for {missing}")
            else:
                waiting.append(f"topics {missing} have no metadata yet; their stage is not assigned")
            continue
        sizes = {t: counts[t] for t in group}
        if len(set(sizes.values())) > 1:
            problems.append(
                "co-partitioned topics have different partition counts: "
                + ", ".join(f"{t}={n}" for t, n in sizes.items())
            )
            continue
        sets = {t: held.get(t, set()) for t in group}
        first = sets[group[0]]
        if any(s != first for s in sets.values()):
            problems.append(
                "partition p of the co-partitioned topics is not held together: "
                + ", ".join(f"{t}{sorted(s)}" for t, s in sets.items())
            )
    return Verdict(problems, waiting)


class CoPartitionedAssignor(AbstractPartitionAssignor):  # type: ignore[misc]
    """aiokafka's assignor interface over :func:`assign`; one instance per consumer.

    ``last_counts`` holds the partition counts the leader sent with this member's latest
    assignment (None before the first, or when the assignment carried none).
    """

    name = NAME
    version = VERSION

    def __init__(self, groups: Groups, slot: str = "") -> None:
        self.groups = [tuple(g) for g in groups]
        self.slot = slot
        self.last_counts: dict[str, int] | None = None

    def metadata(self, topics: Iterable[str]) -> ConsumerProtocolMemberMetadata:
        user_data = json.dumps({"v": VERSION, "slot": self.slot}).encode()
        return ConsumerProtocolMemberMetadata(self.version, sorted(topics), user_data)

    def assign(
        self, cluster: Any, members: Mapping[str, ConsumerProtocolMemberMetadata]
    ) -> dict[str, ConsumerProtocolMemberAssignment]:
        parsed = [Member(mid, frozenset(meta.subscription), _slot(meta.user_data)) for mid, meta in members.items()]
        counts: dict[str, int] = {}
        for topic in sorted(set().union(*(m.subscription for m in parsed))):
            partitions = cluster.partitions_for_topic(topic)
            if partitions:
                counts[topic] = len(partitions)
        layout = assign(parsed, counts, self.groups)
        user_data = json.dumps({"v": VERSION, "counts": counts}, sort_keys=True).encode()
        log.info("assigned %d partitions of %d topics to %d members", sum(counts.values()), len(counts), len(parsed))
        return {
            mid: ConsumerProtocolMemberAssignment(self.version, sorted(layout[mid].items()), user_data)
            for mid in members
        }

    def on_assignment(self, assignment: ConsumerProtocolMemberAssignment) -> None:
        self.last_counts = _counts(assignment.user_data)


def by_topic(tps: Iterable[Any]) -> dict[str, list[int]]:
    """Topic partitions (anything with ``topic`` and ``partition``) as topic -> sorted partitions."""
    held: dict[str, list[int]] = {}
    for tp in tps:
        held.setdefault(tp.topic, []).append(tp.partition)
    return {topic: sorted(parts) for topic, parts in sorted(held.items())}


def describe(held: Mapping[str, Sequence[int]]) -> str:
    """``topic [0, 2]; other [1]`` for log lines."""
    return "; ".join(f"{topic} {list(parts)}" for topic, parts in held.items())


def _slot(user_data: bytes | None) -> str:
    try:
        slot = json.loads(user_data or b"{}").get("slot", "")
    except (ValueError, AttributeError):
        return ""
    return slot if isinstance(slot, str) else ""


def _counts(user_data: bytes | None) -> dict[str, int] | None:
    try:
        counts = json.loads(user_data or b"").get("counts")
    except (ValueError, AttributeError):
        return None
    if not isinstance(counts, dict):
        return None
    return {str(t): int(n) for t, n in counts.items() if isinstance(n, int)}
