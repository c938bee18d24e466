"""Pure pieces of the engine: paged attention reference, detokenizer, stops (sampling:
test_sampling.py)."""

from __future__ import annotations

from pathlib import Path
from typing import ClassVar

import pytest
import torch

from services.engine.attention import (
    decode_pieces,
    make_slot_plan,
    paged_attention_reference,
    slot_attention,
    write_kv_cache,
    write_slot_cache,
)
from services.engine.detokenizer import (
    IncrementalDetokenizer,
    StopStringBuffer,
    TokenBytes,
    _backend_decode,
    stop_reason,
    text_state,
)
from services.models import DEFAULT_MODEL_NAME, load_tokenizer


def dense_causal_attention(q, k, v, scale):
    """q [n, H, D] are the last n positions of k/v [L, KVH, D]."""
    n, heads, _ = q.shape
    length, kv_heads, _ = k.shape
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    q_pos = torch.arange(length - n, length)[:, None]
    scores = scores.masked_fill(torch.arange(length)[None, :] > q_pos, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


@pytest.mark.parametrize("block_size", [1, 4, 16])
def test_paged_attention_matches_dense_for_ragged_batch(block_size):
    torch.manual_seed(0)
    heads, kv_heads, dim, num_blocks = 4, 2, 8, 128
    # (context length, new tokens): decodes, a full prefill, a prefill chunk with context.
    shapes = [(1, 1), (9, 1), (17, 17), (30, 6), (5, 1), (33, 2)]
    key_cache = torch.zeros(num_blocks, block_size, kv_heads, dim)
    value_cache = torch.zeros_like(key_cache)
    free = torch.randperm(num_blocks).tolist()  # scattered blocks
    tables, dense, queries, slots, starts = [], [], [], [], [0]
    for length, n in shapes:
        blocks = [free.pop() for _ in range(-(-length // block_size))]
        tables.append(blocks)
        k, v = torch.randn(length, kv_heads, dim), torch.randn(length, kv_heads, dim)
        dense.append((k, v))
        # Cached context goes in first; the last n tokens are written like a step would.
        old = [blocks[p // block_size] * block_size + p % block_size for p in range(length - n)]
        if old:
            write_kv_cache(
                k[: length - n], v[: length - n], key_cache, value_cache, torch.tensor(old)
            )
        slots += [
            blocks[p // block_size] * block_size + p % block_size for p in range(length - n, length)
        ]
        queries.append(torch.randn(n, heads, dim))
        starts.append(starts[-1] + n)
    new_k = torch.cat([k[len(k) - n :] for (k, _), (_, n) in zip(dense, shapes)])
    new_v = torch.cat([v[len(v) - n :] for (_, v), (_, n) in zip(dense, shapes)])
    write_kv_cache(new_k, new_v, key_cache, value_cache, torch.tensor(slots))
    width = max(len(t) for t in tables)
    block_tables = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    out = paged_attention_reference(
        torch.cat(queries),
        key_cache,
        value_cache,
        block_tables,
        torch.tensor([s[0] for s in shapes], dtype=torch.int32),
        torch.tensor(starts, dtype=torch.int32),
        dim**-0.5,
    )
    for i, ((k, v), q) in enumerate(zip(dense, queries)):
        expected = dense_causal_attention(q, k, v, dim**-0.5)
        torch.testing.assert_close(out[starts[i] : starts[i + 1]], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("slots", [[0, 1, 2, 3, 4, 5], [5, 0, 3, 7, 1, 2]])
def test_slot_attention_matches_dense_for_ragged_batch(slots):
    torch.manual_seed(0)
    heads, kv_heads, dim, max_len = 4, 2, 8, 40
    # (context length, new tokens): decodes of mixed lengths, a prompt, a prefill chunk.
    shapes = [(1, 1), (9, 1), (17, 17), (30, 6), (5, 1), (33, 1)]
    key_slots = torch.zeros(8, kv_heads, max_len, dim)
    value_slots = torch.zeros_like(key_slots)
    dense = [(torch.randn(n, kv_heads, dim), torch.randn(n, kv_heads, dim)) for n, _ in shapes]
    # The cached context as earlier steps left it, then this step's tokens via the plan.
    for slot, (k, v), (length, n) in zip(slots, dense, shapes):
        key_slots[slot, :, : length - n] = k[: length - n].transpose(0, 1)
        value_slots[slot, :, : length - n] = v[: length - n].transpose(0, 1)
    plan = make_slot_plan(
        [n for _, n in shapes],
        [c for c, _ in shapes],
        slots,
        kv_heads,
        max_len,
        torch.float32,
        torch.device("cpu"),
    )
    new_k = torch.cat([k[len(k) - n :] for (k, _), (_, n) in zip(dense, shapes)])
    new_v = torch.cat([v[len(v) - n :] for (_, v), (_, n) in zip(dense, shapes)])
    write_slot_cache(new_k, new_v, key_slots, value_slots, plan.write_index)
    queries = [torch.randn(n, heads, dim) for _, n in shapes]
    out = slot_attention(plan, torch.cat(queries), key_slots, value_slots, dim**-0.5)
    start = 0
    for (k, v), q in zip(dense, queries):
        expected = dense_causal_attention(q, k, v, dim**-0.5)
        torch.testing.assert_close(out[start : start + len(q)], expected, rtol=1e-5, atol=1e-5)
        start += len(q)


def test_decode_pieces_cover_each_decoding_slot_once():
    lens = [700, 0, 690, 20, 25, 0, 0, 710, 30]
    pieces = decode_pieces(lens)
    covered = [s for lo, hi in pieces for s in range(lo, hi)]
    assert sorted(covered) == sorted(set(covered))
    assert {s for s, n in enumerate(lens) if n} <= set(covered)
    assert all(lens[lo] and lens[hi - 1] for lo, hi in pieces)  # no idle slot at an end
    assert decode_pieces([100] * 8) == [(0, 8)]  # equal lengths: one call
    assert decode_pieces([0, 0]) == []


def test_fast_detokenizer_decode_is_the_tokenizers_decode(tokenizer):
    fast = _backend_decode(tokenizer)
    assert fast is not None
    ids = tokenizer("héllo wörld, ünïcode ✓ text")["input_ids"]
    for skip in (True, False):
        assert fast(ids, skip_special_tokens=skip) == tokenizer.decode(
            ids, skip_special_tokens=skip, clean_up_tokenization_spaces=False
        )




@pytest.fixture(scope="module")
def tokenizer(model_cache: Path):
    return load_tokenizer(str(model_cache / DEFAULT_MODEL_NAME))


@pytest.mark.parametrize(
    "text",
    [
        "Hello world, this is plain text.",
        " café naïve 😀🚀 中文 日本語 한국어 ✓",
        "😀😀😀 emoji 🛰️ x",
    ],
)
def test_incremental_detokenizer_never_emits_broken_characters(tokenizer, text):
    prompt = tokenizer("Prompt:")["input_ids"]
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    detok = IncrementalDetokenizer(tokenizer, prompt)
    deltas = [detok.add(t) for t in ids]
    deltas.append(detok.flush())
    assert "".join(deltas) == tokenizer.decode(ids)
    assert all("\ufffd" not in d for d in deltas)


def test_detokenizer_holds_back_a_split_character(tokenizer):
    ids = tokenizer("🛰", add_special_tokens=False)["input_ids"]
    assert len(ids) > 1, "the test needs a character spread over several tokens"
    detok = IncrementalDetokenizer(tokenizer, [tokenizer.bos_token_id])
    deltas = [detok.add(t) for t in ids]
    assert deltas[:-1] == [""] * (len(ids) - 1) and deltas[-1] == "🛰"


def test_detokenizer_flushes_an_unfinished_character_at_the_end(tokenizer):
    ids = tokenizer("ab🛰", add_special_tokens=False)["input_ids"][:-1]
    detok = IncrementalDetokenizer(tokenizer, [tokenizer.bos_token_id])
    text = "".join(detok.add(t) for t in ids) + detok.flush()
    assert text == tokenizer.decode(ids)


def test_stop_string_split_over_deltas_is_cut_and_never_streamed():
    buf = StopStringBuffer(["END!"])
    streamed = []
    for delta in ["Hello E", "N", "D", "? and E", "ND", "!", " tail"]:
        text, stopped = buf.append(delta)
        streamed.append(text)
        if stopped:
            break
    assert "".join(streamed) == "Hello END? and "
    assert stopped
    assert streamed[1] == "" and streamed[2] == ""  # "EN", "END" held back as possible stops


def test_stop_buffer_releases_held_text_when_it_cannot_be_a_stop():
    buf = StopStringBuffer(["abc", "xyz"])
    assert buf.append("12a") == ("12", False)
    assert buf.append("b") == ("", False)
    assert buf.append("d") == ("abd", False)
    assert buf.append("xy") == ("", False)
    assert buf.flush() == "xy"


def test_earliest_stop_string_wins():
    buf = StopStringBuffer(["later", "ear"])
    assert buf.append("an earlier one") == ("an ", True)
    assert buf.append("more") == ("", True)


def test_special_tokens_are_spelled_out_only_when_not_skipped(tokenizer):
    """vLLM's ``skip_special_tokens=false``: a generated special token is in the text."""
    hello = tokenizer.encode("hello", add_special_tokens=False)
    output = [*hello, tokenizer.eos_token_id, *hello]

    def text(skip: bool) -> str:
        detok, buffer = text_state(tokenizer, [tokenizer.bos_token_id], [], skip_special_tokens=skip)
        return "".join(buffer.append(detok.add(t))[0] for t in output) + buffer.flush()

    assert text(True) == "hellohello"
    assert text(False) == f"hello{tokenizer.eos_token}hello"


class _SpacingTokenizer:
    """A slow tokenizer as transformers 4 has them: its decode sets spelled-out special
    tokens apart by spaces unless told not to (the real one, wrapped, decodes the rest)."""

    def __init__(self, real):
        self.real = real

    def decode(self, ids, skip_special_tokens=False, clean_up_tokenization_spaces=None,
               spaces_between_special_tokens=True):
        special, parts, run = set(self.real.all_special_ids), [], []
        for i in ids:
            if i not in special:
                run.append(i)
                continue
            if run:
                parts, run = [*parts, self.real.decode(run)], []
            if not skip_special_tokens:
                parts.append(self.real.convert_ids_to_tokens(i))
        if run:
            parts.append(self.real.decode(run))
        return (" " if spaces_between_special_tokens else "").join(parts)


def test_spaces_between_special_tokens_false_reaches_a_slow_tokenizers_decode(tokenizer):
    """vLLM's ``spaces_between_special_tokens``: a slow tokenizer spaces spelled-out special
    tokens unless told not to; the Rust decoder never does, so the flag changes nothing."""
    hello = tokenizer.encode("hello", add_special_tokens=False)
    output = [*hello, tokenizer.eos_token_id, *hello]

    def text(tok, spaces: bool) -> str:
        detok, buffer = text_state(tok, hello, [], skip_special_tokens=False,
                                   spaces_between_special_tokens=spaces)
        return "".join(buffer.append(detok.add(t))[0] for t in output) + buffer.flush()

    slow = _SpacingTokenizer(tokenizer)
    assert text(slow, True) == f"hello {tokenizer.eos_token} hello"
    assert text(slow, False) == f"hello{tokenizer.eos_token}hello"
    assert text(tokenizer, True) == text(tokenizer, False) == f"hello{tokenizer.eos_token}hello"


def test_the_stop_reason_is_the_matched_string_else_a_named_stop_token():
    buf = StopStringBuffer(["ear", "earl"])
    buf.append("an earlier")
    assert stop_reason(5, buf, [5]) == "earl"  # the string, even when the token was named
    assert stop_reason(5, StopStringBuffer(["x"]), [5, 9]) == 5
    assert stop_reason(2, StopStringBuffer(["x"]), [5]) is None  # EOS: the model's own end


def test_a_kept_stop_string_ends_the_answer_with_it():
    """vLLM's ``include_stop_str_in_output``: cut after the stop string (the earliest; of
    those there, the longest), still never streaming past it."""
    buf = StopStringBuffer(["END!"], keep_stop=True)
    streamed = [buf.append(d) for d in ["Hello E", "ND", "! tail"]]
    assert streamed == [("Hello ", False), ("", False), ("END!", True)]
    assert StopStringBuffer(["ear", "earl", "later"], keep_stop=True).append("an earlier") == ("an earl", True)


def test_stop_strings_are_not_looked_for_while_unchecked():
    """Before min_tokens: the text streams whole, and a later match never cuts into it."""
    buf = StopStringBuffer(["ab"])
    assert buf.append("xab", check=False) == ("xab", False)
    assert buf.append("a", check=True) == ("", False)  # could start "ab": held back
    assert buf.append("bz") == ("", True) and buf.text == "xab"


def test_no_stop_strings_streams_everything():
    buf = StopStringBuffer([])
    assert buf.append("abc") == ("abc", False) and buf.flush() == ""


def test_token_bytes_join_into_the_characters_split_between_tokens(tokenizer):
    ids = tokenizer.encode("a𝔘ᚠ 😀", add_special_tokens=False)
    token_bytes = TokenBytes(tokenizer)
    assert "\ufffd" in [tokenizer.decode([i]) for i in ids]  # some token holds part of one
    assert b"".join(token_bytes(i) for i in ids) == "a𝔘ᚠ 😀".encode()
    assert token_bytes(tokenizer.bos_token_id) == tokenizer.bos_token.encode()


class SentencePieceLike:
    """Pieces as a SentencePiece vocabulary with byte fallback spells them."""

    all_special_ids = (0,)
    pieces: ClassVar[dict[int, str]] = {0: "<s>", 1: "\u2581the", 2: "<0xE2>", 3: "<0x82>",
                                        4: "<0xAC>"}

    def convert_ids_to_tokens(self, token_id: int) -> str | None:
        return self.pieces.get(token_id)


def test_token_bytes_of_sentencepiece_pieces():
    token_bytes = TokenBytes(SentencePieceLike())
    assert [token_bytes(i) for i in range(6)] == [b"<s>", b" the", b"\xe2", b"\x82", b"\xac", b""]
    assert b"".join(token_bytes(i) for i in (2, 3, 4)).decode() == "€"
