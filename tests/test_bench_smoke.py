"""`fastvit-style bench` end to end on the CPU at a toy size: JSON schema, parity gate, failure rows."""

import copy
import glob
import json
import os
import re

import pytest
import torch

from fastvit_style.benchmark import BenchConfig, register_backend, run_benchmark
from fastvit_style.benchmark.plan import plan_cases, plan_size, plan_variants
from fastvit_style.cli import main

TOY = {"input_size": 32, "encoder_depth": 2}  # 4 patches, 2 layers; VGG19 still fits at 32 px
ROW_KEYS = {
    "workload", "backbone", "batch_size", "dtype", "backend", "compile", "status", "reason", "max_abs_err",
    "rel_err", "median_ms", "p20_ms", "p80_ms", "images_per_s", "speedup_vs_reference", "peak_mem_bytes",
    "warmup_s", "flops_per_image", "mfu",
}  # fmt: skip


def _wrong(model):
    """A backend that returns wrong numbers: the fast path on a slightly altered head."""
    with torch.no_grad():
        model.post_process_conv.weight.mul_(1.01)
    model.backend = "torch"
    return model


def _far_off(model):
    """Wrong by far more than bf16 rounding: the fast path on a head scaled by 1.5."""
    with torch.no_grad():
        model.post_process_conv.weight.mul_(1.5)
    model.backend = "torch"
    return model


def _wrong_gradients(model):
    """Right outputs, parameter gradients 1.5x too large: a backward bug."""
    for p in model.parameters():
        if p.requires_grad:
            p.register_hook(lambda g: 1.5 * g)
    model.backend = "torch"
    return model


def _out_of_memory(model):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB (simulated)")


pytestmark = pytest.mark.usefixtures("one_thread")


def test_cli_end_to_end(tmp_path, monkeypatch):
    from fastvit_style.benchmark import flops

    register_backend("wrong", _wrong)
    monkeypatch.setattr(flops, "bf16_matmul_flops", lambda device: 1e12)  # a card's rate, for MFU on a CPU
    # --augment-p 0.67: 2 of the 3 images stylized, each by the other (with 1 the roll changes nothing).
    argv = ["bench", "--device", "cpu", "--backbones", "tiny", "--workloads", "stylize,augment,tta,train",
            "--backends", "reference,torch,wrong,xformers", "--batch-sizes", "3", "--repeats", "1",
            "--tta-k", "2", "--augment-p", "0.67", "--model-kwargs", json.dumps(TOY),
            "--out", str(tmp_path)]  # fmt: skip
    assert main(argv) == 0
    (path,) = glob.glob(str(tmp_path / "*_bench.json"))
    with open(path) as f:
        data = json.load(f)
    assert {"env", "device", "config", "results", "telemetry"} <= set(data)
    assert data["env"]["torch"] == torch.__version__ and "commit" in data["env"]["git"]
    assert data["telemetry"]["reason"]  # no GPU: a null entry that says why
    rows = {(r["workload"], r["backend"]): r for r in data["results"]}
    assert len(rows) == len(data["results"]) == 4 * 4
    for row in data["results"]:
        assert ROW_KEYS <= set(row)

    for workload in ("stylize", "augment", "tta", "train"):
        ref, fast, wrong = (rows[workload, b] for b in ("reference", "torch", "wrong"))
        assert ref["status"] == "ok" and ref["rel_err"] == 0 and ref["speedup_vs_reference"] == 1
        assert fast["status"] == "ok" and max(fast["errors"].values()) <= 1e-2, fast
        # The limit each output was held to: gradients have their own.
        limits = {k: 1e-2 if k == "grads" else fast["tolerance"] for k in fast["errors"]}
        assert fast["tolerances"] == limits, fast
        assert fast["median_ms"] > 0 and fast["images_per_s"] > 0 and fast["speedup_vs_reference"] > 0
        assert fast["flops_per_image"] > 0 and fast["peak_mem_bytes"] > 0
        # Rates from the median of the raw times: content images (test images for TTA, classifier images
        # for augment) per second; speedup = the baseline's time over the row's; MFU = FLOPs x img/s / rate.
        for r in (ref, fast):
            assert r["images"] == 3 and r["median_ms"] == pytest.approx(r["times_ms"][0], abs=1e-4)
            assert r["images_per_s"] == pytest.approx(3e3 / r["median_ms"])
            assert r["speedup_vs_reference"] == pytest.approx(ref["median_ms"] / r["median_ms"])
            assert r["mfu"] == pytest.approx(r["flops_per_image"] * r["images_per_s"] / 1e12)
        assert wrong["status"] == "failed" and wrong["rel_err"] > wrong["tolerance"], wrong
        assert wrong["median_ms"] is None and "disagrees" in wrong["reason"]
        assert rows[workload, "xformers"]["status"] == "unavailable" and rows[workload, "xformers"]["reason"]
    # The fast augment and TTA run through the library's StyleAugment and StyleBank, not an emulation.
    assert rows["augment", "torch"]["reason"] == "" and rows["tta", "torch"]["reason"] == ""


