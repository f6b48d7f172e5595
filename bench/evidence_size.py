"""Bytes per evidence record: Avro on Kafka, and per row in ClickHouse (issue 16, item 3).

Evidence comes from the real decision processors (``detections.live`` through the tests' LiveSim):

* ``story``: ``tests/support/scenario.py``'s story (every verdict at least once), provisional and
  final versions;
* ``workload``: the calls of ``decisions_throughput.build_workload`` (80 % in scope, 20 % out of
  scope; delegations with two grants), as ``sink_throughput.py`` uses them;
* ``many-grants``: calls of delegations holding six grants each (one revoked, one expired), so
  every verdict rests on several consent facts.

Per scenario it prints the mean Avro single-object message size, the mean canonical JSON size of
``facts`` and of the reasons, and then inserts the rows (cloned with fresh ids up to ``--rows``) into
a fresh, migrated chDB folder with the sink's writer and reads ``system.parts`` after ``OPTIMIZE
... FINAL``: uncompressed and compressed bytes per row of the evidence table, and the biggest columns.

Usage: ``.venv/bin/python bench/evidence_size.py [--rows 50000] [--json]``
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from statistics import mean
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from schemas import Evidence, canonical_json, encode, parse_event

DATABASE = "evsize"


def _live(events: list[Any], partitions: int = 4) -> list[Evidence]:
    from support.live_sim import LiveSim

    now = datetime.now(UTC)
    sim = LiveSim(partitions=partitions)
    facts = [e for e in events if e.event_type != "tool_call"]
    calls = [e for e in events if e.event_type == "tool_call"]
    for fact in facts:
        sim.deliver(fact, now)
    for i, call in enumerate(calls):
        t = now + timedelta(microseconds=50 * i)
        sim.deliver(call, t)
        sim.drain(t)
    sim.tick(now + timedelta(minutes=5))
    return list(sim.evidence)


def story_evidence() -> list[Evidence]:
    from support.scenario import story

    events = []
    for i in range(20):
        events += [parse_event(e) for e in story(f"t{i}")]
    return _live(events)


def workload_evidence(calls: int = 2000) -> list[Evidence]:
    from decisions_throughput import build_workload

    from schemas import decode

    wl = build_workload(calls, max(10, calls // 10), max(5, calls // 40), 7)
    return _live([*wl.facts, *(decode(v) for _k, v in wl.calls)])


def many_grants_evidence(delegations: int = 40, calls_each: int = 20) -> list[Evidence]:
    from support.scenario import bound, grant, revoke, tool_call

    raw: list[dict[str, Any]] = []
    for d in range(delegations):
        who, agent, sess = f"user{d:03d}@example.com", f"agent-{d:03d}", str(uuid.uuid4())
        raw.append(bound("09:00:00", sess, who, agent))
        raw.append(grant("09:00:00", f"g{d}-read", who, agent, ["fs/read_*", "fs/list_*"], ["file:/data/*"]))
        raw.append(grant("09:00:00", f"g{d}-gh", who, agent, ["github/*"], ["repo:acme/*"]))
        raw.append(grant("09:00:00", f"g{d}-web", who, agent, ["web/fetch"], expires="09:30:00"))
        raw.append(grant("09:00:00", f"g{d}-write", who, agent, ["fs/write_file"], ["file:/data/out/*"]))
        raw.append(revoke("09:10:00", f"g{d}-write", who, agent))
        raw.append(grant("09:00:00", f"g{d}-db", who, agent, ["db/query"], ["db:analytics/*"]))
        raw.append(grant("09:00:00", f"g{d}-mail", who, agent, ["mail/send"]))
        shapes = [
            ("fs", "read_file", ["file:/data/report.csv"]),
            ("github", "create_issue", ["repo:acme/web"]),
            ("web", "fetch", ["url:https://example.com"]),
            ("fs", "write_file", ["file:/data/out/x.txt"]),
            ("shell", "exec", []),
        ]
        for c in range(calls_each):
            server, tool, res = shapes[c % len(shapes)]
            raw.append(tool_call(f"10:{c // 60:02d}:{c % 60:02d}", str(uuid.uuid4()), sess, server, tool, res))
    return _live([parse_event(e) for e in raw])


def describe(sample: list[Evidence]) -> dict[str, Any]:
    facts = [len(canonical_json(e.facts)) for e in sample]
    refs = [len(canonical_json([getattr(e, "fact_ids", []), getattr(e, "fact_hashes", [])])) for e in sample]
    return {
        "records": len(sample),
        "avro_bytes": round(mean(len(encode(e)) for e in sample), 1),
        "facts_json_bytes": round(mean(facts), 1),
        "refs_json_bytes": round(mean(refs), 1),
        "reasons_bytes": round(mean(sum(len(r) for r in e.reasons) for e in sample), 1),
    }


def clickhouse_bytes(client: Any, sample: list[Evidence], rows: int) -> dict[str, Any]:
    """Insert ``rows`` rows cloned from ``sample`` with the sink's writer; bytes per row on disk."""
    from stream_jobs.rows import COLUMNS, Provenance, row_values, to_row
    from stream_jobs.sink import ClickHouseWriter

    client.command(f"TRUNCATE TABLE {DATABASE}.evidence")
    writer = ClickHouseWriter(client, DATABASE)
    names = list(COLUMNS["evidence"])
    base = datetime(2026, 12, 1, tzinfo=UTC)
    tuples = []
    for i in range(rows):
        ev = sample[i % len(sample)]
        t = base + timedelta(milliseconds=i)
        clone = ev.model_copy(
            update={"call_id": str(uuid.uuid4()), "evidence_id": str(uuid.uuid4()), "call_time": t, "decided_at": t}
        )
        table, row = to_row(clone, Provenance("audit.evidence", i % 4, i, base))
        tuples.append(row_values(table, row))
    for start in range(0, rows, 20_000):
        chunk = tuples[start : start + 20_000]
        writer.insert_columns("evidence", names, list(zip(*chunk, strict=True)), f"size|{start}")
    client.command(f"OPTIMIZE TABLE {DATABASE}.evidence FINAL")
    part = client.query(
        "SELECT sum(rows), sum(data_uncompressed_bytes), sum(data_compressed_bytes) FROM system.parts"
        f" WHERE database = '{DATABASE}' AND table = 'evidence' AND active"
    ).result_rows[0]
    cols = client.query(
        "SELECT name, sum(data_uncompressed_bytes), sum(data_compressed_bytes) FROM system.columns"
        f" WHERE database = '{DATABASE}' AND table = 'evidence' GROUP BY name ORDER BY 3 DESC LIMIT 6"
    ).result_rows
    n = int(part[0])
    return {
        "rows": n,
        "uncompressed_bytes_per_row": round(int(part[1]) / n, 1),
        "compressed_bytes_per_row": round(int(part[2]) / n, 1),
        "top_columns_compressed_bytes_per_row": {str(c[0]): round(int(c[2]) / n, 1) for c in cols},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=50_000, help="rows inserted per scenario into chDB")
    ap.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = ap.parse_args()
    scenarios = {
        "story": story_evidence(),
        "workload": workload_evidence(),
        "many-grants": many_grants_evidence(),
    }
    out: dict[str, Any] = {"date": datetime.now(UTC).date().isoformat()}
    from stream_jobs.clickhouse import connect, migrate

    with tempfile.TemporaryDirectory(prefix="evsize-") as tmp:
        client = connect(f"chdb://{tmp}")  # one chDB engine per process: one folder for all scenarios
        migrate(client, DATABASE)
        for name, sample in scenarios.items():
            out[name] = {**describe(sample), "clickhouse": clickhouse_bytes(client, sample, args.rows)}
        client.close()
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"evidence size, {out['date']} ({args.rows:,} rows per scenario into chDB, after OPTIMIZE FINAL)")
    for name in scenarios:
        s = out[name]
        ch = s["clickhouse"]
        print(
            f"  {name:12s} {s['records']:5d} records: Avro {s['avro_bytes']:7.1f} B/msg"
            f" (facts JSON {s['facts_json_bytes']:.0f} B, refs {s['refs_json_bytes']:.0f} B,"
            f" reasons {s['reasons_bytes']:.0f} B);"
            f" ClickHouse {ch['uncompressed_bytes_per_row']:.1f} B/row uncompressed,"
            f" {ch['compressed_bytes_per_row']:.1f} B/row compressed"
        )
        print(f"  {'':12s} biggest columns (compressed B/row): {ch['top_columns_compressed_bytes_per_row']}")


if __name__ == "__main__":
    main()
