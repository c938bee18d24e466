"""Reply side of the protocol: ordered, de-duplicated token streams per request.

Used by the gateway and by AMQP client programs alike. Workers number each
request's chunks from 0; after a worker dies, another one regenerates the request
from the start (same seed), so repeats are dropped here by sequence number and a
gap is held until it is filled. (A request handed back by a draining worker is
continued from its resume point, numbering on from there.) Exactly one terminal
answer is delivered.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from aio_pika.abc import AbstractIncomingMessage

from services import messages as m
from services.logs import get_logger

log = get_logger(__name__)

Reply = m.TokenChunk | m.FinalAnswer


class ReplyStream:
    """The replies of one request, delivered in order with no duplicate and no gap."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.next_seq = 0
        self.finished = False
        self._pending: dict[int, Reply] = {}
        self._queue: asyncio.Queue[Reply] = asyncio.Queue()

    def offer(self, msg: Reply) -> None:
        """Accept one incoming reply; deliver whatever is now in order."""
        if self.finished:
            return
        if isinstance(msg, m.FinalAnswer) and msg.finish_reason in ("error", "cancelled"):
            # An abnormal end does not wait for missing chunks: nothing more will come.
            self._deliver_final(msg)
            return
        if msg.seq < self.next_seq or msg.seq in self._pending:
            return
        self._pending[msg.seq] = msg
        while self.next_seq in self._pending and not self.finished:
            item = self._pending.pop(self.next_seq)
            self.next_seq += 1
            if isinstance(item, m.FinalAnswer):
                self._deliver_final(item)
            else:
                self._queue.put_nowait(item)

    def _deliver_final(self, msg: m.FinalAnswer) -> None:
        self.finished = True
        self._pending.clear()
        self._queue.put_nowait(msg)

    async def get(self) -> Reply:
        return await self._queue.get()

    async def __aiter__(self) -> AsyncIterator[Reply]:
        while True:
            item = await self._queue.get()
            yield item
            if isinstance(item, m.FinalAnswer):
                return


class ReplyRouter:
    """Routes messages from one reply queue to the :class:`ReplyStream` of each request."""

    def __init__(self) -> None:
        self.streams: dict[str, ReplyStream] = {}

    def open(self, request_id: str) -> ReplyStream:
        stream = ReplyStream(request_id)
        self.streams[request_id] = stream
        return stream

    def close(self, request_id: str) -> None:
        self.streams.pop(request_id, None)

    def fail_all(self, code: str, message: str, status: int = 503) -> None:
        """End every open stream with one error answer (its replies can no longer arrive)."""
        for stream in list(self.streams.values()):
            stream.offer(m.FinalAnswer(
                request_id=stream.request_id, seq=stream.next_seq, finish_reason="error",
                error=m.ErrorInfo(message=message, type="service_unavailable", code=code,
                                  status=status)))

    def dispatch(self, msg: Reply) -> None:
        stream = self.streams.get(msg.request_id)
        if stream is not None:
            stream.offer(msg)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        """aio-pika consumer callback (the reply queue is consumed with ``no_ack=True``)."""
        try:
            msg = m.decode(message.body)
        except m.MessageError as exc:
            log.warning("bad_reply_dropped", error=str(exc))
            return
        if isinstance(msg, m.TokenChunk | m.FinalAnswer):
            self.dispatch(msg)