def test_oom_and_budget_are_recorded():
    register_backend("oom", _out_of_memory)
    cfg = BenchConfig(workloads=("stylize",), batch_sizes={"stylize": [2]}, backends=("reference", "oom"),
                      repeats=1, model_kwargs=TOY)  # fmt: skip
    calls = []  # what a killed run's JSON would hold at each point: the variant in flight, then its row
    rows = run_benchmark(cfg, lambda row, run: calls.append((row, copy.deepcopy(run["in_flight"]))))[
        "results"
    ]
    assert [r["status"] for r in rows] == ["ok", "oom"] and "out of memory" in rows[1]["reason"]
    assert [(row and row["backend"], flight and flight["backend"]) for row, flight in calls] == [
        (None, None),
        (None, "reference"),
        ("reference", "reference"),
        (None, "oom"),
        ("oom", "oom"),
    ]
    assert len(rows[0]["times_ms"]) == cfg.repeats and rows[1]["times_ms"] is None  # the raw numbers

    cfg.budget_s = 0
    assert {r["status"] for r in run_benchmark(cfg)["results"]} == {"skipped"}


def test_bf16_is_judged_against_the_official_bf16_error():
    register_backend("far_off", _far_off)
    cfg = BenchConfig(workloads=("stylize",), batch_sizes={"stylize": [2]}, dtypes=("fp32", "bf16"),
                      backends=("reference", "torch", "far_off"), repeats=1, model_kwargs=TOY)  # fmt: skip
    rows = {(r["backend"], r["dtype"]): r for r in run_benchmark(cfg)["results"]}
    assert set(rows) == {
        ("reference", "fp32"),
        ("torch", "fp32"),
        ("torch", "bf16"),
        ("far_off", "fp32"),
        ("far_off", "bf16"),
    }  # no eager bf16 official
    # A wrong backend fails in bf16 as in fp32.
    assert rows["far_off", "fp32"]["status"] == rows["far_off", "bf16"]["status"] == "failed"
    bf16 = rows["torch", "bf16"]
    assert bf16["status"] == "ok" and bf16["official_own_err"]["out"] > 0
    assert bf16["rel_err"] <= max(bf16["tolerance"], 2 * bf16["official_own_err"]["out"])
    assert bf16["tolerances"]["out"] == max(bf16["tolerance"], 2 * bf16["official_own_err"]["out"])


@pytest.mark.parametrize("nan_under", ["fp32", "bf16"])
def test_a_non_finite_official_output_passes_no_backend(monkeypatch, nan_under):
    """A NaN in the official fp32 output (every variant's reference), or in its bf16 twin (which widens
    the bf16 limits), must not let a wrong backend through: before, the reference's NaN vanished from
    the max-norm (error 0) and the twin's gave an infinite limit."""
    import fastvit_style.reference

    official = fastvit_style.reference.forward

    def forward(*args):
        out = official(*args)
        bf16 = torch.is_autocast_enabled("cpu")
        return out.index_fill(2, torch.tensor([0]), float("nan")) if bf16 == (nan_under == "bf16") else out

    monkeypatch.setattr(fastvit_style.reference, "forward", forward)
    register_backend("far_off", _far_off)
    cfg = BenchConfig(workloads=("stylize",), batch_sizes={"stylize": [2]}, dtypes=(nan_under,),
                      backends=("reference", "far_off"), repeats=1, model_kwargs=TOY)  # fmt: skip
    rows = {r["backend"]: r for r in run_benchmark(cfg)["results"]}
    assert rows["far_off"]["status"] == "failed", rows["far_off"]


