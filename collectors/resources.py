"""Resource extraction: which files, repositories and URLs a tool call touches.

A :class:`ResourceRule` applies to the calls whose ``server/tool`` matches one of its glob
patterns (``fnmatch.fnmatchcase``, as grants match tools) and turns arguments into resource
strings through templates such as ``file:{path}`` or ``repo:{owner}/{repo}``:

* a template yields a resource only when every field it names is an argument holding a
  non-empty string or a number (booleans, objects and ``null`` yield nothing);
* a field holding a list yields one resource per string/number element (a cross product
  when several fields are lists);
* ``file:`` resources are normalised (``posixpath.normpath``) so that ``/data/../etc/passwd``
  cannot pass for ``/data/*`` in a grant.

All matching rules contribute; :data:`DEFAULT_RULES` cover the reference servers
(``@modelcontextprotocol/server-filesystem``, ``server-everything``) and GitHub-like servers
(any tool with ``owner`` and ``repo``) and any ``url`` argument. Extraction reads the
*original* arguments, but every resource goes through the :class:`~collectors.redact.Redactor`
before it is returned -- values of credential-like arguments are fingerprinted, and secrets
inside values (a token in a URL, a password in a connection string) are replaced -- so a
resource never carries a secret. The output is sorted and free of duplicates; more than
``max_resources`` resources are cut to that many, the last one being
``overflow:truncated`` (which no ordinary grant pattern covers: fail closed).

Pure: no I/O, deterministic.
"""

from __future__ import annotations

import functools
import itertools
import math
import posixpath
import string
from collections.abc import Iterator, Mapping
from fnmatch import fnmatchcase
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, field_validator

from collectors.redact import Redactor

__all__ = ["DEFAULT_RULES", "MAX_RESOURCES", "OVERFLOW", "ResourceExtractor", "ResourceRule", "template_fields"]

MAX_RESOURCES = 256
MAX_RESOURCE_CHARS = 4096
TEMPLATE_CACHE = 4096
"""Distinct ``server/tool`` names whose matching templates an extractor remembers (then starts over)."""
OVERFLOW = "overflow:truncated"
_FORMATTER = string.Formatter()


def template_fields(template: str) -> tuple[str, ...]:
    """The argument names a template refers to, in order (``repo:{owner}/{repo}`` -> owner, repo)."""
    return tuple(name for _, name, _, _ in _FORMATTER.parse(template) if name is not None)


