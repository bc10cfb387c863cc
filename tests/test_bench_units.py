"""The benchmark's arithmetic without timing anything real: FLOP counts, clocks and statistics, what a
timed step runs, the parity measure, telemetry, table, JSON and the CLI's config. End to end:
tests/test_bench_smoke.py."""

import argparse
import contextlib
import datetime
import math
import os
import types

import pytest
import torch

from fastvit_style.benchmark import cli, flops, parity, report, timing
from fastvit_style.benchmark.telemetry import Telemetry
from fastvit_style.benchmark.workloads import make_workloads
from fastvit_style.cli import main

TOY = {"input_size": 32, "encoder_depth": 2}  # as in test_bench_smoke.py

pytestmark = pytest.mark.usefixtures("one_thread")


def test_flops_per_image_are_the_official_computations_by_hand():
    """What torch's counter counts (matmuls and convolutions, 2 FLOPs a multiply-add) of the official
    step, per content image; tiny at TOY size: L = 192, D = 2 layers, 32 px, P = 16 -> N = 4 patches,
    T = 5 tokens, rank K = 2."""
    L, D, P, C, H = 192, 2, 16, 3, 32
    N = (H // P) ** 2
    T, K = N + 1, L // (2 * C * P)
    # One block call: q, k, v projections, q k^T and A v, out_proj, MLP L -> 4L -> L.
    block = 3 * 2 * T * L * L + 2 * 2 * T * T * L + 2 * T * L * L + 2 * 2 * T * L * 4 * L
    embed = 2 * N * L * C * P * P  # patch convolution
    # Bottleneck L -> 4L -> L, the rank-K products, the 5x5 post convolution.
    head = 2 * 2 * T * L * 4 * L + 2 * N * C * P * K * P + 2 * H * H * C * C * 5 * 5
    stylize = 4 * D * block + 2 * embed + head  # 4 block calls a layer; content and style embedded
    # VGG19's 16 convolutions at 32, 16, 8, 4 and 2 px (the losses read up to the last one).
    vgg_layers = (
        (32, [(3, 64), (64, 64)]),
        (16, [(64, 128), (128, 128)]),
        (8, [(128, 256)] + [(256, 256)] * 3),
        (4, [(256, 512)] + [(512, 512)] * 3),
        (2, [(512, 512)] * 4),
    )
    vgg = 2 * 9 * sum(side * side * a * b for side, pairs in vgg_layers for a, b in pairs)
    encoder = stylize + 2 * head  # training also reconstructs x and x_style
    workloads = make_workloads(tta_k=3, augment_p=0.33)
    for batch in (3, 8):  # per image whatever the batch (counted once at batch 2)

        def count(name, batch=batch):
            return flops.flops_per_image(workloads[name], workloads, "tiny", TOY, batch)

        assert count("stylize") == count("stylize-roll") == stylize  # the official roll embeds x_style too
        assert count("tta") == 3 * stylize  # K forwards per test image
        assert count("augment") == stylize * max(1, int(0.33 * batch)) / batch  # 1 of 3, 2 of 8 stylized
        # Five VGG passes forward, the backward to the input of the three with gradients (frozen VGG: as
        # many FLOPs as their forward) and through the encoder (input and weight gradients, less the
        # unused last re-anchor call and the images' own gradient: between 1x and 2x its forward).
        assert 8 * vgg + 2 * encoder < count("train") < 8 * vgg + 3 * encoder


class _FakeCuda:
    """torch.cuda's events, synchronize and peak-memory counters on a CPU machine. An event completes
    when it, or one recorded after it, is synchronized (or the device is); elapsed_time between events
    not both complete raises, as CUDA's does."""

    def __init__(self, monkeypatch, elapsed_ms: float, peak: int = 0):
        self.log, self.recorded, self.completed = [], 0, 0
        fake = self

        class Event:
            def __init__(self, enable_timing=False):
                assert enable_timing
                self.seq = None

            def record(self):
                fake.recorded += 1
                self.seq = fake.recorded
                fake.log.append("record")

            def synchronize(self):
                fake.completed = max(fake.completed, self.seq)

            def elapsed_time(self, end):
                if max(self.seq, end.seq) > fake.completed:
                    raise RuntimeError("CUDA error: device not ready")
                return elapsed_ms

        def synchronize():
            fake.completed = fake.recorded
            fake.log.append("synchronize")

        monkeypatch.setattr(torch.cuda, "Event", Event)
        monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
        monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda: fake.log.append("reset peak"))
        monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda: peak)


def test_a_cuda_call_is_timed_by_events_read_once_complete(monkeypatch):
    cuda = _FakeCuda(monkeypatch, elapsed_ms=7.5, peak=1234)

    def fn():
        cuda.log.append("fn")
        return "out"

    out, ms, (t0, t1), peak = timing.Call(torch.device("cuda"))(fn)
    assert (out, ms, peak) == ("out", 7.5, 1234) and t0 <= t1
    # The peak counter is reset before the call, and the events bracket it.
    assert cuda.log.index("reset peak") < cuda.log.index("record") < cuda.log.index("fn")
    assert cuda.log[cuda.log.index("fn") + 1] == "record"


