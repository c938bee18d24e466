"""A request's reply stream as the gateway reads it: ordered replies plus read times.

Ordering, de-duplication and the single terminal answer come from
:mod:`services.replies` (shared with AMQP clients); this wrapper only stamps when the
first token and the final answer were read, for the latency metrics. The gateway reads
each reply as soon as it is queued, so read time is arrival time.
"""

from __future__ import annotations

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
