"""``scopewatch redact-test``: what a given input would become, and which detectors fired."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from collectors.redact import Redactor
from scopewatch.cli import app
from support.secret_corpus import SAMPLES

BY_FORMAT = {s.format: s for s in SAMPLES}
KEY = "operator-key-0123456789abcdef0123"


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("SCOPEWATCH_HOME", str(home))
    for name in ("SCOPEWATCH_REDACTION_KEY", "SCOPEWATCH_REDACT_PATTERNS", "SCOPEWATCH_REDACT_ARGUMENTS"):
        monkeypatch.delenv(name, raising=False)
    return home


def test_text_file_shows_the_redacted_text_and_the_detectors(env: Path, tmp_path: Path) -> None:
    dsn, sas = BY_FORMAT["dsn_postgres_one_slash"], BY_FORMAT["azure_sas_signature"]
    source = tmp_path / "error.txt"
    source.write_text(f"{dsn.context}\nthen {sas.context}\n")
    result = CliRunner().invoke(app, ["redact-test", str(source)])
    assert result.exit_code == 0, result.stderr
    assert dsn.needle not in result.stdout and sas.needle not in result.stdout
    assert "postgres:/app:[redacted:url_credentials:hmac-sha256:" in result.stdout
    assert "detectors that fired: azure_sas_signature x1, url_credentials x1" in result.stderr
    assert "throw-away key" in result.stderr
    assert not env.exists()  # no key file was created for a test run


def test_json_arguments_from_stdin_as_json(env: Path) -> None:
    sendgrid = BY_FORMAT["sendgrid_api_key"]
    arguments = {"env": [{"SENDGRID": sendgrid.needle}], "password": "hunter2", "path": "/srv/a.txt"}
    result = CliRunner().invoke(app, ["redact-test", "-", "--format", "json"], input=json.dumps(arguments))
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["input"] == "arguments" and out["throwaway_key"] is True
    assert out["detectors"] == {"secret_argument": 1, "sendgrid_api_key": 1}
    assert out["redacted"]["path"] == "/srv/a.txt"
    assert out["redacted"]["env"][0]["SENDGRID"].startswith("[redacted:sendgrid_api_key:hmac-sha256:")
    assert "hunter2" not in result.stdout and sendgrid.needle not in result.stdout


def test_host_key_and_extra_patterns_are_those_of_the_collectors(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SCOPEWATCH_REDACTION_KEY", KEY)
    monkeypatch.setenv("SCOPEWATCH_REDACT_PATTERNS", json.dumps({"acme_ref": r"ACME-(?P<secret>[0-9]{6})"}))
    source = tmp_path / "in.json"
    source.write_text(json.dumps({"note": "ref ACME-123456"}))
    result = CliRunner().invoke(app, ["redact-test", str(source), "--format", "json"])
    assert result.exit_code == 0, result.stderr
    out = json.loads(result.stdout)
    expected = Redactor(key=KEY.encode()).fingerprint("123456", "acme_ref")
    assert out["redacted"] == {"note": f"ref ACME-{expected}"} and out["throwaway_key"] is False


def test_text_option_and_clean_input(env: Path) -> None:
    result = CliRunner().invoke(app, ["redact-test", "-", "--text"], input='{"message": "hello"}')
    assert result.exit_code == 0
    assert result.stdout == '{"message": "hello"}\n'
    assert "input: text; detectors that fired: none" in result.stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [(["/no/such/file"], "cannot read /no/such/file"), (["-", "--format", "xml"], "--format must be")],
)
def test_bad_input_is_a_clear_error(env: Path, args: list[str], message: str) -> None:
    result = CliRunner().invoke(app, ["redact-test", *args], input="")
    assert result.exit_code == 2 and message in result.stderr