def test_the_matmul_rate_is_flops_over_seconds(monkeypatch):
    """2 N^3 FLOPs per matmul, `repeats` of them between the events (whose time is in ms)."""
    _FakeCuda(monkeypatch, elapsed_ms=250.0)
    monkeypatch.setattr(flops, "MATMUL_N", 8)
    randn = torch.randn
    monkeypatch.setattr(torch, "randn", lambda *shape, device=None, dtype=None: randn(*shape, dtype=dtype))
    assert flops.bf16_matmul_flops(torch.device("cuda"), repeats=10, warmup_s=0) == 2 * 8**3 * 10 / 0.25


def test_the_matmul_rate_is_timed_after_a_warm_up_by_time(monkeypatch):
    """Matmuls in synchronized groups until warmup_s has passed (a fake clock: 0.4 s a group), then the
    timed ones: an idle GPU's clocks need the time, not a number of calls."""
    cuda = _FakeCuda(monkeypatch, elapsed_ms=250.0)
    clock = types.SimpleNamespace(now=0.0, matmuls=0)
    monkeypatch.setattr(flops, "time", types.SimpleNamespace(monotonic=lambda: clock.now))
    monkeypatch.setattr(flops, "MATMUL_N", 8)

    class Matrix:
        def __matmul__(self, other):
            clock.matmuls += 1
            clock.now += 0.04

    monkeypatch.setattr(torch, "randn", lambda *shape, device=None, dtype=None: Matrix())
    flops.bf16_matmul_flops(torch.device("cuda"), repeats=10, warmup_s=1.0)
    assert clock.matmuls == 3 * 10 + 10  # ceil(1.0 / 0.4) groups of warm-up, then the timed 10
    assert cuda.log.count("synchronize") == 3
    assert flops.bf16_matmul_flops(torch.device("cpu")) is None


def test_cpu_calls_warm_up_and_repeats_on_a_fake_clock(monkeypatch):
    """Each step advances a fake clock by a known time: the call measures it, the warm-up makes its
    extra calls and reports the first one apart (in seconds), repetitions interleave the steps and keep
    each one's times and the largest peak memory of its calls."""
    clock = types.SimpleNamespace(now=100.0)
    monkeypatch.setattr(timing, "time", types.SimpleNamespace(monotonic=lambda: clock.now))
    peaks = iter([5, 50, 9, 40, 7, 45, 0])
    monkeypatch.setattr(timing, "_cpu_peak_reset", lambda: True)
    monkeypatch.setattr(timing, "_cpu_peak_bytes", lambda: next(peaks))
    calls = []

    def step(name, durations_ms):
        durations = iter(durations_ms)

        def fn():
            calls.append(name)
            clock.now += next(durations) / 1e3
            return name

        return fn

    call = timing.Call(torch.device("cpu"))
    out, ms, (t0, t1), peak = call(step("a", [5]))
    assert (out, ms, t0, t1, peak) == ("a", pytest.approx(5), 100.0, pytest.approx(100.005), 5)

    calls.clear()
    out, first_s, warm_s = timing.warm_up(step("b", [7, 3, 3]), call, extra=2)
    assert calls == ["b"] * 3 and out == "b"
    assert first_s == pytest.approx(0.007) and warm_s == pytest.approx(0.013)

    calls.clear()
    peaks = iter([5, 50, 9, 40, 7, 45])
    records = timing.repeat([step("a", [3, 1, 2]), step("b", [10, 30, 20])], call, 3)
    assert calls == ["a", "b"] * 3
    assert [r["times_ms"] for r in records] == [pytest.approx([3, 1, 2]), pytest.approx([10, 30, 20])]
    assert [r["peak_mem_bytes"] for r in records] == [9, 50]
    assert [len(r["windows"]) for r in records] == [3, 3]


def test_summary_is_the_median_with_p20_p80_and_minimum():
    stats = timing.summarize([4.0, 1.0, 100.0, 2.0, 3.0])
    assert stats == {
        "median_ms": 3.0,
        "p20_ms": pytest.approx(1.8),
        "p80_ms": pytest.approx(23.2),
        "min_ms": 1.0,
    }


@pytest.mark.parametrize("official", [True, False], ids=["official", "fast"])
@pytest.mark.parametrize("name", ["stylize", "stylize-roll", "augment", "tta", "train"])
def test_a_timed_step_runs_under_its_precision_and_its_compiled_callable(monkeypatch, name, official):
    """Every call of a step enters the variant's precision context and goes through what compile_fn
    returned (else a bf16 or compiled row would time fp32 eager code); TTA's bank is built with the
    step, never inside a timed call; a training step runs its backward and its optimizer step."""
    from fastvit_style import StylizingViT
    from fastvit_style.benchmark import workloads as wl

    w = make_workloads(tta_k=2)[name]
    model = StylizingViT("tiny", train=w.train, backend="reference" if official else "torch", **TOY)
    if w.train:
        model.vgg_encoder.warn_if_random = False
    inputs = w.inputs(model.config, 3, "cpu", torch.Generator().manual_seed(0))
    amp_entries, compiled_calls, banks = [], [], []

    def amp():
        amp_entries.append(1)
        return contextlib.nullcontext()

    def compile_fn(f):
        def compiled(*args, **kwargs):
            compiled_calls.append(1)
            return f(*args, **kwargs)

        return compiled

    from_images = wl.StyleBank.from_images
    monkeypatch.setattr(
        wl.StyleBank,
        "from_images",
        classmethod(lambda cls, *a, **kw: banks.append(1) or from_images(*a, **kw)),
    )
    step = w.step(model, inputs, official, amp, compile_fn)
    built = len(banks)
    before = [p.detach().clone() for p in model.parameters() if p.requires_grad]
    amp_entries.clear()
    for _ in range(2):
        out = step()
    assert len(amp_entries) >= 2 and len(compiled_calls) >= 2
    assert len(banks) == built == (name == "tta" and not official)
    if w.train:
        assert sum(g.abs().sum() for g in out["grads"]) > 0  # the backward ran
        after = [p.detach() for p in model.parameters() if p.requires_grad]
        assert any(not torch.equal(a, b) for a, b in zip(after, before))  # and AdamW stepped


