"""At shutdown the gateway's HTTP protocol serves a request sent on an idle connection
(kept alive, or just connected) within a grace, instead of closing over it.

The race is made exact: the client's request is written into the server's socket and the
protocol's ``shutdown`` (what uvicorn calls on SIGTERM) runs before the event loop has
had a turn to read it, as when a busy gateway is signalled; or the request is sent just
after the shutdown began.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time

import pytest
import uvicorn
from uvicorn.server import ServerState

from services.gateway.http import GatewayServer, HttpToolsProtocol, protocol_options

pytestmark = pytest.mark.skipif(HttpToolsProtocol is None, reason="httptools not installed")

REQUEST = b"GET /v1/models HTTP/1.1\r\nHost: gateway\r\n\r\n"


async def app(scope, receive, send) -> None:
    """``ok``; on ``/slow``, the body a moment after the headers (a response under way),
    on ``/late`` the whole answer a moment later (a response not started)."""
    if scope["path"] == "/late":
        await asyncio.sleep(0.3)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"2")]})
    if scope["path"] == "/slow":
        await asyncio.sleep(0.3)
    await send({"type": "http.response.body", "body": b"ok"})


async def read_response(reader: asyncio.StreamReader) -> bytes:
    head = await reader.readuntil(b"\r\n\r\n")
    return head + await reader.readexactly(2)


@contextlib.asynccontextmanager
async def one_connection(protocol_class):
    """A server of ``protocol_class`` and one client connection to it: yields the client's
    reader and writer and a function that returns the server's protocol of it."""
    config = uvicorn.Config(app, lifespan="off", log_config=None, http=protocol_class)
    config.load()
    state = ServerState()
    protocols = []

    def create_protocol():
        protocol = config.http_protocol_class(config=config, server_state=state, app_state={})
        protocols.append(protocol)
        return protocol

    async def protocol():
        while not protocols:
            await asyncio.sleep(0.01)
        return protocols[0]

    server = await asyncio.get_running_loop().create_server(create_protocol, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer, protocol
    finally:
        writer.close()
        server.close()
        await server.wait_closed()


async def read_rest(reader: asyncio.StreamReader) -> bytes:
    """All the server sends until it closes (a reset reads as ``<reset>``)."""
    try:
        return await asyncio.wait_for(reader.read(), 5)
    except ConnectionResetError:
        return b"<reset>"


async def shutdown_with_a_request_in_flight(protocol_class) -> tuple[bytes, bytes]:
    """One request answered on a keep-alive connection; then a second one sent and the
    protocol shut down before the loop reads it. Returns the first answer and all that
    came back after the second request."""
    async with one_connection(protocol_class) as (reader, writer, protocol):
        writer.write(REQUEST)
        first = await asyncio.wait_for(read_response(reader), 5)
        writer.write(REQUEST)  # an idle socket: the transport sends it at once
        time.sleep(0.05)  # noqa: ASYNC251 - on purpose: the loop must not read it first
        (await protocol()).shutdown()
        return first, await read_rest(reader)


async def test_a_request_sent_as_shutdown_begins_is_served_then_the_connection_closes():
    first, rest = await shutdown_with_a_request_in_flight(protocol_options(8192)["http"])
    assert first.startswith(b"HTTP/1.1 200")
    assert rest.startswith(b"HTTP/1.1 200") and rest.endswith(b"ok"), rest
    # reader.read() returned: the server closed the connection after that answer.


GRACE_S = 0.5


async def shutdown_then_request(*, served_before: bool,
                                delay_s: float | None) -> tuple[bytes, float]:
    """An idle connection (after one answered request, or just connected) at shutdown; a
    request sent ``delay_s`` later (``None``: none). Returns all that came back after the
    shutdown and the seconds from the shutdown to the server's close."""
    options = protocol_options(8192, idle_grace_s=GRACE_S)
    async with one_connection(options["http"]) as (reader, writer, protocol):
        if served_before:
            writer.write(REQUEST)
            assert (await asyncio.wait_for(read_response(reader), 5)).startswith(b"HTTP/1.1 200")
        (await protocol()).shutdown()
        began = time.monotonic()
        if delay_s is not None:
            await asyncio.sleep(delay_s)
            writer.write(REQUEST)
        rest = await read_rest(reader)
        return rest, time.monotonic() - began


@pytest.mark.parametrize("served_before", [True, False], ids=["kept-alive", "just-connected"])
async def test_a_request_sent_within_the_grace_after_shutdown_is_served_then_closed(served_before):
    rest, _ = await shutdown_then_request(served_before=served_before, delay_s=0.05)
    assert rest.startswith(b"HTTP/1.1 200") and rest.endswith(b"ok"), rest
    assert b"connection: close" in rest.lower()


async def test_a_request_sent_right_after_a_response_under_way_at_shutdown_is_served():
    """The response's headers went out before the shutdown, without ``Connection:
    close``: its client sends its next request the moment it has the answer, which is
    served (its own answer says close) instead of meeting a closed connection."""
    options = protocol_options(8192, idle_grace_s=GRACE_S)
    async with one_connection(options["http"]) as (reader, writer, protocol):
        writer.write(b"GET /slow HTTP/1.1\r\nHost: gateway\r\n\r\n")
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b"connection: close" not in head.lower()
        (await protocol()).shutdown()
        assert await asyncio.wait_for(reader.readexactly(2), 5) == b"ok"
        writer.write(REQUEST)
        rest = await read_rest(reader)
    assert rest.startswith(b"HTTP/1.1 200") and rest.endswith(b"ok"), rest
    assert b"connection: close" in rest.lower()


async def test_a_response_not_started_at_shutdown_says_it_is_the_last():
    options = protocol_options(8192, idle_grace_s=GRACE_S)
    async with one_connection(options["http"]) as (reader, writer, protocol):
        writer.write(b"GET /late HTTP/1.1\r\nHost: gateway\r\n\r\n")
        server = await protocol()
        while server.cycle is None:
            await asyncio.sleep(0.005)
        assert not server.cycle.response_started
        server.shutdown()
        rest = await read_rest(reader)
    assert rest.startswith(b"HTTP/1.1 200") and b"connection: close" in rest.lower(), rest


async def test_a_connection_still_idle_after_the_grace_is_closed_then():
    rest, closed_after = await shutdown_then_request(served_before=True, delay_s=None)
    assert rest == b"", rest
    assert GRACE_S * 0.9 <= closed_after < GRACE_S + 2, closed_after


async def test_uvicorns_own_protocol_drops_it():
    """What the gateway's protocol fixes: the stock one closes over the waiting request."""
    first, rest = await shutdown_with_a_request_in_flight(HttpToolsProtocol)
    assert first.startswith(b"HTTP/1.1 200")
    assert rest in (b"", b"<reset>"), rest


async def started(server_class) -> tuple[uvicorn.Server, int]:
    """A server of ``server_class`` listening on a free port (as ``serve`` would start it)."""
    config = uvicorn.Config(app, host="127.0.0.1", port=0, lifespan="off", log_config=None,
                            http=protocol_options(8192)["http"])
    config.load()
    server = server_class(config)
    server.lifespan = config.lifespan_class(config)
    await server.startup()
    return server, server.servers[0].sockets[0].getsockname()[1]


async def shutdown_with_a_connection_in_the_backlog(server_class) -> bytes:
    """A client connects and sends its request while the loop is busy (the connection
    waits in the listen backlog, unaccepted), then the server shuts down before the loop
    has a turn. Returns all the client got back."""
    server, port = await started(server_class)
    # Blocking on purpose: the loop must not get a turn to accept it.
    client = socket.create_connection(("127.0.0.1", port))
    try:
        client.sendall(REQUEST)
        await server.shutdown()
        client.settimeout(5)
        got = b""
        try:
            while chunk := client.recv(4096):
                got += chunk
        except ConnectionResetError:
            got += b"<reset>"
        return got
    finally:
        client.close()


async def test_a_connection_waiting_in_the_backlog_at_shutdown_is_served():
    got = await shutdown_with_a_connection_in_the_backlog(GatewayServer)
    assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"ok"), got


async def test_uvicorns_own_server_resets_it():
    """What GatewayServer fixes: closing the listener resets the waiting connection."""
    got = await shutdown_with_a_connection_in_the_backlog(uvicorn.Server)
    assert got in (b"", b"<reset>"), got


def test_the_backlog_is_served_under_uvloop_too():
    """The gateway runs on uvloop, whose servers and sockets are its own C types."""
    uvloop = pytest.importorskip("uvloop")
    got = uvloop.run(shutdown_with_a_connection_in_the_backlog(GatewayServer))
    assert got.startswith(b"HTTP/1.1 200") and got.endswith(b"ok"), got


async def test_the_backlog_taken_at_shutdown_is_bounded():
    """Connections that keep arriving during the shutdown must not hold it open: at most a
    backlog's worth is taken in."""
    server, port = await started(GatewayServer)
    clients = [socket.create_connection(("127.0.0.1", port)) for _ in range(3)]
    try:
        server.config.backlog = 2
        assert await server.accept_backlog() == 2  # of three waiting
    finally:
        await server.shutdown()
        for client in clients:
            client.close()
