"""GPU kernel benchmark: each Triton kernel vs its torch reference and the usual torch code.

    fairway bench kernels --json kernels.json          # all kernels, full grid
    fairway bench kernels --kernels lora --quick       # a few shapes

CUDA only. Per case: median milliseconds over ``--iters`` timed runs (CUDA events, after
``--warmup`` runs), rotating among enough copies of the inputs to keep the timed data out
of L2; the kernel's max abs error against the fp32 reference; speedups. Baselines:

* lora: ``loop`` is the per-adapter loop of PEFT's mixed-batch forward (row indices per
  adapter prepared ahead, two matmuls and an index_add per adapter, in the model dtype);
  ``reference`` is :func:`add_lora_reference` (the same loop in fp32).
* decode attention: ``gather_sdpa`` gathers each sequence's pages into a dense tensor and
  calls ``scaled_dot_product_attention`` (GQA); ``reference`` adds an fp32 softmax.
* rms norm: ``unfused`` is the model's code (residual add, then RMSNorm in fp32).

Goals (issue #8): multi-LoRA >= 3x the per-adapter loop at 32 adapters; decode attention
>= 2x gather + SDPA at 4k context. The summary at the end of the JSON checks both.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE = "cuda"  # tests point it at the CPU (Triton interpreter) to exercise the code paths
KERNELS = ("lora", "attention", "norm")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", dest="json_path", default=None, help="write results here")
    parser.add_argument("--kernels", default=",".join(KERNELS), help="comma list of " + "/".join(KERNELS))
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--quick", action="store_true", help="a few shapes per kernel")


# --- timing ----------------------------------------------------------------------------


def _l2_bytes() -> int:
    props = torch.cuda.get_device_properties(torch.cuda.current_device())
    return int(getattr(props, "L2_cache_size", 50 * 2**20))


def copies_to_defeat_l2(bytes_per_copy: int, limit: int = 8) -> int:
    """Input copies to rotate through so that consecutive runs do not hit in L2."""
    return max(1, min(limit, math.ceil(2 * _l2_bytes() / max(bytes_per_copy, 1))))


def time_ms(fns: list[Callable[[], Any]], warmup: int, iters: int) -> float:
    """Median CUDA-event time of one call, cycling through ``fns`` (one per input copy)."""
    for i in range(warmup):
        fns[i % len(fns)]()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        fns[i % len(fns)]()
        ends[i].record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(starts, ends))


def _max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return float((actual.float() - expected.float()).abs().max().item()) if actual.numel() else 0.0


# --- multi-LoRA ------------------------------------------------------------------------


def lora_cases(quick: bool) -> list[dict[str, Any]]:
    """Decode batches (one token per row) and a prefill batch (ragged segments)."""
    cases = []
    for hidden in (2048, 4096):
        for batch in (1, 8, 32, 128):
            for adapters in (1, 8, 32):
                if adapters > batch:
                    continue
                cases.append({"phase": "decode", "hidden": hidden, "batch": batch, "adapters": adapters,
                              "rank": 16, "distribution": "uniform"})
    cases += [
        {"phase": "decode", "hidden": 4096, "batch": 128, "adapters": 32, "rank": 64, "distribution": "uniform"},
        {"phase": "decode", "hidden": 4096, "batch": 128, "adapters": 32, "rank": 16, "distribution": "zipf"},
        {"phase": "prefill", "hidden": 4096, "batch": 8, "prompt_len": 256, "adapters": 8, "rank": 16,
         "distribution": "distinct"},
        {"phase": "prefill", "hidden": 4096, "batch": 32, "prompt_len": 128, "adapters": 32, "rank": 16,
         "distribution": "distinct"},
    ]
    if quick:
        keep = {(4096, 32, 32), (4096, 128, 32), (2048, 8, 8)}
        cases = [c for c in cases if c["phase"] == "prefill"
                 or (c["hidden"], c["batch"], c["adapters"]) in keep]
    return cases


def _adapter_per_row(case: dict[str, Any], gen: torch.Generator) -> list[int]:
    batch, adapters = case["batch"], case["adapters"]
    if case["distribution"] == "distinct":
        return [i % adapters for i in range(batch)]
    if case["distribution"] == "zipf":
        weights = 1.0 / torch.arange(1, adapters + 1, dtype=torch.float64) ** 1.1
        return torch.multinomial(weights, batch, replacement=True, generator=gen).tolist()
    picks = torch.randint(0, adapters, (batch,), generator=gen).tolist()
    picks[:adapters] = list(range(adapters))  # every adapter in the pool is used
    return picks


def bench_lora(case: dict[str, Any], dtype: torch.dtype, warmup: int, iters: int) -> dict[str, Any]:
    from services.kernels.lora import LoraSegments, add_lora_reference, add_lora_triton

    gen = torch.Generator().manual_seed(0)
    hidden, rank, num_adapters = case["hidden"], case["rank"], case["adapters"]
    per_row = _adapter_per_row(case, gen)
    rows_per_token = case.get("prompt_len", 1)
    token_adapters = [a for a in per_row for _ in range(rows_per_token)]
    num_tokens = len(token_adapters)
    device = torch.device(DEVICE)
    indices = torch.tensor(token_adapters, dtype=torch.int32, device=device)
    if case["phase"] == "prefill":
        segments = LoraSegments.from_lengths([rows_per_token] * len(per_row), per_row, device)
    else:
        segments = LoraSegments.group_tokens(token_adapters, device)
    rows = {a: torch.tensor([i for i, b in enumerate(token_adapters) if b == a], device=device)
            for a in sorted(set(token_adapters))}

    weight_bytes = 2 * num_adapters * rank * hidden * dtype.itemsize
    copies = copies_to_defeat_l2(weight_bytes + 2 * num_tokens * hidden * dtype.itemsize)
    sets = []
    for _ in range(copies):
        sets.append({
            "x": torch.randn(num_tokens, hidden, device=device, dtype=dtype),
            "y": torch.randn(num_tokens, hidden, device=device, dtype=dtype),
            "a": torch.randn(num_adapters, rank, hidden, device=device, dtype=dtype) * hidden**-0.5,
            "b": torch.randn(num_adapters, hidden, rank, device=device, dtype=dtype) * rank**-0.5,
            "scale": torch.rand(num_adapters, device=device) + 0.5,
        })

    def loop(s: dict[str, torch.Tensor]) -> torch.Tensor:
        y = s["y"]
        for adapter, idx in rows.items():
            delta = (s["x"].index_select(0, idx) @ s["a"][adapter].T) @ s["b"][adapter].T
            y.index_add_(0, idx, delta, alpha=float(s["scale_host"][adapter]))
        return y

    for s in sets:
        s["scale_host"] = s["scale"].tolist()
    methods: dict[str, Callable[[dict[str, torch.Tensor]], Any]] = {
        "bgmv": lambda s: add_lora_triton(s["y"], s["x"], s["a"], s["b"], indices, s["scale"]),
        "sgmv": lambda s: add_lora_triton(s["y"], s["x"], s["a"], s["b"], indices, s["scale"],
                                          segments=segments),
        "loop": loop,
        "reference": lambda s: add_lora_reference(s["y"], s["x"], s["a"], s["b"], indices, s["scale"]),
    }
    s0 = sets[0]
    expected = add_lora_reference(s0["y"].clone(), s0["x"], s0["a"], s0["b"], indices, s0["scale"])
    errors = {}
    for name in ("bgmv", "sgmv"):
        y0 = s0["y"].clone()
        methods[name]({**s0, "y": y0})
        errors[name] = _max_err(y0, expected)
    times = {name: time_ms([lambda s=s, fn=fn: fn(s) for s in sets], warmup, iters)
             for name, fn in methods.items()}
    best = min(times["bgmv"], times["sgmv"])
    return {
        "kernel": "lora", **case, "tokens": num_tokens, "dtype": str(dtype).removeprefix("torch."),
        "input_copies": copies, "times_ms": times, "max_abs_err": errors,
        "speedup_vs_loop": times["loop"] / best, "speedup_vs_reference": times["reference"] / best,
    }


# --- decode attention ------------------------------------------------------------------


def attention_cases(quick: bool) -> list[dict[str, Any]]:
    shapes = [(1, 1024), (1, 4096), (1, 16384), (8, 4096), (32, 4096), (64, 4096), (128, 4096),
              (8, 16384), (32, 16384), (128, 1024)]
    if quick:
        shapes = [(1, 4096), (32, 4096), (8, 16384)]
    return [{"batch": b, "context": c, "q_heads": 32, "kv_heads": 8, "head_dim": 128, "page_size": 16}
            for b, c in shapes]


def bench_attention(case: dict[str, Any], dtype: torch.dtype, warmup: int, iters: int) -> dict[str, Any]:
    from services.kernels.decode_attention import (
        paged_decode_attention_reference,
        paged_decode_attention_triton,
    )

    device = torch.device(DEVICE)
    batch, context, page = case["batch"], case["context"], case["page_size"]
    q_heads, kv_heads, head_dim = case["q_heads"], case["kv_heads"], case["head_dim"]
    pages = context // page
    num_blocks = batch * pages
    cache_bytes = 2 * num_blocks * page * kv_heads * head_dim * dtype.itemsize
    copies = copies_to_defeat_l2(cache_bytes, limit=4)
    scale = head_dim**-0.5
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    sets = []
    for _ in range(copies):
        shape = (num_blocks, page, kv_heads, head_dim)
        sets.append({
            "q": torch.randn(batch, q_heads, head_dim, device=device, dtype=dtype),
            "k": torch.randn(shape, device=device, dtype=dtype),
            "v": torch.randn(shape, device=device, dtype=dtype),
            # Pages scattered over the cache, as after a while of serving.
            "tables": torch.randperm(num_blocks, device=device).view(batch, pages).int(),
        })

    def gather_sdpa(s: dict[str, torch.Tensor]) -> torch.Tensor:
        tables = s["tables"].long()
        k = s["k"][tables].view(batch, pages * page, kv_heads, head_dim).transpose(1, 2)
        v = s["v"][tables].view(batch, pages * page, kv_heads, head_dim).transpose(1, 2)
        out = F.scaled_dot_product_attention(s["q"].unsqueeze(2), k, v, scale=scale, enable_gqa=True)
        return out.squeeze(2)

    def kernel(split_k: bool | None) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
        return lambda s: paged_decode_attention_triton(
            s["q"], s["k"], s["v"], s["tables"], lens, scale, max_context_len=context, split_k=split_k
        )

    methods = {"kernel_auto": kernel(None), "kernel_split": kernel(True),
               "kernel_nosplit": kernel(False), "gather_sdpa": gather_sdpa}
    # The fp32 reference materialises fp32 copies of every sequence's K/V: skip it when huge.
    with_reference = 4 * cache_bytes < 24 * 2**30
    if with_reference:
        methods["reference"] = lambda s: paged_decode_attention_reference(
            s["q"], s["k"], s["v"], s["tables"], lens, scale, max_context_len=context
        )
    s0 = sets[0]
    expected = (paged_decode_attention_reference(s0["q"], s0["k"], s0["v"], s0["tables"], lens, scale)
                if with_reference else gather_sdpa(s0))
    errors = {name: _max_err(methods[name](s0), expected)
              for name in ("kernel_auto", "kernel_split", "kernel_nosplit", "gather_sdpa")}
    times = {name: time_ms([lambda s=s, fn=fn: fn(s) for s in sets], warmup, iters)
             for name, fn in methods.items()}
    kv_bytes_read = batch * context * 2 * kv_heads * head_dim * dtype.itemsize
    result = {
        "kernel": "decode_attention", **case, "dtype": str(dtype).removeprefix("torch."),
        "input_copies": copies, "times_ms": times, "max_abs_err": errors,
        "errors_against": "reference" if with_reference else "gather_sdpa",
        "kernel_auto_gbps": kv_bytes_read / times["kernel_auto"] / 1e6,
        "speedup_vs_gather_sdpa": times["gather_sdpa"] / times["kernel_auto"],
    }
    if with_reference:
        result["speedup_vs_reference"] = times["reference"] / times["kernel_auto"]
    return result


# --- fused add + RMSNorm -----------------------------------------------------------------


def norm_cases(quick: bool) -> list[dict[str, Any]]:
    shapes = [(1, 4096), (32, 4096), (128, 2048), (128, 4096), (4096, 4096), (8192, 2048)]
    if quick:
        shapes = [(128, 4096), (4096, 4096)]
    return [{"tokens": t, "hidden": h} for t, h in shapes]


def bench_norm(case: dict[str, Any], dtype: torch.dtype, warmup: int, iters: int) -> dict[str, Any]:
    from services.kernels.norm import fused_add_rms_norm_reference, fused_add_rms_norm_triton

    device = torch.device(DEVICE)
    tokens, hidden = case["tokens"], case["hidden"]
    copies = copies_to_defeat_l2(4 * tokens * hidden * dtype.itemsize)
    eps = 1e-6
    sets = [{"x": torch.randn(tokens, hidden, device=device, dtype=dtype),
             "r": torch.randn(tokens, hidden, device=device, dtype=dtype),
             "w": torch.randn(hidden, device=device, dtype=dtype)} for _ in range(copies)]

    def unfused(s: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        residual = s["x"] + s["r"]
        h = residual.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        return s["w"] * h.to(dtype), residual

    methods = {
        "kernel": lambda s: fused_add_rms_norm_triton(s["x"], s["r"], s["w"], eps),
        "reference": lambda s: fused_add_rms_norm_reference(s["x"], s["r"], s["w"], eps),
        "unfused": unfused,
    }
    s0 = sets[0]
    expected = fused_add_rms_norm_reference(s0["x"], s0["r"], s0["w"], eps)
    actual = methods["kernel"](s0)
    times = {name: time_ms([lambda s=s, fn=fn: fn(s) for s in sets], warmup, iters)
             for name, fn in methods.items()}
    return {
        "kernel": "fused_add_rms_norm", **case, "dtype": str(dtype).removeprefix("torch."),
        "input_copies": copies, "times_ms": times,
        "max_abs_err": max(_max_err(a, e) for a, e in zip(actual, expected)),
        "kernel_gbps": 4 * tokens * hidden * dtype.itemsize / times["kernel"] / 1e6,
        "speedup_vs_reference": times["reference"] / times["kernel"],
        "speedup_vs_unfused": times["unfused"] / times["kernel"],
    }


# --- driver ------------------------------------------------------------------------------


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Check the issue's goals on the cases that measure them."""
    lora32 = [r["speedup_vs_loop"] for r in results if r["kernel"] == "lora" and r["adapters"] == 32]
    attn4k = [r["speedup_vs_gather_sdpa"] for r in results
              if r["kernel"] == "decode_attention" and r["context"] == 4096]
    summary: dict[str, Any] = {}
    if lora32:
        summary["lora_32_adapters_min_speedup_vs_loop"] = min(lora32)
        summary["lora_goal_3x_met"] = min(lora32) >= 3.0
    if attn4k:
        summary["attention_4k_min_speedup_vs_gather_sdpa"] = min(attn4k)
        summary["attention_goal_2x_met"] = min(attn4k) >= 2.0
    return summary