def test_compare_is_relative_to_the_reference_and_never_passes_non_finite_outputs():
    ref = torch.tensor([1.0, -4.0, 2.0])
    assert parity.compare({"out": torch.tensor([1.0, -3.0, 2.0])}, {"out": ref}) == {"out": (1.0, 0.25)}
    for bad in (float("nan"), float("inf")):
        assert parity.compare({"out": torch.tensor([1.0, bad, 2.0])}, {"out": ref})["out"][1] == math.inf
        # in the reference too: its NaN would drop out of the max-norm, and the 4.0 off with it
        off = parity.compare({"out": torch.tensor([5.0, 0.0, 2.0])}, {"out": torch.tensor([1.0, bad, 2.0])})
        assert off["out"][1] == math.inf
    # Gradients: the L2 norm of the error over all tensors, over the reference's: 4 / 5 (max-norm: 4 / 4).
    got, expected = (
        [torch.tensor([4.0, 3.0]), torch.tensor([4.0])],
        [torch.tensor([0.0, 3.0]), torch.tensor([4.0])],
    )
    assert parity.compare({"grads": got}, {"grads": expected}) == {"grads": (4.0, pytest.approx(0.8))}
    with pytest.raises(ValueError):  # one tensor missing
        parity.compare({"grads": got[:1]}, {"grads": expected})
    with pytest.raises(ValueError, match="shape"):
        parity.compare({"out": ref[:2]}, {"out": ref})


def test_telemetry_summarises_the_samples_inside_the_timed_windows():
    t = Telemetry(torch.device("cpu"))
    assert t.summary([(0.0, 10.0)]) is None and t.to_json() == {"reason": "CPU run: no GPU to sample"}
    # (time s, memory used, power W, SM clock MHz, utilisation %)
    t.samples = [(0.5, 100, 50.0, 1000, 10), (1.5, 900, 500.0, 2000, 100), (2.5, 300, 150.0, 1500, 30),
                 (3.5, 200, 250.0, 1700, 50)]  # fmt: skip
    assert t.summary([(0.0, 1.0), (2.0, 4.0)]) == {
        "samples": 3,
        "memory_used_max_bytes": 300,
        "power_w_mean": 150.0,
        "sm_clock_mhz_mean": pytest.approx(1400),
        "gpu_util_mean": 30.0,
    }


def test_table_row_units():
    row = {"workload": "train", "backbone": "base", "batch_size": 32, "dtype": "bf16", "backend": "triton",
           "compile": True, "status": "ok", "rel_err": 1.234e-3, "median_ms": 250.0, "p20_ms": 240.0,
           "p80_ms": 260.04, "images_per_s": 128.0, "speedup_vs_reference": 3.456,
           "speedup_vs_reference_bf16_compile": 1.5, "peak_mem_bytes": 3 * 2**30, "warmup_s": 61.26,
           "mfu": 0.4213}  # fmt: skip
    assert report.table_row(row) == ("train", "base", "32", "bf16", "triton+compile", "ok", "1.2e-03",
                                     "250.0 [240.0-260.0]", "128.0", "3.46", "1.50", "3072", "61.3",
                                     "42.1%")  # fmt: skip


def test_the_json_is_replaced_whole_or_not_at_all(tmp_path):
    path = tmp_path / "run_bench.json"
    report.write_json(str(path), {"results": [1]}, {"git": {"commit": "abc"}})
    before = path.read_text()

    class Unprintable:
        def __str__(self):
            raise RuntimeError("killed mid-write")

    with pytest.raises(RuntimeError, match="killed mid-write"):
        report.write_json(str(path), {"results": [1, Unprintable()]}, {"git": {"commit": "abc"}})
    assert path.read_text() == before and os.listdir(tmp_path) == ["run_bench.json"]


def test_the_environment_names_commit_time_and_threads(monkeypatch):
    monkeypatch.setattr(report, "source_hash", lambda: "f" * 64)
    monkeypatch.setenv("FASTVIT_STYLE_GIT_COMMIT", "0123abc")  # no full commit: kept, but not as one
    assert report.environment()["git"] == {
        "commit": "unknown",
        "dirty": None,
        "given": "0123abc",
        "sources": "f" * 64,
    }
    monkeypatch.setenv("FASTVIT_STYLE_GIT_COMMIT", "0123abc" * 5 + "01234")
    env = report.environment()
    assert env["git"] == {"commit": "0123abc" * 5 + "01234", "dirty": None, "sources": "f" * 64}
    assert datetime.datetime.fromisoformat(env["time_utc"]).utcoffset() == datetime.timedelta(0)
    device = report.describe_device(torch.device("cpu"))
    assert device["type"] == "cpu" and device["name"] and device["threads"] == torch.get_num_threads()

    monkeypatch.delenv("FASTVIT_STYLE_GIT_COMMIT")
    status = {"out": ""}

    def git(cmd, **kwargs):
        # Untracked files (result JSONs not yet committed) leave a checkout clean.
        assert cmd[1] != "status" or "--untracked-files=no" in cmd
        return types.SimpleNamespace(
            returncode=0, stdout={"rev-parse": "0123abc\n", "status": status["out"]}[cmd[1]]
        )

    monkeypatch.setattr(report.subprocess, "run", git)
    assert report.git_commit() == {"commit": "0123abc", "dirty": False, "sources": "f" * 64}
    status["out"] = " M fastvit_style/model.py\n"
    assert report.git_commit() == {"commit": "0123abc", "dirty": True, "sources": "f" * 64}


