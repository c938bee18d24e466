"""``fairway up``'s process supervision: every service a child process, restarted when it
exits, as compose's ``restart: unless-stopped`` does.

The Redis and RabbitMQ servers that ``fairway up`` started itself are supervised the
same way (restarted on their own data directories: Redis replays its append-only file,
RabbitMQ its durable queues). A service that keeps failing waits longer each time (1 s, 2 s, 4 s ... up to 30 s), so a
broken configuration logs one clear exit every half minute instead of spinning; a run
that lasted a minute counts as healthy and the next failure starts over at 1 s. The
decisions are plain code (:class:`RestartBackoff`, :meth:`Supervisor.poll`), time is an
argument, and :class:`Supervisor` only spawns and signals processes.
"""

from __future__ import annotations

import signal
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field


@dataclass
class RestartBackoff:
    """How long to wait before starting a service again, given how long it last ran."""

    initial_s: float = 1.0
    max_s: float = 30.0
    healthy_after_s: float = 60.0
    failures: int = 0
    """Quick exits in a row (runs shorter than ``healthy_after_s``)."""

    def delay_after(self, ran_for_s: float) -> float:
        if ran_for_s >= self.healthy_after_s:
            self.failures = 0
        delay = min(self.initial_s * 2.0**self.failures, self.max_s)
        self.failures += 1
        return delay


@dataclass
class Child:
    """One service of the plan: its command line, environment and current process."""

    name: str
    argv: list[str]
    env: dict[str, str]
    backoff: RestartBackoff = field(default_factory=RestartBackoff)
    proc: subprocess.Popen | None = None
    started_at: float | None = None
    start_at: float = 0.0
    """When to (re)start it while ``proc`` is None."""
    restarts: int = 0


Spawn = Callable[[Child], subprocess.Popen]


def spawn_process(child: Child) -> subprocess.Popen:
    """A child in its own session: a terminal's Ctrl-C (or hang-up) reaches only the
    supervisor, which signals each child once per signal it got, so a first signal is a
    graceful stop and a second cuts the drains short, as for a lone service."""
    return subprocess.Popen(child.argv, env=child.env, start_new_session=True)


class Supervisor:
    """Starts the children, restarts those that exit, stops them all in reverse order."""

    def __init__(self, children: Sequence[Child], *, restart: bool = True,
                 spawn: Spawn = spawn_process, log: Callable[[str], None] | None = None) -> None:
        self.children = list(children)
        self.restart = restart
        self._spawn = spawn
        self._log = log or (lambda line: print(f"fairway: {line}", file=sys.stderr, flush=True))

    def poll(self, now: float) -> bool:
        """Start what is due, notice what exited; False once a child exited and
        restarting is off (the caller then stops everything)."""
        alive = True
        for child in self.children:
            if child.proc is not None and (code := child.proc.poll()) is not None:
                ran = now - (child.started_at or 0.0)
                child.proc = None
                if not self.restart:
                    self._log(f"{child.name} exited with {code}")
                    alive = False
                    continue
                delay = child.backoff.delay_after(ran)
                child.start_at = now + delay
                self._log(f"{child.name} exited with {code} after {ran:.1f} s; "
                          f"restarting in {delay:.0f} s")
            if child.proc is None and alive and now >= child.start_at:
                if child.started_at is not None:
                    child.restarts += 1
                child.started_at = now
                try:
                    child.proc = self._spawn(child)
                except Exception as exc:  # noqa: BLE001 - a failed start is retried like an exit
                    delay = child.backoff.delay_after(0.0)
                    child.start_at = now + delay
                    self._log(f"could not start {child.name} ({exc!r}); retrying in {delay:.0f} s")
                    continue
                self._log(f"started {child.name} (pid {child.proc.pid})")
        return alive

    def _live(self) -> list[subprocess.Popen]:
        return [c.proc for c in reversed(self.children) if c.proc is not None]

    def signal_all(self) -> None:
        """SIGTERM to every live child, the gateway first: the first asks for a graceful
        stop, a second cuts a drain short."""
        for proc in self._live():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)

    def stop(self, grace_s: float = 30.0) -> None:
        """SIGTERM in reverse start order (the gateway first), then wait; kill stragglers."""
        live = self._live()
        self.signal_all()
        for proc in live:
            try:
                proc.wait(grace_s)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
