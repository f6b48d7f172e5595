"""``scopewatch policy``: Cedar policies as code.

    scopewatch policy check policies/prod
    scopewatch policy publish policies/prod --id prod-data

A policy folder holds ``*.cedar`` files (joined in file-name order into one policy set: what a
``policy_published`` carries), an optional ``labels.json`` (label -> glob patterns over resources,
e.g. ``{"restricted": ["db:prod/*"]}``) and, beside a policy file ``NAME.cedar``, its cases in
``NAME.cases.json``: a JSON list of objects, each a request and the expected decision::

    {"name": "no prod writes", "tool": "db/write", "resources": ["db:prod/users"],
     "arguments": {"rows": 3}, "principal": "alice", "agent_id": "copilot",
     "time": "2026-11-23T10:00:00.000Z", "expect": "Deny"}

Optional request fields: ``tenant``, ``session_id``, ``grant_id``, ``purpose``, ``transport``
(default ``sdk``), ``attested`` (an object of claims). The request and its context are built exactly
as the decision engine builds them (:mod:`detections.policy`), against the whole folder's policy
set, so a case shows what a call would get under a grant naming this policy.

``check`` parses every file with Cedar (a parse error names the file and the line of the statement
it is in), checks ``labels.json`` and runs every case; exit 1 if anything fails. ``publish`` runs
the same check, refuses on any failure, and publishes a ``policy_published`` whose ``version`` is
the git commit of the folder when it is in a git repository with no uncommitted change under it,
else ``sha256:`` of the folder's content (``--version`` overrides both).
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any

import typer

policy_app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Cedar policies as code: check a folder, publish it."
)

MAX_FILE_BYTES = 1 << 20


@dataclass
class Folder:
    """A policy folder read and checked: the joined text, labels, and every problem found."""

    path: Path
    files: list[tuple[str, str]] = field(default_factory=list)
    labels: dict[str, list[str]] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)
    cases_run: int = 0

    @property
    def text(self) -> str:
        return "".join(f"// {name}\n{text.rstrip()}\n" for name, text in self.files)

    def content_hash(self) -> str:
        h = hashlib.sha256()
        for name, text in self.files:
            h.update(f"{name}\0{len(text.encode())}\0".encode())
            h.update(text.encode())
        h.update(json.dumps(self.labels, sort_keys=True, separators=(",", ":")).encode())
        return "sha256:" + h.hexdigest()


def parse_error_line(text: str) -> tuple[int, str] | None:
    """(line, Cedar's message) of the first statement of ``text`` that does not parse; None if it parses."""
    import cedarpy

    from detections.policy import split_statements

    try:
        cedarpy.policies_to_json_str(text)
        return None
    except ValueError as whole:
        for line, statement in split_statements(text):
            try:
                cedarpy.policies_to_json_str(statement)
            except ValueError as exc:
                return line, str(exc)
        return 1, str(whole)


def _read(path: Path) -> str:
    if path.stat().st_size > MAX_FILE_BYTES:
        raise ValueError(f"larger than {MAX_FILE_BYTES} bytes")
    return path.read_text(encoding="utf-8")


def check_folder(path: Path) -> Folder:
    """Read, parse and run the cases of a policy folder (every problem collected, nothing raised)."""
    folder = Folder(path)
    if not path.is_dir():
        folder.problems.append(f"{path}: not a folder")
        return folder
    cedar_files = sorted(path.glob("*.cedar"))
    if not cedar_files:
        folder.problems.append(f"{path}: no .cedar files")
    for file in cedar_files:
        try:
            text = _read(file)
        except (OSError, ValueError) as exc:
            folder.problems.append(f"{file}: cannot read: {exc}")
            continue
        folder.files.append((file.name, text))
        found = parse_error_line(text)
        if found is not None:
            folder.problems.append(f"{file}:{found[0]}: Cedar parse error: {found[1]}")
    labels_file = path / "labels.json"
    if labels_file.exists():
        try:
            labels = json.loads(_read(labels_file))
            if not isinstance(labels, dict) or not all(
                isinstance(k, str) and isinstance(v, list) and all(isinstance(p, str) for p in v)
                for k, v in labels.items()
            ):
                raise ValueError("must be an object: label -> list of glob patterns")
            folder.labels = labels
        except (OSError, ValueError) as exc:
            folder.problems.append(f"{labels_file}: {exc}")
    if folder.problems:
        return folder
    for file in cedar_files:
        cases_file = file.with_name(file.stem + ".cases.json")
        if cases_file.exists():
            _run_cases(folder, cases_file)
    return folder


def _run_cases(folder: Folder, cases_file: Path) -> None:
    from detections.policy import PolicyCheck, PolicyStore, evaluate
    from schemas import EventError, PolicyPublished, ToolCall

    try:
        cases = json.loads(_read(cases_file))
        if not isinstance(cases, list):
            raise ValueError("must be a JSON list of cases")
    except (OSError, ValueError) as exc:
        folder.problems.append(f"{cases_file}: {exc}")
        return
    store = PolicyStore()
    published = datetime(1970, 1, 1, tzinfo=UTC)
    tenants: set[str] = set()
    for i, case in enumerate(cases, 1):
        where = f"{cases_file}: case {i}"
        if not isinstance(case, dict):
            folder.problems.append(f"{where}: not an object")
            continue
        where = f"{cases_file}: case {case.get('name', f'#{i}')!r}"
        expect = str(case.get("expect", "")).capitalize()
        if expect not in ("Allow", "Deny"):
            folder.problems.append(f"{where}: expect must be Allow or Deny")
            continue
        server, _, tool = str(case.get("tool", "")).partition("/")
        if not server or not tool:
            folder.problems.append(f"{where}: tool must be server/tool")
            continue
        tenant = str(case.get("tenant", "default"))
        try:
            call = ToolCall.model_validate(
                {
                    "event_id": str(uuid.uuid4()),
                    "event_time": case.get("time", "2026-01-05T12:00:00.000Z"),
                    "tenant": tenant,
                    "call_id": f"case-{i}",
                    "session_id": case.get("session_id", "case-session"),
                    "server": server,
                    "tool": tool,
                    "arguments": case.get("arguments", {}),
                    "resources": case.get("resources", []),
                    "transport": case.get("transport", "sdk"),
                    "attested": case.get("attested"),
                }
            )
        except (ValueError, EventError) as exc:
            folder.problems.append(f"{where}: not a valid request: {' '.join(str(exc).split())[:300]}")
            continue
        if tenant not in tenants:  # the folder, as it would be published for the case's tenant
            tenants.add(tenant)
            store.add(
                PolicyPublished(
                    event_id=str(uuid.uuid4()),
                    event_time=published,
                    tenant=tenant,
                    policy_id="folder",
                    version="check",
                    cedar=folder.text,
                    labels=folder.labels,
                    published_by="scopewatch policy check",
                )
            )
        check = PolicyCheck(
            call,
            str(case.get("principal", "case-principal")),
            str(case.get("agent_id", "case-agent")),
            str(case.get("grant_id", "case-grant")),
            str(case.get("purpose", "")),
            ["folder"],
            store,
        )
        evaluate([check])
        folder.cases_run += 1
        outcome = check.outcome
        got = None if outcome is None else outcome.decision
        if got != expect:
            detail = ""
            if outcome is not None:
                detail = f" (determined by {list(outcome.determining)}; errors {list(outcome.errors)})"
            folder.problems.append(f"{where}: expected {expect}, Cedar says {got}{detail}")


def _report(folder: Folder) -> None:
    for problem in folder.problems:
        sys.stderr.write(f"scopewatch policy: {problem}\n")


@policy_app.command("check")
def check(directory: Annotated[Path, typer.Argument(help="the policy folder")]) -> None:
    """Parse the folder's .cedar files and labels.json with Cedar and run every case; exit 1 on any problem."""
    folder = check_folder(directory)
    _report(folder)
    if folder.problems:
        raise typer.Exit(1)
    print(f"{directory}: {len(folder.files)} policy file(s) parse; {folder.cases_run} case(s) pass")


def git_version(directory: Path) -> tuple[str | None, str | None]:
    """(commit, problem): the commit of HEAD when the folder is in a git repository and has no
    uncommitted change; (None, None) outside a repository; (None, why) when it has changes."""

    def git(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["git", "-C", str(directory), *args], capture_output=True, text=True, timeout=30, check=False
        )

    try:
        inside = git("rev-parse", "--is-inside-work-tree")
    except (OSError, subprocess.TimeoutExpired):
        return None, None
    if inside.returncode != 0 or inside.stdout.strip() != "true":
        return None, None
    head = git("rev-parse", "HEAD")
    if head.returncode != 0:
        return None, "the git repository has no commit yet: commit the policy folder or pass --version"
    status = git("status", "--porcelain", "--untracked-files=all", "--", ".")
    if status.returncode != 0 or status.stdout.strip():
        return None, "the policy folder has uncommitted changes: commit them or pass --version"
    return head.stdout.strip(), None


@policy_app.command("publish")
def publish(
    directory: Annotated[Path, typer.Argument(help="the policy folder")],
    policy_id: Annotated[str, typer.Option("--id", help="the policy_id grants name in their policies")],
    tenant: Annotated[str, typer.Option(envvar="SCOPEWATCH_TENANT", help="tenant of the policy")] = "default",
    version: Annotated[str | None, typer.Option(help="default: the git commit, else the content hash")] = None,
    published_by: Annotated[str, typer.Option(help="who publishes")] = "scopewatch policy publish",
    event_time: Annotated[str, typer.Option(help="when it takes effect: RFC 3339, now, -5m")] = "now",
    dry_run: Annotated[bool, typer.Option("--dry-run", help="print the event, do not publish it")] = False,
) -> None:
    """Check the folder (refusing unparseable text or failing cases), then publish a policy_published."""
    from scopewatch.emitting import emit_event

    if not policy_id.strip():
        sys.stderr.write("scopewatch policy: error: --id must not be empty\n")
        raise typer.Exit(2)
    folder = check_folder(directory)
    _report(folder)
    if folder.problems:
        sys.stderr.write("scopewatch policy: not published: fix the problems above\n")
        raise typer.Exit(1)
    if version is None:
        commit, problem = git_version(directory)
        if problem is not None:
            sys.stderr.write(f"scopewatch policy: error: {problem}\n")
            raise typer.Exit(1)
        version = commit or folder.content_hash()
    fields: dict[str, Any] = {
        "event_type": "policy_published",
        "event_id": None,
        "tenant": tenant,
        "policy_id": policy_id,
        "version": version,
        "cedar": folder.text,
        "labels": folder.labels,
        "published_by": published_by,
    }
    emit_event(fields, {"event_time": event_time}, dry_run, command="policy publish")


def _standalone() -> typer.Typer:  # pragma: no cover
    app = typer.Typer(add_completion=False, no_args_is_help=True)
    app.add_typer(policy_app, name="policy")
    return app


if __name__ == "__main__":  # pragma: no cover
    _standalone()()
