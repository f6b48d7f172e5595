"""Per-second timeline of a ``verdict_latency.py`` run beside its jobs' cycles (the p99's make-up).

Run the bench with ``SCOPEWATCH_TRACE_DIR=DIR`` in its environment (the sink and the workers inherit it
and write one JSON line per cycle, per insert unit and per GC collection: :mod:`stream_jobs.trace`) and
``--dump PREFIX``; then::

    .venv/bin/python bench/latency_timeline.py PREFIX.<start>.json DIR [--bin 1.0]

Per bin of emit time: calls, emit → decided p50 / p99, decided → sink batch p99, sampled poll p99 (the
judged measure); and per process in the same wall bin: cycles, the wall time in cycles, the longest
cycle (take / process / timer / flush / commit, records), the timer's broker checks and finals, GC
pauses, how far stage 2's horizon trailed the clock (``lag``, ms, with a frontier), the sink's longest
evidence and raw inserts.
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path
from typing import Any


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q / 100 * len(values)))]


def load_traces(directory: Path, pids: dict[str, int]) -> dict[str, list[dict[str, Any]]]:
    names = {pid: name for name, pid in pids.items()}
    out: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(directory.glob("*.jsonl")):
        pid = int(path.stem.rsplit("-", 1)[1])
        name = names.get(pid)
        if name is None:
            continue
        out[name] = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dump")
    parser.add_argument("trace_dir")
    parser.add_argument("--bin", type=float, default=1.0, help="bin width in seconds")
    parser.add_argument("--long", type=float, default=0.15, help="a cycle this long (s) counts as a stall")
    args = parser.parse_args()
    data = json.loads(Path(args.dump).read_text())
    start, end = data["started"], data["ended"]
    traces = load_traces(Path(args.trace_dir), data["pids"])
    width = args.bin

    def b(t: float) -> int:
        return int((t - start) // width)

    dec: dict[int, list[float]] = defaultdict(list)
    sink: dict[int, list[float]] = defaultdict(list)
    vis: dict[int, list[float]] = defaultdict(list)
    all_vis = []
    for emit, decided_ms, ingested_ms in data["calls"]:
        dec[b(emit)].append(decided_ms / 1000 - emit)
        sink[b(emit)].append((ingested_ms - decided_ms) / 1000)
    for emit, _lower, upper in data["polled"]:
        vis[b(emit)].append(upper - emit)
        all_vis.append(upper - emit)
    p99 = pct(all_vis, 99)
    print(f"run {end - start:.1f}s, {len(data['calls']):,} calls, poll p50 {pct(all_vis, 50):.3f} p99 {p99:.3f} s")

    rows: dict[str, dict[int, dict[str, Any]]] = {}
    for name, lines in sorted(traces.items()):
        per: dict[int, dict[str, Any]] = defaultdict(lambda: defaultdict(float))
        for line in lines:
            t = line["t"]
            if t < start - 5 or t > end + 10:
                continue
            cell = per[b(t)]
            kind = line["k"]
            if kind == "cycle":
                dur = line["proc"] + (line["timer"] or 0) + line["flush"] + line["commit"]
                cell["cycles"] += 1
                cell["busy"] += dur
                if dur > cell["max"]:
                    cell["max"] = dur
                    cell["max_parts"] = (
                        f"tk{line['take'] * 1000:.0f}/p{line['proc'] * 1000:.0f}/"
                        f"t{(line['timer'] or 0) * 1000:.0f}/f{line['flush'] * 1000:.0f}/"
                        f"c{line['commit'] * 1000:.0f} n{line['n']}"
                    )
                cell["take_max"] = max(cell["take_max"], line["take"])
            elif kind == "timer":
                cell["checks_max"] = max(cell["checks_max"], line["checks"])
                cell["tick_max"] = max(cell["tick_max"], line["tick"])
                if line.get("lag") is not None:
                    cell["lag_max"] = max(cell["lag_max"], line["lag"])
            elif kind == "unit":
                key = "ev_max" if line["table"] == "evidence" else "raw_max"
                cell[key] = max(cell[key], line["s"])
                if key == "raw_max":
                    cell["raw_rows"] += line["rows"]
            elif kind == "gc":
                cell[f"gc{line['gen']}"] += line["s"]
        rows[name] = per

    bins = range(b(start), b(end) + 3)
    head = f"{'bin':>4} {'calls':>6} {'dec50':>6} {'dec99':>6} {'snk99':>6} {'vis99':>6} |"
    for name in rows:
        head += f" {name}: cyc busy  max(parts)                       checks tick  gc |"
    print(head)
    for i in bins:
        d, s, v = dec.get(i, []), sink.get(i, []), vis.get(i, [])
        line = (
            f"{i * width:>4.0f} {len(d):>6} {pct(d, 50) * 1000:>6.0f} {pct(d, 99) * 1000:>6.0f} "
            f"{pct(s, 99) * 1000:>6.0f} {pct(v, 99) * 1000:>6.0f} |"
        )
        for name, per in rows.items():
            c = per.get(i, {})
            extra = ""
            if c.get("lag_max"):
                extra = f" lag{c['lag_max']:.0f}"
            if name == "sink":
                extra = (
                    f" ev{c.get('ev_max', 0) * 1000:.0f} raw{c.get('raw_max', 0) * 1000:.0f}/{c.get('raw_rows', 0):.0f}"
                )
            line += (
                f" {c.get('cycles', 0):>3.0f} {c.get('busy', 0):>4.2f} {c.get('max', 0) * 1000:>4.0f}"
                f"({c.get('max_parts', ''):<30}) {c.get('checks_max', 0) * 1000:>4.0f}"
                f" {c.get('tick_max', 0) * 1000:>4.0f}"
                f" {sum(c.get(f'gc{g}', 0) for g in (0, 1, 2)) * 1000:>3.0f}{extra} |"
            )
        print(line)


if __name__ == "__main__":
    main()
