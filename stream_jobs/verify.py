"""``scopewatch verify``: is the evidence in ClickHouse intact, and does it follow from the raw events?

Two checks over the stored rows:

1. **Collector chains.** Every raw event (tool calls and results, identity, consent, policy and
   approval events: every raw table of :data:`stream_jobs.tables.SPECS`) that a
   collector stamped carries ``collector = {id, epoch, seq, prev_hash}``. Each process start of a
   collector is a new epoch, whose first record has ``seq`` 1 and no ``prev_hash``; every later
   record carries the chain hash of the one before (:func:`schemas.record_hash`). Per collector and
   epoch, records are ordered by ``seq`` and checked:

   * a missing ``seq`` is a **gap** (an event lost on the way, or a row deleted);
   * a row whose content no longer hashes to what the sink computed when it landed
     (``_record_hash``) is **edited**;
   * a record whose ``prev_hash`` is not the hash of the record before is a **chain break**: the
     record before was edited, replaced or moved (rows reordered);
   * two different rows claiming the same ``seq`` are a **conflict**.

   Rows are read with ``FINAL`` (one row per event, whether or not ClickHouse has merged yet). A
   collector that stamped one event twice (a re-sent event) thus has one of the two records
   missing; when stored records re-stamped at the missing sequence numbers hash to the next
   record's ``prev_hash``, the missing records are proven copies and counted as **resent**, not as
   a gap (see :class:`_Resent`), so each event counts once and the report does not depend on merges.

   The report names, per collector, the first bad record in chain order.
2. **Verdicts.** The replay engine re-derives every call's verdict from the stored identity,
   consent, policy and approval facts (the spec's fact tables, all of them, whatever ``--since``
   says: older facts decide newer calls), judging all calls together as replay does (an approval
   authorises at most one call), and compares it with the call's current final verdict in
   ``evidence_current``. With ``--since`` and approvals stored, the calls before it are judged too
   (they use approvals up) but not reported. A different verdict, grant or approval is a **mismatch**; a call with no
   verdict at all is **undecided**; a call whose latest verdict is still provisional (inside its
   grace period) is only counted as pending.
3. **Fact references.** Every evidence version names the identity and consent facts its verdict
   rests on (``fact_ids``) with the record hash each had when the verdict was made
   (``fact_hashes``). Each referenced fact must still be in the raw tables (else **fact_missing**),
   and its hash must equal both the row's ``_record_hash`` and the hash of the row's content (else
   **fact_mismatch**: the fact the verdict used is not the one stored). A hash the worker did not
   know (``""``: facts kept in live state from before hashes were recorded) is counted, not checked.
   Evidence written before fact references (facts copied as JSON, no ``fact_ids``) has nothing to
   check here.

Rows are read in pages through any ``fetch(sql) -> {"columns", "rows"}`` (the sink's read-only
endpoint or a direct client), so the same code runs from the CLI and in tests.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from detections.engine import DecisionEngine
from schemas import (
    ApprovalDecided,
    BaseEvent,
    Collector,
    EventError,
    ToolCall,
    record_hash,
)
from schemas.topics import Topics
from stream_jobs.forensics import render_literal
from stream_jobs.tables import BY_TABLE, FACT_TABLES, RAW_TABLES, table_topics

Fetch = Callable[[str], dict[str, Any]]

_TIME = "DateTime64(3, 'UTC')"
PAGE = 10_000
"""Rows per fetch: well inside the SQL endpoint's answer cap (SCOPEWATCH_QUERY_MAX_RESULT_BYTES)."""


@dataclass(frozen=True)
class Problem:
    kind: str  # gap, edited, chain_break, conflict, unreadable, wrong_topic, mismatch, undecided,
    # fact_missing, fact_mismatch
    detail: str
    collector_id: str | None = None
    epoch: int | None = None
    seq: int | None = None
    table: str | None = None
    event_id: str | None = None
    call_id: str | None = None

    def where(self) -> str:
        parts = []
        if self.collector_id is not None:
            parts.append(f"collector {self.collector_id} epoch {self.epoch} seq {self.seq}")
        if self.table is not None:
            parts.append(f"{self.table} event {self.event_id}")
        elif self.event_id is not None:
            parts.append(f"fact {self.event_id}")
        if self.call_id is not None:
            parts.append(f"call {self.call_id}")
        return ", ".join(parts)


