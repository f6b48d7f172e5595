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


# -- private names stay in their module ------------------------------------------------------------
# A name that starts with one underscore is its module's own: another module of ours importing it
# (``from collectors.observer import _each``) or reaching it through the module
# (``observer._each``) couples the two behind the API's back. Make the name public, or move it to
# the module both use. ``collectors`` and ``scopewatch`` (issue 17) are held to it without exception;
# the other packages' imports of that kind predate the rule and are listed below: the list may only
# shrink (a new one fails, and so does an entry that is gone, so that the list stays true).
PRIVATE_STRICT = ("collectors", "scopewatch")
KNOWN_PRIVATE_IMPORTS = frozenset(
    {
        "schemas/avro_writer.py: schemas.avro_writer imports schemas.codec._to_record",
        "stream_jobs/bulk.py: stream_jobs.bulk imports stream_jobs.columnar._AVRO_FOR",
        "stream_jobs/bulk.py: stream_jobs.bulk imports stream_jobs.columnar._MAX_MS",
        "stream_jobs/bulk.py: stream_jobs.bulk imports stream_jobs.columnar._MIN_MS",
        "stream_jobs/bulk.py: stream_jobs.bulk imports stream_jobs.columnar._avro_type",
        "stream_jobs/bulk.py: stream_jobs.bulk imports stream_jobs.columnar._Kind",
        "stream_jobs/bulk.py: stream_jobs.bulk imports stream_jobs.columnar._model_kinds",
        "stream_jobs/columnar.py: stream_jobs.columnar imports schemas.events._uuid_str",
        "stream_jobs/columnar.py: stream_jobs.columnar imports schemas.events._json_object",
        "stream_jobs/columnar.py: stream_jobs.columnar imports schemas.events._labels",
    }
)


def _is_private(name: str) -> bool:
    return name.startswith("_") and not name.startswith("__")


def _our_modules() -> frozenset[str]:
    return frozenset(module_name(p) for p in modules())


def private_imports(source: str, module: str, is_package: bool, ours: frozenset[str]) -> Iterator[tuple[int, str]]:
    """(line, ``module.name``) of every private name of another module of ours that ``source`` imports
    (``from m import _x``, relative or absolute, at any depth) or reaches as an attribute of a module
    it imported (``import m`` / ``from pkg import m``, then ``m._x``)."""
    tree = ast.parse(source)
    modules_bound: dict[str, str] = {}  # local name -> module of ours
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name in ours:
                    # ``import a.b`` binds ``a``; ``import a.b as c`` binds ``c`` to ``a.b``
                    modules_bound[alias.asname or alias.name] = alias.name
        elif isinstance(node, ast.ImportFrom):
            for alias in node.names:
                if alias.name == "*":
                    continue
                _line, full = next(imported(ast.Module(body=[_one(node, alias)], type_ignores=[]), module, is_package))
                source_module = full.rpartition(".")[0]
                if full in ours:
                    modules_bound[alias.asname or alias.name] = full
                elif _is_private(alias.name) and source_module in ours and source_module != module:
                    yield node.lineno, full
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and _is_private(node.attr):
            target = modules_bound.get(ast.unparse(node.value))
            if target is not None and target != module:
                yield node.lineno, f"{target}.{node.attr}"


def _one(node: ast.ImportFrom, alias: ast.alias) -> ast.ImportFrom:
    return ast.ImportFrom(module=node.module, names=[alias], level=node.level, lineno=node.lineno)


def _private_violations() -> list[str]:
    ours = _our_modules()
    found = []
    for path in modules():
        module = module_name(path)
        text = path.read_text(encoding="utf-8")
        for _line, name in private_imports(text, module, path.name == "__init__.py", ours):
            found.append(f"{path.relative_to(ROOT)}: {module} imports {name}")
    return found


def test_no_module_of_collectors_or_scopewatch_imports_another_modules_private_name() -> None:
    found = [v for v in _private_violations() if v.split("/")[0] in PRIVATE_STRICT]
    assert not found, "private names imported across modules (make them public):\n" + "\n".join(sorted(set(found)))


def test_private_imports_elsewhere_are_only_the_known_ones() -> None:
    found = {v for v in _private_violations() if v.split("/")[0] not in PRIVATE_STRICT}
    assert found <= KNOWN_PRIVATE_IMPORTS, "new private imports:\n" + "\n".join(sorted(found - KNOWN_PRIVATE_IMPORTS))
    assert KNOWN_PRIVATE_IMPORTS <= found, "gone (take them off the list):\n" + "\n".join(
        sorted(KNOWN_PRIVATE_IMPORTS - found)
    )


@pytest.mark.parametrize(
    ("module", "source", "bad"),
    [
        ("collectors.http_proxy", "from collectors.observer import _each", True),
        ("collectors.http_proxy", "from .observer import _rpc_key as rpc_key", True),
        ("collectors.http_proxy", "def f():\n    from collectors.observer import _each", True),
        ("collectors.http_proxy", "from collectors import observer\nobserver._each(1)", True),
        ("collectors.http_proxy", "import collectors.observer as o\no._rpc_key", True),
        ("scopewatch.policy_cli", "from scopewatch.intake_cli import _emit", True),
        ("collectors.http_proxy", "from collectors.jsonrpc import each, rpc_key", False),
        ("collectors.http_proxy", "from collectors.tap import lost_messages as _lost", False),
        ("collectors.http_proxy", "from collectors import __doc__", False),
        ("collectors.http_proxy", "import json\njson._default_encoder", False),
        ("collectors.http_proxy", "self._queue.put(1)", False),
    ],
)
def test_the_checker_sees_a_private_import(module: str, source: str, bad: bool) -> None:
    found = list(private_imports(source, module, False, _our_modules()))
    assert bool(found) is bad, found


# -- the CLI's command modules do not import each other ----------------------------------------------
def _cli_module(name: str) -> bool:
    return name.startswith("scopewatch.") and name.endswith("_cli") and name.count(".") == 1


def sideways_cli_imports(source: str, module: str) -> list[str]:
    """The other ``scopewatch.*_cli`` modules (or names of theirs) ``source`` imports."""
    found = []
    for _line, name in imported(ast.parse(source), module, False):
        owner = name if _cli_module(name) else name.rpartition(".")[0]
        if _cli_module(owner) and owner != module:
            found.append(name)
    return found


def test_no_command_module_imports_another() -> None:
    """A command module (``scopewatch/*_cli.py``) takes what it shares with another from a module
    both import (``collectors.config.parse_listen``, ``scopewatch.emitting.emit_event``), not from
    the other command (as intake_cli once took proxy_cli's parse_listen); only ``scopewatch.cli``,
    the app, imports them all."""
    found = []
    for path in sorted((ROOT / "scopewatch").glob("*_cli.py")):
        module = module_name(path)
        found += [f"{module} imports {n}" for n in sideways_cli_imports(path.read_text(encoding="utf-8"), module)]
    assert found == []


@pytest.mark.parametrize(
    ("source", "bad"),
    [
        ("from scopewatch.proxy_cli import parse_listen", True),
        ("def f():\n    from scopewatch.policy_cli import check_folder", True),
        ("from scopewatch import proxy_cli", True),
        ("from .proxy_cli import parse_listen", True),
        ("from collectors.config import parse_listen", False),
        ("from scopewatch.emitting import emit_event", False),
        ("from scopewatch.intake_cli import SECRETS_ENV", False),  # its own
    ],
)
def test_the_checker_sees_a_sideways_command_import(source: str, bad: bool) -> None:
    assert bool(sideways_cli_imports(source, "scopewatch.intake_cli")) is bad
