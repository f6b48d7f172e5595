"""The decision job's wiring, without a broker: agents and state stores."""

from __future__ import annotations

from pathlib import Path

from stream_jobs.app import create_app
from stream_jobs.runtime.settings import Settings
from stream_jobs.state import ChangelogStore


def test_create_app_declares_both_stages_and_their_changelogs(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, topic_prefix="u.", partitions=3, worker_group="u-decisions")
    app = create_app(settings)
    assert set(app.agents) >= {"attribute", "authorize"}
    assert not app.tables  # state is ours (stream_jobs.state), not Faust tables
    assert app.scopewatch_changelogs == {  # type: ignore[attr-defined]
        name: f"u-decisions-{name}-changelog"
        for name in ("s1-sessions", "s1-calls", "s2-grants", "s2-calls", "s2-seq", "s2-approvals")
    }
    # two apps never share state
    assert create_app(settings) is not app


def test_changelog_store_drains_the_last_value_of_each_changed_key() -> None:
    store = ChangelogStore({"kept": b"0", "gone": b"1"})
    assert store.drain() == []  # loaded state is not written back
    store["a"] = b"1"
    store["a"] = b"2"  # five writes of a key in a batch are one changelog message
    del store["gone"]
    store["b"] = b"x"
    del store["b"]  # written then deleted: a tombstone (it may exist in the changelog already)
    assert sorted(store.drain(), key=lambda kv: kv[0]) == [("a", b"2"), ("b", None), ("gone", None)]
    assert store.drain() == []
    assert dict(store.items()) == {"kept": b"0", "a": b"2"}
    assert store.get("a") == b"2" and store.get("nope") is None and "kept" in store and len(store) == 2
    assert store.pop("a") == b"2" and store.drain() == [("a", None)]  # MutableMapping mixins go through us


def test_changelog_store_lets_a_deferred_writer_write_just_before_it_drains() -> None:
    store = ChangelogStore()
    calls: list[int] = []

    def flush() -> None:
        calls.append(len(calls))
        store["seq"] = b"state %d" % len(calls)

    store.before_drain = flush
    assert store.drain() == [("seq", b"state 1")]
    assert calls == [0]
