"""`scopewatch dashboards provision` against a real local HTTP server that answers like Grafana (conftest)."""

from __future__ import annotations

from typing import Any

import pytest
from grafana_client.api import GrafanaApi
from typer.testing import CliRunner

from dashboards.build import Bundle
from dashboards.provision import ProvisionError, Report, provision, same
from scopewatch.dashboards_cli import dashboards_app

PASSWORD = "ch-password-not-for-print"


def run(grafana: Any, bundle: Bundle | None = None, token: str | None = None, **kwargs: Any) -> Report:
    api = GrafanaApi.from_url(grafana.url, credential=token or grafana.token)
    return provision(api, bundle or Bundle(), **kwargs)


def expected_requests(bundle: Bundle) -> list[tuple[str, str]]:
    out = [
        ("GET", f"/api/datasources/uid/{bundle.datasource.uid}"),
        ("POST", "/api/datasources"),
        ("GET", f"/api/folders/{bundle.group.folder_uid}"),
        ("POST", "/api/folders"),
    ]
    for board in bundle.dashboards:
        out += [("GET", f"/api/dashboards/uid/{board.uid}"), ("POST", "/api/dashboards/db")]
    for rule in bundle.alert_rules:
        out += [("GET", f"/api/v1/provisioning/alert-rules/{rule.uid}"), ("POST", "/api/v1/provisioning/alert-rules")]
    return out


def test_first_run_sends_exactly_the_grafana_requests(grafana: Any) -> None:
    bundle = Bundle()
    report = run(grafana, password=PASSWORD)

    assert [(r.method, r.path) for r in grafana.requests] == expected_requests(bundle)
    assert {r.authorization for r in grafana.requests} == {f"Bearer {grafana.token}"}
    assert not any("x-disable-provenance" in r.headers for r in grafana.requests)  # as code: not editable in the UI
    bodies = [r.body for r in grafana.writes()]
    assert bodies[0] == {**bundle.datasource_json(), "secureJsonData": {"password": PASSWORD}}
    assert bodies[1] == {"title": "scopewatch", "uid": "scopewatch"}
    ds = bundle.datasource
    boards = [
        {
            "dashboard": b.json(ds),
            "folderUid": "scopewatch",
            "overwrite": True,
            "message": "scopewatch dashboards provision",
        }
        for b in bundle.dashboards
    ]
    assert bodies[2:6] == boards
    assert bodies[6:] == [rule.api_json(ds, bundle.group) for rule in bundle.alert_rules]

    assert grafana.passwords == {ds.uid: PASSWORD}
    assert set(grafana.dashboards) == {b.uid for b in bundle.dashboards}
    assert {r["folderUID"] for r in grafana.rules.values()} == {"scopewatch"}
    assert report.writes == len(report.changes) == 2 + 4 + len(bundle.alert_rules)
    assert {c.action for c in report.changes} == {"created"}


def test_second_run_issues_no_writes(grafana: Any) -> None:
    run(grafana, password=PASSWORD)
    mark = len(grafana.requests)
    report = run(grafana, password=PASSWORD)
    assert grafana.writes(mark) == []
    assert all(r.method == "GET" for r in grafana.requests[mark:])
    assert report.writes == 0 and {c.action for c in report.changes} == {"unchanged"}
    run(grafana)  # without a password: still nothing to write
    assert grafana.writes(mark) == []


def test_drift_is_repaired_with_one_write_per_changed_object(grafana: Any) -> None:
    bundle = Bundle()
    run(grafana, password=PASSWORD)
    grafana.datasources[bundle.datasource.uid]["jsonData"]["host"] = "elsewhere"
    board = bundle.dashboards[1]
    grafana.dashboards[board.uid]["dashboard"]["panels"][0]["title"] = "edited in the UI"
    rule = bundle.alert_rules[0]
    grafana.rules[rule.uid]["labels"]["severity"] = "info"
    grafana.folders["scopewatch"]["title"] = "renamed"
    mark = len(grafana.requests)

    report = run(grafana, password=PASSWORD)

    assert [(r.method, r.path) for r in grafana.writes(mark)] == [
        ("PUT", f"/api/datasources/uid/{bundle.datasource.uid}"),
        ("PUT", "/api/folders/scopewatch"),
        ("POST", "/api/dashboards/db"),
        ("PUT", f"/api/v1/provisioning/alert-rules/{rule.uid}"),
    ]
    assert grafana.writes(mark)[1].body == {"title": "scopewatch", "version": 1}
    assert grafana.writes(mark)[2].body["dashboard"]["uid"] == board.uid
    assert report.writes == 4
    assert {str(c) for c in report.changes if c.action == "updated"} == {
        f"datasource {bundle.datasource.uid} (scopewatch ClickHouse): updated",
        "folder scopewatch (scopewatch): updated",
        f"dashboard {board.uid} ({board.title}): updated",
        f"alert rule {rule.uid} ({rule.title}): updated",
    }
    mark = len(grafana.requests)
    run(grafana, password=PASSWORD)
    assert grafana.writes(mark) == []


