"""Create or update the datasource, folder, dashboards and alert rules in a running Grafana.

Idempotent by comparing before writing: each object is read first (``GET`` by uid) and written
only when it is missing or differs, so a second run against an unchanged Grafana issues no write.
"Differs" means some field scopewatch sets has another value; fields Grafana adds (ids, versions,
provenance, defaults) are ignored. Grafana never returns a datasource password: it is sent when the
datasource is created or updated, or when Grafana reports none is set; a changed password alone is
not detected.

Endpoints (Grafana HTTP API, through grafana-client): ``/api/datasources/uid/:uid`` and
``/api/datasources``; ``/api/folders/:uid`` and ``/api/folders``; ``/api/dashboards/uid/:uid`` and
``/api/dashboards/db``; ``/api/v1/provisioning/alert-rules[/:uid]``.
"""

# mypy: disable-error-code="no-untyped-call"
# (grafana-client's element methods carry no annotations)

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from grafana_client.api import GrafanaApi
from grafana_client.client import GrafanaClientError, GrafanaException
from niquests.exceptions import RequestException

from dashboards.build import Bundle
from dashboards.model import JSON

__all__ = ["Change", "ProvisionError", "Report", "provision", "same"]

Action = Literal["created", "updated", "unchanged"]


class ProvisionError(RuntimeError):
    pass


@dataclass(frozen=True)
class Change:
    kind: str
    uid: str
    title: str
    action: Action

    def __str__(self) -> str:
        return f"{self.kind} {self.uid} ({self.title}): {self.action}"


@dataclass
class Report:
    changes: list[Change] = field(default_factory=list)
    dry_run: bool = False

    @property
    def writes(self) -> int:
        return sum(c.action != "unchanged" for c in self.changes)


def same(want: Any, have: Any) -> bool:
    """Whether ``have`` (from Grafana) holds every value of ``want``; extra keys in ``have`` are ignored."""
    if isinstance(want, dict):
        return isinstance(have, dict) and all(k in have and same(v, have[k]) for k, v in want.items())
    if isinstance(want, list):
        return isinstance(have, list) and len(want) == len(have) and all(map(same, want, have))
    if isinstance(want, bool) or isinstance(have, bool):
        return want is have
    return bool(want == have)


def _failure(doing: str, exc: Exception) -> ProvisionError:
    return ProvisionError(f"{doing}: {exc.message if isinstance(exc, GrafanaException) else exc}")


def _read(what: str, call: Callable[[], Any]) -> JSON | None:
    """The object, or None when Grafana answers 404."""
    try:
        found = call()
    except GrafanaClientError as exc:
        if exc.status_code == 404:
            return None
        raise _failure(f"reading {what}", exc) from None
    except (GrafanaException, RequestException) as exc:
        raise _failure(f"reading {what}", exc) from None
    if not isinstance(found, dict):
        raise ProvisionError(f"reading {what}: unexpected answer {found!r:.200}")
    return found


def _write(what: str, call: Callable[[], Any]) -> None:
    try:
        call()
    except (GrafanaException, RequestException) as exc:
        raise _failure(f"writing {what}", exc) from None


class _Run:
    def __init__(self, api: GrafanaApi, bundle: Bundle, password: str | None, dry_run: bool) -> None:
        self.api, self.bundle, self.password = api, bundle, password
        self.report = Report(dry_run=dry_run)

    def apply(self, kind: str, uid: str, title: str, action: Action, write: Callable[[], Any]) -> None:
        if action != "unchanged" and not self.report.dry_run:
            _write(f"{kind} {uid}", write)
        self.report.changes.append(Change(kind, uid, title, action))

    def datasource(self) -> None:
        want = self.bundle.datasource_json()
        uid = want["uid"]
        have = _read(f"datasource {uid}", lambda: self.api.datasource.get_datasource_by_uid(uid))
        body = dict(want)
        if self.password is not None:
            body["secureJsonData"] = {"password": self.password}
        if have is None:
            self.apply("datasource", uid, want["name"], "created", lambda: self.api.datasource.create_datasource(body))
            return
        password_set = bool((have.get("secureJsonFields") or {}).get("password"))
        if same(want, have) and (password_set or self.password is None):
            self.apply("datasource", uid, want["name"], "unchanged", lambda: None)
            return
        if have.get("readOnly"):
            raise ProvisionError(
                f"datasource {uid} differs but Grafana provisions it from files (readOnly): change those files"
            )
        self.apply(
            "datasource",
            uid,
            want["name"],
            "updated",
            lambda: self.api.datasource.update_datasource_by_uid(uid, body),
        )

    def folder(self) -> None:
        uid, title = self.bundle.group.folder_uid, self.bundle.group.folder_title
        have = _read(f"folder {uid}", lambda: self.api.folder.get_folder(uid))
        if have is None:
            self.apply("folder", uid, title, "created", lambda: self.api.folder.create_folder(title, uid=uid))
        elif have.get("title") == title:
            self.apply("folder", uid, title, "unchanged", lambda: None)
        else:
            version = have.get("version")
            self.apply(
                "folder",
                uid,
                title,
                "updated",
                lambda: self.api.folder.update_folder(uid, title=title, version=version, overwrite=version is None),
            )

    def dashboards(self) -> None:
        folder = self.bundle.group.folder_uid
        for board in self.bundle.dashboards:
            want = board.json(self.bundle.datasource)
            have = _read(f"dashboard {board.uid}", partial(self.api.dashboard.get_dashboard, board.uid))
            if have is None:
                action: Action = "created"
            elif same(want, have.get("dashboard")) and (have.get("meta") or {}).get("folderUid") == folder:
                action = "unchanged"
            else:
                action = "updated"
            body = {
                "dashboard": want,
                "folderUid": folder,
                "overwrite": True,
                "message": "scopewatch dashboards provision",
            }
            self.apply("dashboard", board.uid, board.title, action, partial(self.api.dashboard.update_dashboard, body))

    def alert_rules(self) -> None:
        provisioning = self.api.alertingprovisioning
        for rule in self.bundle.alert_rules:
            want = rule.api_json(self.bundle.datasource, self.bundle.group)
            have = _read(f"alert rule {rule.uid}", partial(provisioning.get_alertrule, rule.uid))
            if have is None:
                self.apply("alert rule", rule.uid, rule.title, "created", partial(provisioning.create_alertrule, want))
            elif same(want, have):
                self.apply("alert rule", rule.uid, rule.title, "unchanged", lambda: None)
            else:
                update = partial(provisioning.update_alertrule, rule.uid, want)
                self.apply("alert rule", rule.uid, rule.title, "updated", update)


def provision(api: GrafanaApi, bundle: Bundle, password: str | None = None, dry_run: bool = False) -> Report:
    """Bring Grafana in line with ``bundle``: datasource, folder, dashboards, then alert rules.

    ``password``: the datasource's ClickHouse password (sent, never reported). ``dry_run``: read only,
    report what would change.
    """
    run = _Run(api, bundle, password, dry_run)
    run.datasource()
    run.folder()
    run.dashboards()
    run.alert_rules()
    return run.report
