"""Build the length-predictor artifact shipped in ``services/scorer/artifacts/``.

Reads the AlpacaEval training split of the shared data (644 prompts x 13 models; the
file's own held-out prompts are never in it), converts it to predictor rows and
trains on all of it. Optionally also writes a by-prompt train/test split for
validation to a directory outside the repository:

    python scripts/train_predictor.py                       # rebuild the artifact
    python scripts/train_predictor.py --split-dir /tmp/pred # + /tmp/pred/{train,test}.jsonl
    python -m services.scorer.evaluate eval --train /tmp/pred/train.jsonl \\
        --test /tmp/pred/test.jsonl --model Meta-Llama-3-8B-Instruct --json /tmp/pred/eval.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from services.scorer.evaluate import normalize_record, read_jsonl, split_by_prompt, write_jsonl
from services.scorer.predictor import DEFAULT_ARTIFACT, LengthPredictor

SHARED_DATA = ROOT.parent / "shared" / "data" / "alpaca_eval_model_outputs_train.jsonl.gz"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", type=Path, default=SHARED_DATA)
    parser.add_argument("--out", type=Path, default=DEFAULT_ARTIFACT)
    parser.add_argument(
        "--split-dir", type=Path, help="also write a by-prompt train/test split here"
    )
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rows = [normalize_record(r) for r in read_jsonl(args.source)]
    if args.split_dir:
        train, test = split_by_prompt(rows, args.test_fraction, args.seed)
        write_jsonl(args.split_dir / "train.jsonl", train)
        write_jsonl(args.split_dir / "test.jsonl", test)
        print(f"split: {len(train)} train rows, {len(test)} test rows -> {args.split_dir}")
    predictor = LengthPredictor.train(rows)
    predictor.meta["source"] = args.source.name
    predictor.save(args.out)
    size = args.out.stat().st_size
    print(
        f"artifact {predictor.artifact_id}: {len(rows)} rows, {predictor.meta['prompts']} prompts"
    )
    print(f"written to {args.out} ({size} bytes)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
