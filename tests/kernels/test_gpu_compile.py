"""The kernels compile for the H100 (sm_90) on this GPU-less machine, as the launchers configure them.

The interpreter (which every other kernel test uses) runs the kernels as Python and never lowers
them, so a kernel can pass every CPU test and still fail to compile on the GPU. Triton's NVIDIA
backend compiles without a device; this runs it in a subprocess, since the interpreter is on here.
"""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def gpu_compile(*args: str) -> list[dict]:
    """The rows `python -m fastvit_style.benchmark.gpu_compile --json *args` prints, run without the interpreter."""
    pytest.importorskip("triton.backends.nvidia", reason="triton without its NVIDIA backend")
    env = {**os.environ, "TRITON_INTERPRET": "0", "TRITON_DEFAULT_FP_FUSION": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "fastvit_style.benchmark.gpu_compile", "--json", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,  # the assert below shows stderr
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout)


@pytest.mark.parametrize("tf32", [False, True])
def test_kernels_compile_for_sm90(tf32):
    rows = gpu_compile("--quick", *(["--tf32"] if tf32 else []))
    kernels = {"fwd", "bwd_dq", "bwd_dkdv"}
    expected = {(k, t) for k in kernels for t in ("bf16", "fp32")}
    # The one-launch backward applies to half precision at d <= 64 only (its registers).
    assert {(r["kernel"], r["dtype"]) for r in rows} == expected | {("bwd_fused", "bf16")}
    assert {(r["Tq"], r["Tk"], r["d"]) for r in rows} == {(197, 197, 64)}  # --quick: the first released shape
    for r in rows:
        # Half-precision dots on tensor cores; fp32 ones there only as TF32, exact ones (torch's default
        # for fp32 matmuls) on the FMA units.
        tensor_cores = r["dtype"] == "bf16" or tf32
        assert r["registers"] > 0 and (r["wgmma"] + r["mma"] > 0) == tensor_cores, r
        # bf16 tiles stay bf16 dot operands on the GPU: only the interpreter widens them after the load.
        assert r["meta"]["UPCAST"] is False, r
        if not tensor_cores:  # the exact-fp32 tiles were chosen not to spill
            assert r["spill_stack_bytes"] == 0, r


def test_tile_scan():
    """--scan compiles the named kernels at every tile shape, warp count and stage count asked for."""
    rows = gpu_compile("--quick", "--dtype", "fp32", "--scan", "fwd", "--rows", "16")
    configs = {
        (r["meta"]["BLOCK_M"], r["meta"]["BLOCK_N"], r["meta"]["num_warps"], r["meta"]["num_stages"])
        for r in rows
    }
    assert configs == {(16, 16, w, s) for w in (4, 8) for s in (1, 2)}
    assert {(r["kernel"], r["dtype"]) for r in rows} == {("fwd", "fp32")} and len(rows) == 4


def test_exact_fp32_other_lengths():
    """Exact fp32 stays spill-free at lengths other than 197, where the last key tile is as wide as the
    others and the kernels run one masked loop: 36 keys in one 64-key tile (dq, d = 64: 1.8 KB of
    spill when compiled as a loop plus a last tile) and 49 = 32 + 17 (the forward: 256 bytes with
    triton 3.9, 728 with 3.6); and at d = 128, 81 keys (dq: 120 bytes with 64-key tiles and a 32-key
    tail)."""
    rows = gpu_compile("--dtype", "fp32", "--shapes", "36,36,64", "49,49,64", "81,81,128")
    assert {r["kernel"] for r in rows} == {"fwd", "bwd_dq", "bwd_dkdv"} and len(rows) == 9
    for r in rows:
        assert r["spill_stack_bytes"] == 0, r


def test_the_json_names_the_code_and_the_date(tmp_path, monkeypatch):
    """--out: the rows belong to the kernels' code, so the file carries the commit (with the sources hash),
    the date and the versions beside the target. Compiles faked: this checks the file, not the kernels."""
    import datetime

    import torch

    from fastvit_style.benchmark import gpu_compile as module

    monkeypatch.setattr(module, "compile_report", lambda *args: [])
    out = tmp_path / "compile.json"
    # main sets this switch for the process; restored by hand: pytest >= 9.2's monkeypatch takes the
    # module's __getattr__-served flag for absent and deletes it at teardown, which fails
    tf32 = torch.backends.cuda.matmul.allow_tf32
    try:
        assert module.main(["--out", str(out), "--json"]) == 0
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    saved = json.loads(out.read_text())
    assert saved["target"] == "cuda sm_90" and saved["rows"] == [] and saved["torch"] == torch.__version__
    assert saved["git"]["sources"] and datetime.datetime.fromisoformat(saved["date"]).utcoffset() is not None
