"""The scopewatch dashboards: SOC overview, delegation drill-down, findings and paging, pipeline health.

SQL reads the evidence store's tables and views (``stream_jobs/migrations``); ``{db}`` stands for the
database. Tables are ReplacingMergeTree, so rows a retried sink batch left twice until the next merge
are counted once: by their unique id (``uniqExact(finding_id)``), or through ``evidence_current``.
Verdict rows that need no ``reasons`` / fact lists are read from ``evidence_rows``, never through the
``evidence`` view, which joins the whole list tables (migration 0010); ``tests/unit/dashboards`` checks it.
Time columns: ``call_time`` (when the agent acted) for calls and verdicts, ``last_call_time`` for
findings, ``attempted_at`` for pages, ``failed_at`` for dead letters, ``_ingested_at`` for delays.
"""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Final

from dashboards.model import Dashboard, Format, Link, Panel, Query, Variable

__all__ = ["DELEGATION_UID", "FINDINGS_UID", "OVERVIEW_UID", "PIPELINE_UID", "check_database", "dashboards"]

OVERVIEW_UID: Final = "scopewatch-soc-overview"
DELEGATION_UID: Final = "scopewatch-delegation"
FINDINGS_UID: Final = "scopewatch-findings"
PIPELINE_UID: Final = "scopewatch-pipeline"

_IDENT: Final = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
SEVERITY_ORDER: Final = "indexOf(['critical', 'high', 'medium', 'low', 'info'], severity)"
DELEGATION_FILTER: Final = (
    "tenant = ${tenant:sqlstring} AND principal = ${principal:sqlstring} AND agent_id = ${agent:sqlstring}"
)
TO_DRILL_DOWN: Final = Link(
    "Delegation drill-down",
    f"/d/{DELEGATION_UID}?var-tenant=${{__data.fields.tenant}}&var-principal=${{__data.fields.principal}}"
    "&${__url_time_range}",
)
METRICS_NOTE: Final = (
    "From `pipeline_metrics`: the sink appends a snapshot every 10 s (its counters, the workers' and the "
    "pager's stats files, the spools on its host); counters are cumulative since their process started."
)


