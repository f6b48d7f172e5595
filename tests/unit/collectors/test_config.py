"""The collectors' one configuration (collectors.config)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

from collectors.config import CollectorConfig, ConfigError, parse_listen
from scopewatch.spools import spool_dirs
from stream_jobs.runtime.settings import Settings


def test_an_explicit_environment_is_read_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SCOPEWATCH_BOOTSTRAP", "elsewhere:9092")
    config = CollectorConfig.from_env({"SCOPEWATCH_HOME": str(tmp_path), "SCOPEWATCH_TOPIC_PREFIX": "t."})
    assert config.kafka_bootstrap == "127.0.0.1:19092"  # the local broker's default, not the process's variable
    assert config.topics.tool_calls == "t.mcp.tool-calls"
    spool = config.spool()
    assert spool.dir == tmp_path.resolve() / "spool" and spool.loss_topic == "t.audit.dead-letter"
    assert config.key_path == tmp_path.resolve() / "redaction.key"
    assert CollectorConfig.from_env().kafka_bootstrap == "elsewhere:9092"  # no mapping: the process environment
    assert CollectorConfig.from_env({"SCOPEWATCH_KAFKA_PORT": "29092"}).kafka_bootstrap == "127.0.0.1:29092"


def test_errors_name_the_variable_never_the_value() -> None:
    with pytest.raises(ConfigError) as info:
        CollectorConfig.from_env({"SCOPEWATCH_KAFKA_PORT": "hunter2"})
    assert "SCOPEWATCH_KAFKA_PORT" in str(info.value) and "hunter2" not in str(info.value)
    with pytest.raises(ConfigError, match="at least 16 bytes") as info:
        CollectorConfig.from_env({"SCOPEWATCH_REDACTION_KEY": "short-secret"}).key()
    assert "short-secret" not in str(info.value)


def test_parse_listen() -> None:
    assert parse_listen("127.0.0.1:8080") == ("127.0.0.1", 8080)
    assert parse_listen("[::1]:0") == ("::1", 0)
    for bad in ("8080", ":80", "host:99999", "host:x"):
        with pytest.raises(ValueError):
            parse_listen(bad)


def test_the_publisher_client_setting() -> None:
    assert CollectorConfig.from_env({}).publisher_client == "rdkafka"
    assert CollectorConfig.from_env({"SCOPEWATCH_PUBLISHER_CLIENT": "aiokafka"}).publisher_client == "aiokafka"
    with pytest.raises(ConfigError, match="SCOPEWATCH_PUBLISHER_CLIENT"):
        CollectorConfig.from_env({"SCOPEWATCH_PUBLISHER_CLIENT": "kafka-python"})


def test_the_proxy_server_setting() -> None:
    assert CollectorConfig.from_env({}).proxy_server == "lean"
    assert CollectorConfig.from_env({"SCOPEWATCH_PROXY_SERVER": "aiohttp"}).proxy_server == "aiohttp"
    with pytest.raises(ConfigError, match="SCOPEWATCH_PROXY_SERVER"):
        CollectorConfig.from_env({"SCOPEWATCH_PROXY_SERVER": "nginx"})


# -- one config: nothing else reads the collectors' environment ------------------------------------
ROOT = Path(__file__).resolve().parents[3]
CONFIG_FILE = ROOT / "collectors" / "config.py"
COLLECTOR_CLIS = [ROOT / "scopewatch" / f for f in ("intake_cli.py", "proxy_cli.py", "redact_cli.py", "spools.py")]
"""The CLI modules that set up collectors (``wrap`` is collectors.stdio): they read the settings too."""


def _environment_reads(path: Path) -> list[str]:
    """``os.environ.get(..)``, ``os.environ[..]``, ``os.getenv(..)``, ``environ.get("SCOPEWATCH_..")``
    and a ``"SCOPEWATCH_.."`` variable name as a string of its own (not in a docstring) in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {
        id(node.body[0].value)
        for node in ast.walk(tree)
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
        and node.body
        and isinstance(node.body[0], ast.Expr)
        and isinstance(node.body[0].value, ast.Constant)
    }
    options = {  # typer's envvar= of a CLI option (identity and labels of one run) is that option's default
        id(kw.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        for kw in node.keywords
        if kw.arg == "envvar"
    }
    found = []
    for node in ast.walk(tree):
        where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
        text = ast.unparse(node) if isinstance(node, (ast.Call, ast.Subscript)) else ""
        if isinstance(node, ast.Call) and (
            text.startswith(("os.environ.get(", "os.getenv(", "environ.get(", "os.environ.setdefault("))
        ):
            found.append(f"{where}: {text}")
        elif isinstance(node, ast.Subscript) and text.startswith(("os.environ[", "environ[")):
            found.append(f"{where}: {text}")
        elif (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and id(node) not in docstrings | options
            and re.fullmatch(r"SCOPEWATCH_[A-Z0-9_]+", node.value)
        ):
            found.append(f"{where}: {node.value!r}")
    return found


def test_only_collectors_config_reads_the_environment() -> None:
    """wrap (stdio, observer process, native relay), proxy, the SDK middleware, intake, the spool and
    the publisher take every setting from :class:`CollectorConfig`: no module of theirs reads a
    variable by hand (as spool.py, sdk.py and stdio.py did) -- they hand the whole environment to it."""
    paths = [p for p in sorted((ROOT / "collectors").glob("*.py")) if p != CONFIG_FILE] + COLLECTOR_CLIS
    found = [hit for path in paths for hit in _environment_reads(path)]
    # the name, for intake's help and error texts (CollectorConfig.intake_secrets reads it)
    assert [re.sub(r":\d+:", ":", hit) for hit in found] == ["scopewatch/intake_cli.py: 'SCOPEWATCH_INTAKE_SECRETS'"]


def test_the_checker_sees_a_hand_read_variable(tmp_path: Path) -> None:
    probe = ROOT / "collectors" / "_probe_for_test.py"
    cases = {
        'import os\nx = os.environ.get("SCOPEWATCH_OBSERVER_NICE", "19")': 2,
        'import os\nx = os.getenv("HOME")': 1,
        'def f(environ):\n    return environ["SCOPEWATCH_HOME"]': 2,
        'NAME = "SCOPEWATCH_SPOOL_DIR"': 1,
        'typer.Option(envvar="SCOPEWATCH_TENANT")': 0,
        '"""Reads SCOPEWATCH_SPOOL_DIR."""\nimport os\nconfig(os.environ)': 0,
    }
    try:
        for source, hits in cases.items():
            probe.write_text(source)
            assert len(_environment_reads(probe)) == hits, source
    finally:
        probe.unlink(missing_ok=True)


def test_the_local_broker_port_is_written_once() -> None:
    """19092 is ``schemas.topics.LOCAL_KAFKA_PORT``; the collectors, services and stack defaults use it."""
    packages = ("schemas", "detections", "collectors", "stream_jobs", "dashboards", "scopewatch")
    hits = [
        f"{path.relative_to(ROOT)}:{node.lineno}"
        for package in packages
        for path in sorted((ROOT / package).rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
        if isinstance(node, ast.Constant) and node.value == 19092
    ]
    assert len(hits) == 1 and hits[0].startswith("schemas/topics.py:"), hits
    from schemas.topics import LOCAL_KAFKA_PORT

    assert CollectorConfig.from_env({}).kafka_port == LOCAL_KAFKA_PORT == Settings().kafka_port


def test_wrap_intake_and_spool_settings_come_from_the_config(tmp_path: Path) -> None:
    config = CollectorConfig.from_env(
        {
            "SCOPEWATCH_OBSERVER_NICE": "5",
            "SCOPEWATCH_CACHE_DIR": str(tmp_path / "cache"),
            "SCOPEWATCH_INTAKE_SECRETS": "whsec_" + "A" * 32,
            "SCOPEWATCH_SPOOL_DIR": str(tmp_path / "spool"),
        }
    )
    assert config.observer_nice == 5 and CollectorConfig.from_env({}).observer_nice == 19
    assert config.cache_path == tmp_path / "cache"
    assert config.intake_secrets is not None and "AAAA" not in repr(config)
    assert config.spool_path == config.spool().dir == (tmp_path / "spool").resolve()
    assert spool_dirs({"SCOPEWATCH_SPOOL_DIR": str(tmp_path / "spool")}) == [(tmp_path / "spool").resolve()]
    for bad in ("-1", "20", "nice"):
        with pytest.raises(ConfigError, match="SCOPEWATCH_OBSERVER_NICE"):
            CollectorConfig.from_env({"SCOPEWATCH_OBSERVER_NICE": bad})