def run(args: argparse.Namespace) -> int:
    if not torch.cuda.is_available():
        print("bench kernels: needs a CUDA GPU (the Triton kernels run only there); none found",
              file=sys.stderr)
        return 1
    try:
        import triton
    except ImportError:
        print("bench kernels: needs the triton package (pip install triton)", file=sys.stderr)
        return 1
    dtype = DTYPES[args.dtype]
    wanted = [k.strip() for k in args.kernels.split(",") if k.strip()]
    unknown = set(wanted) - set(KERNELS)
    if unknown:
        print(f"bench kernels: unknown kernels {sorted(unknown)}; choose from {KERNELS}", file=sys.stderr)
        return 2
    plan = {"lora": (lora_cases, bench_lora), "attention": (attention_cases, bench_attention),
            "norm": (norm_cases, bench_norm)}
    results = []
    for name in wanted:
        make_cases, bench = plan[name]
        for case in make_cases(args.quick):
            result = bench(case, dtype, args.warmup, args.iters)
            results.append(result)
            print(json.dumps(result), file=sys.stderr, flush=True)
            torch.cuda.empty_cache()
    report = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "dtype": args.dtype,
        "warmup": args.warmup,
        "iters": args.iters,
        "results": results,
        "summary": summarize(results),
    }
    text = json.dumps(report, indent=2)
    if args.json_path:
        with open(args.json_path, "w") as f:
            f.write(text + "\n")
    print(text)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_arguments(parser)
    sys.exit(run(parser.parse_args()))


if __name__ == "__main__":
    main()