def _overview() -> Dashboard:
    calls = Query(
        "SELECT count() AS calls, countIf(verdict != 'in_scope') AS violations\n"
        "FROM {db}.evidence_current\nWHERE $__timeFilter(call_time)",
        ("calls", "violations"),
    )
    findings = Query(
        "SELECT uniqExact(finding_id) AS findings,\n"
        "       uniqExactIf(finding_id, severity IN ('critical', 'high')) AS critical_or_high\n"
        "FROM {db}.findings\nWHERE $__timeFilter(last_call_time)",
        ("findings", "critical_or_high"),
    )
    per_minute = Query(
        "SELECT toStartOfInterval(call_time, INTERVAL greatest($__interval_s, 60) SECOND) AS time,\n"
        "       verdict,\n"
        "       count() * 60 / greatest($__interval_s, 60) AS calls_per_minute\n"
        "FROM {db}.evidence_current\nWHERE $__timeFilter(call_time)\n"
        "GROUP BY time, verdict\nORDER BY time, verdict",
        ("time", "verdict", "calls_per_minute"),
        Format.TIME_SERIES,
    )
    by_rule = Query(
        "SELECT rule_id, severity, uniqExact(finding_id) AS findings, uniqExact(dedup_key) AS problems,\n"
        "       max(last_call_time) AS last_seen\n"
        "FROM {db}.findings\nWHERE $__timeFilter(last_call_time)\n"
        f"GROUP BY rule_id, severity\nORDER BY {SEVERITY_ORDER}, findings DESC, rule_id",
        ("rule_id", "severity", "findings", "problems", "last_seen"),
    )
    principals = Query(
        "SELECT tenant, ifNull(principal, '(unbound)') AS principal, count() AS violations,\n"
        "       arrayStringConcat(arraySort(groupUniqArray(verdict)), ', ') AS verdicts\n"
        "FROM {db}.evidence_current\nWHERE $__timeFilter(call_time) AND verdict != 'in_scope'\n"
        "GROUP BY tenant, principal\nORDER BY violations DESC, tenant, principal\nLIMIT 10",
        ("tenant", "principal", "violations", "verdicts"),
    )
    agents = Query(
        "SELECT tenant, ifNull(agent_id, '(unbound)') AS agent_id, count() AS violations,\n"
        "       uniqExact(principal) AS principals,\n"
        "       arrayStringConcat(arraySort(groupUniqArray(verdict)), ', ') AS verdicts\n"
        "FROM {db}.evidence_current\nWHERE $__timeFilter(call_time) AND verdict != 'in_scope'\n"
        "GROUP BY tenant, agent_id\nORDER BY violations DESC, tenant, agent_id\nLIMIT 10",
        ("tenant", "agent_id", "violations", "principals", "verdicts"),
    )
    expiring = Query(
        "SELECT g.tenant AS tenant, g.grant_id AS grant_id, g.principal AS principal, g.agent_id AS agent_id,\n"
        "       arrayStringConcat(g.tools, ', ') AS tools, g.expires_at AS expires_at,\n"
        "       round(dateDiff('second', $__toTime, g.expires_at) / 3600, 1) AS hours_left\n"
        "FROM (\n"
        "    SELECT tenant, grant_id, principal, agent_id, tools, expires_at, event_time\n"
        "    FROM {db}.consent_events\n"
        "    WHERE event_type = 'grant_issued' AND event_time <= $__toTime\n"
        "    ORDER BY tenant, grant_id, event_time DESC\n"
        "    LIMIT 1 BY tenant, grant_id\n"
        ") AS g\n"
        "LEFT JOIN (\n"
        "    SELECT tenant, grant_id, max(event_time) AS revoked_at\n"
        "    FROM {db}.consent_events\n"
        "    WHERE event_type = 'grant_revoked' AND event_time <= $__toTime\n"
        "    GROUP BY tenant, grant_id\n"
        ") AS r ON r.tenant = g.tenant AND r.grant_id = g.grant_id\n"
        "WHERE g.expires_at > $__toTime AND g.expires_at <= $__toTime + INTERVAL 24 HOUR\n"
        "  AND (r.revoked_at IS NULL OR r.revoked_at < g.event_time)\n"
        "ORDER BY expires_at, tenant, grant_id",
        ("tenant", "grant_id", "principal", "agent_id", "tools", "expires_at", "hours_left"),
    )
    revocations = Query(
        "SELECT r.tenant AS tenant, r.grant_id AS grant_id, r.principal AS principal, r.agent_id AS agent_id,\n"
        "       r.event_time AS revoked_at, r.revoked_by AS revoked_by,\n"
        "       countIf(u.call_time >= r.event_time) AS uses_after,\n"
        "       if(uses_after = 0, NULL,\n"
        "          dateDiff('millisecond', r.event_time, minIf(u.call_time, u.call_time >= r.event_time)) / 1000\n"
        "       ) AS first_use_after_s\n"
        "FROM {db}.consent_events AS r\n"
        "LEFT JOIN (\n"
        "    SELECT tenant, assumeNotNull(matched_grant_id) AS grant_id, call_time\n"
        "    FROM {db}.evidence_current\n"
        "    WHERE verdict = 'revoked_grant'\n"
        ") AS u ON u.tenant = r.tenant AND u.grant_id = r.grant_id\n"
        "WHERE r.event_type = 'grant_revoked' AND $__timeFilter(r.event_time)\n"
        "GROUP BY tenant, grant_id, principal, agent_id, revoked_at, revoked_by\n"
        "ORDER BY revoked_at DESC, tenant, grant_id",
        ("tenant", "grant_id", "principal", "agent_id", "revoked_at", "revoked_by", "uses_after", "first_use_after_s"),
    )
    approvals = Query(
        "SELECT c.tenant AS tenant, c.tool AS tool,\n"
        "       count() AS gated_calls,\n"
        "       countIf(c.verdict = 'in_scope') AS approved,\n"
        "       countIf(c.verdict = 'approval_missing') AS missing,\n"
        "       countIf(c.verdict = 'approval_denied') AS denied_then_executed,\n"
        "       round(quantileIf(0.5)(c.time_to_use_s, c.verdict = 'in_scope'), 3) AS p50_time_to_use_s,\n"
        "       maxIf(c.time_to_use_s, c.verdict = 'in_scope') AS max_time_to_use_s\n"
        "FROM (\n"
        "    SELECT e.tenant AS tenant, e.call_id AS call_id, concat(e.server, '/', e.tool) AS tool,\n"
        "           any(e.verdict) AS verdict,\n"
        "           dateDiff('millisecond', max(a.event_time), any(e.call_time)) / 1000 AS time_to_use_s\n"
        "    FROM {db}.evidence_current AS e\n"
        "    LEFT JOIN (\n"
        "        SELECT tenant, approval_id, principal, agent_id, event_time FROM {db}.approval_events\n"
        "    ) AS a ON a.tenant = e.tenant AND a.approval_id = ifNull(e.approval_id, '')\n"
        "        AND a.principal = ifNull(e.principal, '') AND a.agent_id = ifNull(e.agent_id, '')\n"
        "        AND a.event_time <= e.call_time\n"
        "    WHERE $__timeFilter(e.call_time)\n"
        "      AND (e.verdict IN ('approval_missing', 'approval_denied')\n"
        "           OR (e.verdict = 'in_scope' AND e.approval_id IS NOT NULL))\n"
        "    GROUP BY tenant, call_id, tool\n"
        ") AS c\n"
        "GROUP BY tenant, tool\n"
        "ORDER BY denied_then_executed DESC, missing DESC, gated_calls DESC, tenant, tool\n"
        "SETTINGS join_use_nulls = 1",
        (
            "tenant",
            "tool",
            "gated_calls",
            "approved",
            "missing",
            "denied_then_executed",
            "p50_time_to_use_s",
            "max_time_to_use_s",
        ),
    )
    policy_denials = Query(
        "SELECT tenant, policy_version, count() AS denials, uniqExact(agent_id) AS agents,\n"
        "       countIf(notEmpty(policy_errors)) AS with_errors, max(call_time) AS last_denied\n"
        "FROM (\n"
        "    SELECT tenant, agent_id, call_time, policy_errors,\n"
        "           arrayJoin(if(notEmpty(policy_reasons),\n"
        "                        arrayDistinct(arrayMap(r -> splitByChar('#', r)[1], policy_reasons)),\n"
        "                        if(notEmpty(policy_versions), policy_versions, ['(no policy version)'])\n"
        "           )) AS policy_version\n"
        "    FROM {db}.evidence_current\n"
        "    WHERE $__timeFilter(call_time) AND verdict = 'out_of_policy'\n"
        ")\n"
        "GROUP BY tenant, policy_version\n"
        "ORDER BY denials DESC, tenant, policy_version",
        ("tenant", "policy_version", "denials", "agents", "with_errors", "last_denied"),
    )
    return Dashboard(
        OVERVIEW_UID,
        "scopewatch · SOC overview",
        "Who authorised every agent tool call, and what broke scope: verdicts, findings, grants, revocations.",
        (
            Panel("Calls and violations", "stat", calls, "Tool calls (current verdict) in the range.", 6, 5),
            Panel("Findings", "stat", findings, "Findings raised in the range.", 6, 5, red_from=1),
            Panel(
                "Calls per minute by verdict",
                "timeseries",
                per_minute,
                "Current verdict of every call, by the call's event time.",
                12,
                10,
                unit="short",
            ),
            Panel("Violations by rule and severity", "table", by_rule, "Findings per detection rule.", 12, 8),
            Panel(
                "Top principals by violations",
                "table",
                principals,
                "Calls whose current verdict is not in_scope, by principal. Click a row to drill down.",
                12,
                8,
                links=(TO_DRILL_DOWN,),
            ),
            Panel("Top agents by violations", "table", agents, "Calls not in scope, by agent.", 12, 8),
            Panel(
                "Grants expiring in the next 24 h",
                "table",
                expiring,
                "Current version of each grant, not revoked, expiring within 24 h of the range end.",
                12,
                8,
            ),
            Panel(
                "Revocations and use after revocation",
                "table",
                revocations,
                "Revocations in the range; calls judged revoked_grant on the grant since, and how long after "
                "the revocation the first one came (the use-after-revocation latency).",
                24,
                8,
            ),
            Panel(
                "Approvals by tool",
                "table",
                approvals,
                "Calls that needed a human approval (approval_tools of the matched grant), by tool: approved (an "
                "approval authorised the call), missing (none did), denied_then_executed (a human said no and the "
                "call happened anyway); time to use: from the approval's decision to the call, in seconds.",
                14,
                8,
            ),
            Panel(
                "Policy denials by policy version",
                "table",
                policy_denials,
                "Calls judged out_of_policy, by the policy version that denied them (policy_id@version of the "
                "determining forbid; without one, every version evaluated: no permit, or failed closed). "
                "with_errors: Cedar errors or missing/unparseable versions were recorded.",
                10,
                8,
            ),
        ),
    )


