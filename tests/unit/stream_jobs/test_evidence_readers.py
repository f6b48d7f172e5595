"""No product reader goes through the joined evidence views (issue 16, bench/HISTORY.md h16rd).

Since migration 0010 `evidence` and `evidence_final` are views that join evidence_rows with the whole list
tables (ClickHouse builds the join's hash table from all of them, even when no list column is read and for
one call). The product's SQL reads evidence_rows (counts and scans without lists), evidence_current, or joins
only the lists it needs, restricted to the keys of the rows it read; analysts may still use the views."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
PACKAGES = ("dashboards", "detections", "scopewatch", "stream_jobs")
#: SQL naming a joined view: `{db}.evidence`, `{database}.evidence`, `x.evidence_final`, `x.evidence FINAL`
JOINED = re.compile(r"\}\.evidence(?!\w)|\.evidence_final\b|\.evidence\s+FINAL\b")


def _sources() -> list[Path]:
    files = [p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*") if p.suffix in (".py", ".sql")]
    return [p for p in files if "migrations" not in p.parts]


def test_the_scan_sees_the_readers() -> None:
    texts = {p.relative_to(ROOT).as_posix(): p.read_text(encoding="utf-8") for p in _sources()}
    assert "{db}.evidence_rows" in texts["scopewatch/demo.py"]
    assert "{db}.evidence_rows FINAL" in texts["stream_jobs/forensics/call_evidence.sql"]
    assert "evidence_rows FINAL" in texts["stream_jobs/verify.py"]
    assert JOINED.search("FROM {db}.evidence WHERE") and JOINED.search("FROM {database}.evidence_final{where}")
    assert JOINED.search("FROM scopewatch.evidence FINAL") and not JOINED.search("FROM {db}.evidence_current")


def test_no_product_sql_reads_the_joined_evidence_views() -> None:
    found = []
    for path in _sources():
        for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if JOINED.search(line):
                found.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()}")
    assert found == []
