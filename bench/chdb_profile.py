"""Where chDB's CPU per evidence row goes, insert and merge, by experiment (issue 16, branch h16c).

chDB's library is stripped (``nm`` finds no symbols), so ``perf`` can split its time only by thread. This
splits it by experiment instead: in process, one migrated chDB folder, ``--rows`` realistic evidence rows
(``sink_throughput.realistic_evidence``, put through the sink's RowBinary insert into a Memory staging table).
For each variant a table ``CREATE TABLE ... AS scopewatch.evidence`` altered as the variant says, merges
stopped, ``--parts`` inserts of the staging rows (call and evidence ids suffixed per part, so parts overlap in
key as the sink's do), each timed with ``time.process_time``; then merges started and ``OPTIMIZE TABLE ...
FINAL`` timed (merges run in this process's background threads). Rounds interleaved, medians. A variant that
empties a column tells what that column costs; one that changes a type tells what the type would save.
``--events`` prints chDB's ProfileEvents deltas (``system.events``) of the as-migrated insert and merge.

Usage: ``.venv/bin/python bench/chdb_profile.py [--rows 60000] [--parts 6] [--rounds 2] [--variants a,b]``
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

LC_REASONS = [
    "ALTER TABLE {t} MODIFY COLUMN reasons Array(LowCardinality(String))",
    "ALTER TABLE {t} MODIFY COLUMN policy_reasons Array(LowCardinality(String))",
    "ALTER TABLE {t} MODIFY COLUMN policy_errors Array(LowCardinality(String))",
    "ALTER TABLE {t} MODIFY COLUMN policy_versions Array(LowCardinality(String))",
]
LC_ALL = [
    *LC_REASONS,
    "ALTER TABLE {t} MODIFY COLUMN principal LowCardinality(Nullable(String))",
    "ALTER TABLE {t} MODIFY COLUMN agent_id LowCardinality(Nullable(String))",
    "ALTER TABLE {t} MODIFY COLUMN approver LowCardinality(Nullable(String))",
]

# variant -> (ALTERs of the table, the SELECT's replacements of staged columns, staged order)
VARIANTS: dict[str, tuple[list[str], str, str]] = {
    "as migrated": ([], "", ""),
    "rows pre-sorted by key": ([], "", "ORDER BY tenant, call_id, version, evidence_id"),
    "reasons empty": ([], "[] AS reasons", ""),
    "fact_ids and fact_hashes empty": ([], "[] AS fact_ids, [] AS fact_hashes", ""),
    "session and grant ids empty": ([], "'' AS session_id, NULL AS matched_grant_id", ""),
    "provenance constant": ([], "0 AS _offset", ""),
    "reasons LowCardinality": (LC_REASONS, "", ""),
    "reasons one String": (
        ["ALTER TABLE {t} DROP COLUMN reasons", "ALTER TABLE {t} ADD COLUMN reasons String AFTER matched_grant_id"],
        "arrayStringConcat(reasons, '\\n') AS reasons",
        "",
    ),
    "fact arrays one String each": (
        [
            "ALTER TABLE {t} DROP COLUMN fact_ids",
            "ALTER TABLE {t} DROP COLUMN fact_hashes",
            "ALTER TABLE {t} ADD COLUMN fact_ids String AFTER facts",
            "ALTER TABLE {t} ADD COLUMN fact_hashes String AFTER fact_ids",
        ],
        "arrayStringConcat(fact_ids, ',') AS fact_ids, arrayStringConcat(fact_hashes, ',') AS fact_hashes",
        "",
    ),
    "fact ids UUID and hashes binary": (
        [
            "ALTER TABLE {t} DROP COLUMN fact_ids",
            "ALTER TABLE {t} DROP COLUMN fact_hashes",
            "ALTER TABLE {t} ADD COLUMN fact_ids Array(UUID) AFTER facts",
            "ALTER TABLE {t} ADD COLUMN fact_hashes Array(FixedString(32)) AFTER fact_ids",
        ],
        "arrayMap(x -> toUUID(x), fact_ids) AS fact_ids, "
        "arrayMap(h -> unhex(substring(h, 8)), fact_hashes) AS fact_hashes",
        "",
    ),
    "LowCardinality where low": (LC_ALL, "", ""),
}


# variant -> (columns moved to a side table keyed by their hash, unique per call?)
BY_REFERENCE: dict[str, tuple[tuple[str, ...], bool]] = {
    "reasons by reference": (("reasons",), False),
    "reasons by reference (unique per call)": (("reasons",), True),
    "reasons and fact refs by reference": (("reasons", "fact_ids", "fact_hashes"), False),
    "reasons and fact refs by reference (unique per call)": (("reasons", "fact_ids", "fact_hashes"), True),
}
for _name in list(BY_REFERENCE):
    if "unique" not in _name:
        # the rows as a transcoder computing the references (and each batch's distinct sets) would hand them over
        BY_REFERENCE[f"{_name} (refs precomputed)"] = BY_REFERENCE[_name]
for _name in BY_REFERENCE:
    VARIANTS[_name] = ([], "", "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=60_000)
    parser.add_argument("--parts", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--events", action="store_true")
    parser.add_argument("--variants", type=lambda v: [x for x in v.split(",") if x], default=list(VARIANTS))
    args = parser.parse_args()

    from benchkit import evidence_block, evidence_codec, migrated_chdb, tmpfs_file
    from sink_throughput import realistic_evidence

    from schemas import encode
    from stream_jobs.sink import ARROW_SETTINGS, INSERT_SETTINGS, _literal

    conn = migrated_chdb("chdb-profile-")
    spec, codec = evidence_codec()
    block = evidence_block(spec, map(encode, realistic_evidence(args.rows)))
    src = tmpfs_file(bytes(codec.transcode(block) or b""))
    sql = codec.rewrite(spec.sql("scopewatch.staging_src", src, block, 1_700_000_000_000, "max_threads = 1"), src)
    assert sql is not None
    conn.query("CREATE TABLE scopewatch.staging AS scopewatch.evidence ENGINE = Memory")
    conn.query(sql.replace("scopewatch.staging_src", "scopewatch.staging", 1))
    os.unlink(src)

    def events() -> dict[str, int]:
        out = {}
        for line in conn.query("SELECT event, value FROM system.events", "TSV").data().splitlines():
            k, v = line.split("\t")
            out[k] = int(v)
        return out

    def delta(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
        return {k: v - a.get(k, 0) for k, v in b.items() if v != a.get(k, 0)}

    ins: dict[str, list[float]] = {v: [] for v in args.variants}
    mer: dict[str, list[float]] = {v: [] for v in args.variants}
    sizes: dict[str, str] = {}
    reads: dict[str, list[float]] = {}
    seq = 0
    for rnd in range(args.rounds):
        for variant in args.variants:
            alters, replace, order = VARIANTS[variant]
            seq += 1
            t = f"scopewatch.p{seq}"
            conn.query(f"CREATE TABLE {t} AS scopewatch.evidence")
            side: list[tuple[str, str, str, str]] = []  # (side table, ref column, id expression, SELECT list)
            if variant in BY_REFERENCE:
                moved, unique = BY_REFERENCE[variant]
                groups = [("reasons",)] + ([("fact_ids", "fact_hashes")] if "fact_ids" in moved else [])
                for g in groups:
                    exprs = ", ".join(
                        f"arrayPushBack({c}, call_id)" if unique and k == 0 else c for k, c in enumerate(g)
                    )
                    for c in g:
                        conn.query(f"ALTER TABLE {t} DROP COLUMN {c}")
                    conn.query(f"ALTER TABLE {t} ADD COLUMN {g[0]}_ref UInt64")
                    sname = f"{t}_{g[0]}"
                    typed = ", ".join(f"{c} Array(String)" for c in g)
                    conn.query(f"CREATE TABLE {sname} (id UInt64, {typed}) ENGINE = ReplacingMergeTree ORDER BY id")
                    conn.query(f"SYSTEM STOP MERGES {sname}")
                    side.append((sname, f"{g[0]}_ref", f"cityHash64({exprs})", exprs))
            for stmt in alters:
                conn.query(stmt.format(t=t))
            conn.query(f"SYSTEM STOP MERGES {t}")
            names = (
                conn.query(
                    f"SELECT name FROM system.columns WHERE database = 'scopewatch' AND table = "
                    f"'{t.split('.')[1]}' ORDER BY position",
                    "TSV",
                )
                .data()
                .split()
            )
            pre = variant.endswith("(refs precomputed)")
            if pre:
                refs = {ref: idx for _, ref, idx, _ in side}
                for i in range(args.parts):
                    sel = [
                        refs.get(c) or (f"concat({c}, '-{i}')" if c in ("call_id", "evidence_id") else c) for c in names
                    ]
                    conn.query(f"CREATE TABLE {t}_n{i} AS {t} ENGINE = Memory")
                    conn.query(f"INSERT INTO {t}_n{i} SELECT {', '.join(sel)} FROM scopewatch.staging")
                    for sname, _, idx, exprs in side:
                        conn.query(f"CREATE TABLE {sname}_n{i} AS {sname} ENGINE = Memory")
                        conn.query(f"INSERT INTO {sname}_n{i} SELECT DISTINCT {idx}, {exprs} FROM scopewatch.staging")
            spent = 0.0
            e0 = events()
            for i in range(args.parts):
                settings = {
                    **INSERT_SETTINGS,
                    **ARROW_SETTINGS,
                    "max_block_size": args.rows,
                    "min_insert_block_size_rows": args.rows,
                    "insert_deduplication_token": f"{t}-{i}",
                }
                clause = ", ".join(f"{k} = {_literal(v)}" for k, v in settings.items())
                repl = f"concat(call_id, '-{i}') AS call_id, concat(evidence_id, '-{i}') AS evidence_id"
                if replace:
                    repl += ", " + replace
                stmt = f"INSERT INTO {t} SELECT * REPLACE ({repl}) FROM scopewatch.staging"
                if side:
                    refs = {ref: idx for _, ref, idx, _ in side}
                    sel = [
                        refs.get(c) or (f"concat({c}, '-{i}')" if c in ("call_id", "evidence_id") else c) for c in names
                    ]
                    stmt = f"INSERT INTO {t} ({', '.join(names)}) SELECT {', '.join(sel)} FROM scopewatch.staging"
                if order:
                    stmt = f"INSERT INTO {t} SELECT * FROM (SELECT * REPLACE ({repl}) FROM scopewatch.staging {order})"
                if pre:
                    stmt = f"INSERT INTO {t} SELECT * FROM {t}_n{i}"
                c0 = time.process_time()
                conn.query(f"{stmt} SETTINGS {clause}")
                for sname, _, _, _ in side if pre else ():
                    conn.query(f"INSERT INTO {sname} SELECT * FROM {sname}_n{i} SETTINGS {clause.replace(t, sname)}")
                for sname, _, idx, exprs in (
                    () if pre else side
                ):  # the distinct sets of the batch (a second view of the same block)
                    exprs_i = exprs.replace("call_id", f"concat(call_id, '-{i}')")
                    idx_i = idx.replace("call_id", f"concat(call_id, '-{i}')")
                    conn.query(
                        f"INSERT INTO {sname} SELECT DISTINCT {idx_i}, {exprs_i} FROM scopewatch.staging "
                        f"SETTINGS {clause.replace(t, sname)}"
                    )
                spent += time.process_time() - c0
            e1 = events()
            conn.query(f"SYSTEM START MERGES {t}")
            c0 = time.process_time()
            conn.query(f"OPTIMIZE TABLE {t} FINAL SETTINGS optimize_skip_merged_partitions = 1")
            for sname, _, _, _ in side:
                conn.query(f"SYSTEM START MERGES {sname}")
                conn.query(f"OPTIMIZE TABLE {sname} FINAL SETTINGS optimize_skip_merged_partitions = 1")
            merged = time.process_time() - c0
            e2 = events()
            # evidence_current's subquery (the latest version of every call), with the sets joined back
            joins = "".join(
                f" LEFT JOIN {sname} AS s{k} ON s{k}.id = e.{ref}" for k, (sname, ref, _, _) in enumerate(side)
            )
            reasons = "s0.reasons" if side else "e.reasons"
            took = []
            for _ in range(3):
                c1 = time.process_time()
                conn.query(
                    f"SELECT count(), sum(length({reasons})) FROM (SELECT * FROM {t} ORDER BY tenant, call_id, "
                    f"version DESC, _ingested_at DESC LIMIT 1 BY tenant, call_id) AS e{joins}",
                    "TSV",
                )
                took.append(time.process_time() - c1)
            reads.setdefault(variant, []).append(median(took) * 1000)
            rows = args.rows * args.parts
            ins[variant].append(spent / rows * 1e6)
            mer[variant].append(merged / rows * 1e6)
            if rnd == 0:
                sizes[variant] = (
                    conn.query(
                        f"SELECT part_type, sum(rows), round(sum(data_uncompressed_bytes) / sum(rows)), "
                        "round(sum(data_compressed_bytes) / sum(rows)) FROM system.parts "
                        f"WHERE database = 'scopewatch' AND table = '{t.split('.')[1]}' AND active GROUP BY part_type",
                        "TSV",
                    )
                    .data()
                    .strip()
                )
                if args.events and variant == "as migrated":
                    for name, d in (("inserts", delta(e0, e1)), ("merge", delta(e1, e2))):
                        print(f"--- ProfileEvents, {name} of {rows:,} rows (per row where large)")
                        for k, v in sorted(d.items()):
                            print(f"  {k:56s} {v:>14,}  {v / rows:10.3f}")
            merged_rows = e2.get("MergedRows", 0) - e1.get("MergedRows", 0)
            print(
                f"round {rnd} {variant:30s} insert {ins[variant][-1]:.2f} merge {mer[variant][-1]:.2f} "
                f"merged rows {merged_rows:,} (chDB counts a merge twice here)",
                flush=True,
            )
            if side:
                srows = sum(int(conn.query(f"SELECT count() FROM {sname}", "TSV").data()) for sname, _, _, _ in side)
                print(f"  side tables: {srows:,} rows for {args.rows * args.parts:,} evidence rows", flush=True)
            for sname, _, _, _ in side:
                conn.query(f"DROP TABLE {sname} SYNC")
                for i in range(args.parts if pre else 0):
                    conn.query(f"DROP TABLE {sname}_n{i} SYNC")
            for i in range(args.parts if pre else 0):
                conn.query(f"DROP TABLE {t}_n{i} SYNC")
            conn.query(f"DROP TABLE {t} SYNC")
    head = f"{'variant':30s} {'insert µs/row':>14s} {'merge µs/row':>13s} {'sum':>6s}"
    print(f"{head}  part: type rows B/row raw, compressed")
    for v in args.variants:
        a, b = median(ins[v]), median(mer[v])
        print(f"{v:30s} {a:14.2f} {b:13.2f} {a + b:6.2f}  {sizes.get(v, '')}; read {median(reads[v]):.0f} ms")
    conn.close()


if __name__ == "__main__":
    main()
