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
* tables of the ``system`` database only from :data:`ALLOWED_SYSTEM_TABLES` (``system.processes``
  would show the sink's inserts with their data), none of ``information_schema``;
* table functions only from :data:`ALLOWED_TABLE_FUNCTIONS` (an allow-list: ``file``, ``url``,
  ``s3``, ``remote``, ``mysql``, ``executable``, chDB's ``Python`` ... are refused);
* no scalar function of :data:`DENIED_FUNCTIONS` or :data:`DENIED_PREFIXES` (``file()`` reads any
  file the process can, ``dictGet`` reads a dictionary's source, ``aiGenerate`` calls out, ``sleep``...).

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

_DENIED: Final[dict[str, str]] = {
    # files, models and geobases read from paths
    "file": "it reads files",
    "catboostevaluate": "it loads a model from a path",
    "showcertificate": "it reads the engine's TLS certificate",
    # the network, and tables named in strings (past the table checks)
    "hascolumnintable": "it can connect to another server and looks into tables by name",
    "joinget": "it reads a table named in a string",
    "joingetornull": "it reads a table named in a string",
    "currentrequesturl": "it reveals the request URL (a server may carry credentials in it)",
    "getclienthttpheader": "it reveals the request's HTTP headers",
    # the engine's configuration
    "getserversetting": "it reveals the engine's configuration (paths, hosts)",
    "getmergetreesetting": "it reveals the engine's configuration",
    "getmacro": "it reveals the engine's configuration",
    # writes and state changes
    "logtrace": "it writes to the engine's log",
    "generateserialid": "it writes counters to Keeper",
}

_DENIED_PREFIXES: Final[tuple[tuple[str, str], ...]] = (
    ("filesystem", "it inspects the engine's disks"),
    ("naivebayesclassifier", "it loads models from paths"),
    ("region", "it reads the geobase files of the engine's configuration"),
    ("dict", "a dictionary's source can be a file, a URL, another database or a process"),
    ("ai", "it calls an AI provider over the network"),
    ("addressto", "it reads the engine binary's debug information"),
    ("demangle", "it is an introspection function"),
    ("sleep", "it only blocks"),
    ("__", "it is internal to the engine"),
)

DENIED_FUNCTIONS: Final = frozenset(_DENIED)
"""Scalar functions refused by exact name (lower case), besides the families of :data:`DENIED_PREFIXES`."""

DENIED_PREFIXES: Final = tuple(prefix for prefix, _why in _DENIED_PREFIXES)
"""Families of scalar functions refused by the start of their name (lower case).

Reviewed against ClickHouse 26.9's ``system.functions`` (chDB 4.4): everything that reads files,
reaches the network, runs processes, writes, reveals the engine's configuration or only blocks.
Allowed after review: ``throwIf``/``aggThrow`` (an error with the caller's own text), ``getSetting``
(the session's settings: the caps the analyst is told anyway, no credentials), ``currentUser``,
``currentProfiles`` and other names of the session's own user, ``hostName``, ``version``,
``uptime``, ``getOSKernelVersion`` (facts a local user of the host sees anyway: the endpoint is
loopback only), and the URL functions (``domain``, ``decodeURLComponent``...), which parse strings.
``tests/integration/stream_jobs/test_sql_guard_functions.py`` fails when the installed engine
lists a function in a risky family that is neither refused here nor reviewed.
"""


def denied_function(name: str) -> str | None:
    """Why the scalar function ``name`` is refused, or None when it is allowed."""
    lower = name.lower()
    if lower in _DENIED:
        return _DENIED[lower]
    for prefix, why in _DENIED_PREFIXES:
        if lower.startswith(prefix):
            return why
    return None


ALLOWED_STATEMENTS: Final = ("SelectWithUnionQuery", "DescribeQuery", "ShowTables")

ALLOWED_SYSTEM_TABLES: Final = frozenset({"databases", "tables", "columns", "parts", "one"})
"""The ``system`` tables an analyst reads: what exists, its columns, its size (``scopewatch status``
reads ``system.tables``), and ``system.one``. The others are refused: ``system.processes`` shows the
sink's running inserts with their data, ``system.query_log`` past queries, ``system.settings`` and
friends the engine's configuration. ``information_schema`` (views over ``system``) is refused whole."""

SYSTEM_DATABASES: Final = frozenset({"system", "information_schema"})


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


def _check_table(identifier: str) -> None:
    """Refuse ``system.<name>`` (unless allowed) and ``information_schema.<name>``.

    ``identifier`` is a ``TableIdentifier`` (``db.table``) or an ``Identifier`` (``db.table`` after
    ``IN``, or ``db.table.column``) as ``EXPLAIN AST`` prints it; a column of a table aliased
    ``system`` is refused as well (rename the alias).
    """
    parts = identifier.split(".")
    if len(parts) < 2 or parts[0].lower() not in SYSTEM_DATABASES:
        return
    if parts[0] == "system" and parts[1] in ALLOWED_SYSTEM_TABLES:
        return
    allowed = ", ".join(f"system.{name}" for name in sorted(ALLOWED_SYSTEM_TABLES))
    raise QueryRefused(
        f"table {parts[0]}.{parts[1]} is not allowed: queries read the stored tables and only these "
        f"system tables: {allowed}"
    )


def _check_node(node: AstNode, parent: AstNode | None, table_functions: frozenset[str]) -> None:
    if node.kind in ("Set", "SetQuery"):
        raise QueryRefused(NO_SETTINGS)
    if node.kind in ("TableIdentifier", "Identifier"):
        _check_table(node.name.split(" ", 1)[0])
    if node.kind == "Function":
        name = node.function
        lower = name.lower()
        in_from = parent is not None and parent.kind in ("TableExpression", "InsertQuery")
        table_function = in_from or lower in table_functions
        denied = denied_function(name)
        if denied is not None and not in_from:
            raise QueryRefused(f"function {name}() is not allowed: {denied}")
        if (table_function and lower not in ALLOWED_TABLE_FUNCTIONS) or denied is not None:
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