def _delegation() -> Dashboard:
    variables = (
        Variable(
            "tenant",
            "Tenant",
            Query(
                "SELECT DISTINCT tenant FROM {db}.evidence_rows WHERE $__timeFilter(call_time) ORDER BY tenant",
                ("tenant",),
            ),
        ),
        Variable(
            "principal",
            "Principal",
            Query(
                "SELECT DISTINCT principal FROM {db}.evidence_rows\n"
                "WHERE tenant = ${tenant:sqlstring} AND principal IS NOT NULL AND $__timeFilter(call_time)\n"
                "ORDER BY principal",
                ("principal",),
            ),
        ),
        Variable(
            "agent",
            "Agent",
            Query(
                "SELECT DISTINCT agent_id FROM {db}.evidence_rows\n"
                "WHERE tenant = ${tenant:sqlstring} AND principal = ${principal:sqlstring} AND agent_id IS NOT NULL\n"
                "  AND $__timeFilter(call_time)\n"
                "ORDER BY agent_id",
                ("agent_id",),
            ),
        ),
    )
    per_verdict = Query(
        "SELECT $__timeInterval(call_time) AS time, verdict, count() AS calls\n"
        "FROM {db}.evidence_current\n"
        f"WHERE {DELEGATION_FILTER} AND $__timeFilter(call_time)\n"
        "GROUP BY time, verdict\nORDER BY time, verdict",
        ("time", "verdict", "calls"),
        Format.TIME_SERIES,
    )
    timeline = Query(
        "SELECT e.call_time AS call_time, e.call_id AS call_id, concat(e.server, '/', e.tool) AS tool,\n"
        "       e.verdict AS verdict, e.matched_grant_id AS grant_id,\n"
        "       arrayStringConcat(g.tools, ', ') AS grant_tools, g.expires_at AS grant_expires_at,\n"
        "       e.result_status AS result, e.result_duration_ms AS duration_ms,\n"
        "       e.final AS final, e.version AS version, arrayStringConcat(e.reasons, '; ') AS reasons\n"
        "FROM (\n"
        "    SELECT tenant, call_id, server, tool, call_time, verdict, matched_grant_id,\n"
        "           ifNull(matched_grant_id, '') AS grant_key, result_status, result_duration_ms,\n"
        "           final, version, reasons\n"
        "    FROM {db}.evidence_current\n"
        f"    WHERE {DELEGATION_FILTER} AND $__timeFilter(call_time)\n"
        ") AS e\n"
        "ASOF LEFT JOIN (\n"
        "    SELECT tenant, grant_id, event_time, tools, expires_at\n"
        "    FROM {db}.consent_events\n"
        f"    WHERE event_type = 'grant_issued' AND {DELEGATION_FILTER}\n"
        ") AS g ON g.tenant = e.tenant AND g.grant_id = e.grant_key AND g.event_time <= e.call_time\n"
        "ORDER BY call_time DESC, call_id\nLIMIT 500",
        (
            "call_time",
            "call_id",
            "tool",
            "verdict",
            "grant_id",
            "grant_tools",
            "grant_expires_at",
            "result",
            "duration_ms",
            "final",
            "version",
            "reasons",
        ),
    )
    consent = Query(
        "SELECT event_time, event_type, grant_id, arrayStringConcat(tools, ', ') AS tools,\n"
        "       arrayStringConcat(resources, ', ') AS resources, not_before, expires_at,\n"
        "       coalesce(granted_by, revoked_by) AS actor, coalesce(purpose, reason) AS note\n"
        "FROM {db}.consent_events\n"
        f"WHERE {DELEGATION_FILTER} AND event_time <= $__toTime\n"
        "ORDER BY event_time DESC, grant_id\nLIMIT 1 BY event_id\nLIMIT 200",
        ("event_time", "event_type", "grant_id", "tools", "resources", "not_before", "expires_at", "actor", "note"),
    )
    findings = Query(
        "SELECT last_call_time, rule_id, severity, title, summary, call_id, grant_id\n"
        "FROM {db}.findings\n"
        f"WHERE {DELEGATION_FILTER} AND $__timeFilter(last_call_time)\n"
        "ORDER BY last_call_time DESC, rule_id\nLIMIT 1 BY finding_id\nLIMIT 200",
        ("last_call_time", "rule_id", "severity", "title", "summary", "call_id", "grant_id"),
    )
    return Dashboard(
        DELEGATION_UID,
        "scopewatch · delegation drill-down",
        "One delegation (tenant, principal, agent): every call with its verdict, the grant in force and the result.",
        (
            Panel("Calls by verdict", "timeseries", per_verdict, "Calls of the delegation per interval.", 24, 7),
            Panel(
                "Timeline of calls",
                "table",
                timeline,
                "Current verdict of each call; the grant in force is the version of the matched grant at the "
                "call's time; the result comes from tool_results.",
                24,
                12,
            ),
            Panel(
                "Consent history",
                "table",
                consent,
                "Every grant issued or revoked for the delegation.",
                12,
                9,
            ),
            Panel("Findings", "table", findings, "Findings about the delegation in the range.", 12, 9),
        ),
        variables,
    )


