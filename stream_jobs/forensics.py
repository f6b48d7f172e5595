"""The forensic query pack: named, parameterised SQL files in ``stream_jobs/forensics/<name>.sql``.

Each file starts with a header of ``--`` comment lines, then one SELECT::

    -- question: What did ... ?          (indented "--   " lines continue an entry)
    -- note: free text (optional, any number)
    -- param tenant String: the tenant                          (required)
    -- param agent_id Nullable(String) = NULL: one agent        (optional, with its default)
    -- column call_id: the call
    -- sql: OTHER                     (instead of SQL and columns: run query OTHER's SQL)

The SQL writes parameters as ``{name:Type}`` and the database as ``{db}``; a parameter declared as
T may fill a ``{name:Nullable(T)}`` placeholder (required here, optional in a query sharing the SQL).
Parameters are bound here, on the client side, because a query may go through the sink's read-only
endpoint (plain SQL) or straight to chDB: every value is checked against its declared type and
rendered as a ClickHouse literal (strings escaped, times parsed as RFC 3339), so no value can change
the query.
Supported types: String, UInt8..UInt64, Int8..Int64, DateTime64(3, 'UTC'), Nullable(T), Array(T).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from importlib import resources

from schemas import format_timestamp, parse_timestamp

__all__ = [
    "Column",
    "ForensicQuery",
    "ForensicsError",
    "Param",
    "bind",
    "load_queries",
    "parse_assignments",
    "parse_query",
    "render_literal",
]

ParamValue = str | int | datetime | Sequence[str | int | datetime] | None


class ForensicsError(ValueError):
    """A query file, a parameter value or a query name is not acceptable (the message says why)."""


@dataclass(frozen=True)
class Param:
    name: str
    type: str
    description: str
    required: bool
    default: str | int | None = None


@dataclass(frozen=True)
class Column:
    name: str
    description: str


@dataclass(frozen=True)
class ForensicQuery:
    name: str
    question: str
    params: tuple[Param, ...]
    columns: tuple[Column, ...]
    sql: str
    notes: tuple[str, ...] = ()

    def param(self, name: str) -> Param | None:
        return next((p for p in self.params if p.name == name), None)


# ------------------------------------------------------------------------- literals

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_INT = re.compile(r"(U?)Int(8|16|32|64)")
_DATETIME = "DateTime64(3,'UTC')"
_ESCAPES = {"\\": "\\\\", "'": "\\'", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\0": "\\0"}


def _norm(type_: str) -> str:
    return re.sub(r"\s+", "", type_)


def _quote(text: str) -> str:
    """A ClickHouse string literal: backslash, quote and control characters escaped."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ForensicsError("not valid Unicode text") from exc
    out = []
    for ch in text:
        if ch in _ESCAPES:
            out.append(_ESCAPES[ch])
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\x{ord(ch):02X}")
        else:
            out.append(ch)
    return "'" + "".join(out) + "'"


def _inner(type_: str, wrapper: str) -> str | None:
    prefix = wrapper + "("
    return type_[len(prefix) : -1] if type_.startswith(prefix) and type_.endswith(")") else None


def render_literal(type_: str, value: ParamValue) -> str:
    """``value`` as a ClickHouse literal of ``type_``; :class:`ForensicsError` when it is not one."""
    t = _norm(type_)
    if (inner := _inner(t, "Nullable")) is not None:
        return "NULL" if value is None else render_literal(inner, value)
    if value is None:
        raise ForensicsError(f"NULL is not a {type_} (only Nullable types take NULL)")
    if (inner := _inner(t, "Array")) is not None:
        items = [value] if isinstance(value, (str, int, datetime)) else list(value)
        return f"CAST([{', '.join(render_literal(inner, v) for v in items)}] AS {t})"
    if isinstance(value, (list, tuple)):
        raise ForensicsError(f"one value expected for {type_}, got {len(value)}")
    if t == "String":
        if not isinstance(value, str):
            raise ForensicsError(f"a String must be text, got {type(value).__name__}")
        return _quote(value)
    if m := _INT.fullmatch(t):
        return str(_integer(value, unsigned=m.group(1) == "U", bits=int(m.group(2)), type_=type_))
    if t == _DATETIME:
        try:
            stamp = format_timestamp(parse_timestamp(value))
        except ValueError as exc:
            raise ForensicsError(
                f"{value!r} is not an RFC 3339 time with an offset, e.g. 2026-11-21T10:00:00Z"
            ) from exc
        return f"toDateTime64({_quote(stamp[:-1].replace('T', ' '))}, 3, 'UTC')"
    raise ForensicsError(f"unsupported parameter type {type_}")


