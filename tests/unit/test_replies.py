"""Reply streams: in order, no repeat, no gap, one terminal answer."""

from __future__ import annotations

import dataclasses

from services import messages as m
from services.replies import LinkLossWatch, ReplyRouter, ReplyStream

ANSWER = ["He", "llo", ",", " wor", "ld", "!"]
"""The text of output tokens 0..5 (token id = position)."""


def chunk(start: int, end: int | None = None, request_id: str = "r") -> m.TokenChunk:
    """Output tokens ``start``..``end`` - 1 of ``ANSWER`` as one chunk."""
    end = start + 1 if end is None else end
    return m.TokenChunk(request_id=request_id, token_offset=start,
                        text_offset=len("".join(ANSWER[:start])),
                        text="".join(ANSWER[start:end]), token_ids=list(range(start, end)))


def final(tokens: int, reason: str = "length", request_id: str = "r") -> m.FinalAnswer:
    return m.FinalAnswer(request_id=request_id, token_offset=tokens,  # type: ignore[arg-type]
                         text_offset=len("".join(ANSWER[:tokens])), finish_reason=reason)


def drain(stream: ReplyStream) -> list:
    out = []
    while not stream._queue.empty():
        out.append(stream._queue.get_nowait())
    return out


def delivered(stream: ReplyStream) -> tuple[list[int], str, list[str]]:
    """(token ids, text, kinds) of what the stream delivered."""
    out = drain(stream)
    chunks = [x for x in out if isinstance(x, m.TokenChunk)]
    return ([t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks),
            [type(x).__name__ for x in out])


def test_repeats_from_a_regenerating_worker_are_dropped():
    stream = ReplyStream("r")
    for msg in [chunk(0), chunk(1), chunk(0), chunk(1), chunk(2), final(3)]:
        stream.offer(msg)
    assert delivered(stream) == ([0, 1, 2], "Hello,", ["TokenChunk"] * 3 + ["FinalAnswer"])


def test_a_regeneration_cut_into_other_chunks_continues_the_answer_exactly():
    """A first worker sent tokens 0-3 in two chunks and died; the next one continued from
    its resume point (token 1) with chunks of its own: the caller gets each token once."""
    stream = ReplyStream("r")
    for msg in [chunk(0, 1), chunk(1, 4),  # the first worker
                chunk(1, 2), chunk(2, 3), chunk(3, 5), chunk(5, 6), final(6)]:  # the next
        stream.offer(msg)
    tokens, text, kinds = delivered(stream)
    assert (tokens, text) == ([0, 1, 2, 3, 4, 5], "Hello, world!")
    assert kinds == ["TokenChunk"] * 4 + ["FinalAnswer"]


def test_a_chunk_that_overlaps_what_was_delivered_is_trimmed_to_its_new_part():
    stream = ReplyStream("r")
    stream.offer(chunk(0, 2))
    stream.offer(chunk(1, 4))
    out = drain(stream)
    assert [(c.token_offset, c.text_offset, c.token_ids, c.text) for c in out] == [
        (0, 0, [0, 1], "Hello"), (2, 5, [2, 3], ", wor")]


def logprob(i: int) -> m.TokenLogprob:
    return m.TokenLogprob(token=ANSWER[i], logprob=-float(i))


def test_log_probabilities_stay_with_their_tokens_when_a_chunk_is_trimmed():
    stream = ReplyStream("r")
    for start, end in [(0, 2), (1, 4)]:
        stream.offer(dataclasses.replace(chunk(start, end),
                                         logprobs=[logprob(i) for i in range(start, end)]))
    last = dataclasses.replace(final(6), token_offset=4, text_offset=len("".join(ANSWER[:4])),
                               text="ld!", token_ids=[4, 5], logprobs=[logprob(4), logprob(5)])
    stream.offer(last)
    out = drain(stream)
    chunks = [c for c in out if isinstance(c, m.TokenChunk)]
    assert [[lp.token for lp in c.logprobs] for c in chunks] == [["He", "llo"], [",", " wor"],
                                                                  ["ld", "!"]]
    assert all(len(c.logprobs) == len(c.token_ids) for c in chunks)
    assert isinstance(out[-1], m.FinalAnswer) and out[-1].logprobs == []


def test_prompt_logprobs_echoed_prompt_and_ids_are_delivered_once_when_the_first_chunk_comes_again():
    prompt = [m.TokenLogprob(token="p", logprob=0.0)]
    stream = ReplyStream("r")
    stream.offer(dataclasses.replace(chunk(0, 2), prompt_logprobs=prompt, echoed_prompt="p",
                                     prompt_token_ids=[1, 7]))
    # a regeneration
    stream.offer(dataclasses.replace(chunk(0, 3), prompt_logprobs=prompt, echoed_prompt="p",
                                     prompt_token_ids=[1, 7]))
    out = drain(stream)
    assert [(c.prompt_logprobs, c.echoed_prompt, c.prompt_token_ids) for c in out] == [
        (prompt, "p", [1, 7]), ([], None, None)]
    assert [c.token_ids for c in out] == [[0, 1], [2]]


