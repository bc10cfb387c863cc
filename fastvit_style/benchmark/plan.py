"""What a benchmark run covers: its config, the backends it may name, and the variants and cases that
config expands to (run by fastvit_style.benchmark.runner)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..backends import BACKENDS, unavailable_reason

WORKLOADS = ("stylize", "stylize-roll", "augment", "tta", "train")
FAST_BACKENDS = ("torch", "triton", "xformers")
DTYPES = ("fp32", "bf16")  # bf16: torch.autocast, the weights stay fp32


@dataclass(frozen=True)
class Backend:
    """factory(model) returns what the workloads call in place of the StylizingViT (same forward).
    official: run the workloads the official way (explicit-roll augment, K forwards for TTA).
    error: why a 'module:factory' backend could not be loaded (its rows are then `unavailable`)."""

    name: str
    factory: Callable | None
    official: bool = False
    error: str | None = None

    def unavailable(self, device: torch.device) -> str | None:
        if self.error:
            return self.error
        return unavailable_reason(self.name, device) if self.name in BACKENDS else None


def _builtin(name: str) -> Backend:
    def factory(model):
        model.backend = name
        return model

    return Backend(name, factory, official=name == "reference")


_REGISTRY: dict[str, Backend] = {}


def register_backend(name: str, factory: Callable, official: bool = False) -> None:
    """Make `name` usable in `backends`. Tests register deliberately wrong ones to check the parity gate."""
    _REGISTRY[name] = Backend(name, factory, official)


def get_backend(name: str) -> Backend:
    """A registered name, a built-in backend, or 'package.module:factory'."""
    if name in _REGISTRY:
        return _REGISTRY[name]
    if name in BACKENDS and name != "auto":
        return _builtin(name)
    if ":" in name:
        module, attr = name.split(":", 1)
        try:
            return Backend(name, getattr(importlib.import_module(module), attr))
        except (ImportError, AttributeError) as e:
            return Backend(name, None, error=f"cannot load {name!r} ({type(e).__name__}: {e})")
    raise ValueError(
        f"unknown backend {name!r}: use one of {BACKENDS[1:]}, a registered name, or 'module:factory'"
    )


@dataclass(frozen=True)
class Variant:
    backend: Backend
    dtype: str  # "fp32" or "bf16" (torch.autocast; the weights stay fp32)
    compile: bool

    @property
    def baseline(self) -> bool:
        """The official computation as the official code runs it: every ratio is taken against it."""
        return self.backend.name == "reference" and self.dtype == "fp32" and not self.compile

    @property
    def official_bf16_compiled(self) -> bool:
        return self.backend.official and self.dtype == "bf16" and self.compile


@dataclass
class BenchConfig:
    device: str = "cpu"
    backbones: tuple[str, ...] = ("tiny",)
    workloads: tuple[str, ...] = WORKLOADS
    batch_sizes: dict[str, list[int]] = field(default_factory=lambda: {w: [2] for w in WORKLOADS})
    dtypes: tuple[str, ...] = ("fp32",)
    backends: tuple[str, ...] = ("reference", "torch")
    compile_backends: tuple[str, ...] = ()  # also timed under torch.compile ...
    compile_dtypes: tuple[str, ...] = ("fp32", "bf16")  # ... in these of `dtypes`
    compile_every_size: bool = False  # ... at every batch size (else at each workload's largest only)
    repeats: int = 3
    warmup: int = 0  # calls after the first one (which is always made: it is the parity check)
    interleave: bool = False  # time the variants of a case round-robin (robust to a busy CPU)
    budget_s: float | None = None  # variants that would start later are recorded as skipped
    model_kwargs: dict = field(default_factory=dict)
    tta_k: int = 8
    augment_p: float = 0.33
    seed: int = 0


def plan_variants(cfg: BenchConfig) -> tuple[list[Variant], list[Variant]]:
    """(eager, compiled) variants. The official computation runs in fp32 eager (the baseline, also
    when `dtypes` has no fp32) and, compiled, in bf16: the strongest version of the official code."""
    eager, compiled = [], []
    for name in cfg.backends:
        backend = get_backend(name)
        if backend.official:  # the baseline of every ratio, whatever `dtypes` holds
            eager.append(Variant(backend, "fp32", False))
        for dtype in cfg.dtypes:
            if not backend.official:
                eager.append(Variant(backend, dtype, False))
            if (
                name in cfg.compile_backends
                and dtype in cfg.compile_dtypes
                and (not backend.official or dtype == "bf16")
            ):
                compiled.append(Variant(backend, dtype, True))
    eager.sort(key=lambda v: not v.baseline)
    compiled.sort(key=lambda v: (not v.backend.official, v.dtype == "fp32"))
    return eager, compiled


def plan_cases(cfg: BenchConfig) -> list[tuple[str, str, int, bool]]:
    """(backbone, workload, batch, compiled variants too?): compiling is slow, so compiled variants run
    at the largest batch of each workload only, unless compile_every_size."""
    return [
        (backbone, w, batch, cfg.compile_every_size or batch == max(cfg.batch_sizes[w]))
        for backbone in cfg.backbones
        for w in cfg.workloads
        for batch in cfg.batch_sizes[w]
    ]


def plan_passes(cfg: BenchConfig) -> list[tuple[int, list[Variant]]]:
    """(index into plan_cases(cfg), variants), in the order they run: each case's eager variants, then the
    compiled ones. Timed one after another, the compiled variants go one at a time over every case, the
    official computation's first: a --budget then cuts the fast compiled rows (whose eager rows ran)
    before any compiled baseline. Interleaved, each case's compiled variants run together (timed
    round-robin, they must all be prepared first)."""
    eager, compiled = plan_variants(cfg)
    cases = plan_cases(cfg)
    with_compiled = [i for i, (*_, compiled_too) in enumerate(cases) if compiled_too and compiled]
    passes = [(i, eager) for i in range(len(cases))]
    if cfg.interleave:
        return passes + [(i, compiled) for i in with_compiled]
    return passes + [(i, [v]) for v in compiled for i in with_compiled]


def plan_size(cfg: BenchConfig) -> int:
    return sum(len(variants) for _, variants in plan_passes(cfg))
