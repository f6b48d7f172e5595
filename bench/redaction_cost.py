"""Redaction cost per tool call (issue 17): microseconds of CPU per ``redact_arguments`` call.

The workload is a deterministic mix of realistic MCP tool-call arguments (file reads and
listings, searches, file writes and edits with source or prose content, memory entities,
fetches with headers, SQL, echo), with no secret in them, since that is what almost every call
looks like. Sizes follow that mix; the script prints the size percentiles of the mix and the
cost per call at the 50th and 95th percentile of argument size, the mean over the whole mix,
an error text of 1 KiB (``redact_text``), a call that does carry secrets, and a 64 KiB argument.

Run: ``.venv/bin/python bench/redaction_cost.py [--calls 2000] [--repeat 5]``. Takes seconds.
The observer's whole per-call CPU budget is 150 µs (issue 17), redaction included.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from collectors.redact import Redactor

WORDS = (
    "the request returned a list of orders for the customer and the total was computed from the line items "
    "function const return await import export default class interface type string number boolean async "
    "if else for while try catch finally throw new this self def lambda yield from with as pass none true "
    "false select where group order by limit join on left inner update insert delete into values set "
    "report summary quarter revenue growth region team project deadline review meeting notes action item"
).split()
PATHS = ("/srv/projects/web/src/lib/db.ts", "/home/alice/notes/2026-11-21.md", "/var/log/app/server.log")


def _text(rng: random.Random, size: int) -> str:
    out: list[str] = []
    n = 0
    while n < size:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14)))
        if rng.random() < 0.3:
            line = "    " + line.replace(" ", "_", 2) + "();"
        out.append(line)
        n += len(line) + 1
    return "\n".join(out)[:size]


def workload(calls: int, seed: int = 17) -> list[dict[str, Any]]:
    """``calls`` argument objects of a realistic mix (no secrets)."""
    rng = random.Random(seed)
    out: list[dict[str, Any]] = []
    for i in range(calls):
        kind = rng.random()
        if kind < 0.35:
            out.append({"path": rng.choice(PATHS)})
        elif kind < 0.45:
            out.append({"path": "/srv/projects/web", "pattern": "*.ts", "excludePatterns": ["node_modules"]})
        elif kind < 0.55:
            out.append({"a": i, "b": i * 2})
        elif kind < 0.65:
            out.append({"message": _text(rng, rng.randint(20, 200))})
        elif kind < 0.72:
            out.append({"query": f"SELECT id, total FROM orders WHERE customer_id = {i} ORDER BY id LIMIT 50"})
        elif kind < 0.80:
            out.append(
                {
                    "url": f"https://docs.example.com/guide/page-{i}?lang=en",
                    "headers": {"Accept": "text/html", "User-Agent": "agent/1.0"},
                    "max_length": 5000,
                }
            )
        elif kind < 0.88:
            entities = [
                {"name": f"entity-{i}-{k}", "entityType": "person", "observations": [_text(rng, 80)]} for k in range(3)
            ]
            out.append({"entities": entities})
        elif kind < 0.94:
            edits = [{"oldText": _text(rng, 120), "newText": _text(rng, 140)} for _ in range(rng.randint(1, 4))]
            out.append({"path": rng.choice(PATHS), "edits": edits, "dryRun": False})
        else:
            out.append({"path": rng.choice(PATHS), "content": _text(rng, int(rng.lognormvariate(8.0, 0.9)))})
    return out


def size(arguments: Any) -> int:
    return len(json.dumps(arguments, separators=(",", ":")).encode())


def per_call_us(fn: Callable[[Any], object], items: list[Any], repeat: int) -> float:
    """Best-of-``repeat`` mean CPU microseconds per item."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time_ns()
        for item in items:
            fn(item)
        best = min(best, (time.process_time_ns() - start) / len(items) / 1000)
    return best


def percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()

    red = Redactor(key=b"bench-key-0123456789abcdef")
    mix = workload(args.calls)
    sizes = [size(a) for a in mix]
    p50, p95, p99 = (percentile(sizes, q) for q in (50, 95, 99))
    near = lambda target: [a for a in mix if 0.8 * target <= size(a) <= 1.25 * target] or mix  # noqa: E731
    error_text = "Error: ENOENT: no such file or directory, open '/srv/projects/web/src/x.ts' " + _text(
        random.Random(1), 950
    )
    secrets_args = {
        "env": "DB_PASSWORD=correct-horse AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMI/K7MDENG/bPxRfiCYFAKEKEYZQ9",
        "dsn": "postgres:/app:pw-canary-123@db:5432/app",
        "headers": {"Authorization": "Bearer c4n4ryBearerT0ken-9f8e7d6c5b4a"},
        "note": _text(random.Random(2), 600),
    }
    big = {"content": _text(random.Random(3), 64 * 1024 - 20)}
    rows = [
        (f"mix, all {len(mix)} calls (mean size {statistics.fmean(sizes):.0f} B)", mix),
        (f"arguments at p50 size (~{p50} B)", near(p50)),
        (f"arguments at p95 size (~{p95} B)", near(p95)),
        (f"arguments at p99 size (~{p99} B)", near(p99)),
        (f"arguments carrying 4 secrets ({size(secrets_args)} B)", [secrets_args] * 200),
        (f"one 64 KiB argument ({size(big)} B)", [big] * 20),
    ]
    print(f"argument size of the mix: p50 {p50} B, p95 {p95} B, p99 {p99} B")
    for label, items in rows:
        print(f"{label:<52} {per_call_us(red.redact_arguments, items, args.repeat):9.1f} µs per call")
    print(
        f"{'error text of 1 KiB (redact_text)':<52} "
        f"{per_call_us(red.redact_text, [error_text] * 500, args.repeat):9.1f} µs per call"
    )


if __name__ == "__main__":
    main()
