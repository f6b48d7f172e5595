"""The collectors' one configuration (collectors.config)."""

from __future__ import annotations

from pathlib import Path

import pytest

from collectors.config import CollectorConfig, ConfigError, parse_listen


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
