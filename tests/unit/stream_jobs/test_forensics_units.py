"""The forensic query pack without ClickHouse: headers, parameter binding, the CLI sub-app."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime, timedelta, timezone

import pytest
from typer.testing import CliRunner, Result

from detections.findings import FORENSIC_QUERIES
from scopewatch.forensics_cli import forensics_app
from stream_jobs.forensics import (
    Column,
    ForensicsError,
    Param,
    bind,
    load_queries,
    parse_assignments,
    parse_query,
    render_literal,
)

ISSUE_QUERIES = (
    "agent_activity",
    "calls_after_grant_end",
    "session_timeline",
    "principals_with_violations",
    "first_seen_tools",
    "unused_grants",
)

SAMPLE = """\
-- question: Who did what
--   and when?
-- note: a note
-- param tenant String: the tenant
-- param agent Nullable(String) = NULL: one agent: or all
-- param since Nullable(DateTime64(3, 'UTC')) = '2026-01-01T00:00:00Z': from
-- param limit UInt32 = 10: at most
-- param ids Array(String) = 'x': some ids
-- column call_id: the call
-- column n: how many

SELECT call_id, count() AS n FROM {db}.t
WHERE tenant = {tenant:String} AND ({agent:Nullable(String)} IS NULL OR agent_id = {agent:Nullable(String)})
    AND at >= {since: Nullable(DateTime64(3,'UTC'))} AND has({ids:Array(String)}, call_id)