@dataclass
class CollectorReport:
    collector_id: str
    events: int = 0
    epochs: int = 0
    problems: list[Problem] = field(default_factory=list)
    resent: int = 0
    """Missing sequence numbers proven to be re-sent copies of stored events (not lost; counted once)."""

    @property
    def first_bad(self) -> Problem | None:
        return self.problems[0] if self.problems else None

    def count(self, kind: str) -> int:
        return sum(1 for p in self.problems if p.kind == kind)


@dataclass
class VerifyReport:
    collectors: list[CollectorReport] = field(default_factory=list)
    unstamped: int = 0
    calls_checked: int = 0
    verdicts_match: int = 0
    pending: int = 0
    facts_checked: int = 0
    """Fact references (evidence version, fact) checked against the raw tables."""
    fact_hashes_unknown: int = 0
    """Of those, references without a record hash (from live state kept before hashes were): only their
    existence was checked."""
    verdict_problems: list[Problem] = field(default_factory=list)
    row_problems: list[Problem] = field(default_factory=list)
    fact_problems: list[Problem] = field(default_factory=list)

    @property
    def problems(self) -> list[Problem]:
        chain = [p for c in self.collectors for p in c.problems]
        return [*self.row_problems, *chain, *self.verdict_problems, *self.fact_problems]

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "collectors": [
                {
                    "collector_id": c.collector_id,
                    "events": c.events,
                    "epochs": c.epochs,
                    "gaps": c.count("gap"),
                    "chain_breaks": c.count("chain_break"),
                    "edited": c.count("edited"),
                    "resent": c.resent,
                    "first_bad": None if c.first_bad is None else _problem_json(c.first_bad),
                }
                for c in self.collectors
            ],
            "unstamped_events": self.unstamped,
            "calls_checked": self.calls_checked,
            "verdicts_match": self.verdicts_match,
            "pending": self.pending,
            "facts_checked": self.facts_checked,
            "fact_hashes_unknown": self.fact_hashes_unknown,
            "problems": [_problem_json(p) for p in self.problems],
        }


def _problem_json(p: Problem) -> dict[str, Any]:
    return {k: v for k, v in p.__dict__.items() if v is not None}


# ------------------------------------------------------------------------- rows -> events


def event_from_row(table: str, row: dict[str, Any]) -> BaseEvent:
    """The canonical event a raw row was made from (inverse of ``stream_jobs.rows.to_row``; from the table's
    spec, :meth:`stream_jobs.tables.TableSpec.event_from_row`)."""
    spec = BY_TABLE.get(table)
    if spec is None or not spec.raw_event:
        raise ValueError(f"not a raw event table: {table}")
    return spec.event_from_row(row)


# ------------------------------------------------------------------------------- chains


@dataclass(frozen=True)
class Stamped:
    table: str
    event: BaseEvent
    stored_hash: str

    @property
    def seq(self) -> int:
        assert self.event.collector is not None
        return self.event.collector.seq


MAX_RESENT_RUN = 16
"""The longest run of missing sequence numbers :class:`_Resent` tries to explain."""
RESENT_HASH_BUDGET = 200_000
"""Chain hashes one verify run may spend explaining gaps (a few seconds); beyond it gaps are gaps."""


class _Resent:
    """Explains gaps left by re-sent events.

    A collector may stamp the same event twice (the intake after its event-id window, a restart, or
    two intake replicas): two chain records with one ``event_id``. The raw tables keep one row per
    event (``ReplacingMergeTree``, read with ``FINAL``), so one of the two records is missing from
    its chain. Such a gap is *proven* harmless when stored records, re-stamped at the missing
    sequence numbers, hash to exactly the ``prev_hash`` of the record after the gap: the missing
    records were copies of events that are stored. Verify then counts them as ``resent``, not as
    gaps, and the result is the same before and after ClickHouse's background merges.
    """

    def __init__(self, records: list[Stamped]) -> None:
        chains: dict[tuple[str, int], list[Stamped]] = defaultdict(list)
        for r in records:
            c = r.event.collector
            assert c is not None
            chains[(c.id, c.epoch)].append(r)
        self.chains = {k: sorted(v, key=lambda r: r.seq) for k, v in chains.items()}
        self.budget = RESENT_HASH_BUDGET

    def explains(self, cid: str, epoch: int, first: int, width: int, prev_hash: str | None, target: str | None) -> bool:
        """Whether ``width`` consecutive stored records, re-stamped as seq ``first``.. of this chain
        after ``prev_hash``, end in a record whose hash is ``target``."""
        if target is None or width > MAX_RESENT_RUN:
            return False
        own = self.chains.get((cid, epoch), [])
        for chain in [own, *(chain for key, chain in self.chains.items() if key != (cid, epoch))]:
            for start in range(len(chain) - width + 1):
                if self.budget < width:
                    return False
                self.budget -= width
                run_hash = prev_hash
                for n in range(width):
                    stamp = Collector(id=cid, epoch=epoch, seq=first + n, prev_hash=run_hash)
                    run_hash = record_hash(chain[start + n].event.model_copy(update={"collector": stamp}))
                if run_hash == target:
                    return True
        return False


