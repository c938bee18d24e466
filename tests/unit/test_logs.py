"""A service's stderr is one JSON event per line: its own events, the libraries' log
records, a crashed thread's traceback and the error that ends the service alike, and no
progress bars (run in a child, as a service runs)."""

from __future__ import annotations

import json
import subprocess
import sys

SERVICE = """
import logging, threading
from services.logs import configure, get_logger

configure("INFO", "json", service="cpu-worker")
get_logger(__name__).info("worker_started", pool="cpu")
logging.getLogger("aio_pika.robust_connection").warning("Connection attempt to %r failed", "amqp://x")
logging.getLogger("aio_pika").info("below the libraries' level: not shown")
try:
    1 / 0
except ZeroDivisionError:
    logging.getLogger("aiormq.connection").exception("Unexpected connection close")
logging.getLogger("aiormq.connection").error(
    "Unexpected connection close from remote %r, %s", "amqp://x",
    "Connection.Close(reply_code=320, reply_text=CONNECTION_FORCED - broker forced connection "
    "closure with reason shutdown)")
logging.getLogger("aio_pika.tools").error(
    "Callback %s error: %s", "<OneShotCallback: cb=<bound method RobustChannel._on_close of x>>",
    "ChannelInvalidStateError: No active transport in channel")
logging.getLogger("aiormq.connection").error(
    "error when creating transport: %r", "AMQPConnectionError(111, Connect call failed ('127.0.0.1', 5672))")
logging.getLogger("aiormq.connection").error(
    "error when creating transport: %r", "SSLError('certificate verify failed')")

def step_loop():
    get_logger(__name__).info("engine_stepping")
    raise RuntimeError("engine gone")

thread = threading.Thread(target=step_loop, name="engine")
thread.start()
thread.join()

import transformers.utils.logging as hf_logging
print("progress bars:", hf_logging.is_progress_bar_enabled())
raise RuntimeError("could not start")
"""


def test_every_line_a_service_writes_is_a_json_event_with_its_service():
    run = subprocess.run([sys.executable, "-c", SERVICE], capture_output=True, text=True, timeout=60,
                         check=False)
    assert run.returncode == 1, run.stderr
    assert run.stdout.strip() == "progress bars: False"  # "Loading weights" bars: not in a log
    events = [json.loads(line) for line in run.stderr.splitlines()]  # fails on a plain line
    restart = [e for e in events if e["event"].startswith((
        "Unexpected connection close from", "Callback <OneShotCallback", "error when creating transport"))]
    # A broker restart's upstream ERROR records are lowered to warnings; a connection
    # closed for another reason, or a connect that failed for another reason, stays an error.
    assert [e["level"] for e in restart] == ["warning", "warning", "warning", "error"]
    assert "SSLError" in restart[-1]["event"]
    events = [e for e in events if e not in restart]
    assert [e["event"] for e in events] == [
        "worker_started", "Connection attempt to 'amqp://x' failed", "Unexpected connection close",
        "engine_stepping", "thread_crashed", "service_crashed"]
    assert events[2]["level"] == "error"
    assert {e["service"] for e in events} == {"cpu-worker"}  # also from another thread
    library = events[1]
    assert (library["level"], library["logger"]) == ("warning", "aio_pika.robust_connection")
    assert "ZeroDivisionError" in events[2]["exception"]
    crash = events[4]
    assert (crash["level"], crash["thread"]) == ("error", "engine")
    assert crash["exception"].rstrip().endswith("RuntimeError: engine gone")
    end = events[5]
    assert (end["level"], end["exception"].rstrip().splitlines()[-1]) == (
        "critical", "RuntimeError: could not start")


def test_failed_reconnect_attempts_are_logged_once_per_interval_with_a_count():
    import logging

    from services.logs import ReconnectAttemptThrottle

    now = [0.0]
    throttle = ReconnectAttemptThrottle(interval_s=30.0, clock=lambda: now[0])

    def record(name: str, msg: str, *args: object) -> logging.LogRecord:
        return logging.LogRecord(name, logging.WARNING, __file__, 1, msg, args, None)

    def attempt() -> logging.LogRecord:
        return record("aio_pika.robust_connection", "Connection attempt to %r failed", "amqp://x")

    refused = "AMQPConnectionError(111, Connect call failed ('127.0.0.1', 5672))"
    kept = []
    for second in range(65):  # a broker down for 65 s, one attempt a second
        now[0] = float(second)
        for rec in (attempt(), record("aiormq.connection", "error when creating transport: %r", refused)):
            if throttle.filter(rec):
                kept.append((second, rec.name, rec.getMessage()))
    assert [(s, name) for s, name, _ in kept] == [
        (0, "aio_pika.robust_connection"), (0, "aiormq.connection"),
        (30, "aio_pika.robust_connection"), (30, "aiormq.connection"),
        (60, "aio_pika.robust_connection"), (60, "aiormq.connection")]
    assert kept[0][2] == "Connection attempt to 'amqp://x' failed"
    assert kept[2][2] == "Connection attempt to 'amqp://x' failed (29 more like it left out)"
    other = record("aio_pika.robust_connection", "Reconnecting")  # not an attempt: always kept
    ssl = record("aiormq.connection", "error when creating transport: %r", "SSLError('bad cert')")
    assert throttle.filter(other) and throttle.filter(ssl)
