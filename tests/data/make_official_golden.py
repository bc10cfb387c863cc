"""Generate tests/data/official_golden_reduced.safetensors and official_golden_train.safetensors with the
OFFICIAL package (stylizing-vit 1.0.0).

Run in a virtual environment that has the official package (see tests/test_official_parity.py), from
the repository root:

    /tmp/official-venv/bin/python tests/data/make_official_golden.py

It builds a reduced official model - a custom backbone name (shared doc 1.1: any unknown name is a
custom ViT with keyword overrides) with embed dim 96, depth 2, 2 heads, input_size 48, train=False -
randomizes every parameter with a seeded generator, and stores (float32):

    state.<key>      the official state_dict, in its order
    input.x          content batch (3, 3, 48, 48); batch 3 so that the roll direction is visible
    input.x_style    explicit style batch (3, 3, 48, 48)
    output.explicit  official model(x, x_style)
    output.roll      official model(x)  (x_style=None: style = roll(x, -1))

and, as metadata, the backbone name, the constructor kwargs (JSON), the key order and the package
versions. tests/test_official_parity.py::test_golden_official_output checks that fastvit_style
reproduces both outputs (1e-5 max-norm relative) without the official package. About 1.8 MB.

The training file holds the same for train=True, in float64 (where rounding flips no ReLU mask, so
parity is exact to ~1e-14; the module docstring of test_official_parity.py explains why float32
training gradients cannot be compared tightly): a smaller custom backbone (embed dim 48, patch 8,
depth 2, 2 heads, input_size 32; a second patch size), its parameters randomized in float32, the VGG19
set by `patterned_vgg_` (not stored: the test recomputes it), and for the roll (x of 3, x_style=None)
and an explicit style (2 and 2):

    state.<key>             the official state_dict without vgg_encoder.*, float32
    input.x, input.x_style  float64
    <case>.loss             the four terms (identity, consistency, anatomical, style), float64
    <case>.x_recon          float64
    <case>.grad.<name>      gradient of the 70/1/7/10-weighted loss, every trainable parameter, float64

checked by test_golden_official_training. About 2 MB. A rerun may change the float32 eval outputs in
their last bits (another CPU, another thread count): well within the tests' tolerances.
"""

import json
import sys
from pathlib import Path

import safetensors.torch
import stylizing_vit
import timm
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from helpers import images, train_outputs  # noqa: E402  (from tests/, put on the path just above)
from test_official_parity import (  # noqa: E402
    golden_training_cases,
    offline_vgg,
    patterned_vgg_,
    randomize_official_,
)

BACKBONE = "golden_custom"
KWARGS = {"encoder_embed_dim": 96, "encoder_depth": 2, "encoder_num_heads": 2, "input_size": 48}
OUT = HERE / "official_golden_reduced.safetensors"
TRAIN_KWARGS = {
    "encoder_embed_dim": 48, "encoder_patch_size": 8, "encoder_depth": 2, "encoder_num_heads": 2, "input_size": 32
}  # fmt: skip
TRAIN_OUT = HERE / "official_golden_train.safetensors"


def versions() -> dict:
    return {
        "generated_by": "tests/data/make_official_golden.py",
        "stylizing_vit": stylizing_vit.__version__,
        "timm": timm.__version__,
        "torch": torch.__version__,
    }


def write(tensors: dict, path: Path, meta: dict) -> None:
    safetensors.torch.save_file(tensors, str(path), metadata=meta)
    print(f"wrote {path} ({path.stat().st_size / 1e6:.2f} MB)")


def write_eval_golden() -> None:
    torch.manual_seed(0)
    model = stylizing_vit.create_model(BACKBONE, train=False, **KWARGS).eval()
    randomize_official_(model, seed=1)
    x = images(3, size=KWARGS["input_size"], seed=11)
    x_style = images(3, size=KWARGS["input_size"], seed=12)
    with torch.no_grad():
        explicit, roll = model(x, x_style), model(x)
    state = model.state_dict()
    tensors = {f"state.{k}": v.contiguous() for k, v in state.items()}
    tensors.update({"input.x": x, "input.x_style": x_style, "output.explicit": explicit, "output.roll": roll})
    meta = {"backbone": BACKBONE, "kwargs": json.dumps(KWARGS), "state_keys": json.dumps(list(state))}
    write(tensors, OUT, {**meta, **versions()})


def write_train_golden() -> None:
    torch.manual_seed(0)
    with offline_vgg():
        model = stylizing_vit.create_model(BACKBONE, train=True, **TRAIN_KWARGS)
    state = randomize_official_(model, seed=2).state_dict()
    tensors = {f"state.{k}": v.contiguous() for k, v in state.items() if not k.startswith("vgg_encoder.")}
    model = patterned_vgg_(model.double())
    size = TRAIN_KWARGS["input_size"]
    x, x_style = images(3, size, seed=13, dtype=torch.float64), images(2, size, seed=14, dtype=torch.float64)
    tensors.update({"input.x": x, "input.x_style": x_style})
    for case, args in golden_training_cases(x, x_style).items():
        terms, x_recon, grads, _ = train_outputs(model, *args)
        tensors.update({f"{case}.loss": torch.stack(terms), f"{case}.x_recon": x_recon})
        tensors.update({f"{case}.grad.{name}": g for name, g in grads.items()})
    meta = {"backbone": BACKBONE, "kwargs": json.dumps(TRAIN_KWARGS), "state_keys": json.dumps(list(state))}
    write(tensors, TRAIN_OUT, {**meta, **versions()})


if __name__ == "__main__":
    write_eval_golden()
    write_train_golden()
