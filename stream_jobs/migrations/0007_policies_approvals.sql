-- Issue 18: Cedar policy versions and human approval decisions as raw events (one row per event,
-- Kafka provenance and _record_hash like the other raw tables), the grant fields that refer to them,
-- and the evidence of each verdict's policy decision and approval. Retention: no TTL (evidence of
-- record). Rows written before this migration read as: no policies, no approval tools, no approval,
-- no policy decision, history_complete = true (what the pipeline judged then).

CREATE TABLE IF NOT EXISTS {db}.policy_events
(
    event_id        String,
    event_type      LowCardinality(String),
    event_time      DateTime64(3, 'UTC'),
    tenant          LowCardinality(String),
    policy_id       String,
    version         String COMMENT 'e.g. the git commit of the policy folder',
    cedar           String COMMENT 'the Cedar policy set, as published',
    labels          String COMMENT 'canonical JSON: label -> glob patterns over resources',
    published_by    String,
    collector_id    String,
    collector_epoch Int64,
    collector_seq   Int64,
    collector_prev_hash Nullable(String),
    extra           String,
    _topic          LowCardinality(String),
    _partition      UInt32,
    _offset         UInt64,
    _ingested_at    DateTime64(3, 'UTC'),
    _record_hash    String DEFAULT ''
)
ENGINE = ReplacingMergeTree(_ingested_at)
PARTITION BY toYYYYMM(event_time)
ORDER BY (tenant, policy_id, event_time, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS {db}.approval_events
(
    event_id         String,
    event_type       LowCardinality(String),
    event_time       DateTime64(3, 'UTC'),
    tenant           LowCardinality(String),
    approval_id      String,
    principal        String,
    agent_id         String,
    tool             LowCardinality(String) COMMENT 'exact server/tool',
    arguments_digest Nullable(String) COMMENT 'SHA-256 of the RFC 8785 JSON of the arguments; NULL = any arguments',
    decision         LowCardinality(String) COMMENT 'approve or deny',
    approver         String,
    expires_at       Nullable(DateTime64(3, 'UTC')),
    reason           String,
    collector_id     String,
    collector_epoch  Int64,
    collector_seq    Int64,
    collector_prev_hash Nullable(String),
    extra            String,
    _topic           LowCardinality(String),
    _partition       UInt32,
    _offset          UInt64,
    _ingested_at     DateTime64(3, 'UTC'),
    _record_hash     String DEFAULT ''
)
ENGINE = ReplacingMergeTree(_ingested_at)
PARTITION BY toYYYYMM(event_time)
ORDER BY (tenant, principal, agent_id, event_time, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

ALTER TABLE {db}.consent_events ADD COLUMN IF NOT EXISTS policies Array(String) DEFAULT [] COMMENT 'policy ids a grant is conditioned on' AFTER reason;

ALTER TABLE {db}.consent_events ADD COLUMN IF NOT EXISTS approval_tools Array(String) DEFAULT [] COMMENT 'server/tool globs that need a human approval under the grant' AFTER policies;

ALTER TABLE {db}.evidence ADD COLUMN IF NOT EXISTS approval_id Nullable(String) COMMENT 'the approval that authorised (in_scope) or denied (approval_denied) the call' AFTER trigger;

ALTER TABLE {db}.evidence ADD COLUMN IF NOT EXISTS approver Nullable(String) AFTER approval_id;

ALTER TABLE {db}.evidence ADD COLUMN IF NOT EXISTS policy_versions Array(String) DEFAULT [] COMMENT 'policy_id@version of each policy Cedar evaluated' AFTER approver;

ALTER TABLE {db}.evidence ADD COLUMN IF NOT EXISTS policy_decision LowCardinality(Nullable(String)) COMMENT 'Cedar''s Allow/Deny; NULL when no policy applied' AFTER policy_versions;

ALTER TABLE {db}.evidence ADD COLUMN IF NOT EXISTS policy_reasons Array(String) DEFAULT [] COMMENT '@id of the policies that determined the decision' AFTER policy_decision;

ALTER TABLE {db}.evidence ADD COLUMN IF NOT EXISTS policy_errors Array(String) DEFAULT [] COMMENT 'Cedar errors, missing or unparseable policy versions' AFTER policy_reasons;

ALTER TABLE {db}.evidence ADD COLUMN IF NOT EXISTS history_complete Bool DEFAULT true COMMENT 'false: judged on history compacted past the call (DESIGN Retention): re-judge with replay/verify' AFTER policy_errors;

CREATE OR REPLACE VIEW {db}.evidence_current AS
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
    r.error AS result_error,
    e.fact_ids AS fact_ids,
    e.fact_hashes AS fact_hashes,
    e.kind AS kind,
    e.trigger AS trigger,
    e.approval_id AS approval_id,
    e.approver AS approver,
    e.policy_versions AS policy_versions,
    e.policy_decision AS policy_decision,
    e.policy_reasons AS policy_reasons,
    e.policy_errors AS policy_errors,
    e.history_complete AS history_complete
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
