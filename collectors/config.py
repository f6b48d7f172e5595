"""The collectors' configuration: one pydantic-settings model for ``wrap``, ``proxy``, the SDK
middleware and ``intake`` (environment prefix ``SCOPEWATCH_``).

Kafka
    ``SCOPEWATCH_BOOTSTRAP`` (default: the local broker, ``127.0.0.1:$SCOPEWATCH_KAFKA_PORT``,
    port ``schemas.topics.LOCAL_KAFKA_PORT``, 19092), ``SCOPEWATCH_TOPIC_PREFIX``.
Spool (see :mod:`collectors.spool`)
    ``SCOPEWATCH_SPOOL_DIR`` (default ``$SCOPEWATCH_HOME/spool``, else ``~/.scopewatch/spool``),
    ``SCOPEWATCH_SPOOL_MAX_BYTES``, ``_SEGMENT_BYTES``, ``_FSYNC``, ``_FSYNC_INTERVAL``,
    ``_ON_FULL``, ``_BLOCK_TIMEOUT``, ``_STALL_SECONDS``.
Redaction (see :mod:`collectors.redact`)
    ``SCOPEWATCH_REDACTION_KEY`` (else the host key file ``<state home>/redaction.key``, created
    on first use, mode 0600), ``SCOPEWATCH_REDACT_PATTERNS`` (JSON object name -> regex),
    ``SCOPEWATCH_REDACT_ARGUMENTS`` (comma-separated argument names), ``SCOPEWATCH_MAX_ARGUMENT_BYTES``.
Resources
    ``SCOPEWATCH_RESOURCE_RULES``: a JSON file of resource extraction rules (default: built in);
    ``SCOPEWATCH_OBSERVER_NICE``: niceness added to ``wrap``'s observer process (default 19);
    ``SCOPEWATCH_CACHE_DIR``: where a relay built outside the virtualenv is looked for (``bin/``).
Intake
    ``SCOPEWATCH_INTAKE_SECRETS``: ``whsec_`` webhook secrets, separated by commas or whitespace.
Publisher
    ``SCOPEWATCH_PUBLISHER_CLIENT``: ``rdkafka`` (default, librdkafka through confluent-kafka,
    :mod:`collectors.publisher_rdkafka`) or ``aiokafka`` (:mod:`collectors.publisher`).
Proxy
    ``SCOPEWATCH_PROXY_SERVER``: ``lean`` (default, :mod:`collectors.http_lean`) or ``aiohttp``.

Every collector reads it with :meth:`CollectorConfig.from_env` (an explicit mapping, or the
process environment). Errors are :class:`ConfigError` and name the variable, never its value
(a redaction key or pattern may be a secret).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import tempfile
from collections.abc import Iterator, Mapping
from contextvars import ContextVar
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretBytes, SecretStr, ValidationError
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict
from pydantic_settings.sources.utils import parse_env_vars

from collectors.redact import MIN_KEY_BYTES, Redactor
from collectors.resources import ResourceExtractor
from collectors.spool import FsyncPolicy, OnFull, SpoolConfig, SpoolConfigError
from schemas.topics import DEAD_LETTER, LOCAL_KAFKA_PORT, Topics

__all__ = [
    "DEFAULT_KAFKA_PORT",
    "KEY_ENV",
    "KEY_FILE",
    "CollectorConfig",
    "ConfigError",
    "host_key",
    "key_file",
    "parse_listen",
    "state_home",
    "validation_errors",
]

PREFIX = "SCOPEWATCH_"
DEFAULT_KAFKA_PORT = LOCAL_KAFKA_PORT
OBSERVER_NICE = 19
"""Default niceness of ``wrap``'s observer process (``SCOPEWATCH_OBSERVER_NICE``)."""
KEY_ENV = "SCOPEWATCH_REDACTION_KEY"
KEY_FILE = "redaction.key"

_ENVIRON: ContextVar[Mapping[str, str] | None] = ContextVar("scopewatch_collector_environ", default=None)


def state_home(environ: Mapping[str, str]) -> Path:
    """The collectors' state folder: ``$SCOPEWATCH_HOME``, else ``~/.scopewatch``.

    Not the settings' default (``./.scopewatch``): MCP clients choose the working directory of
    the collectors they launch, and the spool must be found again by the next start.
    """
    home = environ.get(PREFIX + "HOME")
    return Path(home).expanduser().resolve() if home else Path.home() / ".scopewatch"


class ConfigError(RuntimeError):
    """A collector setting is invalid (the message names it, never its value)."""


