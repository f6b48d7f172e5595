-- Raw events as they arrived on Kafka, plus verdicts (every version) and dead letters.
-- Every row keeps its Kafka provenance (_topic, _partition, _offset) so any row can be traced
-- back to the message it came from. Timestamps are UTC with millisecond precision.
-- Retention: no TTL by default (evidence of record); see README "Data retention".

CREATE TABLE IF NOT EXISTS {db}.tool_calls
(
    event_id        String,
    event_time      DateTime64(3, 'UTC'),
    tenant          LowCardinality(String),
    call_id         String,
    session_id      String,
    server          LowCardinality(String),
    tool            LowCardinality(String),
    arguments       String COMMENT 'canonical JSON, redacted by the collector',
    resources       Array(String),
    transport       LowCardinality(String),
    attested        Nullable(String) COMMENT 'canonical JSON of verified claims',
    claimed         String COMMENT 'canonical JSON of untrusted identity hints',
    tool_digest     Nullable(String),
    collector_id    String,
    collector_epoch Int64,
    collector_seq   Int64,
    collector_prev_hash Nullable(String),
    extra           String COMMENT 'canonical JSON of fields outside the contract',
    _topic          LowCardinality(String),
    _partition      UInt32,
    _offset         UInt64,
    _ingested_at    DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(_ingested_at)
PARTITION BY toYYYYMM(event_time)
ORDER BY (tenant, session_id, event_time, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS {db}.tool_results
(
    event_id        String,
    event_time      DateTime64(3, 'UTC'),
    tenant          LowCardinality(String),
    call_id         String,
    session_id      String,
    status          LowCardinality(String),
    duration_ms     Float64,
    error           Nullable(String),
    result_digest   Nullable(String),
    collector_id    String,
    collector_epoch Int64,
    collector_seq   Int64,
    collector_prev_hash Nullable(String),
    extra           String,
    _topic          LowCardinality(String),
    _partition      UInt32,
    _offset         UInt64,
    _ingested_at    DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(_ingested_at)
PARTITION BY toYYYYMM(event_time)
ORDER BY (tenant, session_id, event_time, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS {db}.identity_events
(
    event_id        String,
    event_type      LowCardinality(String),
    event_time      DateTime64(3, 'UTC'),
    tenant          LowCardinality(String),
    session_id      String,
    principal       Nullable(String),
    agent_id        Nullable(String),
    valid_from      Nullable(DateTime64(3, 'UTC')),
    valid_until     Nullable(DateTime64(3, 'UTC')),
    auth            String,
    collector_id    String,
    collector_epoch Int64,
    collector_seq   Int64,
    collector_prev_hash Nullable(String),
    extra           String,
    _topic          LowCardinality(String),
    _partition      UInt32,
    _offset         UInt64,
    _ingested_at    DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(_ingested_at)
PARTITION BY toYYYYMM(event_time)
ORDER BY (tenant, session_id, event_time, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS {db}.consent_events
(
    event_id        String,
    event_type      LowCardinality(String),
    event_time      DateTime64(3, 'UTC'),
    tenant          LowCardinality(String),
    grant_id        String,
    principal       String,
    agent_id        String,
    tools           Array(String),
    resources       Array(String),
    scopes          Array(String),
    not_before      Nullable(DateTime64(3, 'UTC')),
    expires_at      Nullable(DateTime64(3, 'UTC')),
    granted_by      Nullable(String),
    purpose         Nullable(String),
    parent_grant_id Nullable(String),
    revoked_by      Nullable(String),
    reason          Nullable(String),
    collector_id    String,
    collector_epoch Int64,
    collector_seq   Int64,
    collector_prev_hash Nullable(String),
    extra           String,
    _topic          LowCardinality(String),
    _partition      UInt32,
    _offset         UInt64,
    _ingested_at    DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(_ingested_at)
PARTITION BY toYYYYMM(event_time)
ORDER BY (tenant, principal, agent_id, event_time, event_id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS {db}.evidence
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
    reasons          Array(String),
    version          UInt32,
    final            Bool,
    late             Bool,
    decided_at       DateTime64(3, 'UTC'),
    facts            String COMMENT 'canonical JSON of the facts the verdict used',
    _topic           LowCardinality(String),
    _partition       UInt32,
    _offset          UInt64,
    _ingested_at     DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(_ingested_at)
PARTITION BY toYYYYMM(call_time)
ORDER BY (tenant, call_id, version, evidence_id)
SETTINGS non_replicated_deduplication_window = 10000;

CREATE TABLE IF NOT EXISTS {db}.dead_letters
(
    dead_letter_id   String,
    source_topic     LowCardinality(String),
    source_partition UInt32,
    source_offset    UInt64,
    key              Nullable(String),
    reason           String,
    stage            LowCardinality(String),
    payload_b64      String,
    failed_at        DateTime64(3, 'UTC'),
    _topic           LowCardinality(String),
    _partition       UInt32,
    _offset          UInt64,
    _ingested_at     DateTime64(3, 'UTC')
)
ENGINE = ReplacingMergeTree(_ingested_at)
PARTITION BY toYYYYMM(failed_at)
ORDER BY (source_topic, source_partition, source_offset, stage, dead_letter_id)
SETTINGS non_replicated_deduplication_window = 10000;