def _integer(value: object, *, unsigned: bool, bits: int, type_: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise ForensicsError(f"{value!r} is not an integer")
    if isinstance(value, str):
        if not re.fullmatch(r"[+-]?[0-9]{1,20}", value.strip()):
            raise ForensicsError(f"{value!r} is not an integer")
        value = int(value.strip())
    low, high = (0, 2**bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    if not low <= value <= high:
        raise ForensicsError(f"{value} is outside {type_} ({low}..{high})")
    return value


# --------------------------------------------------------------------------- headers

# A type name with up to three levels of parentheses: Nullable(DateTime64(3, 'UTC')), Array(String).
_TYPE = r"\w+(?:\((?:[^()]|\((?:[^()]|\([^()]*\))*\))*\))?"
_PARAM = re.compile(rf"(\w+)\s+({_TYPE})\s*(?:=\s*(NULL|[+-]?[0-9]+|'[^']*'))?\s*:\s*(.+)")
_COLUMN = re.compile(r"(\w+)\s*:\s*(.+)")
_PLACEHOLDER = re.compile(r"\{db\}|\{(\w+):([^{}]+)\}")
_KEYS = ("question", "sql", "note", "param", "column")
_SQL_FROM = re.compile(r"^--\s*sql:", re.MULTILINE)


def _default(text: str | None) -> str | int | None:
    if text is None or text == "NULL":
        return None
    return text[1:-1] if text.startswith("'") else int(text)


def _header(text: str) -> tuple[list[tuple[str, str]], str]:
    """The header entries ``(key, text)`` in order, and the SQL after the header."""
    entries: list[list[str]] = []
    lines = text.splitlines()
    body_start = len(lines)
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped:
            continue
        if not stripped.startswith("--"):
            body_start = i
            break
        content = stripped[2:]
        if not content.strip():
            continue
        if content.startswith("   ") and entries:  # continuation of the previous entry
            entries[-1][1] += " " + content.strip()
            continue
        key, _, rest = content.strip().partition(" ")
        key = key.rstrip(":")
        if key not in _KEYS:
            raise ForensicsError(f"header line {i + 1} is not one of {', '.join(_KEYS)}")
        entries.append([key, rest.strip()])
    body = "\n".join(lines[body_start:]).strip().rstrip(";").strip()
    return [(k, t) for k, t in entries], body


def _param(rest: str) -> Param:
    if not (m := _PARAM.fullmatch(rest)):
        raise ForensicsError(f"cannot read `-- param {rest}` (want: param NAME Type [= default]: description)")
    pname, ptype, pdefault, pdesc = m.groups()
    param = Param(pname, ptype, pdesc.strip(), required=pdefault is None, default=_default(pdefault))
    if not param.required:
        try:
            render_literal(ptype, param.default)
        except ForensicsError as exc:
            raise ForensicsError(f"default of {pname}: {exc}") from None
    return param


def _fits(declared: str, placeholder: str) -> bool:
    """A declared type fills a placeholder of the same type, or of its Nullable form."""
    d, p = _norm(declared), _norm(placeholder)
    return p in (d, f"Nullable({d})")


def parse_query(name: str, text: str, others: Mapping[str, ForensicQuery] | None = None) -> ForensicQuery:
    """A query file's header and SQL; :class:`ForensicsError` names the first problem found.

    A header line ``-- sql: OTHER`` (and no SQL of its own) runs OTHER's SQL and returns its columns,
    with this file's question and parameters (found in ``others``).
    """
    try:
        entries, sql = _header(text)
        questions = [t for k, t in entries if k == "question"]
        if len(questions) != 1 or not questions[0]:
            raise ForensicsError("the header needs exactly one `-- question:` line")
        params: list[Param] = []
        for rest in (t for k, t in entries if k == "param"):
            param = _param(rest)
            if any(p.name == param.name for p in params):
                raise ForensicsError(f"parameter {param.name} is declared twice")
            params.append(param)
        columns = []
        for rest in (t for k, t in entries if k == "column"):
            if not (m := _COLUMN.fullmatch(rest)):
                raise ForensicsError(f"cannot read `-- column {rest}` (want: column NAME: description)")
            columns.append(Column(m.group(1), m.group(2).strip()))
        if borrowed := [t for k, t in entries if k == "sql"]:
            source = (others or {}).get(borrowed[0])
            if len(borrowed) > 1 or source is None or sql or columns:
                raise ForensicsError(f"`-- sql: {borrowed[0]}` needs that query, once, and no SQL or columns here")
            sql, columns = source.sql, list(source.columns)
        if not columns:
            raise ForensicsError("the header documents no `-- column` it returns")
        if not sql:
            raise ForensicsError("no SQL after the header")
        _check_placeholders(sql, params)
    except ForensicsError as exc:
        raise ForensicsError(f"forensic query {name}: {exc}") from None
    notes = tuple(t for k, t in entries if k == "note")
    return ForensicQuery(name, questions[0], tuple(params), tuple(columns), sql, notes)


def _check_placeholders(sql: str, params: Sequence[Param]) -> None:
    declared = {p.name: p for p in params}
    used: set[str] = set()
    for m in _PLACEHOLDER.finditer(sql):
        if m.group(1) is None:
            continue
        pname, ptype = m.groups()
        if pname not in declared:
            raise ForensicsError(f"{{{pname}:{ptype}}} is used but not declared in the header")
        if not _fits(declared[pname].type, ptype):
            raise ForensicsError(f"{{{pname}:{ptype}}} does not take the declared type {declared[pname].type}")
        used.add(pname)
    if unused := sorted(set(declared) - used):
        raise ForensicsError(f"declared but unused parameter(s): {', '.join(unused)}")


def load_queries() -> dict[str, ForensicQuery]:
    """Every query shipped in ``stream_jobs/forensics``, by name, in name order."""
    folder = resources.files("stream_jobs").joinpath("forensics")
    texts = {
        entry.name[: -len(".sql")]: entry.read_text(encoding="utf-8")
        for entry in folder.iterdir()
        if entry.name.endswith(".sql")
    }
    out: dict[str, ForensicQuery] = {}
    # Queries with SQL of their own first, then those that run another's (``-- sql: OTHER``).
    for name in sorted(texts, key=lambda n: (_SQL_FROM.search(texts[n]) is not None, n)):
        out[name] = parse_query(name, texts[name], out)
    return dict(sorted(out.items()))


# ---------------------------------------------------------------------------- binding


def bind(query: ForensicQuery, values: Mapping[str, ParamValue], database: str) -> str:
    """The query's SQL with ``{db}`` and every ``{name:Type}`` replaced by a checked literal."""
    if not _IDENT.fullmatch(database):
        raise ForensicsError(f"invalid database name {database!r}")
    known = {p.name for p in query.params}
    if unknown := sorted(set(values) - known):
        takes = ", ".join(p.name for p in query.params) or "no parameters"
        raise ForensicsError(f"{query.name}: unknown parameter(s) {', '.join(unknown)}; it takes {takes}")
    if missing := [p.name for p in query.params if p.required and p.name not in values]:
        raise ForensicsError(f"{query.name}: missing required parameter(s) {', '.join(missing)}")
    literals: dict[str, str] = {}
    for p in query.params:
        try:
            literals[p.name] = render_literal(p.type, values[p.name] if p.name in values else p.default)
        except ForensicsError as exc:
            raise ForensicsError(f"{query.name}: parameter {p.name} ({p.type}): {exc}") from None

    def substitute(m: re.Match[str]) -> str:
        return database if m.group(1) is None else literals[m.group(1)]

    return _PLACEHOLDER.sub(substitute, query.sql)


def parse_assignments(query: ForensicQuery, items: Sequence[str]) -> dict[str, ParamValue]:
    """``NAME=VALUE`` texts (as given on a command line) as values for :func:`bind`.

    An Array parameter collects every assignment to it; any other parameter may be given once.
    """
    values: dict[str, ParamValue] = {}
    collected: dict[str, list[str]] = {}
    for item in items:
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ForensicsError(f"{query.name}: --param {item!r} is not NAME=VALUE")
        param = query.param(name)
        if param is not None and _inner(_norm(param.type), "Array") is not None:
            collected.setdefault(name, []).append(value)
        elif name in values:
            raise ForensicsError(f"{query.name}: parameter {name} is given more than once")
        else:
            values[name] = value
    return {**values, **collected}
