"""aiohttp servers that answer malformed or oversized HTTP without quoting or logging any of it.

aiohttp answers a request its HTTP parser refuses with a 400 whose text quotes the first 100 bytes
of the offending line, and logs the same at ERROR: for an oversized ``Authorization`` header, the
start of the token; for a webhook, whatever a sender put in a malformed header. The HTTP proxy
(:mod:`collectors.http_proxy`) and the intake (:mod:`collectors.intake`) both serve through
:class:`GuardedRunner` instead: a request line or header field over :data:`MAX_HEADER_BYTES` (or
too many headers) is answered ``431`` and anything else malformed ``400``, each with a fixed JSON
body, and logged as one line naming the peer and the kind of failure, never the request's bytes.
"""

from __future__ import annotations

import logging
from typing import Any, Final

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.web_protocol import RequestHandler

__all__ = ["MAX_HEADER_BYTES", "GuardedRunner"]

MAX_HEADER_BYTES: Final = 32 * 1024
"""The longest request line or header field a guarded server reads; longer ones are answered 431."""


class _GuardedRequestHandler(RequestHandler):
    """aiohttp's connection handler, except for requests its HTTP parser refuses (see the module)."""

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        too_large = isinstance(exc, LineTooLong) or "Too many headers" in str(exc.message)
        kind = "a request line or header over the size limit" if too_large else f"malformed HTTP ({type(exc).__name__})"
        manager = self._manager
        log = manager.guard_log if isinstance(manager, _GuardedServer) else logging.getLogger(__name__)
        log.warning("refused a request from %s: %s", request.remote or "?", kind)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent; cannot answer the parse error")
        if too_large:
            body = {"error": "request_header_fields_too_large", "error_description": "A header is too large"}
            response = web.json_response(body, status=431)
        else:
            response = web.json_response({"error": "bad_request", "error_description": "Malformed HTTP"}, status=400)
        response.force_close()
        return response


class _GuardedServer(web.Server):
    guard_log: logging.Logger

    def __call__(self) -> RequestHandler:
        return _GuardedRequestHandler(self, loop=self._loop, **self._kwargs)


class GuardedRunner(web.AppRunner):
    """An :class:`aiohttp.web.AppRunner` whose connections use the guarded handler.

    ``log``: where refusals are logged (the serving component's own logger). Request lines and
    header fields longer than ``max_header_bytes`` are refused; the access log is off unless
    ``access_log`` is given (aiohttp's default format logs the ``User-Agent`` and ``Referer``).
    """

    def __init__(
        self, app: web.Application, *, log: logging.Logger, max_header_bytes: int = MAX_HEADER_BYTES, **kwargs: Any
    ) -> None:
        kwargs.setdefault("access_log", None)
        super().__init__(app, max_field_size=max_header_bytes, max_line_size=max_header_bytes, **kwargs)
        self._guard_log = log

    async def _make_server(self) -> web.Server:
        server = await super()._make_server()
        server.__class__ = _GuardedServer  # same object, only the handler factory differs
        server.guard_log = self._guard_log  # type: ignore[attr-defined]
        return server
