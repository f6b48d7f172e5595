"""CPU of the transcoder's list groups (issue 16): sw_values_to_rowbinary (full rows) against
sw_values_to_rowbinary_lists (narrow rows + each batch's distinct reason and fact lists behind SHA-256/128
keys), on the bench's realistic evidence rows, with lists as repeated as the bench's cloned pool (``pool``),
repeated only within a session of 20 calls (``session``: every clone of the pool with sessions of its own,
``realistic_evidence(fresh_sessions=True)``), only within a call (``per call``: a reason naming the call's
resource added, fact lists per session), and unique per row (``unique``: SHA-256 on every row, the worst
case). Also raw bytes per row of each output.

Usage: ``.venv/bin/python bench/evidence_keys.py [--rows 90000] [--rounds 5]``
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from statistics import median

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=90_000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    from benchkit import evidence_block, evidence_codec
    from sink_throughput import realistic_evidence

    from schemas import encode
    from stream_jobs import rowbinary
    from stream_jobs.evidence_lists import GROUPS

    spec, full = evidence_codec()
    grouped = rowbinary.codec_for(spec, GROUPS)
    assert grouped is not None
    events = realistic_evidence(args.rows)
    workloads = {
        "pool": events,
        "session": realistic_evidence(args.rows, fresh_sessions=True),
        "per call": session_lists(events),
        "unique": [e.model_copy(update={"reasons": [*e.reasons, f"row {i}"]}) for i, e in enumerate(events)],
    }
    for name, evs in workloads.items():
        block = evidence_block(spec, map(encode, evs), 0)
        a, b = [], []
        for _ in range(args.rounds):
            c0 = time.process_time()
            rows = full.transcode(block)
            a.append(time.process_time() - c0)
            assert rows is not None
            n_full = len(rows)
            c0 = time.process_time()
            got = grouped.transcode_lists(block)
            b.append(time.process_time() - c0)
            assert got is not None
            n_rows, n_lists = len(got[0]), [len(x) for x in got[1]]
        distinct = (len({tuple(e.reasons) for e in evs}), len({(tuple(e.fact_ids), tuple(e.fact_hashes)) for e in evs}))
        per = 1e6 / args.rows
        print(
            f"{name:8s} full {median(a) * per:.3f} µs/row ({n_full / args.rows:.0f} B)  lists {median(b) * per:.3f} "
            f"µs/row (rows {n_rows / args.rows:.0f} B + lists {sum(n_lists) / args.rows:.0f} B/row; distinct "
            f"reason/fact lists {distinct[0]:,}/{distinct[1]:,} of {args.rows:,})",
            flush=True,
        )


def session_lists(events: list, calls_per_session: int = 20) -> list:  # type: ignore[type-arg]
    """The events with reason lists unique per call (shared by its versions only): every call's reasons gain
    one naming its session, grant and resource path (one resource per call, ``calls_per_session`` calls per
    session); its fact list is its session's own (ids and hashes fresh per session)."""
    import hashlib

    calls: dict[str, int] = {}
    out = []
    for e in events:
        index = calls.setdefault(e.call_id, len(calls))
        session = index // calls_per_session
        grant = f"g-{session:08d}"
        resource = f"/home/u{session}/project/file{index % calls_per_session}.txt"
        reasons = [
            *(r for r in e.reasons),
            f"session s-{session:08d} grant {grant} covers {e.server}/{e.tool} on {resource}",
        ]
        ids = [f"{grant}-{k}" for k in range(len(e.fact_ids))]
        hashes = ["sha256:" + hashlib.sha256(i.encode()).hexdigest() for i in ids]
        out.append(e.model_copy(update={"reasons": reasons, "fact_ids": ids, "fact_hashes": hashes}))
    return out


if __name__ == "__main__":
    main()
