"""The fault ledger's verdict on one request, as its client saw it (pure logic)."""

from __future__ import annotations

from tests.faults.checker import RequestLog


def answered(chunks: list[tuple[int, int]], completion_tokens: int, logprob_tokens: int | None = None,
             finals: int = 1) -> RequestLog:
    log = RequestLog(local_id="1", tenant="acme", transport="http", accepted=True)
    for offset, n in chunks:
        log.token(offset, n)
    log.logprob_tokens = logprob_tokens
    for _ in range(finals):
        log.final("length", 4, completion_tokens)
    return log


def test_an_answer_in_order_with_one_end_is_neither_lost_nor_duplicated():
    log = answered([(0, 1), (1, 2)], 3)
    assert not log.lost() and not log.duplicated()


def test_repeats_gaps_and_second_ends_count_as_duplicated():
    assert answered([(0, 1), (0, 1)], 1).duplicated()
    assert answered([(0, 1), (2, 1)], 3).duplicated()
    assert answered([(0, 1)], 1, finals=2).duplicated()


def test_log_probabilities_must_cover_exactly_the_answers_tokens():
    assert not answered([(0, 3)], 3, logprob_tokens=3).duplicated()
    assert answered([(0, 3)], 3, logprob_tokens=4).duplicated()  # one came twice
    assert answered([(0, 3)], 3, logprob_tokens=2).duplicated()  # one is missing
    assert not answered([(0, 3)], 3, logprob_tokens=None).duplicated()  # not asked for


def test_token_ids_must_be_exactly_the_answers_and_the_prompts_come_once():
    def with_ids(output_ids: int | None, prompt_ids: int = 1) -> RequestLog:
        log = answered([(0, 3)], 3)
        log.output_ids, log.prompt_ids = output_ids, prompt_ids
        return log

    assert not with_ids(3).duplicated()
    assert with_ids(4).duplicated() and with_ids(2).duplicated()
    assert with_ids(3, prompt_ids=2).duplicated() and with_ids(3, prompt_ids=0).duplicated()
    assert not with_ids(None, prompt_ids=0).duplicated()  # not asked for


def test_an_accepted_request_without_an_end_is_lost():
    log = RequestLog(local_id="2", tenant="acme", transport="http", accepted=True)
    assert log.lost()
    log.abandoned = True
    assert not log.lost()
