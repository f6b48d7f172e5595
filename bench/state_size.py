"""Bytes of live decision state per active session and per grant, at 1 million of each.

Drives the real processors of ``detections.live`` -- ``Stage1.on_fact`` with N distinct
``SessionBound`` facts (N sessions) and ``Stage2.on_fact`` with N ``GrantIssued`` facts in two
shapes (N/5 delegations x 5 grants, N delegations x 1 grant) -- over plain ``dict`` stores, as the
tests' ``LiveSim`` does, then measures what the stores hold:

* **tracemalloc** (headline, checked against the target): with tracing on, the store is rebuilt
  key by key into a fresh dict (new key and value objects of the same sizes, inserted one by one
  as the processor inserted them) and the snapshot difference of those allocations is divided by
  N. Tracing the whole 1M-fact drive itself would take 15-20 minutes here (tracemalloc slows the
  allocation-heavy processors 5-15x), so the drive runs untraced and the retained store is what is
  traced. That nothing else is retained per fact is checked by ``--trace-sample`` facts driven
  through fresh processors *with* tracing on: "retained outside the store" must be ~0.
* ``sys.getsizeof`` accounting of the store (dict table + keys + values), and the process RSS
  growth over the real drive (includes allocator rounding and fragmentation) as cross-checks.
* the average stored value length (the compact encoding of ``detections.compact``).

The processors' decode caches are bounded (``LiveConfig.cache_size``, default 4096 decoded
histories per processor, independent of N): the drive uses ``cache_size=1`` so the cache is not
counted in the per-entity figure, and the cache is measured separately (bytes per cached history).

Facts are built with ``model_copy(update=...)`` from one template validated by pydantic (the
copies are valid data: canonical UUID strings, aware UTC datetimes), because building 3M pydantic
models with validation alone would take minutes.

Usage: ``.venv/bin/python bench/state_size.py [--n 1000000] [--jobs 2] [--trace-sample 20000]``
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime, timedelta
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from rich.console import Console

from detections.live import LiveConfig, Stage1, Stage2
from schemas import GrantIssued, SessionBound

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchkit as bk

TARGET_BYTES = 300
NOW = datetime(2026, 11, 21, 10, 0, tzinfo=UTC)
ISSUED_AT = NOW - timedelta(minutes=5)
TENANT = "acme"
AGENTS = [f"mcp-client-{i:02d}" for i in range(20)]
# Five realistic grants of one delegation: tool globs and resource globs.
GRANT_SHAPES: list[tuple[list[str], list[str]]] = [
    (["fs/read_*", "fs/list_*"], ["file:/data/projects/*"]),
    (["fs/write_file"], ["file:/data/projects/scratch/*"]),
    (["github/get_*", "github/list_*"], ["repo:acme/*"]),
    (["slack/post_message"], ["channel:#eng-*"]),
    (["db/query"], []),
]


def _uuid(kind: int, i: int) -> str:
    """A canonical (lower-case, hyphenated) version-4 UUID string, distinct per (kind, i)."""
    return f"{i:08x}-{kind:04x}-4{(i >> 32) & 0xFFF:03x}-8000-{kind * 7919 + i:012x}"


def _principal(i: int) -> str:
    return f"user{i:07d}@example.com"


# ----------------------------------------------------------------------------- facts


def _session_template() -> SessionBound:
    return SessionBound.model_validate(
        {
            "event_id": _uuid(1, 0),
            "event_time": ISSUED_AT,
            "tenant": TENANT,
            "session_id": _uuid(2, 0),
            "principal": _principal(0),
            "agent_id": AGENTS[0],
            "valid_from": ISSUED_AT,
            "valid_until": ISSUED_AT + timedelta(hours=8),
            "auth": {"issuer": "https://idp.example.com", "method": "oauth2", "token_id": "jti-0"},
        }
    )


def _grant_template() -> GrantIssued:
    tools, resources = GRANT_SHAPES[0]
    return GrantIssued.model_validate(
        {
            "event_id": _uuid(3, 0),
            "event_time": ISSUED_AT,
            "tenant": TENANT,
            "grant_id": _uuid(4, 0),
            "principal": _principal(0),
            "agent_id": AGENTS[0],
            "tools": tools,
            "resources": resources,
            "scopes": ["files:read"],
            "not_before": ISSUED_AT,
            "expires_at": ISSUED_AT + timedelta(days=30),
            "granted_by": _principal(0),
            "purpose": "project assistant",
            "parent_grant_id": None,
        }
    )


def session_facts(n: int) -> Iterator[SessionBound]:
    tmpl = _session_template()
    for i in range(n):
        yield tmpl.model_copy(
            update={
                "event_id": _uuid(1, i),
                "session_id": _uuid(2, i),
                "principal": _principal(i),
                "agent_id": AGENTS[i % len(AGENTS)],
            }
        )


def grant_facts(n: int, per_delegation: int) -> Iterator[GrantIssued]:
    """n grants over n // per_delegation delegations, a delegation's grants consecutive."""
    tmpl = _grant_template()
    for i in range(n):
        d = i // per_delegation
        tools, resources = GRANT_SHAPES[i % per_delegation % len(GRANT_SHAPES)]
        yield tmpl.model_copy(
            update={
                "event_id": _uuid(3, i),
                "grant_id": _uuid(4, i),
                "principal": _principal(d),
                "agent_id": AGENTS[d % len(AGENTS)],
                "granted_by": _principal(d),
                "tools": tools,
                "resources": resources,
            }
        )


