"""Reply side of the protocol: ordered, de-duplicated token streams per request.

Used by the gateway and by AMQP client programs alike. Workers place each chunk by
where it starts in the answer (output tokens and characters before it). After a worker
dies, another one continues the request from its last resume point, or from the start
(same seed), regenerating what the caller may already have, cut into chunks of its own;
so what a caller already has is trimmed off here by position, a gap is held until it is
filled, and exactly one terminal answer is delivered, after every token before it. A
done answer's last tokens, which travel in the final answer, are delivered as a chunk
of their own, so readers see chunks and then the end.
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING

from aio_pika.abc import AbstractIncomingMessage, AbstractQueue

from services import messages as m
from services.logs import get_logger

if TYPE_CHECKING:
    from services.amqp import BatchedAcks

log = get_logger(__name__)

Reply = m.TokenChunk | m.FinalAnswer


class ReplyStream:
    """The replies of one request, delivered in order with no repeat and no gap."""

    def __init__(self, request_id: str) -> None:
        self.request_id = request_id
        self.next_token = 0
        """Output tokens delivered."""
        self.next_char = 0
        """Characters of output text delivered."""
        self.finished = False
        self.prompt_delivered = False
        """The prompt's log-probabilities and echoed text (sent with the first chunk, when
        asked) went out."""
        self._ahead: dict[int, m.TokenChunk] = {}
        """Chunks past a gap, by token offset."""
        self._final: m.FinalAnswer | None = None
        self._queue: asyncio.Queue[Reply] = asyncio.Queue()

    def offer(self, msg: Reply) -> None:
        """Accept one incoming reply; deliver whatever is now in order."""
        if self.finished:
            return
        if isinstance(msg, m.FinalAnswer):
            if msg.finish_reason in ("error", "cancelled"):
                # An abnormal end does not wait for missing chunks: nothing more will come.
                self._deliver_final(dataclasses.replace(msg, text="", token_ids=[], logprobs=[],
                                                        prompt_logprobs=[], echoed_prompt=None,
                                                        prompt_token_ids=None))
                return
            if msg.token_ids or msg.text:  # the answer's last tokens: a chunk, then the end
                self.offer(m.TokenChunk(request_id=msg.request_id, token_offset=msg.token_offset,
                                        text_offset=msg.text_offset, text=msg.text,
                                        token_ids=msg.token_ids, logprobs=msg.logprobs,
                                        prompt_logprobs=msg.prompt_logprobs,
                                        echoed_prompt=msg.echoed_prompt,
                                        prompt_token_ids=msg.prompt_token_ids,
                                        prompt_tokens=msg.prompt_tokens if msg.token_offset == 0 else 0))
                if self.finished:  # that chunk let an end held earlier through
                    return
                msg = dataclasses.replace(
                    msg, token_offset=msg.token_offset + len(msg.token_ids),
                    text_offset=msg.text_offset + len(msg.text), text="", token_ids=[],
                    logprobs=[], prompt_logprobs=[], echoed_prompt=None, prompt_token_ids=None)
            self._final = self._final or msg
        elif msg.token_offset > self.next_token:
            held = self._ahead.get(msg.token_offset)
            if held is None or len(msg.token_ids) > len(held.token_ids):
                self._ahead[msg.token_offset] = msg
            return
        else:
            self._take(msg)
        while self._ahead and (start := min(self._ahead)) <= self.next_token:
            self._take(self._ahead.pop(start))
        if self._final is not None and self._final.token_offset <= self.next_token:
            self._deliver_final(self._final)

    def _take(self, chunk: m.TokenChunk) -> None:
        """Deliver the part of ``chunk`` (which starts at or before ``next_token``) that
        lies past what was delivered."""
        tokens = chunk.token_ids[self.next_token - chunk.token_offset:]
        text = chunk.text[max(0, self.next_char - chunk.text_offset):]
        if chunk.prompt_logprobs or chunk.echoed_prompt is not None or chunk.prompt_token_ids is not None:
            # Once: a regenerated first chunk carries them again.
            if self.prompt_delivered:
                chunk = dataclasses.replace(chunk, prompt_logprobs=[], echoed_prompt=None,
                                            prompt_token_ids=None)
            self.prompt_delivered = True
        if tokens or text:
            if len(tokens) < len(chunk.token_ids) or len(text) < len(chunk.text):
                chunk = dataclasses.replace(chunk, token_ids=tokens, text=text,
                                            logprobs=chunk.logprobs[len(chunk.token_ids) - len(tokens):],
                                            token_offset=self.next_token,
                                            text_offset=max(self.next_char, chunk.text_offset))
            self._queue.put_nowait(chunk)
        self.next_token = max(self.next_token, chunk.token_offset + len(chunk.token_ids))
        self.next_char = max(self.next_char, chunk.text_offset + len(chunk.text))

    def _deliver_final(self, msg: m.FinalAnswer) -> None:
        self.finished = True
        self._ahead.clear()
        self._queue.put_nowait(msg)

    @property
    def ready(self) -> bool:
        """A reply is delivered and not read yet."""
        return not self._queue.empty()

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
        for request_id in list(self.streams):
            self.fail(request_id, code, message, status)

    def fail(self, request_id: str, code: str, message: str, status: int = 503) -> None:
        """End one open stream with an error answer (nothing if it is not open)."""
        stream = self.streams.get(request_id)
        if stream is not None:
            stream.offer(m.FinalAnswer(
                request_id=request_id, token_offset=stream.next_token,
                text_offset=stream.next_char, finish_reason="error",
                error=m.ErrorInfo(message=message, type="service_unavailable", code=code,
                                  status=status)))

    def dispatch(self, msg: Reply) -> None:
        stream = self.streams.get(msg.request_id)
        if stream is not None:
            stream.offer(msg)

    async def consume(self, queue: AbstractQueue, acks: BatchedAcks) -> str:
        """Consume a reply queue into this router, exclusively, acking what it read in
        batches: the broker requeues what a dropped link took in transit (written to the
        dead socket, or read but not acked yet) for the reconnected consumer, instead of
        losing it as with ``no_ack``; streams drop the repeats. Returns the consumer tag."""
        async def on_message(message: AbstractIncomingMessage) -> None:
            await self.on_message(message)
            acks.handled(message)

        return await queue.consume(on_message, exclusive=True)

    async def on_message(self, message: AbstractIncomingMessage) -> None:
        """aio-pika consumer callback; acking the message is the consumer's part."""
        try:
            msg = m.decode(message.body)
        except m.MessageError as exc:
            log.warning("bad_reply_dropped", error=str(exc))
            return
        if isinstance(msg, m.TokenChunk | m.FinalAnswer):
            self.dispatch(msg)


