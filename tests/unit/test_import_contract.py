"""The dependency order of the packages, checked on every module's imports (ast, nothing imported).

    schemas  <-  detections  <-  stream_jobs.runtime  <-  stream_jobs
                             <-  collectors, dashboards
    everything  <-  scopewatch (the CLI)

A module may import its own package and what is to its left, nothing else of ours: ``schemas``
nothing; ``detections`` only ``schemas``; ``stream_jobs.runtime`` (the services' settings,
lifecycle, state files and topic admin) only ``schemas`` and ``detections``; the rest of
``stream_jobs`` those and ``stream_jobs.runtime``; ``collectors`` and ``dashboards`` only
``schemas`` and ``detections``; ``scopewatch`` anything. Every import counts: at module level, in a
function, under ``TYPE_CHECKING``, relative or absolute.
"""

from __future__ import annotations

import ast
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

OURS = ("schemas", "detections", "collectors", "stream_jobs", "dashboards", "scopewatch")
"""Top-level packages of this project (pyproject's package list must name exactly these)."""

# The most specific prefix of a module's name decides what it may import (by module-name prefix).
ALLOWED: dict[str, tuple[str, ...] | None] = {
    "schemas": ("schemas",),
    "detections": ("schemas", "detections"),
    "stream_jobs.runtime": ("schemas", "detections", "stream_jobs.runtime"),
    "stream_jobs": ("schemas", "detections", "stream_jobs"),
    "collectors": ("schemas", "detections", "collectors"),
    "dashboards": ("schemas", "detections", "dashboards"),
    "scopewatch": None,  # the CLI: anything
}


def _within(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def rule_for(module: str) -> tuple[str, tuple[str, ...] | None]:
    best = max((p for p in ALLOWED if _within(module, p)), key=len)
    return best, ALLOWED[best]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``tree`` (``from x import y`` counts as
    ``x.y``, so that importing a submodule by ``from stream_jobs import runtime`` is seen)."""
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = package.split(".")
                base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                base = ".".join(base_parts)
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            for alias in node.names:
                if alias.name == "*":
                    yield node.lineno, source
                else:
                    yield node.lineno, f"{source}.{alias.name}" if source else alias.name


def violations(path: Path) -> list[str]:
    module = module_name(path)
    prefix, allowed = rule_for(module)
    if allowed is None:
        return []
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    found = []
    for line, name in imported(tree, module, path.name == "__init__.py"):
        if name.split(".")[0] not in OURS:
            continue  # the standard library and third-party packages
        if not any(_within(name, a) or _within(a, name) for a in allowed):
            found.append(f"{path.relative_to(ROOT)}:{line}: {module} ({prefix}) imports {name}")
    return found


def modules() -> list[Path]:
    return sorted(p for package in OURS for p in (ROOT / package).rglob("*.py"))


def test_the_package_list_is_the_one_the_contract_knows() -> None:
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    include = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    assert sorted(i.rstrip("*") for i in include) == sorted(OURS)
    on_disk = {p.name for p in ROOT.iterdir() if (p / "__init__.py").is_file()}
    assert on_disk == set(OURS), "a new top-level package needs its place in ALLOWED"


def test_every_package_imports_only_what_is_below_it() -> None:
    found = [v for path in modules() for v in violations(path)]
    assert not found, "imports against the package order:\n" + "\n".join(found)


def test_every_package_has_modules_checked() -> None:
    checked = {module_name(p).split(".")[0] for p in modules()}
    assert checked == set(OURS)
    assert any(_within(module_name(p), "stream_jobs.runtime") for p in modules())


@pytest.mark.parametrize(
    ("module", "source", "bad"),
    [
        ("schemas.events", "from detections.engine import decide", True),
        ("detections.live.stage2", "from stream_jobs.runtime.settings import Settings", True),
        ("detections.live.stage2", "from ..engine import decide", False),
        ("detections.live.stage2", "from ... import scopewatch", True),
        ("stream_jobs.runtime.settings", "from stream_jobs.sink import Sink", True),
        ("stream_jobs.runtime.settings", "from stream_jobs import sink", True),
        ("stream_jobs.runtime.settings", "from stream_jobs.runtime.files import atomic_write", False),
        ("stream_jobs.sink", "from stream_jobs.runtime.settings import Settings", False),
        ("stream_jobs.sink", "import scopewatch.settings", True),
        ("stream_jobs.sink", "def f():\n    from scopewatch.stack import proc", True),
        ("collectors.observer", "from stream_jobs.runtime.settings import Settings", True),
        ("collectors.observer", "from detections.engine import decide", False),
        ("dashboards.alerts", "from collectors import emit", True),
        ("scopewatch.cli", "from stream_jobs import sink", False),
    ],
)
def test_the_checker_sees_a_forbidden_import(module: str, source: str, bad: bool) -> None:
    prefix, allowed = rule_for(module)
    assert allowed is not None or not bad
    names = [name for _line, name in imported(ast.parse(source), module, False)]
    against = [
        n
        for n in names
        if n.split(".")[0] in OURS and allowed is not None and not any(_within(n, a) or _within(a, n) for a in allowed)
    ]
    assert bool(against) is bad, (prefix, names)
