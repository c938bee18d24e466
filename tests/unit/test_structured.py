"""Structured outputs: the languages' checks, and the engine holding real answers of the
tiny model to a JSON schema, JSON, a regex, a choice and a grammar, also when resumed,
recomputed after a preemption, or told to go on past the end."""

from __future__ import annotations

import json
import re
import threading

import jsonschema
import pytest
import torch

from services.engine import EngineError, EngineRequest
from services.engine.echo import EchoEngine
from services.engine.interface import EngineConfig, ResumedOutput
from services.engine.structured import (
    GrammarCompiler,
    bounded_strings_as_patterns,
    grammar_problem,
)
from services.messages import MAX_STRUCTURED_CHARS, SamplingParams, StructuredOutput, TokenBias
from tests.unit.test_engine import drain, make_engine

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2},
    },
    "required": ["name", "age", "tags"],
    "additionalProperties": False,
}
PERSON = StructuredOutput("json_schema", json.dumps(SCHEMA), any_whitespace=False)
DATE = StructuredOutput("regex", r"\d{4}-\d{2}-\d{2}")
COLOURS = StructuredOutput("choice", choices=["red", "green", "dark \"blue\"\n"])
CALL = StructuredOutput("grammar", 'root ::= "call(" arg ("," arg){0,2} ")"\narg ::= [a-z]{1,4}')


def sampled(spec: StructuredOutput, seed: int, max_tokens: int = 120, **kw) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=1.0, seed=seed, structured=spec, **kw)


@pytest.fixture(scope="module")
def model_path(model_cache) -> str:
    from services.models import DEFAULT_MODEL_NAME

    return str(model_cache / DEFAULT_MODEL_NAME)


@pytest.fixture(scope="module")
def prompt(model_path) -> list[int]:
    from services.models import load_tokenizer

    return load_tokenizer(model_path)("Tell me about someone.")["input_ids"]


# ---- the checks ----------------------------------------------------------------------


@pytest.mark.parametrize("spec", [PERSON, DATE, COLOURS, CALL, StructuredOutput("json_object")])
def test_well_formed_languages_pass(spec):
    assert spec.problem() is None
    assert grammar_problem(spec) is None


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (StructuredOutput("regex", "[a-"), r"^the regular expression is not valid: .*Unclosed '\['"),
        (StructuredOutput("json_schema", '{"type": 3}'), "^the JSON schema is not valid: "),
        (StructuredOutput("json_schema", '{"type": '), "^the JSON schema is not valid: "),
        (StructuredOutput("grammar", "root ::= undefined_rule"), "^the EBNF grammar is not valid: .*undefined_rule"),
        (StructuredOutput("regex", ""), "regular expression is empty"),
        (StructuredOutput("choice"), "lists its strings in choices"),
        (StructuredOutput("choice", "x", choices=["a"]), "lists its strings in choices"),
        (StructuredOutput("json_object", "{}"), "has no spec"),
        (StructuredOutput("regex", "a", choices=["a"]), "has no choices"),
        (StructuredOutput("regex", "a" * (MAX_STRUCTURED_CHARS + 1)), "at most"),
        (StructuredOutput("choice", choices=["a"] * 2000), "at most 1024"),
    ],
)
def test_bad_languages_are_refused_in_plain_words(spec, message):
    problem = grammar_problem(spec)
    assert problem is not None and re.search(message, problem), problem
    assert "/project/" not in problem  # xgrammar's source location is not the client's business


def test_a_bad_language_is_a_sampling_problem_before_any_parser():
    from services.engine.sampling import validate_sampling

    assert "choices" in validate_sampling(SamplingParams(structured=StructuredOutput("choice")))
    assert validate_sampling(SamplingParams(structured=COLOURS)) is None