def _findings() -> Dashboard:
    totals = Query(
        "SELECT uniqExact(dedup_key) AS open_problems, uniqExact(finding_id) AS findings,\n"
        "       uniqExactIf(dedup_key, severity = 'critical') AS critical_problems\n"
        "FROM {db}.findings\nWHERE $__timeFilter(last_call_time)",
        ("open_problems", "findings", "critical_problems"),
    )
    open_findings = Query(
        "SELECT f.dedup_key AS dedup_key, f.rule_id AS rule_id, f.severity AS severity, f.tenant AS tenant,\n"
        "       f.principal AS principal, f.agent_id AS agent_id, f.findings AS findings,\n"
        "       f.first_seen AS first_seen, f.last_seen AS last_seen, f.summary AS summary,\n"
        "       ifNull(nullIf(p.last_outcome, ''), 'not paged') AS page\n"
        "FROM (\n"
        "    SELECT dedup_key, any(rule_id) AS rule_id, any(severity) AS severity, any(tenant) AS tenant,\n"
        "           argMax(principal, last_call_time) AS principal, argMax(agent_id, last_call_time) AS agent_id,\n"
        "           uniqExact(finding_id) AS findings, min(first_call_time) AS first_seen,\n"
        "           max(last_call_time) AS last_seen, argMax(summary, last_call_time) AS summary\n"
        "    FROM {db}.findings\n"
        "    WHERE $__timeFilter(last_call_time)\n"
        "    GROUP BY dedup_key\n"
        ") AS f\n"
        "LEFT JOIN (\n"
        "    SELECT dedup_key, argMax(outcome, attempted_at) AS last_outcome\n"
        "    FROM {db}.pages\n"
        "    GROUP BY dedup_key\n"
        ") AS p ON p.dedup_key = f.dedup_key\n"
        f"ORDER BY {SEVERITY_ORDER}, last_seen DESC, dedup_key\nLIMIT 200",
        (
            "dedup_key",
            "rule_id",
            "severity",
            "tenant",
            "principal",
            "agent_id",
            "findings",
            "first_seen",
            "last_seen",
            "summary",
            "page",
        ),
    )
    attempts = Query(
        "SELECT $__timeInterval(attempted_at) AS time, outcome, uniqExact(attempt_id) AS attempts\n"
        "FROM {db}.pages\nWHERE $__timeFilter(attempted_at)\n"
        "GROUP BY time, outcome\nORDER BY time, outcome",
        ("time", "outcome", "attempts"),
        Format.TIME_SERIES,
    )
    channels = Query(
        "SELECT channel, route,\n"
        "       uniqExactIf(page_key, outcome = 'delivered') AS delivered,\n"
        "       uniqExactIf(attempt_id, outcome = 'failed') AS failed,\n"
        "       uniqExactIf(attempt_id, outcome = 'retry') AS retries,\n"
        "       uniqExactIf(attempt_id, outcome IN ('suppressed', 'rate_limited')) AS held_back,\n"
        "       round(quantileIf(0.95)(latency_ms, outcome = 'delivered'), 1) AS p95_latency_ms\n"
        "FROM {db}.pages\nWHERE $__timeFilter(attempted_at)\n"
        "GROUP BY channel, route\nORDER BY failed DESC, channel, route",
        ("channel", "route", "delivered", "failed", "retries", "held_back", "p95_latency_ms"),
    )
    failures = Query(
        "SELECT attempted_at, channel, route, rule_id, severity, tenant, dedup_key, attempt, outcome,\n"
        "       http_status, error\n"
        "FROM {db}.pages\nWHERE $__timeFilter(attempted_at) AND outcome IN ('failed', 'retry')\n"
        "ORDER BY attempted_at DESC, attempt_id\nLIMIT 1 BY attempt_id\nLIMIT 200",
        (
            "attempted_at",
            "channel",
            "route",
            "rule_id",
            "severity",
            "tenant",
            "dedup_key",
            "attempt",
            "outcome",
            "http_status",
            "error",
        ),
    )
    return Dashboard(
        FINDINGS_UID,
        "scopewatch · findings and paging",
        "Open findings grouped by dedup key (the paging unit), and every page delivery attempt.",
        (
            Panel("Open problems", "stat", totals, "Distinct dedup keys with findings in the range.", 8, 5, red_from=1),
            Panel("Page attempts by outcome", "timeseries", attempts, "Every delivery attempt.", 16, 5),
            Panel(
                "Open findings",
                "table",
                open_findings,
                "Findings in the range by dedup key, most severe first, with the outcome of the last page. "
                "scopewatch keeps no acknowledgement state: open means seen in the range.",
                24,
                10,
                links=(TO_DRILL_DOWN,),
            ),
            Panel("Deliveries by channel", "table", channels, "Per channel and route (never the secret).", 10, 8),
            Panel("Page failures", "table", failures, "Failed and retried attempts, newest first.", 14, 8),
        ),
    )