def test_a_backend_with_wrong_gradients_fails_the_training_check():
    register_backend("wrong_gradients", _wrong_gradients)
    cfg = BenchConfig(workloads=("train",), batch_sizes={"train": [2]},
                      backends=("reference", "wrong_gradients"), repeats=1, model_kwargs=TOY)  # fmt: skip
    row = run_benchmark(cfg)["results"][1]
    assert row["status"] == "failed" and "grads" in row["reason"] and row["median_ms"] is None, row
    assert max(row["errors"]["loss"], row["errors"]["x_recon"]) <= row["tolerance"]  # the forward is right


def test_the_official_fp32_baseline_runs_whatever_the_dtypes():
    """Every ratio is taken against it: a bf16-only run still times it."""
    cfg = BenchConfig(dtypes=("bf16",), backends=("reference", "torch"), compile_backends=("reference",),
                      compile_dtypes=("bf16",))  # fmt: skip
    eager, compiled = plan_variants(cfg)
    assert [(v.backend.name, v.dtype) for v in eager] == [("reference", "fp32"), ("torch", "bf16")]
    assert [(v.backend.name, v.dtype) for v in compiled] == [("reference", "bf16")]


@pytest.mark.parametrize("seed", [0, 2])  # seeds whose bf16 draw equals the baseline's (B = 2)
def test_an_augment_draw_equal_to_the_baselines_is_judged_like_any_other(seed):
    cfg = BenchConfig(workloads=("augment",), batch_sizes={"augment": [2]}, dtypes=("fp32", "bf16"),
                      repeats=1, model_kwargs=TOY, seed=seed)  # fmt: skip
    assert {r["status"] for r in run_benchmark(cfg)["results"]} == {"ok"}


@pytest.mark.parametrize("interleave", [False, True])
def test_interleaved_compiled_variants_share_one_reset(monkeypatch, interleave):
    """Interleaved, every compiled variant is prepared before any is timed: a reset per variant would drop
    the others' compiled code, to be recompiled inside their timed calls."""
    resets = []
    monkeypatch.setattr(torch, "compile", lambda f, **kw: f)  # the bookkeeping, not inductor
    monkeypatch.setattr(torch._dynamo, "reset", lambda: resets.append(1))
    cfg = BenchConfig(workloads=("stylize",), batch_sizes={"stylize": [2]}, dtypes=("fp32", "bf16"),
                      compile_backends=("reference", "torch"), repeats=1, interleave=interleave,
                      model_kwargs=TOY)  # fmt: skip
    rows = run_benchmark(cfg)["results"]
    assert sum(r["compile"] for r in rows) == 3 and {r["status"] for r in rows} == {"ok"}
    assert len(resets) == (1 if interleave else 3)
    # Both ratios: over the official fp32 eager time and over the official bf16 compiled one.
    (ref,) = (r for r in rows if r["backend"] == "reference" and not r["compile"])
    (ref_bc,) = (r for r in rows if r["backend"] == "reference" and r["compile"])
    assert ref_bc["dtype"] == "bf16"
    for r in rows:
        assert r["speedup_vs_reference"] == pytest.approx(ref["median_ms"] / r["median_ms"])
        assert r["speedup_vs_reference_bf16_compile"] == pytest.approx(ref_bc["median_ms"] / r["median_ms"])


def test_plan():
    cfg = BenchConfig(workloads=("stylize", "train"), batch_sizes={"stylize": [2, 8], "train": [4]},
                      dtypes=("fp32", "bf16"), backends=("reference", "torch"),
                      compile_backends=("reference", "torch"), compile_dtypes=("bf16",))  # fmt: skip
    eager, compiled = plan_variants(cfg)
    assert [(v.backend.name, v.dtype) for v in eager] == [
        ("reference", "fp32"),
        ("torch", "fp32"),
        ("torch", "bf16"),
    ]
    assert [(v.backend.name, v.dtype) for v in compiled] == [("reference", "bf16"), ("torch", "bf16")]
    # compiled variants only at the largest batch of each workload
    assert [c[1:] for c in plan_cases(cfg)] == [
        ("stylize", 2, False),
        ("stylize", 8, True),
        ("train", 4, True),
    ]
    assert plan_size(cfg) == 3 * 3 + 2 * 2
    # Whatever order the backends come in: the baseline first (a --budget never cuts it), the official
    # computation compiled in bf16 only and first, bf16 before fp32.
    cfg = BenchConfig(dtypes=("fp32", "bf16"), backends=("torch", "reference"),
                      compile_backends=("torch", "reference"), compile_dtypes=("fp32", "bf16"))  # fmt: skip
    eager, compiled = plan_variants(cfg)
    assert [(v.backend.name, v.dtype) for v in eager] == [
        ("reference", "fp32"),
        ("torch", "fp32"),
        ("torch", "bf16"),
    ]
    assert [(v.backend.name, v.dtype) for v in compiled] == [
        ("reference", "bf16"),
        ("torch", "bf16"),
        ("torch", "fp32"),
    ]


