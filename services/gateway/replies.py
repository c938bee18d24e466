"""A request's reply stream as the gateway reads it: ordered replies plus read times.

Ordering, de-duplication and the single terminal answer come from
:mod:`services.replies` (shared with AMQP clients); this wrapper only stamps when the
first token and the final answer were read, for the latency metrics. The gateway reads
each reply as soon as it is queued, so read time is arrival time.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from services.messages import FinalAnswer, TokenChunk
from services.replies import Reply, ReplyStream


class TimedReplies:
    def __init__(
        self, stream: ReplyStream, opened_at: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.stream = stream
        self.opened_at = opened_at
        self.first_token_at: float | None = None
        self.final: FinalAnswer | None = None
        self.final_at: float | None = None
        self._clock = clock

    @property
    def request_id(self) -> str:
        return self.stream.request_id

    @property
    def waiting(self) -> bool:
        """A reply is in the stream, ready to read without waiting."""
        return self.stream.ready

    @property
    def arrived(self) -> bool:
        """The final answer is in the stream (maybe not read yet): nothing is left to cancel."""
        return self.stream.finished

    async def next(self) -> Reply:
        reply = await self.stream.get()
        if isinstance(reply, TokenChunk):
            if self.first_token_at is None:
                self.first_token_at = self._clock()
        else:
            self.final = reply
            self.final_at = self._clock()
        return reply


class ChoiceStream:
    """The replies of a request's choices (OpenAI's ``n``; one child request each),
    interleaved as they arrive, each with its choice index. One choice reads straight
    through, with no task of its own."""

    def __init__(self, streams: list[TimedReplies]) -> None:
        self.streams = streams
        self._reads: dict[int, asyncio.Task[Reply]] = {}
        """A pending read per choice being waited on (more than one choice only)."""

    @property
    def waiting(self) -> bool:
        """A reply is ready to read without waiting."""
        return any(task.done() for task in self._reads.values()) or any(
            s.waiting for i, s in enumerate(self.streams) if i not in self._reads and s.final is None)

    async def next(self) -> tuple[int, Reply]:
        if len(self.streams) == 1:
            return 0, await self.streams[0].next()
        for index, task in sorted(self._reads.items()):
            if task.done():
                del self._reads[index]
                return index, task.result()
        open_choices = [i for i, s in enumerate(self.streams) if s.final is None]
        for index in open_choices:
            if index not in self._reads and self.streams[index].waiting:
                return index, await self.streams[index].next()
        for index in open_choices:
            if index not in self._reads:
                self._reads[index] = asyncio.ensure_future(self.streams[index].next())
        if not self._reads:
            raise RuntimeError("every choice has ended")
        await asyncio.wait(self._reads.values(), return_when=asyncio.FIRST_COMPLETED)
        index = min(i for i, task in self._reads.items() if task.done())
        return index, self._reads.pop(index).result()

    def close(self) -> None:
        """Stop the pending reads (a reply they had not taken stays in its stream)."""
        for task in self._reads.values():
            task.cancel()
        self._reads.clear()