def test_the_source_hash_follows_the_python_sources_only(tmp_path):
    for path, text in (
        ("fastvit_style/a.py", "x = 1"),
        ("kernels/k.py", "y = 2"),
        ("fastvit_style/n.txt", ""),
    ):
        (tmp_path / path).parent.mkdir(exist_ok=True)
        (tmp_path / path).write_text(text)
    (tmp_path / "fastvit_style" / "kernels").symlink_to(tmp_path / "kernels")  # as a checkout links it
    before = report.source_hash(str(tmp_path))
    assert len(before) == 64 and before == report.source_hash(str(tmp_path))
    (tmp_path / "fastvit_style" / "n.txt").write_text("notes")
    assert report.source_hash(str(tmp_path)) == before
    (tmp_path / "kernels" / "k.py").write_text("y = 3")
    assert report.source_hash(str(tmp_path)) != before


def _args(*argv):
    p = argparse.ArgumentParser()
    cli.add_arguments(p)
    return p.parse_args(list(argv))


def test_cli_defaults_per_device(monkeypatch):
    cpu = cli.config_from_args(_args("--device", "cpu"))
    # Triton on CPU only when named (its interpreter would time numpy); no compile on CPU.
    assert cpu.backends[0] == "reference" and "torch" in cpu.backends and "triton" not in cpu.backends
    assert (cpu.repeats, cpu.warmup, cpu.interleave, cpu.compile_backends) == (3, 0, True, ())
    assert (cpu.dtypes, cpu.backbones, cpu.batch_sizes) == (("fp32",), ("tiny",), cli.DEFAULT_BATCHES["cpu"])

    monkeypatch.setattr(cli, "resolve_device", lambda name: torch.device("cuda", 0))
    cuda = cli.config_from_args(_args())
    assert (cuda.repeats, cuda.warmup, cuda.interleave) == (10, 2, False)
    assert (cuda.dtypes, cuda.compile_dtypes, cuda.backbones) == (("fp32", "bf16"), ("bf16",), ("base",))
    assert cuda.compile_backends == cuda.backends and cuda.batch_sizes == cli.DEFAULT_BATCHES["cuda"]
    quick = cli.config_from_args(_args("--quick"))
    assert (quick.repeats, quick.warmup, quick.compile_backends) == (5, 1, ())


def test_cli_flags_reach_the_config():
    argv = ["--device", "cpu", "--workloads", "tta,train", "--backends", "torch,reference",
            "--batch-sizes", "4,2", "--repeats", "7", "--warmup", "4", "--no-interleave", "--compile",
            "--compile-backends", "reference", "--budget", "12", "--tta-k", "3", "--augment-p", "0.5",
            "--seed", "9"]  # fmt: skip
    cfg = cli.config_from_args(_args(*argv))
    assert (cfg.workloads, cfg.backends, cfg.batch_sizes) == (("tta", "train"), ("torch", "reference"),
                                                              {"tta": [4, 2], "train": [4, 2]})  # fmt: skip
    assert (cfg.repeats, cfg.warmup, cfg.interleave, cfg.compile_backends) == (7, 4, False, ("reference",))
    assert (cfg.budget_s, cfg.tta_k, cfg.augment_p, cfg.seed) == (12, 3, 0.5, 9)


def test_threads_sets_torchs_thread_count_for_the_run(monkeypatch, tmp_path):
    seen = []

    def run_benchmark(cfg, on_result):
        seen.append(torch.get_num_threads())
        return {"device": {}, "config": {}, "results": [], "telemetry": None, "in_flight": None}

    monkeypatch.setattr(cli, "run_benchmark", run_benchmark)
    threads = torch.get_num_threads()
    try:
        assert main(["bench", "--device", "cpu", "--threads", "2", "--out", str(tmp_path)]) == 0
    finally:
        torch.set_num_threads(threads)
    assert seen == [2]


def _script(name: str):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "bench" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_train_script_ratio_excludes_its_warm_up(monkeypatch):
    """bench/train_cpu.py, its steps' times faked (the first of each path slow, as a warm-up is): the
    median of the timed steps only, images/s = B over it, the speedup the reference's time over the fast."""
    train_cpu = _script("train_cpu")
    steps = {}

    def step(self, x):
        n = steps[self.net.backend] = steps.get(self.net.backend, 0) + 1
        return 100.0 if n == 1 else {"auto": 1.0, "reference": 3.0}[self.net.backend]

    monkeypatch.setattr(train_cpu.Stepper, "step", step)
    monkeypatch.setattr(train_cpu, "StylizingViT", _StubModel)
    report_ = train_cpu.main(["--batch", "2", "--steps", "1", "--warmup", "1"])
    assert steps == {"auto": 2, "reference": 2}
    fast = report_["results"]["fast"]
    assert fast["all_step_seconds"] == [1.0] and fast["images_per_s"] == 2.0
    assert report_["fast_over_reference"] == 3.0
    assert (
        report_["git"]["sources"] and datetime.datetime.fromisoformat(report_["date"]).utcoffset() is not None
    )


