"""``fairway predictor {train,eval,prepare}``: train, measure and feed the length predictor.

- ``train``: JSONL(.gz) rows ``{"prompt", "output_tokens", "model"?}`` -> artifact (.npz).
- ``eval``: train on TRAIN (or load ``--artifact``), predict TEST, write metrics JSON.
  With ``--online`` each TEST row is predicted first and then learned, in file order,
  as the scorer does with real completions.
- ``prepare``: convert the AlpacaEval file of the shared data into train/test JSONL
  split by prompt (never by row), written wherever you say (keep data out of the repo).

Each subcommand exposes ``add_*_arguments(parser)`` and ``run_*(args) -> int``; the
``eval`` pair is also exported as ``add_arguments`` / ``run``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import random
import sys
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from scipy import stats

from services.logs import get_logger
from services.scorer.predictor import LengthPredictor

log = get_logger(__name__)

BUCKET_WIDTH = 128
BUCKET_COUNT = 8
"""S3-style buckets (Jin et al. 2023 classify lengths into equal-width ranges of the
maximum length): [0,128), [128,256), ... [896, inf) with the defaults."""
ONLINE_WARMUP = 500


def read_jsonl(path: str | Path) -> Iterator[dict]:
    """Rows of a .jsonl or .jsonl.gz file (blank lines skipped)."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                yield json.loads(line)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> int:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    count = 0
    with opener(path, "wt", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
            count += 1
    return count


def normalize_record(row: dict) -> dict:
    """Accept the predictor format or the AlpacaEval shared-data format."""
    if "prompt" in row and "output_tokens" in row:
        out = {"prompt": str(row["prompt"]), "output_tokens": int(row["output_tokens"])}
    elif "instruction" in row and "output_tokens_llama2" in row:
        out = {"prompt": str(row["instruction"]), "output_tokens": int(row["output_tokens_llama2"])}
    else:
        raise ValueError(
            "row has neither prompt/output_tokens nor instruction/output_tokens_llama2: "
            f"{sorted(row)}"
        )
    if row.get("model"):
        out["model"] = str(row["model"])
    return out


def load_records(path: str | Path, model: str | None = None) -> list[dict]:
    rows = [normalize_record(r) for r in read_jsonl(path)]
    if model is not None:
        rows = [r for r in rows if r.get("model") == model]
    return rows


def bucket(tokens: float, width: int = BUCKET_WIDTH, count: int = BUCKET_COUNT) -> int:
    return min(int(max(tokens, 0.0) // width), count - 1)


def metrics(actual: list[float], p10: list[float], p50: list[float], p90: list[float]) -> dict:
    """Ranking, error, interval and bucket metrics of predictions against real lengths."""
    y, lo, mid, hi = (np.asarray(v, dtype=float) for v in (actual, p10, p50, p90))
    n = len(y)
    if n == 0:
        return {"n": 0}
    tau = stats.kendalltau(mid, y).statistic if n > 1 else float("nan")
    rho = stats.spearmanr(mid, y).statistic if n > 1 else float("nan")
    return {
        "n": n,
        "kendall_tau": _finite(tau),
        "spearman": _finite(rho),
        "mae_tokens": float(np.mean(np.abs(mid - y))),
        "p10_p90_coverage": float(np.mean((lo <= y) & (y <= hi))),
        "below_p10": float(np.mean(y < lo)),
        "above_p90": float(np.mean(y > hi)),
        "bucket_accuracy": float(np.mean([bucket(a) == bucket(b) for a, b in zip(y, mid)])),
        "mean_actual_tokens": float(y.mean()),
        "mean_p50_tokens": float(mid.mean()),
    }


def _finite(value: float) -> float | None:
    return float(value) if value is not None and math.isfinite(value) else None


def evaluate(
    predictor: LengthPredictor,
    test: list[dict],
    *,
    online: bool = False,
    warmup: int = ONLINE_WARMUP,
) -> dict:
    """Predict every test row (and learn after each one when ``online``); return metrics."""
    actual: list[float] = []
    quantiles: list[tuple[float, float, float]] = []
    models: list[str] = []
    predict_ms: list[float] = []
    observe_ms: list[float] = []
    for row in test:
        model = row.get("model", "")
        start = time.perf_counter()
        pred = predictor.predict(row["prompt"], model)
        predict_ms.append((time.perf_counter() - start) * 1000)
        if online:
            start = time.perf_counter()
            predictor.observe(row["prompt"], model, row["output_tokens"], features=pred.features)
            observe_ms.append((time.perf_counter() - start) * 1000)
        actual.append(row["output_tokens"])
        quantiles.append((pred.p10, pred.p50, pred.p90))
        models.append(model)

    def subset(idx: list[int]) -> dict:
        return metrics(
            [actual[i] for i in idx], *([quantiles[i][k] for i in idx] for k in range(3))
        )

    result = subset(list(range(len(actual))))
    result["online"] = online
    result["ms_per_request_p50"] = float(np.percentile(predict_ms, 50)) if predict_ms else None
    result["ms_per_request_p99"] = float(np.percentile(predict_ms, 99)) if predict_ms else None
    if online:
        result["ms_per_observe_p50"] = float(np.percentile(observe_ms, 50)) if observe_ms else None
        by_position: dict[str, list[int]] = defaultdict(list)
        for i, model in enumerate(models):
            by_position[model].append(i)
        after = [i for idx in by_position.values() for i in idx[warmup:]]
        result[f"after_{warmup}_updates"] = subset(sorted(after))
    per_model: dict[str, list[int]] = defaultdict(list)
    for i, model in enumerate(models):
        per_model[model].append(i)
    if len(per_model) > 1 or "" not in per_model:
        result["per_model"] = {m or "(none)": subset(idx) for m, idx in sorted(per_model.items())}
    return result


# --- eval ---------------------------------------------------------------------------


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fairway predictor eval``."""
    parser.add_argument("--train", type=Path, help="training JSONL(.gz); omit to use --artifact")
    parser.add_argument("--artifact", type=Path, help="load this artifact instead of training")
    parser.add_argument("--test", type=Path, required=True, help="test JSONL(.gz)")
    parser.add_argument(
        "--online", action="store_true", help="predict, then learn, each test row in order"
    )
    parser.add_argument("--model", help="only test rows of this served model")
    parser.add_argument("--json", type=Path, help="write the metrics here (also printed)")
    parser.add_argument(
        "--warmup",
        type=int,
        default=ONLINE_WARMUP,
        help="online: report metrics after this many updates per model",
    )
    parser.add_argument(
        "--embedding",
        action="store_true",
        help="opt-in MiniLM sentence embedding (~10-25 ms/request)",
    )


def run(args: argparse.Namespace) -> int:
    """``fairway predictor eval``: returns the process exit code."""
    if args.train is not None:
        start = time.perf_counter()
        predictor = LengthPredictor.train(load_records(args.train), embedding=args.embedding)
        train_s = time.perf_counter() - start
    else:
        predictor = (
            LengthPredictor.load(args.artifact) if args.artifact else LengthPredictor.default()
        )
        train_s = 0.0
    test = load_records(args.test, args.model)
    if not test:
        print(
            f"no test rows in {args.test}" + (f" for model {args.model}" if args.model else ""),
            file=sys.stderr,
        )
        return 2
    result = evaluate(predictor, test, online=args.online, warmup=args.warmup)
    result.update(
        train=str(args.train or args.artifact or "default artifact"),
        test=str(args.test),
        model=args.model,
        train_seconds=round(train_s, 3),
        artifact_id=predictor.artifact_id,
        embedding=predictor.meta.get("embedding"),
    )
    text = json.dumps(result, indent=2, sort_keys=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")
    print(text)
    return 0


# --- train --------------------------------------------------------------------------


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fairway predictor train``."""
    parser.add_argument("--train", type=Path, required=True, help="training JSONL(.gz)")
    parser.add_argument("--out", type=Path, required=True, help="artifact path (.npz)")
    parser.add_argument("--model", help="train only on rows of this served model")
    parser.add_argument(
        "--embedding",
        action="store_true",
        help="opt-in MiniLM sentence embedding (~10-25 ms/request)",
    )


def run_train(args: argparse.Namespace) -> int:
    """``fairway predictor train``: returns the process exit code."""
    records = load_records(args.train, args.model)
    if not records:
        print(f"no training rows in {args.train}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    predictor = LengthPredictor.train(records, embedding=args.embedding)
    predictor.save(args.out)
    log.info(
        "predictor_trained",
        rows=len(records),
        prompts=predictor.meta.get("prompts"),
        artifact=str(args.out),
        artifact_id=predictor.artifact_id,
        bytes=args.out.stat().st_size,
        seconds=round(time.perf_counter() - start, 2),
    )
    return 0


# --- prepare ------------------------------------------------------------------------


def split_by_prompt(
    rows: list[dict], test_fraction: float, seed: int
) -> tuple[list[dict], list[dict]]:
    """Split rows so that all rows of one prompt land on the same side."""
    prompts = sorted({r["prompt"] for r in rows})
    random.Random(seed).shuffle(prompts)
    n_test = round(len(prompts) * test_fraction)
    test_prompts = set(prompts[:n_test])
    train = [r for r in rows if r["prompt"] not in test_prompts]
    test = [r for r in rows if r["prompt"] in test_prompts]
    return train, test


def add_prepare_arguments(parser: argparse.ArgumentParser) -> None:
    """Arguments of ``fairway predictor prepare``."""
    parser.add_argument(
        "--source",
        type=Path,
        required=True,
        help="e.g. shared/data/alpaca_eval_model_outputs_train.jsonl.gz",
    )
    parser.add_argument(
        "--out-dir",
        type=Path,
        required=True,
        help="where train.jsonl and test.jsonl go (outside the repo)",
    )
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)


def run_prepare(args: argparse.Namespace) -> int:
    """``fairway predictor prepare``: AlpacaEval rows -> predictor JSONL, split by prompt."""
    rows = [normalize_record(r) for r in read_jsonl(args.source)]
    train, test = split_by_prompt(rows, args.test_fraction, args.seed)
    n_train = write_jsonl(args.out_dir / "train.jsonl", train)
    n_test = write_jsonl(args.out_dir / "test.jsonl", test)
    print(
        json.dumps(
            {
                "train_rows": n_train,
                "test_rows": n_test,
                "train_prompts": len({r["prompt"] for r in train}),
                "test_prompts": len({r["prompt"] for r in test}),
                "out_dir": str(args.out_dir),
            }
        )
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m services.scorer.evaluate {train,eval,prepare} ...``."""
    parser = argparse.ArgumentParser(prog="fairway predictor")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, add, handler in (
        ("eval", add_arguments, run),
        ("train", add_train_arguments, run_train),
        ("prepare", add_prepare_arguments, run_prepare),
    ):
        sub_parser = sub.add_parser(name)
        add(sub_parser)
        sub_parser.set_defaults(handler=handler)
    args = parser.parse_args(argv)
    return args.handler(args)


if __name__ == "__main__":
    raise SystemExit(main())