def test_bounded_strings_become_patterns_everywhere_in_the_schema():
    schema = {"$defs": {"code": {"type": "string", "minLength": 2, "maxLength": 2}},
              "type": "object",
              "properties": {"a": {"type": "string", "maxLength": 5},
                             "b": {"type": "array", "items": {"type": "string", "minLength": 1}},
                             "kept": {"type": "string", "maxLength": 3, "pattern": "^x+$"},
                             "dated": {"type": "string", "format": "date", "maxLength": 10},
                             "maxLength": {"type": "integer"}}}
    out = bounded_strings_as_patterns(schema)
    assert out["$defs"]["code"] == {"type": "string", "pattern": r"^[\s\S]{2,2}$"}
    assert out["properties"]["a"] == {"type": "string", "pattern": r"^[\s\S]{0,5}$"}
    assert out["properties"]["b"]["items"] == {"type": "string", "pattern": r"^[\s\S]{1,}$"}
    assert out["properties"]["kept"] == schema["properties"]["kept"]
    assert out["properties"]["dated"] == schema["properties"]["dated"]
    assert out["properties"]["maxLength"] == {"type": "integer"}
    for text in ("", "ab", 'q"\\\n', "🚀🚀🚀🚀🚀"):
        assert re.fullmatch(out["properties"]["a"]["pattern"].strip("^$"), text)
    assert not re.fullmatch(out["properties"]["a"]["pattern"].strip("^$"), "abcdef")


def test_a_compiled_language_allows_exactly_its_continuations(tiny_tokenizer):
    grammars = GrammarCompiler(tiny_tokenizer, len(tiny_tokenizer), {tiny_tokenizer.eos_token_id})
    state = grammars.state(StructuredOutput("choice", choices=["yes", "no"]))
    allowed = state.allowed()
    firsts = {tiny_tokenizer.decode([t]) for t in allowed.nonzero().flatten().tolist()}
    assert firsts and all("yes".startswith(f) or "no".startswith(f) for f in firsts)
    logits = torch.zeros(len(tiny_tokenizer))
    state.mask(logits)
    assert torch.isfinite(logits).tolist() == allowed.tolist()
    for token in tiny_tokenizer.encode("no", add_special_tokens=False):
        assert not state.accept(token)
    assert state.only_end_allowed()
    assert state.accept(tiny_tokenizer.eos_token_id)
    with pytest.raises(EngineError, match="does not follow"):
        grammars.state(StructuredOutput("choice", choices=["yes", "no"]),
                       tiny_tokenizer.encode("maybe", add_special_tokens=False))


# ---- the engine ----------------------------------------------------------------------


def _holds(spec: StructuredOutput, text: str) -> None:
    if spec.kind == "json_schema":
        jsonschema.validate(json.loads(text), json.loads(spec.spec))
    elif spec.kind == "json_object":
        assert isinstance(json.loads(text), dict)
    elif spec.kind == "choice":
        assert text in spec.choices
    elif spec.kind == "regex":
        assert re.fullmatch(spec.spec, text)
    else:
        assert re.fullmatch(r"call\([a-z]{1,4}(,[a-z]{1,4}){0,2}\)", text)


@pytest.mark.parametrize("spec", [PERSON, DATE, COLOURS, CALL], ids=lambda s: s.kind)
def test_sampled_answers_of_a_random_model_hold_to_their_language(model_path, prompt, spec):
    engine = make_engine(model_path, kv_cache_tokens=4096)
    for seed in range(8):
        engine.add_request(EngineRequest(f"r{seed}", prompt, sampled(spec, seed, max_tokens=200)))
    run = drain(engine)
    for seed in range(8):
        final = run.final[f"r{seed}"]
        assert final.finish_reason == "stop", (seed, run.text[f"r{seed}"])
        _holds(spec, run.text[f"r{seed}"])
    if spec.kind == "choice":
        assert len({run.text[f"r{seed}"] for seed in range(8)}) > 1  # sampled, not forced


