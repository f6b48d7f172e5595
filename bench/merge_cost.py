"""What a background merge of the evidence table costs per merged row, by table variant (issue 16).

In process, one migrated chDB folder: for each variant a copy of ``scopewatch.evidence`` (``CREATE TABLE
... AS``) altered as the variant says, merges stopped, ``--parts`` inserts of ``--rows`` realistic evidence rows
(``sink_throughput.realistic_evidence``, the sink's RowBinary insert), then merges started and ``OPTIMIZE
TABLE ... FINAL`` timed with ``time.process_time`` (chDB merges in a background thread of this process; the
OPTIMIZE waits for it). Rounds interleaved, medians. Also the part's bytes per row by column.

Usage: ``.venv/bin/python bench/merge_cost.py [--rows 30000] [--parts 4] [--repeat 3] [--variants a,b]``
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

VARIANTS: dict[str, list[str]] = {
    "as migrated": [],
    "wide parts": ["ALTER TABLE {t} MODIFY SETTING min_bytes_for_wide_part = 0"],
    "compact up to 16 GiB": ["ALTER TABLE {t} MODIFY SETTING min_bytes_for_wide_part = 17179869184"],
    "marks and key uncompressed": ["ALTER TABLE {t} MODIFY SETTING compress_marks = 0, compress_primary_key = 0"],
    "granularity 32768": [],  # made with CREATE ... SETTINGS below (not alterable)
    "ids and hashes CODEC(NONE)": [
        "ALTER TABLE {t} MODIFY COLUMN evidence_id String CODEC(NONE)",
        "ALTER TABLE {t} MODIFY COLUMN call_id String CODEC(NONE)",
        "ALTER TABLE {t} MODIFY COLUMN session_id String CODEC(NONE)",
        "ALTER TABLE {t} MODIFY COLUMN fact_ids Array(String) CODEC(NONE)",
        "ALTER TABLE {t} MODIFY COLUMN fact_hashes Array(String) CODEC(NONE)",
    ],
    "all CODEC(NONE)": ["*none"],
    "all ZSTD(1)": ["*zstd"],
    "MergeTree (no replacing)": [],  # made with CREATE ... ENGINE below
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--parts", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--read", action="store_true", help="also time three reads of the merged table")
    parser.add_argument("--variants", type=lambda v: [x for x in v.split(",") if x], default=list(VARIANTS))
    parser.add_argument(
        "--stream",
        type=lambda v: [int(x) for x in v.split(",")],
        default=[],
        help="instead: for each part size in this list, insert --total rows in parts of that size with merges on, "
        "one after the other as a sink does, wait for the merges to settle and report the rows merged and the "
        "CPU (inserts and merges) per row",
    )
    parser.add_argument("--total", type=int, default=1_200_000)
    parser.add_argument(
        "--table-settings",
        type=lambda v: [x.strip() for x in v.split(";")],
        default=[""],
        help="with --stream: table variants, ';'-separated, each a MODIFY SETTING list ('' = as migrated), e.g. "
        "';merge_selector_base = 10;min_parts_to_merge_at_once = 10'; each is also read (parts left, "
        "evidence_current's subquery) and then merged to one part (OPTIMIZE FINAL, the debt left)",
    )
    parser.add_argument("--stream-rounds", type=int, default=1, help="with --stream: rounds, interleaved")
    parser.add_argument(
        "--malloc-keep-mb",
        type=int,
        default=0,
        help="keep this much freed glibc heap as the sink does (SINK_MALLOC_KEEP_MB; 0: glibc's defaults)",
    )
    args = parser.parse_args()
    if args.malloc_keep_mb:
        from stream_jobs.sink import keep_freed_memory

        keep_freed_memory(args.malloc_keep_mb)
    if args.stream:
        stream(args)
        return

    from benchkit import evidence_block, evidence_codec, migrated_chdb, tmpfs_file
    from sink_throughput import realistic_evidence

    from schemas import encode
    from stream_jobs.sink import ARROW_SETTINGS, INSERT_SETTINGS, _literal

    conn = migrated_chdb("merge-cost-")
    spec, codec = evidence_codec()
    events = realistic_evidence(args.rows * args.parts)
    files = []
    blocks = []
    for p in range(args.parts):
        block = evidence_block(spec, map(encode, events[p * args.rows : (p + 1) * args.rows]), p * args.rows)
        src = tmpfs_file(bytes(codec.transcode(block) or b""))
        files.append(src)
        blocks.append(block)
    columns = conn.query(
        "SELECT name, type FROM system.columns WHERE database = 'scopewatch' AND table = 'evidence' ORDER BY position",
        "TSV",
    ).data()
    cols = [line.replace("\\'", "'").split("\t") for line in columns.strip().splitlines()]
    reads = {
        "narrow: verdict counts": "SELECT verdict, count() FROM {t} GROUP BY verdict FORMAT Null",
        "one call, every column": "SELECT * FROM {t} WHERE tenant = 'acme' AND call_id = '{call}' FORMAT Null",
        "latest version per call, every column": (
            "SELECT * FROM {t} ORDER BY tenant, call_id, version DESC, _ingested_at DESC LIMIT 1 BY tenant, call_id "
            "FORMAT Null"
        ),
    }
    read_times: dict[tuple[str, str], list[float]] = {}
    times: dict[str, list[float]] = {v: [] for v in args.variants}
    merged: dict[str, list[int]] = {v: [] for v in args.variants}
    seq = 0
    for round_ in range(args.repeat):
        for variant in args.variants:
            t = f"scopewatch.v{seq}"
            seq += 1
            if variant == "granularity 32768":
                conn.query(f"CREATE TABLE {t} AS scopewatch.evidence SETTINGS index_granularity = 32768")
            elif variant == "MergeTree (no replacing)":
                conn.query(
                    f"CREATE TABLE {t} AS scopewatch.evidence ENGINE = MergeTree PARTITION BY toYYYYMM(call_time) "
                    "ORDER BY (tenant, call_id, version, evidence_id) SETTINGS min_bytes_for_wide_part = 268435456"
                )
            else:
                conn.query(f"CREATE TABLE {t} AS scopewatch.evidence")
            for stmt in VARIANTS[variant]:
                if stmt.startswith("*"):
                    c = "NONE" if stmt == "*none" else "ZSTD(1)"
                    for name, typ in cols:
                        conn.query(f"ALTER TABLE {t} MODIFY COLUMN `{name}` {typ} CODEC({c})")
                else:
                    conn.query(stmt.format(t=t))
            conn.query(f"SYSTEM STOP MERGES {t}")
            for p, (src, block) in enumerate(zip(files, blocks, strict=True)):
                settings = {
                    **INSERT_SETTINGS,
                    **ARROW_SETTINGS,
                    "max_block_size": args.rows,
                    "min_insert_block_size_rows": args.rows,
                    "query_plan_enable_optimizations": 0,
                    "insert_deduplication_token": f"{t}-{p}",
                }
                clause = ", ".join(f"{k} = {_literal(v)}" for k, v in settings.items())
                sql = codec.rewrite(spec.sql(t, src, block, 1_700_000_000_000, clause), src)
                assert sql is not None
                conn.query(sql)
            before = int(conn.query("SELECT value FROM system.events WHERE event = 'MergedRows'", "TSV").data() or 0)
            conn.query(f"SYSTEM START MERGES {t}")
            c0 = time.process_time()
            conn.query(f"OPTIMIZE TABLE {t} FINAL SETTINGS optimize_skip_merged_partitions = 1")
            spent = time.process_time() - c0
            after = int(conn.query("SELECT value FROM system.events WHERE event = 'MergedRows'", "TSV").data() or 0)
            times[variant].append(spent)
            merged[variant].append(after - before)
            if args.read:
                call = events[len(events) // 2].call_id
                for name, sql in reads.items():
                    for _ in range(3):
                        c0 = time.process_time()
                        conn.query(sql.format(t=t, call=call))
                        read_times.setdefault((variant, name), []).append(time.process_time() - c0)
            if round_ == 0:
                info = conn.query(
                    f"SELECT part_type, sum(rows), sum(data_uncompressed_bytes), sum(data_compressed_bytes) "
                    f"FROM system.parts WHERE database = 'scopewatch' AND table = '{t.split('.')[1]}' AND active "
                    "GROUP BY part_type",
                    "TSV",
                ).data()
                print(f"{variant}: {info.strip()}", flush=True)
            conn.query(f"DROP TABLE {t} SYNC")
    for variant in args.variants:
        per = [s / max(1, m) * 1e6 for s, m in zip(times[variant], merged[variant], strict=True)]
        print(
            f"{variant:32s} {median(per):6.2f} µs per merged row "
            f"({', '.join(f'{x:.2f}' for x in per)}; rows merged {merged[variant][0]:,})"
        )
    for (variant, name), spent in read_times.items():
        print(f"read {variant:24s} {name:40s} median {median(spent) * 1000:8.1f} ms CPU")
    for src in files:
        os.unlink(src)
    conn.close()


def stream(args: argparse.Namespace) -> None:
    """Parts of each size in ``args.stream`` until ``args.total`` rows, merges on: merged rows and CPU per row."""
    from benchkit import evidence_block, evidence_codec, migrated_chdb, tmpfs_file
    from sink_throughput import realistic_evidence

    from schemas import encode
    from stream_jobs.sink import ARROW_SETTINGS, INSERT_SETTINGS, _literal

    conn = migrated_chdb("merge-stream-")
    spec, codec = evidence_codec()
    biggest = max(args.stream)
    block = evidence_block(spec, map(encode, realistic_evidence(biggest)))
    src = tmpfs_file(bytes(codec.transcode(block) or b""))
    sql = codec.rewrite(spec.sql("scopewatch.staging_src", src, block, 1_700_000_000_000, "max_threads = 1"), src)
    assert sql is not None
    conn.query("CREATE TABLE scopewatch.staging AS scopewatch.evidence ENGINE = Memory")
    conn.query(sql.replace("scopewatch.staging_src", "scopewatch.staging", 1))
    os.unlink(src)

    def merged_rows() -> int:
        return int(conn.query("SELECT value FROM system.events WHERE event = 'MergedRows'", "TSV").data() or 0)

    def settle(name: str) -> None:
        quiet = 0
        while quiet < 10:
            time.sleep(0.2)
            merging = int(conn.query(f"SELECT count() FROM system.merges WHERE table = '{name}'", "TSV").data())
            quiet = quiet + 1 if merging == 0 else 0

    def read_ms(sql: str) -> float:
        took = []
        for _ in range(3):
            c0 = time.process_time()
            conn.query(sql, "TSV")
            took.append((time.process_time() - c0) * 1000)
        return median(took)

    for rnd in range(args.stream_rounds):
        for size in args.stream:
            for k, variant in enumerate(args.table_settings):
                name = f"s{size}_{k}_{rnd}"
                t = f"scopewatch.{name}"
                conn.query(f"CREATE TABLE {t} AS scopewatch.evidence")
                if variant:
                    conn.query(f"ALTER TABLE {t} MODIFY SETTING {variant}")
                before, c0 = merged_rows(), time.process_time()
                for i in range(args.total // size):
                    settings = {
                        **INSERT_SETTINGS,
                        **ARROW_SETTINGS,
                        "max_block_size": size,
                        "min_insert_block_size_rows": size,
                        "insert_deduplication_token": f"{t}-{i}",
                    }
                    clause = ", ".join(f"{k} = {_literal(v)}" for k, v in settings.items())
                    conn.query(
                        f"INSERT INTO {t} SELECT * REPLACE (concat(call_id, '-{i}') AS call_id, "
                        f"concat(evidence_id, '-{i}') AS evidence_id) FROM scopewatch.staging LIMIT {size} "
                        f"SETTINGS {clause}"
                    )
                settle(name)
                spent, merged = time.process_time() - c0, merged_rows() - before
                parts = conn.query(
                    f"SELECT count(), max(rows) FROM system.parts WHERE table = '{name}' AND active", "TSV"
                ).data()
                rows = args.total // size * size
                current = read_ms(  # evidence_current's subquery: the latest version of every call, every column
                    f"SELECT count(), sum(length(reasons)) FROM (SELECT * FROM {t} ORDER BY tenant, call_id, "
                    "version DESC, _ingested_at DESC LIMIT 1 BY tenant, call_id)"
                )
                tenant, call = conn.query(f"SELECT tenant, call_id FROM {t} LIMIT 1", "TSV").data().split("\t")
                point = read_ms(
                    f"SELECT * FROM {t} WHERE tenant = '{tenant}' AND call_id = '{call.strip()}' FORMAT Null"
                )
                m0, c1 = merged_rows(), time.process_time()
                conn.query(f"OPTIMIZE TABLE {t} FINAL SETTINGS optimize_skip_merged_partitions = 1")
                settle(name)
                owed_cpu, owed = time.process_time() - c1, merged_rows() - m0
                print(
                    f"round {rnd} parts of {size:,} [{variant or 'as migrated'}]: {rows:,} rows, "
                    f"{merged / rows:.2f} rows merged per row, {spent / rows * 1e6:.2f} µs CPU per row (inserts "
                    f"from a Memory table + merges); parts left, largest: {parts.strip()}; reads: "
                    f"evidence_current's subquery {current:.0f} ms, one call {point:.1f} ms; then to one part: "
                    f"+{owed / rows:.2f} rows merged per row, +{owed_cpu / rows * 1e6:.2f} µs per row, total "
                    f"{(merged + owed) / rows:.2f} merged, {(spent + owed_cpu) / rows * 1e6:.2f} µs per row",
                    flush=True,
                )
                conn.query(f"DROP TABLE {t} SYNC")
    conn.close()


if __name__ == "__main__":
    main()