GROUP BY call_id LIMIT {limit:UInt32};
"""


# ------------------------------------------------------------------------- headers


def test_header_is_parsed_into_question_params_and_columns() -> None:
    q = parse_query("who", SAMPLE)
    assert q.question == "Who did what and when?"
    assert q.notes == ("a note",)
    assert q.params == (
        Param("tenant", "String", "the tenant", required=True),
        Param("agent", "Nullable(String)", "one agent: or all", required=False, default=None),
        Param("since", "Nullable(DateTime64(3, 'UTC'))", "from", required=False, default="2026-01-01T00:00:00Z"),
        Param("limit", "UInt32", "at most", required=False, default=10),
        Param("ids", "Array(String)", "some ids", required=False, default="x"),
    )
    assert q.columns == (Column("call_id", "the call"), Column("n", "how many"))
    assert q.sql.startswith("SELECT call_id") and q.sql.endswith("LIMIT {limit:UInt32}")


@pytest.mark.parametrize(
    ("old", "new", "error"),
    [
        ("-- question: Who did what", "-- note: x", "exactly one `-- question:`"),
        ("-- note: a note", "-- hint: a note", "header line 3 is not one of"),
        ("-- param tenant String: the tenant", "-- param tenant String the tenant", "cannot read `-- param"),
        ("-- param limit UInt32 = 10", "-- param limit UInt32 = -1", "default of limit"),
        ("-- param limit UInt32 = 10", "-- param limit UInt32 = 'ten'", "default of limit"),
        ("-- param limit UInt32 = 10: at most", "-- param limit UInt32 = 10: at most\n-- param zz Int64: z", "unused"),
        ("-- param tenant String: the tenant\n", "", "{tenant:String} is used but not declared"),
        ("-- param limit UInt32", "-- param limit UInt64", "{limit:UInt32} does not take the declared type UInt64"),
        ("-- param ids Array(String)", "-- param ids String", "{ids:Array(String)} does not take"),
        ("-- param agent Nullable(String)", "-- param agent Nullable(Int64)", "does not take the declared type"),
        (
            "-- param limit UInt32 = 10: at most",
            "-- param limit UInt32 = 10: at most\n-- param limit UInt32: b",
            "twice",
        ),
        ("-- column call_id: the call\n-- column n: how many", "", "documents no `-- column`"),
        ("-- note: a note", "-- sql: other", "`-- sql: other` needs that query"),
    ],
)
def test_header_problems_are_named(old: str, new: str, error: str) -> None:
    text = SAMPLE.replace(old, new, 1)
    assert text != SAMPLE
    with pytest.raises(ForensicsError, match="forensic query who: .*" + _re(error)):
        parse_query("who", text)


def _re(text: str) -> str:
    return re.escape(text)


def test_a_header_without_sql_is_refused() -> None:
    with pytest.raises(ForensicsError, match="no SQL after the header"):
        parse_query("who", SAMPLE.split("SELECT")[0])


def test_a_query_may_run_another_querys_sql_with_its_own_params() -> None:
    base = parse_query("who", SAMPLE)
    text = (
        "-- question: One tenant's?\n-- sql: who\n-- param tenant String: t\n-- param agent String: required here\n"
        "-- param since Nullable(DateTime64(3, 'UTC')) = NULL: s\n-- param limit UInt32 = 5: l\n"
        "-- param ids Array(String) = 'y': i\n"
    )
    q = parse_query("one", text, {"who": base})
    assert (q.sql, q.columns, q.question) == (base.sql, base.columns, "One tenant's?")
    assert q.param("agent") == Param("agent", "String", "required here", required=True)
    with pytest.raises(ForensicsError, match="missing required parameter"):
        bind(q, {"tenant": "t"}, "db")
    with pytest.raises(ForensicsError, match="no SQL or columns here"):
        parse_query("one", text + "-- column x: y\n", {"who": base})


def test_shipped_queries_answer_the_issue_and_every_finding_pointer() -> None:
    queries = load_queries()
    assert set(ISSUE_QUERIES) <= set(queries)
    assert set(FORENSIC_QUERIES) <= set(queries)
    assert "list" not in queries  # the CLI's own command
    for q in queries.values():
        assert q.question.endswith(("?", ".")) and q.columns and q.params
        assert all(p.description for p in q.params) and all(c.description for c in q.columns)
        sql = bind(q, {p.name: _example(p.type) for p in q.params if p.required}, "forensics_db")
        assert "{" not in sql.replace("'{}'", "")
    assert queries["grant_history"].sql == queries["delegation_timeline"].sql


def _example(type_: str) -> object:
    return {"String": "x", "Array(String)": ["a", "b"]}[type_]


# ----------------------------------------------------------------------- literals


@pytest.mark.parametrize(
    ("type_", "value", "literal"),
    [
        ("String", "plain", "'plain'"),
        ("String", "", "''"),
        ("String", "é ✓ 日本", "'é ✓ 日本'"),
        ("String", "a\nb\tc\rd\0e\x01f\x7f", "'a\\nb\\tc\\rd\\0e\\x01f\\x7F'"),
        ("UInt32", "42", "42"),
        ("UInt32", 4294967295, "4294967295"),
        ("UInt64", "18446744073709551615", "18446744073709551615"),
        ("UInt8", 0, "0"),
        ("Int64", "-9223372036854775808", "-9223372036854775808"),
        ("Int64", " 7 ", "7"),
        ("DateTime64(3, 'UTC')", "2026-11-21T10:00:00Z", "toDateTime64('2026-11-21 10:00:00.000', 3, 'UTC')"),
        ("DateTime64(3,'UTC')", "2026-11-21T12:30:00.1234+02:30", "toDateTime64('2026-11-21 10:00:00.123', 3, 'UTC')"),
        (
            "DateTime64(3, 'UTC')",
            datetime(2026, 11, 21, 5, 0, tzinfo=timezone(timedelta(hours=-5))),
            "toDateTime64('2026-11-21 10:00:00.000', 3, 'UTC')",
        ),
        ("Nullable(String)", None, "NULL"),
        ("Nullable(String)", "x", "'x'"),
        ("Nullable(DateTime64(3, 'UTC'))", None, "NULL"),
        ("Array(String)", ["a", "b'c"], "CAST(['a', 'b\\'c'] AS Array(String))"),
        ("Array(String)", "one", "CAST(['one'] AS Array(String))"),
        ("Array(String)", [], "CAST([] AS Array(String))"),
        ("Array(UInt32)", ["1", 2], "CAST([1, 2] AS Array(UInt32))"),
    ],
)
def test_values_render_as_literals_of_their_type(type_: str, value: object, literal: str) -> None:
    assert render_literal(type_, value) == literal  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("type_", "value", "error"),
    [
        ("String", None, "NULL is not a String"),
        ("String", 5, "must be text"),
        ("String", ["a", "b"], "one value expected"),
        ("String", "\ud800", "not valid Unicode"),
        ("UInt32", "-1", "outside UInt32"),
        ("UInt8", 256, "outside UInt8"),
        ("UInt64", "18446744073709551616", "outside UInt64"),
        ("Int64", "1.5", "not an integer"),
        ("Int64", "1; DROP TABLE x", "not an integer"),
        ("Int64", True, "not an integer"),
        ("DateTime64(3, 'UTC')", "2026-11-21T10:00:00", "not an RFC 3339 time with an offset"),
        ("DateTime64(3, 'UTC')", "yesterday", "not an RFC 3339"),
        ("DateTime64(3, 'UTC')", "2026-11-21T10:00:00Z' OR 1=1", "not an RFC 3339"),
        ("DateTime64(3, 'UTC')", datetime(2026, 11, 21), "not an RFC 3339"),
        ("Array(UInt32)", ["1", "x"], "not an integer"),
        ("Float64", 1, "unsupported parameter type Float64"),
    ],
)
def test_bad_values_are_refused(type_: str, value: object, error: str) -> None:
    with pytest.raises(ForensicsError, match=_re(error)):
        render_literal(type_, value)  # type: ignore[arg-type]


INJECTIONS = [
    "'; DROP TABLE scopewatch.evidence; --",
    "x' OR '1'='1",
    "\\'; DROP TABLE t; --",
    "\\",
    "a\\' OR 1=1 -- ",
    "{db}",
    "{tenant:String}",
    "'\n; DROP TABLE t\n--",
]


@pytest.mark.parametrize("value", INJECTIONS)
def test_injection_attempts_stay_one_harmless_string_literal(value: str) -> None:
    literal = render_literal("String", value)
    assert literal == "'" + _unescape_reference(value) + "'"
    # Decoding the literal the way ClickHouse does gives the value back, and no quote ends it early.
    assert _decode(literal) == value
    query = parse_query("who", SAMPLE)
    sql = bind(query, {"tenant": value}, "db")
    harmless = bind(query, {"tenant": "harmless"}, "db")
    assert sql == harmless.replace("'harmless'", literal)


def _unescape_reference(value: str) -> str:
    return value.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n")


def _decode(literal: str) -> str:
    """A ClickHouse single-quoted literal's value; fails if an unescaped quote ends it before its end."""
    assert literal[0] == literal[-1] == "'"
    out, i, body = [], 0, literal[1:-1]
    simple = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", "'": "'"}
    while i < len(body):
        ch = body[i]
        assert ch != "'", f"unescaped quote at {i} in {literal!r}"
        if ch == "\\":
            nxt = body[i + 1]
            if nxt == "x":
                out.append(chr(int(body[i + 2 : i + 4], 16)))
                i += 4
                continue
            out.append(simple[nxt])
            i += 2
            continue
        out.append(ch)
        i += 1
    return "".join(out)


