"""The Triton kernels compile for Hopper (sm_90) and Ampere (sm_80) without spilling.

No GPU needed: ``services.kernels.aot`` records the launches the wrappers would issue for
serving-sized shapes and compiles them with Triton's bundled ptxas. It runs in a
subprocess because the other kernel tests switch this process to Triton's interpreter.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")

PTXAS = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not PTXAS.exists(), reason="this triton build bundles no ptxas")
def test_kernels_compile_for_hopper_and_ampere_without_spills() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "services.kernels.aot", "--quick", "--arch", "90", "--arch", "80",
         "--json", "-"],
        check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240,
    )
    assert proc.stdout, proc.stderr[-3000:]
    reports = json.loads(proc.stdout.strip().splitlines()[-1])
    kernels = {r["kernel"] for r in reports}
    assert kernels == {
        "bgmv_shrink_kernel", "bgmv_expand_kernel", "sgmv_shrink_kernel", "sgmv_expand_kernel",
        "decode_partition_kernel", "decode_reduce_kernel", "rms_norm_kernel",
    }
    assert {r["arch"] for r in reports} == {80, 90}
    over = [r for r in reports if r["spill_bytes"] not in (0, None)]
    assert not over, over
    assert proc.returncode == 0, proc.stderr[-3000:]