class LinkLossWatch:
    """Which open streams lost their answer in a broker outage. Pure: times are arguments.

    A reply queue that outlives its link (durable, not exclusive) keeps a stream open across
    a dropped connection: the broker keeps the replies it confirmed (they are persistent),
    replies published after the link is back arrive, and a worker that lost its own link
    continues the request from its resume point, re-sending what came before it. A final
    answer can still go missing where the broker loses what it held (a node that lost its
    disk, a queue deleted by hand), and its stream would wait forever. Such a request is
    done (the scheduler marks it so on the worker's completion event) and yet gets no
    answer: a stream that was open across an outage and whose request has been done for
    ``grace_s`` without its final answer is lost, and its caller gets an error.
    """

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self._watched: dict[str, float | None] = {}
        """Request id -> when it was first seen done (None: not yet)."""

    def link_lost(self, request_ids: list[str]) -> None:
        """These streams were open when the link dropped (the grace of one seen done
        before starts again: its answer may wait in the queue for the link to be back)."""
        for rid in request_ids:
            self._watched[rid] = None

    def forget(self, request_id: str) -> None:
        """The stream ended (answered, failed or closed by its caller)."""
        self._watched.pop(request_id, None)

    @property
    def watched(self) -> list[str]:
        """Requests whose done marker to look up."""
        return list(self._watched)

    def lost(self, done: dict[str, bool], now: float) -> list[str]:
        """Given which watched requests are done now, those whose answer is lost. Only
        while the link is up: until then their answers may wait in the queue."""
        out = []
        for rid, is_done in done.items():
            if rid not in self._watched or not is_done:
                continue
            since = self._watched[rid]
            if since is None:
                self._watched[rid] = now
            elif now - since >= self.grace_s:
                out.append(rid)
        return out


class OutageDeadline:
    """Calls ``expire`` once a broker link has been down for ``grace_s``.

    A reply queue that outlives its link keeps its streams open while the connection
    reconnects, but a broker that stays away must not keep their callers waiting forever.
    The connection's close callback calls :meth:`link_lost` (again with each failed
    reconnect attempt), its reconnect callback :meth:`link_back`."""

    def __init__(self, grace_s: float, expire: Callable[[], None]) -> None:
        self.grace_s = grace_s
        self._expire = expire
        self._timer: asyncio.TimerHandle | None = None

    def link_lost(self) -> bool:
        """Start the clock; True when this starts an outage, False while one is counted."""
        if self._timer is not None:
            return False
        self._timer = asyncio.get_running_loop().call_later(self.grace_s, self._expired)
        return True

    def link_back(self) -> None:
        """The link is back (or its owner closes): no deadline."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        self._expire()
