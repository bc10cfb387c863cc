"""Parity with the official package itself (PyPI `stylizing-vit` 1.0.0), on the same random weights.

Two parts:

* `test_golden_official_output` always runs (no official package needed): a reduced official model
  (custom backbone, shared doc 1.1), its weights, an input pair and the official eval outputs are stored
  in tests/data/official_golden_reduced.safetensors by tests/data/make_official_golden.py; our model
  must reproduce them within the float32 tolerance. `test_golden_official_training` does the same for
  train=True in float64 (losses, x_recon, every gradient; official_golden_train.safetensors), so CI
  checks training against the official code too: its torchvision cannot be installed beside the CPU
  torch there.
* The other tests import the official package and are skipped where it is not installed. It needs
  timm and torchvision, so it lives in its own virtual environment, e.g.

      python3.11 -m venv /tmp/official-venv
      /tmp/official-venv/bin/pip install torch==2.14.1 torchvision==0.29.1
      /tmp/official-venv/bin/pip install stylizing-vit==1.0.0 timm pytest hypothesis safetensors numpy
      /tmp/official-venv/bin/pip install --no-deps -e .
      /tmp/official-venv/bin/python -m pytest tests/test_official_parity.py -q

  The official train=True constructor asks timm for the pretrained VGG19; `offline_vgg()` builds it with
  pretrained=False instead (its weights are randomized anyway), so no network is needed.

Everything runs on CPU, in float32 as the official code does (plus float64 for the training check).
Backends "reference" and "torch". Eval outputs are compared at 224 px (tiny: explicit style and
x_style=None; small: explicit style); training at input_size=64 (the official constructor accepts it,
and the VGG19 perceptual loss is ~12x cheaper there; nothing in the schedule or the losses depends on
the image side). Expect ~10-20 minutes for the whole file on 2 busy cores.

Gradient criterion (training), measured with the official package (small, B=3, x_style=None, 64 px):

* The gradient of the weighted loss is ill-conditioned in float32, in the official code as much as in
  ours: the anatomical (and style) terms divide VGG features by per-channel sigma, and ReLU masks of
  nearly-dead channels flip under rounding. The official float32 gradient misses its own float64
  gradient by 8.7e-4 (global relative), ours (torch backend) by 2.8e-3; our float64 gradient matches
  the official float64 one to 1.7e-14. Evaluating the *exact* (float64) official loss at the float64
  images plus noise of float32-rounding size (~1e-6 relative) moves its image-space gradient by 3e-6 ..
  6e-3 depending on the draw (also at 128 and 224 px), so neither "1.5x the official error" nor "1e-4"
  is a sound bound: both fail by chance, not because of a bug.
* So: (1) in float64, where rounding flips no mask, losses, x_recon and every gradient must match the
  official float64 model to 1e-9 (this is the strict parity check, backward included); (2) in float32
  the losses and x_recon must match the official float32 run to 1e-5, the gradient of the
  well-conditioned identity term (pixel MSE: backward through head and encoder, no VGG) must be within
  max(1e-5, 1.5 x the official float32 error) of float64 truth, and the gradient of the full weighted
  loss within GRAD_FP32_NOISE (2e-2, ~3x the largest rounding-noise effect measured) - a sanity bound
  against gross errors only; (1) is what catches subtle ones.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch
from helpers import (
    ENCODER_ATTRIBUTES,
    GRAD_FP32_NOISE,
    LOSS_FIELDS,
    TOLERANCE,
    assert_close_rel,
    global_grad_error,
    images,
    train_outputs,
)

from fastvit_style import StylizingViT
from fastvit_style.benchmark import BenchConfig, register_backend, run_benchmark
from fastvit_style.benchmark import official as official_backend
from fastvit_style.benchmark.official import offline_vgg

FP32 = TOLERANCE[torch.float32]
FP64_EXACT = 1e-9
BACKENDS = ["reference", "torch"]
GOLDEN = Path(__file__).parent / "data" / "official_golden_reduced.safetensors"
GOLDEN_TRAIN = Path(__file__).parent / "data" / "official_golden_train.safetensors"
TRAIN_SIZE = 64


# ------------------------------------------------------------------------------------- shared helpers


def randomize_official_(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded perturbation of every parameter, so that no bias or LayerNorm term is at its (trivial) init.

    ViT, bottleneck and post conv: + N(0, 0.02^2). VGG19 (train=True): weights + 10% of their own scale
    (keeps the 16-layer activations at scale), biases + N(0, 0.02^2).  Also used by make_official_golden.py.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            std = 0.1 * p.std().item() if name.startswith("vgg_encoder.") and p.dim() > 1 else 0.02
            p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return model


def patterned_vgg_(model: torch.nn.Module) -> torch.nn.Module:
    """Set every VGG19 parameter to a fixed pattern, alike under any torch build (a hash of the element
    index, in float64: a 1-ulp difference in sin moves a value by ~1e-11), so that the training golden
    file needs no 80 MB of VGG19 weights. Weights Kaiming-uniform in scale (16 layers of activations
    stay at scale), biases within +-0.02. Also used by make_official_golden.py."""
    with torch.no_grad():
        vgg = [p for name, p in model.named_parameters() if name.startswith("vgg_encoder.")]
        for i, p in enumerate(vgg):
            t = torch.arange(p.numel(), dtype=torch.float64)
            u = torch.frac(torch.sin(t * 12.9898 + i * 78.233) * 43758.5453)  # in (-1, 1)
            scale = (6 / p[0].numel()) ** 0.5 if p.dim() > 1 else 0.02
            p.copy_((u * scale).view(p.shape))
    return model


def golden_training_cases(x: torch.Tensor, x_style: torch.Tensor) -> dict:
    """The training golden file's cases, {name: (x, x_style)}: the roll (x of 3) and an explicit style
    (2 and 2). Also used by make_official_golden.py, so that both sides run the same calls."""
    return {"roll": (x, None), "explicit": (x[:2], x_style)}


def ours_from_state(state: dict, backbone: str, train: bool, backend: str, **kw) -> StylizingViT:
    model = StylizingViT(backbone, train=train, backend=backend, **kw)
    model.load_state_dict(state, strict=True)
    return model


# --------------------------------------------------------------- golden (always runs, no official code)


def read_golden(path: Path) -> tuple[dict, dict, dict]:
    """(metadata, tensors, the state_dict stored under "state.") of a file of make_official_golden.py."""
    import safetensors

    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open, not a dict)
    return meta, tensors, {k[len("state.") :]: v for k, v in tensors.items() if k.startswith("state.")}


def test_golden_official_output():
    """Our model reproduces outputs computed by the official package (see make_official_golden.py)."""
    meta, tensors, state = read_golden(GOLDEN)
    kwargs = json.loads(meta["kwargs"])
    x, x_style = tensors["input.x"], tensors["input.x_style"]
    assert x.dtype == torch.float32 and x.shape[0] >= 3  # batch >= 3: the roll direction is visible
    for backend in BACKENDS:
        model = ours_from_state(state, meta["backbone"], False, backend, **kwargs)
        assert [k for k in model.state_dict()] == json.loads(meta["state_keys"])
        with torch.no_grad():
            assert_close_rel(model(x, x_style), tensors["output.explicit"], FP32, f"{backend} explicit style")
            assert_close_rel(model(x), tensors["output.roll"], FP32, f"{backend} x_style=None")


def test_golden_official_training():
    """float64 training outputs of the official package (make_official_golden.py; VGG19 by
    `patterned_vgg_`): the four losses, x_recon and every gradient, for the roll and an explicit style."""
    meta, tensors, state = read_golden(GOLDEN_TRAIN)
    kwargs = json.loads(meta["kwargs"])
    x, x_style = tensors["input.x"], tensors["input.x_style"]
    assert x.dtype == torch.float64 and x.shape[0] >= 3  # batch >= 3: the roll direction is visible
    for backend in BACKENDS:
        model = StylizingViT(meta["backbone"], train=True, backend=backend, **kwargs)
        assert [k for k in model.state_dict()] == json.loads(meta["state_keys"])
        missing, unexpected = model.load_state_dict(state, strict=False)
        assert not unexpected and missing == [k for k in model.state_dict() if k.startswith("vgg_encoder.")]
        model = patterned_vgg_(model.double())
        for case, args in golden_training_cases(x, x_style).items():
            what = f"{backend} {case}"
            terms, x_recon, grads, _ = train_outputs(model, *args)
            for name, term, expected in zip(LOSS_FIELDS, terms, tensors[f"{case}.loss"]):
                assert_close_rel(term, expected, FP64_EXACT, f"{what} loss {name}")
            assert_close_rel(x_recon, tensors[f"{case}.x_recon"], FP64_EXACT, f"{what} x_recon")
            expected = {name: tensors[f"{case}.grad.{name}"] for name in grads}
            assert all(g.abs().max() > 0 for name, g in expected.items() if not name.endswith("k_proj.bias"))
            err = global_grad_error(grads, expected)
            assert err <= FP64_EXACT, f"{what}: float64 grad error {err:.3e}"


# ---------------------------------------------------------------- live parity with the official package


@pytest.fixture(scope="module")
def official():
    return pytest.importorskip("stylizing_vit", reason="official stylizing-vit package not installed")


def build_official(official, backbone: str, train: bool, seed: int = 0, **kw) -> torch.nn.Module:
    torch.manual_seed(seed)
    with offline_vgg():
        model = official.create_model(backbone, train=train, **kw)
    assert isinstance(model, official.StylizingViT)
    return randomize_official_(model, seed + 1)


def layout(model) -> list:
    return [(k, tuple(v.shape), v.dtype) for k, v in model.state_dict().items()]


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("backbone", ["tiny", "small", "vit_base"])
def test_state_dict_layout(official, backbone, train):
    """Same keys, order, shapes and dtypes as the official model (VGG19 keys included with train=True),
    and the same submodule names (the VGG19's inner ones aside), its dropouts and identities included."""
    with offline_vgg():
        theirs = official.StylizingViT(backbone, train=train)
    ours = StylizingViT(backbone, train=train)
    assert layout(ours) == layout(theirs)
    names = lambda m: [n for n, _ in m.named_modules() if not n.startswith("vgg_encoder.")]
    assert names(ours) == names(theirs)


@pytest.mark.parametrize("backbone", ["tiny", "small"])
def test_eval_output(official, backbone):
    """train=False, 224 px: explicit style (batch 2) and, for tiny, x_style=None (batch 3, so that the
    roll direction shows; the roll path does not depend on the size and small costs ~4x tiny)."""
    theirs = build_official(official, backbone, train=False).eval()
    state = theirs.state_dict()
    x, x_style = images(3, seed=1), images(3, seed=2)
    cases = {"explicit style": (x[:2], x_style[:2])}
    if backbone == "tiny":
        cases["x_style=None"] = (x, None)
    with torch.no_grad():
        expected = {name: theirs(*args) for name, args in cases.items()}
        for backend in BACKENDS:
            ours = ours_from_state(state, backbone, False, backend).eval()
            for name, args in cases.items():
                assert_close_rel(ours(*args), expected[name], FP32, f"{backbone} {backend} {name}")


@pytest.mark.parametrize("bias", [True, False], ids=["biases", "no-biases"])
def test_seeded_init_is_the_officials(official, bias):
    """From the same seed the official constructor's init (MAE's sin-cos pos_embed, xavier linears and
    patch conv, cls_token N(0, 0.02^2), unit LayerNorms) gives the same weights, with and without the
    q/k/v and bottleneck biases (out_proj keeps its bias either way, as officially)."""
    kw = {"input_size": 48, "encoder_depth": 2, "encoder_qkv_bias": bias, "bottleneck_bias": bias}
    torch.manual_seed(0)
    theirs = official.create_model("tiny", train=False, **kw)
    torch.manual_seed(0)
    ours = StylizingViT("tiny", **kw)
    assert layout(ours) == layout(theirs)
    for (name, a), b in zip(ours.state_dict().items(), theirs.state_dict().values()):
        assert torch.equal(a, b), name


# The explicit-style path does not depend on the size; small runs the roll shortcut (3.6) only.
TRAIN_CASES = [("tiny", 2, False), ("tiny", 3, True), ("small", 3, True)]


@pytest.mark.parametrize("backbone,batch,rolled", TRAIN_CASES)
def test_training(official, backbone, batch, rolled):
    """train=True at 64 px: four losses, x_recon and gradients (see the module docstring for the bounds)."""
    theirs = build_official(official, backbone, train=True, input_size=TRAIN_SIZE)
    state = {k: v.clone() for k, v in theirs.state_dict().items()}
    x = images(batch, size=TRAIN_SIZE, seed=3)
    x_style = None if rolled else images(batch, size=TRAIN_SIZE, seed=4)
    what = f"{backbone} B={batch} {'roll' if rolled else 'explicit'}"

    loss_32, recon_32, _, ident_32 = train_outputs(theirs, x, x_style)
    theirs.double()
    x64, s64 = x.double(), None if rolled else x_style.double()
    loss_64, recon_64, grads_64, ident_64 = train_outputs(theirs, x64, s64)
    ident_bound = max(FP32, 1.5 * global_grad_error(ident_32, ident_64))

    for backend in BACKENDS:
        ours = ours_from_state(state, backbone, True, backend, input_size=TRAIN_SIZE)
        loss, recon, grads, ident = train_outputs(ours, x, x_style)
        for name, term, term_ref in zip(LOSS_FIELDS, loss, loss_32):
            assert_close_rel(term, term_ref, FP32, f"{what} {backend} loss {name}")
        assert_close_rel(recon, recon_32, FP32, f"{what} {backend} x_recon")
        err = global_grad_error(ident, ident_64)
        assert err <= ident_bound, (
            f"{what} {backend}: fp32 identity-term grad error {err:.3e} > {ident_bound:.3e}"
        )
        err = global_grad_error(grads, grads_64)
        assert err <= GRAD_FP32_NOISE, f"{what} {backend}: fp32 grad error {err:.3e}"

        loss, recon, grads, _ = train_outputs(ours.double(), x64, s64)
        for name, term, term_ref in zip(LOSS_FIELDS, loss, loss_64):
            assert_close_rel(term, term_ref, FP64_EXACT, f"{what} {backend} float64 loss {name}")
        assert_close_rel(recon, recon_64, FP64_EXACT, f"{what} {backend} float64 x_recon")
        err64 = global_grad_error(grads, grads_64)
        assert err64 <= FP64_EXACT, f"{what} {backend}: float64 grad error {err64:.3e}"


@pytest.mark.parametrize(
    "norm_layer",
    [torch.nn.LayerNorm, "nn.LayerNorm", functools.partial(torch.nn.LayerNorm, eps=1e-3)],
    ids=["class", "string", "partial-1e-3"],
)
def test_encoder_norm_layer_sets_the_layernorm_eps(official, norm_layer):
    """The official `encoder_norm_layer` in its three forms: nn.LayerNorm (eps 1e-5), the string (the
    official default, eps 1e-6) and a partial; the eps must reach every LayerNorm, as officially."""
    kw = {"input_size": 32, "encoder_depth": 2, "encoder_norm_layer": norm_layer}
    theirs = build_official(official, "tiny", train=False, **kw).eval()
    ours = StylizingViT("tiny", backend="torch", **kw)
    ours.load_state_dict(theirs.state_dict())
    x, x_style = images(2, 32, seed=1), images(2, 32, seed=2)
    with torch.no_grad():
        assert_close_rel(ours.eval()(x, x_style), theirs(x, x_style), FP32, "encoder_norm_layer")


def test_official_surface_beyond_forward(official):
    """What code written against the official model reaches besides forward: the encoder and block
    forwards, the encoder getters, the model's attributes, reconstruct_image and compute_loss, and the
    official utilities (resize_image on uint8, float and PIL input)."""
    import numpy as np
    from PIL import Image
    from stylizing_vit import util as official_util

    from fastvit_style import resize_image, util

    kw = {"input_size": 32, "encoder_depth": 2}
    theirs = build_official(official, "tiny", train=True, **kw).eval()
    ours = ours_from_state(theirs.state_dict(), "tiny", True, "torch", **kw).eval()
    x, x_style = images(2, 32, seed=1), images(2, 32, seed=2)
    with torch.no_grad():
        for a, b in zip(ours.encoder(x, x_style), theirs.encoder(x, x_style)):
            assert_close_rel(a, b, FP32, "encoder forward")
        tokens, context = torch.randn(2, 5, 192), torch.randn(2, 5, 192)
        block, their_block = ours.encoder.blocks[1], theirs.encoder.blocks[1]
        assert_close_rel(block(tokens, context), their_block(tokens, context), FP32, "block forward")
        assert torch.equal(block(tokens), their_block(tokens))  # Y=None: X as it is
        z_a, z_s = torch.randn(2, 5, 96), torch.randn(2, 5, 96)
        for remove_cls in (True, False):
            rows = slice(None) if remove_cls else slice(1, None)
            assert_close_rel(
                ours.reconstruct_image(z_a[:, rows], z_s[:, rows], remove_cls),
                theirs.reconstruct_image(z_a[:, rows], z_s[:, rows], remove_cls),
                FP32,
                "reconstruct_image",
            )
        imgs = [images(2, 32, seed=s) for s in range(5)]
        loss, their_loss = ours.compute_loss(*imgs), theirs.compute_loss(*imgs)
        for name in LOSS_FIELDS:
            assert_close_rel(getattr(loss, name), getattr(their_loss, name), FP32, f"compute_loss {name}")
    for name in ("get_input_size", "get_patch_size", "get_in_channel", "get_embed_dim"):
        assert getattr(ours.encoder, name)() == getattr(theirs.encoder, name)()
    for name in ENCODER_ATTRIBUTES:
        assert getattr(ours.encoder, name) == getattr(theirs.encoder, name), name
    for name in ("img_size", "patch_size", "grid_size", "num_patches"):
        assert getattr(ours.encoder.patch_embed, name) == getattr(theirs.encoder.patch_embed, name), name
    ours_attn, their_attn = ours.encoder.blocks[0].attn, theirs.encoder.blocks[0].attn
    assert (ours_attn.head_dim, ours_attn.scale) == (their_attn.head_dim, their_attn.scale)
    tokens, context = torch.randn(2, 5, 192), torch.randn(2, 5, 192)
    with torch.no_grad():
        assert_close_rel(ours_attn(tokens, context), their_attn(tokens, context), FP32, "attention forward")
    assert (ours.in_channel, ours.patch_size, ours.embed_dim) == (
        theirs.in_channel,
        theirs.patch_size,
        theirs.embed_dim,
    )

    patches = official_util.patchify_image(x, 3, 16)
    assert torch.equal(util.patchify_image(x, 3, 16), patches)
    assert torch.equal(util.unpatchify_image(patches, 16, 3), official_util.unpatchify_image(patches, 16, 3))
    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    assert torch.equal(util.normalize_image(x, mean, std), official_util.normalize_image(x, mean, std))
    assert torch.equal(
        util.denormalize_image(x[0], mean, std), official_util.denormalize_image(x[0], mean, std)
    )
    u8 = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    assert torch.equal(util.normalize_image(u8, mean, std), official_util.normalize_image(u8, mean, std))
    assert torch.equal(util.denormalize_image(u8, mean, std), official_util.denormalize_image(u8, mean, std))
    wide = torch.rand(3, 20, 50)
    assert_close_rel(resize_image(wide, 32), official_util.resize_image(wide, 32), 1e-5, "resize float")
    half = wide.half()
    assert_close_rel(
        resize_image(half, 32).float(), official_util.resize_image(half, 32).float(), 1e-3, "fp16"
    )
    pixels = torch.randint(0, 256, (3, 50, 20), dtype=torch.uint8)
    ours_u8, theirs_u8 = resize_image(pixels, 32, fill=7), official_util.resize_image(pixels, 32, fill=7)
    assert ours_u8.dtype == theirs_u8.dtype and (ours_u8.int() - theirs_u8.int()).abs().max() <= 1
    pil = Image.fromarray(np.random.default_rng(0).integers(0, 256, (40, 30, 3), dtype=np.uint8))
    assert (resize_image(pil, 32).int() - official_util.resize_image(pil, 32).int()).abs().max() <= 1


@pytest.mark.parametrize("workload", ["stylize", "stylize-roll", "train"])
def test_official_benchmark_backend(official, workload):
    """`bench/cpu_speed.py --official`: the official package, built with a custom config's kwargs and given
    the reference's weights, passes the benchmark's parity check against the reference."""
    register_backend("official", official_backend.factory, official=True)
    cfg = BenchConfig(
        workloads=(workload,),
        batch_sizes={workload: [2]},
        backends=("reference", "official"),
        model_kwargs={
            "input_size": TRAIN_SIZE,
            "encoder_depth": 2,
            "encoder_norm_layer": functools.partial(torch.nn.LayerNorm, eps=1e-5),
        },
    )
    rows = run_benchmark(cfg)["results"]
    assert [(r["backend"], r["status"]) for r in rows] == [("reference", "ok"), ("official", "ok")], rows
    assert rows[1]["rel_err"] <= (0 if workload != "train" else FP32)
