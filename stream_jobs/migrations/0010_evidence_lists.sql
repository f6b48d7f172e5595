-- Evidence's reason texts and fact references stored once per distinct list (issue 16). They were 72 %
-- of an evidence row's raw bytes, and chDB's insert and every merge level cost about 1 ns per raw byte
-- (bench/HISTORY.md, h16c); they repeat (a call's versions, a session's calls under the same grants).
-- evidence_rows is evidence with a 16-byte key per list group instead of the lists: reason_key for
-- reasons, fact_key for (fact_ids, fact_hashes). The key is the first 16 bytes of SHA-256 over the
-- group's RowBinary bytes (stream_jobs/evidence_lists.py; the sink's C transcoder computes the same),
-- collision resistant because reasons quote text an agent chose. evidence_reason_lists and
-- evidence_fact_lists hold each distinct list once (ReplacingMergeTree by id: a list written twice is
-- the same row; readers use them as sets). The sink writes a batch's lists before the rows that
-- reference them, so no row is ever visible without its lists.
-- `evidence` becomes a view with the same columns in the same order (dashboards and the demo read it),
-- every stored row as before. ClickHouse ignores FINAL on a view (`SELECT ... FROM evidence FINAL` would
-- silently not deduplicate), so evidence_final is the same view over evidence_rows FINAL: what verify and
-- the forensic queries read. evidence_current reads evidence_rows and joins the lists of the current
-- versions only.
-- Existing rows are copied with their keys computed here, every stored row as it was (optimize_on_insert = 0:
-- duplicates not yet merged away stay until a merge, as before); the old table is dropped after the copy.

CREATE TABLE IF NOT EXISTS {db}.evidence_reason_lists
(
    id      FixedString(16) COMMENT 'first 16 bytes of SHA-256 of the list''s RowBinary bytes',
    reasons Array(String)
)
ENGINE = ReplacingMergeTree
ORDER BY id
SETTINGS non_replicated_deduplication_window = 10000, min_parts_to_merge_at_once = 10;

CREATE TABLE IF NOT EXISTS {db}.evidence_fact_lists
(
    id          FixedString(16) COMMENT 'first 16 bytes of SHA-256 of (fact_ids, fact_hashes) as RowBinary',
    fact_ids    Array(String),
    fact_hashes Array(String)
)
ENGINE = ReplacingMergeTree
ORDER BY id
SETTINGS non_replicated_deduplication_window = 10000, min_parts_to_merge_at_once = 10;

