"""Pure decision logic and detection rules: no Kafka, Faust or ClickHouse imports, no clock reads."""
