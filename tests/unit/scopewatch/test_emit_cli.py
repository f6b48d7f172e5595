"""``scopewatch emit`` refuses empty identities and tokens pasted as token ids (before any Kafka)."""

from __future__ import annotations

import sys

import jwt as pyjwt
import pytest
from typer.testing import CliRunner

from scopewatch.intake_cli import emit_app

TOKEN = pyjwt.encode({"sub": "alice", "jti": "jti-77", "exp": 4102444800}, "k" * 32, algorithm="HS256")


def _run(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(emit_app, list(args))
    return result.exit_code, result.stdout, result.stderr


@pytest.mark.parametrize(
    ("args", "why"),
    [
        (["bind", "--session-id", "s", "--principal", "", "--agent-id", "a"], "--principal must not be empty"),
        (["bind", "--session-id", "s", "--principal", "  ", "--agent-id", "a"], "--principal must not be empty"),
        (["bind", "--session-id", "s", "--principal", "p", "--agent-id", "\t"], "--agent-id must not be empty"),
        (["bind", "--session-id", " ", "--principal", "p", "--agent-id", "a"], "--session-id must not be empty"),
        (["grant", "--principal", "", "--agent-id", "a", "--tool", "fs/*"], "--principal must not be empty"),
        (["grant", "--principal", "p", "--agent-id", " ", "--tool", "fs/*"], "--agent-id must not be empty"),
        (["revoke", "--grant-id", "g", "--principal", " ", "--agent-id", "a"], "--principal must not be empty"),
        (["revoke", "--grant-id", "g", "--principal", "p", "--agent-id", ""], "--agent-id must not be empty"),
        (
            ["bind", "--session-id", "s", "--principal", "p", "--agent-id", "a", "--auth-token-id", TOKEN],
            "--auth-token-id looks like a JWT",
        ),
        (
            [
                "bind",
                "--session-id",
                "s",
                "--principal",
                "p",
                "--agent-id",
                "a",
                "--auth-token-id",
                "xoxb-1234567890ab",
            ],
            "--auth-token-id looks like a secret",
        ),
        (
            ["bind", "--session-id", "s", "--principal", "p", "--agent-id", "a", "--auth-token-id", "j" * 129],
            "--auth-token-id is 129 characters long",
        ),
    ],
)
def test_emit_refuses_with_a_clear_error_and_prints_no_event(args: list[str], why: str) -> None:
    code, out, err = _run(*args, "--dry-run")
    assert code == 2 and why in err
    assert out == ""  # nothing built, nothing published
    assert TOKEN not in err


def test_emit_accepts_a_real_token_id() -> None:
    code, out, _err = _run(
        "bind", "--session-id", "s", "--principal", "p", "--agent-id", "a", "--auth-token-id", "jti-77", "--dry-run"
    )
    assert code == 0 and '"token_id":"jti-77"' in out


@pytest.mark.parametrize("option", ["--principal", "--agent-id", "--session-id"])
def test_wrap_refuses_an_empty_identity_before_starting_anything(option: str) -> None:
    from scopewatch.cli import app

    args = {"--principal": "alice", "--agent-id": "agent", "--session-id": "s-1", option: "  "}
    flat = [part for pair in args.items() for part in pair]
    result = CliRunner().invoke(app, ["wrap", *flat, "--", sys.executable, "-c", "raise SystemExit(7)"])
    assert result.exit_code == 2 and f"{option} must not be empty" in result.stderr
