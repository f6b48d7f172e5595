"""What analyst SQL may do: ClickHouse's own parse tree of a query, checked against allow-lists.

The sink's SQL endpoint runs analyst SQL inside the process that owns the embedded store, so a
query must not reach files, the network, other databases or processes, nor lift its own limits.
ClickHouse does most of it itself: the session runs with ``readonly=1`` (no writes, no DDL, no
setting changes, and only the table functions ClickHouse marks safe for readonly) and its caps
are set at connect time (:class:`QueryCaps`). What chDB still lets through is checked here,
on the tree ClickHouse's own parser builds (``EXPLAIN AST``), never on the SQL text:

* exactly one statement, re-formatted by ClickHouse (``formatQuery``): what is inspected is what runs;
* a ``SELECT`` (with ``UNION``/``INTERSECT``/``EXCEPT``, subqueries, CTEs) or ``DESCRIBE TABLE``/
  ``SHOW TABLES``, without ``INTO OUTFILE`` (chDB writes that file even with ``readonly=1``),
  ``FORMAT`` or ``SETTINGS`` anywhere;
* table functions only from :data:`ALLOWED_TABLE_FUNCTIONS` (an allow-list: ``file``, ``url``,
  ``s3``, ``remote``, ``mysql``, ``executable``, chDB's ``Python`` ... are refused);
* no scalar function of :data:`DENIED_FUNCTIONS` (``file()`` reads any file the process can).

This module is pure (the parse tree comes in as the lines ``EXPLAIN AST`` prints); running the
parser is the query server's job (:mod:`stream_jobs.query_server`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any, Final

ALLOWED_TABLE_FUNCTIONS: Final = frozenset(
    {
        "numbers",
        "numbers_mt",
        "zeros",
        "zeros_mt",
        "generate_series",
        "generateseries",
        "values",
        "view",
        "null",
        "format",
    }
)
"""Table functions that only compute (lower case): everything else is refused. (``format`` is also
a common scalar function; as a table function it parses data written inline in the query.)"""

DENIED_FUNCTIONS: Final = frozenset({"file", "catboostevaluate", "naivebayesclassifier", "getserversetting"})
"""Scalar functions that reach outside the query's own data (lower case): ``file(path)`` reads a file,
``catboostEvaluate`` and ``naiveBayesClassifier`` load models from paths, ``getServerSetting`` reveals
the engine's configuration (paths, hosts)."""

ALLOWED_STATEMENTS: Final = ("SelectWithUnionQuery", "DescribeQuery", "ShowTables")


class QueryRefused(ValueError):
    """The query does something the SQL endpoint does not allow; the message says what."""


@dataclass
class AstNode:
    kind: str
    """The node type as ``EXPLAIN AST`` prints it: ``SelectQuery``, ``Function``, ``Literal``..."""
    name: str = ""
    """The rest of the line: a function's name, a literal, an identifier (with alias and child count)."""
    children: list[AstNode] = field(default_factory=list)

    @property
    def function(self) -> str:
        """A Function node's name, as written in the query."""
        return self.name.split(" ", 1)[0] if self.name else ""


def parse_explain_ast(lines: list[str]) -> AstNode:
    """The tree of ``EXPLAIN AST`` output: one node per line, one leading space per level.

    Literals are printed escaped (a newline inside a string is ``\\n``), so one line is one node.
    """
    root: AstNode | None = None
    stack: list[tuple[int, AstNode]] = []
    for raw in lines:
        line = raw.rstrip("\n")
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip(" "))
        text = line.strip()
        kind, _, rest = text.partition(" ")
        node = AstNode(kind, rest.strip())
        while stack and stack[-1][0] >= depth:
            stack.pop()
        if stack:
            stack[-1][1].children.append(node)
        elif root is None:
            root = node
        else:
            raise QueryRefused("exactly one statement is allowed")
        stack.append((depth, node))
    if root is None:
        raise QueryRefused("empty query")
    return root


def check_ast(root: AstNode, table_functions: frozenset[str] = frozenset()) -> None:
    """Raise :class:`QueryRefused` unless the statement is one the endpoint runs.

    ``table_functions``: every table function the engine knows (lower case, from
    ``system.table_functions``). A Function node with such a name is refused wherever it stands
    unless allowed, so the check does not depend on telling a table function's position apart
    (``EXPLAIN AST`` prints aliases and identifiers unescaped: a newline in one adds lines).
    """
    if root.kind not in ALLOWED_STATEMENTS:
        raise QueryRefused(
            f"only SELECT, DESCRIBE TABLE and SHOW TABLES are allowed here (got {root.kind}); "
            "the SQL endpoint is read-only"
        )
    if root.kind == "SelectWithUnionQuery":
        extras = root.children[1:]
    elif root.kind == "DescribeQuery":
        extras = [c for c in root.children if c.kind != "TableExpression"]
    else:
        extras = list(root.children)
    for extra in extras:
        if extra.kind == "Literal":
            raise QueryRefused("INTO OUTFILE is not allowed: the endpoint returns results, it writes no files")
        if extra.kind == "Set":
            raise QueryRefused(NO_SETTINGS)
        raise QueryRefused(f"a {extra.kind} clause is not allowed here (no FORMAT: the endpoint answers in JSON)")
    _check_node(root, None, frozenset(name.lower() for name in table_functions))


NO_SETTINGS: Final = (
    "SETTINGS and SET are not allowed: the endpoint's limits (rows, bytes, memory, time) are fixed by the sink"
)


def _check_node(node: AstNode, parent: AstNode | None, table_functions: frozenset[str]) -> None:
    if node.kind in ("Set", "SetQuery"):
        raise QueryRefused(NO_SETTINGS)
    if node.kind == "Function":
        name = node.function
        lower = name.lower()
        in_from = parent is not None and parent.kind in ("TableExpression", "InsertQuery")
        table_function = in_from or lower in table_functions
        if lower in DENIED_FUNCTIONS and not in_from:
            raise QueryRefused(f"function {name}() is not allowed: it reaches outside the stored tables")
        if (table_function and lower not in ALLOWED_TABLE_FUNCTIONS) or lower in DENIED_FUNCTIONS:
            allowed = ", ".join(sorted(ALLOWED_TABLE_FUNCTIONS))
            raise QueryRefused(
                f"table function {name}() is not allowed: queries read the stored tables only "
                f"(table functions allowed: {allowed})"
            )
    for child in node.children:
        _check_node(child, node, table_functions)


@dataclass(frozen=True)
class QueryCaps:
    """Limits of every analyst query, fixed when the session opens (``readonly=1``: the query cannot
    change them, neither with ``SETTINGS`` nor ``SET``)."""

    max_rows: int = 100_000
    max_result_bytes: int = 32 * 1024 * 1024
    max_memory_bytes: int = 1024 * 1024 * 1024
    max_seconds: float = 30.0
    max_threads: int = field(default_factory=lambda: max(1, (os.cpu_count() or 2) // 2))
    """Half the cores: ingestion keeps the rest while an analyst query runs."""

    def settings(self) -> dict[str, Any]:
        """ClickHouse session settings; ``readonly=1`` forbids changing any of them afterwards."""
        return {
            "max_result_rows": self.max_rows,
            "max_result_bytes": self.max_result_bytes,
            "result_overflow_mode": "throw",
            "max_memory_usage": self.max_memory_bytes,
            "max_execution_time": self.max_seconds,
            "timeout_overflow_mode": "throw",
            "max_threads": self.max_threads,
            "readonly": 1,
        }
