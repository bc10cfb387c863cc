"""pytest-benchmark settings for the GPU micro-benchmarks (`pytest bench/ --benchmark-only`).

Not part of the default test run (pytest's testpaths is tests/). Without CUDA every benchmark is
skipped: they time kernels on the device, and the Triton interpreter would time numpy instead.
"""

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="the micro-benchmarks time CUDA kernels: no CUDA device here")
    for item in items:  # the session's items: those of tests/ too when both folders are run together
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(skip)


@pytest.fixture
def cuda_benchmark(benchmark):
    """cuda_benchmark(fn): pytest-benchmark reads a host clock, so each round ends with a device
    synchronize; the first call (autotuning, compilation) happens before any round."""

    def run(fn):
        def synced():
            out = fn()
            torch.cuda.synchronize()
            return out

        synced()
        return benchmark.pedantic(synced, rounds=30, iterations=1, warmup_rounds=3)

    return run