_RAW_TABLES: Final = (
    ("tool_calls", "event_time"),
    ("tool_results", "event_time"),
    ("identity_events", "event_time"),
    ("consent_events", "event_time"),
    ("policy_events", "event_time"),
    ("approval_events", "event_time"),
    ("evidence", "decided_at"),
)
"""Every table the sink writes raw events to (``stream_jobs.tables.RAW_TABLES``; a test keeps them
equal), plus evidence (read from ``evidence_rows``: the ``evidence`` view would join the list tables)."""
_CHAINED_TABLES: Final = tuple(t for t, _ in _RAW_TABLES if t != "evidence")


def _pipeline() -> Dashboard:
    dead_over_time = Query(
        "SELECT $__timeInterval(failed_at) AS time, stage, uniqExact(dead_letter_id) AS dead_letters\n"
        "FROM {db}.dead_letters\nWHERE $__timeFilter(failed_at)\n"
        "GROUP BY time, stage\nORDER BY time, stage",
        ("time", "stage", "dead_letters"),
        Format.TIME_SERIES,
    )
    dead_by_reason = Query(
        "SELECT source_topic, stage, substring(reason, 1, 160) AS reason_start,\n"
        "       uniqExact(dead_letter_id) AS dead_letters, max(failed_at) AS last_failed_at\n"
        "FROM {db}.dead_letters\nWHERE $__timeFilter(failed_at)\n"
        "GROUP BY source_topic, stage, reason_start\nORDER BY dead_letters DESC, source_topic, stage\nLIMIT 50",
        ("source_topic", "stage", "reason_start", "dead_letters", "last_failed_at"),
    )
    union = "\n    UNION ALL\n".join(
        f"    SELECT '{table}' AS source, _ingested_at,\n"
        f"           dateDiff('millisecond', {column}, _ingested_at) / 1000 AS delay_s\n"
        f"    FROM {{db}}.{'evidence_rows' if table == 'evidence' else table} WHERE $__timeFilter(_ingested_at)"
        for table, column in _RAW_TABLES
    )
    delay = Query(
        "SELECT $__timeInterval(_ingested_at) AS time, source, quantile(0.95)(delay_s) AS p95_delay_s\n"
        f"FROM (\n{union}\n)\nGROUP BY time, source\nORDER BY time, source",
        ("time", "source", "p95_delay_s"),
        Format.TIME_SERIES,
    )
    finality = Query(
        "SELECT (SELECT countIf(NOT final) FROM {db}.evidence_current WHERE $__timeFilter(call_time))\n"
        "           AS provisional_calls,\n"
        "       uniqExactIf(evidence_id, late) AS late_amendments,\n"
        "       round(quantileIf(0.95)(dateDiff('millisecond', call_time, decided_at), final AND NOT late) / 1000, 2)\n"
        "           AS p95_time_to_final_s\n"
        "FROM {db}.evidence_rows\nWHERE $__timeFilter(call_time)",
        ("provisional_calls", "late_amendments", "p95_time_to_final_s"),
    )
    chained = "\n    UNION ALL\n".join(
        f"    SELECT collector_id, collector_epoch, collector_seq, event_time FROM {{db}}.{table}\n"
        "    WHERE collector_id != '' AND $__timeFilter(event_time)"
        for table in _CHAINED_TABLES
    )
    collectors = Query(
        "SELECT collector_id, collector_epoch AS epoch, uniqExact(collector_seq) AS events,\n"
        "       max(collector_seq) - min(collector_seq) + 1 - uniqExact(collector_seq) AS missing_seq,\n"
        "       max(event_time) AS last_event_time\n"
        f"FROM (\n{chained}\n)\n"
        "GROUP BY collector_id, epoch\nORDER BY missing_seq DESC, last_event_time DESC, collector_id\nLIMIT 100",
        ("collector_id", "epoch", "events", "missing_seq", "last_event_time"),
    )
    lag = Query(
        _last_per_instance("label AS topic", "component = 'sink' AND metric = 'consumer_lag'", "topic", "consumer_lag"),
        ("time", "topic", "consumer_lag"),
        Format.TIME_SERIES,
    )
    sink_retries = Query(
        _last_per_instance(
            "metric", "component = 'sink' AND metric IN ('retries', 'paused') AND label = ''", "metric", "value"
        ),
        ("time", "metric", "value"),
        Format.TIME_SERIES,
    )
    worker = Query(
        _last_per_instance(
            "metric",
            "component = 'worker' AND metric IN ('dead_letters', 'open_calls_stage1', 'open_calls_stage2')",
            "metric",
            "value",
        ),
        ("time", "metric", "value"),
        Format.TIME_SERIES,
    )
    spool_depth = Query(
        "SELECT $__timeInterval(at) AS time, instance AS spool, max(value) AS pending_events\n"
        "FROM {db}.pipeline_metrics\n"
        "WHERE component = 'spool' AND metric = 'pending_events' AND $__timeFilter(at)\n"
        "GROUP BY time, spool\nORDER BY time, spool",
        ("time", "spool", "pending_events"),
        Format.TIME_SERIES,
    )
    spools_now = Query(
        "SELECT instance AS spool, max(at) AS measured_at,\n"
        "       argMaxIf(value, at, metric = 'pending_events') AS pending_events,\n"
        "       argMaxIf(value, at, metric = 'pending_bytes') AS pending_bytes,\n"
        "       argMaxIf(value, at, metric = 'problems') AS problems,\n"
        "       argMaxIf(value, at, metric = 'live_writers') AS live_writers\n"
        "FROM {db}.pipeline_metrics\n"
        "WHERE component = 'spool' AND $__timeFilter(at)\n"
        "GROUP BY spool\nORDER BY pending_events DESC, spool\nLIMIT 50",
        ("spool", "measured_at", "pending_events", "pending_bytes", "problems", "live_writers"),
    )
    return Dashboard(
        PIPELINE_UID,
        "scopewatch · pipeline health",
        "Dead letters, ingestion delay, verdict finality, collector sequence gaps, consumer lag, sink retries, "
        "worker state and collector spool depth.",
        (
            Panel("Dead letters by stage", "timeseries", dead_over_time, "Messages the pipeline set aside.", 12, 8),
            Panel("Dead letters by topic and reason", "table", dead_by_reason, "", 12, 8, red_from=1),
            Panel(
                "Ingestion delay p95 (event time → ClickHouse)",
                "timeseries",
                delay,
                "From the event's source time (the decision time for evidence) to the sink's insert: "
                "collector, Kafka and sink delay together.",
                12,
                8,
                unit="s",
            ),
            Panel(
                "Verdict finality",
                "stat",
                finality,
                "Calls still provisional, late amendments, and p95 time from call to final verdict (grace included).",
                12,
                8,
            ),
            Panel(
                "Collectors: sequence gaps",
                "table",
                collectors,
                "Per collector chain (id, epoch) in the range: events seen and sequence numbers missing between "
                "the first and the last (lost events; `scopewatch verify` names them).",
                12,
                8,
            ),
            Panel(
                "Consumer lag by topic (sink)",
                "timeseries",
                lag,
                "Messages on each topic the sink has not committed yet (high watermark minus committed offset), "
                "summed over sink instances. " + METRICS_NOTE,
                12,
                8,
                unit="short",
            ),
            Panel(
                "Sink retries and paused",
                "timeseries",
                sink_retries,
                "retries: ClickHouse writes the sink retried (cumulative since the sink started); paused: 1 while "
                "the sink holds its partitions because ClickHouse refuses writes. " + METRICS_NOTE,
                12,
                8,
                unit="short",
            ),
            Panel(
                "Worker dead letters and open calls",
                "timeseries",
                worker,
                "Dead letters the decision job wrote (cumulative since each worker started), and calls waiting "
                "for facts (stage 1) or a final verdict (stage 2), summed over workers. " + METRICS_NOTE,
                12,
                8,
                unit="short",
            ),
            Panel(
                "Collector spool depth",
                "timeseries",
                spool_depth,
                "Events (and loss records) the collectors on the sink's host wrote to their spool and Kafka has "
                "not acknowledged yet, per spool directory. " + METRICS_NOTE,
                12,
                8,
                unit="short",
            ),
            Panel(
                "Collector spools",
                "table",
                spools_now,
                "Latest measure of each spool: pending events and bytes, damaged records found (problems) and "
                "collectors writing to it.",
                12,
                8,
            ),
        ),
    )