CREATE TABLE IF NOT EXISTS {db}.evidence_rows
(
    evidence_id      String,
    call_id          String,
    tenant           LowCardinality(String),
    session_id       String,
    principal        Nullable(String),
    agent_id         Nullable(String),
    server           LowCardinality(String),
    tool             LowCardinality(String),
    call_time        DateTime64(3, 'UTC'),
    verdict          LowCardinality(String),
    matched_grant_id Nullable(String),
    reason_key       FixedString(16) COMMENT 'id of the reasons in evidence_reason_lists',
    version          UInt32,
    final            Bool,
    late             Bool,
    decided_at       DateTime64(3, 'UTC'),
    facts            String COMMENT 'canonical JSON of the facts the verdict used',
    fact_key         FixedString(16) COMMENT 'id of (fact_ids, fact_hashes) in evidence_fact_lists',
    kind             LowCardinality(String) DEFAULT '' COMMENT 'provisional, final or amendment',
    trigger          LowCardinality(String) DEFAULT '' COMMENT 'call, update, fact or deadline',
    approval_id      Nullable(String) COMMENT 'the approval that authorised (in_scope) or denied (approval_denied) the call',
    approver         Nullable(String),
    policy_versions  Array(String) DEFAULT [] COMMENT 'policy_id@version of each policy Cedar evaluated',
    policy_decision  LowCardinality(Nullable(String)) COMMENT 'Cedar''s Allow/Deny; NULL when no policy applied',
    policy_reasons   Array(String) DEFAULT [] COMMENT '@id of the policies that determined the decision',
    policy_errors    Array(String) DEFAULT [] COMMENT 'Cedar errors, missing or unparseable policy versions',
    history_complete Bool DEFAULT true COMMENT 'false: judged on history compacted past the call (DESIGN Retention): re-judge with replay/verify',
    _topic           LowCardinality(String),
    _partition       UInt32,
    _offset          UInt64,
    _ingested_at     DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(_ingested_at)
PARTITION BY toYYYYMM(call_time)
ORDER BY (tenant, call_id, version, evidence_id)
SETTINGS non_replicated_deduplication_window = 10000, min_bytes_for_wide_part = 17179869184, min_parts_to_merge_at_once = 10;

DROP VIEW IF EXISTS {db}.evidence_current;

RENAME TABLE {db}.evidence TO {db}.evidence_before_lists;

INSERT INTO {db}.evidence_reason_lists (id, reasons)
SELECT toFixedString(substring(SHA256(formatRowNoNewline('RowBinary', reasons)), 1, 16), 16) AS id, reasons
FROM {db}.evidence_before_lists
LIMIT 1 BY id;

INSERT INTO {db}.evidence_fact_lists (id, fact_ids, fact_hashes)
SELECT toFixedString(substring(SHA256(formatRowNoNewline('RowBinary', fact_ids, fact_hashes)), 1, 16), 16) AS id, fact_ids, fact_hashes
FROM {db}.evidence_before_lists
LIMIT 1 BY id;

INSERT INTO {db}.evidence_rows
SELECT
    evidence_id, call_id, tenant, session_id, principal, agent_id, server, tool, call_time, verdict, matched_grant_id,
    toFixedString(substring(SHA256(formatRowNoNewline('RowBinary', reasons)), 1, 16), 16),
    version, final, late, decided_at, facts,
    toFixedString(substring(SHA256(formatRowNoNewline('RowBinary', fact_ids, fact_hashes)), 1, 16), 16),
    kind, trigger, approval_id, approver, policy_versions, policy_decision, policy_reasons, policy_errors,
    history_complete, _topic, _partition, _offset, _ingested_at
FROM {db}.evidence_before_lists
SETTINGS optimize_on_insert = 0;

DROP TABLE {db}.evidence_before_lists;

CREATE VIEW {db}.evidence AS
SELECT
    e.evidence_id AS evidence_id,
    e.call_id AS call_id,
    e.tenant AS tenant,
    e.session_id AS session_id,
    e.principal AS principal,
    e.agent_id AS agent_id,
    e.server AS server,
    e.tool AS tool,
    e.call_time AS call_time,
    e.verdict AS verdict,
    e.matched_grant_id AS matched_grant_id,
    rl.reasons AS reasons,
    e.version AS version,
    e.final AS final,
    e.late AS late,
    e.decided_at AS decided_at,
    e.facts AS facts,
    fl.fact_ids AS fact_ids,
    fl.fact_hashes AS fact_hashes,
    e.kind AS kind,
    e.trigger AS trigger,
    e.approval_id AS approval_id,
    e.approver AS approver,
    e.policy_versions AS policy_versions,
    e.policy_decision AS policy_decision,
    e.policy_reasons AS policy_reasons,
    e.policy_errors AS policy_errors,
    e.history_complete AS history_complete,
    e._topic AS _topic,
    e._partition AS _partition,
    e._offset AS _offset,
    e._ingested_at AS _ingested_at
FROM {db}.evidence_rows AS e
ANY LEFT JOIN {db}.evidence_reason_lists AS rl ON rl.id = e.reason_key
ANY LEFT JOIN {db}.evidence_fact_lists AS fl ON fl.id = e.fact_key;

CREATE VIEW {db}.evidence_final AS
SELECT
    e.evidence_id AS evidence_id,
    e.call_id AS call_id,
    e.tenant AS tenant,
    e.session_id AS session_id,
    e.principal AS principal,
    e.agent_id AS agent_id,
    e.server AS server,
    e.tool AS tool,
    e.call_time AS call_time,
    e.verdict AS verdict,
    e.matched_grant_id AS matched_grant_id,
    rl.reasons AS reasons,
    e.version AS version,
    e.final AS final,
    e.late AS late,
    e.decided_at AS decided_at,
    e.facts AS facts,
    fl.fact_ids AS fact_ids,
    fl.fact_hashes AS fact_hashes,
    e.kind AS kind,
    e.trigger AS trigger,
    e.approval_id AS approval_id,
    e.approver AS approver,
    e.policy_versions AS policy_versions,
    e.policy_decision AS policy_decision,
    e.policy_reasons AS policy_reasons,
    e.policy_errors AS policy_errors,
    e.history_complete AS history_complete,
    e._topic AS _topic,
    e._partition AS _partition,
    e._offset AS _offset,
    e._ingested_at AS _ingested_at
FROM {db}.evidence_rows AS e FINAL
ANY LEFT JOIN {db}.evidence_reason_lists AS rl ON rl.id = e.reason_key
ANY LEFT JOIN {db}.evidence_fact_lists AS fl ON fl.id = e.fact_key;

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
    rl.reasons AS reasons,
    e.version AS version,
    e.final AS final,
    e.late AS late,
    e.decided_at AS decided_at,
    e.facts AS facts,
    e.evidence_id AS evidence_id,
    r.status AS result_status,
    r.duration_ms AS result_duration_ms,
    r.error AS result_error,
    fl.fact_ids AS fact_ids,
    fl.fact_hashes AS fact_hashes,
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
    FROM {db}.evidence_rows
    ORDER BY tenant, call_id, version DESC, _ingested_at DESC
    LIMIT 1 BY tenant, call_id
) AS e
ANY LEFT JOIN {db}.evidence_reason_lists AS rl ON rl.id = e.reason_key
ANY LEFT JOIN {db}.evidence_fact_lists AS fl ON fl.id = e.fact_key
LEFT JOIN
(
    SELECT tenant, call_id, status, duration_ms, error
    FROM {db}.tool_results
    ORDER BY tenant, call_id, _ingested_at DESC
    LIMIT 1 BY tenant, call_id
) AS r ON r.tenant = e.tenant AND r.call_id = e.call_id
SETTINGS join_use_nulls = 1;
