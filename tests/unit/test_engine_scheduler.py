"""The engine's step scheduler and block allocator, without a model."""

from __future__ import annotations

import pytest

from services.engine.kv_cache import BlockAllocator
from services.engine.scheduler import Scheduler, SchedulerOutput, SeqStatus, Sequence


def seq(rid: str, prompt_len: int, max_tokens: int = 8, priority: float = 0.0) -> Sequence:
    return Sequence(rid, list(range(prompt_len)), prompt_len, max_tokens, priority=priority)


def make(
    num_blocks: int = 64, block_size: int = 4, max_seqs: int = 8, budget: int = 64
) -> Scheduler:
    return Scheduler(max_seqs, budget, BlockAllocator(num_blocks, block_size))


def run_step(s: Scheduler, sampled_token: int = 7) -> SchedulerOutput:
    """Schedule, pretend the model ran, append a token to every sampling request."""
    out = s.schedule()
    sampling = [item.seq for item in out.scheduled if item.samples]
    s.commit(out)
    for q in sampling:
        q.token_ids.append(sampled_token)
    return out


def test_allocator_hands_out_and_takes_back_blocks():
    a = BlockAllocator(4, 16)
    assert (
        a.blocks_for(0) == 0
        and a.blocks_for(1) == 1
        and a.blocks_for(16) == 1
        and a.blocks_for(17) == 2
    )
    got = a.allocate(3)
    assert len(set(got)) == 3 and a.num_free_blocks == 1
    with pytest.raises(RuntimeError):
        a.allocate(2)
    a.free(got)
    assert a.num_free_blocks == 4


def test_admission_respects_token_budget_with_chunked_prefill():
    s = make(budget=32)
    for rid in "abc":
        s.add(seq(rid, 20))
    out = s.schedule()
    assert [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 20), ("b", 12)]
    assert out.num_batched_tokens == 32
    assert [i.samples for i in out.scheduled] == [True, False]
    assert [q.request_id for q in s.waiting] == ["c"]
    s.commit(out)
    s.running[0].token_ids.append(1)
    # Next step: a decodes one token, b finishes its prompt, c starts.
    out = s.schedule()
    assert [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled] == [
        ("a", 1),
        ("b", 8),
        ("c", 20),
    ]


def test_admission_respects_max_num_seqs():
    s = make(max_seqs=2)
    for rid in "abc":
        s.add(seq(rid, 3))
    out = s.schedule()
    assert [i.seq.request_id for i in out.scheduled] == ["a", "b"]
    assert len(s.running) == 2 and [q.request_id for q in s.waiting] == ["c"]


def test_admission_stops_when_blocks_run_out():
    s = make(num_blocks=5, block_size=4)
    s.add(seq("a", 12))  # 3 blocks
    s.add(seq("b", 12))  # 3 more: only 2 left
    out = s.schedule()
    assert [i.seq.request_id for i in out.scheduled] == ["a"]
    assert s.allocator.num_free_blocks == 2


def test_waiting_order_is_priority_then_arrival():
    s = make(max_seqs=1)
    s.add(seq("late-low", 3, priority=5))
    s.add(seq("first", 3, priority=1))
    s.add(seq("second", 3, priority=1))
    assert [i.seq.request_id for i in s.schedule().scheduled] == ["first"]
    assert [q.request_id for q in s.waiting] == ["second", "late-low"]


def test_preemption_victim_is_highest_priority_value_then_latest():
    # Three requests each fill exactly one block; the pool has one spare block.
    s = make(num_blocks=4, block_size=4, budget=64)
    for rid, prio in (("vip", 0.0), ("old-bulk", 3.0), ("new-bulk", 3.0)):
        s.add(seq(rid, 4, priority=prio))
    run_step(s)  # prefill 4 tokens each (one block), one token sampled each
    assert s.allocator.num_free_blocks == 1
    out = run_step(s)  # each needs a second block for position 4: only one is free
    assert out.preempted == ["new-bulk"]
    assert [i.seq.request_id for i in out.scheduled] == ["vip", "old-bulk"]
    victim = s.waiting[0]
    assert victim.request_id == "new-bulk"
    assert (
        victim.status is SeqStatus.WAITING
        and victim.num_computed_tokens == 0
        and not victim.block_ids
    )
    assert victim.num_output_tokens == 1  # generated tokens are kept, recomputed on return
    assert s.num_preemptions == 1 and victim.num_preemptions == 1


def test_least_important_running_request_preempts_itself():
    s = make(num_blocks=3, block_size=4, budget=64)
    s.add(seq("a", 4, priority=0))
    s.add(seq("b", 4, priority=9))
    run_step(s)  # one block each, one free
    s.add(seq("c", 1))
    out = run_step(s)  # a takes the free block; b finds none and yields its own
    assert out.preempted == ["b"]
    assert [i.seq.request_id for i in out.scheduled] == ["a"]  # and c is not admitted
    assert {q.request_id for q in s.waiting} == {"b", "c"}
    assert s.allocator.num_free_blocks == 1


def test_preempted_request_recomputes_prompt_and_outputs():
    s = make(num_blocks=3, block_size=4, budget=64)
    a, b = seq("a", 4, priority=0), seq("b", 4, priority=1)
    s.add(a)
    s.add(b)
    run_step(s)
    assert run_step(s).preempted == ["b"]
    s.finish(a)
    out = s.schedule()
    (item,) = out.scheduled
    assert item.seq is b and item.num_new_tokens == 5 and item.samples  # 4 prompt + 1 output


