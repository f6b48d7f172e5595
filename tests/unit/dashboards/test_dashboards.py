"""Dashboard JSON and provisioning files: snapshots, and the structure Grafana needs.

Snapshots live in ``snapshots/``; regenerate them after an intended change with
``SCOPEWATCH_UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest tests/unit/dashboards``.
"""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

from dashboards.alerts import ALERT_SEVERITIES, EXPRESSION_UID
from dashboards.build import Bundle, write_files
from dashboards.macros import TimeRange, expand, variables_in
from dashboards.model import DATASOURCE_TYPE, GRID_WIDTH, Panel
from detections.catalog import default_catalog
from scopewatch.dashboards_cli import dashboards_app

SNAPSHOTS = Path(__file__).parent / "snapshots"
UPDATE = os.environ.get("SCOPEWATCH_UPDATE_SNAPSHOTS") == "1"
BUNDLE = Bundle()
DS = BUNDLE.datasource
UID = re.compile(r"^[A-Za-z0-9_-]{1,40}$")


def check_snapshot(name: str, text: str) -> None:
    path = SNAPSHOTS / name
    if UPDATE:
        SNAPSHOTS.mkdir(exist_ok=True)
        path.write_text(text, encoding="utf-8")
    assert path.exists(), f"no snapshot {name}: run with SCOPEWATCH_UPDATE_SNAPSHOTS=1"
    assert text == path.read_text(encoding="utf-8"), f"{name} changed: review, then SCOPEWATCH_UPDATE_SNAPSHOTS=1"


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("grafana")
    write_files(BUNDLE, out, "/etc/scopewatch-grafana", "GRAFANA_CLICKHOUSE_PASSWORD")
    return out


def board_json(uid: str) -> dict[str, Any]:
    return next(b.json(DS) for b in BUNDLE.dashboards if b.uid == uid)


@pytest.mark.parametrize("uid", [b.uid for b in BUNDLE.dashboards])
def test_dashboard_json_matches_its_snapshot(uid: str, built: Path) -> None:
    text = (built / "dashboards" / f"{uid}.json").read_text(encoding="utf-8")
    assert json.loads(text) == board_json(uid)
    check_snapshot(f"{uid}.json", text)


@pytest.mark.parametrize("kind", ["datasources", "dashboards", "alerting"])
def test_provisioning_files_match_their_snapshots_and_are_yaml(kind: str, built: Path) -> None:
    text = (built / "provisioning" / kind / "scopewatch.yaml").read_text(encoding="utf-8")
    assert yaml.safe_load(text)["apiVersion"] == 1
    check_snapshot(f"provisioning-{kind}.yaml", text)


def test_build_writes_the_layout_grafana_reads(built: Path) -> None:
    files = sorted(str(p.relative_to(built)) for p in built.rglob("*") if p.is_file())
    assert files == sorted(
        [f"dashboards/{b.uid}.json" for b in BUNDLE.dashboards]
        + [f"provisioning/{k}/scopewatch.yaml" for k in ("alerting", "dashboards", "datasources")]
    )
    assert (built / "provisioning" / "plugins").is_dir()
    datasource = yaml.safe_load((built / "provisioning/datasources/scopewatch.yaml").read_text())["datasources"][0]
    assert datasource["secureJsonData"] == {"password": "${GRAFANA_CLICKHOUSE_PASSWORD}"}  # a reference, no secret
    assert (datasource["uid"], datasource["type"]) == (DS.uid, DATASOURCE_TYPE)
    provider = yaml.safe_load((built / "provisioning/dashboards/scopewatch.yaml").read_text())["providers"][0]
    assert provider["options"]["path"] == "/etc/scopewatch-grafana/dashboards"


@pytest.mark.parametrize("uid", [b.uid for b in BUNDLE.dashboards])
def test_panels_have_unique_ids_and_tile_the_grid(uid: str) -> None:
    board = board_json(uid)
    assert UID.match(board["uid"])
    panels = board["panels"]
    assert [p["id"] for p in panels] == list(range(1, len(panels) + 1))
    cells: set[tuple[int, int]] = set()
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= GRID_WIDTH and g["h"] > 0, p["title"]
        mine = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
        assert not mine & cells, f"{p['title']} overlaps another panel"
        cells |= mine
    assert len({p["title"] for p in panels}) == len(panels)


def _datasource_refs(node: Any) -> list[Any]:
    if isinstance(node, dict):
        found = [node["datasource"]] if "datasource" in node else []
        return found + [ref for value in node.values() for ref in _datasource_refs(value)]
    if isinstance(node, list):
        return [ref for item in node for ref in _datasource_refs(item)]
    return []


@pytest.mark.parametrize("uid", [b.uid for b in BUNDLE.dashboards])
def test_every_query_uses_the_scopewatch_datasource(uid: str) -> None:
    board = board_json(uid)
    refs = _datasource_refs(board)
    assert refs and all(ref == {"type": DATASOURCE_TYPE, "uid": DS.uid} for ref in refs)
    for panel in board["panels"]:
        if panel["type"] == "text":
            assert "targets" not in panel and panel["options"]["content"]
            continue
        assert panel["datasource"] == DS.json()
        [target] = panel["targets"]
        assert (target["refId"], target["editorType"], target["datasource"]) == ("A", "sql", DS.json())
        assert target["format"] in (0, 1) and target["rawSql"].lstrip().upper().startswith(("SELECT", "WITH"))
        assert "{db}" not in target["rawSql"] and f"{BUNDLE.database}." in target["rawSql"]


