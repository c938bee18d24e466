"""Compile the Triton kernels for a CUDA GPU without one, and report their resource use.

    python -m services.kernels.aot --arch 90 --arch 80 [--quick] [--json OUT.json]

The interpreter tests check what the kernels compute; this checks that they compile for
Hopper (sm_90) and Ampere (sm_80) and how they would run there: registers per thread,
bytes spilled to the stack, shared memory per program. Each public ``*_triton`` function
is called on ``meta`` tensors for representative serving shapes while launches are
recorded (:func:`services.kernels._triton.record_launches`); every recorded launch is then
compiled with ``triton.compile`` for the target, its arguments specialised the way
Triton's JIT does (integers equal to 1 become constants; multiples of 16 and tensor
pointers get 16-divisibility hints). Needs compiled kernels: run without TRITON_INTERPRET.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from services.kernels._triton import KernelLaunch, interpreting, record_launches

# Shared memory one program may use, per compute capability (CUDA programming guide).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

_TYPE_NAMES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
    torch.int32: "i32", torch.int64: "i64",
}


@dataclass(frozen=True)
class CompileReport:
    case: str
    kernel: str
    arch: int
    num_warps: int
    num_stages: int
    registers: int | None
    spill_bytes: int | None
    shared_bytes: int

    def within_limits(self) -> bool:
        return (self.spill_bytes in (0, None)
                and self.shared_bytes <= SHARED_MEMORY_LIMIT.get(self.arch, 99 * 1024))


def _specialise(fn, launch: KernelLaunch) -> tuple[dict, dict, dict]:
    """Signature, constants and attributes as Triton's JIT derives them from the arguments."""
    names = list(fn.arg_names)
    bound = dict(zip(names, launch.args))
    bound.update({k: v for k, v in launch.meta.items() if k in names})
    signature: dict[str, str] = {}
    constants: dict[str, object] = {}
    attrs: dict[tuple[int, ...], list] = {}
    for i, name in enumerate(names):
        value = bound[name]
        if fn.params[i].is_constexpr:
            signature[name] = "constexpr"
            constants[name] = value
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPE_NAMES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, bool):
            signature[name] = "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[name] = "constexpr"
                constants[name] = 1
            else:
                signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
                if value % 16 == 0:
                    attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"cannot specialise argument {name}={value!r}")
    return signature, constants, attrs


def _resource_usage(cubin: bytes) -> tuple[int | None, int | None]:
    """(registers, stack bytes) from the cuobjdump bundled with Triton, if present."""
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    if not os.path.exists(tool):
        return None, None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True,
                              text=True, check=True).stdout
    match = re.search(r"REG:(\d+) STACK:(\d+)", text)
    return (int(match.group(1)), int(match.group(2))) if match else (None, None)


def compile_launch(launch: KernelLaunch, arch: int, case: str) -> CompileReport:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = launch.kernel
    signature, constants, attrs = _specialise(fn, launch)
    options = {k: v for k, v in launch.meta.items() if k in ("num_warps", "num_stages")}
    compiled = triton.compile(ASTSource(fn, signature, constants, attrs),
                              target=GPUTarget("cuda", arch, 32), options=options)
    registers, spill = _resource_usage(compiled.asm["cubin"])
    return CompileReport(
        case=case, kernel=fn.__name__, arch=arch,
        num_warps=compiled.metadata.num_warps, num_stages=compiled.metadata.num_stages,
        registers=registers, spill_bytes=spill, shared_bytes=compiled.metadata.shared,
    )


