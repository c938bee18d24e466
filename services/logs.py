"""structlog setup: key-value events, JSON when stderr is not a terminal."""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

import structlog


def configure(level: str = "INFO", fmt: str = "auto", service: str = "fairway") -> None:
    json_output = fmt == "json" or (fmt == "auto" and not sys.stderr.isatty())
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json_output else structlog.dev.ConsoleRenderer()
    )
    if json_output:  # progress bars are for terminals; in a log, lines no parser reads
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")

    def add_service(_logger: object, _name: str, event: dict) -> dict:
        """On every event, from any thread (context variables stay with the main one)."""
        event.setdefault("service", service)
        return event

    shared: list[structlog.typing.Processor] = [
        structlog.contextvars.merge_contextvars,
        add_service,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(logging.getLevelName(level.upper())),
        logger_factory=structlog.WriteLoggerFactory(file=sys.stderr),  # one write per line
        cache_logger_on_first_use=True,
    )
    _route_library_logs(shared, renderer, level)
    threading.excepthook = _log_thread_crash
    sys.excepthook = _log_crash


def _route_library_logs(shared: list[structlog.typing.Processor],
                        renderer: structlog.typing.Processor, level: str) -> None:
    """Libraries' ``logging`` records (aio-pika's reconnects, uvicorn's errors,
    transformers' warnings) rendered as our events, with the service and logger names,
    instead of plain lines among the JSON ones; WARNING and up unless ``level`` is higher."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            renderer,
        ],
    ))
    handler.addFilter(BrokerRestartNoise())
    handler.addFilter(ReconnectAttemptThrottle())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(logging.WARNING, logging.getLevelName(level.upper())))


class BrokerRestartNoise(logging.Filter):
    """The records a broker restart makes aiormq and aio-pika write at ERROR, lowered to
    WARNING: an outage every service waits out by itself (the robust connection comes
    back) should not page an operator the way a fault does. Only these three, matched
    exactly:

    - aiormq: the broker closed the connection with ``CONNECTION_FORCED`` (it is shutting
      down, or an operator closed the connection);
    - aiormq: a reconnect attempt was refused (the broker is not listening yet). aio-pika
      reports the same attempt as a warning; with a reconnect every second this would be
      an error a second per service for as long as the broker is down;
    - aio-pika: a robust channel's close callback found the connection already gone
      (mosquito/aio-pika#668, upstream; the channel comes back with the connection).
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and self.is_restart_noise(record):
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True

    @staticmethod
    def is_restart_noise(record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.name == "aiormq.connection":
            return refused_connect(record) or (
                message.startswith("Unexpected connection close") and "CONNECTION_FORCED" in message)
        if record.name == "aio_pika.tools":
            return "RobustChannel._on_close" in message and (
                "ChannelInvalidStateError" in message or "closed" in message)
        return False


class ReconnectAttemptThrottle(logging.Filter):
    """At most one record per ``interval_s`` for each library's failed reconnect attempts
    (aio-pika's "Connection attempt ... failed", aiormq's refused transport). With a
    reconnect every second, a broker down for minutes would write two lines a second per
    service; the first attempt of an outage is kept, then one per interval that says how
    many like it were left out."""

    def __init__(self, interval_s: float = 30.0, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._left_out: dict[str, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.is_reconnect_attempt(record):
            return True
        now, key = self.clock(), record.name
        last = self._last.get(key)
        if last is not None and now - last < self.interval_s:
            self._left_out[key] = self._left_out.get(key, 0) + 1
            return False
        self._last[key] = now
        left_out = self._left_out.pop(key, 0)
        if left_out:
            record.msg, record.args = f"{record.getMessage()} ({left_out} more like it left out)", ()
        return True

    @staticmethod
    def is_reconnect_attempt(record: logging.LogRecord) -> bool:
        if record.name == "aio_pika.robust_connection":
            return record.getMessage().startswith("Connection attempt to")
        return refused_connect(record)


def refused_connect(record: logging.LogRecord) -> bool:
    """aiormq's record of a connect the broker refused (it is not listening yet)."""
    if record.name != "aiormq.connection":
        return False
    message = record.getMessage()
    return message.startswith("error when creating transport") and (
        "Connect call failed" in message or "refused" in message.lower())


def _log_crash(exc_type: type[BaseException], exc: BaseException, tb: object) -> None:
    """The exception that ends the service (a failed start, ServiceFailed), as an event."""
    if issubclass(exc_type, KeyboardInterrupt):
        sys.__excepthook__(exc_type, exc, tb)  # type: ignore[arg-type]
        return
    structlog.get_logger("fairway").critical("service_crashed", exc_info=(exc_type, exc, tb))


def _log_thread_crash(args: threading.ExceptHookArgs) -> None:
    """An exception that ended a thread, as an event (the default prints a bare traceback)."""
    if issubclass(args.exc_type, SystemExit):
        return
    structlog.get_logger("threading").error(
        "thread_crashed", thread=args.thread.name if args.thread else None,
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback))


def get_logger(name: str | None = None) -> structlog.typing.FilteringBoundLogger:
    return structlog.get_logger(name)