def test_an_answer_in_its_final_alone_brings_its_echoed_prompt():
    stream = ReplyStream("r")
    stream.offer(dataclasses.replace(final(0), token_ids=[0], text="H", echoed_prompt="p",
                                     prompt_token_ids=[3]))
    out = drain(stream)
    assert [(type(r).__name__, r.echoed_prompt, r.prompt_token_ids) for r in out] == [
        ("TokenChunk", "p", [3]), ("FinalAnswer", None, None)]


def test_a_gap_is_held_until_filled():
    stream = ReplyStream("r")
    stream.offer(chunk(0))
    stream.offer(chunk(2, 4))
    stream.offer(final(4))
    assert delivered(stream) == ([0], "He", ["TokenChunk"])
    stream.offer(chunk(1))
    assert delivered(stream) == ([1, 2, 3], "llo, wor", ["TokenChunk"] * 2 + ["FinalAnswer"])


def test_of_two_chunks_past_a_gap_at_one_offset_the_longer_is_kept():
    stream = ReplyStream("r")
    stream.offer(chunk(1, 2))
    stream.offer(chunk(1, 3))
    stream.offer(chunk(1, 2))
    stream.offer(chunk(0))
    assert delivered(stream)[:2] == ([0, 1, 2], "Hello,")


def test_a_done_answer_waits_for_every_token_before_it():
    stream = ReplyStream("r")
    stream.offer(final(2, "stop"))
    stream.offer(chunk(0))
    assert delivered(stream)[2] == ["TokenChunk"]
    stream.offer(chunk(1))
    assert delivered(stream)[2] == ["TokenChunk", "FinalAnswer"]


def ending(start: int, end: int) -> m.FinalAnswer:
    """A done answer that carries tokens ``start``..``end`` - 1, the answer's last."""
    return m.FinalAnswer(request_id="r", token_offset=start, text_offset=len("".join(ANSWER[:start])),
                         text="".join(ANSWER[start:end]), token_ids=list(range(start, end)),
                         finish_reason="stop")


def test_the_last_tokens_carried_by_the_final_answer_are_delivered_as_a_chunk_first():
    stream = ReplyStream("r")
    for msg in [chunk(0, 4), ending(4, 6)]:
        stream.offer(msg)
    out = drain(stream)
    assert [type(x).__name__ for x in out] == ["TokenChunk", "TokenChunk", "FinalAnswer"]
    assert (out[1].token_ids, out[1].text) == ([4, 5], "ld!")
    assert (out[2].token_offset, out[2].text_offset, out[2].token_ids, out[2].text) == (6, 13, [], "")


def test_a_final_answer_with_tokens_past_a_gap_waits_and_a_repeated_one_is_dropped():
    """The first worker's end is held until the gap fills; a second worker's copy of the
    end (it regenerated the answer's end) neither repeats tokens nor ends it twice."""
    stream = ReplyStream("r")
    stream.offer(chunk(0, 2))
    stream.offer(ending(3, 6))  # token 2 still missing
    assert delivered(stream) == ([0, 1], "Hello", ["TokenChunk"])
    stream.offer(chunk(2, 3))
    stream.offer(ending(2, 6))
    assert delivered(stream) == ([2, 3, 4, 5], ", world!", ["TokenChunk", "TokenChunk", "FinalAnswer"])


def test_an_end_held_for_a_gap_is_delivered_once_when_a_final_with_tokens_fills_it():
    stream = ReplyStream("r")
    stream.offer(chunk(0, 2))
    stream.offer(final(6, "stop"))  # a first worker's end, its last chunks not here yet
    stream.offer(ending(2, 6))  # the next worker's end fills the gap
    tokens, text, kinds = delivered(stream)
    assert (tokens, text, kinds) == ([0, 1, 2, 3, 4, 5], "Hello, world!",
                                     ["TokenChunk", "TokenChunk", "FinalAnswer"])


def test_an_error_ends_the_stream_without_the_tokens_it_carries():
    stream = ReplyStream("r")
    stream.offer(m.FinalAnswer(request_id="r", token_offset=0, text_offset=0, text="x", token_ids=[9],
                               finish_reason="error"))
    (end,) = drain(stream)
    assert (end.finish_reason, end.token_ids, end.text) == ("error", [], "")


def test_only_one_terminal_answer():
    stream = ReplyStream("r")
    stream.offer(final(0, "cancelled"))
    stream.offer(final(0, "length"))
    stream.offer(chunk(0))
    out = drain(stream)
    assert len(out) == 1 and out[0].finish_reason == "cancelled"


def test_an_error_ends_the_stream_without_waiting_for_a_gap():
    stream = ReplyStream("r")
    stream.offer(chunk(0))
    stream.offer(chunk(5))
    stream.offer(final(0, "error"))
    assert delivered(stream)[2] == ["TokenChunk", "FinalAnswer"]


