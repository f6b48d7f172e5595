"""Expand the Grafana ClickHouse plugin's macros and template variables, as Grafana would.

Grafana substitutes template variables in the browser (``${name}``, ``${name:sqlstring}``, ``$name``)
and the plugin's backend expands the ``$__`` macros with the query's time range and interval. This
module does both, with the plugin's formulas (``pkg/macros/macros.go``), so a panel's SQL can be
run on ClickHouse (chDB in the tests) exactly as Grafana would send it. An unknown macro or variable
is an error, never left in the SQL.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Final

__all__ = ["MacroError", "TimeRange", "expand", "variables_in"]


class MacroError(ValueError):
    pass


@dataclass(frozen=True)
class TimeRange:
    start: datetime
    end: datetime
    interval_s: int = 60
    """Grafana's ``$__interval`` in seconds (the plugin uses at least 1)."""

    def seconds(self, t: datetime) -> str:
        return f"toDateTime({int(t.timestamp())})"

    def millis(self, t: datetime) -> str:
        return f"fromUnixTimestamp64Milli({int(t.timestamp() * 1000)})"


_ARG_MACROS: Final[dict[str, Callable[[TimeRange, str], str]]] = {
    "timeFilter": lambda r, c: f"{c} >= {r.seconds(r.start)} AND {c} <= {r.seconds(r.end)}",
    "timeFilter_ms": lambda r, c: f"{c} >= {r.millis(r.start)} AND {c} <= {r.millis(r.end)}",
    "timeInterval": lambda r, c: f"toStartOfInterval(toDateTime({c}), INTERVAL {max(r.interval_s, 1)} second)",
}
_PLAIN_MACROS: Final[dict[str, Callable[[TimeRange], str]]] = {
    "fromTime": lambda r: r.seconds(r.start),
    "toTime": lambda r: r.seconds(r.end),
    "fromTime_ms": lambda r: r.millis(r.start),
    "toTime_ms": lambda r: r.millis(r.end),
    "interval_s": lambda r: str(max(r.interval_s, 1)),
}
_FORMATS: Final[dict[str, Callable[[str], str]]] = {
    "raw": lambda v: v,
    "sqlstring": lambda v: "'" + v.replace("'", "''") + "'",
    "singlequote": lambda v: "'" + v.replace("\\", "\\\\").replace("'", "\\'") + "'",
}
_MACRO: Final = re.compile(r"\$__(\w+)")
_VARIABLE: Final = re.compile(r"\$\{(\w+)(?::(\w+))?\}|\$([A-Za-z_]\w*)")


def _macro_arg(sql: str, open_at: int, name: str) -> tuple[str, int]:
    """The argument of the macro whose ``(`` is at ``open_at`` and the index after its ``)``."""
    if open_at >= len(sql) or sql[open_at] != "(":
        raise MacroError(f"$__{name} needs an argument in parentheses")
    depth = 0
    for i in range(open_at, len(sql)):
        depth += {"(": 1, ")": -1}.get(sql[i], 0)
        if depth == 0:
            arg = sql[open_at + 1 : i].strip()
            if not arg or "," in arg:
                raise MacroError(f"$__{name} takes exactly one argument, got {arg!r}")
            return arg, i + 1
    raise MacroError(f"$__{name}: unbalanced parentheses")


def _expand_macros(sql: str, time_range: TimeRange) -> str:
    out: list[str] = []
    pos = 0
    for match in _MACRO.finditer(sql):
        if match.start() < pos:
            continue  # inside an argument already consumed
        out.append(sql[pos : match.start()])
        name = match.group(1)
        if name in _ARG_MACROS:
            arg, pos = _macro_arg(sql, match.end(), name)
            out.append(_ARG_MACROS[name](time_range, _expand_macros(arg, time_range)))
        elif name in _PLAIN_MACROS:
            out.append(_PLAIN_MACROS[name](time_range))
            pos = match.end()
        else:
            raise MacroError(f"unknown macro $__{name}")
    out.append(sql[pos:])
    return "".join(out)


def variables_in(sql: str) -> list[str]:
    """Names of the template variables ``sql`` uses, in order of first use (macros excluded)."""
    names: list[str] = []
    for match in _VARIABLE.finditer(sql):
        name = match.group(1) or match.group(3)
        if not name.startswith("__") and name not in names:
            names.append(name)
    return names


def expand(sql: str, time_range: TimeRange, variables: Mapping[str, str] | None = None) -> str:
    """``sql`` as the plugin sends it to ClickHouse for ``time_range`` and single-value ``variables``."""
    values = variables or {}

    def substitute(match: re.Match[str]) -> str:
        name = match.group(1) or match.group(3)
        fmt = match.group(2) or "raw"
        if name not in values:
            raise MacroError(f"unknown template variable ${name}")
        if fmt not in _FORMATS:
            raise MacroError(f"unsupported variable format {fmt!r} in ${{{name}:{fmt}}}")
        return _FORMATS[fmt](values[name])

    return _VARIABLE.sub(substitute, _expand_macros(sql, time_range))
