"""What migration 0010 (evidence lists stored once, issue 16) costs readers: the same evidence rows in a store
migrated up to 0009 (``before``: the wide evidence table) and in one migrated to the end (``after``: evidence_rows
+ list tables, ``evidence``/``evidence_final`` views), each merged to one part, then process CPU (warm, median of
``--repeat``) of evidence_current read whole, a point lookup of one call through evidence_current, through
``evidence FINAL`` / ``evidence_final``, a dashboard's scan and verify's scan: in 0009, in 0010 through the views,
and in 0010 as the product's readers read since h16rd (evidence_rows where no list is read, only the lists of the
rows read for call_evidence, the fact lists alone for verify).

Usage: ``.venv/bin/python bench/evidence_reads.py [--rows 360000] [--fresh-sessions]``
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=360_000)
    parser.add_argument("--batch", type=int, default=60_000)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--fresh-sessions", action="store_true")
    args = parser.parse_args()
    from benchkit import evidence_block, evidence_codec, tmpfs_file
    from sink_throughput import realistic_evidence

    from schemas import encode
    from stream_jobs import clickhouse
    from stream_jobs.sink import ARROW_SETTINGS, INSERT_SETTINGS, ClickHouseWriter, _literal

    home = tempfile.mkdtemp(prefix="evidence-reads-")
    client = clickhouse.connect(f"chdb://{home}/chdb")
    every = clickhouse.load_migrations()
    old = [m for m in every if m.version < 10]
    clickhouse.load_migrations = lambda: old  # type: ignore[assignment]
    clickhouse.migrate(client, "before")
    clickhouse.load_migrations = lambda: every  # type: ignore[assignment]
    clickhouse.migrate(client, "after")
    spec, codec = evidence_codec()
    events = realistic_evidence(args.rows, fresh_sessions=args.fresh_sessions)
    writer = ClickHouseWriter(client, "after")
    for p in range(0, args.rows, args.batch):
        block = evidence_block(spec, map(encode, events[p : p + args.batch]), p)
        writer.insert_avro(block, 1_700_000_000_000, f"after-{p}")
        src = tmpfs_file(bytes(codec.transcode(block) or b""))
        settings = {
            **INSERT_SETTINGS,
            **ARROW_SETTINGS,
            "max_block_size": args.batch,
            "min_insert_block_size_rows": args.batch,
            "insert_deduplication_token": f"before-{p}",
        }
        clause = ", ".join(f"{k} = {_literal(v)}" for k, v in settings.items())
        sql = codec.rewrite(spec.sql("before.evidence", src, block, 1_700_000_000_000, clause), src)
        client.command(sql)
        Path(src).unlink()
    for db, tables in (
        ("before", ["evidence"]),
        ("after", ["evidence_rows", "evidence_reason_lists", "evidence_fact_lists"]),
    ):
        for t in tables:
            client.command(f"OPTIMIZE TABLE {db}.{t} FINAL")
    probe = events[len(events) // 2]
    one = f"tenant = '{probe.tenant}' AND has(['{probe.call_id}'], call_id)"
    # per read: (0009's wide table, 0010 through the views, 0010 as the product reads it since h16rd)
    reads = {
        "evidence_current, whole": (
            q := "SELECT count(), sum(length(reasons)), sum(length(fact_ids)) FROM {db}.evidence_current",
            q,
            q,
        ),
        "evidence_current, one call": (
            q := f"SELECT * FROM {{db}}.evidence_current WHERE tenant = '{probe.tenant}' "
            f"AND call_id = '{probe.call_id}'",
            q,
            q,
        ),
        "one call's versions with lists (call_evidence)": (
            f"SELECT * FROM {{db}}.evidence FINAL WHERE {one}",
            f"SELECT * FROM {{db}}.evidence_final WHERE {one}",
            f"SELECT e.*, rl.reasons, fl.fact_ids, fl.fact_hashes FROM (SELECT * FROM {{db}}.evidence_rows FINAL "
            f"WHERE {one}) AS e ANY LEFT JOIN (SELECT id, reasons FROM {{db}}.evidence_reason_lists WHERE id IN "
            f"(SELECT reason_key FROM {{db}}.evidence_rows WHERE {one})) AS rl ON rl.id = e.reason_key "
            "ANY LEFT JOIN (SELECT id, fact_ids, fact_hashes FROM {db}.evidence_fact_lists WHERE id IN "
            f"(SELECT fact_key FROM {{db}}.evidence_rows WHERE {one})) AS fl ON fl.id = e.fact_key",
        ),
        "a dashboard's scan (no lists read)": (
            q := "SELECT verdict, count() FROM {db}.evidence GROUP BY verdict ORDER BY verdict",
            q,
            q.replace(".evidence ", ".evidence_rows "),
        ),
        "verify's fact-ref scan": (
            q := "SELECT tenant, call_id, version, fact_ids, fact_hashes FROM {db}.{final} "
            "WHERE notEmpty(fact_ids) ORDER BY tenant, call_id, version, evidence_id FORMAT Null",
            q,
            "SELECT e.tenant AS tenant, e.call_id AS call_id, e.version AS version, l.fact_ids AS fact_ids, "
            "l.fact_hashes AS fact_hashes FROM (SELECT tenant, call_id, version, evidence_id, fact_key FROM "
            "{db}.evidence_rows FINAL) AS e ANY LEFT JOIN {db}.evidence_fact_lists AS l ON l.id = e.fact_key "
            "WHERE notEmpty(l.fact_ids) ORDER BY tenant, call_id, version, e.evidence_id FORMAT Null",
        ),
    }
    sizes = {}
    for db in ("before", "after"):
        sizes[db] = client.query(
            "SELECT sum(data_compressed_bytes), sum(data_uncompressed_bytes) FROM system.parts "
            f"WHERE database = '{db}' AND table LIKE 'evidence%' AND active"
        ).result_rows[0]
    print(
        f"{args.rows:,} rows{' (fresh sessions)' if args.fresh_sessions else ''}; "
        f"stored (compressed, raw) bytes: {sizes}"
    )
    forms = (("0009", "before", "evidence FINAL"), ("views", "after", "evidence_final"), ("readers", "after", ""))
    for name, sqls in reads.items():
        got = {}
        answers = {}
        for (form, db, final), sql in zip(forms, sqls, strict=True):
            q = sql.format(db=db, final=final)
            took = []
            for _ in range(args.repeat):
                c0 = time.process_time()
                res = client.query(q) if "FORMAT Null" not in q else client.command(q)
                took.append(time.process_time() - c0)
            got[form] = median(took) * 1000
            answers[form] = getattr(res, "result_rows", None)
        if name.startswith("one call's"):  # the readers' form puts the keys and lists last: compare by value
            answers = {k: sorted(map(sorted, map(map_str, v or []))) for k, v in answers.items()}
        same = answers["0009"] == answers["views"] == answers["readers"]
        print(
            f"{name:48s} 0009 {got['0009']:7.1f} ms  0010 views {got['views']:7.1f} ms  "
            f"0010 readers {got['readers']:7.1f} ms  same answer: {same}"
        )


def map_str(row: tuple[object, ...]) -> list[str]:
    """A row's values as text, without the evidence_rows keys (bytes), for an order-free comparison."""
    return [repr(v) for v in row if not isinstance(v, bytes)]


if __name__ == "__main__":
    main()