# ------------------------------------------------------------------------ binding


def test_bind_fills_defaults_and_the_database() -> None:
    sql = bind(parse_query("who", SAMPLE), {"tenant": "acme", "limit": "3", "ids": ["a"]}, "forensics")
    assert "FROM forensics.t" in sql
    assert "tenant = 'acme' AND (NULL IS NULL OR agent_id = NULL)" in sql
    assert "at >= toDateTime64('2026-01-01 00:00:00.000', 3, 'UTC')" in sql
    assert "has(CAST(['a'] AS Array(String)), call_id)" in sql and sql.endswith("LIMIT 3")


@pytest.mark.parametrize(
    ("values", "database", "error"),
    [
        (
            {"tenant": "a", "bogus": "1", "other": "2"},
            "db",
            "unknown parameter(s) bogus, other; it takes tenant, agent",
        ),
        ({}, "db", "missing required parameter(s) tenant"),
        ({"tenant": None}, "db", "parameter tenant (String): NULL is not a String"),
        ({"tenant": "a", "limit": "many"}, "db", "parameter limit (UInt32): 'many' is not an integer"),
        ({"tenant": "a"}, "db; DROP", "invalid database name"),
    ],
)
def test_bind_refuses_unknown_missing_and_bad_values(values: dict[str, object], database: str, error: str) -> None:
    with pytest.raises(ForensicsError, match=_re(error)):
        bind(parse_query("who", SAMPLE), values, database)  # type: ignore[arg-type]