@pytest.mark.parametrize("uid", [b.uid for b in BUNDLE.dashboards])
def test_variables_resolve_in_order_and_every_macro_expands(uid: str) -> None:
    board = next(b for b in BUNDLE.dashboards if b.uid == uid)
    defined: list[str] = []
    for variable in board.variables:
        assert set(variables_in(variable.query.sql)) <= set(defined), f"{variable.name} uses a later variable"
        assert len(variable.query.columns) == 1
        defined.append(variable.name)
    values = dict.fromkeys(defined, "it's")
    window = TimeRange(datetime(2026, 11, 21, 9, tzinfo=UTC), datetime(2026, 11, 21, 10, tzinfo=UTC))
    for name, query in board.queries():
        assert set(variables_in(query.sql)) <= set(defined), name
        sql = expand(query.sql, window, values)
        assert "$" not in sql, name
        if variables_in(query.sql):
            assert "'it''s'" in sql, name  # values are quoted for SQL (${var:sqlstring})
    templating = board_json(uid)["templating"]["list"]
    assert [v["name"] for v in templating] == defined
    assert all(v["query"] == v["definition"] and not v["multi"] and not v["includeAll"] for v in templating)


def test_the_drill_down_link_names_the_drill_down_variables() -> None:
    drill = next(b for b in BUNDLE.dashboards if b.uid == "scopewatch-delegation")
    names = {v.name for v in drill.variables}
    panels: list[Panel] = [p for b in BUNDLE.dashboards for p in b.panels if p.links]
    assert panels
    for panel in panels:
        assert panel.query is not None
        for link in panel.links:
            assert link.url.startswith(f"/d/{drill.uid}?")
            for var, field in re.findall(r"var-(\w+)=\$\{__data\.fields\.(\w+)\}", link.url):
                assert var in names and field in panel.query.columns


def test_alert_rules_cover_the_main_detections_and_are_well_formed() -> None:
    rules = BUNDLE.alert_rules
    catalog = {r.id for r in default_catalog() if r.meta.severity in ALERT_SEVERITIES}
    assert {r.rule_id for r in rules} == catalog
    assert {"revoked_grant", "identity_mismatch", "exfiltration_chain", "use_after_revocation"} <= catalog
    assert len({r.uid for r in rules}) == len(rules) and all(UID.match(r.uid) for r in rules)
    for rule in rules:
        body = rule.api_json(DS, BUNDLE.group)
        refs = [d["refId"] for d in body["data"]]
        assert body["condition"] == refs[-1] == "C"
        for i, query in enumerate(body["data"]):
            assert query["datasourceUid"] in (DS.uid, EXPRESSION_UID)
            assert query["relativeTimeRange"] == {"from": 300, "to": 0}
            if query["datasourceUid"] == EXPRESSION_UID:
                assert query["model"]["expression"] in refs[:i]
        assert body["labels"]["severity"] == rule.severity and body["labels"]["rule_id"] == rule.rule_id
        board = board_json(body["annotations"]["__dashboardUid__"])
        panel = board["panels"][int(body["annotations"]["__panelId__"]) - 1]
        assert panel["title"] == "Open findings"
        assert body["folderUID"] == BUNDLE.group.folder_uid and body["for"] == "0s"
        placement = ("folderUID", "ruleGroup", "orgID")
        assert {k: v for k, v in body.items() if k not in placement} == rule.file_json(DS)


def test_cli_build_writes_the_files(tmp_path: Path) -> None:
    result = CliRunner().invoke(dashboards_app, ["build", "--out", str(tmp_path / "g"), "--database", "audit"])
    assert result.exit_code == 0, result.output
    printed = result.stdout.split()
    assert len(printed) == 7 and all(Path(p).is_file() for p in printed)
    board = json.loads((tmp_path / "g/dashboards/scopewatch-findings.json").read_text())
    assert "FROM audit.findings" in board["panels"][0]["targets"][0]["rawSql"]
    bad = CliRunner().invoke(dashboards_app, ["build", "--out", str(tmp_path), "--database", "x; DROP"])
    assert bad.exit_code == 2 and "invalid database name" in bad.output


def test_the_pipeline_board_watches_every_raw_table_the_sink_writes() -> None:
    """Ingestion delay and collector gaps cover each raw-event table, new ones included."""
    from dashboards.boards import _CHAINED_TABLES, _RAW_TABLES
    from stream_jobs.tables import RAW_TABLES

    assert {t for t, _ in _RAW_TABLES} == {*RAW_TABLES, "evidence"}
    assert set(_CHAINED_TABLES) == set(RAW_TABLES)


# A read through `evidence` or `evidence_final` hashes the whole list tables (migration 0010, bench/HISTORY.md
# h16rd): a board reads evidence_rows where it needs no reasons or fact lists, evidence_current for current verdicts.
JOINED_EVIDENCE_VIEW = re.compile(r"\{db\}\.evidence(?!\w)|evidence_final|\bevidence\s+FINAL\b")


def test_no_board_or_alert_reads_the_joined_evidence_views() -> None:
    db = f"{BUNDLE.database}."  # the bundle's SQL names its database: compare with the source's {db}
    queries = [(f"{b.uid} {name}", q.sql.replace(db, "{db}.")) for b in BUNDLE.dashboards for name, q in b.queries()]
    queries += [(f"alert {r.rule_id}", json.dumps(r.file_json(DS)).replace(db, "{db}.")) for r in BUNDLE.alert_rules]
    assert all("{db}.findings" in sql for name, sql in queries if name.startswith("alert"))
    assert any("{db}.evidence_rows" in sql for _, sql in queries)
    for name, sql in queries:
        assert not JOINED_EVIDENCE_VIEW.search(sql), name
        for table in re.findall(r"\{db\}\.(evidence\w*)", sql):
            assert table in ("evidence_rows", "evidence_current"), (name, table)
