-- When a finding was raised, and each raw event's own chain hash (computed by the sink from the
-- decoded event: `scopewatch verify` compares it with the event re-derived from the row, so an
-- edit is found even on the last record of a collector's chain).

ALTER TABLE {db}.findings ADD COLUMN IF NOT EXISTS detected_at DateTime64(3, 'UTC') DEFAULT _ingested_at;

ALTER TABLE {db}.tool_calls ADD COLUMN IF NOT EXISTS _record_hash String DEFAULT '';

ALTER TABLE {db}.tool_results ADD COLUMN IF NOT EXISTS _record_hash String DEFAULT '';

ALTER TABLE {db}.identity_events ADD COLUMN IF NOT EXISTS _record_hash String DEFAULT '';

ALTER TABLE {db}.consent_events ADD COLUMN IF NOT EXISTS _record_hash String DEFAULT '';
