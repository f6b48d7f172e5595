-- Findings, page deliveries, and the one-current-verdict-per-call view.
-- Same DDL on chDB and on a ClickHouse server. Retention: no TTL (evidence of record); see README "Data".

CREATE TABLE IF NOT EXISTS {db}.findings
(
    finding_id      String,
    dedup_key       String,
    rule_id         LowCardinality(String),
    rule_version    UInt32,
    severity        LowCardinality(String),
    title           String,
    summary         String,
    tenant          LowCardinality(String),
    principal       Nullable(String),
    agent_id        Nullable(String),
    call_id         String,
    call_ids        Array(String),
    session_id      String,
    grant_id        Nullable(String),
    forensic_query  LowCardinality(String),
    first_call_time DateTime64(3, 'UTC'),
    last_call_time  DateTime64(3, 'UTC'),
    details         String COMMENT 'canonical JSON of rule-specific details',
    _topic          LowCardinality(String),
    _partition      UInt32,
    _offset         UInt64,
    _ingested_at    DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(_ingested_at)
PARTITION BY toYYYYMM(last_call_time)
ORDER BY (tenant, rule_id, dedup_key, last_call_time, finding_id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS {db}.pages
(
    attempt_id      String COMMENT 'one row per delivery attempt',
    page_key        String COMMENT 'idempotency key of the page (dedup key + window)',
    dedup_key       String,
    finding_id      String,
    rule_id         LowCardinality(String),
    severity        LowCardinality(String),
    tenant          LowCardinality(String),
    channel         LowCardinality(String) COMMENT 'pagerduty, slack or webhook',
    route           LowCardinality(String) COMMENT 'the configured route name, never its secret',
    attempt         UInt32,
    outcome         LowCardinality(String) COMMENT 'delivered, retry, failed, suppressed, rate_limited',
    http_status     Nullable(UInt16),
    error           Nullable(String),
    findings_grouped UInt32,
    attempted_at    DateTime64(3, 'UTC'),
    latency_ms      Float64,
    _ingested_at    DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(_ingested_at)
PARTITION BY toYYYYMM(attempted_at)
ORDER BY (tenant, dedup_key, attempted_at, attempt_id)
SETTINGS non_replicated_deduplication_window = 10000;

-- Exactly one row per call: its latest verdict version (however often the sink retried or the
-- job re-sent a version), with the call's result when there is one.
CREATE VIEW IF NOT EXISTS {db}.evidence_current AS
SELECT
    e.tenant AS tenant,
    e.call_id AS call_id,
    e.session_id AS session_id,
    e.principal AS principal,
    e.agent_id AS agent_id,
    e.server AS server,
    e.tool AS tool,
    e.call_time AS call_time,
    e.verdict AS verdict,
    e.matched_grant_id AS matched_grant_id,
    e.reasons AS reasons,
    e.version AS version,
    e.final AS final,
    e.late AS late,
    e.decided_at AS decided_at,
    e.facts AS facts,
    e.evidence_id AS evidence_id,
    r.status AS result_status,
    r.duration_ms AS result_duration_ms,
    r.error AS result_error
FROM
(
    SELECT *
    FROM {db}.evidence
    ORDER BY tenant, call_id, version DESC, _ingested_at DESC
    LIMIT 1 BY tenant, call_id
) AS e
LEFT JOIN
(
    SELECT tenant, call_id, status, duration_ms, error
    FROM {db}.tool_results
    ORDER BY tenant, call_id, _ingested_at DESC
    LIMIT 1 BY tenant, call_id
) AS r ON r.tenant = e.tenant AND r.call_id = e.call_id
SETTINGS join_use_nulls = 1;
