"""The parse-tree checks of analyst SQL (stream_jobs.sql_guard), on trees as ClickHouse 26.9's
``EXPLAIN AST`` prints them (copied from the engine's output)."""

from __future__ import annotations

import pytest

from stream_jobs.sql_guard import QueryCaps, QueryRefused, check_ast, parse_explain_ast

TABLE_FUNCTIONS = frozenset({"file", "url", "s3", "remote", "numbers", "format", "view", "python", "executable"})


def check(text: str) -> None:
    check_ast(parse_explain_ast(text.strip("\n").splitlines()), TABLE_FUNCTIONS)


def refused(text: str) -> str:
    with pytest.raises(QueryRefused) as info:
        check(text)
    return str(info.value)


FILE_IN_FROM = """
SelectWithUnionQuery (children 1)
 ExpressionList (children 1)
  SelectQuery (children 2)
   ExpressionList (children 1)
    Asterisk
   TablesInSelectQuery (children 1)
    TablesInSelectQueryElement (children 1)
     TableExpression (children 1)
      Function file (children 1)
       ExpressionList (children 2)
        Literal '/proc/self/environ'
        Literal 'RawBLOB'
"""


def test_a_plain_select_passes() -> None:
    check(
        """
SelectWithUnionQuery (children 1)
 ExpressionList (children 1)
  SelectQuery (children 2)
   ExpressionList (children 1)
    Function count (children 1)
     ExpressionList
   TablesInSelectQuery (children 1)
    TablesInSelectQueryElement (children 1)
     TableExpression (children 1)
      Function numbers (alias n) (children 1)
       ExpressionList (children 1)
        Literal UInt64_3
"""
    )


def test_table_functions_outside_the_allow_list_are_refused() -> None:
    assert "table function file() is not allowed" in refused(FILE_IN_FROM)
    assert "table function url() is not allowed" in refused(FILE_IN_FROM.replace("Function file", "Function url"))
    # one the engine does not list (a newer engine's) is refused in a FROM all the same
    assert "table function hudiCluster() is not allowed" in refused(
        FILE_IN_FROM.replace("Function file", "Function hudiCluster")
    )


def test_the_file_scalar_function_is_refused_also_inside_a_view() -> None:
    message = refused(
        """
SelectWithUnionQuery (children 1)
 ExpressionList (children 1)
  SelectQuery (children 2)
   ExpressionList (children 1)
    Asterisk
   TablesInSelectQuery (children 1)
    TablesInSelectQueryElement (children 1)
     TableExpression (children 1)
      Function view (children 1)
       ExpressionList (children 1)
        SelectWithUnionQuery (children 1)
         ExpressionList (children 1)
          SelectQuery (children 1)
           ExpressionList (children 1)
            Function file (children 1)
             ExpressionList (children 1)
              Literal '/etc/hostname'
"""
    )
    assert message.startswith("function file() is not allowed")


def test_a_table_function_name_is_refused_wherever_it_stands() -> None:
    # EXPLAIN AST prints aliases unescaped: a newline in an alias can fake lines and parents
    refused_text = refused(
        """
SelectWithUnionQuery (children 1)
 ExpressionList (children 1)
  SelectQuery (children 1)
   ExpressionList (children 1)
    Function remote (children 1)
     ExpressionList (children 1)
      Literal 'h:9000'
"""
    )
    assert "remote() is not allowed" in refused_text


def test_writes_settings_and_output_clauses_are_refused() -> None:
    assert "read-only" in refused(
        """
InsertQuery   (children 2)
 Function file (children 1)
  ExpressionList (children 2)
   Literal '/tmp/x'
   Literal 'TSV'
 SelectWithUnionQuery (children 1)
  ExpressionList (children 1)
   SelectQuery (children 1)
    ExpressionList (children 1)
     Literal UInt64_1
"""
    )
    assert "SETTINGS and SET are not allowed" in refused(
        """
SelectWithUnionQuery (children 1)
 ExpressionList (children 1)
  SelectQuery (children 2)
   ExpressionList (children 1)
    Literal UInt64_1
   Set
"""
    )
    assert "read-only" in refused("Set")
    assert "INTO OUTFILE is not allowed" in refused(
        """
SelectWithUnionQuery (children 2)
 ExpressionList (children 1)
  SelectQuery (children 1)
   ExpressionList (children 1)
    Literal UInt64_1
 Literal '/tmp/out.txt'
"""
    )
    assert "FORMAT" in refused(
        """
SelectWithUnionQuery (children 2)
 ExpressionList (children 1)
  SelectQuery (children 1)
   ExpressionList (children 1)
    Literal UInt64_1
 Identifier JSON
"""
    )
    assert "INTO OUTFILE" in refused("ShowTables (children 1)\n Literal '/tmp/o'")