def _last_per_instance(series: str, where: str, group: str, value: str) -> str:
    """Per interval: each instance's last value of a ``pipeline_metrics`` series, summed over instances."""
    return (
        f"SELECT time, {group}, sum(last_value) AS {value}\n"
        "FROM (\n"
        f"    SELECT $__timeInterval(at) AS time, instance, {series}, argMax(value, at) AS last_value\n"
        "    FROM {db}.pipeline_metrics\n"
        f"    WHERE {where} AND $__timeFilter(at)\n"
        f"    GROUP BY time, instance, {group}\n"
        ")\n"
        f"GROUP BY time, {group}\nORDER BY time, {group}"
    )


def check_database(database: str) -> None:
    if not _IDENT.match(database):
        raise ValueError(f"invalid database name {database!r}")


def _bind(query: Query, database: str) -> Query:
    return replace(query, sql=query.sql.replace("{db}", database))


def dashboards(database: str) -> list[Dashboard]:
    """The four dashboards, their SQL reading ``database``."""
    check_database(database)
    return [
        replace(
            board,
            panels=tuple(p if p.query is None else replace(p, query=_bind(p.query, database)) for p in board.panels),
            variables=tuple(replace(v, query=_bind(v.query, database)) for v in board.variables),
        )
        for board in (_overview(), _delegation(), _findings(), _pipeline())
    ]
