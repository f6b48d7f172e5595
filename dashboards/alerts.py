"""Grafana-managed alert rules for the main detections, for teams that page through Grafana.

One rule per detection rule of the catalog with severity ``high`` or ``critical`` (revoked_grant,
identity_mismatch, exfiltration_chain, use_after_revocation, tool_rug_pull, violation_burst): it
fires, per tenant, when that rule raised at least one finding that reached ClickHouse in the last
5 minutes (``_ingested_at``, so a late finding still alerts). Query A counts, B reduces, C is the
threshold ``> 0``. No data means no finding: the rule is then OK, not alerting.

The same rule has two JSON shapes: the provisioning HTTP API's (``/api/v1/provisioning/alert-rules``,
with ``folderUID`` and ``ruleGroup``) and file provisioning's (inside a group that names its folder).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from dashboards.model import JSON, DatasourceRef, Query
from detections.catalog import default_catalog

__all__ = ["ALERT_SEVERITIES", "AlertRule", "RuleGroup", "detection_alerts"]

ALERT_SEVERITIES: Final = ("critical", "high")
EXPRESSION_UID: Final = "__expr__"
WINDOW_SECONDS: Final = 300


@dataclass(frozen=True)
class RuleGroup:
    folder_uid: str
    folder_title: str
    name: str = "scopewatch-detections"
    interval: str = "1m"


@dataclass(frozen=True)
class AlertRule:
    uid: str
    title: str
    rule_id: str
    severity: str
    runbook: str
    query: Query
    dashboard_uid: str | None = None
    panel_id: int | None = None

    def _data(self, ds: DatasourceRef) -> list[JSON]:
        window = {"from": WINDOW_SECONDS, "to": 0}
        return [
            {
                "refId": "A",
                "relativeTimeRange": window,
                "datasourceUid": ds.uid,
                "model": {**self.query.target(ds), "intervalMs": 1000, "maxDataPoints": 43200},
            },
            {
                "refId": "B",
                "relativeTimeRange": window,
                "datasourceUid": EXPRESSION_UID,
                "model": {"refId": "B", "type": "reduce", "expression": "A", "reducer": "last"},
            },
            {
                "refId": "C",
                "relativeTimeRange": window,
                "datasourceUid": EXPRESSION_UID,
                "model": {
                    "refId": "C",
                    "type": "threshold",
                    "expression": "B",
                    "conditions": [{"evaluator": {"type": "gt", "params": [0]}}],
                },
            },
        ]

    def _common(self, ds: DatasourceRef) -> JSON:
        annotations: dict[str, Any] = {
            "summary": f"{{{{ $values.B }}}} {self.rule_id} finding(s) in tenant {{{{ $labels.tenant }}}} "
            f"in the last {WINDOW_SECONDS // 60} minutes",
            "description": self.title,
            "runbook": self.runbook,
        }
        if self.dashboard_uid is not None and self.panel_id is not None:
            annotations["__dashboardUid__"] = self.dashboard_uid
            annotations["__panelId__"] = str(self.panel_id)
        return {
            "uid": self.uid,
            "title": self.title,
            "condition": "C",
            "data": self._data(ds),
            "noDataState": "OK",
            "execErrState": "Error",
            "for": "0s",
            "annotations": annotations,
            "labels": {"source": "scopewatch", "rule_id": self.rule_id, "severity": self.severity},
            "isPaused": False,
        }

    def api_json(self, ds: DatasourceRef, group: RuleGroup) -> JSON:
        """Body of ``POST /api/v1/provisioning/alert-rules`` (and of the ``PUT`` by uid)."""
        return {**self._common(ds), "folderUID": group.folder_uid, "ruleGroup": group.name, "orgID": 1}

    def file_json(self, ds: DatasourceRef) -> JSON:
        """One entry of ``groups[].rules`` in an alerting provisioning file."""
        return self._common(ds)


def provisioning_file(rules: list[AlertRule], ds: DatasourceRef, group: RuleGroup) -> JSON:
    """An alerting provisioning file: one group in the folder, every rule."""
    return {
        "apiVersion": 1,
        "groups": [
            {
                "orgId": 1,
                "name": group.name,
                "folder": group.folder_title,
                "interval": group.interval,
                "rules": [rule.file_json(ds) for rule in rules],
            }
        ],
    }


def detection_alerts(database: str, dashboard_uid: str | None = None, panel_id: int | None = None) -> list[AlertRule]:
    """An alert rule per high or critical detection rule of the catalog, in catalog order."""
    out: list[AlertRule] = []
    for rule in default_catalog():
        meta = rule.meta
        if meta.severity not in ALERT_SEVERITIES:
            continue
        sql = (
            "SELECT tenant, uniqExact(finding_id) AS findings\n"
            f"FROM {database}.findings\n"
            f"WHERE rule_id = '{meta.id}' AND $__timeFilter(_ingested_at)\n"
            "GROUP BY tenant\nORDER BY tenant"
        )
        out.append(
            AlertRule(
                uid=f"scopewatch-{meta.id.replace('_', '-')}",
                title=f"scopewatch: {meta.title}",
                rule_id=meta.id,
                severity=meta.severity,
                runbook="\n".join(meta.numbered_runbook()),
                query=Query(sql, ("tenant", "findings")),
                dashboard_uid=dashboard_uid,
                panel_id=panel_id,
            )
        )
    return out
