"""The macro expander against the ClickHouse plugin's formulas (grafana/clickhouse-datasource pkg/macros)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from dashboards.macros import MacroError, TimeRange, expand, variables_in

WINDOW = TimeRange(datetime(2026, 11, 21, 9, 0, tzinfo=UTC), datetime(2026, 11, 21, 10, 0, 0, 500_000, tzinfo=UTC), 30)
FROM, TO = 1795251600, 1795255200


@pytest.mark.parametrize(
    ("sql", "expected"),
    [
        ("$__timeFilter(t)", f"t >= toDateTime({FROM}) AND t <= toDateTime({TO})"),
        ("$__timeFilter( e.call_time )", f"e.call_time >= toDateTime({FROM}) AND e.call_time <= toDateTime({TO})"),
        (
            "$__timeFilter_ms(t)",
            f"t >= fromUnixTimestamp64Milli({FROM}000) AND t <= fromUnixTimestamp64Milli({TO}500)",
        ),
        ("$__fromTime, $__toTime", f"toDateTime({FROM}), toDateTime({TO})"),
        ("$__fromTime_ms", f"fromUnixTimestamp64Milli({FROM}000)"),
        ("$__interval_s", "30"),
        ("$__timeInterval(t)", "toStartOfInterval(toDateTime(t), INTERVAL 30 second)"),
        ("$__timeFilter(toDate(t))", f"toDate(t) >= toDateTime({FROM}) AND toDate(t) <= toDateTime({TO})"),
    ],
)
def test_macros_expand_like_the_plugin(sql: str, expected: str) -> None:
    assert expand(sql, WINDOW) == expected


def test_the_interval_is_at_least_one_second() -> None:
    assert expand("$__interval_s", TimeRange(WINDOW.start, WINDOW.end, 0)) == "1"


def test_variables_are_substituted_with_their_format() -> None:
    values = {"tenant": "acme", "principal": "o'brien@acme.example"}
    sql = "t = ${tenant:sqlstring} AND p = ${principal:sqlstring} AND r = '$tenant' AND s = ${principal:singlequote}"
    assert expand(sql, WINDOW, values) == (
        "t = 'acme' AND p = 'o''brien@acme.example' AND r = 'acme' AND s = 'o\\'brien@acme.example'"
    )


def test_variables_in_names_template_variables_only() -> None:
    sql = (
        "WHERE $__timeFilter(t) AND a = ${tenant:sqlstring} AND b = $principal AND c = '${__data.fields.x}' AND $tenant"
    )
    assert variables_in(sql) == ["tenant", "principal"]


@pytest.mark.parametrize(
    ("sql", "error"),
    [
        ("$__nope(t)", "unknown macro"),
        ("$__timeFilter", "needs an argument"),
        ("$__timeFilter(a, b)", "exactly one argument"),
        ("$__timeFilter(f(t)", "unbalanced"),
        ("x = $missing", "unknown template variable"),
        ("x = ${tenant:csv}", "unsupported variable format"),
    ],
)
def test_mistakes_are_errors_never_left_in_the_sql(sql: str, error: str) -> None:
    with pytest.raises(MacroError, match=error):
        expand(sql, WINDOW, {"tenant": "acme"})
