"""Engine benchmark script; the same as ``fairway bench engine`` (see services/benchmark/engine.py)."""

from services.benchmark.engine import main

if __name__ == "__main__":
    main()