def test_assignments_from_a_command_line() -> None:
    q = parse_query("who", SAMPLE)
    assert parse_assignments(q, ["tenant=a=b", "ids=1", "ids=", "limit= 3"]) == {
        "tenant": "a=b",
        "ids": ["1", ""],
        "limit": " 3",
    }
    with pytest.raises(ForensicsError, match="parameter tenant is given more than once"):
        parse_assignments(q, ["tenant=a", "tenant=b"])
    with pytest.raises(ForensicsError, match="'tenant' is not NAME=VALUE"):
        parse_assignments(q, ["tenant"])
    with pytest.raises(ForensicsError, match="is not NAME=VALUE"):
        parse_assignments(q, ["=x"])


# ----------------------------------------------------------------------------- CLI


def invoke(*args: str) -> Result:
    return CliRunner().invoke(forensics_app, list(args))


def test_cli_lists_every_query_with_its_question() -> None:
    result = invoke("list", "--json")
    assert result.exit_code == 0, result.output
    listed = {q["name"]: q for q in json.loads(result.stdout)}
    assert listed.keys() == load_queries().keys()
    assert listed["session_timeline"]["params"] == [
        {"name": "tenant", "type": "String", "required": True, "default": None},
        {"name": "session_id", "type": "String", "required": True, "default": None},
    ]
    table = invoke("list")
    assert table.exit_code == 0 and "unused_grants" in table.stdout and "Which grants were never" in table.stdout


def test_cli_documents_a_query() -> None:
    result = invoke("calls_after_grant_end", "--help")
    assert result.exit_code == 0, result.output
    assert "tenant String (required): the tenant" in result.stdout
    assert "since Nullable(DateTime64(3, 'UTC')) = NULL" in result.stdout
    assert "after_ms: how long after the end the call came" in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["session_timeline", "-p", "tenant=a"], "missing required parameter(s) session_id"),
        (["session_timeline", "-p", "tenant=a", "-p", "session_id=s", "-p", "who=x"], "unknown parameter(s) who"),
        (["first_seen_tools", "-p", "since=yesterday"], "parameter since"),
        (["first_seen_tools", "-p", "since=[red]x[/red]"], "'[red]x[/red]' is not an RFC 3339 time"),
        (["principals_with_violations", "-p", "limit=-3"], "outside UInt32"),
        (["session_timeline", "-p", "tenant"], "is not NAME=VALUE"),
        (["session_timeline", "-p", "tenant=a", "-p", "session_id=s", "--format", "xml"], "unknown format 'xml'"),
    ],
)
def test_cli_refuses_bad_parameters_before_running(
    args: list[str], message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("scopewatch.sqlclient.run_sql", _must_not_run)
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.stderr.split())


def test_cli_prints_the_bound_sql(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCOPEWATCH_CLICKHOUSE_DATABASE", "analysts")
    monkeypatch.setattr("scopewatch.sqlclient.run_sql", _must_not_run)
    result = invoke("session_timeline", "-p", "tenant=acme", "-p", "session_id=s'1", "--print-sql")
    assert result.exit_code == 0, result.output
    assert "FROM analysts.identity_events FINAL" in result.stdout
    assert "session_id = 's\\'1'" in result.stdout


def test_cli_reports_a_failing_query(monkeypatch: pytest.MonkeyPatch) -> None:
    from scopewatch.sqlclient import SqlError

    def fail(settings: object, sql: str) -> dict[str, object]:
        raise SqlError("Code: 60. Unknown table")

    monkeypatch.setattr("scopewatch.sqlclient.run_sql", fail)
    result = invoke("session_timeline", "-p", "tenant=acme", "-p", "session_id=s")
    assert result.exit_code == 1
    assert "session_timeline: Code: 60. Unknown table" in result.stderr


def _must_not_run(settings: object, sql: str) -> dict[str, object]:
    raise AssertionError("the query must not run")


def test_datetime_literal_is_utc_milliseconds() -> None:
    stamp = datetime(2026, 11, 21, 10, 0, 0, 999999, tzinfo=UTC)
    assert render_literal("DateTime64(3, 'UTC')", stamp) == "toDateTime64('2026-11-21 10:00:00.999', 3, 'UTC')"
