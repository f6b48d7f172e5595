"""A real HTTP server on 127.0.0.1 that answers the Grafana API endpoints scopewatch uses, as Grafana does.

No Grafana binary can run on these machines, so provisioning is tested against this server: it keeps
datasources, folders, dashboards and alert rules in memory, checks every request the way Grafana
would (bearer token, required fields, folder and datasource references, versions, read-only
datasources) and records each request (method, path, Authorization header, headers, JSON body).
Answers follow Grafana 11's shapes: ids and versions added, ``secureJsonData`` never returned (only
``secureJsonFields``), 404 for a missing object (empty body for alert rules), 201 for a new rule.
"""

from __future__ import annotations

import copy
import itertools
import json
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

EXPRESSIONS = "__expr__"


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    authorization: str | None
    headers: dict[str, str]
    body: Any


Answer = tuple[int, Any]


class FakeGrafana:
    def __init__(self, token: str) -> None:
        self.token = token
        self.datasources: dict[str, dict[str, Any]] = {}
        self.passwords: dict[str, str] = {}
        self.folders: dict[str, dict[str, Any]] = {}
        self.dashboards: dict[str, dict[str, Any]] = {}
        self.rules: dict[str, dict[str, Any]] = {}
        self.requests: list[Request] = []
        self._ids = itertools.count(1)
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._thread = threading.Thread(target=self._server.serve_forever, args=(0.05,), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FakeGrafana:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def writes(self, since: int = 0) -> list[Request]:
        return [r for r in self.requests[since:] if r.method != "GET"]

    # -- dispatch ---------------------------------------------------------------------------
    def handle(self, request: Request) -> Answer:
        with self._lock:
            self.requests.append(request)
            if request.authorization != f"Bearer {self.token}":
                return 401, {"message": "Unauthorized"}
            for method, pattern, action in self._routes():
                match = re.fullmatch(pattern, request.path)
                if match and method == request.method:
                    return action(request, *match.groups())
            return 404, {"message": "Not found"}

    def _routes(self) -> list[tuple[str, str, Callable[..., Answer]]]:
        return [
            ("GET", r"/api/datasources/uid/([^/]+)", self._get_datasource),
            ("POST", r"/api/datasources", self._create_datasource),
            ("PUT", r"/api/datasources/uid/([^/]+)", self._update_datasource),
            ("GET", r"/api/folders/([^/]+)", self._get_folder),
            ("POST", r"/api/folders", self._create_folder),
            ("PUT", r"/api/folders/([^/]+)", self._update_folder),
            ("GET", r"/api/dashboards/uid/([^/]+)", self._get_dashboard),
            ("POST", r"/api/dashboards/db", self._save_dashboard),
            ("GET", r"/api/v1/provisioning/alert-rules/([^/]+)", self._get_rule),
            ("POST", r"/api/v1/provisioning/alert-rules", self._create_rule),
            ("PUT", r"/api/v1/provisioning/alert-rules/([^/]+)", self._update_rule),
        ]

    # -- datasources ------------------------------------------------------------------------
    def _get_datasource(self, _: Request, uid: str) -> Answer:
        if uid not in self.datasources:
            return 404, {"message": "Data source not found"}
        return 200, self.datasources[uid]

    def _store_datasource(self, body: dict[str, Any], ds_id: int, version: int, secure: dict[str, bool]) -> None:
        uid = body["uid"]
        secret = (body.get("secureJsonData") or {}).get("password")
        if secret is not None:
            self.passwords[uid] = secret
            secure = {**secure, "password": True}
        self.datasources[uid] = {
            "id": ds_id,
            "uid": uid,
            "orgId": 1,
            "name": body["name"],
            "type": body["type"],
            "typeLogoUrl": f"public/plugins/{body['type']}/img/logo.svg",
            "access": body.get("access", "proxy"),
            "url": body.get("url", ""),
            "user": "",
            "database": "",
            "basicAuth": False,
            "basicAuthUser": "",
            "withCredentials": False,
            "isDefault": bool(body.get("isDefault", False)),
            "jsonData": copy.deepcopy(body.get("jsonData") or {}),
            "secureJsonFields": secure,
            "version": version,
            "readOnly": False,
        }

    def _create_datasource(self, request: Request) -> Answer:
        body = request.body
        if not isinstance(body, dict) or not body.get("name") or not body.get("type"):
            return 400, {"message": "bad request data"}
        if body.get("uid") in self.datasources or any(d["name"] == body["name"] for d in self.datasources.values()):
            return 409, {"message": "data source with the same name already exists"}
        self._store_datasource(body, next(self._ids), 1, {})
        ds = self.datasources[body["uid"]]
        return 200, {"datasource": ds, "id": ds["id"], "message": "Datasource added", "name": ds["name"]}

    def _update_datasource(self, request: Request, uid: str) -> Answer:
        old = self.datasources.get(uid)
        if old is None:
            return 404, {"message": "Data source not found"}
        if old["readOnly"]:
            return 403, {"message": "Cannot update read-only data source"}
        body = request.body
        if not isinstance(body, dict) or body.get("uid", uid) != uid or not body.get("name"):
            return 400, {"message": "bad request data"}
        self._store_datasource({**body, "uid": uid}, old["id"], old["version"] + 1, old["secureJsonFields"])
        ds = self.datasources[uid]
        return 200, {"datasource": ds, "id": ds["id"], "message": "Datasource updated", "name": ds["name"]}

    # -- folders ----------------------------------------------------------------------------
    def _get_folder(self, _: Request, uid: str) -> Answer:
        if uid not in self.folders:
            return 404, {"message": "folder not found", "status": "not-found"}
        return 200, self.folders[uid]

    def _create_folder(self, request: Request) -> Answer:
        body = request.body
        uid, title = body.get("uid"), body.get("title")
        if not title:
            return 400, {"message": "folder title cannot be empty"}
        if uid in self.folders:
            return 409, {"message": "a folder with the same uid already exists"}
        self.folders[uid] = {
            "id": next(self._ids),
            "uid": uid,
            "title": title,
            "url": f"/dashboards/f/{uid}/",
            "version": 1,
            "hasAcl": False,
            "canSave": True,
        }
        return 200, self.folders[uid]

    def _update_folder(self, request: Request, uid: str) -> Answer:
        folder = self.folders.get(uid)
        if folder is None:
            return 404, {"message": "folder not found", "status": "not-found"}
        body = request.body
        if not body.get("overwrite") and body.get("version") != folder["version"]:
            return 412, {"message": "the folder has been changed by someone else", "status": "version-mismatch"}
        folder.update(title=body.get("title", folder["title"]), version=folder["version"] + 1)
        return 200, folder

    # -- dashboards -------------------------------------------------------------------------
    def _get_dashboard(self, _: Request, uid: str) -> Answer:
        stored = self.dashboards.get(uid)
        if stored is None:
            return 404, {"message": "Dashboard not found"}
        board = stored["dashboard"]
        folder = self.folders[stored["folderUid"]]
        meta = {
            "type": "db",
            "canSave": True,
            "slug": _slug(board["title"]),
            "url": f"/d/{uid}/{_slug(board['title'])}",
            "version": board["version"],
            "folderUid": folder["uid"],
            "folderTitle": folder["title"],
            "provisioned": False,
        }
        return 200, {"dashboard": board, "meta": meta}

    def _save_dashboard(self, request: Request) -> Answer:
        body = request.body
        board = body.get("dashboard") if isinstance(body, dict) else None
        if not isinstance(board, dict) or not board.get("title") or not board.get("uid"):
            return 400, {"message": "Dashboard title cannot be empty"}
        folder_uid = body.get("folderUid", "")
        if folder_uid and folder_uid not in self.folders:
            return 400, {"message": "Folder not found"}
        uid = board["uid"]
        old = self.dashboards.get(uid)
        if old is not None and not body.get("overwrite") and board.get("version") != old["dashboard"]["version"]:
            return 412, {"message": "The dashboard has been changed by someone else", "status": "version-mismatch"}
        board_id = next(self._ids) if old is None else old["dashboard"]["id"]
        version = 1 if old is None else old["dashboard"]["version"] + 1
        self.dashboards[uid] = {
            "dashboard": {**copy.deepcopy(board), "id": board_id, "version": version},
            "folderUid": folder_uid,
        }
        slug = _slug(board["title"])
        return 200, {
            "id": board_id,
            "uid": uid,
            "url": f"/d/{uid}/{slug}",
            "status": "success",
            "version": version,
            "slug": slug,
        }

    # -- alert rules ------------------------------------------------------------------------
    def _get_rule(self, _: Request, uid: str) -> Answer:
        if uid not in self.rules:
            return 404, None
        return 200, self.rules[uid]

    def _check_rule(self, rule: Any) -> str | None:
        if not isinstance(rule, dict):
            return "invalid alert rule"
        for key in ("uid", "title", "folderUID", "ruleGroup", "condition", "data", "noDataState", "execErrState"):
            if not rule.get(key):
                return f"invalid alert rule: {key} is required"
        if len(rule["uid"]) > 40:
            return "invalid alert rule: uid is longer than 40 characters"
        if rule["folderUID"] not in self.folders:
            return "invalid alert rule: folder does not exist"
        refs = [d.get("refId") for d in rule["data"]]
        if rule["condition"] not in refs:
            return f"invalid alert rule: condition {rule['condition']} does not exist"
        for query in rule["data"]:
            if query.get("datasourceUid") not in (*self.datasources, EXPRESSIONS):
                return f"data source {query.get('datasourceUid')} not found"
            if "relativeTimeRange" not in query or "model" not in query:
                return "invalid alert query"
        if not re.fullmatch(r"\d+[smhd]", rule.get("for", "0s")):
            return "invalid duration"
        return None

    def _store_rule(self, request: Request, rule_id: int) -> dict[str, Any]:
        provenance = "" if request.headers.get("x-disable-provenance") == "true" else "api"
        stored = {
            **copy.deepcopy(request.body),
            "id": rule_id,
            "orgID": 1,
            "updated": "2026-11-21T10:00:00Z",
            "provenance": provenance,
            "notification_settings": None,
            "record": None,
        }
        for query in stored["data"]:
            query.setdefault("queryType", "")
        self.rules[stored["uid"]] = stored
        return stored

    def _create_rule(self, request: Request) -> Answer:
        problem = self._check_rule(request.body)
        if problem is not None:
            return 400, {"message": problem}
        if request.body["uid"] in self.rules:
            return 409, {"message": "an alert rule with this uid already exists"}
        return 201, self._store_rule(request, next(self._ids))

    def _update_rule(self, request: Request, uid: str) -> Answer:
        old = self.rules.get(uid)
        if old is None:
            return 404, None
        problem = self._check_rule(request.body)
        if problem is not None or request.body.get("uid") != uid:
            return 400, {"message": problem or "uid mismatch"}
        return 200, self._store_rule(request, old["id"])


def _slug(title: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def _handler(grafana: FakeGrafana) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            raw = self.rfile.read(length) if length else b""
            body = json.loads(raw) if raw else None
            if raw and not self.headers.get("Content-Type", "").startswith("application/json"):
                status, answer = 415, {"message": "expected JSON"}
            else:
                request = Request(
                    self.command,
                    self.path,
                    self.headers.get("Authorization"),
                    {k.lower(): v for k, v in self.headers.items()},
                    body,
                )
                status, answer = grafana.handle(request)
            data = b"" if answer is None else json.dumps(answer).encode()
            self.send_response(status)
            if data:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_PUT = do_DELETE = _serve

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def grafana() -> Iterator[FakeGrafana]:
    server = FakeGrafana(token="glsa_test-token-not-for-print").start()
    try:
        yield server
    finally:
        server.stop()
