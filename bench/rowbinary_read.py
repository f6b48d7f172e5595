"""chDB CPU per evidence row: the bulk INSERT ... SELECT reading Avro vs RowBinary (issue 16, step 1).

The same realistic evidence messages (``sink_throughput.realistic_evidence``) are put into the
sink's bulk Avro container (:class:`stream_jobs.bulk.BulkBlock`) and, transcoded (in Python here, the
speed of the transcoder is not measured), into RowBinary; both are inserted into a fresh migrated
chDB folder with the same ``SELECT`` list and checks, in process, rounds interleaved. Printed: CPU
microseconds per row (``time.process_time`` around the chDB query only), median over the rounds.

Usage: ``.venv/bin/python bench/rowbinary_read.py [--rows 30000] [--repeat 7]``
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=30_000)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--python-reference", action="store_true", help="transcode with the Python reference")
    args = parser.parse_args()

    import chdb
    from benchkit import evidence_block
    from sink_throughput import realistic_evidence

    from schemas import encode
    from stream_jobs import rowbinary
    from stream_jobs.bulk import bulk_specs
    from stream_jobs.clickhouse import connect, migrate
    from stream_jobs.sink import ARROW_SETTINGS, INSERT_SETTINGS, _literal

    messages = [encode(e) for e in realistic_evidence(args.rows)]
    spec = next(s for s in bulk_specs().values() if s.table == "evidence")
    block = evidence_block(spec, messages)
    avro = block.payload()
    codec = rowbinary.codec_for(spec)
    assert codec is not None
    if args.python_reference or rowbinary.library() is None:
        rb = rowbinary.transcode_python(codec, block)
    else:
        rb = codec.transcode(block)
    assert rb is not None
    print(
        f"rows {len(messages):,}: Avro container {len(avro) / len(messages):.0f} B/row, "
        f"RowBinary {len(rb) / len(messages):.0f} B/row"
    )

    home = tempfile.mkdtemp(prefix="rb-bench-")
    client = connect(f"chdb://{home}/chdb")
    migrate(client, "scopewatch")
    conn = chdb.connect(f"{home}/chdb")
    rows = len(messages)
    settings = {
        **INSERT_SETTINGS,
        **ARROW_SETTINGS,
        "max_block_size": rows,
        "min_insert_block_size_rows": rows,
        "input_format_avro_allow_missing_fields": 0,
    }
    times: dict[str, list[float]] = {"avro": [], "rowbinary": []}
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    seq = 0
    for round_ in range(args.repeat + 1):
        for kind, data in (("avro", avro), ("rowbinary", rb)):
            seq += 1
            clause = ", ".join(
                f"{k} = {_literal(v)}" for k, v in {**settings, "insert_deduplication_token": f"rb{seq}"}.items()
            )
            fd, path = tempfile.mkstemp(dir=shm)
            with os.fdopen(fd, "wb") as out:
                out.write(data)
            sql = spec.sql("scopewatch.evidence", path, block, 1_700_000_000_000, clause)
            if kind == "rowbinary":
                sql = codec.rewrite(sql, path)
            c0 = time.process_time()
            conn.query(sql)
            spent = time.process_time() - c0
            os.unlink(path)
            if round_:  # the first round warms up
                times[kind].append(spent)
    for kind, spent in times.items():
        print(
            f"{kind:10s} median {median(spent) / rows * 1e6:6.2f} us/row  "
            f"(runs: {', '.join(f'{s / rows * 1e6:.2f}' for s in spent)})"
        )
    saved = (median(times["avro"]) - median(times["rowbinary"])) / rows * 1e6
    print(f"RowBinary saves {saved:.2f} us/row of chDB CPU")
    count = conn.query("SELECT count() FROM scopewatch.evidence", "CSV").data()
    print("rows in table:", count.strip())
    conn.close()


if __name__ == "__main__":
    main()
