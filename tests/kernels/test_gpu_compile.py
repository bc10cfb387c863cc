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


def test_kernels_compile_for_sm90():
    pytest.importorskip("triton.backends.nvidia", reason="triton without its NVIDIA backend")
    # Without conftest's TRITON_F32_DEFAULT=ieee: fp32 dots as users get them (TF32 tensor cores).
    env = {k: v for k, v in os.environ.items() if k != "TRITON_F32_DEFAULT"}
    env.update(TRITON_INTERPRET="0", TRITON_DEFAULT_FP_FUSION="1")
    run = subprocess.run(
        [sys.executable, "-m", "fastvit_style.benchmark.gpu_compile", "--quick", "--json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        check=False,  # the assert below shows stderr
    )
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(run.stdout)
    kernels = {"fwd", "bwd_dq", "bwd_dkdv"}
    expected = {(k, t) for k in kernels for t in ("bf16", "fp32")}
    # The one-launch backward applies to half precision at d <= 64 only (its registers).
    assert {(r["kernel"], r["dtype"]) for r in rows} == expected | {("bwd_fused", "bf16")}
    for r in rows:  # every kernel runs its dots on tensor cores (fp32 as TF32)
        assert r["registers"] > 0 and r["wgmma"] + r["mma"] > 0, r
