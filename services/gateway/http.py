"""The gateway's HTTP/1.1 protocol for uvicorn: httptools with a bound on request heads,
and a shutdown that does not drop a request already sent on an idle connection.

httptools parses in C and costs the gateway less CPU per request than h11 (gateway CPU
with bench/bench_control_plane.py, interleaved runs on 2 cores: 2.8-3.1 ms per request
with this protocol, 3.0-3.4 ms with h11), but reads a request head of any size into
memory. This subclass counts the bytes received while a head is being
read and answers 400 and closes the connection past ``max_head_bytes``, as uvicorn's h11
protocol does past ``h11_max_incomplete_event_size``.

On SIGTERM uvicorn closes every idle connection at once. A client (or a load balancer's
pool) may have just sent its next request on one, or be about to: it took the
connection from its pool, or has just connected. The close throws that request away, so
the client gets a reset and no answer, and cannot tell whether its POST was taken. This
protocol gives an idle connection ``idle_grace_s`` (1 s) to send its request instead: a
request that comes is served in the drain like any other, and the connection closes
after that response (``Connection: close``); one still idle after the grace is closed
then. A client busy on a connection sends its next request within milliseconds of the
last response, so what is still idle after the grace is a connection its client is not
using. A request sent just as the grace ends still meets the close; HTTP/1.1 has no way
to tell an idle client to stop. A connection with a response under way at shutdown gets
the same grace once that response is complete: its headers went out without
``Connection: close``, so its client may send its next request on it the moment it has
read the answer (closing then would throw that request away).

Without httptools, h11 is used, with uvicorn's own shutdown.

Closing the listening socket at shutdown resets, in the kernel, every connection still
waiting in its backlog to be accepted: connected as far as the client knows, its request
perhaps already sent. :class:`GatewayServer` accepts those first, so their requests are
served in the drain like the ones already read, and only then stops listening.
"""

from __future__ import annotations

import asyncio
import os
import select
import socket
from typing import Any

import uvicorn

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # uvicorn without the [standard] extra
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


def bytes_waiting(transport: Any) -> bool:
    """Whether the transport's socket holds bytes not read yet (or the peer's close)."""
    sock = transport.get_extra_info("socket")
    if sock is None or not hasattr(select, "poll"):
        return False
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN)
    return bool(poller.poll(0))


IDLE_GRACE_S = 1.0
"""How long a connection idle at shutdown may still send a request that is then served."""


def protocol_options(max_head_bytes: int, idle_grace_s: float = IDLE_GRACE_S) -> dict[str, Any]:
    """``uvicorn.Config`` keyword arguments for the gateway's HTTP protocol."""
    if HttpToolsProtocol is None:
        return {"http": "h11", "h11_max_incomplete_event_size": max_head_bytes}

    class GatewayHttpTools(HttpToolsProtocol):  # type: ignore[misc,valid-type]
        """httptools that refuses a request head longer than ``max_head_bytes`` and
        serves, at shutdown, a request sent on an idle connection within the grace."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_head = True
            self._head_bytes = 0
            self._close_after_next = False
            self._idle_close: asyncio.TimerHandle | None = None

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_bytes = True, 0
            if self._idle_close is not None:
                self._idle_close.cancel()
                self._idle_close = None

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()
            if self._close_after_next and self.cycle is not None:
                self.cycle.keep_alive = False

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                # A chunk may also carry body bytes: counted too, which errs by one read.
                self._head_bytes += len(data)
                if self._head_bytes > max_head_bytes:
                    self.send_400_response("Request head too large.")
                    return
            super().data_received(data)

        def shutdown(self) -> None:
            if self.transport.is_closing():
                super().shutdown()
                return
            # Left open, the server's drain waits for it: a request that comes is served,
            # then the connection closes; none within the grace, and it closes then. A
            # response under way first completes (the grace starts then).
            self._close_after_next = True
            if self._idle():
                self._idle_close = self.loop.call_later(idle_grace_s, self._close_if_idle)
            elif self.cycle is not None and not self.cycle.response_started:
                self.cycle.keep_alive = False  # its headers can still say so: its last

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if (self._close_after_next and self._idle_close is None
                    and not self.transport.is_closing()):
                self._idle_close = self.loop.call_later(idle_grace_s, self._close_if_idle)

        def _idle(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _close_if_idle(self) -> None:
            self._idle_close = None
            if self._idle() and not self.transport.is_closing() and not bytes_waiting(self.transport):
                self.transport.close()

    return {"http": GatewayHttpTools}


class GatewayServer(uvicorn.Server):
    """uvicorn's server, whose shutdown takes in the connections waiting in the listen
    backlog before it stops listening (see the module docstring)."""

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await self.accept_backlog()
        await super().shutdown(sockets)

    async def accept_backlog(self) -> int:
        """Accept every connection the kernel holds for the listening sockets and serve it
        as uvicorn would; returns how many there were. At most a backlog's worth per
        socket: connections that keep arriving meanwhile must not hold the shutdown open."""
        waiting: list[socket.socket] = []
        for server in getattr(self, "servers", []):
            for listener in server.sockets:
                # A duplicate of the listening descriptor: closing it leaves uvicorn's open.
                with socket.socket(fileno=os.dup(listener.fileno())) as sock:
                    sock.setblocking(False)
                    for _ in range(self.config.backlog):
                        try:
                            waiting.append(sock.accept()[0])
                        except OSError:  # BlockingIOError: the backlog is empty
                            break
        loop = asyncio.get_running_loop()
        for conn in waiting:
            try:
                conn.setblocking(False)
                await loop.connect_accepted_socket(self._new_protocol, conn, ssl=self.config.ssl)
            except OSError:  # the client gave up meanwhile: nothing to serve, go on stopping
                conn.close()
        return len(waiting)

    def _new_protocol(self) -> asyncio.Protocol:
        """What uvicorn's startup creates for each connection."""
        return self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
        )