async def test_router_routes_by_request_id_and_ignores_unknown():
    router = ReplyRouter()
    stream = router.open("r")
    router.dispatch(chunk(0, request_id="other"))
    router.dispatch(chunk(0))
    router.dispatch(final(1))
    got = [x async for x in stream]
    assert [(type(x).__name__, x.token_offset) for x in got] == [("TokenChunk", 0), ("FinalAnswer", 1)]
    router.close("r")
    assert "r" not in router.streams


def test_fail_all_ends_each_open_stream_with_one_error():
    router = ReplyRouter()
    open_stream, done = router.open("r"), router.open("d")
    router.dispatch(chunk(0))
    router.dispatch(final(0, "stop", request_id="d"))
    router.fail_all("broker_connection_lost", "gone")
    router.dispatch(chunk(1))  # a late reply changes nothing
    out = drain(open_stream)
    assert [type(x) for x in out] == [m.TokenChunk, m.FinalAnswer]
    assert (out[-1].finish_reason, out[-1].error.code, out[-1].error.status) == (
        "error", "broker_connection_lost", 503)
    assert [x.finish_reason for x in drain(done)] == ["stop"]


def test_a_stream_sent_its_answer_again_from_the_start_fills_a_gap_a_broker_restart_left():
    """Chunks 2-3 never reached the reply queue (their publish died with the broker); the
    worker that resumes the request sends everything before its resume point again
    (tokens 0-3) and goes on: the caller gets the missing part once, and the answer whole."""
    stream = ReplyStream("r")
    stream.offer(chunk(0, 2))
    stream.offer(chunk(4, 6))  # the resumed worker's first new tokens, ahead of its resend
    stream.offer(chunk(0, 4))  # its resend of what came before its point
    stream.offer(final(6))
    assert delivered(stream) == ([0, 1, 2, 3, 4, 5], "".join(ANSWER),
                                 ["TokenChunk", "TokenChunk", "TokenChunk", "FinalAnswer"])


def test_link_loss_watch_finds_answers_lost_only_after_their_grace():
    """Only streams open at the loss are watched; one whose request is done counts as lost
    once it has been done for the grace without its answer (which normally arrives first)."""
    watch = LinkLossWatch(grace_s=5.0)
    watch.link_lost(["done-late", "running", "answered"])
    assert sorted(watch.watched) == ["answered", "done-late", "running"]
    assert watch.lost({"done-late": True, "running": False, "answered": True, "new": True}, now=10.0) == []
    watch.forget("answered")  # its final answer arrived
    assert watch.lost({"done-late": True, "running": False}, now=14.0) == []
    assert watch.lost({"done-late": True, "running": True}, now=15.0) == ["done-late"]
    watch.forget("done-late")
    watch.link_lost(["running", "later"])  # a second outage: the answer may wait in the queue
    assert sorted(watch.watched) == ["later", "running"]
    assert watch.lost({"running": True, "later": False}, now=20.0) == []
    assert watch.lost({"running": True, "later": False}, now=24.0) == []
    assert watch.lost({"running": True, "later": False}, now=25.0) == ["running"]


def test_fail_ends_one_open_stream_and_leaves_the_others():
    router = ReplyRouter()
    lost, other = router.open("r"), router.open("o")
    router.dispatch(chunk(0))
    router.fail("r", "broker_connection_lost", "gone")
    router.fail("nobody", "broker_connection_lost", "gone")  # not open: nothing happens
    assert [x.finish_reason for x in drain(lost) if isinstance(x, m.FinalAnswer)] == ["error"]
    assert drain(other) == [] and not other.finished


class Delivery:
    """What BatchedAcks uses of an incoming message: its ack."""

    def __init__(self, tag: int, acks: list, fail: bool = False) -> None:
        self.delivery_tag, self.acks, self.fail = tag, acks, fail

    async def ack(self, multiple: bool = False) -> None:
        if self.fail:
            raise ConnectionError("channel closed")
        self.acks.append((self.delivery_tag, multiple))


async def test_batched_acks_ack_the_last_message_of_an_interval_for_all_before_it():
    import asyncio

    from services.amqp import BatchedAcks

    acks: list = []
    batched = BatchedAcks(interval_s=0.05)
    for tag in (1, 2, 3):
        batched.handled(Delivery(tag, acks))
        await asyncio.sleep(0.001)
    assert acks == []  # within the interval
    await asyncio.sleep(0.1)
    assert acks == [(3, True)]
    batched.handled(Delivery(4, acks, fail=True))  # its channel closed: the broker requeues
    await asyncio.sleep(0.1)
    batched.handled(Delivery(5, acks))
    await asyncio.sleep(0.1)
    assert acks == [(3, True), (5, True)]
    batched.handled(Delivery(6, acks))
    await batched.flush()  # closing: at once, and the timer acks nothing more
    await asyncio.sleep(0.1)
    assert acks == [(3, True), (5, True), (6, True)]