def test_decode_tokens_come_before_new_prefills_in_the_budget():
    s = make(budget=8)
    s.add(seq("a", 8))
    run_step(s)
    s.add(seq("b", 20))
    out = run_step(s)
    assert [(i.seq.request_id, i.num_new_tokens) for i in out.scheduled] == [("a", 1), ("b", 7)]


def test_finish_frees_blocks_from_running_and_waiting():
    s = make(num_blocks=8, block_size=4, max_seqs=1)
    a, b = seq("a", 8), seq("b", 8)
    s.add(a)
    s.add(b)
    s.schedule()
    assert s.allocator.num_free_blocks == 6
    s.finish(a)
    s.finish(b)
    assert s.allocator.num_free_blocks == 8 and not s.has_unfinished()
    assert a.status is SeqStatus.FINISHED


def caching(num_blocks: int = 16, block_size: int = 4, budget: int = 64) -> Scheduler:
    return Scheduler(8, budget, BlockAllocator(num_blocks, block_size, enable_caching=True))


def serve(s: Scheduler, q: Sequence) -> SchedulerOutput:
    s.add(q)
    first = run_step(s)
    while q.num_output_tokens < q.max_tokens:
        run_step(s)
    s.finish(q)
    return first


def test_a_request_starts_from_the_cached_blocks_of_its_prefix():
    s = caching()
    serve(s, Sequence("a", list(range(10)), 10, 2))
    assert s.allocator.num_cached_blocks == 2  # tokens 0-7 (the third block was not full)
    b = Sequence("b", list(range(9)) + [99], 10, 2)
    first = serve(s, b)
    assert first.scheduled[0].num_new_tokens == 2 and b.num_cached_tokens == 8
    c = Sequence("c", list(range(8)), 8, 2)  # all cached: its last block is computed again
    assert serve(s, c).scheduled[0].num_new_tokens == 4 and c.num_cached_tokens == 4
    assert (s.prefix_cache_queries, s.prefix_cache_hits) == (28, 12)
    other = Sequence("d", list(range(10)), 10, 2, cache_salt=b"another tenant")
    assert serve(s, other).scheduled[0].num_new_tokens == 10 and other.num_cached_tokens == 0
    assert s.allocator.num_free_blocks == 16


def test_cached_blocks_are_shared_while_held_and_evicted_last_recently_freed_first():
    a = BlockAllocator(4, 4, enable_caching=True)
    x, y = a.allocate(2)
    a.register(x, b"x")
    a.register(y, b"y")
    a.free([x, y])
    assert a.num_free_blocks == 4 and a.cached_prefix([b"x", b"y", b"z"]) == [x, y]
    assert a.num_held_by_none([x, y]) == 2
    a.take([x])
    a.take([x])  # two requests share it
    assert a.num_free_blocks == 3 and a.num_held_by_none([x]) == 0
    fresh = a.allocate(2)  # the blocks that name nothing go first
    assert y not in fresh and a.cached_prefix([b"x", b"y"]) == [x, y]
    assert a.allocate(1) == [y] and a.cached_prefix([b"x", b"y"]) == [x]  # y evicted
    a.free([x])
    assert a.num_free_blocks == 0  # still held by the other
    a.free([x])
    assert a.num_free_blocks == 1 and a.cached_prefix([b"x"]) == [x]
    a.register(fresh[0], b"x")  # computed alongside: the first stays the cached one
    assert a.cached_prefix([b"x"]) == [x]
    plain = BlockAllocator(4, 4)
    block = plain.allocate(1)[0]
    plain.register(block, b"x")
    assert plain.cached_prefix([b"x"]) == []


def test_admission_counts_the_free_cached_blocks_it_takes_and_preemption_finds_its_own():
    s = caching(num_blocks=4, block_size=4, budget=64)
    serve(s, Sequence("a", list(range(9)), 9, 1))  # caches blocks 0-1 (tokens 0-7)
    # 8 cached tokens + 8 new: 4 blocks, two of them the free cached ones.
    big = Sequence("big", list(range(16)), 16, 1)
    s.add(big)
    out = s.schedule()
    assert out.scheduled[0].num_new_tokens == 8 and s.allocator.num_free_blocks == 0
    s.commit(out)
    s._preempt(big)  # its blocks stay cached
    assert s.allocator.num_free_blocks == 4
    again = s.schedule()
    assert again.scheduled[0].seq is big and again.scheduled[0].num_new_tokens == 4
    assert big.num_cached_tokens == 8  # what its first admission found


def test_a_request_whose_next_block_is_being_computed_waits_for_it():
    """Two requests with one prompt at once: the second waits a step and starts from the
    first's blocks instead of computing them too; if the first ends before computing
    them, it waits no more."""
    s = caching()
    a, b = (Sequence(rid, list(range(10)), 10, 1) for rid in "ab")
    s.add(a)
    s.add(b)
    first = s.schedule()
    assert [(item.seq.request_id, item.num_new_tokens) for item in first.scheduled] == [("a", 10)]
    s.commit(first)
    second = s.schedule()
    assert [(item.seq.request_id, item.num_new_tokens) for item in second.scheduled] == [("b", 2)]
    assert b.num_cached_tokens == 8
    s = caching()
    c, d = (Sequence(rid, [7] * 12, 12, 1) for rid in "cd")
    s.add(c)
    s.add(d)
    assert [item.seq.request_id for item in s.schedule().scheduled] == ["c"]
    s.finish(c)  # cancelled before its blocks were computed: d waits for them no more
    assert [(item.seq.request_id, item.num_new_tokens) for item in s.schedule().scheduled] == [("d", 12)]