@pytest.mark.parametrize(
    "option, message",
    [
        (["--dtypes", "fp16"], "--dtypes must be a comma list of fp32, bf16"),
        (["--repeats", "0"], "--repeats must be at least 1"),
        (["--warmup", "-1"], "--warmup must be at least 0"),
        (["--batch-sizes", "2,0"], "--batch-sizes must all be at least 1"),
        (["--tta-k", "0"], "--tta-k must be at least 1"),
        (["--augment-p", "1.5"], r"--augment-p must be in \(0, 1\]"),
        (["--threads", "-1"], "--threads must be at least 1"),
        (["--budget", "-5"], "--budget must be at least 0 seconds"),
        (["--backbones", "tiyn"], "backbone 'tiyn' is no official name"),
        # with encoder_* keywords too: make_config would build a custom ViT, base sizes but the depth
        (["--backbones", "Tiny", "--model-kwargs", '{"encoder_depth": 2}'], r"did you mean 'tiny'\?"),
        (["--model-kwargs", "[1]"], "--model-kwargs must be a JSON object"),
        (["--model-kwargs", '{"colour": 1}'], "unexpected keyword argument 'colour'"),
        (["--device", "tpu"], "device 'tpu' is not a device name"),
        (["--device", "mps"], "only cpu and cuda devices are supported"),
        (["--backbones", ","], "--backbones names none, got ','"),
        (["--backends", ","], "--backends names none, got ','"),
        (["--backends", ""], "--backends names none, got ''"),  # was the default backends, silently
        (["--backends", "reference,foo"], "unknown backend 'foo'"),
        (["--batch-sizes", "2,x"], "--batch-sizes must all be at least 1"),
        (["--model-kwargs", "{bad"], "--model-kwargs is not valid JSON"),
        (["--workloads", "foo"], "--workloads: unknown or none"),
        (["--compile", "--compile-backends", "bogus"], r"--compile-backends \['bogus'\] are not timed"),
        (["--compile", "--compile-dtypes", "bf16"], r"--compile-dtypes \['bf16'\] are not timed"),
        # compile options without compiled variants (off by default on CPU) would be dropped, silently
        (["--compile-backends", "torch"], "--compile-backends acts only on compiled variants.*add --compile"),
        (
            ["--no-compile", "--compile-dtypes", "fp32", "--compile-every-size"],
            r"--compile-dtypes, --compile-every-size act only on compiled variants, which are off \(--no-compile\)",
        ),
    ],
)
def test_option_values_no_variant_could_run_with_are_refused_first(tmp_path, capsys, option, message):
    assert (
        main(["bench", "--device", "cpu", "--workloads", "stylize", *option, "--out", str(tmp_path / "o")])
        == 1
    )
    err = capsys.readouterr().err
    assert err.startswith("error: ") and re.search(message, err), err
    assert not (tmp_path / "o").exists()


def test_runs_started_in_the_same_second_keep_their_own_files(tmp_path, monkeypatch):
    import datetime
    import types

    from fastvit_style.benchmark import report

    class Frozen(datetime.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 11, 29, 12, 0, 0)

    monkeypatch.setattr(
        report, "datetime", types.SimpleNamespace(datetime=Frozen)
    )  # this module's clock only
    device = {"name": "Some CPU", "type": "cpu"}
    stems = []
    for _ in range(3):  # each claims its stem by creating its JSON file at once
        stems.append(report.output_stem(str(tmp_path), device))
    assert [os.path.basename(s) for s in stems] == [
        "20261129-120000_Some-CPU_bench",
        "20261129-120000_Some-CPU_bench-2",
        "20261129-120000_Some-CPU_bench-3",
    ]
    with pytest.raises(ValueError, match="--out '.*bench-3.json' exists and is not a folder"):
        report.output_stem(stems[-1] + ".json", device)