def test_json_mode_answers_are_json_objects(model_path, prompt):
    engine = make_engine(model_path, kv_cache_tokens=8192)
    spec = StructuredOutput("json_object", any_whitespace=False)
    for seed in range(6):  # min_p keeps a random model from spelling one long string
        engine.add_request(EngineRequest(f"r{seed}", prompt, sampled(spec, seed, max_tokens=400,
                                                                     min_p=0.2)))
    run = drain(engine)
    ended = [rid for rid, final in run.final.items() if final.finish_reason == "stop"]
    assert ended
    for rid in ended:
        _holds(spec, run.text[rid])
    for rid in run.final:
        assert run.text[rid].startswith("{")


def test_a_greedy_structured_answer_takes_the_likeliest_allowed_token(model_path, prompt):
    from services.models import load_model, load_tokenizer

    engine = make_engine(model_path, kv_cache_tokens=2048)
    engine.add_request(EngineRequest("held", prompt, SamplingParams(
        max_tokens=40, temperature=0.0, logprobs=0, structured=COLOURS)))
    run = drain(engine)
    _holds(COLOURS, run.text["held"])
    tokenizer = load_tokenizer(model_path)
    allowed = GrammarCompiler(tokenizer, engine.vocab_size, engine.eos_token_ids).state(COLOURS).allowed()
    with torch.inference_mode():
        logits = load_model(model_path, "cpu", "float32")(torch.tensor([prompt])).logits[0, -1]
    first = run.tokens["held"][0]
    assert first == int(logits.masked_fill(~allowed, float("-inf")).argmax())
    assert first != int(logits.argmax())  # the model's own first choice is no colour
    # Log-probabilities stay the model's own, not renormalised over the language.
    assert run.logprobs["held"][0].logprob == pytest.approx(
        float(torch.log_softmax(logits, -1)[first]), abs=1e-4)


def test_a_resumed_structured_request_continues_where_it_was(model_path, prompt):
    whole = make_engine(model_path, kv_cache_tokens=2048)
    whole.add_request(EngineRequest("r", prompt, sampled(PERSON, 3, max_tokens=200)))
    expected = drain(whole)
    tokens, text = expected.tokens["r"], expected.text["r"]
    assert len(tokens) > 8
    cut = len(tokens) // 2
    resumed = make_engine(model_path, kv_cache_tokens=2048)
    head = resumed.tokenizer.decode(tokens[:cut], skip_special_tokens=True)
    resumed.add_request(EngineRequest("r", prompt, sampled(PERSON, 3, max_tokens=200),
                                      resume=ResumedOutput(tokens[:cut], len(head))))
    rest, rest_text = [], ""
    while resumed.has_unfinished_requests():
        for out in resumed.step():
            rest += out.new_token_ids
            rest_text += out.new_text
    assert tokens[:cut] + rest == tokens
    assert head + rest_text == text


def test_a_resume_point_outside_the_language_is_refused(model_path, prompt):
    engine = make_engine(model_path, kv_cache_tokens=2048)
    wrong = engine.tokenizer.encode("purple", add_special_tokens=False)
    with pytest.raises(EngineError, match="does not follow"):
        engine.add_request(EngineRequest("r", prompt, sampled(COLOURS, 1),
                                         resume=ResumedOutput(wrong, 0)))
    assert not engine.has_unfinished_requests()


def test_structured_requests_recomputed_after_preemption_give_the_same_answers(model_path, prompt):
    def run_with(kv_cache_tokens: int, block_size: int = 16):
        engine = make_engine(model_path, kv_cache_tokens=kv_cache_tokens, block_size=block_size)
        for seed in range(5):
            engine.add_request(EngineRequest(f"r{seed}", prompt, sampled(PERSON, seed, max_tokens=60)))
        return engine, drain(engine)

    _, roomy = run_with(4096)
    tight_engine, tight = run_with(112, block_size=8)
    assert tight_engine.stats().num_preemptions > 0
    assert tight.tokens == roomy.tokens