class _StubModel(torch.nn.Module):
    """What the scripts build in place of a StylizingViT when their timing is faked."""

    def __init__(self, backbone, train=False, backend="auto", input_size=224):
        super().__init__()
        self.backend, self.head = backend, torch.nn.Linear(1, 1)
        self.vgg_encoder = types.SimpleNamespace()


def test_tta_script_rates_per_test_image(monkeypatch):
    """bench/tta_cpu.py, its timing faked: test images per second (B, not B x K views) at the median
    round and speedups over the reference and over K forwards; every round's seconds, the date and
    the commit kept."""
    tta_cpu = _script("tta_cpu")
    seconds = {
        "bank": [0.5, 9.0, 0.4],
        "fast-fwd": [1.0] * 3,
        "reference": [2.0] * 3,
        "reference-K": [4.0] * 3,
    }
    monkeypatch.setattr(tta_cpu, "StylizingViT", _StubModel)
    monkeypatch.setattr(tta_cpu.StyleBank, "from_images", lambda model, refs: types.SimpleNamespace(nbytes=0))
    monkeypatch.setattr(
        tta_cpu, "timed", lambda fns, device, repeats: (seconds, {n: torch.ones(6, 3) for n in fns})
    )
    report_ = tta_cpu.main(["--batch", "2", "--k", "3"])
    results = report_["results"]
    assert results["bank"]["images_per_s"] == 4.0 and results["reference"]["images_per_s"] == 1.0
    assert results["bank"]["speedup_vs_reference"] == 4.0 and results["bank"]["speedup_vs_k_forwards"] == 8.0
    assert results["bank"]["all_seconds"] == [0.5, 9.0, 0.4]
    assert (
        report_["git"]["sources"] and datetime.datetime.fromisoformat(report_["date"]).utcoffset() is not None
    )


@pytest.mark.parametrize(
    "option, message",
    [
        (["--size", "48"], "--size: must be a multiple of 32"),  # a 3-px last stage: Winograd's tiles crashed
        (["--repeats", "0"], "--repeats: must be at least 1"),  # no median: StatisticsError after a layer
        (["--batch", "0"], "--batch: must be at least 1"),
        (["--threads", "0"], "--threads: must be at least 1"),  # was ignored
    ],
)
def test_vgg_script_refuses_values_it_cannot_time_with(capsys, option, message):
    """bench/vgg_cpu.py names the value it expected before timing anything."""
    vgg_cpu = _script("vgg_cpu")
    with pytest.raises(SystemExit) as exit_:
        vgg_cpu.main(["--size", "32", "--batch", "1", "--repeats", "1", *option])
    assert exit_.value.code == 2 and message in capsys.readouterr().err


@pytest.mark.parametrize(
    "script, argv, flag",
    [
        ("train_cpu", ["--batch", "-1"], "--batch"),  # was a RuntimeError about a negative dimension
        ("profile_shared_attention", ["--host", "--batch", "0"], "--batch"),  # timed empty work
        ("profile_shared_attention", ["--host", "--heads", "0"], "--heads"),
        ("sweep_shared_attention", ["--dry-run", "--batches", "8", "0"], "--batches"),  # a plan of 0 GFLOP
        ("sweep_shared_attention", ["--dry-run", "--flex-heads", "0"], "--flex-heads"),
    ],
)
def test_bench_scripts_refuse_sizes_below_one(capsys, script, argv, flag):
    """A batch or head count below 1 is refused by the parser, naming the flag and the least value."""
    module = _script(script)
    with pytest.raises(SystemExit) as exit_:
        (module.parse_args if hasattr(module, "parse_args") else module.main)(argv)
    assert exit_.value.code == 2 and f"argument {flag}: must be at least 1" in capsys.readouterr().err


@pytest.mark.parametrize("train_speedup, status", [(1.9, 0), (1.6, 1)])
def test_cpu_speed_script_holds_the_targets(monkeypatch, capsys, train_speedup, status):
    """bench/cpu_speed.py, its run faked: the targets of bench/README.md (eval explicit styles 1.15x,
    roll 1.5x, training step 1.9x), read from the fast rows' speedups; a miss exits 1."""
    cpu_speed = _script("cpu_speed")
    speedups = {"stylize": 1.15, "stylize-roll": 1.5, "train": train_speedup}

    def run_benchmark(cfg, on_result):
        assert (cfg.backends, cfg.interleave, cfg.warmup) == (("reference", "torch"), True, 0)
        rows = [{"workload": w, "backend": b, "speedup_vs_reference": 1.0 if b == "reference" else s,
                 "min_ms": 2.0 if b == "reference" else 1.0, "status": "ok"}
                for w, s in speedups.items() for b in ("reference", "torch")]  # fmt: skip
        run = {"results": [], "device": {}}
        on_result(None, run)  # as runner.run_benchmark: at the start and as each variant starts
        for row in rows:
            on_result(None, run)
            run["results"].append(row)
            on_result(row, run)
        return run

    monkeypatch.setattr(cpu_speed, "run_benchmark", run_benchmark)
    monkeypatch.setattr(cpu_speed.report, "table", lambda rows: "")
    monkeypatch.setattr(cpu_speed.report, "table_row", lambda row: (row["workload"],) * 8)
    assert cpu_speed.main([]) == status
    assert capsys.readouterr().out.count("PASS") == 3 - status


