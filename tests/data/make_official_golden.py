"""Generate tests/data/official_golden_reduced.safetensors with the OFFICIAL package (stylizing-vit 1.0.0).

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
from helpers import images  # noqa: E402  (from tests/, put on the path just above)
from test_official_parity import randomize_official_  # noqa: E402

BACKBONE = "golden_custom"
KWARGS = {"encoder_embed_dim": 96, "encoder_depth": 2, "encoder_num_heads": 2, "input_size": 48}
OUT = HERE / "official_golden_reduced.safetensors"


def main() -> None:
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
    meta = {
        "backbone": BACKBONE,
        "kwargs": json.dumps(KWARGS),
        "state_keys": json.dumps(list(state)),
        "generated_by": "tests/data/make_official_golden.py",
        "stylizing_vit": stylizing_vit.__version__,
        "timm": timm.__version__,
        "torch": torch.__version__,
    }
    safetensors.torch.save_file(tensors, str(OUT), metadata=meta)
    print(f"wrote {OUT} ({OUT.stat().st_size / 1e6:.2f} MB)")


if __name__ == "__main__":
    main()
