"""Reference MCP servers from npm, installed once into the cache folder."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from scopewatch.stack.kafka import StackError, ToolMissing

# Pinned so that the demo and the tests talk to the same server everywhere.
SERVER_EVERYTHING = ("@modelcontextprotocol/server-everything", "2026.8.31")
SERVER_FILESYSTEM = ("@modelcontextprotocol/server-filesystem", "2026.8.31")
SERVER_MEMORY = ("@modelcontextprotocol/server-memory", "2026.8.31")


def ensure_npm_package(cache_dir: Path, package: str, version: str) -> Path:
    """Install ``package@version`` under ``cache_dir/npm`` unless present; returns its folder."""
    prefix = cache_dir / "npm"
    folder = prefix / "node_modules" / package
    manifest = folder / "package.json"
    if manifest.exists() and f'"version": "{version}"' in manifest.read_text():
        return folder
    npm = shutil.which("npm")
    if npm is None:
        raise ToolMissing("npm", "Node.js 18+ with npm (apt-get install nodejs npm)")
    prefix.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [npm, "install", "--no-audit", "--no-fund", "--prefix", str(prefix), f"{package}@{version}"],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if result.returncode != 0 or not manifest.exists():
        tail = "\n".join((result.stdout + result.stderr).splitlines()[-20:])
        raise StackError(f"npm install {package}@{version} failed:\n{tail}")
    return folder


def server_everything_command(cache_dir: Path) -> list[str]:
    """The command line that runs @modelcontextprotocol/server-everything over stdio."""
    folder = ensure_npm_package(cache_dir, *SERVER_EVERYTHING)
    node = shutil.which("node")
    if node is None:
        raise ToolMissing("node", "Node.js 18+ (apt-get install nodejs)")
    return [node, str(folder / "dist" / "index.js"), "stdio"]


def server_filesystem_command(cache_dir: Path, *roots: Path) -> list[str]:
    """The command line that runs @modelcontextprotocol/server-filesystem over stdio on ``roots``."""
    folder = ensure_npm_package(cache_dir, *SERVER_FILESYSTEM)
    node = shutil.which("node")
    if node is None:
        raise ToolMissing("node", "Node.js 18+ (apt-get install nodejs)")
    return [node, str(folder / "dist" / "index.js"), *(str(r) for r in roots)]


def server_memory_command(cache_dir: Path) -> list[str]:
    """The command line that runs @modelcontextprotocol/server-memory over stdio (its knowledge graph
    goes to the file named by ``MEMORY_FILE_PATH`` in its environment)."""
    folder = ensure_npm_package(cache_dir, *SERVER_MEMORY)
    node = shutil.which("node")
    if node is None:
        raise ToolMissing("node", "Node.js 18+ (apt-get install nodejs)")
    return [node, str(folder / "dist" / "index.js")]