# ----------------------------------------------------------------------------- drivers

SHAPES: dict[str, tuple[str, int]] = {
    # name: (what, facts per store key)
    "sessions": ("session", 1),
    "grants 5/delegation": ("grant", 5),
    "grants 1/delegation": ("grant", 1),
}


def _driver(shape: str, n: int, cache_size: int) -> tuple[dict[str, bytes], Callable[[], None]]:
    """A fresh processor over a dict store, and a function that feeds it the shape's n facts."""
    config = LiveConfig(cache_size=cache_size)
    what, per = SHAPES[shape]
    store: dict[str, bytes] = {}
    if what == "session":
        s1 = Stage1(0, store, {}, config)

        def run() -> None:
            for fact in session_facts(n):
                s1.on_fact(fact, NOW)

    else:
        s2 = Stage2(0, store, {}, config)

        def run() -> None:
            for fact in grant_facts(n, per):
                s2.on_fact(fact, NOW)

    return store, run


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _sizeof_store(store: dict[str, bytes]) -> int:
    return sys.getsizeof(store) + sum(sys.getsizeof(k) + sys.getsizeof(v) for k, v in store.items())


def _traced_rebuild(store: dict[str, bytes]) -> int:
    """tracemalloc snapshot difference of rebuilding ``store`` from fresh, same-sized objects."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    clone: dict[str, bytes] = {}
    for key, value in store.items():
        clone[key.encode("utf-8").decode("utf-8")] = bytes(bytearray(value))
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    only_here = [tracemalloc.Filter(True, __file__)]
    diff = after.filter_traces(only_here).compare_to(before.filter_traces(only_here), "filename")
    assert len(clone) == len(store) and clone == store
    return sum(stat.size_diff for stat in diff)


def _traced_drive(shape: str, n: int, cache_size: int) -> tuple[int, int, list[tuple[str, int]]]:
    """Drive n facts with tracing on: (snapshot difference, getsizeof of the store, top files)."""
    store, run = _driver(shape, n, cache_size)
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.take_snapshot()
    run()
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    stats = after.compare_to(before, "filename")
    top = [(os.path.relpath(str(s.traceback[0].filename)), s.size_diff) for s in stats[:3]]
    return sum(s.size_diff for s in stats), _sizeof_store(store), top


def measure(shape: str, n: int, trace_sample: int) -> dict[str, Any]:
    """Everything for one shape (runs in its own process, so RSS is its own)."""
    started = time.perf_counter()
    what, per = SHAPES[shape]
    store, run = _driver(shape, n, cache_size=1)
    gc.collect()
    rss0 = _rss()
    t0 = time.perf_counter()
    run()
    drive_s = time.perf_counter() - t0
    gc.collect()
    rss_delta = _rss() - rss0
    keys = len(store)
    assert keys == n // per, (keys, n, per)
    value_bytes = sum(map(len, store.values()))
    key_chars = sum(map(len, store))
    sizeof = _sizeof_store(store)
    traced = _traced_rebuild(store)
    del store
    gc.collect()
    # Cross-check on a sample: the traced real drive retains nothing beyond its store.
    sample = max(per, trace_sample - trace_sample % per)
    s_traced, s_sizeof, s_top = _traced_drive(shape, sample, cache_size=1)
    # The bounded decode cache: same drive with the default cache vs cache_size=1.
    default_cache = LiveConfig().cache_size
    c_n = default_cache * per
    with_cache, _, _ = _traced_drive(shape, c_n, cache_size=default_cache)
    without_cache, _, _ = _traced_drive(shape, c_n, cache_size=1)
    return {
        "shape": shape,
        "what": what,
        "per": per,
        "n": n,
        "keys": keys,
        "drive_s": drive_s,
        "us_per_fact": drive_s / n * 1e6,
        "avg_value_len": value_bytes / keys,
        "avg_value_len_per_entity": value_bytes / n,
        "avg_key_len": key_chars / keys,
        "traced_per_entity": traced / n,
        "sizeof_per_entity": sizeof / n,
        "rss_per_entity": rss_delta / n,
        "sample": sample,
        "sample_traced_per_entity": s_traced / sample,
        "sample_sizeof_per_entity": s_sizeof / sample,
        "sample_top": s_top,
        "cache_entries": default_cache,
        "cache_per_entry": (with_cache - without_cache) / default_cache,
        "elapsed_s": time.perf_counter() - started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="sessions, and grants per shape (default 1M)")
    parser.add_argument("--jobs", type=int, default=2, help="shapes measured in parallel processes (default 2)")
    parser.add_argument("--trace-sample", type=int, default=20_000, help="facts of the traced real-drive check")
    args = parser.parse_args()
    if args.n < 5 or args.n % 5:
        parser.error("--n must be a positive multiple of 5")
    console = Console(width=170)
    console.print(f"[bold]state_size[/]: n={args.n:,} per shape, cache_size=1 during the drive")
    console.print(f"machine: {bk.machine()}")
    sources = (*bk.DECISION_CODE[:3], "schemas/events.py")
    console.print(f"code: {bk.code_fingerprint(sources)}")
    started = time.perf_counter()
    ctx = get_context("fork")
    with ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=ctx) as pool:
        futures = [pool.submit(measure, shape, args.n, args.trace_sample) for shape in SHAPES]
        results = [f.result() for f in futures]
    total_s = time.perf_counter() - started

    table = bk.new_table(
        f"Live state per entity at n = {args.n:,} (plain dict stores)",
        (
            "shape",
            "store keys",
            "avg key len",
            "avg value len",
            "tracemalloc B/entity",
            "getsizeof B/entity",
            "RSS growth B/entity",
            "target",
            "result",
        ),
        left=("shape",),
    )
    for r in results:
        ok = r["traced_per_entity"] <= TARGET_BYTES
        table.add_row(
            f"{r['shape']} (per {r['what']})",
            f"{r['keys']:,}",
            f"{r['avg_key_len']:.0f} ch",
            f"{r['avg_value_len']:.0f} B" + (f" ({r['avg_value_len_per_entity']:.0f}/grant)" if r["per"] > 1 else ""),
            f"{r['traced_per_entity']:.0f}",
            f"{r['sizeof_per_entity']:.0f}",
            f"{r['rss_per_entity']:.0f}",
            f"<= {TARGET_BYTES}",
            bk.mark(ok),
        )
    console.print(table)

    checks = bk.new_table(
        "Cross-checks and the bounded decode cache",
        (
            "shape",
            "drive µs/fact",
            "traced sample",
            "sample tracemalloc B/entity",
            "sample store B/entity",
            "retained outside store",
            "decode cache B/entry",
            "cache bound / processor",
        ),
        left=("shape",),
    )
    for r in results:
        outside = r["sample_traced_per_entity"] - r["sample_sizeof_per_entity"]
        checks.add_row(
            r["shape"],
            f"{r['us_per_fact']:.0f}",
            f"{r['sample']:,}",
            f"{r['sample_traced_per_entity']:.0f}",
            f"{r['sample_sizeof_per_entity']:.0f}",
            f"{outside:+.1f} B",
            f"{r['cache_per_entry']:,.0f}",
            f"{r['cache_per_entry'] * r['cache_entries'] / 1e6:.1f} MB",
        )
    console.print(checks)
    for r in results:
        top = ", ".join(f"{name} {size / r['sample']:+.0f} B" for name, size in r["sample_top"])
        console.print(f"  traced sample, {r['shape']}: top files per entity: {top}")
    console.print(
        "tracemalloc B/entity: snapshot difference of the 1M-entry store rebuilt under tracing / n "
        "(keys + values + dict table). Per grant in the 5/delegation shape: one key and one value "
        f"hold 5 grants. Decode cache: {LiveConfig().cache_size} histories per processor at the default "
        "cache_size, independent of n (not in the per-entity figures)."
    )
    per_shape = ", ".join(f"{r['shape']} {r['elapsed_s']:.0f} s" for r in results)
    console.print(f"total {total_s:.0f} s ({per_shape})")


if __name__ == "__main__":
    main()