def test_sweep_rows_keep_every_sample_beside_their_statistics():
    sweep = _script("sweep_shared_attention")
    fields = sweep.summary("fwd_graph", [2.0, 1.0, 3.0, 2.5, 1.5], flops=3e9)
    assert fields["fwd_graph_ms_samples"] == [2.0, 1.0, 3.0, 2.5, 1.5]  # the raw numbers, in call order
    assert (fields["fwd_graph_ms"], fields["fwd_graph_ms_min"]) == (2.0, 1.0)
    assert fields["fwd_graph_ms_p20"] == pytest.approx(1.4) and fields["fwd_graph_ms_p80"] == pytest.approx(
        2.6
    )
    assert fields["fwd_graph_tflops"] == pytest.approx(1.5)  # at the median: 3 GFLOP in 2 ms


def test_sweep_phases_and_flex_order():
    sweep = _script("sweep_shared_attention")
    args = sweep.parse_args(["--heads", "3", "12", "--batches", "8", "32", "--flex-heads", "12", "3"])
    assert sweep.plan(args) == [(8, 3), (32, 3), (8, 12), (32, 12)]
    assert sweep.flex_plan(args) == [(8, 12), (32, 12), (8, 3), (32, 3)]  # flex in its own order
    args = sweep.parse_args(["--flex-heads", "6", "--flex-batches", "128", "32"])
    assert sweep.flex_plan(args) == [(128, 6), (32, 6)]
    assert args.graph_from_batch is None  # device-time rows only when asked for


def test_sweep_reads_issue7_targets_from_each_figure():
    """Fused forward+backward against the fastest pre-duplicated and the fastest gather path at B >= 32,
    each figure on its own; the forward's 200 TFLOP/s from the graph figure; rows that failed or
    disagree with the reference are no baseline."""
    sweep = _script("sweep_shared_attention")

    def row(method, B, fwd_bwd, graph=None, ok=True, matches=True, fwd_tflops=100.0):
        r = {"B": B, "H": 12, "method": method, "status": "ok" if ok else "error: x",
             "matches_reference": matches, "fwd_bwd_ms": fwd_bwd, "fwd_tflops": fwd_tflops}  # fmt: skip
        if graph is not None:
            r.update(fwd_bwd_graph_ms=graph, fwd_graph_tflops=2 * fwd_tflops)
        return r

    rows = [
        row("fused", 8, 1.0),  # below B = 32: no target
        row("fused", 32, 1.0, graph=0.5, fwd_tflops=150.0),
        row("sdpa-dup-cudnn", 32, 1.2, graph=0.8),
        row("sdpa-dup-flash", 32, 1.5, graph=0.6),
        row("sdpa-dup-efficient", 32, 0.1, matches=False),  # wrong: never the best
        row("xformers-dup", 32, 0.1, ok=False),
        row("sdpa-gather-cudnn", 32, 2.5, graph=0.9),
        row("xformers-gather", 32, 2.2),
        row("sdpa-dup-cudnn", 8, 0.2),
    ]
    (t,) = sweep.issue7_targets(rows)
    assert (t["B"], t["H"], t["fwd_tflops_target_figure"]) == (32, 12, "graph")
    events, graph = t["figures"]["events"], t["figures"]["graph"]
    assert events["vs_best_dup"] == {
        "baseline": "sdpa-dup-cudnn",
        "speedup": 1.2,
        "target": 1.3,
        "met": False,
    }
    assert events["vs_best_gather"]["baseline"] == "xformers-gather"
    assert events["vs_best_gather"]["speedup"] == pytest.approx(2.2) and events["vs_best_gather"]["met"]
    assert "fwd_tflops_met" not in events  # the host-inclusive forward is no measure of the kernel's rate
    assert graph["vs_best_dup"]["baseline"] == "sdpa-dup-flash" and graph["vs_best_dup"]["speedup"] == 1.2
    assert graph["vs_best_gather"]["speedup"] == pytest.approx(1.8)  # xformers-gather has no graph time
    assert (graph["fwd_tflops"], graph["fwd_tflops_met"]) == (300.0, True)


def test_sweep_one_launch_threshold_needs_every_size_of_equal_skv_h():
    """Sizes of one Skv * H get the same backward (`Skv * H >= ONE_LAUNCH_BACKWARD_MIN_PROGRAMS`): where
    one of them loses, that Skv * H is no threshold, whichever of them sorts last."""
    sweep = _script("sweep_shared_attention")

    def rows(times):  # {(B, H): (two launches, one launch)}; Skv = 2B, so B=32 H=12 and B=64 H=6: 768
        return [{"B": B, "H": H, "Skv": 2 * B, "method": m, "status": "ok", "matches_reference": True,
                 "fwd_bwd_ms": t} for (B, H), pair in times.items()
                for m, t in zip(("fused", "fused-1launch"), pair)]  # fmt: skip

    tie = {(32, 12): (1.0, 0.9), (64, 6): (1.0, 1.2), (128, 3): (1.0, 0.9), (128, 12): (1.0, 0.8)}
    assert sweep.one_launch_threshold(rows(tie))["min_programs"] == 3072
    tie[(64, 6)] = (1.0, 0.95)
    assert sweep.one_launch_threshold(rows(tie))["min_programs"] == 768


