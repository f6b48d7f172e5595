"""compose/: the stack's file, checked structurally (no Docker engine or compose plugin runs here).

Every service, image build, bind mount, volume, dependency, scopewatch command, SCOPEWATCH_* setting,
topic and Grafana provisioning path the compose file names must exist in the repository or in the
code. ``docker compose config`` runs too where the compose plugin exists.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
import yaml

from dashboards.build import Bundle, write_files
from schemas.topics import Topics
from scopewatch.cli import app
from scopewatch.dashboards_cli import dashboards_app
from stream_jobs.runtime.settings import Settings

ROOT = Path(__file__).resolve().parents[3]
COMPOSE = ROOT / "compose"
FILE = COMPOSE / "compose.yaml"
ONE_SHOT = "service_completed_successfully"
OPTIONAL = {"intake": ["collect"], "pager": ["paging"]}
"""Services that need configuration of their own (secrets, routes): they run only with their profile."""


@pytest.fixture(scope="module")
def spec() -> dict[str, Any]:
    loaded = yaml.safe_load(FILE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def services(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return dict(spec["services"])


def scopewatch_services(spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {name: s for name, s in services(spec).items() if s.get("image") == "scopewatch:local"}


def one_shots(spec: dict[str, Any]) -> set[str]:
    return {
        dep
        for s in services(spec).values()
        for dep, how in (s.get("depends_on") or {}).items()
        if how.get("condition") == ONE_SHOT
    }


def cli_commands() -> set[str]:
    names = {c.name or (c.callback.__name__ if c.callback else "") for c in app.registered_commands}
    return names | {g.name for g in app.registered_groups if g.name} | {"dashboards"}


def test_docker_compose_config_accepts_the_file() -> None:
    docker = shutil.which("docker")
    if docker is None or subprocess.run([docker, "compose", "version"], capture_output=True).returncode != 0:
        pytest.skip("no docker compose plugin on this machine (the structural tests below stand in)")
    result = subprocess.run([docker, "compose", "-f", str(FILE), "config", "--quiet"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_images_builds_and_bind_mounts_exist(spec: dict[str, Any]) -> None:
    for name, service in services(spec).items():
        assert service.get("image"), name
        build = service.get("build")
        if build:
            context = (COMPOSE / build["context"]).resolve()
            assert context == ROOT and (context / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE / source).exists(), f"{name}: {source} is not in the repository"
            else:
                assert source in spec["volumes"], f"{name}: volume {source} is not declared"
    used = {v.split(":")[0] for s in services(spec).values() for v in s.get("volumes", [])}
    assert set(spec["volumes"]) <= used


def test_dependencies_exist_and_long_running_services_have_healthchecks(spec: dict[str, Any]) -> None:
    names = set(services(spec))
    for name, service in services(spec).items():
        for dep, how in (service.get("depends_on") or {}).items():
            assert dep in names, f"{name} depends on unknown {dep}"
            wanted = "service_healthy" if dep not in one_shots(spec) else ONE_SHOT
            assert how["condition"] == wanted, f"{name} -> {dep}"
            if wanted == "service_healthy":
                assert "healthcheck" in services(spec)[dep], dep
    for name in names - one_shots(spec):
        assert services(spec)[name].get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        assert services(spec)[name].get("restart") == "unless-stopped", name
    for name in one_shots(spec):
        assert services(spec)[name].get("restart") == "no", name
    assert one_shots(spec) == {"topics", "migrate", "grafana-files"}


def test_scopewatch_commands_exist_and_optional_services_have_their_profile(spec: dict[str, Any]) -> None:
    commands = cli_commands()
    readme = (COMPOSE / "README.md").read_text(encoding="utf-8")
    seen = set()
    for name, service in scopewatch_services(spec).items():
        command = service["command"]
        seen.add(command[0])
        if command[0] in OPTIONAL:
            assert service.get("profiles") == OPTIONAL[command[0]], name
            assert f"`scopewatch {command[0]}`" in readme
        assert command[0] in commands, f"{name}: scopewatch {command[0]} is no command"
        if command[0] == "dashboards":
            assert command[1] in {c.name for c in dashboards_app.registered_commands}
    assert {"worker", "sink", "migrate", "dashboards", *OPTIONAL} <= seen


def test_scopewatch_settings_in_the_environment_are_real_settings(spec: dict[str, Any]) -> None:
    fields = {f"SCOPEWATCH_{name.upper()}" for name in Settings.model_fields}
    for name, service in scopewatch_services(spec).items():
        env = service["environment"]
        assert {k for k in env if k.startswith("SCOPEWATCH_")} <= fields, name
        assert env["SCOPEWATCH_CLICKHOUSE_DSN"] == "http://clickhouse:8123"
        assert env["SCOPEWATCH_BOOTSTRAP"] == "kafka:9092"
        assert env["SCOPEWATCH_HOME"] == "/var/lib/scopewatch"
    clickhouse = services(spec)["clickhouse"]["environment"]
    sink = scopewatch_services(spec)["sink"]["environment"]
    assert clickhouse["CLICKHOUSE_DB"] == sink["SCOPEWATCH_CLICKHOUSE_DATABASE"] == Bundle().database
    assert clickhouse["CLICKHOUSE_USER"] == sink["SCOPEWATCH_CLICKHOUSE_USER"]
    assert clickhouse["CLICKHOUSE_PASSWORD"] == sink["SCOPEWATCH_CLICKHOUSE_PASSWORD"]


def test_the_topics_service_creates_the_pipeline_topics(spec: dict[str, Any]) -> None:
    topics = services(spec)["topics"]
    assert topics["environment"]["TOPICS"].split() == Topics().all()
    assert "$$TOPICS" in topics["command"][0] and "--if-not-exists" in topics["command"][0]


def test_grafana_reads_the_files_dashboards_build_writes(spec: dict[str, Any], tmp_path: Path) -> None:
    grafana, files = services(spec)["grafana"], services(spec)["grafana-files"]
    assert "grafana-clickhouse-datasource" in grafana["environment"]["GF_INSTALL_PLUGINS"].split(",")
    out = files["command"][files["command"].index("--out") + 1]
    grafana_dir = files["command"][files["command"].index("--grafana-dir") + 1]
    assert f"grafana-files:{out}" in files["volumes"] and f"grafana-files:{grafana_dir}:ro" in grafana["volumes"]
    provisioning = grafana["environment"]["GF_PATHS_PROVISIONING"]
    assert provisioning.startswith(grafana_dir + "/")
    write_files(Bundle(), tmp_path, grafana_dir, "GRAFANA_CLICKHOUSE_PASSWORD")
    local = tmp_path / Path(provisioning).relative_to(grafana_dir)
    for kind in ("datasources", "dashboards", "alerting"):
        assert (local / kind / "scopewatch.yaml").is_file()
    provider = yaml.safe_load((local / "dashboards" / "scopewatch.yaml").read_text())["providers"][0]
    dashboards_dir = tmp_path / Path(provider["options"]["path"]).relative_to(grafana_dir)
    assert sorted(p.name for p in dashboards_dir.iterdir()) == sorted(f"{b.uid}.json" for b in Bundle().dashboards)
    datasource = yaml.safe_load((local / "datasources" / "scopewatch.yaml").read_text())["datasources"][0]
    assert datasource["jsonData"]["host"] == "clickhouse" and datasource["jsonData"]["port"] == 8123
    assert datasource["jsonData"]["username"] == "grafana"
    assert "GRAFANA_CLICKHOUSE_PASSWORD" in grafana["environment"]
    users = (COMPOSE / "clickhouse/users.d/grafana.xml").read_text()
    assert '<password from_env="GRAFANA_CLICKHOUSE_PASSWORD"/>' in users and "<readonly>2</readonly>" in users
    assert "GRAFANA_CLICKHOUSE_PASSWORD" in services(spec)["clickhouse"]["environment"]


def test_the_dockerfile_copies_every_package_and_the_healthcheck() -> None:
    dockerfile = (COMPOSE / "Dockerfile").read_text(encoding="utf-8")
    copied = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("COPY ")]
    for source in copied:
        assert (ROOT / source).exists(), source
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    packages = {p.rstrip("*") for p in setuptools["packages"]["find"]["include"]}
    assert packages <= set(copied)
    ignore = (COMPOSE / "Dockerfile.dockerignore").read_text().split()
    assert {f"!{p}/" for p in packages} | {"!pyproject.toml", "!README.md", "!compose/healthcheck.py"} <= set(ignore)
    assert re.search(r"^ENTRYPOINT \[\"scopewatch\"\]$", dockerfile, re.M)


def test_healthcheck_script_judges_stats_file_age(tmp_path: Path) -> None:
    script = str(COMPOSE / "healthcheck.py")

    def check(*args: str) -> int:
        return subprocess.run([sys.executable, script, *args], capture_output=True).returncode

    stats = tmp_path / "run" / "worker-host-1.json"
    assert check(str(tmp_path / "run" / "worker-*.json"), "30") == 1
    stats.parent.mkdir()
    stats.write_text("{}")
    assert check(str(tmp_path / "run" / "worker-*.json"), "30") == 0
    old = stats.stat().st_mtime - 120
    os.utime(stats, (old, old))
    assert check(str(tmp_path / "run" / "worker-*.json"), "30") == 1
    assert check(str(stats)) == 2 and check(str(stats), "soon") == 2
