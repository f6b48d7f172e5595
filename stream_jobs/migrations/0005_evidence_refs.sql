-- Evidence references the facts a verdict rests on instead of copying them (issue 16): the event ids
-- of the identity and consent facts (rows of identity_events / consent_events) and each one's record
-- hash, equal to that row's _record_hash (`scopewatch verify` checks both). New rows write facts = '{}';
-- rows written before keep their facts JSON and have empty fact_ids/fact_hashes, kind and trigger.

ALTER TABLE {db}.evidence ADD COLUMN IF NOT EXISTS fact_ids Array(String) DEFAULT [] COMMENT 'event ids of the facts the verdict rests on' AFTER facts;

ALTER TABLE {db}.evidence ADD COLUMN IF NOT EXISTS fact_hashes Array(String) DEFAULT [] COMMENT 'record hash of each fact (its raw row''s _record_hash)' AFTER fact_ids;

ALTER TABLE {db}.evidence ADD COLUMN IF NOT EXISTS kind LowCardinality(String) DEFAULT '' COMMENT 'provisional, final or amendment' AFTER fact_hashes;

ALTER TABLE {db}.evidence ADD COLUMN IF NOT EXISTS trigger LowCardinality(String) DEFAULT '' COMMENT 'call, update, fact or deadline' AFTER kind;

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
    e.trigger AS trigger
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