class _EnvironSource(EnvSettingsSource):
    """The environment source, reading the mapping given to :meth:`CollectorConfig.from_env`."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        environ = _ENVIRON.get()
        return parse_env_vars(
            os.environ if environ is None else environ,
            self.case_sensitive,
            self.env_ignore_empty,
            self.env_parse_none_str,
        )


class CollectorConfig(BaseSettings):
    """What a collector needs to know: Kafka, spool, redaction, resources."""

    model_config = SettingsConfigDict(env_prefix=PREFIX, extra="ignore", env_ignore_empty=True)

    home: Path | None = Field(default=None, description="state folder (spool, redaction key); default ~/.scopewatch")

    # Kafka
    bootstrap: str | None = Field(default=None, description="Kafka bootstrap servers; default: the local broker")
    kafka_port: int = Field(default=DEFAULT_KAFKA_PORT, ge=1, le=65535)
    topic_prefix: str = ""

    # spool
    spool_dir: Path | None = None
    spool_max_bytes: int | None = None
    spool_segment_bytes: int | None = None
    spool_fsync: str | None = None
    spool_fsync_interval: float | None = None
    spool_on_full: str | None = None
    spool_block_timeout: float | None = None
    spool_stall_seconds: float | None = None

    # redaction
    redaction_key: SecretStr | None = None
    redact_patterns: SecretStr | None = Field(default=None, description="JSON object: name -> regex")
    redact_arguments: str = ""
    max_argument_bytes: int | None = None

    # resources
    resource_rules: Path | None = None
    observer_nice: int = Field(
        default=OBSERVER_NICE, ge=0, le=19, description="niceness added to wrap's observer process (0: a full share)"
    )
    cache_dir: Path | None = Field(default=None, description="default ~/.cache/scopewatch; a relay may be in bin/")

    # intake
    intake_secrets: SecretStr | None = Field(default=None, description="whsec_ secrets, comma or space separated")

    # the collectors' Kafka client (collectors.publisher / collectors.publisher_rdkafka)
    publisher_client: Literal["rdkafka", "aiokafka"] = Field(
        default="rdkafka",
        description="rdkafka: librdkafka (confluent-kafka) producer, delivery reports; aiokafka: asyncio producer",
    )

    # wrap: which relay copies the bytes (collectors.native_relay)
    wrap_relay: Literal["auto", "native", "python"] = Field(
        default="auto", description="auto: the native relay when it is built; native: fail without it; python"
    )

    # proxy: what serves its clients (collectors.http_lean, or aiohttp's web server)
    proxy_server: Literal["lean", "aiohttp"] = Field(
        default="lean", description="lean: the proxy's own HTTP/1.1 server; aiohttp: aiohttp's web server"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _EnvironSource(settings_cls))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> CollectorConfig:
        """The settings in ``environ`` (default: this process's environment); ConfigError if invalid."""
        token = _ENVIRON.set(environ)
        try:
            return cls()
        except ValidationError as exc:
            raise ConfigError(f"collector settings: {validation_errors(exc, PREFIX)}") from None
        finally:
            _ENVIRON.reset(token)

    @classmethod
    def of(cls, settings: CollectorConfig | Mapping[str, str] | None = None) -> CollectorConfig:
        """``settings`` itself when it is the collector settings, else :meth:`from_env` of that environment."""
        return settings if isinstance(settings, CollectorConfig) else cls.from_env(settings)

    # -- derived -----------------------------------------------------------------------
    @property
    def state_home(self) -> Path:
        return state_home({"SCOPEWATCH_HOME": str(self.home)} if self.home else {})

    @property
    def spool_path(self) -> Path:
        """The spool directory: ``SCOPEWATCH_SPOOL_DIR``, else ``<state home>/spool``."""
        return self.spool_dir.expanduser().resolve() if self.spool_dir else self.state_home / "spool"

    @property
    def cache_path(self) -> Path:
        """``SCOPEWATCH_CACHE_DIR``, else ``~/.cache/scopewatch``."""
        return self.cache_dir.expanduser() if self.cache_dir else Path.home() / ".cache" / "scopewatch"

    @property
    def kafka_bootstrap(self) -> str:
        return self.bootstrap or f"127.0.0.1:{self.kafka_port}"

    @property
    def topics(self) -> Topics:
        return Topics.with_prefix(self.topic_prefix)

    def spool(self) -> SpoolConfig:
        """The spool settings; :class:`~collectors.spool.SpoolConfigError` if invalid."""
        values: dict[str, Any] = {
            "dir": self.spool_path,
            "loss_topic": self.topic_prefix + DEAD_LETTER,
        }
        for name in (
            "max_bytes",
            "segment_bytes",
            "fsync_interval",
            "block_timeout",
            "stall_seconds",
        ):
            value = getattr(self, f"spool_{name}")
            if value is not None:
                values[name] = value
        if self.spool_fsync:
            fsync: FsyncPolicy = self.spool_fsync.strip().lower()  # type: ignore[assignment]
            values["fsync"] = fsync
        if self.spool_on_full:
            on_full: OnFull = self.spool_on_full.strip().lower()  # type: ignore[assignment]
            values["on_full"] = on_full
        return SpoolConfig(**values)

    def key(self) -> bytes:
        """``SCOPEWATCH_REDACTION_KEY``, else the host key file (created on first use)."""
        if self.redaction_key is not None:
            key = self.redaction_key.get_secret_value().encode("utf-8")
            if len(key) < MIN_KEY_BYTES:
                raise ConfigError(f"{KEY_ENV} must have at least {MIN_KEY_BYTES} bytes")
            return key
        return host_key(self.key_path)

    @property
    def key_path(self) -> Path:
        """Where the per-host key lives: ``<state home>/redaction.key``."""
        return self.state_home / KEY_FILE

    def redactor(self) -> Redactor:
        """The redaction policy of this host."""
        try:
            patterns = json.loads(self.redact_patterns.get_secret_value() if self.redact_patterns else "{}")
        except ValueError as exc:
            raise ConfigError(f"SCOPEWATCH_REDACT_PATTERNS is not JSON: {exc.args[0]}") from None
        names = tuple(n.strip() for n in self.redact_arguments.split(",") if n.strip())
        config: dict[str, Any] = {"patterns": patterns, "argument_names": names}
        if self.max_argument_bytes is not None:
            config["max_argument_bytes"] = self.max_argument_bytes
        try:
            return Redactor.model_validate({**config, "key": SecretBytes(self.key())})
        except ValidationError as exc:
            raise ConfigError(f"redaction settings: {validation_errors(exc)}") from None

    def extractor(self) -> ResourceExtractor | None:
        """The resource rules of ``SCOPEWATCH_RESOURCE_RULES``, or ``None`` (use the defaults)."""
        where = self.resource_rules
        if where is None:
            return None
        try:
            config = json.loads(where.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read resource rules {where}: {exc}") from None
        try:
            return ResourceExtractor.model_validate({"rules": config} if isinstance(config, list) else config)
        except ValidationError as exc:
            raise ConfigError(f"resource rules {where}: {validation_errors(exc)}") from None


def spool_from_env(environ: Mapping[str, str]) -> SpoolConfig:
    """The spool settings in ``environ``; :class:`~collectors.spool.SpoolConfigError` if invalid."""
    try:
        return CollectorConfig.from_env(environ).spool()
    except ConfigError as exc:
        raise SpoolConfigError(str(exc).removeprefix("collector settings: ")) from None


def key_file(environ: Mapping[str, str]) -> Path:
    """Where the per-host key lives: under ``SCOPEWATCH_HOME``, else under ``~/.scopewatch``."""
    return state_home(environ) / KEY_FILE


def host_key(path: Path) -> bytes:
    """The key stored at ``path``; a new random one if there is none yet (mode 0600)."""
    if not path.exists():
        try:
            _create_key_file(path)
        except OSError as exc:
            raise ConfigError(f"cannot create the redaction key {path}: {exc.strerror or exc}") from None
    try:
        mode = path.stat().st_mode
        key = path.read_bytes().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the redaction key {path}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise ConfigError(f"the redaction key {path} is accessible to group or others: chmod 600 it")
    if len(key) < MIN_KEY_BYTES:
        raise ConfigError(f"the redaction key in {path} is shorter than {MIN_KEY_BYTES} bytes")
    return key


def _create_key_file(path: Path) -> None:
    """Write a fresh key to a private temporary file, then link it into place unless one exists."""
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".redaction-key-")  # mode 0600
    try:
        with os.fdopen(fd, "w", encoding="ascii") as out:
            out.write(secrets.token_hex(32) + "\n")
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(FileExistsError):  # another collector won the race: use its key
            os.link(tmp, path)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)


def validation_errors(exc: ValidationError, env_prefix: str | None = None) -> str:
    """Validation errors without the input values (which may be secrets); with ``env_prefix``,
    each names its environment variable."""

    def where(loc: tuple[int | str, ...]) -> str:
        name = ".".join(str(p) for p in loc) or "value"
        return f"{env_prefix}{name.upper()}" if env_prefix and loc else name

    return "; ".join(f"{where(err['loc'])}: {err['msg'].removeprefix('Value error, ')}" for err in _errors(exc))


def _errors(exc: ValidationError) -> Iterator[Any]:
    yield from exc.errors(include_input=False)


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[v6]:PORT`` for IPv6) -> ``(host, port)`` (the ``--listen`` of proxy and intake)."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not host:
        raise ValueError(f"--listen wants HOST:PORT, got {value!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    number = int(port)
    if not 0 <= number <= 65535:
        raise ValueError(f"port {number} out of range")
    return host, number
