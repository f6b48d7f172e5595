"""What every long-running service (sink, decision worker, pager) does the same way.

* **Logs stay readable during a Kafka outage.**  aiokafka, librdkafka, Faust and mode log every failed
  connect, fetch and metadata refresh: a few hundred lines a second per process while the broker
  is down.  :class:`RepeatFilter` lets the first record of each kind through, then at most one per
  ``window`` seconds, which carries the number of records it stood for.  Only those libraries'
  loggers are limited; scopewatch's own records (dead letters, retries) always pass.
* **A stop signal ends the process in bounded time.**  With the broker gone, a service's last
  offset commit, producer flush or group leave waits for it forever, and ``scopewatch down`` had
  to SIGKILL each service after 20 s.  :class:`StopTimer` is armed when the signal arrives; if
  the orderly stop has not finished when it fires, the process says so and exits.  That is safe
  for the same reason a SIGKILL is: the services commit input offsets only after their output was
  accepted (ClickHouse for the sink, Kafka for the worker and the pager), so whatever the
  unfinished stop left uncommitted is read again on restart, and the sinks are idempotent.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence

log = logging.getLogger("scopewatch.runtime")

NOISY_LOGGERS = ("aiokafka", "kafka", "faust", "mode", "librdkafka")
EXIT_UNFINISHED_STOP = 75  # EX_TEMPFAIL: stopped, but the orderly shutdown did not finish


class RepeatFilter(logging.Filter):
    """Pass the first record of each kind, then at most one per ``window`` seconds with a count.

    A record's kind is its logger, level and unformatted message (``"Unable connect to node with
    id %s: %s"``), so the arguments may differ.  Records of loggers outside ``prefixes`` always
    pass.  At most ``max_kinds`` kinds are remembered (least recently passed forgotten first).
    """

    def __init__(
        self,
        prefixes: Sequence[str] = NOISY_LOGGERS,
        window: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
        max_kinds: int = 512,
    ) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)
        self.window = window
        self.clock = clock
        self.max_kinds = max_kinds
        self._kinds: OrderedDict[tuple[str, int, str], list[float]] = OrderedDict()  # kind -> [passed at, held]
        self._lock = threading.Lock()
        self.suppressed = 0

    def _limited(self, name: str) -> bool:
        return any(name == p or name.startswith(p + ".") for p in self.prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        if not self._limited(record.name):
            return True
        kind = (record.name, record.levelno, str(record.msg))
        with self._lock:
            now = self.clock()
            seen = self._kinds.get(kind)
            if seen is not None and now - seen[0] < self.window:
                seen[1] += 1
                self.suppressed += 1
                return False
            self._kinds[kind] = [now, 0]
            self._kinds.move_to_end(kind)
            while len(self._kinds) > self.max_kinds:
                self._kinds.popitem(last=False)
        if seen is not None and seen[1]:
            record.msg = f"{record.msg} [and {int(seen[1])} more like this in the last {now - seen[0]:.0f}s]"
        return True


def limit_repeats(logger: logging.Logger | None = None, window: float = 30.0) -> RepeatFilter:
    """Put one :class:`RepeatFilter` on every handler of ``logger`` (default: the root logger)."""
    target = logger or logging.getLogger()
    limiter = RepeatFilter(window=window)
    for handler in target.handlers:
        handler.addFilter(limiter)
    return limiter


def service_logging(level: str | int = logging.INFO) -> RepeatFilter:
    """Logging of a long-running service: stderr lines with time and logger, Kafka libraries limited."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiokafka").setLevel(logging.WARNING)
    return limit_repeats()