def check_chains(records: list[Stamped], from_start: bool = True) -> list[CollectorReport]:
    """Gaps, edits, breaks and conflicts per collector; ``from_start=False`` when rows were filtered
    by time (the first record seen of an epoch need not be seq 1)."""
    by_epoch: dict[str, dict[int, list[Stamped]]] = defaultdict(lambda: defaultdict(list))
    for r in records:
        c = r.event.collector
        assert c is not None
        by_epoch[c.id][c.epoch].append(r)
    reports = []
    resent = _Resent(records)
    for cid in sorted(by_epoch):
        report = CollectorReport(cid, epochs=len(by_epoch[cid]))
        for epoch in sorted(by_epoch[cid]):
            chain = _dedup(sorted(by_epoch[cid][epoch], key=lambda r: (r.seq, r.event.event_id)), cid, epoch, report)
            report.events += len(chain)
            _check_epoch(chain, cid, epoch, from_start, report, resent)
        reports.append(report)
    return reports


def _dedup(chain: list[Stamped], cid: str, epoch: int, report: CollectorReport) -> list[Stamped]:
    out: list[Stamped] = []
    for r in chain:
        if out and out[-1].seq == r.seq:
            if out[-1].event.event_id != r.event.event_id:
                report.problems.append(
                    Problem("conflict", f"two records claim seq {r.seq}", cid, epoch, r.seq, r.table, r.event.event_id)
                )
            continue  # the same event stored twice (before a merge) is not a problem
        out.append(r)
    return out


def _check_epoch(
    chain: list[Stamped], cid: str, epoch: int, from_start: bool, report: CollectorReport, resent: _Resent
) -> None:
    expected = 1 if from_start else (chain[0].seq if chain else 1)
    previous: Stamped | None = None
    previous_hash: str | None = None
    for r in chain:
        c = r.event.collector
        assert c is not None
        actual = record_hash(r.event)
        if r.seq > expected:
            width = r.seq - expected
            linked = previous is not None or expected == 1
            if linked and resent.explains(cid, epoch, expected, width, previous_hash, c.prev_hash):
                report.resent += width  # copies of stored events: nothing lost, and the link is proven
                previous_hash = c.prev_hash
            else:
                missing = f"seq {expected}" if r.seq == expected + 1 else f"seq {expected}..{r.seq - 1}"
                report.problems.append(
                    Problem("gap", f"{missing} missing (lost on the way, or deleted)", cid, epoch, expected)
                )
                previous = None  # the link across a gap cannot be checked
        if r.stored_hash and r.stored_hash != actual:
            report.problems.append(
                Problem(
                    "edited",
                    "the row no longer hashes to what landed (content changed after ingestion)",
                    cid,
                    epoch,
                    r.seq,
                    r.table,
                    r.event.event_id,
                )
            )
        if previous is not None and c.prev_hash != previous_hash:
            p = previous
            report.problems.append(
                Problem(
                    "chain_break",
                    f"seq {r.seq} chained to a different record than the one stored as seq {p.seq} "
                    "(edited, replaced or reordered)",
                    cid,
                    epoch,
                    p.seq,
                    p.table,
                    p.event.event_id,
                )
            )
        elif previous is None and r.seq == 1 and c.prev_hash is not None:
            report.problems.append(
                Problem("chain_break", "the first record of an epoch has a prev_hash", cid, epoch, 1, r.table)
            )
        previous, previous_hash = r, actual
        expected = r.seq + 1


