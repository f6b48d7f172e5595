#!/usr/bin/env python3
"""Container healthcheck for scopewatch services: ``scopewatch-healthcheck GLOB MAX_AGE_SECONDS``.

Healthy (exit 0) while some file matching GLOB was written in the last MAX_AGE_SECONDS: the sink
rewrites ``run/sink-stats.json`` every 2 s, the decision worker ``run/worker-<host>-<pid>.json``
every second, so a stale file means a stuck or dead process. Exit 1 otherwise, 2 on bad arguments.
"""

from __future__ import annotations

import glob
import os
import sys
import time


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print("usage: scopewatch-healthcheck GLOB MAX_AGE_SECONDS", file=sys.stderr)
        return 2
    pattern = argv[1]
    try:
        max_age = float(argv[2])
    except ValueError:
        print(f"not a number of seconds: {argv[2]!r}", file=sys.stderr)
        return 2
    ages = []
    for path in glob.glob(pattern):
        try:
            ages.append(time.time() - os.path.getmtime(path))
        except OSError:
            continue  # replaced between glob and stat
    if ages and min(ages) <= max_age:
        return 0
    print(f"no {pattern} written in the last {max_age:g} s", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
