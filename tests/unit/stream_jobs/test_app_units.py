"""The decision job's wiring, without a broker: agents, tables, partitioning."""

from __future__ import annotations

from pathlib import Path

from aiokafka.partitioner import DefaultPartitioner

from schemas import delegation_key
from scopewatch.settings import Settings
from stream_jobs.app import TableView, create_app, partition_for


def test_create_app_declares_both_stages_and_their_tables(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, topic_prefix="u.", partitions=3, worker_group="u-decisions")
    app = create_app(settings)
    assert set(app.agents) >= {"attribute", "authorize"}
    assert set(app.tables) == {"s1-sessions", "s1-calls", "s2-grants", "s2-calls"}
    assert all(t.partitions == 3 for t in app.tables.values())
    # two apps never share state
    assert create_app(settings) is not app


def test_partition_for_is_kafkas_default_partitioner() -> None:
    partitioner = DefaultPartitioner()
    for i in range(200):
        key = delegation_key("acme", f"user-{i}@example.com", f"agent-{i % 7}").encode()
        for n in (1, 2, 4, 12):
            parts = list(range(n))
            assert partition_for(key, n) == partitioner(key, parts, parts)


def test_table_view_maps_str_keys_to_bytes() -> None:
    raw: dict[bytes, bytes] = {}
    view = TableView(raw)
    view["acme/s1"] = b"x"
    assert raw == {b"acme/s1": b"x"}
    assert view.get("acme/s1") == b"x" and view.get("nope") is None
    assert list(view) == ["acme/s1"] and len(view) == 1
    del view["acme/s1"]
    assert raw == {}