def test_a_missing_password_is_set_even_when_nothing_else_changed(grafana: Any) -> None:
    run(grafana)
    assert grafana.passwords == {}
    mark = len(grafana.requests)
    run(grafana, password=PASSWORD)
    assert [(r.method, r.path) for r in grafana.writes(mark)] == [("PUT", "/api/datasources/uid/scopewatch-clickhouse")]
    assert grafana.passwords == {"scopewatch-clickhouse": PASSWORD}


def test_dry_run_only_reads(grafana: Any) -> None:
    report = run(grafana, dry_run=True)
    assert grafana.writes() == []
    assert report.dry_run and report.writes == len(report.changes)


def test_a_read_only_datasource_is_not_overwritten(grafana: Any) -> None:
    run(grafana)
    ds = grafana.datasources["scopewatch-clickhouse"]
    ds.update(readOnly=True, jsonData={**ds["jsonData"], "port": 9000})
    mark = len(grafana.requests)
    with pytest.raises(ProvisionError, match="provisions it from files"):
        run(grafana)
    assert grafana.writes(mark) == []


def test_a_bad_token_is_a_clear_error_that_does_not_echo_it(grafana: Any) -> None:
    wrong = "glsa_wrong-token-value"
    with pytest.raises(ProvisionError) as caught:
        run(grafana, token=wrong)
    assert "Unauthorized" in str(caught.value) and "datasource" in str(caught.value)
    assert wrong not in str(caught.value) and grafana.token not in str(caught.value)
    assert grafana.writes() == []


def test_an_unreachable_grafana_is_a_clear_error(grafana: Any) -> None:
    url = grafana.url
    grafana.stop()
    api = GrafanaApi.from_url(url, credential="t", timeout=2.0)
    with pytest.raises(ProvisionError, match="reading datasource"):
        provision(api, Bundle())


def test_cli_provision_reports_what_it_did_and_never_prints_secrets(grafana: Any) -> None:
    env = {"GRAFANA_TOKEN": grafana.token, "GRAFANA_CLICKHOUSE_PASSWORD": PASSWORD}
    first = CliRunner().invoke(dashboards_app, ["provision", "--url", grafana.url], env=env)
    assert first.exit_code == 0, first.output
    # 15 objects: datasource, folder, dashboards and one alert rule per high/critical detection rule
    assert "dashboard scopewatch-soc-overview (scopewatch · SOC overview): created" in first.stdout
    assert f"{grafana.url}: wrote 15 of 15 objects" in first.stderr
    second = CliRunner().invoke(dashboards_app, ["provision", "--url", grafana.url], env=env)
    assert second.exit_code == 0 and "wrote 0 of 15 objects" in second.stderr
    for result in (first, second):
        assert grafana.token not in result.output and PASSWORD not in result.output
    bad = CliRunner().invoke(dashboards_app, ["provision", "--url", grafana.url], env={**env, "GRAFANA_TOKEN": "x"})
    assert bad.exit_code == 1 and "Unauthorized" in bad.stderr


def test_cli_provision_refuses_credentials_in_the_url(grafana: Any) -> None:
    url = grafana.url.replace("http://", "http://admin:hunter2@")
    result = CliRunner().invoke(dashboards_app, ["provision", "--url", url, "--token", "t"])
    assert result.exit_code == 2 and "without credentials" in result.output
    assert grafana.requests == []


@pytest.mark.parametrize(
    ("want", "have", "expected"),
    [
        ({"a": 1}, {"a": 1, "id": 7}, True),
        ({"a": {"b": [1, {"c": 2}]}}, {"a": {"b": [1, {"c": 2, "x": 0}]}}, True),
        ({"a": [1, 2]}, {"a": [1, 2, 3]}, False),
        ({"a": False}, {"a": 0}, False),
        ({"a": None}, {}, False),
        ({"a": 1.0}, {"a": 1}, True),
    ],
)
def test_same_ignores_only_what_grafana_adds(want: Any, have: Any, expected: bool) -> None:
    assert same(want, have) is expected


def test_help_never_shows_the_token_or_password_from_the_environment() -> None:
    env = {"GRAFANA_TOKEN": "glsa_from-env", "GRAFANA_CLICKHOUSE_PASSWORD": PASSWORD}
    result = CliRunner().invoke(dashboards_app, ["provision", "--help"], env=env)
    assert result.exit_code == 0 and "--token" in result.output
    assert "glsa_from-env" not in result.output and PASSWORD not in result.output
