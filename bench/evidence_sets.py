"""The smallest design found to cut chDB's insert + merge CPU per evidence row by ≥ 25 % (issue 16, h16c),
measured with the sink's own SQL: each evidence row's reason list (and, optionally, its fact references)
stored once per distinct set in a side table keyed by the set's 128-bit hash, the evidence table keeping
the 16-byte key.

In process, one migrated chDB folder, ``--parts`` RowBinary files of ``--rows`` realistic evidence rows
(``sink_throughput.realistic_evidence``, the C transcoder's output, the sink's ``INSERT ... SELECT`` with its
checks and deduplication token). Variants, rounds interleaved, medians:

* ``as migrated``: the sink's SQL into a copy of ``scopewatch.evidence``;
* ``reasons by set``: the same SQL into a ``Null`` table with the evidence columns; two materialized views
  write the row with ``sipHash128(reasons)`` instead of the list, and the batch's distinct sets
  (``ReplacingMergeTree`` by key); ``deduplicate_blocks_in_dependent_materialized_views = 1``;
* ``reasons and fact refs by set``: the same for (fact_ids, fact_hashes) too.

Each: the inserts' CPU (``time.process_time``), then merges started and ``OPTIMIZE TABLE ... FINAL`` of every
table (one part each, the bench's horizon), and evidence_current's subquery (the latest version of every call)
with the sets joined back (``ANY LEFT JOIN``), warm, median of 3.

Usage: ``.venv/bin/python bench/evidence_sets.py [--rows 90000] [--parts 6] [--rounds 2] [--unique]``
(``--unique``: every call's reason list made unique, a set per call: the design's worst case)
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

VARIANTS = {
    "as migrated": (),
    "reasons by set": (("reasons",),),
    "reasons and fact refs by set": (("reasons",), ("fact_ids", "fact_hashes")),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=90_000)
    parser.add_argument("--parts", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--unique", action="store_true")
    parser.add_argument("--hash", default="sipHash128", help="the 128-bit hash of a set (a ClickHouse function)")
    parser.add_argument("--variants", type=lambda v: [x for x in v.split(",") if x], default=list(VARIANTS))
    args = parser.parse_args()

    from benchkit import evidence_block, evidence_codec, migrated_chdb, tmpfs_file
    from sink_throughput import realistic_evidence

    from schemas import encode
    from stream_jobs.sink import ARROW_SETTINGS, INSERT_SETTINGS, _literal

    conn = migrated_chdb("evidence-sets-")
    spec, codec = evidence_codec()
    events = realistic_evidence(args.rows * args.parts)
    if args.unique:
        events = [e.model_copy(update={"reasons": [*e.reasons, f"call {e.call_id}"]}) for e in events]
    files = []
    blocks = []
    for p in range(args.parts):
        block = evidence_block(spec, map(encode, events[p * args.rows : (p + 1) * args.rows]), p * args.rows)
        files.append(tmpfs_file(bytes(codec.transcode(block) or b"")))
        blocks.append(block)
    cols = [
        tuple(line.split("\t"))
        for line in conn.query(
            "SELECT name, type FROM system.columns WHERE database = 'scopewatch' AND table = 'evidence' "
            "ORDER BY position",
            "TSV",
        )
        .data()
        .replace("\\'", "'")
        .splitlines()
    ]
    ins: dict[str, list[float]] = {v: [] for v in args.variants}
    mer: dict[str, list[float]] = {v: [] for v in args.variants}
    reads: dict[str, list[float]] = {v: [] for v in args.variants}
    info: dict[str, str] = {}
    seq = 0
    for rnd in range(args.rounds):
        for variant in args.variants:
            seq += 1
            groups = VARIANTS[variant]
            t = f"scopewatch.e{seq}"
            tables = [t]
            if not groups:
                target = t
                conn.query(f"CREATE TABLE {t} AS scopewatch.evidence")
            else:
                target = f"{t}_in"
                moved = {c for g in groups for c in g}
                conn.query(f"CREATE TABLE {target} AS scopewatch.evidence ENGINE = Null")
                conn.query(f"CREATE TABLE {t} AS scopewatch.evidence")
                for c in sorted(moved):
                    conn.query(f"ALTER TABLE {t} DROP COLUMN {c}")
                select = []
                for name, _typ in cols:
                    if name not in moved:
                        select.append(f"`{name}`")
                for g in groups:
                    conn.query(f"ALTER TABLE {t} ADD COLUMN {g[0]}_set FixedString(16)")
                    select.append(f"{args.hash}({', '.join(g)}) AS {g[0]}_set")
                    side = f"{t}_{g[0]}"
                    tables.append(side)
                    typed = ", ".join(f"{c} Array(String)" for c in g)
                    conn.query(
                        f"CREATE TABLE {side} (id FixedString(16), {typed}) ENGINE = ReplacingMergeTree ORDER BY id"
                    )
                    conn.query(
                        f"CREATE MATERIALIZED VIEW {side}_mv TO {side} AS SELECT {args.hash}({', '.join(g)}) "
                        f"AS id, {', '.join(g)} FROM {target} LIMIT 1 BY id"
                    )
                conn.query(f"CREATE MATERIALIZED VIEW {t}_mv TO {t} AS SELECT {', '.join(select)} FROM {target}")
            for x in tables:
                conn.query(f"SYSTEM STOP MERGES {x}")
            spent = 0.0
            for p, (src, block) in enumerate(zip(files, blocks, strict=True)):
                settings = {
                    **INSERT_SETTINGS,
                    **ARROW_SETTINGS,
                    "max_block_size": args.rows,
                    "min_insert_block_size_rows": args.rows,
                    "query_plan_enable_optimizations": 0,
                    "insert_deduplication_token": f"{t}-{p}",
                    "deduplicate_blocks_in_dependent_materialized_views": 1,
                }
                clause = ", ".join(f"{k} = {_literal(v)}" for k, v in settings.items())
                sql = codec.rewrite(spec.sql(target, src, block, 1_700_000_000_000, clause), src)
                assert sql is not None
                c0 = time.process_time()
                conn.query(sql)
                spent += time.process_time() - c0
            c0 = time.process_time()
            for x in tables:
                conn.query(f"SYSTEM START MERGES {x}")
                conn.query(f"OPTIMIZE TABLE {x} FINAL SETTINGS optimize_skip_merged_partitions = 1")
            merged = time.process_time() - c0
            rows = args.rows * args.parts
            ins[variant].append(spent / rows * 1e6)
            mer[variant].append(merged / rows * 1e6)
            joins = "".join(
                f" ANY LEFT JOIN {t}_{g[0]} AS s{k} ON s{k}.id = e.{g[0]}_set" for k, g in enumerate(groups)
            )
            reasons = "s0.reasons" if groups else "e.reasons"
            took = []
            for _ in range(3):
                c1 = time.process_time()
                got = conn.query(
                    f"SELECT count(), sum(length({reasons})) FROM (SELECT * FROM {t} ORDER BY tenant, call_id, "
                    f"version DESC, _ingested_at DESC LIMIT 1 BY tenant, call_id) AS e{joins}",
                    "TSV",
                ).data()
                took.append(time.process_time() - c1)
            reads[variant].append(median(took) * 1000)
            if rnd == 0:
                counts = [
                    conn.query(
                        f"SELECT count(), round(sum(data_uncompressed_bytes) / {rows}), count() FROM system.parts "
                        f"WHERE database = 'scopewatch' AND table = '{x.split('.')[1]}' AND active",
                        "TSV",
                    )
                    .data()
                    .strip()
                    for x in tables
                ]
                rows_in = [conn.query(f"SELECT count() FROM {x}", "TSV").data().strip() for x in tables]
                info[variant] = (
                    f"rows per table {rows_in}, (parts, raw B per evidence row, _) {counts}; read {got.strip()}"
                )
            print(
                f"round {rnd} {variant:30s} insert {ins[variant][-1]:.2f} merge {mer[variant][-1]:.2f} "
                f"read {reads[variant][-1]:.0f} ms",
                flush=True,
            )
            for x in tables[1:]:
                conn.query(f"DROP TABLE {x}_mv SYNC")
            if groups:
                conn.query(f"DROP TABLE {t}_mv SYNC")
                conn.query(f"DROP TABLE {target} SYNC")
            for x in tables:
                conn.query(f"DROP TABLE {x} SYNC")
    print(f"{args.parts} × {args.rows:,} rows{' (reason lists unique per call)' if args.unique else ''}")
    for v in args.variants:
        a, b = median(ins[v]), median(mer[v])
        print(
            f"{v:30s} insert {a:5.2f}  to one part {b:5.2f}  sum {a + b:5.2f} µs/row  read {median(reads[v]):5.0f} ms"
        )
        print(f"    {info.get(v, '')}")
    for src in files:
        os.unlink(src)
    conn.close()


if __name__ == "__main__":
    main()


SET_GROUPS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("reason", ("reasons",)),
    ("fact", ("fact_ids", "fact_hashes")),
)
"""(side table prefix, the evidence columns stored once per distinct set in it)."""


def restructure(run: Any, columns: list[str], db: str = "scopewatch", hash_fn: str = "murmurHash3_128") -> None:
    """Turn a migrated database's evidence table into the by-set layout, for the whole-sink bench
    (``sink_throughput.py --evidence-sets``): ``evidence`` becomes a ``Null`` table with the same columns (the
    sink's inserts, unchanged, land there); a view adds each list's key once (``evidence_keyed``, ``Null``), and
    materialized views on it write ``evidence_rows`` (the row with a 16-byte
    set key per group instead of the lists) and ``evidence_<g>_sets`` (the batch's distinct sets, one row each,
    ``ReplacingMergeTree`` by key); ``evidence_read`` joins them back in the old column order and
    ``evidence_current`` reads it. ``run`` executes one statement; ``columns`` are evidence's, in order.
    A prototype: no migration, no crash/dedup test (the MV targets need
    ``deduplicate_blocks_in_dependent_materialized_views``)."""
    moved = {c: g for g, cols in SET_GROUPS for c in cols}
    run(f"CREATE TABLE {db}.evidence_in AS {db}.evidence ENGINE = Null")
    run(f"DROP VIEW IF EXISTS {db}.evidence_current")
    run(f"RENAME TABLE {db}.evidence TO {db}.evidence_rows, {db}.evidence_in TO {db}.evidence")
    for c in moved:
        run(f"ALTER TABLE {db}.evidence_rows DROP COLUMN {c}")
    select = [f"`{c}`" for c in columns if c not in moved]
    keys = []
    for g, cols in SET_GROUPS:
        keys.append(f"{hash_fn}({', '.join(cols)}) AS {g}_set")
        run(f"ALTER TABLE {db}.evidence_rows ADD COLUMN {g}_set FixedString(16)")
        select.append(f"{g}_set")
        typed = ", ".join(f"{c} Array(String)" for c in cols)
        run(
            f"CREATE TABLE {db}.evidence_{g}_sets (id FixedString(16), {typed}) ENGINE = ReplacingMergeTree ORDER BY id"
        )
    # each key hashed once: evidence -> evidence_keyed (Null: the row and its keys) -> the rows and the sets
    run(f"CREATE TABLE {db}.evidence_keyed ENGINE = Null AS SELECT *, {', '.join(keys)} FROM {db}.evidence WHERE 0")
    run(
        f"CREATE MATERIALIZED VIEW {db}.evidence_keyed_mv TO {db}.evidence_keyed AS "
        f"SELECT *, {', '.join(keys)} FROM {db}.evidence"
    )
    for g, cols in SET_GROUPS:
        run(
            f"CREATE MATERIALIZED VIEW {db}.evidence_{g}_sets_mv TO {db}.evidence_{g}_sets AS "
            f"SELECT {g}_set AS id, {', '.join(cols)} FROM {db}.evidence_keyed LIMIT 1 BY id"
        )
    rows_mv = f"CREATE MATERIALIZED VIEW {db}.evidence_rows_mv TO {db}.evidence_rows AS SELECT"
    run(f"{rows_mv} {', '.join(select)} FROM {db}.evidence_keyed")
    read = ", ".join(f"{moved[c]}.{c} AS {c}" if c in moved else f"r.{c} AS {c}" for c in columns)
    joins = " ".join(f"ANY LEFT JOIN {db}.evidence_{g}_sets AS {g} ON {g}.id = r.{g}_set" for g, _ in SET_GROUPS)
    run(f"CREATE VIEW {db}.evidence_read AS SELECT {read} FROM {db}.evidence_rows AS r {joins}")
    view = (Path(__file__).resolve().parent.parent / "stream_jobs/migrations/0007_policies_approvals.sql").read_text()
    view = view[view.index("CREATE OR REPLACE VIEW {db}.evidence_current") :].split(";")[0]
    run(view.replace("FROM {db}.evidence\n", "FROM {db}.evidence_read\n").replace("{db}", db))


SET_TABLES: tuple[str, ...] = ("evidence_rows", *(f"evidence_{g}_sets" for g, _ in SET_GROUPS))