def test_sweep_keeps_the_row_of_a_kernel_that_faulted_the_context(monkeypatch):
    """After an illegal memory access every CUDA call fails, torch.cuda.empty_cache too: the faulting
    row still comes back with its error, to be saved, instead of the error escaping without it."""
    sweep = _script("sweep_shared_attention")

    def fault(*_):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "empty_cache", fault)
    row = sweep.guarded({"method": "fused"}, fault)
    assert row["status"] == "error: RuntimeError: CUDA error: an illegal memory access was encountered"


def test_a_faulted_cuda_context_does_not_end_the_benchmark(monkeypatch):
    """After an illegal memory access every CUDA call fails, torch.cuda.empty_cache too: the runner's
    cleanup between variants must not raise it past the row that recorded the fault."""
    from fastvit_style.benchmark import runner

    def fault(*_):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(torch.cuda, "empty_cache", fault)
    case = object.__new__(runner._Case)
    case.device = torch.device("cuda")
    case._cleanup()


@pytest.mark.parametrize(
    "flag",
    ["--backbones", "--dtypes", "--backends", "--batch-sizes", "--compile-backends", "--compile-dtypes"],
)
@pytest.mark.parametrize("value", ["", ","])
def test_a_comma_list_naming_nothing_is_refused(flag, value):
    """An empty list (an unset shell variable) was taken for the default, where ',' was refused; with
    --compile, an empty --compile-backends compiled nothing."""
    with pytest.raises(ValueError, match=f"{flag} names none, got {value!r}"):
        cli.config_from_args(_args("--device", "cpu", "--compile", flag, value))


def test_batch_sizes_per_workload():
    """Plain sizes go to every workload without sizes of its own; W=N to W alone (repeated for several);
    workloads given none keep the device's table."""
    workloads = ["stylize", "stylize-roll", "tta", "train"]
    assert cli.parse_batch_sizes("4,2", workloads) == {w: [4, 2] for w in workloads}
    assert cli.parse_batch_sizes("train=4,stylize=8,stylize=64,8", workloads) == {
        "stylize": [8, 64], "stylize-roll": [8], "tta": [8], "train": [4]}  # fmt: skip
    assert cli.parse_batch_sizes("train=4", workloads) == {"train": [4]}
    for bad, message in (("train=0", "at least 1"), ("augment=8", "'augment', which is not in --workloads"),
                         ("8,x", "at least 1"), (",", "at least 1")):  # fmt: skip
        with pytest.raises(ValueError, match=message):
            cli.parse_batch_sizes(bad, workloads)
    cfg = cli.config_from_args(
        _args("--device", "cpu", "--workloads", "stylize,train", "--batch-sizes", "train=4")
    )
    assert cfg.batch_sizes == {"stylize": cli.DEFAULT_BATCHES["cpu"]["stylize"], "train": [4]}


def test_compiled_variants_run_official_first_at_the_sizes_asked_for():
    """Timed one after another, each compiled variant goes over every case before the next (official first:
    a budget cuts fast compiled rows before compiled baselines); --compile-every-size compiles at every
    batch, else at each workload's largest; interleaved, a case's compiled variants run together."""
    from fastvit_style.benchmark.plan import BenchConfig, plan_cases, plan_passes, plan_size

    cfg = BenchConfig(workloads=("train", "stylize"), batch_sizes={"train": [4], "stylize": [8, 64]},
                      dtypes=("bf16",), backends=("reference", "triton"),
                      compile_backends=("reference", "triton"), compile_dtypes=("bf16",))  # fmt: skip
    cases = plan_cases(cfg)
    assert [c[1:] for c in cases] == [("train", 4, True), ("stylize", 8, False), ("stylize", 64, True)]

    def order(cfg):
        cases = plan_cases(cfg)
        return [(cases[i][1], cases[i][2], [(v.backend.name, v.dtype, v.compile) for v in vs])
                for i, vs in plan_passes(cfg)]  # fmt: skip

    eager = [("reference", "fp32", False), ("triton", "bf16", False)]
    assert order(cfg) == [
        ("train", 4, eager), ("stylize", 8, eager), ("stylize", 64, eager),
        ("train", 4, [("reference", "bf16", True)]), ("stylize", 64, [("reference", "bf16", True)]),
        ("train", 4, [("triton", "bf16", True)]), ("stylize", 64, [("triton", "bf16", True)]),
    ]  # fmt: skip
    assert plan_size(cfg) == 3 * 2 + 2 * 2
    cfg.compile_every_size = True
    assert [c[3] for c in plan_cases(cfg)] == [True, True, True] and plan_size(cfg) == 3 * 2 + 3 * 2
    cfg.interleave, cfg.compile_every_size = True, False
    both = [("reference", "bf16", True), ("triton", "bf16", True)]
    assert order(cfg)[3:] == [("train", 4, both), ("stylize", 64, both)]
    flags = _args("--device", "cpu", "--compile", "--compile-every-size", "--batch-sizes", "2,3")
    assert cli.config_from_args(flags).compile_every_size


def _plan_command(plan, part, name, limit=300):
    (step,) = (s for s in plan.PARTS[part] if s.name == name)
    return step.argv(limit, "/out")


