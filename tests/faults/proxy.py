"""A small TCP proxy between services and the broker, to stall or cut their link.

``tc netem`` is not available on this kernel, so the link is made faulty in user space:
services connect to the proxy's loopback port instead of RabbitMQ's, and a test can

- :meth:`TcpProxy.stall` the link (bytes stop moving both ways, connections stay open,
  like a frozen network path: heartbeats stop arriving), then :meth:`resume` it;
- :meth:`TcpProxy.cut` it (every connection is closed at once, like a reset), optionally
  refusing new connections for a while.

The proxy runs its own event loop on a thread, so a test that blocks (a subprocess, a
``time.sleep``) does not stall the link by accident.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time


class TcpProxy:
    def __init__(self, target_port: int, target_host: str = "127.0.0.1") -> None:
        self.target = (target_host, target_port)
        self.port = 0
        self.connections = 0
        """Connections accepted so far (a reconnect shows as a new one)."""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="tcp-proxy", daemon=True)
        self._flowing: asyncio.Event | None = None
        self._refuse_until = 0.0
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.base_events.Server | None = None

    # --- control (thread-safe, called from the test) ---------------------------------

    def start(self) -> TcpProxy:
        self._thread.start()
        self._call(self._start())
        return self

    def stall(self) -> None:
        self._call(self._set_flowing(False))

    def resume(self) -> None:
        self._call(self._set_flowing(True))

    def cut(self, refuse_s: float = 0.0) -> int:
        """Close every open connection; refuse new ones for ``refuse_s``. Returns how many."""
        return self._call(self._cut(refuse_s))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._call(self._close(), timeout=5)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    @property
    def open_connections(self) -> int:
        return len(self._writers)

    def _call(self, coro, timeout: float = 10):
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    # --- the proxy (runs on its own loop) -----------------------------------------------

    async def _start(self) -> None:
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def _set_flowing(self, flowing: bool) -> None:
        assert self._flowing is not None
        if flowing:
            self._flowing.set()
        else:
            self._flowing.clear()

    async def _cut(self, refuse_s: float) -> int:
        self._refuse_until = time.monotonic() + refuse_s
        writers, self._writers = list(self._writers), set()
        for writer in writers:
            with contextlib.suppress(Exception):
                writer.transport.abort()  # RST-like: no graceful AMQP close reaches either side
        return len(writers)

    async def _close(self) -> None:
        if self._server is not None:
            self._server.close()
        await self._cut(0)

    async def _accept(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        if time.monotonic() < self._refuse_until:
            client_w.transport.abort()
            return
        try:
            upstream_r, upstream_w = await asyncio.open_connection(*self.target)
        except OSError:
            client_w.transport.abort()
            return
        self.connections += 1
        self._writers.update((client_w, upstream_w))
        await asyncio.gather(self._pump(client_r, upstream_w), self._pump(upstream_r, client_w),
                             return_exceptions=True)
        for writer in (client_w, upstream_w):
            self._writers.discard(writer)
            writer.transport.abort()

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        assert self._flowing is not None
        try:
            while True:
                data = await reader.read(65536)
                if not data:
                    break
                await self._flowing.wait()  # a stalled link holds the bytes (and TCP backs up)
                if writer.transport.is_closing():
                    break
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()
