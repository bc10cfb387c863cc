"""The benchmark loop: backbones x workloads x batch sizes x backend variants.

Each variant's first call is checked against the official computation (fp32, reference backend) on
the same weights and inputs before anything is timed: a variant that disagrees is reported failed and
not timed. Out-of-memory and any other error are recorded on the row and the run goes on.
"""

from __future__ import annotations

import contextlib
import copy
import gc
import math
import time
from collections.abc import Callable
from dataclasses import asdict

import torch

from . import flops, timing
from .parity import GRAD_TOLERANCE, TOLERANCE, compare, no_tf32
from .plan import BenchConfig, Variant, plan_cases, plan_passes
from .telemetry import Telemetry
from .workloads import make_workloads


def run_benchmark(cfg: BenchConfig, on_result: Callable[[dict | None, dict], None] | None = None) -> dict:
    """Runs the plan; returns {"device", "config", "results", "telemetry"}.
    on_result(row, run so far) is called as each row becomes final, and with row None at the start
    (device and config known) and as each variant starts (named by run["in_flight"]), so that a run
    killed mid-variant leaves a record of what it was doing.

    All eager variants run first, then the compiled ones (minutes of compilation each on a GPU), so
    that a --budget cuts the slowest-to-warm-up variants first (order: plan.plan_passes)."""
    if cfg.repeats < 1 or cfg.warmup < 0:  # no timed call: no median to report
        raise ValueError(
            f"repeats must be at least 1 and warmup at least 0, got {cfg.repeats} and {cfg.warmup}"
        )
    device = torch.device(cfg.device)
    # CUDA events, synchronize and the peak-memory counters act on the current device: make it the
    # benchmarked one (with --device cuda:1 they would time and measure cuda:0).
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        return _run(cfg, device, on_result)


def _run(cfg: BenchConfig, device: torch.device, on_result) -> dict:
    from .report import describe_device

    peak = flops.bf16_matmul_flops(device)
    run = {
        "device": {**describe_device(device), "bf16_matmul_flops": peak},
        "config": asdict(cfg),
        "results": [],
        "telemetry": None,
        "in_flight": None,
    }

    def starting(row: dict) -> None:
        run["in_flight"] = {
            k: row[k] for k in ("workload", "backbone", "batch_size", "dtype", "backend", "compile")
        }
        if on_result:
            on_result(None, run)

    if on_result:
        on_result(None, run)
    workloads = make_workloads(cfg.tta_k, cfg.augment_p)
    deadline = math.inf if cfg.budget_s is None else time.monotonic() + cfg.budget_s
    telemetry = Telemetry(device)
    cases = [
        _Case(cfg, device, workloads[w], workloads, backbone, batch, peak, telemetry)
        for backbone, w, batch, _ in plan_cases(cfg)
    ]
    passes = plan_passes(cfg)
    last_pass = {index: n for n, (index, _) in enumerate(passes)}  # a case is built once, for all its passes
    with telemetry:
        for n, (index, variants) in enumerate(passes):
            for row in cases[index].run(variants, deadline, starting):
                run["results"].append(row)
                if on_result:
                    on_result(row, run)
            if last_pass[index] == n:
                cases[index].release()
    run["telemetry"], run["in_flight"] = telemetry.to_json(), None
    return run


def _is_oom(exc: BaseException | str) -> bool:
    text = str(exc).lower()
    return isinstance(exc, MemoryError) or "out of memory" in text or "not enough memory" in text


