"""Small typed builders for Grafana dashboards on the ClickHouse datasource plugin.

grafana-foundation-sdk has no query type for ``grafana-clickhouse-datasource`` (its targets would be
untyped dicts), so the few shapes scopewatch needs are built here: a query (raw SQL, table or time
series), a panel, a query variable and a dashboard. ``Dashboard.json()`` gives the dashboard model
Grafana stores (``POST /api/dashboards/db`` and file provisioning take the same JSON); panel ids and
grid positions are assigned there, in panel order.

Every :class:`Query` also names the columns it returns: not sent to Grafana, but checked against
ClickHouse by the tests (every panel's SQL runs on chDB with its macros expanded).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass
from enum import IntEnum
from typing import Any, Final, Literal

DATASOURCE_TYPE: Final = "grafana-clickhouse-datasource"
SCHEMA_VERSION: Final = 41
GRID_WIDTH: Final = 24

JSON = dict[str, Any]
PanelKind = Literal["timeseries", "table", "stat", "text"]


class Format(IntEnum):
    """The plugin's ``format`` (sqlutil.FormatQueryOption): how result rows become frames."""

    TIME_SERIES = 0
    TABLE = 1


@dataclass(frozen=True)
class DatasourceRef:
    uid: str
    type: str = DATASOURCE_TYPE

    def json(self) -> JSON:
        return {"type": self.type, "uid": self.uid}


@dataclass(frozen=True)
class Query:
    """One raw-SQL query of the ClickHouse plugin. ``columns``: what it returns, in order."""

    sql: str
    columns: tuple[str, ...]
    format: Format = Format.TABLE

    def target(self, ds: DatasourceRef, ref_id: str = "A") -> JSON:
        return {
            "refId": ref_id,
            "datasource": ds.json(),
            "editorType": "sql",
            "format": int(self.format),
            "queryType": "timeSeries" if self.format is Format.TIME_SERIES else "table",
            "rawSql": self.sql,
        }


@dataclass(frozen=True)
class Link:
    """A data link on every field of a panel (Grafana interpolates ``${__data.fields.x}``)."""

    title: str
    url: str

    def json(self) -> JSON:
        return {"title": self.title, "url": self.url}


@dataclass(frozen=True)
class Panel:
    title: str
    kind: PanelKind
    query: Query | None = None
    description: str = ""
    width: int = 12
    height: int = 8
    unit: str | None = None
    red_from: float | None = None
    """Thresholds: green below, red from this value (stat and table panels)."""
    links: tuple[Link, ...] = ()
    text: str = ""
    """Markdown of a text panel."""

    def __post_init__(self) -> None:
        if (self.kind == "text") == (self.query is not None):
            raise ValueError(f"panel {self.title!r}: a text panel has text, every other panel a query")
        if not 1 <= self.width <= GRID_WIDTH or self.height < 1:
            raise ValueError(f"panel {self.title!r}: bad size {self.width}x{self.height}")

    def json(self, ds: DatasourceRef, panel_id: int, x: int, y: int) -> JSON:
        out: JSON = {
            "id": panel_id,
            "type": self.kind,
            "title": self.title,
            "gridPos": {"h": self.height, "w": self.width, "x": x, "y": y},
        }
        if self.description:
            out["description"] = self.description
        if self.query is None:
            out["options"] = {"mode": "markdown", "content": self.text}
            return out
        defaults: JSON = {}
        if self.unit is not None:
            defaults["unit"] = self.unit
        if self.red_from is not None:
            defaults["color"] = {"mode": "thresholds"}
            defaults["thresholds"] = {
                "mode": "absolute",
                "steps": [{"color": "green", "value": None}, {"color": "red", "value": self.red_from}],
            }
        if self.links:
            defaults["links"] = [link.json() for link in self.links]
        out.update(
            datasource=ds.json(),
            targets=[self.query.target(ds)],
            fieldConfig={"defaults": defaults, "overrides": []},
            options=copy.deepcopy(_OPTIONS[self.kind]),
        )
        return out


_OPTIONS: Final[Mapping[str, JSON]] = {
    "timeseries": {
        "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
        "tooltip": {"mode": "multi", "sort": "desc"},
    },
    "table": {"showHeader": True, "cellHeight": "sm"},
    "stat": {
        "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
        "colorMode": "value",
        "graphMode": "none",
        "justifyMode": "auto",
        "orientation": "auto",
        "textMode": "auto",
    },
}


@dataclass(frozen=True)
class Variable:
    """A single-value query variable; its query returns one column, the values to choose from."""

    name: str
    label: str
    query: Query

    def json(self, ds: DatasourceRef) -> JSON:
        return {
            "type": "query",
            "name": self.name,
            "label": self.label,
            "datasource": ds.json(),
            "query": self.query.sql,
            "definition": self.query.sql,
            "refresh": 2,
            "sort": 1,
            "multi": False,
            "includeAll": False,
            "hide": 0,
        }


_DASHBOARD_LINKS: Final[JSON] = {
    "type": "dashboards",
    "title": "scopewatch",
    "tags": ["scopewatch"],
    "asDropdown": True,
    "includeVars": False,
    "keepTime": True,
}


@dataclass(frozen=True)
class Dashboard:
    uid: str
    title: str
    description: str
    panels: tuple[Panel, ...]
    variables: tuple[Variable, ...] = ()
    tags: tuple[str, ...] = ("scopewatch",)
    time_from: str = "now-6h"
    refresh: str = "1m"

    def queries(self) -> list[tuple[str, Query]]:
        """Every query of the dashboard, named (variables first, in order, then panels)."""
        named = [(f"variable {v.name}", v.query) for v in self.variables]
        return named + [(f"panel {p.title}", p.query) for p in self.panels if p.query is not None]

    def json(self, ds: DatasourceRef) -> JSON:
        panels: list[JSON] = []
        x = y = row_height = 0
        for panel_id, panel in enumerate(self.panels, start=1):
            if x + panel.width > GRID_WIDTH:
                x, y, row_height = 0, y + row_height, 0
            panels.append(panel.json(ds, panel_id, x, y))
            x += panel.width
            row_height = max(row_height, panel.height)
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": list(self.tags),
            "timezone": "utc",
            "editable": False,
            "graphTooltip": 1,
            "schemaVersion": SCHEMA_VERSION,
            "time": {"from": self.time_from, "to": "now"},
            "refresh": self.refresh,
            "links": [copy.deepcopy(_DASHBOARD_LINKS)],
            "templating": {"list": [v.json(ds) for v in self.variables]},
            "panels": panels,
        }