def _meta(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.empty(*shape, dtype=dtype, device="meta")


def representative_cases(quick: bool) -> dict[str, Callable[[], object]]:
    """Named calls of the public Triton functions on serving-sized ``meta`` tensors."""
    from services.kernels.decode_attention import paged_decode_attention_triton
    from services.kernels.lora import LoraSegments, add_lora_triton
    from services.kernels.norm import fused_add_rms_norm_triton, rms_norm_triton

    cases: dict[str, Callable[[], object]] = {}
    dtypes = [torch.bfloat16] if quick else [torch.bfloat16, torch.float16, torch.float32]
    ranks = [16, 64] if quick else [8, 16, 64, 128]
    hidden = 4096
    for dtype in dtypes:
        for rank in ranks:
            def lora(mode: str, dtype: torch.dtype = dtype, rank: int = rank) -> None:
                tokens = 512 if mode == "prefill" else 32
                x, y = _meta(tokens, hidden, dtype=dtype), _meta(tokens, hidden, dtype=dtype)
                a, b = _meta(8, rank, hidden, dtype=dtype), _meta(8, hidden, rank, dtype=dtype)
                idx, scale = _meta(tokens, dtype=torch.int32), _meta(8, dtype=torch.float32)
                per_token = [i % 8 for i in range(tokens)]
                segments = {"bgmv": None,
                            "sgmv": LoraSegments.group_tokens(per_token, "meta"),
                            "prefill": LoraSegments.from_lengths([300, 212], [1, 2], "meta")}[mode]
                add_lora_triton(y, x, a, b, idx, scale, segments=segments)

            for mode in ("bgmv", "sgmv", "prefill"):
                cases[f"lora-{mode}-r{rank}-{_TYPE_NAMES[dtype]}"] = lambda m=mode, f=lora: f(m)

    attention_shapes = [(32, 8, 128, 16), (32, 8, 128, 32)]
    if not quick:
        attention_shapes += [(8, 8, 128, 16), (32, 4, 128, 16), (16, 2, 64, 16), (14, 2, 64, 32)]
    for dtype in dtypes:
        for q_heads, kv_heads, head_dim, page in attention_shapes:
            for split in (False, True):
                def attention(dtype=dtype, q_heads=q_heads, kv_heads=kv_heads, head_dim=head_dim,
                              page=page, split=split) -> None:
                    seqs, blocks = 4, 256
                    paged_decode_attention_triton(
                        _meta(seqs, q_heads, head_dim, dtype=dtype),
                        _meta(1024, page, kv_heads, head_dim, dtype=dtype),
                        _meta(1024, page, kv_heads, head_dim, dtype=dtype),
                        _meta(seqs, blocks, dtype=torch.int32), _meta(seqs, dtype=torch.int32),
                        head_dim**-0.5, split_k=split,
                    )

                name = f"attention-h{q_heads}/{kv_heads}-d{head_dim}-p{page}-split{int(split)}"
                cases[f"{name}-{_TYPE_NAMES[dtype]}"] = attention

    for dtype in dtypes:
        for hidden_size in ([4096] if quick else [2048, 4096, 8192]):
            x = _meta(64, hidden_size, dtype=dtype)
            w = _meta(hidden_size, dtype=dtype)
            suffix = f"{hidden_size}-{_TYPE_NAMES[dtype]}"
            cases[f"fused-add-rms-norm-{suffix}"] = lambda x=x, w=w: fused_add_rms_norm_triton(x, x, w, 1e-6)
            cases[f"rms-norm-{suffix}"] = lambda x=x, w=w: rms_norm_triton(x, w, 1e-6)
    return cases


def compile_all(archs: list[int], quick: bool, only: str = "") -> list[CompileReport]:
    if interpreting():
        raise RuntimeError("TRITON_INTERPRET is set: unset it to compile the kernels")
    reports = []
    for case, call in representative_cases(quick).items():
        if only not in case:
            continue
        with record_launches() as launches:
            call()
        for launch in launches:
            for arch in archs:
                reports.append(compile_launch(launch, arch, case))
    return reports


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, action="append", help="compute capability, e.g. 90 or 80")
    parser.add_argument("--quick", action="store_true", help="bf16 and a few shapes only")
    parser.add_argument("--only", default="", help="cases whose name contains this")
    parser.add_argument("--json", dest="json_path", help="write the reports here ('-' for stdout)")
    args = parser.parse_args(argv)
    reports = compile_all(args.arch or [90, 80], args.quick, args.only)
    if args.json_path == "-":
        print(json.dumps([asdict(r) for r in reports]))
    else:
        if args.json_path:
            with open(args.json_path, "w") as f:
                json.dump([asdict(r) for r in reports], f, indent=2)
        for r in reports:
            flag = "" if r.within_limits() else "  <-- over limits"
            print(f"sm_{r.arch} {r.kernel:24s} {r.case:44s} warps={r.num_warps} stages={r.num_stages} "
                  f"regs={r.registers} spill={r.spill_bytes} shared={r.shared_bytes}{flag}")
    return 0 if all(r.within_limits() for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
