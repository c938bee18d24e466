"""Local infrastructure helpers (pure parts)."""

from __future__ import annotations

import socket
from typing import Self

from services import localinfra


class OfferedPorts:
    """A stand-in for ``socket.socket`` whose bind(0) gets the ports the kernel offers."""

    def __init__(self, offers: list[int]) -> None:
        self.offers = offers

    def __call__(self, *args, **kwargs) -> Self:
        return self

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def bind(self, address: tuple[str, int]) -> None:
        assert address == ("127.0.0.1", 0)

    def getsockname(self) -> tuple[str, int]:
        return "127.0.0.1", self.offers.pop(0)


def test_free_port_never_hands_out_a_port_twice(monkeypatch):
    """The kernel offers a free port again until someone binds it: a second service
    started before the first bound its port must not be given the same one."""
    monkeypatch.setattr(localinfra, "_HANDED_OUT", set())
    monkeypatch.setattr(localinfra.socket, "socket", OfferedPorts([41000, 41000, 41000, 41001, 41000, 41002]))
    assert [localinfra.free_port() for _ in range(3)] == [41000, 41001, 41002]


def test_free_port_gives_a_port_that_can_be_bound():
    port = localinfra.free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
