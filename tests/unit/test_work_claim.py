"""A worker's claim on a request, in a real Redis: one delivery runs a request; the same
delivery run again in place keeps its claim; a second copy does not run; a broker
redelivery (its first worker died) does."""

from __future__ import annotations

from services import keys
from services.worker import ack_answered, claim_work, claimant, claimant_worker_id


async def test_one_delivery_holds_the_claim_and_keeps_it_when_run_again(redis_client):
    first = claimant("cpu-a", "life1", 7)
    claim = await claim_work(redis_client, "r1", first)
    assert claim.claimed and not claim.is_duplicate(redelivered=False)
    # The handler failed after the claim was taken (the reply was lost) and runs again.
    again = await claim_work(redis_client, "r1", first)
    assert again.claimed and not again.is_duplicate(redelivered=False)
    assert claimant_worker_id(await redis_client.hget(keys.request_markers("r1"), keys.MARKER_CLAIM)) == "cpu-a"


async def test_a_second_copy_is_dropped_unless_the_broker_redelivered_it(redis_client):
    await claim_work(redis_client, "r2", claimant("cpu-a", "life1", 7))
    for other in (claimant("cpu-a", "life1", 8), claimant("cpu-a", "life2", 7), claimant("cpu-b", "x", 7)):
        claim = await claim_work(redis_client, "r2", other)
        assert not claim.claimed
        assert claim.is_duplicate(redelivered=False)  # a scheduler's republished copy
        assert not claim.is_duplicate(redelivered=True)  # the first worker died holding it


async def test_done_and_cancelled_markers_are_read_with_the_claim(redis_client):
    await redis_client.hset(keys.request_markers("r3"), keys.MARKER_DONE, "1")
    claim = await claim_work(redis_client, "r3", claimant("cpu-a", "l", 1))
    assert claim.done and claim.is_duplicate(redelivered=True)
    await redis_client.hset(keys.request_markers("r4"), keys.MARKER_CANCELLED, "1")
    claim = await claim_work(redis_client, "r4", claimant("cpu-a", "l", 1))
    assert claim.cancelled and not claim.done
    assert await redis_client.ttl(keys.request_markers("r4")) > 0


class LinkGone:
    """A delivery whose ack cannot be sent: its channel closed with the link."""

    async def ack(self) -> None:
        raise ConnectionError("channel closed")


class Acked:
    acked = False

    async def ack(self) -> None:
        self.acked = True


async def test_a_request_answered_but_not_acked_is_dropped_when_redelivered(redis_client):
    """Its worker's ack was lost with the link after the answer went out: the worker marks
    it answered, so the broker's redelivered copy is dropped, not run a second time, even
    before the scheduler has taken the completion event."""
    await claim_work(redis_client, "r5", claimant("cpu-a", "l", 1))
    await ack_answered(LinkGone(), redis_client, "r5")
    claim = await claim_work(redis_client, "r5", claimant("cpu-b", "m", 1))
    assert claim.done and claim.is_duplicate(redelivered=True)
    assert await redis_client.ttl(keys.request_markers("r5")) > 0
    acked = Acked()  # acked as usual: the scheduler alone marks it done, on its event
    await ack_answered(acked, redis_client, "r6")
    assert acked.acked and not await redis_client.exists(keys.request_markers("r6"))
