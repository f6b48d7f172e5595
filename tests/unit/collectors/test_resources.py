"""Resource extraction: default rules for the reference servers, configuration, and no secret in a resource."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from collectors.observer import McpSessionObserver, SessionIdentity
from collectors.redact import PLACEHOLDER, Redactor
from collectors.resources import OVERFLOW, ResourceExtractor, ResourceRule, template_fields

T0 = datetime(2026, 11, 21, 10, 0, 0, tzinfo=UTC)
R = Redactor(key=b"k" * 32)
DEFAULTS = ResourceExtractor()


def extract(server: str, tool: str, args: Any, extractor: ResourceExtractor = DEFAULTS) -> list[str]:
    return extractor.extract(server, tool, args, R)


@pytest.mark.parametrize(
    ("tool", "args", "expected"),
    [
        # @modelcontextprotocol/server-filesystem
        ("read_file", {"path": "/data/a.txt"}, ["file:/data/a.txt"]),
        ("read_text_file", {"path": "/data/a.txt", "head": 10}, ["file:/data/a.txt"]),
        ("read_media_file", {"path": "/data/i.png"}, ["file:/data/i.png"]),
        ("write_file", {"path": "/data/b.txt", "content": "hello"}, ["file:/data/b.txt"]),
        ("edit_file", {"path": "/data/b.txt", "edits": [{"oldText": "a", "newText": "b"}]}, ["file:/data/b.txt"]),
        ("create_directory", {"path": "/data/new"}, ["file:/data/new"]),
        ("list_directory", {"path": "/data"}, ["file:/data"]),
        ("list_directory_with_sizes", {"path": "/data", "sortBy": "size"}, ["file:/data"]),
        ("directory_tree", {"path": "/data/"}, ["file:/data"]),
        ("search_files", {"path": "/data", "pattern": "*.txt"}, ["file:/data"]),
        ("get_file_info", {"path": "/data/a.txt"}, ["file:/data/a.txt"]),
        ("move_file", {"source": "/data/a", "destination": "/archive/a"}, ["file:/archive/a", "file:/data/a"]),
        ("read_multiple_files", {"paths": ["/data/b", "/data/a", "/data/b"]}, ["file:/data/a", "file:/data/b"]),
        ("list_allowed_directories", {}, []),
    ],
)
def test_filesystem_server_defaults(tool: str, args: dict[str, Any], expected: list[str]) -> None:
    for server in ("secure-filesystem-server", "fs", "unknown"):
        assert extract(server, tool, args) == expected


def test_paths_are_normalised_so_traversal_cannot_pass_for_an_allowed_folder() -> None:
    assert extract("fs", "read_file", {"path": "/data/../etc/passwd"}) == ["file:/etc/passwd"]
    assert extract("fs", "read_file", {"path": "/data//x/./y/"}) == ["file:/data/x/y"]
    assert extract("fs", "read_file", {"path": "rel/../../up"}) == ["file:../up"]


def test_github_like_servers_and_urls() -> None:
    args = {"owner": "acme", "repo": "web", "path": "README.md", "ref": "main"}
    assert extract("github", "get_file_contents", args) == ["repo:acme/web"]  # path is repo-relative: no file:
    assert extract("github", "create_issue", {"owner": "acme", "repo": "web", "title": "t"}) == ["repo:acme/web"]
    assert extract("github", "search_repositories", {"query": "acme"}) == []
    assert extract("fetch", "fetch", {"url": "https://example.com/a"}) == ["url:https://example.com/a"]


def test_server_everything_defaults() -> None:
    assert extract("mcp-servers/everything", "echo", {"message": "hi"}) == []
    assert extract("everything", "get-resource-reference", {"resourceType": "Text", "resourceId": 3}) == ["resource:3"]
    data = "https://raw.githubusercontent.com/acme/web/main/README.md"
    assert extract("everything", "gzip-file-as-resource", {"name": "r.gz", "data": data}) == [f"url:{data}"]
    assert extract("everything", "trigger-url-elicitation", {"url": "https://x.test/ok"}) == ["url:https://x.test/ok"]


def test_missing_or_unusable_fields_yield_nothing() -> None:
    for args in ({}, {"path": ""}, {"path": None}, {"path": True}, {"path": {"nested": 1}}, {"path": float("nan")}):
        assert extract("fs", "read_file", args) == []
    assert extract("github", "x", {"owner": "acme"}) == []  # repo missing
    assert extract("fs", "read_file", ["not", "an", "object"]) == []
    assert extract("fs", "read_file", None) == []


def test_no_secret_ever_lands_in_a_resource() -> None:
    secret_url = "https://user:hunter2@api.example.com/v1?api_key=Zq8canaryApiKeyValue42"
    [url] = extract("fetch", "fetch", {"url": secret_url})
    assert "hunter2" not in url and "Zq8canary" not in url and url.startswith("url:https://user:[redacted:")
    [path] = extract("fs", "read_file", {"path": "/home/u/AKIAQ3EXAMPLEFAKE7XY.csv"})
    assert "Q3EXAMPLEFAKE7XY" not in path
    token_rule = ResourceRule(tools=("vault/*",), templates=("secret:{token}",))
    [fingerprinted] = extract("vault", "read", {"token": "plain-looking"}, ResourceExtractor(rules=(token_rule,)))
    assert fingerprinted.startswith("secret:") and PLACEHOLDER.fullmatch(fingerprinted.removeprefix("secret:"))


def test_configured_rules_add_to_or_replace_the_defaults() -> None:
    rule = ResourceRule(tools=("db/query", "db/exec*"), templates=("db:{database}/{table}", "db:{database}"))
    mine = ResourceExtractor(rules=(rule,))
    assert extract("db", "query", {"database": "crm", "table": "users"}, mine) == ["db:crm", "db:crm/users"]
    assert extract("db", "execute", {"database": "crm", "url": "https://x.test"}, mine) == [
        "db:crm",
        "url:https://x.test",
    ]
    assert extract("other", "query", {"database": "crm"}, mine) == []
    only = ResourceExtractor(rules=(rule,), defaults=False)
    assert extract("db", "execute", {"database": "crm", "url": "https://x.test"}, only) == ["db:crm"]
    assert extract("fs", "read_file", {"path": "/a"}, only) == []


def test_list_fields_expand_and_overflow_fails_closed() -> None:
    rule = ResourceRule(tools=("*",), templates=("pair:{a}-{b}",))
    ex = ResourceExtractor(rules=(rule,), defaults=False, max_resources=5)
    assert extract("s", "t", {"a": ["x", "y"], "b": [1, 2]}, ex) == ["pair:x-1", "pair:x-2", "pair:y-1", "pair:y-2"]
    many = extract("fs", "read_multiple_files", {"paths": [f"/d/{i:03d}" for i in range(100)]}, ex)
    assert many == []  # the defaults are off in `ex`
    many = extract("fs", "read_multiple_files", {"paths": [f"/d/{i:03d}" for i in range(100)]}, DEFAULTS)
    assert len(many) == 100
    four = {"paths": ["/a", "/b", "/c", "/d"]}
    assert extract("fs", "read_multiple_files", four, ResourceExtractor(max_resources=3)) == [
        "file:/a",
        "file:/b",
        OVERFLOW,
    ]


@pytest.mark.parametrize(
    "rule",
    [
        {"tools": [], "templates": ["x:{a}"]},
        {"tools": ["*"], "templates": []},
        {"tools": ["*"], "templates": ["x:{a!r}"]},
        {"tools": ["*"], "templates": ["x:{a:>10}"]},
        {"tools": ["*"], "templates": ["x:{}"]},
        {"tools": ["*"], "templates": ["x:{a.b}"]},
        {"tools": ["*"], "templates": ["x:{a"]},
        {"tools": ["*"], "templates": ["x:{a}"], "extra": 1},
    ],
)
def test_bad_rules_are_refused(rule: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        ResourceRule.model_validate(rule)


def test_template_fields() -> None:
    assert template_fields("repo:{owner}/{repo}") == ("owner", "repo")
    assert template_fields("literal:{{x}}") == ()


def test_the_observer_fills_resources() -> None:
    counter = itertools.count()
    o = McpSessionObserver(
        SessionIdentity("s", "t"), server_label="fs", new_id=lambda: f"00000000-0000-4000-8000-{next(counter):012d}"
    )
    msg = {"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": "move_file"}}
    msg["params"]["arguments"] = {"source": "/data/a", "destination": "/data/b"}  # type: ignore[index]
    [c] = o.from_client(msg, T0, 0.0)
    assert c.resources == ["file:/data/a", "file:/data/b"]


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
arg_names = st.sampled_from(["path", "paths", "source", "destination", "owner", "repo", "url", "data", "x"])


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from(["fs", "github", "everything", "unknown"]),
    st.sampled_from(["read_file", "read_multiple_files", "move_file", "get_issue", "gzip-file-as-resource", "x"]),
    st.dictionaries(arg_names, json_values, max_size=5),
)
def test_extraction_never_raises_and_is_sorted_distinct_and_deterministic(
    server: str, tool: str, args: dict[str, Any]
) -> None:
    out = extract(server, tool, args)
    assert out == sorted(set(out)) and len(out) <= DEFAULTS.max_resources
    assert extract(server, tool, args) == out
    assert all(isinstance(r, str) and ":" in r for r in out)


def test_matching_templates_are_remembered_per_tool_and_the_memory_is_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    import collectors.resources as resources

    extractor = ResourceExtractor(rules=(ResourceRule(tools=("git*/push",), templates=("repo:{repo}",)),))
    assert extractor.templates_for("github/push") == ("repo:{repo}", "url:{url}", "repo:{owner}/{repo}")
    assert extractor.templates_for("fs/move_file") == (
        "url:{url}",
        "repo:{owner}/{repo}",
        "file:{source}",
        "file:{destination}",
    )
    assert extractor.templates_for("github/push") is extractor.templates_for("github/push")  # remembered
    monkeypatch.setattr(resources, "TEMPLATE_CACHE", 8)
    for i in range(50):
        extractor.templates_for(f"s{i}/t")
    assert len(extractor._templates) <= 8
    assert extractor.templates_for("github/push") == ("repo:{repo}", "url:{url}", "repo:{owner}/{repo}")
