"""Pure-engine decisions per CPU-second with 0 %, 10 % and 100 % of calls under a grant with Cedar policies.

What runs: :meth:`detections.engine.DecisionEngine.decide_all` (replay semantics: every delegation's
calls judged together, Cedar requests batched with ``is_authorized_batch`` per policy set and
delegation, approvals none), in this process, no Kafka. The live pipeline's stage 2 will call the
same :func:`detections.engine.authorize_delegation` per delegation.

Workload: ``--delegations`` delegations (session bound, one grant over ``fs/*`` and ``db/*``), a
share of them (0 %, 10 %, 100 %) whose grant names a policy: a realistic set (a permit, a
``forbid`` on a ``restricted`` resource label, an office-hours ``forbid`` on writes, an argument
check with a decimal) with labels over resources; ``--calls`` calls spread over the delegations,
with resources and arguments. CPU time (``time.process_time``), best of ``--repeat`` runs; one
extra line shows the same 100 % workload judged one call at a time (``decide``: Cedar unbatched).

    .venv/bin/python bench/policy_decisions.py            # 20,000 calls, about a minute here
"""

from __future__ import annotations

import argparse
import random
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchkit import announce, console, new_table, say

from detections.engine import DecisionEngine
from schemas import BaseEvent, GrantIssued, PolicyPublished, SessionBound, ToolCall

CODE = ("detections/engine.py", "detections/policy.py", "detections/approvals.py")
T0 = datetime(2026, 11, 23, 8, 0, tzinfo=UTC)
POLICY = """
permit(principal, action == Action::"call", resource);
forbid(principal, action, resource) when { context.labels.contains("restricted") };
forbid(principal, action, resource) when { resource.tool like "write*" && (context.hour < 7 || context.hour >= 20) };
forbid(principal, action, resource)
when { context.arguments has amount && context.arguments.amount.greaterThan(decimal("1000.0")) };
"""
LABELS = {"restricted": ["db:prod/*"], "personal": ["file:/home/*"]}


def _eid(rng: random.Random) -> str:
    return str(uuid.UUID(int=rng.getrandbits(128)))


def workload(delegations: int, calls: int, share: float, seed: int = 7) -> tuple[list[BaseEvent], list[ToolCall]]:
    rng = random.Random(seed)
    facts: list[BaseEvent] = [
        PolicyPublished(
            event_id=_eid(rng),
            event_time=T0 - timedelta(days=1),
            tenant="acme",
            policy_id="data",
            version="v1",
            cedar=POLICY,
            labels=LABELS,
            published_by="bench",
        )
    ]
    with_policy = set(rng.sample(range(delegations), round(delegations * share)))
    for d in range(delegations):
        facts.append(
            SessionBound(
                event_id=_eid(rng),
                event_time=T0,
                tenant="acme",
                session_id=f"s{d}",
                principal=f"user{d}",
                agent_id=f"agent{d % 7}",
                valid_from=T0,
            )
        )
        facts.append(
            GrantIssued(
                event_id=_eid(rng),
                event_time=T0,
                tenant="acme",
                grant_id=f"g{d}",
                principal=f"user{d}",
                agent_id=f"agent{d % 7}",
                tools=["fs/*", "db/*"],
                not_before=T0,
                granted_by=f"user{d}",
                purpose="bench",
                policies=["data"] if d in with_policy else [],
            )
        )
    out: list[ToolCall] = []
    tools = [("fs", "read_file"), ("fs", "write_file"), ("db", "query"), ("db", "write_rows")]
    resources = [["file:/data/a.txt"], ["file:/home/alice/notes"], ["db:prod/users"], ["db:dev/users"], []]
    for i in range(calls):
        d = rng.randrange(delegations)
        server, tool = rng.choice(tools)
        out.append(
            ToolCall(
                event_id=_eid(rng),
                event_time=T0 + timedelta(seconds=rng.randrange(14 * 3600)),
                tenant="acme",
                call_id=f"c{i}",
                session_id=f"s{d}",
                server=server,
                tool=tool,
                arguments={"path": "/data/a.txt", "amount": rng.choice([12, 999.5, 1000.25, 5e3]), "tags": ["x", "y"]},
                resources=rng.choice(resources),
                transport="sdk",
            )
        )
    return facts, out


def measure(
    facts: list[BaseEvent], calls: list[ToolCall], repeat: int, batched: bool = True
) -> tuple[float, dict[str, int]]:
    best = float("inf")
    verdicts: dict[str, int] = {}
    for _ in range(repeat):
        engine = DecisionEngine()
        for f in facts:
            engine.add_fact(f)
        start = time.process_time()
        decisions = engine.decide_all(calls) if batched else [engine.decide(c) for c in calls]
        best = min(best, time.process_time() - start)
        verdicts = {}
        for d in decisions:
            verdicts[d.verdict] = verdicts.get(d.verdict, 0) + 1
    return best, verdicts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=20_000)
    parser.add_argument("--delegations", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    announce(CODE)
    table = new_table(
        f"pure-engine decisions, {args.calls:,} calls over {args.delegations:,} delegations (best of {args.repeat})",
        ["calls under a grant with policies", "Cedar", "CPU s", "decisions per CPU-second", "µs per call", "verdicts"],
        left=("calls under a grant with policies", "Cedar", "verdicts"),
    )
    for share, batched in ((0.0, True), (0.1, True), (1.0, True), (1.0, False)):
        facts, calls = workload(args.delegations, args.calls, share)
        say(f"{share:.0%} {'batched' if batched else 'one by one'} ...")
        cpu, verdicts = measure(facts, calls, args.repeat if batched else 1, batched)
        table.add_row(
            f"{share:.0%}",
            "batched" if batched else "one by one",
            f"{cpu:.2f}",
            f"{len(calls) / cpu:,.0f}",
            f"{cpu / len(calls) * 1e6:,.1f}",
            ", ".join(f"{k} {v}" for k, v in sorted(verdicts.items())),
        )
    console.print(table)


if __name__ == "__main__":
    main()