class _Case:
    """One (workload, backbone, batch): weights, inputs and reference outputs shared by its variants,
    built on first use; its rows accumulate over the eager and compiled passes."""

    def __init__(self, cfg, device, workload, workloads, backbone, batch, peak, telemetry):
        self.cfg, self.device, self.workload, self.telemetry, self.peak = (
            cfg,
            device,
            workload,
            telemetry,
            peak,
        )
        self.call = timing.Call(device)
        self.key = {"workload": workload.name, "backbone": backbone, "batch_size": batch}
        self.images = workload.images(batch)
        self.variants, self.rows = [], []
        self.expected_cache: dict = {}
        self.base = self.inputs = self.setup_error = None
        try:
            self.flops = flops.flops_per_image(workload, workloads, backbone, cfg.model_kwargs, batch)
        except Exception:  # a configuration the counter cannot trace still gets timed
            self.flops = None

    def _ready(self) -> bool:
        """Build the weights and inputs if needed; False (with setup_error) if that failed."""
        from fastvit_style import StylizingViT

        if self.base is not None or self.setup_error is not None:
            return self.setup_error is None
        cfg, w = self.cfg, self.workload
        try:
            torch.manual_seed(cfg.seed)
            gen = torch.Generator().manual_seed(cfg.seed)
            model = StylizingViT(self.key["backbone"], train=w.train, backend="reference", **cfg.model_kwargs)
            if w.train:  # timed, not trained: its VGG19's values do not matter
                model.vgg_encoder.warn_if_random = False
            self.base = model.to(self.device)
            self.inputs = w.inputs(model.config, self.key["batch_size"], self.device, gen)
        except Exception as exc:
            self.setup_error = f"building the model and inputs: {type(exc).__name__}: {exc}"
        return self.setup_error is None

    def release(self) -> None:
        """Free the weights, inputs and reference outputs (the rows stay); a later pass rebuilds them
        from the same seed."""
        self.base = self.inputs = None
        self.expected_cache.clear()
        self._cleanup()

    def run(self, variants: list[Variant], deadline: float, starting: Callable[[dict], None]):
        """Yields each row when it is final (with interleaved timing, the timed ones at the end);
        starting(row) before a variant's model is built."""
        rows = [self._row(v) for v in variants]
        if self.cfg.interleave and any(v.compile for v in variants):
            # Every compiled variant of the case is prepared before any is timed: one reset for them all
            # (one per variant would drop the others' compiled code, recompiled inside timed calls),
            # and room for each one's guards on the shared code objects.
            torch._dynamo.reset()
            torch._dynamo.config.recompile_limit = max(
                torch._dynamo.config.recompile_limit, 2 * len(variants)
            )
        self.variants += variants
        self.rows += rows
        pending = []
        for v, row in zip(variants, rows):
            if time.monotonic() > deadline:
                row.update(status="skipped", reason="over the time budget (--budget)")
            elif reason := v.backend.unavailable(self.device):
                row.update(status="unavailable", reason=reason)
            elif not self._ready():
                row.update(status="oom" if _is_oom(self.setup_error) else "failed", reason=self.setup_error)
            else:
                starting(row)
                if (step := self._prepare(v, row)) is not None:
                    if self.cfg.interleave:
                        pending.append((row, step))
                        continue
                    self._time([(row, step)])
                    del step
            self._cleanup()  # here, not in an except block, whose traceback would keep the tensors alive
            _ratios(self.variants, self.rows)
            yield row
        if pending:
            self._time(pending)
            timed = [row for row, _ in pending]
            del pending
            self._cleanup()
            _ratios(self.variants, self.rows)
            yield from timed

    def _row(self, v: Variant) -> dict:
        return {
            **self.key, "dtype": v.dtype, "backend": v.backend.name, "compile": v.compile,
            "status": None, "reason": "", "tolerance": TOLERANCE[(v.dtype, self.device.type)], "tolerances": None,
            "max_abs_err": None, "rel_err": None, "errors": None, "official_own_err": None,
            "median_ms": None, "p20_ms": None, "p80_ms": None, "min_ms": None, "times_ms": None,
            "images": self.images, "images_per_s": None, "speedup_vs_reference": None,
            "speedup_vs_reference_bf16_compile": None, "peak_mem_bytes": None, "first_call_s": None,
            "warmup_s": None, "flops_per_image": self.flops, "mfu": None, "telemetry": None,
        }  # fmt: skip

    def _prepare(self, v: Variant, row: dict):
        """Build the variant's step, warm it up and check its first output; the step if it passed."""
        w = self.workload
        if v.compile and not self.cfg.interleave:
            torch._dynamo.reset()  # fresh caches: every variant compiles its own model object
        amp = self._amp(v.dtype)
        try:
            model = v.backend.factory(copy.deepcopy(self.base))
            step = w.step(
                model, self.inputs, v.backend.official, amp, torch.compile if v.compile else (lambda f: f)
            )
            out, first_s, warm_s = timing.warm_up(step, self.call, self.cfg.warmup)
            row.update(first_call_s=first_s, warmup_s=warm_s, reason="")
            if v.baseline:  # the official computation's own first output is the reference
                self.expected_cache.setdefault((w.parity_key(out), "fp32"), w.compared(out))
            errors = compare(out, self._expected(out, "fp32"))
            grad_limit = GRAD_TOLERANCE[(v.dtype, self.device.type)]
            limits = {k: grad_limit if k == "grads" else row["tolerance"] for k in errors}
            twin = "bf16" if v.dtype == "bf16" else "fp32-no-tf32" if self.device.type == "cuda" else None
            if twin:
                own = compare(self._expected(out, twin), self._expected(out, "fp32"))
                # An official twin gone non-finite moves no limit: an infinite one would pass any output.
                limits = {k: max(limit, 2 * own[k][1]) if math.isfinite(own[k][1]) else limit
                          for k, limit in limits.items()}  # fmt: skip
                row["official_own_err"] = {k: r for k, (_, r) in own.items()}
        except Exception as exc:
            self._fail(row, exc, "first call")
            return None
        row.update(max_abs_err=max(a for a, _ in errors.values()), rel_err=max(r for _, r in errors.values()),
                   errors={k: r for k, (_, r) in errors.items()}, tolerances=limits)  # fmt: skip
        bad = [f"{k} {r:.3g} > {limits[k]:.3g}" for k, (_, r) in errors.items() if not r <= limits[k]]
        if bad:
            row.update(
                status="failed",
                reason=f"disagrees with the reference (relative error {'; '.join(bad)}); not timed",
            )
            return None
        return step

    def _amp(self, dtype: str):
        """The context a step runs under: 'fp32', 'bf16' (autocast) or 'fp32-no-tf32' (for twins)."""
        if dtype == "bf16":
            return lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)
        return no_tf32 if dtype == "fp32-no-tf32" else contextlib.nullcontext

    def _expected(self, out: dict, dtype: str) -> dict:
        """The official computation's output (eager, under `dtype`, see _amp) for the draw behind
        `out`; cached."""
        key = (self.workload.parity_key(out), dtype)
        if key not in self.expected_cache:
            self.expected_cache[key] = self.workload.expected(self.base, self.inputs, out, self._amp(dtype))
        return self.expected_cache[key]

    def _time(self, prepared):
        try:
            records = timing.repeat([s for _, s in prepared], self.call, self.cfg.repeats)
        except Exception as exc:
            for row, _ in prepared:
                self._fail(row, exc, "timed calls")
            return
        for (row, _), rec in zip(prepared, records):
            stats = timing.summarize(rec["times_ms"])
            ips = self.images / (stats["median_ms"] / 1e3)
            row.update(status="ok", **stats, images_per_s=ips, peak_mem_bytes=rec["peak_mem_bytes"],
                       times_ms=[round(t, 4) for t in rec["times_ms"]],  # the raw numbers
                       telemetry=self.telemetry.summary(rec["windows"]))  # fmt: skip
            if self.flops and self.peak:
                row["mfu"] = self.flops * ips / self.peak

    def _fail(self, row, exc, where):
        status = "oom" if _is_oom(exc) else "failed"
        row.update(status=status, reason=f"{where}: {type(exc).__name__}: {str(exc).strip()[:400]}")

    def _cleanup(self):
        gc.collect()
        if self.device.type == "cuda":
            # A kernel that faulted (an illegal memory access) leaves the context failing every call,
            # this one too: its row keeps the error and the run goes on, the later rows failing alike.
            with contextlib.suppress(RuntimeError):
                torch.cuda.empty_cache()


def _ratios(variants: list[Variant], rows: list[dict]) -> None:
    """Speedups of the finished rows of one case over its two official baselines, where they ran."""

    def median(pick):
        return next((r["median_ms"] for v, r in zip(variants, rows) if pick(v) and r["status"] == "ok"), None)

    ref, ref_bc = median(lambda v: v.baseline), median(lambda v: v.official_bf16_compiled)
    for r in rows:
        if r["status"] == "ok":
            r["speedup_vs_reference"] = ref / r["median_ms"] if ref else None
            r["speedup_vs_reference_bf16_compile"] = ref_bc / r["median_ms"] if ref_bc else None
