"""Timing and peak memory of benchmark steps: warm-up apart, repetitions, median and p20/p80."""

from __future__ import annotations

import resource
import time

import numpy as np
import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work: a host clock read after it times the work, not its launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cpu_peak_reset() -> bool:
    """Reset the process's peak RSS (VmHWM) so that a peak belongs to the calls that follow (Linux only)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _cpu_peak_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kB on Linux; never reset


class Call:
    """Runs one call of a step and measures it: device time (CUDA events, since host clocks would time
    only the launches), host window (for telemetry) and peak memory (CUDA allocator, else peak RSS)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __call__(self, fn):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            t0 = time.monotonic()
            start.record()
            out = fn()
            end.record()
            end.synchronize()
            ms = start.elapsed_time(end)
            peak = torch.cuda.max_memory_allocated()
        else:
            _cpu_peak_reset()
            t0 = time.monotonic()
            out = fn()
            ms = (time.monotonic() - t0) * 1e3
            peak = _cpu_peak_bytes()
        return out, ms, (t0, time.monotonic()), peak


def warm_up(fn, call: Call, extra: int):
    """The first call (its output kept for the parity check, its time separately: it holds compilation),
    then `extra` more calls. Returns (first output, first-call seconds, whole warm-up seconds)."""
    t0 = time.monotonic()
    out, ms, _, _ = call(fn)
    for _ in range(extra):
        call(fn)
    return out, ms / 1e3, time.monotonic() - t0


def repeat(fns: list, call: Call, repeats: int) -> list[dict]:
    """Time `repeats` calls of each step. With several steps the calls are interleaved (a, b, a, b, ...)
    so that load from other processes falls on all of them alike. One record per step."""
    records = [{"times_ms": [], "windows": [], "peak_mem_bytes": 0} for _ in fns]
    for _ in range(repeats):
        for fn, rec in zip(fns, records):
            _, ms, window, peak = call(fn)
            rec["times_ms"].append(ms)
            rec["windows"].append(window)
            rec["peak_mem_bytes"] = max(rec["peak_mem_bytes"], peak)
    return records


def summarize(times_ms: list[float]) -> dict:
    """Median and p20/p80; also the minimum, the estimate least disturbed by other processes."""
    p0, p20, p50, p80 = np.percentile(np.asarray(times_ms), [0, 20, 50, 80])
    return {"median_ms": float(p50), "p20_ms": float(p20), "p80_ms": float(p80), "min_ms": float(p0)}
