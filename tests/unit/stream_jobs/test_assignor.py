"""The co-partitioning assignor: partition p of both inputs of a stage lands on one member.

A property test draws topic names, member counts and partition counts; with aiokafka's round robin
(what Faust used for an app without changelog tables) the same layouts split stages apart.
"""

from __future__ import annotations

import json

from aiokafka.coordinator.assignors.roundrobin import RoundRobinPartitionAssignor
from aiokafka.coordinator.protocol import ConsumerProtocolMemberMetadata
from hypothesis import given, settings
from hypothesis import strategies as st

from schemas.topics import Topics
from stream_jobs.assignor import CoPartitionedAssignor, Member, assign, check


class _Cluster:
    """The one call an assignor makes of aiokafka's ClusterMetadata."""

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts

    def partitions_for_topic(self, topic: str) -> set[int] | None:
        n = self.counts.get(topic)
        return None if n is None else set(range(n))


def _production_groups(topics: Topics) -> list[tuple[str, str]]:
    return [(topics.tool_calls, topics.sessions), (topics.calls_by_route, topics.grants)]


def _run(assignor: object, members: dict[str, list[str]], counts: dict[str, int], slots: dict[str, str] | None = None):
    """Leader side then member side, as aiokafka's coordinator does it: member -> (assigned tps, counts)."""
    meta = {}
    for mid, topics in members.items():
        if isinstance(assignor, CoPartitionedAssignor):
            member_assignor = CoPartitionedAssignor(assignor.groups, slot=(slots or {}).get(mid, ""))
            meta[mid] = member_assignor.metadata(topics)
        else:
            meta[mid] = ConsumerProtocolMemberMetadata(0, sorted(topics), b"")
    result = assignor.assign(_Cluster(counts), meta)  # type: ignore[attr-defined]
    out = {}
    for mid, a in result.items():
        tps = [(topic, p) for topic, ps in a.assignment for p in ps]
        receiver = CoPartitionedAssignor([])
        receiver.on_assignment(a)
        out[mid] = (tps, receiver.last_counts)
    return out


names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz._-0123456789", min_size=1, max_size=12)


@settings(max_examples=300, deadline=None)
@given(
    topic_names=st.lists(names, min_size=5, max_size=5, unique=True),
    workers=st.integers(1, 5),
    n1=st.integers(1, 8),
    n2=st.integers(1, 8),
    loose=st.integers(0, 4),
)
def test_every_member_holds_partition_p_of_both_inputs_of_a_stage(
    topic_names: list[str], workers: int, n1: int, n2: int, loose: int
) -> None:
    a, b, c, d, e = topic_names
    groups = [(a, b), (c, d)]
    counts = {a: n1, b: n1, c: n2, d: n2}
    if loose:
        counts[e] = loose
    subscribed = [t for t in (a, b, c, d, e) if t in counts]
    members = {f"member-{i}-{topic_names[i % 5]}": subscribed for i in range(workers)}
    got = _run(CoPartitionedAssignor(groups), members, counts)
    seen: list[tuple[str, int]] = []
    for tps, leader_counts in got.values():
        verdict = check(tps, leader_counts, groups)
        assert verdict.ok, verdict.problems
        seen.extend(tps)
    # every partition exactly once
    assert sorted(seen) == sorted((t, p) for t, n in counts.items() for p in range(n))
    # balanced: the stage indexes a member holds differ by at most one between members
    per_member = [sum(1 for t, _ in tps if t in (a, c)) for tps, _ in got.values()]
    assert max(per_member) - min(per_member) <= 1


def test_production_topic_names_two_and_three_workers_round_robin_would_split_them() -> None:
    topics = Topics()
    groups = _production_groups(topics)
    split = 0
    for partitions in range(1, 9):
        counts = {t: partitions for g in groups for t in g}
        for workers in (2, 3):
            members = {f"m{i}": list(counts) for i in range(workers)}
            ours = _run(CoPartitionedAssignor(groups), members, counts)
            assert all(check(tps, c, groups).ok for tps, c in ours.values())
            # what Faust passed before: round robin over the sorted topic partitions
            theirs = _run(RoundRobinPartitionAssignor, members, counts)
            split += not all(check(tps, counts, groups).ok for tps, _ in theirs.values())
    assert split >= 8, "round robin splits stages for most layouts (this is what the assignor fixes)"


def test_slots_give_the_same_partitions_back_to_the_same_worker_whatever_its_member_id() -> None:
    groups = _production_groups(Topics())
    counts = {t: 4 for g in groups for t in g}
    first = _run(
        CoPartitionedAssignor(groups), {"zz": list(counts), "aa": list(counts)}, counts, {"zz": "h-0", "aa": "h-1"}
    )
    # h-0 restarts with a new member id that now sorts after h-1's
    again = _run(
        CoPartitionedAssignor(groups), {"zz": list(counts), "ab": list(counts)}, counts, {"ab": "h-0", "zz": "h-1"}
    )
    assert sorted(first["zz"][0]) == sorted(again["ab"][0])
    assert sorted(first["aa"][0]) == sorted(again["zz"][0])


def test_unequal_partition_counts_are_refused_by_every_member_that_holds_the_stage() -> None:
    groups = [("calls", "grants")]
    got = _run(
        CoPartitionedAssignor(groups), {"m0": ["calls", "grants"], "m1": ["calls", "grants"]}, {"calls": 4, "grants": 2}
    )
    verdicts = [check(tps, c, groups) for tps, c in got.values()]
    assert all(not v.ok for v in verdicts)
    assert all("different partition counts: calls=4, grants=2" in v.problems[0] for v in verdicts)


def test_a_stage_whose_topic_has_no_metadata_yet_is_not_handed_out() -> None:
    groups = [("calls", "sessions"), ("route", "grants")]
    got = _run(
        CoPartitionedAssignor(groups),
        {"m0": ["calls", "sessions", "route", "grants"]},
        {"calls": 2, "sessions": 2, "route": 2},
    )
    tps, counts = got["m0"]
    assert sorted(tps) == [("calls", 0), ("calls", 1), ("sessions", 0), ("sessions", 1)]
    verdict = check(tps, counts, groups)
    assert verdict.ok and verdict.waiting == ["topics ['grants'] have no metadata yet; their stage is not assigned"]


def test_check_refuses_a_split_stage_and_an_assignment_without_counts() -> None:
    groups = [("calls", "grants")]
    split = check([("calls", 0), ("grants", 1)], {"calls": 2, "grants": 2}, groups)
    assert split.problems == ["partition p of the co-partitioned topics is not held together: calls[0], grants[1]"]
    foreign = check([("calls", 0), ("grants", 0)], None, groups)
    assert not foreign.ok and "no partition counts" in foreign.problems[0]
    assert check([], None, groups).ok  # nothing assigned yet: nothing to refuse


def test_members_subscribed_to_half_a_stage_get_none_of_it() -> None:
    members = [Member("m0", frozenset({"calls"})), Member("m1", frozenset({"calls", "grants"}))]
    out = assign(members, {"calls": 2, "grants": 2}, [("calls", "grants")])
    assert out == {"m0": {}, "m1": {"calls": [0, 1], "grants": [0, 1]}}


def test_metadata_carries_the_slot() -> None:
    meta = CoPartitionedAssignor([], slot="host-1").metadata(["b", "a"])
    assert meta.subscription == ["a", "b"] and json.loads(meta.user_data)["slot"] == "host-1"