class ResourceRule(BaseModel):
    """Calls to ``tools`` (globs over ``server/tool``) touch the resources of ``templates``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    tools: tuple[str, ...] = Field(min_length=1, description="glob patterns over server/tool, e.g. */read_file")
    templates: tuple[str, ...] = Field(min_length=1, description="e.g. file:{path}, repo:{owner}/{repo}")

    @field_validator("templates")
    @classmethod
    def _simple_fields(cls, templates: tuple[str, ...]) -> tuple[str, ...]:
        for template in templates:
            try:
                parsed = list(_FORMATTER.parse(template))
            except ValueError as exc:
                raise ValueError(f"template {template!r}: {exc}") from None
            for _, name, spec, conversion in parsed:
                if name is None:
                    continue
                if not name or spec or conversion or not name.replace("_", "a").replace("-", "a").isalnum():
                    raise ValueError(f"template {template!r}: fields must be plain argument names like {{path}}")
        return templates


_FILESYSTEM_PATH_TOOLS = (
    "read_file",
    "read_text_file",
    "read_media_file",
    "write_file",
    "edit_file",
    "create_directory",
    "list_directory",
    "list_directory_with_sizes",
    "directory_tree",
    "search_files",
    "get_file_info",
)

DEFAULT_RULES: tuple[ResourceRule, ...] = (
    # any server: URLs and GitHub-like repositories
    ResourceRule(tools=("*",), templates=("url:{url}", "repo:{owner}/{repo}")),
    # @modelcontextprotocol/server-filesystem
    ResourceRule(tools=tuple(f"*/{tool}" for tool in _FILESYSTEM_PATH_TOOLS), templates=("file:{path}",)),
    ResourceRule(tools=("*/read_multiple_files",), templates=("file:{paths}",)),
    ResourceRule(tools=("*/move_file",), templates=("file:{source}", "file:{destination}")),
    # @modelcontextprotocol/server-everything
    ResourceRule(tools=("*/gzip-file-as-resource",), templates=("url:{data}",)),
    ResourceRule(tools=("*/get-resource-reference", "*/getResourceReference"), templates=("resource:{resourceId}",)),
)
"""Rules for the reference MCP servers; a :class:`ResourceExtractor` uses them unless told not to."""


class ResourceExtractor(BaseModel):
    """The configured rules (``rules`` first, then :data:`DEFAULT_RULES` if ``defaults``)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    rules: tuple[ResourceRule, ...] = ()
    defaults: bool = True
    max_resources: int = Field(default=MAX_RESOURCES, ge=2)
    _templates: dict[str, tuple[str, ...]] = PrivateAttr(default_factory=dict)

    @property
    def active_rules(self) -> tuple[ResourceRule, ...]:
        return self.rules + (DEFAULT_RULES if self.defaults else ())

    def templates_for(self, target: str) -> tuple[str, ...]:
        """The templates of every rule matching ``server/tool``, in rule order (remembered per target)."""
        templates: dict[str, tuple[str, ...]] = self.__pydantic_private__["_templates"]  # type: ignore[index]
        found = templates.get(target)  # (not self._templates: pydantic's __getattr__ costs microseconds)
        if found is None:
            found = tuple(
                template
                for rule in self.active_rules
                if any(fnmatchcase(target, pattern) for pattern in rule.tools)
                for template in rule.templates
            )
            if len(templates) >= TEMPLATE_CACHE:  # tool names come from the agent: stay bounded
                templates.clear()
            templates[target] = found
        return found

    def extract(self, server: str, tool: str, arguments: Any, redactor: Redactor) -> list[str]:
        """The sorted, distinct, redacted resources of a call to ``server``/``tool`` with ``arguments``."""
        if not isinstance(arguments, Mapping):
            return []
        found: set[str] = set()
        for template in self.templates_for(f"{server}/{tool}"):
            if not _field_set(template) <= arguments.keys():
                continue  # a field it names is missing: it yields nothing (see _render)
            found.update(_render(template, arguments, redactor, self.max_resources))
        if not found:
            return []
        resources = sorted({redactor.redact_text(r).value for r in found})
        if len(resources) > self.max_resources:
            resources = [*resources[: self.max_resources - 1], OVERFLOW]
        return resources


@functools.cache
def _field_set(template: str) -> frozenset[str]:
    """The fields of a template, as a set (templates come from the configuration: a bounded set)."""
    return frozenset(template_fields(template))


def _render(template: str, arguments: Mapping[str, Any], redactor: Redactor, limit: int) -> Iterator[str]:
    """Every resource one template gives for ``arguments`` (nothing if a field is missing)."""
    parsed = list(_FORMATTER.parse(template))
    choices: list[list[str]] = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        values = _scalars(arguments.get(name))
        if not values:
            return
        choices.append([redactor.redact_field(name, v).value for v in values])
    is_file = template.startswith("file:")
    for combination in itertools.islice(itertools.product(*choices), limit + 1):
        picked = iter(combination)
        parts: list[str] = []
        for literal, name, _, _ in parsed:
            parts.append(literal)
            if name is not None:
                value = next(picked)
                parts.append(_normalise_path(value) if is_file else value)
        yield "".join(parts)[:MAX_RESOURCE_CHARS]


def _scalars(value: Any) -> list[str]:
    """A field's value(s) as strings: strings, finite numbers, or a list of those."""
    items = value if isinstance(value, list) else [value]
    out: list[str] = []
    for item in items:
        if isinstance(item, bool) or item is None:
            continue
        if isinstance(item, str):
            if item:
                out.append(item)
        elif isinstance(item, int) or (isinstance(item, float) and math.isfinite(item)):
            out.append(str(item))
    return out


def _normalise_path(path: str) -> str:
    """``/data/../etc/passwd`` -> ``/etc/passwd``; ``a//b/`` -> ``a/b`` (no file system access)."""
    return posixpath.normpath(path)
