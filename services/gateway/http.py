"""The gateway's HTTP/1.1 protocol for uvicorn: httptools with a bound on request heads.

httptools parses in C and costs the gateway less CPU per request than h11 (gateway CPU
with bench/bench_control_plane.py, interleaved runs on 2 cores: 2.8-3.1 ms per request
with this protocol, 3.0-3.4 ms with h11), but reads a request head of any size into
memory. This subclass counts the bytes received while a head is being
read and answers 400 and closes the connection past ``max_head_bytes``, as uvicorn's h11
protocol does past ``h11_max_incomplete_event_size``. Without httptools, h11 is used.
"""

from __future__ import annotations

from typing import Any

try:
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # uvicorn without the [standard] extra
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


def protocol_options(max_head_bytes: int) -> dict[str, Any]:
    """``uvicorn.Config`` keyword arguments for an HTTP protocol that bounds heads."""
    if HttpToolsProtocol is None:
        return {"http": "h11", "h11_max_incomplete_event_size": max_head_bytes}

    class BoundedHeadHttpTools(HttpToolsProtocol):  # type: ignore[misc,valid-type]
        """httptools that refuses a request head longer than ``max_head_bytes``."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._in_head = True
            self._head_bytes = 0

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head, self._head_bytes = True, 0

        def on_headers_complete(self) -> None:
            self._in_head = False
            super().on_headers_complete()

        def data_received(self, data: bytes) -> None:
            if self._in_head:
                # A chunk may also carry body bytes: counted too, which errs by one read.
                self._head_bytes += len(data)
                if self._head_bytes > max_head_bytes:
                    self.send_400_response("Request head too large.")
                    return
            super().data_received(data)

    return {"http": BoundedHeadHttpTools}
