"""Reply streams: in order, no duplicate, no gap, one terminal answer."""

from __future__ import annotations

from services import messages as m
from services.replies import ReplyRouter, ReplyStream


def chunk(seq: int, text: str = "") -> m.TokenChunk:
    return m.TokenChunk(request_id="r", seq=seq, text=text or str(seq), token_ids=[seq])


def final(seq: int, reason: str = "length") -> m.FinalAnswer:
    return m.FinalAnswer(request_id="r", seq=seq, finish_reason=reason)  # type: ignore[arg-type]


def drain(stream: ReplyStream) -> list:
    out = []
    while not stream._queue.empty():
        out.append(stream._queue.get_nowait())
    return out


def test_repeats_from_a_regenerating_worker_are_dropped():
    stream = ReplyStream("r")
    for msg in [chunk(0), chunk(1), chunk(0), chunk(1), chunk(2), final(3)]:
        stream.offer(msg)
    assert [x.seq for x in drain(stream)] == [0, 1, 2, 3]


def test_a_gap_is_held_until_filled():
    stream = ReplyStream("r")
    stream.offer(chunk(0))
    stream.offer(chunk(2))
    stream.offer(final(3))
    assert [x.seq for x in drain(stream)] == [0]
    stream.offer(chunk(1))
    assert [x.seq for x in drain(stream)] == [1, 2, 3]


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
    assert [type(x).__name__ for x in drain(stream)] == ["TokenChunk", "FinalAnswer"]


async def test_router_routes_by_request_id_and_ignores_unknown():
    router = ReplyRouter()
    stream = router.open("r")
    router.dispatch(m.TokenChunk(request_id="other", seq=0, text="x", token_ids=[]))
    router.dispatch(chunk(0))
    router.dispatch(final(1))
    got = [x async for x in stream]
    assert [x.seq for x in got] == [0, 1]
    router.close("r")
    assert "r" not in router.streams


def test_fail_all_ends_each_open_stream_with_one_error():
    router = ReplyRouter()
    open_stream, done = router.open("r"), router.open("d")
    router.dispatch(chunk(0))
    router.dispatch(m.FinalAnswer(request_id="d", seq=0, finish_reason="stop"))
    router.fail_all("broker_connection_lost", "gone")
    router.dispatch(chunk(1))  # a late reply changes nothing
    out = drain(open_stream)
    assert [type(x) for x in out] == [m.TokenChunk, m.FinalAnswer]
    assert (out[-1].finish_reason, out[-1].error.code, out[-1].error.status) == (
        "error", "broker_connection_lost", 503)
    assert [x.finish_reason for x in drain(done)] == ["stop"]
