"""``scopewatch proxy``: run the HTTP collector (:mod:`collectors.http_proxy`) in the foreground.

    scopewatch proxy --upstream http://127.0.0.1:8000/mcp --listen 127.0.0.1:8787 \\
        --jwks idp-keys.json --issuer https://idp.example.com --audience https://mcp.example.com \\
        --require-auth

Kafka comes from the usual settings (``SCOPEWATCH_BOOTSTRAP``, ``SCOPEWATCH_TOPIC_PREFIX`` ...);
redaction and resource rules from the same environment variables as ``scopewatch wrap``
(``SCOPEWATCH_REDACTION_KEY`` ...; see :mod:`collectors.stdio`). A bad key, JWKS file or
redaction setting stops the proxy before it listens (exit code 2). It prints
``scopewatch proxy: listening on URL`` to stderr once it accepts connections, and stops on
SIGINT/SIGTERM: open sessions end, pending calls time out, and queued events are flushed to
Kafka (at most ``--flush-timeout`` seconds).

The main CLI mounts this sub-app with ``app.add_typer(proxy_app, name="proxy")``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Annotated

import typer

from collectors.config import parse_listen

proxy_app = typer.Typer(
    add_completion=False,
    help="Reverse proxy for MCP Streamable HTTP that verifies bearer JWTs and publishes every tool call.",
)


def _fail(message: str, code: int = 2) -> None:
    sys.stderr.write(f"scopewatch proxy: error: {message}\n")
    raise typer.Exit(code)


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@proxy_app.callback(invoke_without_command=True)
def proxy(
    upstream: Annotated[str, typer.Option(help="URL of the upstream MCP endpoint, e.g. http://127.0.0.1:8000/mcp")],
    listen: Annotated[str, typer.Option(help="HOST:PORT to listen on (loopback unless you mean otherwise)")] = (
        "127.0.0.1:8787"
    ),
    path: Annotated[str | None, typer.Option(help="MCP endpoint path on the proxy (default: the upstream's)")] = None,
    jwks: Annotated[
        Path | None, typer.Option(help="JWKS file with the issuer's public keys (re-read on change)")
    ] = None,
    key: Annotated[
        list[Path] | None, typer.Option("--key", help="PEM public key or certificate (RS256/ES256); repeatable")
    ] = None,
    issuer: Annotated[list[str] | None, typer.Option(help="accepted token issuer (iss); repeatable")] = None,
    audience: Annotated[list[str] | None, typer.Option(help="accepted token audience (aud); repeatable")] = None,
    require_auth: Annotated[
        bool, typer.Option("--require-auth", help="answer 401 to requests without a verified token")
    ] = False,
    leeway: Annotated[float, typer.Option(help="clock leeway in seconds for exp/nbf/iat")] = 30.0,
    agent_claim: Annotated[
        str | None,
        typer.Option(help="claim naming the agent (e.g. client_id, azp): tokens without it are invalid"),
    ] = None,
    resource_metadata: Annotated[
        str | None, typer.Option(help="protected-resource metadata URL announced in WWW-Authenticate")
    ] = None,
    tenant: Annotated[str, typer.Option(envvar="SCOPEWATCH_TENANT")] = "default",
    server: Annotated[
        str | None, typer.Option(envvar="SCOPEWATCH_SERVER", help="server label in events (default: serverInfo.name)")
    ] = None,
    collector_id: Annotated[str | None, typer.Option(envvar="SCOPEWATCH_COLLECTOR_ID")] = None,
    session_idle: Annotated[float, typer.Option(help="seconds after which an idle session ends")] = 3600.0,
    max_sessions: Annotated[int, typer.Option(help="sessions tracked at once (least recently used end first)")] = (
        10_000
    ),
    flush_timeout: Annotated[float, typer.Option(help="seconds to flush events at exit")] = 15.0,
    log_level: Annotated[str, typer.Option(help="debug | info | warning | error")] = "info",
) -> None:
    """Run the HTTP collector in front of one MCP server until SIGINT/SIGTERM."""
    from collectors.chain import ChainStamper
    from collectors.config import CollectorConfig, ConfigError
    from collectors.emit import Emitter
    from collectors.http_proxy import HttpProxy, ProxyConfig, serve
    from collectors.jwt_verify import JwtConfigError, JwtVerifier
    from collectors.publisher import BackgroundPublisher, PublisherError
    from collectors.spool import SpoolConfigError

    level = getattr(logging, log_level.upper(), None)
    if not isinstance(level, int):
        _fail(f"unknown log level {log_level!r}")
    logging.basicConfig(stream=sys.stderr, level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # delivery problems are summed up at exit

    try:
        host, port = parse_listen(listen)
    except ValueError as exc:
        _fail(str(exc))
    keys = list(key or [])
    verifier: JwtVerifier | None = None
    if keys or jwks is not None:
        try:
            verifier = JwtVerifier.from_files(
                issuers=issuer or (),
                audiences=audience or (),
                pem_files=keys,
                jwks_file=jwks,
                leeway=leeway,
                agent_claim=agent_claim,
            )
        except JwtConfigError as exc:
            _fail(str(exc))
    elif issuer or audience or agent_claim:
        _fail("--issuer/--audience/--agent-claim need keys to verify with: --jwks FILE or --key PEM")
    if require_auth and verifier is None:
        _fail("--require-auth needs keys to verify with: --jwks FILE or --key PEM")
    if not _is_loopback(host) and not require_auth:
        sys.stderr.write(f"scopewatch proxy: warning: listening on {host} without --require-auth\n")
    if verifier is None:
        sys.stderr.write("scopewatch proxy: no keys: bearer tokens are recorded as unverified, never attested\n")

    try:
        collector = CollectorConfig.from_env()
        redactor = collector.redactor()
        extractor = collector.extractor()
        config = ProxyConfig(
            upstream=upstream,
            host=host,
            port=port,
            path=path,
            tenant=tenant,
            server_label=server,
            require_auth=require_auth,
            resource_metadata=resource_metadata,
            session_idle_seconds=session_idle,
            max_sessions=max_sessions,
            server=collector.proxy_server,
        )
    except (ConfigError, ValueError) as exc:
        _fail(str(exc))

    try:
        publisher = BackgroundPublisher(
            collector.kafka_bootstrap, client_id="scopewatch-proxy", spool=collector.spool()
        ).start()
    except (PublisherError, SpoolConfigError) as exc:
        _fail(f"spool settings: {exc}" if isinstance(exc, SpoolConfigError) else str(exc))
    cid = collector_id or f"http:{socket.gethostname()}:{host}:{port}"
    emitter = Emitter(collector.topics, ChainStamper(cid, epoch=time.time_ns() // 1_000_000), publisher)
    proxy = HttpProxy(
        config,
        emit=emitter.emit,
        emit_many=emitter.emit_many,
        redactor=redactor,
        verifier=verifier,
        extractor=extractor,
    )

    def ready(running: HttpProxy) -> None:
        sys.stderr.write(f"scopewatch proxy: listening on {running.url}\n")
        sys.stderr.flush()

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        stats = await serve(proxy, stop, ready)
        tracked = proxy.tracker.stats
        logging.getLogger("scopewatch.proxy").info(
            "stopped: %s; events %d, observer errors %d", stats.as_dict(), tracked.events, tracked.observer_errors
        )

    try:
        asyncio.run(main())
    except OSError as exc:
        publisher.close(0.1)
        _fail(f"cannot listen on {listen}: {exc.strerror or exc}")
    delivered = publisher.close(flush_timeout)
    lost = delivered.lost_queue_full + delivered.lost_at_close + delivered.lost_poison
    if lost:
        sys.stderr.write(
            f"scopewatch proxy: {lost} events NOT delivered to Kafka "
            f"(refused {delivered.lost_queue_full}, unsent at exit {delivered.lost_at_close}, "
            f"refused by Kafka {delivered.lost_poison}; last error: {delivered.last_error})\n"
        )
        raise typer.Exit(1)


def main() -> None:
    """Entry point for running the sub-app alone (``python -m scopewatch.proxy_cli``)."""
    proxy_app()


if __name__ == "__main__":
    main()