# ------------------------------------------------------------------------------ loading


def _pages(fetch: Fetch, sql: str) -> Iterator[dict[str, Any]]:
    offset = 0
    while True:
        result = fetch(f"{sql} LIMIT {PAGE} OFFSET {offset}")
        columns = result["columns"]
        for row in result["rows"]:
            yield dict(zip(columns, row, strict=True))
        if len(result["rows"]) < PAGE:
            return
        offset += PAGE


def verify(
    fetch: Fetch,
    database: str,
    since: datetime | None = None,
    tenant: str | None = None,
    topics: Topics | None = None,
) -> VerifyReport:
    """``topics``: the pipeline's topic names; a raw row whose ``_topic`` is not its type's topic (stored
    before the sink checked it) is reported as ``wrong_topic`` and left out of the re-judging, as the
    worker dead-letters such an event."""
    report = VerifyReport()
    expected = table_topics(topics or Topics())
    where = []
    if tenant is not None:
        where.append(f"tenant = {render_literal('String', tenant)}")
    tenant_only = f" WHERE {' AND '.join(where)}" if where else ""
    if since is not None:
        where.append(f"event_time >= {render_literal(_TIME, since)}")
    filtered = f" WHERE {' AND '.join(where)}" if where else ""

    stamped: list[Stamped] = []
    facts: dict[tuple[str, str], _StoredFact] = {}
    engine = DecisionEngine()
    calls: list[ToolCall] = []
    approvals = False
    for table in RAW_TABLES:
        # facts: all of them (older facts decide newer calls); chains and calls: the --since window
        scope = tenant_only if table in FACT_TABLES else filtered
        sql = (
            f"SELECT * FROM {database}.{table} FINAL{scope}"
            " ORDER BY collector_id, collector_epoch, collector_seq, event_id"
        )
        for row in _pages(fetch, sql):
            fact: _StoredFact | None = None
            if table in FACT_TABLES:
                fact = facts[(str(row.get("tenant")), str(row.get("event_id")))] = _StoredFact(
                    table, str(row.get("_record_hash") or "")
                )
            try:
                event = event_from_row(table, row)
            except (EventError, ValueError, KeyError, TypeError) as exc:
                report.row_problems.append(
                    Problem(
                        "unreadable", f"row does not rebuild an event: {exc}", table=table, event_id=row.get("event_id")
                    )
                )
                continue
            if fact is not None:
                fact.event = event
            in_window = since is None or event.event_time >= since
            landed = row.get("_topic")
            if landed is not None and landed != expected[table]:
                if in_window:
                    report.row_problems.append(
                        Problem(
                            "wrong_topic",
                            f"a {event.event_type} that came from {landed}, not {expected[table]} "
                            "(the worker dead-lettered it; not re-judged)",
                            table=table,
                            event_id=event.event_id,
                        )
                    )
            elif table in FACT_TABLES:
                engine.add_fact(event)
                approvals = approvals or isinstance(event, ApprovalDecided)
            elif isinstance(event, ToolCall):
                calls.append(event)
            if not in_window:
                continue
            if event.collector is None:
                report.unstamped += 1
            else:
                stamped.append(Stamped(table, event, str(row.get("_record_hash") or "")))
    report.collectors = check_chains(stamped, from_start=since is None)
    earlier: list[ToolCall] = []
    if since is not None and approvals:
        # approvals are used up by earlier calls too: judge the calls before --since with the others (not reported)
        scope = f"{tenant_only} AND" if tenant_only else " WHERE"
        sql = (
            f"SELECT * FROM {database}.tool_calls FINAL{scope} event_time < {render_literal(_TIME, since)}"
            " ORDER BY event_time, call_id, event_id"
        )
        for row in _pages(fetch, sql):
            try:
                event = event_from_row("tool_calls", row)
            except (EventError, ValueError, KeyError, TypeError):
                continue  # reported when in a window that covers it
            if isinstance(event, ToolCall) and (row.get("_topic") is None or row["_topic"] == expected["tool_calls"]):
                earlier.append(event)

    current: dict[tuple[str, str], dict[str, Any]] = {}
    call_scope = filtered.replace("event_time", "call_time")
    sql = (
        "SELECT tenant, call_id, verdict, matched_grant_id, approval_id, final, version"
        f" FROM {database}.evidence_current{call_scope} ORDER BY tenant, call_id"
    )
    for row in _pages(fetch, sql):
        current[(row["tenant"], row["call_id"])] = row
    # all calls at once: an approval authorises at most one call, taken in (event_time, call_id) order
    for call, decision in zip(calls, engine.decide_all([*calls, *earlier])[: len(calls)], strict=True):
        report.calls_checked += 1
        stored = current.get((call.tenant, call.call_id))
        if stored is None:
            report.verdict_problems.append(
                Problem("undecided", f"no verdict recorded (replay says {decision.verdict})", call_id=call.call_id)
            )
        elif not stored["final"]:
            report.pending += 1
        elif (stored["verdict"], stored["matched_grant_id"], stored["approval_id"]) != (
            decision.verdict,
            decision.matched_grant_id,
            decision.approval_id,
        ):
            approval = f", approval {stored['approval_id']}" if stored["approval_id"] else ""
            replayed = f", approval {decision.approval_id}" if decision.approval_id else ""
            report.verdict_problems.append(
                Problem(
                    "mismatch",
                    f"stored {stored['verdict']} (grant {stored['matched_grant_id']}{approval}, version "
                    f"{stored['version']}), replay of the raw events gives {decision.verdict} "
                    f"(grant {decision.matched_grant_id}{replayed})",
                    call_id=call.call_id,
                )
            )
        else:
            report.verdicts_match += 1
    _check_fact_refs(fetch, database, call_scope, facts, report)
    return report