@pytest.mark.parametrize("extra", [{"min_tokens": 30}, {"ignore_eos": True}], ids=str)
def test_the_end_of_the_language_ends_the_answer(model_path, prompt, extra):
    """min_tokens would forbid the only token the complete language allows, and
    ignore_eos would go on past it: the language's end wins over both."""
    engine = make_engine(model_path, kv_cache_tokens=2048)
    engine.add_request(EngineRequest("r", prompt, sampled(COLOURS, 2, max_tokens=60, **extra)))
    run = drain(engine)
    assert run.final["r"].finish_reason == "stop"
    _holds(COLOURS, run.text["r"])


def test_a_structured_request_and_a_free_one_share_a_batch(model_path, prompt):
    alone = make_engine(model_path, kv_cache_tokens=2048)
    alone.add_request(EngineRequest("free", prompt, SamplingParams(max_tokens=12, seed=9)))
    expected = drain(alone).tokens["free"]
    engine = make_engine(model_path, kv_cache_tokens=2048)
    engine.add_request(EngineRequest("free", prompt, SamplingParams(max_tokens=12, seed=9)))
    engine.add_request(EngineRequest("held", prompt, sampled(DATE, 9)))
    run = drain(engine)
    assert run.tokens["free"] == expected
    _holds(DATE, run.text["held"])


def test_a_language_compiled_off_the_step_loop_is_not_compiled_again(model_path, prompt):
    """A worker compiles on another thread (``prepare``), so a new schema never stalls the
    requests running in the step loop; the engine then takes the compiled language."""

    class Counting:
        def __init__(self, inner) -> None:
            self.inner, self.calls = inner, 0

        def compile_grammar(self, grammar):
            self.calls += 1
            return self.inner.compile_grammar(grammar)

    engine = make_engine(model_path, kv_cache_tokens=2048)
    compiler = engine._grammar_compiler()
    counting = compiler._compiler = Counting(compiler._compiler)
    request = EngineRequest("r", prompt, sampled(DATE, 1))
    worker_side = threading.Thread(target=engine.prepare, args=(request,))
    worker_side.start()
    worker_side.join()
    assert counting.calls == 1
    engine.add_request(request)
    _holds(DATE, drain(engine).text["r"])
    assert counting.calls == 1
    with pytest.raises(EngineError, match="not valid"):
        engine.prepare(EngineRequest("bad", prompt, sampled(StructuredOutput("regex", "(x"), 1)))
    engine.prepare(EngineRequest("free", prompt, SamplingParams()))  # nothing to do
    assert counting.calls == 1


def test_the_echo_engine_refuses_structured_requests(tiny_tokenizer):
    engine = EchoEngine(tiny_tokenizer, EngineConfig(kv_cache_tokens=1024), tokens_per_s=0,
                        vocab_size=len(tiny_tokenizer), max_model_len=512)
    request = EngineRequest("r", [1, 2, 3], sampled(DATE, 1))
    for take in (engine.prepare, engine.add_request):
        with pytest.raises(EngineError, match="need a model"):
            take(request)
    engine.prepare(EngineRequest("free", [1, 2, 3], SamplingParams()))


# ---- thinking first ------------------------------------------------------------------


@pytest.fixture(scope="module")
def thinking_tokenizer(model_path):
    """The tiny tokenizer with Qwen3's thinking marks as tokens of their own (added, not
    special: the text keeps them, as Qwen3's does)."""
    from services.models import load_tokenizer

    tokenizer = load_tokenizer(model_path)
    tokenizer.add_tokens(["<think>", "</think>"], special_tokens=False)
    return tokenizer


YES_NO = StructuredOutput("choice", choices=["yes", "no"])


