"""chDB's fixed cost per bulk insert (issue 16): the sink's RowBinary ``INSERT ... SELECT`` with its checks,
without the ``WHERE`` checks, and a plain insert of rows already in the table's layout (no expressions, no checks).

In process, one migrated chDB folder, realistic evidence rows (``sink_throughput.realistic_evidence``) in the
sink's own bulk container transcoded by the C transcoder; ``time.process_time`` around each query, rounds
interleaved (the first discarded), medians. What a ``FORMAT RowBinary`` insert with every check done in C
would save per insert is about ``checked - plain``.

Usage: ``.venv/bin/python bench/insert_fixed_cost.py [--rows 20,2000] [--repeat 30]``
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=lambda v: [int(x) for x in v.split(",")], default=[20, 2000])
    parser.add_argument("--repeat", type=int, default=30)
    args = parser.parse_args()

    from benchkit import evidence_block, evidence_codec, migrated_chdb, tmpfs_file
    from sink_throughput import realistic_evidence

    from schemas import encode
    from stream_jobs.sink import ARROW_SETTINGS, INSERT_SETTINGS, _literal

    conn = migrated_chdb("fixed-cost-")
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    spec, codec = evidence_codec()
    seq = 0
    for rows in args.rows:
        block = evidence_block(spec, map(encode, realistic_evidence(rows)))
        src = tmpfs_file(bytes(codec.transcode(block) or b""))
        settings = {
            **INSERT_SETTINGS,
            **ARROW_SETTINGS,
            "max_block_size": rows,
            "min_insert_block_size_rows": rows,
            "query_plan_enable_optimizations": 0,
        }
        checked = codec.rewrite(spec.sql("scopewatch.evidence", src, block, 1_700_000_000_000, "{clause}"), src)
        assert checked is not None
        unchecked = re.sub(r" WHERE throwIf\(.*\) = 0 SETTINGS", " SETTINGS", checked, flags=re.S)
        assert unchecked != checked
        # the rows in the table's own layout, as a transcoder doing every check and column would write them
        columns = checked.split(" (", 1)[1].split(") SELECT", 1)[0]
        wanted = [c.strip().strip("`") for c in columns.split(",")]
        described = conn.query(
            "SELECT name, type FROM system.columns WHERE database = 'scopewatch' AND table = 'evidence'", "JSONEachRow"
        ).data()
        types = {r["name"]: r["type"] for r in map(json.loads, described.strip().splitlines())}
        structure = ", ".join(f"`{c}` {types[c]}" for c in wanted)
        names = ", ".join(f"`{c}`" for c in wanted)
        fd, laid = tempfile.mkstemp(dir=shm)
        os.close(fd)
        conn.query("DROP TABLE IF EXISTS scopewatch.scratch")
        conn.query("CREATE TABLE scopewatch.scratch AS scopewatch.evidence ENGINE = Memory")
        scratch = unchecked.replace("scopewatch.evidence", "scopewatch.scratch", 1)
        conn.query(scratch.replace("{clause}", "max_threads = 1"))
        conn.query(
            f"INSERT INTO FUNCTION file('{laid}', RowBinary, '{structure.replace(chr(39), chr(92) + chr(39))}') "
            f"SELECT {names} FROM scopewatch.scratch SETTINGS engine_file_truncate_on_insert = 1"
        )
        plain = (
            f"INSERT INTO scopewatch.evidence ({names}) SELECT * FROM file('{laid}', RowBinary, "
            f"'{structure.replace(chr(39), chr(92) + chr(39))}') SETTINGS {{clause}}"
        )
        infile = f"INSERT INTO scopewatch.evidence ({names}) FROM INFILE '{laid}' SETTINGS {{clause}} FORMAT RowBinary"
        variants = {"checked (the sink's SQL)": checked, "no WHERE checks": unchecked, "plain, table layout": plain}
        try:
            seq += 1
            conn.query(infile.format(clause=f"insert_deduplication_token = 'probe{seq}'"))
            variants["FROM INFILE ... FORMAT RowBinary"] = infile
        except Exception as exc:
            print(f"FROM INFILE not available: {str(exc)[:160]}")
        times: dict[str, list[float]] = {k: [] for k in variants}
        for round_ in range(args.repeat + 1):
            for name, sql in variants.items():
                seq += 1
                clause = ", ".join(
                    f"{k} = {_literal(v)}" for k, v in {**settings, "insert_deduplication_token": f"t{seq}"}.items()
                )
                c0 = time.process_time()
                conn.query(sql.replace("{clause}", clause))
                spent = time.process_time() - c0
                if round_:
                    times[name].append(spent)
        for name, spent in times.items():
            print(f"{rows:6,} rows  {name:34s} median {median(spent) * 1000:7.2f} ms  (min {min(spent) * 1000:.2f})")
        os.unlink(src)
        os.unlink(laid)
    conn.close()


if __name__ == "__main__":
    main()