def test_a_backend_that_cannot_be_loaded_is_unavailable():
    """A 'module:factory' that does not import or resolve gives `unavailable` rows with the reason; the
    run goes on, as for a backend whose package is missing."""
    from fastvit_style.benchmark.plan import get_backend

    cpu = torch.device("cpu")
    assert "ModuleNotFoundError" in get_backend("no_such_module_xyz:make").unavailable(cpu)
    assert "AttributeError" in get_backend("json:no_such_factory").unavailable(cpu)
    assert get_backend("json:loads").unavailable(cpu) is None


def test_cli_backends_finds_a_factory_in_the_current_folder(tmp_path, monkeypatch):
    """`--backends module:factory` imports from the current folder, as tta's --classifier does: the
    `fastvit-style` console script, unlike `python -m`, does not put that folder on sys.path."""
    import sys

    (tmp_path / "cwd_backend_h85.py").write_text("def make(model):\n    return model\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    argv = ["bench", "--device", "cpu", "--workloads", "stylize", "--backends", "reference,cwd_backend_h85:make",
            "--batch-sizes", "1", "--repeats", "1", "--model-kwargs", json.dumps(TOY), "--out", "o"]  # fmt: skip
    assert main(argv) == 0
    (path,) = glob.glob(str(tmp_path / "o" / "*_bench.json"))
    with open(path) as f:
        rows = {r["backend"]: r for r in json.load(f)["results"]}
    assert rows["cwd_backend_h85:make"]["status"] == "ok", rows["cwd_backend_h85:make"]["reason"]


def test_a_cuda_benchmark_runs_with_its_gpu_current(monkeypatch):
    """CUDA events, synchronize and the peak-memory counters act on the current device, so the whole
    run happens with the benchmarked GPU current (with --device cuda:1 they would time cuda:0)."""
    import contextlib

    from fastvit_style.benchmark import runner

    current = []

    @contextlib.contextmanager
    def fake_device(device):
        current.append(torch.device(device))
        yield
        current.append(None)

    monkeypatch.setattr(torch.cuda, "device", fake_device)
    monkeypatch.setattr(runner, "_run", lambda cfg, device, on_result: list(current))
    assert run_benchmark(BenchConfig(device="cuda:1")) == [torch.device("cuda:1")]
    assert current[-1] is None and run_benchmark(BenchConfig(device="cpu")) == [torch.device("cuda:1"), None]


def test_a_script_replaces_only_its_own_json(tmp_path):
    from fastvit_style.benchmark.report import check_output_file

    check_output_file(str(tmp_path / "new.json"), ("rows",))
    (tmp_path / "own.json").write_text('{"rows": [], "target": "x"}')
    check_output_file(str(tmp_path / "own.json"), ("rows",))
    (tmp_path / "mine.json").write_text('{"notes": 1}')
    for path, message in [
        (tmp_path, "is a folder"),
        (tmp_path / "mine.json", "was not written by this tool"),
    ]:
        with pytest.raises(SystemExit, match=message):
            check_output_file(str(path), ("rows",))
    assert (tmp_path / "mine.json").read_text() == '{"notes": 1}'


def test_the_no_tf32_twin_works_with_torchs_newer_precision_switches():
    """After `torch.backends.fp32_precision = "tf32"` (torch >= 2.9) the legacy allow_tf32 flags raise."""
    from fastvit_style.benchmark.parity import no_tf32

    if not hasattr(torch.backends.cuda.matmul, "fp32_precision"):
        pytest.skip("torch < 2.9 has no fp32_precision switches")
    matmul, conv, backends = torch.backends.cuda.matmul, torch.backends.cudnn.conv, torch.backends
    saved = matmul.fp32_precision, conv.fp32_precision, backends.fp32_precision
    try:
        matmul.fp32_precision, backends.fp32_precision = "none", "tf32"
        with no_tf32():
            assert matmul.fp32_precision == conv.fp32_precision == "ieee"
        assert matmul.fp32_precision == "tf32"
    finally:
        matmul.fp32_precision, conv.fp32_precision, backends.fp32_precision = saved
