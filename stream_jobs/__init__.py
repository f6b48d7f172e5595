"""Stream jobs: the Faust decision topology and the ClickHouse sink."""