@dataclass
class _StoredFact:
    """A row of a fact table (identity, consent, policy, approval), for checking the evidence that references it."""

    table: str
    stored_hash: str
    event: BaseEvent | None = None
    """The event the row rebuilds (None: unreadable)."""
    _content_hash: str | None = None

    def content_hash(self) -> str | None:
        if self._content_hash is None and self.event is not None:
            self._content_hash = record_hash(self.event)
        return self._content_hash


def _check_fact_refs(
    fetch: Fetch, database: str, scope: str, facts: dict[tuple[str, str], _StoredFact], report: VerifyReport
) -> None:
    """Each fact every evidence version references exists and is the fact the verdict was made on."""
    seen: set[tuple[str, str, str, str]] = set()  # (tenant, call, fact, kind): one problem per call and fact
    # evidence_rows FINAL joined with the fact lists only (evidence_final would hash the reason lists too)
    sql = (
        "SELECT e.tenant AS tenant, e.call_id AS call_id, e.version AS version, l.fact_ids AS fact_ids,"
        " l.fact_hashes AS fact_hashes"
        " FROM (SELECT tenant, call_id, version, evidence_id, fact_key"
        f" FROM {database}.evidence_rows FINAL{scope}) AS e"
        f" ANY LEFT JOIN {database}.evidence_fact_lists AS l ON l.id = e.fact_key"
        " WHERE notEmpty(l.fact_ids) ORDER BY tenant, call_id, version, e.evidence_id"
    )
    for row in _pages(fetch, sql):
        tenant, call_id, version = str(row["tenant"]), str(row["call_id"]), row["version"]
        hashes = list(row["fact_hashes"])
        for i, fact_id in enumerate(row["fact_ids"]):
            report.facts_checked += 1
            want = hashes[i] if i < len(hashes) else ""
            stored = facts.get((tenant, fact_id))
            problem: Problem | None = None
            if stored is None:
                problem = Problem(
                    "fact_missing",
                    f"evidence version {version} rests on fact {fact_id}, which is in none of "
                    f"{', '.join(FACT_TABLES)} (deleted, or never landed)",
                    event_id=fact_id,
                    call_id=call_id,
                )
            elif not want:
                report.fact_hashes_unknown += 1
            elif want != stored.stored_hash or want != stored.content_hash():
                what = (
                    "its stored _record_hash differs"
                    if want != stored.stored_hash
                    else "its content no longer hashes to it (edited after ingestion)"
                )
                problem = Problem(
                    "fact_mismatch",
                    f"evidence version {version} rests on fact {fact_id} with record hash {want}; {what}",
                    table=stored.table,
                    event_id=fact_id,
                    call_id=call_id,
                )
            if problem is not None and (tenant, call_id, fact_id, problem.kind) not in seen:
                seen.add((tenant, call_id, fact_id, problem.kind))
                report.fact_problems.append(problem)
