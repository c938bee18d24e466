"""Kernel benchmark script; the same as ``fairway bench kernels`` (see services/benchmark/kernels.py)."""

from services.benchmark.kernels import main

if __name__ == "__main__":
    main()
