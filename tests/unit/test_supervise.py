"""``fairway up``'s restart policy and supervisor loop, with stand-in processes."""

from __future__ import annotations

import os
import sys
import threading
import time

from services.supervise import Child, RestartBackoff, Supervisor


def test_backoff_doubles_while_a_service_keeps_failing_and_resets_after_a_healthy_run():
    backoff = RestartBackoff(initial_s=1, max_s=30, healthy_after_s=60)
    assert [backoff.delay_after(2.0) for _ in range(7)] == [1, 2, 4, 8, 16, 30, 30]
    assert backoff.delay_after(600.0) == 1  # it ran for ten minutes: a fresh failure
    assert backoff.delay_after(0.5) == 2


class StandIn:
    """A child process whose exit code the test sets."""

    pids = iter(range(1000, 2000))

    def __init__(self) -> None:
        self.pid = next(self.pids)
        self.code: int | None = None

    def poll(self) -> int | None:
        return self.code


def supervisor(restart: bool = True) -> tuple[Supervisor, list[str], list[str]]:
    spawned: list[str] = []
    lines: list[str] = []

    def spawn(child: Child) -> StandIn:
        spawned.append(child.name)
        return StandIn()

    children = [Child(name, [name], {}) for name in ("scheduler", "worker", "gateway")]
    return Supervisor(children, restart=restart, spawn=spawn, log=lines.append), spawned, lines


def test_a_child_that_exits_is_started_again_after_its_backoff():
    sup, spawned, lines = supervisor()
    assert sup.poll(0.0)
    assert spawned == ["scheduler", "worker", "gateway"]
    gateway = sup.children[2]
    gateway.proc.code = -9
    assert sup.poll(5.0)  # ran 5 s: quick failure, 1 s backoff
    assert gateway.proc is None and "gateway exited with -9 after 5.0 s" in lines[-1]
    assert sup.poll(5.5) and spawned[3:] == []
    assert sup.poll(6.0) and spawned[3:] == ["gateway"]
    assert gateway.restarts == 1 and gateway.started_at == 6.0
    gateway.proc.code = 1
    sup.poll(6.5)
    sup.poll(7.5)
    assert spawned[3:] == ["gateway"], "the second quick failure waits 2 s"
    sup.poll(8.5)
    assert spawned[3:] == ["gateway", "gateway"]


def test_without_restart_an_exit_stops_the_loop():
    sup, spawned, lines = supervisor(restart=False)
    sup.poll(0.0)
    sup.children[1].proc.code = 3
    assert not sup.poll(1.0)
    assert lines[-1] == "worker exited with 3" and spawned == ["scheduler", "worker", "gateway"]


def test_a_start_that_fails_is_retried_with_the_backoff():
    lines: list[str] = []
    attempts: list[float] = []
    now = {"t": 0.0}

    def spawn(child: Child) -> StandIn:
        attempts.append(now["t"])
        if len(attempts) < 3:
            raise OSError("port 6379 still taken")
        return StandIn()

    sup = Supervisor([Child("redis-server", [], {})], spawn=spawn, log=lines.append)
    for t in (0.0, 0.5, 1.0, 2.0, 3.0):
        now["t"] = t
        assert sup.poll(t)
    assert attempts == [0.0, 1.0, 3.0]
    assert "could not start redis-server (OSError('port 6379 still taken')); retrying in 1 s" in lines
    assert sup.children[0].proc is not None and lines[-1].startswith("started redis-server (pid")



DRAINING_CHILD = """
import signal, sys, time
out = open(sys.argv[1], "a")
signals = []
def on_term(signum, frame):
    signals.append(signum)
    print(f"sigterm {len(signals)}", file=out, flush=True)
    if len(signals) == 2:
        sys.exit(0)
signal.signal(signal.SIGTERM, on_term)
print("ready", file=out, flush=True)
while True:
    time.sleep(0.05)
"""


def test_a_second_signal_reaches_children_that_alone_own_their_signals(tmp_path):
    """Children run in their own session (a terminal's Ctrl-C reaches only the
    supervisor, so they are not signalled twice at once); ``stop`` sends the first
    SIGTERM and waits, and the supervisor's second signal (``signal_all``) sends the one
    that cuts a child's drain short."""
    out = tmp_path / "child.out"
    sup = Supervisor([Child("worker", [sys.executable, "-c", DRAINING_CHILD, str(out)], dict(os.environ))],
                     log=lambda line: None)
    sup.poll(0.0)
    proc = sup.children[0].proc

    def wait_for(line: str) -> None:
        deadline = time.monotonic() + 20
        while not out.exists() or line not in out.read_text().splitlines():
            assert time.monotonic() < deadline, f"no {line!r} from the child"
            time.sleep(0.05)

    wait_for("ready")
    assert os.getsid(proc.pid) != os.getsid(0)
    stopping = threading.Thread(target=sup.stop, kwargs={"grace_s": 20})
    stopping.start()
    wait_for("sigterm 1")
    time.sleep(0.2)
    assert proc.poll() is None, "after one signal it drains"
    sup.signal_all()
    stopping.join(10)
    assert not stopping.is_alive() and proc.returncode == 0
    assert out.read_text().splitlines() == ["ready", "sigterm 1", "sigterm 2"]
