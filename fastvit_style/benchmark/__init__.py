"""Engine behind `fastvit-style bench`: the official computation against the fast backends, timed.

plan: the config and what it expands to (backends, variants, cases); runner: the loop, parity before
timing; parity: the comparison with the official computation and its tolerances;
workloads: what one timed step does; timing: repetitions and statistics; flops: FLOPs and MFU;
telemetry: GPU sampler; report: table, JSON and plot; cli: the command-line flags; official: the
official package as a backend.
"""

from .plan import BenchConfig, register_backend
from .runner import run_benchmark

__all__ = ["BenchConfig", "register_backend", "run_benchmark"]
