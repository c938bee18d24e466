"""When to run a Triton kernel, and loading the kernel modules lazily.

Triton is an optional dependency: CPU workers never import it. The ``*_kernels`` modules
that hold ``@triton.jit`` functions are imported on first use, because ``triton.jit``
decides at decoration time whether a function is compiled for the GPU or run by the
interpreter (``TRITON_INTERPRET=1``). :func:`kernel_module` re-imports a module when that
setting changed since it was loaded, so tests can turn the interpreter on at any point.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import torch

_TRUE = {"1", "true", "yes", "on"}


def triton_available() -> bool:
    """Whether the ``triton`` package can be imported."""
    return importlib.util.find_spec("triton") is not None


def interpreting() -> bool:
    """Whether ``triton.jit`` functions created now run in Triton's CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in _TRUE


def use_triton(tensor: torch.Tensor) -> bool:
    """Dispatch rule of the public kernel functions: Triton on CUDA tensors, torch otherwise."""
    return tensor.is_cuda and triton_available()


def kernel_module(name: str) -> ModuleType:
    """Import ``services.kernels.<name>``, re-importing it if the interpreter setting changed."""
    if interpreting():
        _patch_interpreter_scalar_index()
    module = importlib.import_module(f"services.kernels.{name}")
    if module.INTERPRETED != interpreting():
        module = importlib.reload(module)
    return module


def _patch_interpreter_scalar_index() -> None:
    """Let Triton's interpreter use scalar tensors as loop bounds under NumPy >= 2.4.

    Triton <= 3.6 converts its 1-element scalar arrays with ``int(array)``, which NumPy 2.4
    turned into a TypeError, so ``range(0, n, BLOCK)`` over a runtime ``n`` fails in the
    interpreter (triton-lang/triton#9171, fixed upstream by #9172). Compiled kernels are
    unaffected; this wraps the interpreter's tensor patch once, only where the bug shows.
    """
    import numpy as np

    try:
        int(np.ones(1))
        return
    except TypeError:
        pass
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang_tensor", None)
    if original is None or getattr(original, "fairway_scalar_index", False):
        return

    def patched(tensor, scope) -> None:
        original(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    patched.fairway_scalar_index = True  # type: ignore[attr-defined]
    interpreter._patch_lang_tensor = patched


def enable_interpreter() -> None:
    """Run the Triton kernels on CPU tensors through Triton's interpreter (tests without a GPU).

    ``triton.jit`` picks interpreter or compiler when a function is decorated, Triton's own
    ``tl.sum``/``tl.zeros`` included, which are decorated at ``import triton``. So besides
    setting ``TRITON_INTERPRET=1``, re-import Triton's Python modules if they were imported
    without it (its compiled extension stays loaded). Call before running any kernel, and
    only in a process that uses no compiled Triton kernels.
    """
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton" not in sys.modules or _triton_stdlib_interpreted():
        return
    stale = [n for n in sys.modules if n.split(".")[0] == "triton" and not n.startswith("triton._C")]
    for name in stale:
        del sys.modules[name]
    importlib.import_module("triton")


def _triton_stdlib_interpreted() -> bool:
    from triton.language import standard
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(standard.zeros, InterpretedFunction)


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel launch as a wrapper would issue it: kernel, grid, arguments, meta-parameters."""

    kernel: Any
    grid: tuple[int, ...]
    args: tuple[Any, ...]
    meta: dict[str, Any]


_recorded: list[KernelLaunch] | None = None


def launch(kernel: Any, grid: tuple[int, ...], args: tuple[Any, ...], meta: dict[str, Any]) -> None:
    """Launch ``kernel[grid](*args, **meta)``, or record it inside :func:`record_launches`."""
    if _recorded is not None:
        _recorded.append(KernelLaunch(kernel, grid, args, meta))
        return
    kernel[grid](*args, **meta)


@contextlib.contextmanager
def record_launches() -> Iterator[list[KernelLaunch]]:
    """Record launches instead of running them (``meta``-device tensors are accepted).

    Lets :mod:`services.kernels.aot` compile exactly what the wrappers would launch,
    for a GPU target, on a machine without one.
    """
    global _recorded
    previous, _recorded = _recorded, []
    try:
        yield _recorded
    finally:
        _recorded = previous


def check_kernel_device(tensor: torch.Tensor) -> None:
    """Triton kernels need CUDA tensors, or CPU tensors under the interpreter."""
    if _recorded is not None and tensor.device.type == "meta":
        return
    if not tensor.is_cuda and not interpreting():
        raise RuntimeError(
            "Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors); "
            "call the public function to fall back to the torch reference"
        )


def next_power_of_2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)