def test_describe_and_show_tables_pass() -> None:
    check("ShowTables")
    check("DescribeQuery (children 1)\n TableExpression (children 1)\n  TableIdentifier default.t")
    assert "file() is not allowed" in refused(
        "DescribeQuery (children 1)\n TableExpression (children 1)\n  Function file (children 1)"
    )


def test_a_second_top_level_line_is_a_second_statement() -> None:
    assert "one statement" in refused("SelectWithUnionQuery (children 1)\nSelectWithUnionQuery (children 1)")


def test_caps_fix_readonly_and_every_limit() -> None:
    settings = QueryCaps(max_rows=10_000, max_result_bytes=1 << 20, max_memory_bytes=1 << 28, max_seconds=5).settings()
    assert settings["readonly"] == 1
    assert settings["max_result_rows"] == 10_000 and settings["result_overflow_mode"] == "throw"
    assert settings["max_result_bytes"] == 1 << 20
    assert settings["max_memory_usage"] == 1 << 28
    assert settings["max_execution_time"] == 5


def _calling(function: str) -> str:
    return f"""
SelectWithUnionQuery (children 1)
 ExpressionList (children 1)
  SelectQuery (children 1)
   ExpressionList (children 1)
    Function arrayMap (children 1)
     ExpressionList (children 2)
      Function lambda (children 1)
       ExpressionList (children 2)
        Function tuple (children 1)
         ExpressionList (children 1)
          Identifier x
        Function {function} (children 1)
         ExpressionList (children 1)
          Literal 'x'
      Literal Array_[UInt64_1]
"""


@pytest.mark.parametrize(
    ("function", "why"),
    [
        ("dictGetString", "dictionary's source"),
        ("aiGenerate", "AI provider"),
        ("AIClassify", "AI provider"),
        ("sleepEachRow", "only blocks"),
        ("logTrace", "writes to the engine's log"),
        ("hasColumnInTable", "another server"),
        ("joinGet", "table named in a string"),
        ("getMacro", "configuration"),
        ("filesystemAvailable", "disks"),
        ("regionToName", "geobase"),
        ("__getScalar", "internal"),
        ("naiveBayesClassifierWithProb", "models"),
        ("showCertificate", "certificate"),
    ],
)
def test_functions_that_reach_out_reveal_or_block_are_refused_anywhere(function: str, why: str) -> None:
    message = refused(_calling(function))
    assert message.startswith(f"function {function}() is not allowed") and why in message, message


@pytest.mark.parametrize(
    "function", ["getSetting", "throwIf", "decodeURLComponent", "hostName", "currentUser", "naiveBayesNgrams"]
)
def test_reviewed_harmless_functions_pass(function: str) -> None:
    check(_calling(function))


def _from(table: str) -> str:
    return f"""
SelectWithUnionQuery (children 1)
 ExpressionList (children 1)
  SelectQuery (children 2)
   ExpressionList (children 1)
    Asterisk
   TablesInSelectQuery (children 1)
    TablesInSelectQueryElement (children 1)
     TableExpression (children 1)
      TableIdentifier {table} (alias p)
"""


@pytest.mark.parametrize(
    "table",
    [
        "system.processes",
        "system.query_log",
        "system.settings",
        "information_schema.tables",
        "INFORMATION_SCHEMA.COLUMNS",
    ],
)
def test_system_tables_outside_the_allow_list_are_refused(table: str) -> None:
    assert f"table {table} is not allowed" in refused(_from(table))


def test_a_system_table_after_in_is_refused_too() -> None:
    message = refused(
        """
SelectWithUnionQuery (children 1)
 ExpressionList (children 1)
  SelectQuery (children 2)
   ExpressionList (children 1)
    Literal UInt64_1
   Function in (children 1)
    ExpressionList (children 2)
     Literal UInt64_1
     Identifier system.processes
"""
    )
    assert "table system.processes is not allowed" in message


@pytest.mark.parametrize("table", ["system.tables", "system.columns", "system.parts", "system.databases", "system.one"])
def test_the_system_tables_an_analyst_needs_pass(table: str) -> None:
    check(_from(table))
    check(_from("scopewatch.tool_calls"))
    assert "system.processes" in refused(
        "DescribeQuery (children 1)\n TableExpression (children 1)\n  TableIdentifier system.processes"
    )
