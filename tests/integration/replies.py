"""A made-up answer and a stand-in worker that sends it, for tests of reply streams
across broker outages (the gateway's and an AMQP client's)."""

from __future__ import annotations

import aio_pika

from services import amqp
from services import messages as m
from services.replies import ReplyStream

ANSWER = ["Sun", "ny", " and", " warm", " to", "day"]
"""The text of output tokens 0..5 (token id = position)."""


def chunk(request_id: str, start: int, end: int) -> m.TokenChunk:
    return m.TokenChunk(request_id=request_id, token_offset=start, text_offset=len("".join(ANSWER[:start])),
                        text="".join(ANSWER[start:end]), token_ids=list(range(start, end)))


def final(request_id: str) -> m.FinalAnswer:
    return m.FinalAnswer(request_id=request_id, token_offset=len(ANSWER), text_offset=len("".join(ANSWER)),
                         finish_reason="length", prompt_tokens=3, completion_tokens=len(ANSWER))


def request(request_id: str) -> m.CompletionRequest:
    return m.CompletionRequest(request_id=request_id, tenant="acme", model="tiny", prompt="weather?",
                               sampling=m.SamplingParams(max_tokens=len(ANSWER)))


async def read(stream: ReplyStream) -> tuple[str, list[m.FinalAnswer]]:
    """The text a stream delivered so far, and its final answer if it came."""
    text, finals = "", []
    while stream.ready:
        item = await stream.get()
        if isinstance(item, m.FinalAnswer):
            finals.append(item)
        else:
            text += item.text
    return text, finals


class Worker:
    """Sends replies to a reply queue as a worker does (confirmed publishes)."""

    def __init__(self, url: str, reply_to: str) -> None:
        self.url, self.reply_to = url, reply_to

    async def send(self, *replies: m.Message) -> None:
        connection = await aio_pika.connect(self.url)
        try:
            channel = await connection.channel(publisher_confirms=True)
            for reply in replies:
                await amqp.reply(channel, self.reply_to, reply, mandatory=True)
        finally:
            await connection.close()
