"""``scopewatch policy check|publish`` (publishing with --dry-run here; the broker in integration) and
``scopewatch emit approve|deny``."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from typer.testing import CliRunner

from schemas import ApprovalDecided, PolicyPublished, arguments_digest, event_from_json
from scopewatch.intake_cli import emit_app
from scopewatch.policy_cli import policy_app

BASE = """// everything a grant covers, except restricted data
permit(principal, action == Action::"call", resource);

forbid(principal, action, resource)
when { context.labels.contains("restricted") };
"""
OFFICE = """permit(principal, action, resource)
when { context.hour >= 9 && context.hour < 18 && context.weekday <= 5 };
"""
CASES = [
    {"name": "prod is restricted", "tool": "db/query", "resources": ["db:prod/users"], "expect": "Deny"},
    {"name": "dev is fine", "tool": "db/query", "resources": ["db:dev/users"], "expect": "Allow"},
]


def folder(tmp_path: Path, **files: str) -> Path:
    d = tmp_path / "policies"
    d.mkdir(exist_ok=True)
    defaults = {
        "base.cedar": BASE,
        "labels.json": '{"restricted": ["db:prod/*"]}',
        "base.cases.json": json.dumps(CASES),
    }
    for name, text in {**defaults, **{k.replace("__", "."): v for k, v in files.items()}}.items():
        if text:
            (d / name).write_text(text)
    return d


def run(app: object, *args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, list(args))  # type: ignore[arg-type]
    return result.exit_code, result.stdout, result.stderr


def test_check_parses_and_runs_cases(tmp_path: Path) -> None:
    code, out, err = run(policy_app, "check", str(folder(tmp_path)))
    assert code == 0, err
    assert "1 policy file(s) parse; 2 case(s) pass" in out


def test_check_names_file_and_line_of_a_parse_error(tmp_path: Path) -> None:
    bad = "permit(principal, action, resource);\n\n// then\nforbid(principal, action, resource)\n  when { 1 + };\n"
    code, _out, err = run(policy_app, "check", str(folder(tmp_path, bad__cedar=bad)))
    assert code == 1
    assert f"{tmp_path / 'policies' / 'bad.cedar'}:4: Cedar parse error" in err


def test_check_reports_a_failing_case_with_cedars_answer(tmp_path: Path) -> None:
    cases = [{"name": "weekend", "tool": "db/query", "time": "2026-11-21T10:00:00.000Z", "expect": "Allow"}]
    d = folder(tmp_path, base__cedar=OFFICE, base__cases__json=json.dumps(cases))
    code, _out, err = run(policy_app, "check", str(d))
    assert code == 1
    assert "case 'weekend': expected Allow, Cedar says Deny" in err
    ok = [{**cases[0], "time": "2026-11-23T10:00:00.000Z", "name": "monday"}]
    (d / "base.cases.json").write_text(json.dumps(ok))
    assert run(policy_app, "check", str(d))[0] == 0


@pytest.mark.parametrize(
    ("labels", "why"),
    [('{"restricted": "db:prod/*"}', "label -> list of glob patterns"), ("[", "labels.json")],
)
def test_check_refuses_bad_labels(tmp_path: Path, labels: str, why: str) -> None:
    code, _out, err = run(policy_app, "check", str(folder(tmp_path, labels__json=labels)))
    assert code == 1 and why in err


def test_check_refuses_a_folder_without_policies(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, _out, err = run(policy_app, "check", str(tmp_path / "empty"))
    assert code == 1 and "no .cedar files" in err


def test_publish_refuses_unparseable_text(tmp_path: Path) -> None:
    code, out, err = run(policy_app, "publish", str(folder(tmp_path, base__cedar="permit(")), "--id", "p", "--dry-run")
    assert code == 1 and out == "" and "not published" in err


def _published(out: str) -> PolicyPublished:
    event = event_from_json(out.strip())
    assert isinstance(event, PolicyPublished)
    return event


def test_publish_outside_git_uses_the_content_hash(tmp_path: Path) -> None:
    d = folder(tmp_path)
    code, out, err = run(policy_app, "publish", str(d), "--id", "data", "--tenant", "acme", "--dry-run")
    assert code == 0, err
    event = _published(out)
    assert event.version.startswith("sha256:") and len(event.version) == 71
    assert (event.policy_id, event.tenant, event.labels) == ("data", "acme", {"restricted": ["db:prod/*"]})
    assert "context.labels.contains" in event.cedar
    again = _published(run(policy_app, "publish", str(d), "--id", "data", "--dry-run")[1])
    assert again.version == event.version
    (d / "base.cedar").write_text(BASE + "\n" + OFFICE)
    assert _published(run(policy_app, "publish", str(d), "--id", "data", "--dry-run")[1]).version != event.version


def _git(repo: Path, *args: str) -> str:
    env = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@x", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@x"}
    import os

    done = subprocess.run(
        ["git", *args], cwd=repo, env={**os.environ, **env}, capture_output=True, text=True, check=True
    )
    return done.stdout.strip()


def test_publish_in_git_uses_the_commit_and_refuses_uncommitted_changes(tmp_path: Path) -> None:
    d = folder(tmp_path)
    _git(tmp_path, "init", "-q")
    _git(tmp_path, "add", ".")
    _git(tmp_path, "commit", "-qm", "policies")
    commit = _git(tmp_path, "rev-parse", "HEAD")
    code, out, err = run(policy_app, "publish", str(d), "--id", "data", "--dry-run")
    assert code == 0, err
    assert _published(out).version == commit
    (d / "base.cedar").write_text(BASE + "\n" + OFFICE)
    code, out, err = run(policy_app, "publish", str(d), "--id", "data", "--dry-run")
    assert code == 1 and "uncommitted changes" in err
    code, out, err = run(policy_app, "publish", str(d), "--id", "data", "--dry-run", "--version", "v-manual")
    assert code == 0 and _published(out).version == "v-manual"


def _approval(out: str) -> ApprovalDecided:
    event = event_from_json(out.strip())
    assert isinstance(event, ApprovalDecided)
    return event


def test_emit_approve_binds_to_the_arguments_digest() -> None:
    args = ["--principal", "alice", "--agent-id", "a1", "--tool", "fs/write_file", "--approver", "bob", "--dry-run"]
    code, out, err = run(emit_app, "approve", *args, "--arguments", '{"path": "/a", "n": 1.0}', "--expires-at", "+15m")
    assert code == 0, err
    event = _approval(out)
    assert (event.decision, event.tool, event.approver) == ("approve", "fs/write_file", "bob")
    assert event.arguments_digest == arguments_digest({"n": 1, "path": "/a"})
    assert event.expires_at is not None and event.expires_at > event.event_time
    code, out, err = run(emit_app, "deny", *args, "--approval-id", "ap-9", "--reason", "not today")
    assert code == 0, err
    event = _approval(out)
    assert (event.decision, event.approval_id, event.arguments_digest, event.reason) == (
        "deny",
        "ap-9",
        None,
        "not today",
    )


@pytest.mark.parametrize(
    ("extra", "why"),
    [
        (["--tool", "write_file"], "--tool must be server/tool"),
        (["--tool", "fs/w", "--arguments", "[1]"], "--arguments must be a JSON object"),
        (["--tool", "fs/w", "--arguments", "{"], "--arguments is not JSON"),
        (["--tool", "fs/w", "--arguments-digest", "xyz"], "64 lowercase hex"),
        (["--tool", "fs/w", "--arguments", "{}", "--arguments-digest", "0" * 64], "not both"),
        (["--tool", "fs/w", "--approver", " "], "--approver must not be empty"),
    ],
)
def test_emit_approve_refuses_bad_options(extra: list[str], why: str) -> None:
    base = ["approve", "--principal", "alice", "--agent-id", "a1", "--approver", "bob", "--dry-run"]
    code, _out, err = run(emit_app, *base, *extra)
    assert code == 2 and why in err
