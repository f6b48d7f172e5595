-- Pipeline health metrics: snapshots the sink appends every few seconds (stream_jobs/metrics.py):
-- its own counters (consumer lag per topic, retries, rows, paused), the workers' and the pager's
-- counters from their run/*.json stats files, and the collectors' spool depth.
-- Same DDL on chDB and on a ClickHouse server.
-- Retention: TTL 30 days. Metrics are not evidence (the evidence tables have no TTL); they only
-- explain how the pipeline was doing, and a snapshot every 10 s per instance adds up.
-- Gauges are stored as they are; counters are cumulative since their process started (a restart
-- resets them: use the last value per instance, or a non-negative difference). Each snapshot is
-- inserted with its own deduplication token (metrics|<instance>|<epoch ms>): a retried insert lands once.

CREATE TABLE IF NOT EXISTS {db}.pipeline_metrics
(
    at        DateTime64(3, 'UTC') COMMENT 'when the snapshot was taken',
    component LowCardinality(String) COMMENT 'sink, worker, pager or spool',
    instance  String COMMENT 'host-pid of the process, the worker stats file name, or the spool directory',
    metric    LowCardinality(String) COMMENT 'consumer_lag, retries, dead_letters, open_calls_stage1, pending_events, ...',
    label     String COMMENT 'topic for consumer_lag, empty when the metric has none',
    value     Float64
)
ENGINE = MergeTree
PARTITION BY toYYYYMM(at)
ORDER BY (component, metric, label, at)
TTL toDateTime(at) + INTERVAL 30 DAY
SETTINGS non_replicated_deduplication_window = 10000;