def test_a_thinking_answer_is_free_until_its_thinking_ends(thinking_tokenizer):
    tok = thinking_tokenizer
    start, end = tok.convert_tokens_to_ids(["<think>", "</think>"])
    grammars = GrammarCompiler(tok, len(tok), {tok.eos_token_id})
    held = grammars.state(YES_NO).allowed()
    qwen3 = grammars.state(StructuredOutput("choice", choices=["yes", "no"], after_reasoning="qwen3"))
    logits = torch.zeros(len(tok))
    qwen3.mask(logits)  # its first token may open its thinking, or answer
    expected = held.clone()
    expected[start] = True
    assert torch.isfinite(logits).tolist() == expected.tolist()
    assert not qwen3.accept(start) and qwen3.phase == "thinking"
    logits = torch.zeros(len(tok))
    qwen3.mask(logits)
    assert torch.isfinite(logits).all() and not qwen3.only_end_allowed()
    for token in [*tok.encode("maybe so", add_special_tokens=False), tok.eos_token_id, end]:
        assert not qwen3.accept(token)  # thinking is free, its end included
    assert qwen3.phase == "answer"
    logits = torch.zeros(len(tok))
    qwen3.mask(logits)
    assert torch.isfinite(logits).tolist() == held.tolist()
    for token in tok.encode("no", add_special_tokens=False):
        qwen3.accept(token)
    assert qwen3.only_end_allowed()
    at_once = grammars.state(StructuredOutput("choice", choices=["yes", "no"], after_reasoning="qwen3"))
    at_once.accept(tok.encode("yes", add_special_tokens=False)[0])
    assert at_once.phase == "answer"
    r1 = StructuredOutput("choice", choices=["yes", "no"], after_reasoning="deepseek_r1")
    assert grammars.state(r1).phase == "thinking"  # the template opened it
    resumed = grammars.state(r1, [*tok.encode("hm", add_special_tokens=False), end,
                                  *tok.encode("yes", add_special_tokens=False)])
    assert resumed.phase == "answer" and resumed.only_end_allowed()


def test_without_thinking_marks_a_thinking_answer_is_held_from_its_first_token(tiny_tokenizer):
    grammars = GrammarCompiler(tiny_tokenizer, len(tiny_tokenizer), {tiny_tokenizer.eos_token_id})
    state = grammars.state(StructuredOutput("choice", choices=["yes", "no"], after_reasoning="deepseek_r1"))
    assert state.phase == "answer"


def test_an_engine_answer_thinks_then_holds_to_its_language(model_path, thinking_tokenizer, prompt):
    """The tiny model with the marks in its vocabulary: pushed to end its thinking at once
    (a bias on ``</think>``), its answer is then held to the date; without thinking first,
    the grammar never lets it write the mark."""
    from services.engine import LLMEngine
    from services.models import load_model

    tok = thinking_tokenizer
    model = load_model(model_path, "cpu", "float32")
    model.resize_token_embeddings(len(tok))
    engine = LLMEngine(model, tok, EngineConfig(kv_cache_tokens=2048), "cpu")
    start, end = tok.convert_tokens_to_ids(["<think>", "</think>"])
    think_date = StructuredOutput("regex", DATE.spec, after_reasoning="deepseek_r1")
    bias = [TokenBias(end, 100.0)]
    engine.add_request(EngineRequest("thinks", prompt, sampled(think_date, 1, max_tokens=40, logit_bias=bias)))
    engine.add_request(EngineRequest("held", prompt, sampled(DATE, 1, max_tokens=40, logit_bias=bias)))
    run = drain(engine)
    assert run.tokens["thinks"][0] == end
    thought, _, answer = run.text["thinks"].partition("</think>")
    assert thought == "" and re.fullmatch(DATE.spec, answer)
    assert end not in run.tokens["held"] and re.fullmatch(DATE.spec, run.text["held"])
    # Resumed mid-thought (on another worker): it thinks on, then answers held.
    engine.add_request(EngineRequest("resumed", prompt, sampled(think_date, 2, max_tokens=40, logit_bias=bias),
                                     resume=ResumedOutput([start, 7, 9], 0)))
    tokens, text = [], ""
    while engine.has_unfinished_requests():
        for out in engine.step():
            tokens += out.new_token_ids
            text += out.new_text
    assert tokens[0] == end and text.startswith("<think>")
    assert re.fullmatch(DATE.spec, text.partition("</think>")[2])