@pytest.mark.parametrize("part", ["all", "model"])
def test_gpu_plan_benchmarks_issue5s_workloads_with_their_baselines(monkeypatch, part):
    """The bench step's flags, read by the CLI's own parser: base, train at B=4, both stylizations and TTA
    at B=8, Triton in bf16 against the official fp32 baseline and the official bf16 + compile, every
    compiled variant at those sizes, the official training step compiled first."""
    from fastvit_style.benchmark.plan import plan_cases, plan_passes

    plan = _script("gpu_plan")
    argv = _plan_command(plan, part, "bench", limit=400)
    assert argv[:4] == ["python3", "-m", "fastvit_style.cli", "bench"]
    monkeypatch.setattr(cli, "resolve_device", lambda name: torch.device("cuda", 0))
    cfg = cli.config_from_args(_args(*argv[4:]))
    assert cfg.budget_s == 400 - plan.BENCH_IN_FLIGHT and cfg.backbones == ("base",)
    assert cfg.batch_sizes == {"train": [4], "stylize": [8], "stylize-roll": [8], "tta": [8]}
    cases = plan_cases(cfg)
    assert all(compiled for *_, compiled in cases)
    variants = [
        (cases[i][1], [(v.backend.name, v.dtype, v.compile) for v in vs]) for i, vs in plan_passes(cfg)
    ]
    assert variants[:4] == [
        (w, [("reference", "fp32", False), ("triton", "bf16", False)]) for w in cfg.workloads
    ]
    assert variants[4] == ("train", [("reference", "bf16", True)])
    assert ("train", [("triton", "bf16", True)]) in variants[5:]


@pytest.mark.parametrize("part", ["all", "kernels"])
def test_gpu_plan_sweeps_every_row_of_issue7(part):
    """The sweep step's flags, read by the sweep's parser: every head count and batch, device times from
    B = 32, FlexAttention at every head count (B >= 32 first) with a budget of its own, no tile rows
    (their recompiles come last, in a step of their own)."""
    plan, sweep = _script("gpu_plan"), _script("sweep_shared_attention")
    argv = _plan_command(plan, part, "sweep", limit=plan.PARTS[part][2].cap)
    args = sweep.parse_args(argv[2:])
    assert sorted(sweep.plan(args)) == sorted((B, H) for B in (8, 32, 64, 128) for H in (3, 6, 12))
    assert sorted(sweep.flex_plan(args)) == sorted(sweep.plan(args)) and sweep.flex_plan(args)[0] == (32, 12)
    assert args.graph_from_batch == 32 and not args.tune_blocks and args.flex_budget >= 30
    assert args.budget + args.flex_budget + 2 * plan.SWEEP_IN_FLIGHT <= plan.PARTS[part][2].cap


def test_gpu_plan_fits_the_call_and_runs_the_issues_first():
    """By the expected durations (bench/README.md, "Time plan"), every step of `all` runs within the call;
    the core GPU tests run before the sweep; its bench leaves time for the eager rows (about 45 s) and the
    official compiled training step before its budget ends; each part ends before its total."""
    plan = _script("gpu_plan")
    for part in plan.PARTS:
        course = plan.schedule(part)
        assert course[-1]["end"] <= plan.TOTAL - plan.PACKING
        assert all(s.least <= s.cap for s in plan.PARTS[part])
    course = {s["name"]: s for s in plan.schedule("all")}
    assert all(s["limit"] is not None for s in course.values())
    assert course["tests-core"]["end"] <= course["sweep"]["start"]
    assert course["bench"]["limit"] - plan.BENCH_IN_FLIGHT >= 45
    model = {s["name"]: s for s in plan.schedule("model")}
    assert model["bench"]["limit"] >= 400  # issue 5's call: every compiled variant (bench/README.md)


def test_gpu_check_runs_the_plan_with_stubbed_tools(tmp_path):
    """bench/gpu_check.sh end to end with python3 and nvidia-smi stubbed (the planner runs for real): the
    steps in the plan's order, each command as planned, the logs packed, a short commit refused."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).parents[1]
    stub, log = tmp_path / "bin", tmp_path / "calls.log"
    stub.mkdir()
    (stub / "python3").write_text(
        "#!/bin/bash\n"
        f'if [[ $1 == bench/gpu_plan.py ]]; then exec {sys.executable} "$@"; fi\n'
        'if [[ $1 == -c && $2 == *"import fastvit_style.kernels"* ]]; then exit 0; fi\n'
        f'echo "python3 $*" >> {log}\n'
    )
    (stub / "nvidia-smi").write_text("#!/bin/bash\n")
    for f in stub.iterdir():
        f.chmod(0o755)
    env = {**os.environ, "PATH": f"{stub}:{os.environ['PATH']}", "GIT_DIR": str(tmp_path / "no-git"),
           "FASTVIT_STYLE_GIT_COMMIT": "abc123"}  # fmt: skip
    done = subprocess.run(["bash", str(root / "bench" / "gpu_check.sh"), str(tmp_path / "out"), "model"],
                          check=False, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "is no 40-hex commit" in done.stderr
    calls = [line.split()[1:4] for line in log.read_text().splitlines() if line.startswith("python3 ")]
    assert ["-m", "fastvit_style.cli", "bench"] in calls and [
        "bench/train_cpu.py",
        "--device",
        "cuda",
    ] in calls
    assert calls.index(["-m", "fastvit_style.cli", "bench"]) < calls.index(
        ["bench/train_cpu.py", "--device", "cuda"]
    )
    assert sorted(os.listdir(tmp_path / "out")) == ["logs.tar.gz"]