class StopTimer:
    """Exit the process if an orderly stop takes longer than ``seconds`` (see the module docstring)."""

    def __init__(self, seconds: float, service: str, exit: Callable[[int], object] = os._exit) -> None:
        self.seconds = seconds
        self.service = service
        self._exit = exit
        self._armed = threading.Event()
        self.fired = threading.Event()

    def arm(self) -> None:
        """Start the timer (once; later calls do nothing)."""
        if self._armed.is_set():
            return
        self._armed.set()
        threading.Thread(target=self._run, name=f"{self.service}-stop-timer", daemon=True).start()

    def _run(self) -> None:
        time.sleep(self.seconds)
        self.fired.set()
        log.error(
            "%s did not stop within %.0fs of the stop signal (is Kafka reachable?); exiting now. "
            "Input it had not committed is read again on restart.",
            self.service,
            self.seconds,
        )
        for handler in logging.getLogger().handlers:
            try:
                handler.flush()
            except Exception:  # noqa: BLE001, S112 - exiting anyway
                continue
        sys.stderr.flush()
        self._exit(EXIT_UNFINISHED_STOP)


def stop_on_signals(stop: Callable[[], None], seconds: float, service: str) -> StopTimer:
    """On SIGTERM/SIGINT in the running event loop: arm a :class:`StopTimer`, then call ``stop``."""
    timer = StopTimer(seconds, service)

    def on_signal() -> None:
        timer.arm()
        stop()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_signal)
    return timer


class KafkaUnreachable(Exception):
    """Kafka did not answer within the start-up wait."""


def kafka_probe(bootstrap: str) -> str | None:
    """None when a Kafka client can bootstrap from ``bootstrap`` (metadata answered), else why not."""
    from aiokafka import AIOKafkaClient
    from aiokafka.errors import KafkaError

    async def probe() -> str | None:
        client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        try:
            await client.bootstrap()
            return None
        except KafkaError as exc:
            return str(exc) or type(exc).__name__
        finally:
            await client.close()

    quiet = logging.getLogger("aiokafka")
    level = quiet.level
    quiet.setLevel(logging.CRITICAL)  # each failed connect is logged there; our own line says why
    try:
        return asyncio.run(probe())
    finally:
        quiet.setLevel(level)


def wait_for_kafka(
    bootstrap: str,
    service: str,
    timeout: float,
    probe: Callable[[str], str | None] = kafka_probe,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], object] = time.sleep,
) -> None:
    """Return once Kafka answers; a service started before its broker waits instead of crashing.

    Retries with backoff (0.5 s doubling to 5 s), one log line when the wait begins and one every
    30 s. Raises :class:`KafkaUnreachable` after ``timeout`` seconds.
    """
    started = clock()
    delay = 0.5
    logged: float | None = None
    while True:
        error = probe(bootstrap)
        now = clock()
        if error is None:
            if logged is not None:
                log.info("%s: Kafka at %s answers after %.0fs", service, bootstrap, now - started)
            return
        if now - started >= timeout:
            raise KafkaUnreachable(f"{service}: Kafka at {bootstrap} did not answer in {timeout:.0f}s ({error})")
        if logged is None or now - logged >= 30.0:
            log.warning("%s: waiting for Kafka at %s (%s)", service, bootstrap, error)
            logged = now
        sleep(min(delay, max(0.0, timeout - (now - started))))
        delay = min(delay * 2, 5.0)


def kafka_or_exit(bootstrap: str, service: str, timeout: float, own_handler: bool = False) -> None:
    """:func:`wait_for_kafka`, or one clear log line and exit status 1 (no traceback).

    ``own_handler``: log to stderr from here even though logging is not set up yet (the Faust
    worker sets it up only when it starts).
    """
    handler: logging.Handler | None = None
    if own_handler:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("[%(asctime)s] [%(process)d] [%(levelname)s] %(message)s"))
        log.addHandler(handler)
        log.propagate = False
        log.setLevel(logging.INFO)
    try:
        wait_for_kafka(bootstrap, service, timeout)
    except KafkaUnreachable as exc:
        log.error("%s", exc)
        raise SystemExit(1) from None
    finally:
        if handler is not None:
            log.removeHandler(handler)
            log.propagate = True
            log.setLevel(logging.NOTSET)
