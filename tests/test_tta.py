"""Test-time augmentation: StyleBank + stylize against naive official forwards, TTAClassifier, image I/O,
the stylize/tta commands and the demo. A small model (32 px, 3 layers) keeps the file fast."""

import argparse
import copy
import csv
import importlib.util
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import TOLERANCE, assert_close_rel, images, leftover_name, linear_functional, randomize_
from torch import nn

from fastvit_style import StyleBank, StylizingViT, TTAClassifier, reference
from fastvit_style import style_bank as style_bank_mod
from fastvit_style import tta as tta_mod
from fastvit_style.apps import stylize as stylize_app
from fastvit_style.apps.common import OUTPUTS_MARKER
from fastvit_style.cli import main as cli_main
from fastvit_style.imageio import (
    denormalize,
    list_images,
    normalization,
    normalize,
    resize_pad,
    save_png,
    to_uint8,
)
from fastvit_style.tta import select_refs, stylize
from fastvit_style.weights import save_state_dict

FP32 = TOLERANCE[torch.float32]
SIZE, KW = 32, {"input_size": 32, "encoder_depth": 3}
R = 8  # references in the bank
HAS_PIL = importlib.util.find_spec("PIL") is not None
needs_pil = pytest.mark.skipif(not HAS_PIL, reason="reading images needs Pillow")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup():
    """(float64 reference model, float32 model, reference images (R, 3, S, S), bank of the float32 model)."""
    truth = randomize_(StylizingViT("tiny", backend="reference", **KW)).double()
    model = copy.deepcopy(truth).float()
    model.backend = "auto"
    refs = images(R, SIZE, seed=7)
    return truth, model, refs, StyleBank.from_images(model, refs, batch_size=3)  # 3: chunks of unequal size


def naive(truth, x, refs, index):
    """The official forward of every (image, reference) pair in float64, batched (samples are independent,
    shared doc 1.6) -> (B, K, C, H, W)."""
    B, K = index.shape
    with torch.no_grad():
        out = reference.forward(truth, x.double().repeat_interleave(K, 0), refs.double()[index.reshape(-1)])
    return out.unflatten(0, (B, K))


# ------------------------------------------------------------------------------------ exactness


@pytest.mark.parametrize("sampler", ["all", "refs", "random"])
@pytest.mark.parametrize("K", [1, 3, 8])
@pytest.mark.parametrize("B", [1, 5])
def test_stylize_matches_reference(setup, sampler, K, B):
    truth, model, refs, bank = setup
    x = images(B, SIZE, seed=B + K)
    if sampler == "all":  # the bank holds exactly the K references
        bank = StyleBank.from_images(model, refs[:K])
        index, kwargs = torch.arange(K).expand(B, K), {}
    elif sampler == "refs":  # explicit indices, repeats included
        index = torch.randint(0, 3 if K > 1 else R, (B, K), generator=torch.Generator().manual_seed(K))
        kwargs = {"refs": index}
    else:
        index = select_refs(R, B, k=K, generator=torch.Generator().manual_seed(3))
        kwargs = {"k": K, "generator": torch.Generator().manual_seed(3)}
    with torch.no_grad():
        out = stylize(model, x, bank, chunk_size=4, **kwargs)  # 4: several chunks, K=8 split in two
    assert out.shape == (B, K, 3, SIZE, SIZE)
    assert_close_rel(out, naive(truth, x, refs, index), FP32, f"{sampler} K={K} B={B}")


def test_a_reference_backend_model_stylizes_through_the_torch_op(setup):
    """backend='reference' has no schedule of its own for banks and stylize: they run the PyTorch op,
    with the reference's numbers (float64 here)."""
    truth, _, refs, _ = setup
    x = images(2, SIZE, seed=11)
    with torch.no_grad():
        out = stylize(truth, x.double(), StyleBank.from_images(truth, refs[:3].double()))
    expected = naive(truth, x, refs, torch.arange(3).expand(2, 3))
    assert_close_rel(out, expected, TOLERANCE[torch.float64], "backend='reference'")


def test_a_bank_built_from_kv_that_require_grad_stays_a_constant(setup):
    """A bank's K/V are constants to autograd, as its docstring says, also where its tensors were made by
    hand from ones that require grad: a stylization's gradient reaches the content, not them."""
    _, model, _, bank = setup
    k, v = bank.k.clone().requires_grad_(), bank.v.clone().requires_grad_()
    own = StyleBank(k, v, bank.config, bank.fingerprint)
    x = images(2, SIZE, seed=12).requires_grad_()
    stylize(model, x, own, refs=[[0], [1]]).sum().backward()
    assert k.grad is None and v.grad is None and not own.k.requires_grad
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_model_method_and_default_chunks(setup):
    truth, model, refs, bank = setup
    x = images(2, SIZE, seed=3)
    index = torch.tensor([[0, 5], [3, 5]])  # several images and references in one chunk; not symmetric
    with torch.no_grad():
        out = model.stylize(x, bank, refs=index)
        one_pair_at_a_time = model.stylize(x, bank, refs=index, chunk_size=1)
    assert_close_rel(out, naive(truth, x, refs, index), FP32, "model.stylize")
    assert_close_rel(one_pair_at_a_time, out, FP32, "model.stylize, chunk_size=1")


def test_chunks_hold_at_most_chunk_size_pairs(setup, monkeypatch):
    """The (image, reference) pairs of each batched call: whole images while their K pairs fit in
    chunk_size, else one image's K pairs in chunk_size slices; model.stylize passes chunk_size on."""
    _, model, _, bank = setup
    calls = []
    pairs = tta_mod._stylize_pairs
    monkeypatch.setattr(
        tta_mod, "_stylize_pairs", lambda m, x, b, i, a: calls.append(tuple(i.shape)) or pairs(m, x, b, i, a)
    )
    x, refs = images(3, SIZE, seed=13), torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 0]])
    with torch.no_grad():
        for chunk_size, expected in ((7, [(2, 3), (1, 3)]), (4, [(1, 3)] * 3), (2, [(1, 2), (1, 1)] * 3)):
            calls.clear()
            model.stylize(x, bank, refs=refs, chunk_size=chunk_size)
            assert calls == expected, chunk_size


def test_random_draws(setup):
    _, model, _, bank = setup
    draw = select_refs(R, 6, k=5, generator=torch.Generator().manual_seed(1))
    assert draw.shape == (6, 5) and all(len(set(row)) == 5 for row in draw.tolist())  # without replacement
    assert len({tuple(row) for row in draw.tolist()}) > 1  # drawn per image, not one draw for the batch
    assert torch.equal(draw, select_refs(R, 6, k=5, generator=torch.Generator().manual_seed(1)))
    assert not torch.equal(draw, select_refs(R, 6, k=5, generator=torch.Generator().manual_seed(2)))
    x = images(2, SIZE, seed=4)
    with torch.no_grad():
        a = stylize(model, x, bank, k=3, generator=torch.Generator().manual_seed(9))
        b = stylize(model, x, bank, k=3, generator=torch.Generator().manual_seed(9))
    assert torch.equal(a, b)


def test_autocast_and_grad(setup):
    _, model, _, bank = setup
    x = images(2, SIZE, seed=5)
    with torch.no_grad():
        full = stylize(model, x, bank, k=2, generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            low = stylize(model, x, bank, k=2, generator=torch.Generator().manual_seed(0))
        with torch.autocast("cpu", dtype=torch.bfloat16):  # a bank in the autocast dtype: same numbers
            low_bank = stylize(
                model, x, bank.to(dtype=torch.bfloat16), k=2, generator=torch.Generator().manual_seed(0)
            )
    assert low.dtype == torch.bfloat16 and not low.requires_grad
    assert_close_rel(low, full, TOLERANCE[torch.bfloat16], "bf16 autocast")
    assert torch.equal(low_bank, low)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):  # references in the autocast dtype
        amp_bank = StyleBank.from_images(model, images(2, SIZE, seed=8).bfloat16())
    assert amp_bank.dtype == torch.bfloat16  # computed in it: stored in it (next test)
    wide = r"bank.to\('cpu', torch.float32\) \(or torch.bfloat16, the autocast dtype\)"
    with pytest.raises(ValueError, match=wide), torch.autocast("cpu", dtype=torch.bfloat16):
        stylize(model, x, bank.to(dtype=torch.float64))
    with pytest.raises(ValueError, match="rebuild it"), torch.autocast("cpu", dtype=torch.bfloat16):
        stylize(model, x, bank.to(dtype=torch.float16))  # fp16's rounding would stay in a bf16 bank too
    x.requires_grad_(True)
    stylize(model, x, bank, k=1).sum().backward()  # grad mode is the caller's: gradients reach the input
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_a_bank_built_under_autocast_is_refused_outside_it(setup):
    """Under autocast the references' K/V are computed in the autocast dtype, so the bank holds that dtype:
    a float32 stylization refuses it, as it refuses a bank converted to bf16, rather than reading bf16
    roundings (measured: 2.5e-3 off the float64 truth where a float32 bank is 1e-6 off)."""
    truth, model, refs, _ = setup
    x = images(2, SIZE, seed=5)
    index = torch.arange(R).expand(2, R)
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp_bank = StyleBank.from_images(model, refs)
            low = stylize(model, x, amp_bank)
        assert amp_bank.dtype == torch.bfloat16 and low.dtype == torch.bfloat16
        assert_close_rel(low, naive(truth, x, refs, index), TOLERANCE[torch.bfloat16], "bf16 autocast bank")
        with pytest.raises(ValueError, match="bfloat16 on cpu but the model is torch.float32.*rebuild it"):
            stylize(model, x, amp_bank)


def test_stylize_gradient_reaches_the_image_as_the_official_forward_does(setup):
    """The gradient of a stylization at the content image, in float64, equals the official forward's
    (whose style images need none): through the stylized queries, the re-anchors' K/V (Y^i) and the
    content stream."""
    truth, _, refs, _ = setup
    bank = StyleBank.from_images(truth, refs[:3].double())
    index = torch.tensor([[0, 2], [1, 0]])
    x = images(2, SIZE, seed=12, dtype=torch.float64).requires_grad_()
    (got,) = torch.autograd.grad(linear_functional(stylize(truth, x, bank, refs=index)), x)
    out = reference.forward(truth, x.repeat_interleave(2, 0), refs.double()[index.reshape(-1)])
    (want,) = torch.autograd.grad(linear_functional(out.unflatten(0, (2, 2))), x)
    assert_close_rel(got, want, TOLERANCE[torch.float64], "d stylize / d x")


# ------------------------------------------------------------------------------------ the bank


def test_bank_layout_and_save_load(setup, tmp_path):
    _, model, refs, bank = setup
    cfg = model.config
    assert len(bank) == R and bank.k.shape == (cfg.depth, R, cfg.num_tokens, cfg.num_heads, cfg.head_dim)
    assert bank.nbytes == 2 * cfg.depth * R * cfg.num_tokens * cfg.embed_dim * 4
    assert_close_rel(
        StyleBank.from_images(model, refs, batch_size=R).v, bank.v, FP32, "chunks"
    )  # up to BLAS rounding
    path = bank.save(tmp_path / "bank.safetensors")
    assert [p for p in os.listdir(tmp_path)] == ["bank.safetensors"]  # no temporary left behind
    loaded = StyleBank.load(path, model=model)
    assert torch.equal(loaded.k, bank.k) and torch.equal(loaded.v, bank.v)
    assert loaded.config == bank.config and loaded.fingerprint == bank.fingerprint
    save_state_dict(model, tmp_path / "weights.safetensors")
    with pytest.raises(ValueError, match="not a StyleBank"):
        StyleBank.load(tmp_path / "weights.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="corrupt"):
        StyleBank.load(tmp_path / "junk.safetensors")


@pytest.mark.parametrize("path, shown", [(b"bank.safetensors", "bytes b'bank.safetensors'"), (3, "int 3")])
def test_a_bank_path_that_is_no_str_or_pathlike_is_refused_by_name(setup, tmp_path, monkeypatch, path, shown):
    """A bytes path failed inside (save: "a bytes-like object is required, not 'str'"; load of an existing
    file: safetensors' "argument 'filename': 'bytes' object is not an instance of 'str'"), an int with
    os.fspath's message, which names no argument."""
    monkeypatch.chdir(tmp_path)
    bank = setup[3]
    bank.save("bank.safetensors")
    match = rf"path must be a str or os.PathLike naming the style bank file, got {re.escape(shown)}$"
    with pytest.raises(TypeError, match=match):
        bank.save(path)
    with pytest.raises(TypeError, match=match):
        StyleBank.load(path)


def test_a_bank_file_whose_k_v_bytes_changed_is_refused(setup, tmp_path):
    """The header (shapes, dtype, config) is checked by reading it; the K/V bytes by a fingerprint of
    them written at save: one changed byte loaded without complaint and stylized with it."""
    bank = setup[3]
    path = bank.save(tmp_path / "bank.safetensors")
    data = bytearray(Path(path).read_bytes())
    data[-5] ^= 0x40  # inside v's last element
    (tmp_path / "edited.safetensors").write_bytes(bytes(data))
    with pytest.raises(
        ValueError, match=r"edited\.safetensors'.* K/V values differ from those it was saved with"
    ):
        StyleBank.load(tmp_path / "edited.safetensors")
    # A file written before the fingerprint was recorded still loads (nothing to check it against).
    import safetensors.torch

    meta = {k: v for k, v in safetensors.safe_open(path, "pt").metadata().items() if k != "kv_fingerprint"}
    safetensors.torch.save_file({"k": bank.k, "v": bank.v}, tmp_path / "old.safetensors", metadata=meta)
    assert torch.equal(StyleBank.load(tmp_path / "old.safetensors").v, bank.v)


@pytest.mark.parametrize("fingerprint", [5, None, b"abc", ""])
def test_a_bank_fingerprint_that_is_no_str_is_refused_at_construction(setup, fingerprint):
    """It failed only at save (safetensors: metadata values must be str)."""
    bank = setup[3]
    with pytest.raises(TypeError, match="fingerprint must be a non-empty str"):
        StyleBank(bank.k, bank.v, bank.config, fingerprint)


def test_a_bank_on_the_meta_device_is_refused_by_save(setup, tmp_path):
    """Its save failed in the copy to the CPU: NotImplementedError "Cannot copy out of meta tensor"."""
    with pytest.raises(ValueError, match="the style bank is on the meta device, which holds no values"):
        setup[3].to("meta").save(tmp_path / "bank.safetensors")
    assert not os.listdir(tmp_path)


def test_bank_refused_for_other_weights(setup, tmp_path, monkeypatch):
    _, model, _, bank = setup
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.bottleneck.fc1.bias[0] += 1
    x = images(1, SIZE)
    with pytest.raises(ValueError, match="built with other weights .fingerprints differ"):
        stylize(other, x, bank)
    with pytest.raises(ValueError, match="built with other weights"):
        StyleBank.load(bank.save(tmp_path / "b.safetensors"), model=other)
    shallow = StylizingViT("tiny", input_size=SIZE, encoder_depth=2)
    with pytest.raises(ValueError, match="other weights.*depth 3 vs 2"):
        stylize(shallow, x, bank)
    with pytest.raises(ValueError, match=r"bank\.to"):
        stylize(model, x, bank.to(dtype=torch.float64))
    # A model in another dtype has other weights: the advice is to rebuild (bank.to could never pass),
    # also for the very model that was checked, converted in place since.
    converted = copy.deepcopy(model)
    stylize(converted, x, bank, k=1)
    for double in (copy.deepcopy(model).double(), converted.double()):
        for offered in (bank, bank.to(dtype=torch.float64)):
            with pytest.raises(ValueError, match="fingerprints differ.*float64 in the model.*rebuild it"):
                stylize(double, x.double(), offered)
    # The fingerprint is computed once per (bank, model), not per call; from_images hashes the model it
    # encodes with once, and its bank needs no second hash.
    calls = []
    monkeypatch.setattr(style_bank_mod, "weight_fingerprint", lambda m: calls.append(m) or bank.fingerprint)
    fresh = StyleBank(bank.k, bank.v, bank.config, bank.fingerprint)
    for _ in range(3):
        stylize(model, x, fresh, k=1)
    assert len(calls) == 1
    made = StyleBank.from_images(model, images(1, SIZE, seed=2))
    for _ in range(2):
        stylize(model, x, made)
    assert len(calls) == 2


def test_bank_refused_once_the_model_is_written_in_place(setup):
    """An optimizer step after the bank was checked is seen at the next call; writing the same values
    back (load_state_dict) passes the check again; parameters replaced (assign=True) are seen too."""
    _, model, refs, _ = setup
    trained = copy.deepcopy(model)
    bank = StyleBank.from_images(trained, refs[:2])
    x = images(1, SIZE)
    before = stylize(trained, x, bank)
    saved = copy.deepcopy(trained.state_dict())
    for p in trained.parameters():
        p.grad = torch.randn_like(p)
    torch.optim.SGD(trained.parameters(), lr=1e-3).step()
    with pytest.raises(ValueError, match="built with other weights .fingerprints differ"):
        stylize(trained, x, bank)
    trained.load_state_dict(saved)
    torch.testing.assert_close(stylize(trained, x, bank), before, rtol=0, atol=0)
    other = randomize_(copy.deepcopy(model), seed=5).state_dict()
    trained.load_state_dict(other, assign=True)  # new parameter objects; the replaced ones are freed
    with pytest.raises(ValueError, match="built with other weights .fingerprints differ"):
        stylize(trained, x, bank)
    # The decoder too: however the bank meets a model (this one, a copy, a load), the same weights pass.
    trained.load_state_dict(saved)
    stylize(trained, x, bank)
    with torch.no_grad():
        trained.post_process_conv.weight.mul_(2)
    for user in (trained, copy.deepcopy(trained)):
        with pytest.raises(ValueError, match="built with other weights .fingerprints differ"):
            stylize(user, x, bank)


def test_bank_refused_once_an_inference_mode_model_loads_other_weights(setup):
    """Inference tensors have no version counter: a few of their values tell a load of other weights."""
    _, model, refs, _ = setup
    with torch.inference_mode():
        served = copy.deepcopy(model)  # inference tensors, as if built here
        assert served.encoder.pos_embed.is_inference()
        bank = StyleBank.from_images(served, refs[:2])
        x = images(1, SIZE)
        before = stylize(served, x, bank)
        served.load_state_dict(randomize_(copy.deepcopy(model), seed=6).state_dict())
        with pytest.raises(ValueError, match="built with other weights .fingerprints differ"):
            stylize(served, x, bank)
        served.load_state_dict(model.state_dict())
        torch.testing.assert_close(stylize(served, x, bank), before, rtol=0, atol=0)
    nan = torch.tensor([float("nan"), 1.0])  # values compared bit for bit: NaN weights are no change
    assert style_bank_mod._same_version(nan, nan.clone()) and not style_bank_mod._same_version(
        nan, torch.ones(2)
    )


def test_bank_sees_a_write_to_any_one_parameter_or_its_replacement(setup):
    """The version check sees one parameter written in place whatever the others' counters (a max of
    the counters would miss it here), and one parameter replaced and freed while the others live."""
    _, model, refs, _ = setup
    m = copy.deepcopy(model)
    with torch.no_grad():
        for _ in range(3):  # a high counter elsewhere, same values
            m.post_process_conv.weight.mul_(1.0)
    bank = StyleBank.from_images(m, refs[:1])
    x = images(1, SIZE)
    stylize(m, x, bank)
    with torch.no_grad():
        m.encoder.blocks[0].attn.q_proj.weight[0, 0] += 1  # its counter stays below the other's
    with pytest.raises(ValueError, match="built with other weights .fingerprints differ"):
        stylize(m, x, bank)
    m = copy.deepcopy(model)
    bank = StyleBank.from_images(m, refs[:1])
    stylize(m, x, bank)
    m.post_process_conv.weight = nn.Parameter(m.post_process_conv.weight.detach() * 2)  # the old one freed
    with pytest.raises(ValueError, match="built with other weights .fingerprints differ"):
        stylize(m, x, bank)


def test_a_float64_models_bank_is_not_taken_in_the_autocast_dtype(setup):
    """Autocast leaves float64 alone: a float64 model's attention would get a bf16 bank as it is (the
    op's 'q, k and v must share one dtype' from deep inside). The bank check names the problem."""
    truth, _, refs, _ = setup
    bank = StyleBank.from_images(truth, refs[:2].double())
    x = images(1, SIZE, dtype=torch.float64)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(stylize(truth, x, bank), stylize(truth, x, bank.to(torch.float64)))
        with pytest.raises(ValueError, match="torch.bfloat16 on cpu but the model is torch.float64.*rebuild"):
            stylize(truth, x, bank.to(torch.bfloat16))


def test_a_converted_bank_keeps_the_models_it_was_checked_against(setup, monkeypatch):
    """bank.to(dtype) carries the verified models: no second hash of the weights under autocast."""
    _, model, refs, _ = setup
    bank = StyleBank.from_images(model, refs[:1])
    calls = []
    monkeypatch.setattr(style_bank_mod, "weight_fingerprint", lambda m: calls.append(m) or bank.fingerprint)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        stylize(model, images(1, SIZE), bank.to(dtype=torch.bfloat16))
    assert calls == []


def test_bank_of_a_compiled_model_serves_the_model_and_its_compiled_calls(setup):
    """A bank made through a torch.compile wrapper knows the wrapped model: one entry, and a compiled
    stylization of the plain model traces (dynamo failed on two entries for one module)."""
    _, model, refs, _ = setup
    plain = copy.deepcopy(model)
    wrapper = torch.compile(plain, backend="eager")  # alive throughout: the bank holds it weakly
    bank = StyleBank.from_images(wrapper, refs[:2])
    x = images(2, SIZE)
    with torch.no_grad():
        eager = stylize(plain, x, bank)
        compiled = torch.compile(lambda x: stylize(plain, x, bank), backend="eager", fullgraph=True)(x)
    assert len(bank._checked) == 1 and wrapper is not None
    assert_close_rel(compiled, eager, FP32, "compiled stylization")


def test_a_stylization_with_given_refs_compiles_whole(setup):
    """refs given to a torch.compile(fullgraph=True) stylization: their range check is a runtime assert
    of the graph (a branch on their values stopped the compile), so refs out of the bank still raise."""
    _, model, _, bank = setup
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda x, refs: stylize(model, x, bank, refs=refs), backend="eager", fullgraph=True
    )
    x = images(2, SIZE)
    with torch.no_grad():
        # uint8: dynamo's tolist takes no unsigned dtype
        for refs, dtype in (
            ([[0, 7], [3, 3]], torch.long),
            ([[5, 1], [2, 6]], torch.long),
            ([[4, 0], [1, 7]], torch.uint8),
        ):
            refs = torch.tensor(refs, dtype=dtype)
            assert_close_rel(compiled(x, refs), stylize(model, x, bank, refs=refs), FP32, "compiled refs")
        with pytest.raises(RuntimeError, match="Runtime assertion failed"):
            compiled(x, torch.tensor([[0, R], [1, 2]]))


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"refs": torch.zeros(2, 1, dtype=torch.long)}, r"shape \(1, K\)"),
        ({"refs": torch.zeros(1, 0, dtype=torch.long)}, r"shape \(1, K\)"),
        ({"refs": torch.tensor([[0, R]])}, r"\[0, 8\)"),
        ({"refs": torch.tensor([[-1]])}, r"\[0, 8\)"),
        ({"refs": torch.zeros(1, 2)}, "integer"),
        ({"k": 0}, "1..8"),
        ({"k": R + 1}, "1..8"),
        ({"k": True}, "1..8"),
        ({"k": 1, "refs": torch.zeros(1, 1, dtype=torch.long)}, "not both"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"chunk_size": True}, "chunk_size"),
        ({"refs": [[0, 1], [2]]}, r"refs must be a \(B, K\) tensor or nested list"),  # ragged
    ],
)
def test_bad_arguments(setup, kwargs, match):
    _, model, _, bank = setup
    with pytest.raises(ValueError, match=match):
        stylize(model, images(1, SIZE), bank, **kwargs)


def test_select_refs_by_default_gives_every_image_its_own_row():
    """The default (every reference) is a tensor of its own, not a (B, R) view of one row, which an
    in-place edit by the caller (of make_views' refs, say) could not write."""
    refs = select_refs(4, 3)
    assert refs.tolist() == [[0, 1, 2, 3]] * 3 and refs.dtype == torch.int64
    refs[0, 0] = 2
    assert refs[1, 0] == 0


def test_select_refs_names_a_bad_bank_size_or_batch():
    """select_refs(0, 2) returned (2, 0) indices, a float batch failed in Tensor.expand."""
    for args, match in (((0, 2), "num_refs must be a positive int"), ((R, 2.0), "batch must be an int >= 0")):
        with pytest.raises(ValueError, match=match):
            select_refs(*args)
    with pytest.raises(ValueError, match="batch must be an int >= 0, got -1"):
        select_refs(R, -1, k=2)
    assert select_refs(R, 0, k=2).shape == (0, 2) and select_refs(np.int64(R), np.int64(1)).shape == (1, R)


def test_refs_on_the_meta_device_are_refused_by_name():
    """Their range check read their values: NotImplementedError "Cannot copy out of meta tensor"."""
    with pytest.raises(
        ValueError, match="refs must hold bank indices with values, got a tensor on the meta device"
    ):
        select_refs(R, 1, refs=torch.zeros(1, 2, dtype=torch.long, device="meta"))


@pytest.mark.parametrize("dtype", [torch.uint16, torch.uint32, torch.uint64])
def test_unsigned_indices_are_taken_and_checked(dtype):
    """Unsigned indices (numpy's np.uint64 arrays become torch.uint64) were a NotImplementedError of
    torch's min ("min_all" not implemented for 'UInt64')."""
    refs = torch.tensor([[1, 7], [0, 3]])
    assert torch.equal(select_refs(R, 2, refs=refs.to(dtype)), refs)
    assert torch.equal(select_refs(R, 2, refs=refs.numpy().astype(np.uint64)), refs)
    with pytest.raises(ValueError, match=r"\[0, 8\).*got min 0 and max 65535"):
        select_refs(R, 1, refs=torch.tensor([[0, 65535]]).to(dtype))


def test_bad_images(setup):
    _, model, _, bank = setup
    with pytest.raises(ValueError, match="shape"):
        stylize(model, images(1, 16), bank)
    with pytest.raises(ValueError, match=r"refs must have shape"):
        StyleBank.from_images(model, images(1, 16))
    with pytest.raises(ValueError, match="refs is an empty batch"):
        StyleBank.from_images(model, images(0, SIZE))
    with pytest.raises(ValueError, match="the model is on the meta device"):
        StyleBank.from_images(copy.deepcopy(model).to("meta"), images(1, SIZE))
    with pytest.raises(ValueError, match="the model is on the meta device"):
        stylize(copy.deepcopy(model).to("meta"), images(1, SIZE).to("meta"), bank)


def test_missing_images_are_named(setup):
    """None for the images passed the checks (taken as an absent style) and failed later on None.shape."""
    _, model, _, bank = setup
    calls = (
        lambda: stylize(model, None, bank),
        lambda: StyleBank.from_images(model, None),
        lambda: TTAClassifier(toy_classifier(), model, bank, k=2)(None),
        lambda: model(None),
    )
    for call, name in zip(calls, ("x", "refs", "x", "x")):
        with pytest.raises(TypeError, match=f"^{name} must be a torch.Tensor, got NoneType"):
            call()


def test_wrong_types_and_damaged_banks(setup, tmp_path):
    _, model, _, bank = setup
    x = images(1, SIZE)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        stylize(model, x, bank, k=2, generator=0)
    with pytest.raises(TypeError, match="bank must be a StyleBank"):
        stylize(model, x, bank.k)
    with pytest.raises(TypeError, match="bank k must be a floating-point torch.Tensor"):
        StyleBank([1], bank.v, bank.config, bank.fingerprint)
    with pytest.raises(TypeError, match="generator must be a torch.Generator"):
        TTAClassifier(toy_classifier(), model, bank, generator=0)
    with pytest.raises(ValueError, match="its folder does not exist"):
        bank.save(tmp_path / "missing" / "b.safetensors")
    import safetensors.torch

    damaged = str(tmp_path / "damaged.safetensors")
    safetensors.torch.save_file(
        {"k": bank.k, "v": bank.v}, damaged, metadata={"kind": style_bank_mod._BANK_TAG}
    )
    with pytest.raises(ValueError, match="damaged metadata"):
        StyleBank.load(damaged)
    for config in ({**bank.config, "colour": 1}, {**bank.config, "depth": "3"}):  # a newer or edited file
        meta = {"kind": style_bank_mod._BANK_TAG, "config": json.dumps(config), "fingerprint": "0"}
        safetensors.torch.save_file({"k": bank.k, "v": bank.v}, damaged, metadata=meta)
        with pytest.raises(ValueError, match="damaged metadata, or one written by another version"):
            StyleBank.load(damaged)
    with pytest.raises(FileNotFoundError, match="is a folder, not a StyleBank file"):
        StyleBank.load(tmp_path)
    with pytest.raises(ValueError, match="it is a folder"):
        bank.save(tmp_path)
    with pytest.raises(TypeError, match="classifier must be an nn.Module"):
        TTAClassifier(lambda x: x.mean((2, 3)), model, bank)
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        TTAClassifier(toy_classifier(), model, bank, chunk_size=0)
    half = bank.to(torch.float16)  # a dtype first, as for a tensor
    assert half.dtype == torch.float16 and half.device == bank.device
    # Converting it back would keep half's rounding (7e-5 against the reference): rebuild instead.
    with pytest.raises(ValueError, match=r"torch.float16 on cpu but the model is torch.float32.*rebuild it"):
        stylize(model, x, half)
    for path in ("", str(tmp_path / "new") + os.sep):  # no file name: the temporary would land above
        with pytest.raises(ValueError, match="cannot save the style bank.*(empty|a folder)"):
            bank.save(path)
    assert not (tmp_path / "new").exists()
    # Arguments swapped, or not a model: named, not an AttributeError from deep inside.
    with pytest.raises(TypeError, match="stylizer must be a fastvit_style StylizingViT, got Sequential"):
        TTAClassifier(model, toy_classifier(), bank)
    with pytest.raises(TypeError, match="model must be a fastvit_style StylizingViT, got a torch.float32"):
        StyleBank.from_images(images(2, SIZE), model)
    with pytest.raises(TypeError, match="model must be a fastvit_style StylizingViT, got str 'tiny'"):
        StyleBank.load(bank.save(tmp_path / "b.safetensors"), "tiny")
    with pytest.raises(TypeError, match="model must be a fastvit_style StylizingViT"):
        stylize(toy_classifier(), x, bank)


def test_bank_check_and_verify_take_wrapped_models_and_name_other_arguments(setup):
    """The public checks see through DataParallel as from_images, load and stylize do; anything else is
    named, not an AttributeError ('DataParallel' object has no attribute 'encoder')."""
    _, model, _, bank = setup
    for check in (bank.check, bank.verify):
        check(nn.DataParallel(model))
        with pytest.raises(TypeError, match="model must be a fastvit_style StylizingViT, got str 'tiny'"):
            check("tiny")


@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")  # torch.compile's imports
def test_wrapped_models_build_and_use_banks(setup, tmp_path):
    """DataParallel (or DDP, torch.compile) around the model: the bank, stylize and TTAClassifier use the
    model inside."""
    _, model, refs, bank = setup
    wrapped = nn.DataParallel(model)
    assert torch.equal(StyleBank.from_images(wrapped, refs, batch_size=3).k, bank.k)
    x = images(2, SIZE)
    with torch.no_grad():
        assert torch.equal(stylize(wrapped, x, bank), stylize(model, x, bank))
        tta = TTAClassifier(toy_classifier(), wrapped, bank, k=None).eval()
        assert tta.stylizer is model
        assert torch.equal(tta(x), TTAClassifier(toy_classifier(), model, bank, k=None).eval()(x))
    compiled = torch.compile(model)  # nothing compiles: the stylization never calls the model
    assert torch.equal(StyleBank.load(bank.save(tmp_path / "b.safetensors"), compiled).k, bank.k)
    with torch.no_grad():
        assert torch.equal(stylize(compiled, x, bank), stylize(model, x, bank))


# ------------------------------------------------------------------------------------ TTAClassifier


def toy_classifier(num_classes: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(12, num_classes)).eval()


def test_return_views_must_be_a_flag(setup):
    """A string "no" was true: the views came back where the caller asked for none."""
    _, model, _, bank = setup
    tta = TTAClassifier(toy_classifier(), model, bank, k=2)
    with torch.no_grad(), pytest.raises(ValueError, match="return_views must be True or False, got 'no'"):
        tta(images(1, SIZE, seed=6), return_views="no")


@pytest.mark.parametrize("include_original", [True, False])
def test_tta_mean_prob(setup, include_original):
    _, model, _, bank = setup
    clf = toy_classifier()
    tta = TTAClassifier(
        clf, model, bank, k=3, include_original=include_original, generator=torch.Generator().manual_seed(0)
    )
    x = images(2, SIZE, seed=6)
    with torch.no_grad():
        probs, views = tta(x, return_views=True)
    V = 3 + include_original
    assert tta.num_views == V and probs.shape == (2, 4) and views.shape == (2, V, 4)
    assert torch.allclose(probs.sum(-1), torch.ones(2)) and torch.allclose(probs, views.mean(1))
    with torch.no_grad():
        refs = select_refs(R, 2, k=3, generator=torch.Generator().manual_seed(0))
        stylized = stylize(model, x, bank, refs=refs)
        expected = clf(stylized.flatten(0, 1)).softmax(-1).unflatten(0, (2, 3))
        if include_original:
            expected = torch.cat([clf(x).softmax(-1)[:, None], expected], 1)
    torch.testing.assert_close(views, expected)


@pytest.mark.parametrize("flag", ["False", 2.0, 2])
def test_include_original_must_be_a_bool(setup, flag):
    """A string "False" is truthy: the original view was silently kept (and None dropped it, after which
    num_views failed). NumPy's bools and None are taken, as the model's flags."""
    _, model, _, bank = setup
    with pytest.raises(ValueError, match="include_original must be True or False"):
        TTAClassifier(toy_classifier(), model, bank, k=2, include_original=flag)
    for false in (np.False_, None):
        assert TTAClassifier(toy_classifier(), model, bank, k=2, include_original=false).num_views == 2


def test_tta_stylizer_runs_without_autograd(setup):
    """The stylizer is frozen: under grad mode the gradient reaches x through the original view only,
    and no stylizer weight (the classifier's weights get theirs)."""
    _, model, _, bank = setup
    stylizer = copy.deepcopy(model)  # parameters that require grad
    clf = toy_classifier()
    tta = TTAClassifier(clf, stylizer, bank, k=2, generator=torch.Generator().manual_seed(0))
    x = images(2, SIZE, seed=6).requires_grad_(True)
    views, _ = tta.make_views(x)
    tta.aggregate(tta.classify(views))[:, 1].sum().backward()
    assert all(p.grad is None for p in stylizer.parameters())
    assert all(p.grad is not None for p in clf.parameters())
    original = x.detach().clone().requires_grad_(True)
    constants = torch.cat([original[:, None], views[:, 1:].detach()], dim=1)
    tta.aggregate(tta.classify(constants))[:, 1].sum().backward()
    assert_close_rel(x.grad, original.grad, FP32, "gradient through the original view")


def test_a_classifier_left_in_training_mode_is_warned_about_once(setup):
    _, model, _, bank = setup
    x = images(2, SIZE)
    torch.manual_seed(0)
    clf = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(2))
    tta = TTAClassifier(clf, model, bank, k=2)
    with pytest.warns(UserWarning, match="in training mode, with batch norm or dropout"):
        tta(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tta(x)  # once
        tta.eval()(x)  # evaluation, as documented: silent
        TTAClassifier(toy_classifier(), model, bank, k=2)(x)  # no layer that training mode changes
    late = TTAClassifier(clf, model, bank, k=2).eval()
    clf.train()  # the classifier's own mode counts, set after the TTAClassifier's
    with pytest.warns(UserWarning, match="in training mode"):
        late(x)


@pytest.mark.parametrize("output", ["tuple", "scalar", "rows"])
def test_a_classifier_without_per_view_logits_is_named(setup, output):
    _, model, _, bank = setup

    class Odd(nn.Module):
        def forward(self, x):
            logits = x.flatten(1)[:, :4]
            return {"tuple": (logits, x), "scalar": logits.sum(), "rows": logits[:1]}[output]

    with pytest.raises(ValueError, match=r"logits of shape \(6, num_classes\) for 6 images"):
        TTAClassifier(Odd(), model, bank, k=2)(images(2, SIZE))


def test_a_classifier_with_one_logit_is_refused(setup):
    """A binary classifier's single logit would give a softmax of 1: class 0 for every image."""
    _, model, _, bank = setup
    with pytest.raises(ValueError, match=r"one logit per image, shape \(6, 1\).*torch.zeros_like"):
        TTAClassifier(toy_classifier(1), model, bank, k=2)(images(2, SIZE))


@pytest.mark.parametrize("reduce", ["mean_prob", "vote"])
def test_classify_and_aggregate_refuse_inputs_without_a_view_axis(setup, reduce):
    """aggregate averaged (B, num_classes) over the classes, (B, 0, num_classes) gave NaN and vote an
    IndexError for no class; classify of (B, C, H, W) failed inside the classifier."""
    _, model, _, bank = setup
    tta = TTAClassifier(toy_classifier(), model, bank, k=2, reduce=reduce)
    for probs in (
        torch.rand(3, 4),
        torch.rand(3, 0, 4),
        torch.rand(3, 2, 0),
        torch.zeros(3, 2, 4, dtype=torch.long),
    ):
        with pytest.raises(ValueError, match=r"view_probs must be a floating-point \(B, V, num_classes\)"):
            tta.aggregate(probs)
    with pytest.raises(ValueError, match=r"views must be a \(B, V, C, H, W\) batch.*shape \(2, 3, 32, 32\)"):
        tta.classify(images(2, SIZE))


def test_tta_vote_and_all_refs(setup):
    _, model, _, bank = setup
    tta = TTAClassifier(toy_classifier(3), model, bank, k=None, reduce="vote").eval()
    with torch.no_grad():
        probs, views = tta(images(3, SIZE, seed=8), return_views=True)
    assert views.shape == (3, R + 1, 3)
    assert tta.to("cpu") is tta and tta.bank.device.type == "cpu"  # .to() carries the bank along
    counts = torch.stack([torch.bincount(v.argmax(-1), minlength=3) for v in views]).float()
    torch.testing.assert_close(probs, counts / (R + 1))
    with pytest.raises(ValueError, match="reduce"):
        TTAClassifier(toy_classifier(), model, bank, reduce="median")
    with pytest.raises(ValueError, match="1..8"):
        TTAClassifier(toy_classifier(), model, bank, k=R + 1)
    tied = torch.tensor([[[0.6, 0.4], [0.3, 0.7]]])  # one vote each: the histogram ties, argmax picks class 0
    assert tta.aggregate(tied).argmax().item() == 0
    # A view without probabilities (NaN logits) is no vote for the class argmax would call it.
    lost = torch.tensor([[[0.6, 0.4], [0.3, 0.7]], [[0.2, 0.8], [0.1, float("nan")]]])
    votes = tta.aggregate(lost)
    assert votes[0].tolist() == [0.5, 0.5] and votes[1].isnan().all()


def test_tta_autocast_and_compiled_classifier(setup):
    """Autocast end to end; the classifier compiled (eager backend: the tracing, not inductor's compile time)."""
    _, model, _, bank = setup
    clf = toy_classifier()
    tta = TTAClassifier(
        torch.compile(clf, backend="eager", fullgraph=True),
        model,
        bank,
        k=2,
        generator=torch.Generator().manual_seed(0),
    )
    x = images(2, SIZE, seed=9)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        probs = tta(x)
    assert probs.dtype == torch.float32 and torch.allclose(probs.sum(-1), torch.ones(2))
    with torch.no_grad():
        exact = TTAClassifier(clf, model, bank, k=2, generator=torch.Generator().manual_seed(0))(x)
    torch.testing.assert_close(probs, exact, atol=2e-2, rtol=0)


def test_a_compiled_tta_classifier_takes_batches_of_any_size(setup):
    """torch.compile around a TTAClassifier drawing k references from the global RNG: the draw is in
    the graph, at a dynamic batch size from the second size on (a dataset's short last batch), with
    the draws of an eager call from the same seed; the sizes within one chunk share that graph."""
    _, model, _, bank = setup
    torch._dynamo.reset()
    tta = TTAClassifier(toy_classifier(), model, bank, k=2)
    graphs = []
    compiled = torch.compile(tta, backend=lambda gm, _: graphs.append(gm) or gm.forward, fullgraph=True)
    for B in (1, 3, 2, 4):
        x = images(B, SIZE, seed=B)
        with torch.no_grad():
            torch.manual_seed(B)
            probs = compiled(x)
            torch.manual_seed(B)
            assert_close_rel(probs, tta(x), FP32, f"compiled TTA, {B} images")
    assert len(graphs) == 2, f"{len(graphs)} graphs for 4 batch sizes: a loop fixed the batch size"


def test_views_are_in_the_images_dtype_under_autocast(setup):
    """make_views hands the classifier x's dtype under autocast, also without the original view (whose
    concatenation would otherwise promote the bf16 stylizations)."""
    _, model, _, bank = setup
    x = images(2, SIZE, seed=10)
    for include_original in (True, False):
        tta = TTAClassifier(toy_classifier(), model, bank, k=2, include_original=include_original)
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            views, refs = tta.make_views(x)
        assert views.dtype == torch.float32 and views.shape == (2, 2 + include_original, 3, SIZE, SIZE)
        assert refs.shape == (2, 2)


# ------------------------------------------------------------------------------------ image I/O


def decode_png(data: bytes) -> np.ndarray:
    """Minimal reader for the unfiltered 8-bit PNGs png_bytes writes (so the test needs no Pillow)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, {}
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        assert struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])[0] == zlib.crc32(tag + body)
        chunks[tag] = chunks.get(tag, b"") + body
        pos += 12 + n
    w, h, depth, color = struct.unpack(">IIBB", chunks[b"IHDR"][:10])
    c = 3 if color == 2 else 1
    rows = np.frombuffer(zlib.decompress(chunks[b"IDAT"]), np.uint8).reshape(h, 1 + w * c)
    assert depth == 8 and (rows[:, 0] == 0).all()
    return rows[:, 1:].reshape(h, w, c)


def test_png_and_preprocessing(tmp_path):
    x = torch.rand(3, 5, 7)
    path = save_png(x, tmp_path / "sub" / "a.png")
    assert np.array_equal(decode_png((tmp_path / "sub" / "a.png").read_bytes()), to_uint8(x))
    assert np.array_equal(to_uint8(torch.tensor([-1.0, 0.5, 2.0]).view(3, 1, 1)).ravel(), [0, 128, 255])
    if HAS_PIL:
        from PIL import Image

        assert np.array_equal(np.array(Image.open(path)), to_uint8(x))
    wide = resize_pad(torch.ones(3, 10, 20), 8)  # longer side 20 -> 8, the other int(8*10/20) = 4, centred
    assert wide.shape == (3, 8, 8)
    torch.testing.assert_close(wide[0, :, 0], torch.tensor([0.0, 0, 1, 1, 1, 1, 0, 0]))
    odd = resize_pad(torch.ones(3, 10, 16), 8)  # the other side int(8*10/16) = 5: the odd pixel goes below
    torch.testing.assert_close(odd[0, :, 0], torch.tensor([0.0, 1, 1, 1, 1, 1, 0, 0]))
    torch.testing.assert_close(resize_pad(torch.ones(1, 16, 10), 8)[0, 0], odd[0, :, 0])  # and right
    mean, std = normalization("camelyon17wilds")
    torch.testing.assert_close(denormalize(normalize(x, mean, std), mean, std), x)
    assert normalization(mean=[0.5] * 3, std=[0.2] * 3) == ((0.5,) * 3, (0.2,) * 3)
    with pytest.raises(ValueError, match="no normalization constants"):
        normalization("imagenet")
    # Datasets of official weights without constants (none in the official code either) say so.
    for name, named in (("ddi", "'ddi' (ddi_12_34_56), and"), ("cholec80", "'cholec80', and")):
        with pytest.raises(ValueError, match=rf"dataset {re.escape(named)} the official code has none"):
            normalization(name)
    for bad in (float("nan"), float("inf")):  # NaN slips through `std <= 0`: all-NaN inputs, silently
        with pytest.raises(ValueError, match="3 finite values each"):
            normalization(mean=[0.5] * 3, std=[bad, 1, 1])
        with pytest.raises(ValueError, match="3 finite values each"):
            normalization(mean=[bad, 0, 0], std=[1] * 3)
    # float32 would turn a std of 1e-300 into inf; constants on the 0-255 scale would give garbage.
    for mean, std in (
        ([0.5] * 3, [1e-300, 1, 1]),
        ([123.7, 116.3, 103.5], [58.4, 57.1, 57.4]),
        ([-0.1] * 3, [0.2] * 3),
    ):
        with pytest.raises(
            ValueError, match=r"for images in \[0, 1\]: each mean in \[0, 1\] and each std in \[0.0001, 1\]"
        ):
            normalization(mean=mean, std=std)
    with pytest.raises(ValueError, match="the dataset name is empty"):
        normalization("")
    # Hidden files are left out: macOS's "._a.png" resource forks, an editor's ".e.tiff" backup.
    for name in ("b/c.JPG", "a.png", "b/d.txt", "e.tiff", "._a.png", "b/.e.tiff"):
        os.makedirs(tmp_path / "imgs" / os.path.dirname(name), exist_ok=True)
        (tmp_path / "imgs" / name).write_bytes(b"")
    os.mkfifo(tmp_path / "imgs" / "pipe.png")  # listed, a reader would block: here the listing fails
    found = [os.path.relpath(p, tmp_path / "imgs") for p in list_images(tmp_path / "imgs")]
    assert found == ["a.png", os.path.join("b", "c.JPG"), "e.tiff"]


# ------------------------------------------------------------------------------------ CLI and demo


@pytest.fixture()
def folders(setup, tmp_path):
    """weights file of the small model, 2 content and 3 style PNGs of assorted sizes."""
    _, model, _, _ = setup
    weights = save_state_dict(model, tmp_path / "w.safetensors")
    gen = torch.Generator().manual_seed(0)
    for folder, sizes in (("content", [(40, 40), (30, 50)]), ("styles", [(32, 32), (64, 20), (16, 16)])):
        for i, (h, w) in enumerate(sizes):
            save_png(torch.rand(3, h, w, generator=gen), tmp_path / folder / f"img{i}.png")
    base = [
        "--weights",
        weights,
        "--backbone",
        "tiny",
        "--model-kwargs",
        '{"input_size": 32, "encoder_depth": 3}',
        "--device",
        "cpu",
    ]
    return tmp_path, base


def pngs(folder) -> list[str]:
    """The images a command wrote to `folder`, sorted (its hidden marker file left out)."""
    return sorted(n for n in os.listdir(folder) if n.endswith(".png"))


def run_stylize(tmp, base, out: str, *extra: str) -> int:
    content, styles = str(tmp / "content"), str(tmp / "styles")
    return cli_main(
        ["stylize", *base, "--content", content, "--styles", styles, "--out", str(tmp / out), *extra]
    )


def expected_pixels(model, tmp) -> list:
    """[c][s]: content image c of tmp/content stylized by style image s of tmp/styles through the API,
    denormalized, as int (H, W, 3) pixels."""
    from fastvit_style.imageio import load_batch

    mean, std = normalization()
    x = load_batch(list_images(tmp / "content"), SIZE, mean, std)
    bank = StyleBank.from_images(model, load_batch(list_images(tmp / "styles"), SIZE, mean, std))
    with torch.no_grad():
        out = denormalize(stylize(model, x, bank), mean, std)
    return [[to_uint8(image).astype(int) for image in row] for row in out]


def drawn(k: int, seed: int, num_images: int = 2, num_refs: int = 3) -> list[tuple[int, int]]:
    """The (image, reference) pairs --k k --seed seed give one batch of num_images images."""
    draw = select_refs(num_refs, num_images, k=k, generator=torch.Generator().manual_seed(seed))
    return [(c, s) for c, row in enumerate(draw.tolist()) for s in row]


def assert_stylized_pngs(folder, expected: list, pairs) -> None:
    """folder holds img<c>__img<s>.png for exactly the (c, s) in pairs, each the API's stylization of
    that pair (to one uint8 step)."""
    from PIL import Image

    assert pngs(folder) == sorted(f"img{c}__img{s}.png" for c, s in pairs)
    for c, s in pairs:
        got = np.array(Image.open(folder / f"img{c}__img{s}.png")).astype(int)
        assert np.abs(got - expected[c][s]).max() <= 1, f"img{c}__img{s}.png"


@needs_pil
def test_cli_stylize(setup, folders):
    """Every output is the API's stylization of the pair its name gives, also for --k draws (made
    with --seed) and for several images per batch."""
    _, model, _, _ = setup
    tmp, base = folders
    expected, every = expected_pixels(model, tmp), [(c, s) for c in range(2) for s in range(3)]
    assert run_stylize(tmp, base, "out", "--batch-size", "1") == 0
    assert_stylized_pngs(tmp / "out", expected, every)
    pairs = drawn(2, seed=5)
    assert pairs != drawn(2, seed=6) and any(s != j for j, (_, s) in enumerate(pairs[:2]))
    assert run_stylize(tmp, base, "out_k", "--k", "2", "--seed", "5") == 0  # both images in one batch
    assert_stylized_pngs(tmp / "out_k", expected, pairs)
    for k in ("0", "3"):  # 0: all, as in tta; 3: as many as there are styles
        assert run_stylize(tmp, base, f"out_{k}", "--k", k) == 0
        assert_stylized_pngs(tmp / f"out_{k}", expected, every)
    with pytest.raises(SystemExit, match=r"--k must lie in 0\.\.3"):
        run_stylize(tmp, base, "out_4", "--k", "4")


@needs_pil
def test_cli_stylize_refuses_non_finite_outputs(setup, folders, capsys):
    """Weights holding a NaN (a diverged run's) give NaN images, which a PNG would show as black: the
    run stops with an error line naming a pair instead of writing them."""
    _, model, _, _ = setup
    tmp, base = folders
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.encoder.blocks[0].attn.q_proj.weight[0, 0] = float("nan")
    base[1] = save_state_dict(broken, tmp / "nan.safetensors")
    assert run_stylize(tmp, base, "out") == 1
    err = capsys.readouterr().err
    assert "error: the stylizer gave NaN or infinite values for 6 images of this batch (first: content" in err
    assert repr(str(tmp / "content" / "img0.png")) in err and pngs(tmp / "out") == []


def folder_bytes(folder) -> dict[str, bytes]:
    """{name: bytes} of the images a command wrote to `folder`."""
    return {name: (folder / name).read_bytes() for name in pngs(folder)}


def counting(monkeypatch, name: str) -> list:
    """The arguments of every call of fastvit_style.apps.stylize's `name`, which still runs."""
    calls, real = [], getattr(stylize_app, name)
    monkeypatch.setattr(stylize_app, name, lambda *a, **kw: calls.append(a) or real(*a, **kw))
    return calls


@needs_pil
@pytest.mark.parametrize("options", [[], ["--k", "2", "--seed", "1"]], ids=["all", "k"])
def test_cli_stylize_skip_existing_resumes_a_stopped_run(folders, monkeypatch, capsys, options):
    """A run stopped at an unreadable content image keeps what it wrote; rerun with --skip-existing it
    reads and stylizes only the images whose outputs are missing, writes just those, and the folder is
    then byte for byte an uninterrupted run's, also with --k (the skipped batch's draw is still drawn)."""
    tmp, base = folders
    opts = [*options, "--batch-size", "1"]
    if options:  # batch 1 draws other styles than batch 0: a resume that drew only its own would differ
        gen = torch.Generator().manual_seed(1)
        assert set(select_refs(3, 1, k=2, generator=gen).tolist()[0]) != set(
            select_refs(3, 1, k=2, generator=gen).tolist()[0]
        )
    assert run_stylize(tmp, base, "full", *opts) == 0
    full = folder_bytes(tmp / "full")
    img1 = tmp / "content" / "img1.png"
    png = img1.read_bytes()
    img1.write_bytes(png[: len(png) // 2])
    capsys.readouterr()
    assert run_stylize(tmp, base, "out", *opts) == 1
    err = capsys.readouterr().err
    half = len(full) // 2
    assert f"note: {half} of {len(full)} images are in {str(tmp / 'out')!r}: --skip-existing" in err, err
    assert "\nerror: cannot decode image" in err and sorted(folder_bytes(tmp / "out")) == sorted(full)[:half]
    img1.write_bytes(png)
    loaded, stylized, saved = (counting(monkeypatch, n) for n in ("load_batch", "stylize", "save_output_png"))
    assert run_stylize(tmp, base, "out", *opts, "--skip-existing") == 0
    assert [paths for paths, *_ in loaded[1:]] == [[str(img1)]] and len(stylized) == 1  # [0]: the styles
    assert len(saved) == half and folder_bytes(tmp / "out") == full
    assert f"wrote {half} images to {tmp / 'out'} (skipped {half} that exist: --skip-existing)" in (
        capsys.readouterr().out
    )
    del loaded[:], stylized[:], saved[:]
    assert run_stylize(tmp, base, "out", *opts) == 0  # without the flag: every pair again, as before
    assert len(loaded) == 3 and len(stylized) == 2 and len(saved) == len(full)
    assert folder_bytes(tmp / "out") == full


@needs_pil
def test_cli_stylize_skip_existing_reruns_a_partly_written_batch_whole(folders, monkeypatch, capsys):
    """A batch with one missing output (a stop amid its writes) is stylized whole, as the stopped run
    stylized it (a smaller batch's floats can differ in the last bits, and so a PNG's pixels), and only
    the missing image is written; a complete folder is not read at all; links are not outputs; what a
    killed write of a skipped image left is removed, as its write would."""
    tmp, base = folders
    assert run_stylize(tmp, base, "out") == 0  # both content images in one batch
    full = folder_bytes(tmp / "out")
    (tmp / "out" / "img1__img2.png").unlink()
    (tmp / "out" / "img0__img1.png").unlink()
    (tmp / "out" / "img0__img1.png").symlink_to(tmp / "styles" / "img1.png")  # a run writes no links
    stale = tmp / "out" / leftover_name("img1__img0.png")  # a killed rewrite's, of a file that exists
    stale.write_bytes(b"partial")
    loaded, stylized, saved = (counting(monkeypatch, n) for n in ("load_batch", "stylize", "save_output_png"))
    assert run_stylize(tmp, base, "out", "--skip-existing") == 0
    assert len(loaded[1]) and len(loaded[1][0]) == 2 and len(stylized) == 1
    assert sorted(name for _, _, name, _ in saved) == ["img0__img1.png", "img1__img2.png"]
    assert folder_bytes(tmp / "out") == full and not (tmp / "out" / "img0__img1.png").is_symlink()
    assert not stale.exists()
    del loaded[:], stylized[:], saved[:]
    capsys.readouterr()
    assert run_stylize(tmp, base, "out", "--skip-existing") == 0
    assert len(loaded) == 1 and stylized == [] and saved == []  # [0]: the styles, for the bank
    assert "wrote 0 images" in capsys.readouterr().out


@needs_pil
def test_cli_stylize_interrupted_amid_a_batchs_writes_says_how_to_resume(folders, monkeypatch, capsys):
    """Ctrl-C (or SIGTERM, which unwinds alike) between two writes of a batch: status 130, a note of how
    many images are in --out and that --skip-existing continues, which writes the rest."""
    tmp, base = folders
    assert run_stylize(tmp, base, "full") == 0
    full = folder_bytes(tmp / "full")
    real = stylize_app.save_output_png

    def stopped_at_the_third(*args):
        if len(pngs(tmp / "out")) == 2:
            raise KeyboardInterrupt
        real(*args)

    monkeypatch.setattr(stylize_app, "save_output_png", stopped_at_the_third)
    capsys.readouterr()
    assert run_stylize(tmp, base, "out") == 130
    err = capsys.readouterr().err
    assert f"note: 2 of 6 images are in {str(tmp / 'out')!r}: --skip-existing (with the same" in err, err
    assert err.endswith("\ninterrupted\n") and len(pngs(tmp / "out")) == 2
    monkeypatch.undo()
    assert run_stylize(tmp, base, "out", "--skip-existing") == 0 and folder_bytes(tmp / "out") == full


@needs_pil
def test_cli_refuses_a_folder_at_an_output_name_before_any_work(folders, monkeypatch):
    """A folder in the output folder named as an output image (`<content>__<style>.png`) would fail that
    image's write, after the work of every batch before it: stylize and tta --save-stylized refuse it
    before the model loads; a folder no output is named as, and a file at an output name, are fine."""
    tmp, base = folders
    out = tmp / "out"
    (out / "img1__img2.png").mkdir(parents=True)
    (out / "img1__img2.png" / "mine.txt").write_text("mine")
    (out / "img1__img9.png").mkdir()
    monkeypatch.setattr(
        "fastvit_style.apps.stylize.load_stylizer", lambda *a: pytest.fail("loaded the model")
    )
    message = (
        f"--out {str(out)!r} holds a folder 'img1__img2.png', the name of the output of content "
        f"{str(tmp / 'content' / 'img1.png')!r} with style {str(tmp / 'styles' / 'img2.png')!r}: move or rename "
        "that folder"
    )
    with pytest.raises(SystemExit, match=re.escape(message)):
        run_stylize(tmp, base, "out")
    tta = [
        "tta",
        *base,
        "--refs",
        str(tmp / "styles"),
        "--images",
        str(tmp / "content"),
        "--out",
        str(tmp / "p.csv"),
    ]
    with pytest.raises(SystemExit, match="--save-stylized .* holds a folder 'img1__img2.png'"):
        cli_main([*tta, "--classifier", "x:y", "--save-stylized", str(out)])
    assert (out / "img1__img2.png" / "mine.txt").read_text() == "mine" and pngs(out) == [
        "img1__img2.png",
        "img1__img9.png",
    ]
    monkeypatch.undo()
    (out / "img1__img2.png" / "mine.txt").unlink()
    (out / "img1__img2.png").rmdir()
    (out / OUTPUTS_MARKER).write_text("")  # an earlier run's output folder
    (out / "img0__img0.png").write_bytes(b"an earlier output")
    assert run_stylize(tmp, base, "out") == 0
    assert len(pngs(out)) == 7 and (out / "img1__img9.png").is_dir()


@needs_pil
def test_cli_refuses_a_users_file_at_an_output_name_before_any_work(folders, monkeypatch):
    """A file at an output name in a folder no run wrote to (no OUTPUTS_MARKER) is the user's, not an
    earlier output: stylize and tta --save-stylized refuse to replace it, before the model loads."""
    tmp, base = folders
    out = tmp / "mine"
    out.mkdir()
    (out / "img1__img2.png").write_bytes(b"the user's photo")
    (out / "holiday.png").write_bytes(b"another")
    monkeypatch.setattr(
        "fastvit_style.apps.stylize.load_stylizer", lambda *a: pytest.fail("loaded the model")
    )
    message = (
        f"--out {str(out)!r} holds a file 'img1__img2.png' that no earlier run marked as its output (the folder "
        f"has no {OUTPUTS_MARKER}), the name of the output of content {str(tmp / 'content' / 'img1.png')!r} with "
        f"style {str(tmp / 'styles' / 'img2.png')!r}: move or rename that file, or choose another --out (or "
        f"create {OUTPUTS_MARKER} there, if its images are outputs)"
    )
    with pytest.raises(SystemExit, match=re.escape(message)):
        run_stylize(tmp, base, "mine")
    with pytest.raises(SystemExit, match=re.escape(message)):  # not taken for an earlier output
        run_stylize(tmp, base, "mine", "--skip-existing")
    tta = ["tta", *base, "--refs", str(tmp / "styles"), "--images", str(tmp / "content"),
           "--out", str(tmp / "p.csv"), "--classifier", "x:y", "--save-stylized", str(out)]  # fmt: skip
    with pytest.raises(
        SystemExit, match="--save-stylized .* holds a file 'img1__img2.png' that no earlier run"
    ):
        cli_main(tta)
    assert (out / "img1__img2.png").read_bytes() == b"the user's photo" and pngs(out) == [
        "holiday.png",
        "img1__img2.png",
    ]


@needs_pil
def test_cli_outputs_remove_the_temporaries_a_killed_run_left_for_them(folders, monkeypatch):
    """A SIGKILL mid-write runs no cleanup: the next run writing that very file removes its temporary;
    temporaries of files it does not write (an earlier run's other styles) and a user's files stay."""
    tmp, base = folders
    out = tmp / "out"
    out.mkdir()
    leftover = out / leftover_name("img1__img2.png")
    others = [out / leftover_name("img1__img9.png"), out / (leftover_name("img1__img2.png") + ".bak")]
    for path in (leftover, *others):
        path.write_bytes(b"partial")
    assert run_stylize(tmp, base, "out") == 0
    assert not leftover.exists() and all(p.read_bytes() == b"partial" for p in others)
    assert len(pngs(out)) == 2 * 3

    (tmp / "toyclf.py").write_text(
        "import torch.nn as nn\n"
        "def make():\n    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))\n"
    )
    monkeypatch.chdir(tmp)
    csv_leftover = tmp / leftover_name("p.csv")
    csv_leftover.write_bytes(b"partial")
    tta = ["tta", *base, "--refs", str(tmp / "styles"), "--images", str(tmp / "content"),
           "--classifier", "toyclf:make", "--out", "p.csv"]  # fmt: skip
    assert cli_main(tta) == 0 and not csv_leftover.exists() and (tmp / "p.csv").is_file()


@needs_pil
@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_cli_tta(folders, monkeypatch):
    tmp, base = folders
    (tmp / "toyclf.py").write_text(
        "import torch.nn as nn\n"
        "def make():\n    return nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))\n"
    )
    monkeypatch.chdir(tmp)
    torch.jit.script(toy_classifier(2)).save(str(tmp / "clf.pt"))
    batch = torch.export.Dim("batch", min=4)  # every batch below has 1 x 3 or 2 x 3 images
    exported = torch.export.export(toy_classifier(2), (images(4, SIZE),), dynamic_shapes=({0: batch},))
    torch.export.save(exported, str(tmp / "clf.pt2"))
    specs = [
        ("toyclf:make", ["--save-stylized", str(tmp / "views")]),
        (str(tmp / "clf.pt"), ["--k", "0"]),
        (str(tmp / "clf.pt2"), ["--reduce", "vote", "--batch-size", "2"]),  # the last batch is a full one
    ]
    for spec, extra in specs:
        out = tmp / "preds" / "p.csv"
        assert (
            cli_main(
                [
                    "tta",
                    *base,
                    "--refs",
                    str(tmp / "styles"),
                    "--images",
                    str(tmp / "content"),
                    "--classifier",
                    spec,
                    "--out",
                    str(out),
                    "--k",
                    "2",
                    *extra,
                ]
            )
            == 0
        )
        rows = list(csv.reader(out.read_text().splitlines()))
        assert rows[0] == ["path", "pred", "p0", "p1"]
        assert [r[0] for r in rows[1:]] == ["img0.png", "img1.png"]
        for r in rows[1:]:
            p = [float(v) for v in r[2:]]
            assert abs(sum(p) - 1) < 1e-5 and int(r[1]) == int(np.argmax(p))
    assert len(pngs(tmp / "views")) == 2 * 2
    # Without --k: 8 references per image, or all of them when there are fewer (3 here).
    no_k = ["tta", *base, "--refs", str(tmp / "styles"), "--images", str(tmp / "content"), "--classifier",
            "toyclf:make", "--out", str(tmp / "all.csv"), "--save-stylized", str(tmp / "all_views")]  # fmt: skip
    assert cli_main(no_k) == 0 and len(pngs(tmp / "all_views")) == 2 * 3
    assert (tmp / "views" / ".fastvit-style-outputs").is_file()
    # A write that fails midway (a full disk) leaves the earlier CSV as it was, and no temporary: at the
    # first rows, no partial file either (it would hold none); in the final copy, the partial file.
    before = out.read_bytes()
    real_writer = csv.writer

    class FullDisk:
        def __init__(self, f, **kwargs):
            self.writer = real_writer(f, **kwargs)

        def writerow(self, row):
            if row[0] != "path":
                raise OSError(28, "No space left on device")
            self.writer.writerow(row)

    monkeypatch.setattr(csv, "writer", FullDisk)
    assert cli_main([*no_k[:-2], "--out", str(out)]) == 1
    assert out.read_bytes() == before and os.listdir(out.parent) == ["p.csv"]
    monkeypatch.undo()

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(shutil, "copyfileobj", full_disk)
    assert cli_main([*no_k[:-2], "--out", str(out)]) == 1
    assert out.read_bytes() == before and sorted(os.listdir(out.parent)) == ["p.csv", "p.csv.partial"]
    assert len((out.parent / "p.csv.partial").read_text().splitlines()) == 3


# A toy classifier whose 2nd call (the 2nd batch, with --batch-size 1) fails as the factory says.
FLAKY = """
import os
import signal

import torch
from torch import nn


class Flaky(nn.Module):
    def __init__(self, error=None):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(3, 2))
        self.error, self.calls = error, 0

    def forward(self, x):
        self.calls += 1
        if self.calls == 2 and self.error == "nan":
            return torch.full((x.shape[0], 2), float("nan"))
        if self.calls == 2 and self.error == "sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
        if self.calls == 2 and self.error is not None:
            raise self.error
        return self.net(x)


def ok():
    return Flaky()


def fails():
    return Flaky(RuntimeError("boom"))


def interrupted():
    return Flaky(KeyboardInterrupt())


def nan():
    return Flaky("nan")


def sigterm():
    return Flaky("sigterm")
"""


def flaky_tta(tmp, base, monkeypatch) -> list[str]:
    """tta argv (in tmp, one image per batch, --out p.csv) up to --classifier, whose value is left to add."""
    (tmp / "flakyclf.py").write_text(FLAKY)
    monkeypatch.chdir(tmp)
    return ["tta", *base, "--refs", "styles", "--images", "content", "--k", "1", "--batch-size", "1",
            "--out", "p.csv", "--classifier"]  # fmt: skip


@needs_pil
@pytest.mark.parametrize(
    "factory, status, said",
    [
        ("fails", 1, "error: --classifier 'flakyclf:fails' failed on 2 images"),
        ("nan", 1, "error: --classifier 'flakyclf:nan' gave NaN or infinite logits for 1 images"),
        ("interrupted", 130, "interrupted"),
    ],
)
def test_cli_tta_keeps_the_predictions_of_a_run_that_stops(
    folders, monkeypatch, capsys, factory, status, said
):
    """Rows are written batch by batch to <out>.partial: a run that stops at its 2nd batch (a classifier's
    error, its NaN logits, Ctrl-C) keeps the 1st batch's rows there and says where and how many, and
    leaves the earlier --out as it was; a run that finishes renames the complete file, leaving none."""
    tmp, base = folders
    argv = flaky_tta(tmp, base, monkeypatch)
    assert cli_main([*argv, "flakyclf:ok"]) == 0
    finished = (tmp / "p.csv").read_bytes()
    assert sorted(os.listdir(tmp)) == ["content", "flakyclf.py", "p.csv", "styles", "w.safetensors"]
    capsys.readouterr()
    assert cli_main([*argv, f"flakyclf:{factory}"]) == status
    err = capsys.readouterr().err
    assert (tmp / "p.csv").read_bytes() == finished
    header, first, _ = finished.splitlines(keepends=True)
    assert first.startswith(b"img0.png,") and (tmp / "p.csv.partial").read_bytes() == header + first
    assert said in err
    assert "the predictions for 1 image classified before the run stopped are kept in 'p.csv.partial'" in err
    assert cli_main([*argv, "flakyclf:ok"]) == 0  # a new run replaces it, saying what it held
    assert "replacing 'p.csv.partial', which held the predictions for 1 image" in capsys.readouterr().err
    assert (tmp / "p.csv").read_bytes() == finished and not (tmp / "p.csv.partial").exists()


@needs_pil
def test_cli_tta_stopped_right_after_writing_out_says_no_partial_file(folders, monkeypatch, capsys):
    """A stop (SIGTERM, Ctrl-C) that lands after --out's rename, in the directory's fsync, still stops the
    command, but --out holds every row: the partial file goes, and no note sends the user to it."""
    import fastvit_style.atomic as atomic_mod

    tmp, base = folders
    argv = flaky_tta(tmp, base, monkeypatch)
    replace = os.replace

    def replace_then_stop(src, dst):
        replace(src, dst)
        if str(dst).endswith("p.csv"):
            raise KeyboardInterrupt

    monkeypatch.setattr(atomic_mod.os, "replace", replace_then_stop)
    assert cli_main([*argv, "flakyclf:ok"]) == 130
    assert "kept in" not in capsys.readouterr().err
    assert len((tmp / "p.csv").read_text().splitlines()) == 3 and not (tmp / "p.csv.partial").exists()


@needs_pil
def test_cli_tta_stopped_by_sigterm_keeps_its_predictions(folders, monkeypatch):
    """A scheduler's stop (SIGTERM) unwinds as Ctrl-C does: the note, `terminated`, status 143 (the
    shells' for SIGTERM). By default the process died on the spot, status -15, saying nothing."""
    tmp, base = folders
    argv = flaky_tta(tmp, base, monkeypatch)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run(
        [sys.executable, "-m", "fastvit_style", *argv, "flakyclf:sigterm"],
        env=env,
        capture_output=True,
        check=False,
        text=True,
    )
    assert done.returncode == 143, done.stderr
    assert done.stderr.endswith("\nterminated\n"), done.stderr
    assert (
        "the predictions for 1 image classified before the run stopped are kept in 'p.csv.partial'"
        in done.stderr
    )
    assert len((tmp / "p.csv.partial").read_text().splitlines()) == 2 and not (tmp / "p.csv").exists()


@needs_pil
def test_cli_tta_partial_file_holds_whole_batches(folders, monkeypatch, capsys):
    """A write of the partial file that fails (an I/O error at the 2nd batch's fsync) cuts it back to
    the batches before, and the error names it (Python's write errors name no file)."""
    tmp, base = folders
    argv = [*flaky_tta(tmp, base, monkeypatch), "flakyclf:ok"]
    real_fsync, calls = os.fsync, []

    def failing_fsync(fd):
        calls.append(fd)
        if len(calls) == 2:
            raise OSError(5, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", failing_fsync)
    assert cli_main(argv) == 1
    err = capsys.readouterr().err
    assert "error: [Errno 5] Input/output error: 'p.csv.partial'" in err and "for 1 image class" in err
    assert [r[0] for r in csv.reader((tmp / "p.csv.partial").read_text().splitlines())] == [
        "path",
        "img0.png",
    ]
    assert not (tmp / "p.csv").exists()


@needs_pil
def test_cli_tta_replaces_a_partial_file_it_wrote_and_no_other(folders, monkeypatch, capsys):
    """A partial file an earlier run left (killed: SIGKILL writes no note) is replaced, never appended to,
    with a note when it held rows; a file or folder there that tta did not write is refused before any
    work, as --out's own checks refuse one."""
    tmp, base = folders
    argv = [*flaky_tta(tmp, base, monkeypatch), "flakyclf:ok"]
    partial = tmp / "p.csv.partial"
    partial.write_text("path,pred,p0,p1\nold.png,0,0.5,0.5\nolder.png,1,0.25,0.75\n")
    assert cli_main(argv) == 0
    assert (
        "note: replacing 'p.csv.partial', which held the predictions for 2 images" in capsys.readouterr().err
    )
    assert [r[0] for r in csv.reader((tmp / "p.csv").read_text().splitlines())] == [
        "path",
        "img0.png",
        "img1.png",
    ]
    assert not partial.exists()
    partial.write_bytes(b"")  # killed just after creating it
    assert cli_main(argv) == 0 and "replacing" not in capsys.readouterr().err and not partial.exists()
    monkeypatch.setattr("fastvit_style.apps.tta.load_stylizer", lambda *a: pytest.fail("loaded the model"))
    partial.write_text("path,pred,label\nmine.png,0,1\n")
    with pytest.raises(SystemExit, match=r"--out 'p.csv.partial' exists and is not a partial CSV tta wrote"):
        cli_main(argv)
    assert partial.read_text() == "path,pred,label\nmine.png,0,1\n"
    partial.unlink()
    partial.mkdir()
    with pytest.raises(SystemExit, match=r"--out 'p.csv.partial' is a folder"):
        cli_main(argv)
    partial.rmdir()
    with pytest.raises(
        SystemExit, match=r"\.csv\.partial': the name 'p+'\.\.\. is 256 bytes, longer than the 255"
    ):
        cli_main([*argv[:-4], "--out", "p" * 244 + ".csv", *argv[-2:]])  # --out itself is 248 bytes


@needs_pil
@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
@pytest.mark.parametrize(
    "extra, k, include_original, reduce, seed",
    [
        (["--k", "3", "--no-original"], 3, False, "mean_prob", 0),
        (["--k", "2", "--reduce", "vote", "--seed", "5"], 2, True, "vote", 5),
    ],
    ids=["stylized-only", "vote"],
)
def test_cli_tta_matches_the_api(setup, folders, extra, k, include_original, reduce, seed):
    """The CSV holds what TTAClassifier gives for the command's draws (--k, --seed), views
    (--no-original) and reduction (--reduce); --save-stylized writes the stylized views, each under the
    name of the reference it shows."""
    _, model, _, _ = setup
    tmp, base = folders
    clf = toy_classifier(2)
    torch.jit.script(clf).save(str(tmp / "clf.pt"))
    out, views = tmp / "p.csv", tmp / "views"
    argv = ["tta", *base, "--refs", str(tmp / "styles"), "--images", str(tmp / "content"), "--classifier",
            str(tmp / "clf.pt"), "--out", str(out), "--save-stylized", str(views), *extra]  # fmt: skip
    assert cli_main(argv) == 0
    from fastvit_style.imageio import load_batch

    mean, std = normalization()
    bank = StyleBank.from_images(model, load_batch(list_images(tmp / "styles"), SIZE, mean, std))
    generator = torch.Generator().manual_seed(seed)
    tta = TTAClassifier(clf, model, bank, k, include_original, reduce, generator=generator)
    with torch.no_grad():
        probs = tta(load_batch(list_images(tmp / "content"), SIZE, mean, std))
    rows = list(csv.reader(out.read_text().splitlines()))[1:]
    assert [int(r[1]) for r in rows] == probs.argmax(-1).tolist()
    csv_probs = torch.tensor([[float(p) for p in r[2:]] for r in rows])
    torch.testing.assert_close(csv_probs, probs, rtol=0, atol=1e-5)  # written with 6 digits
    pairs = drawn(k, seed)
    assert any(s != j for j, (_, s) in enumerate(pairs[:k]))  # a draw that is not the references' order
    assert_stylized_pngs(views, expected_pixels(model, tmp), pairs)


@needs_pil
def test_cli_tta_keeps_file_names_that_are_not_utf8(folders, monkeypatch):
    """A file name in another encoding (bytes that are not UTF-8) is written to the CSV as its bytes; the
    CSV is UTF-8 whatever the locale."""
    tmp, base = folders
    latin1 = os.fsdecode(b"caf\xe9.png")
    os.mkdir(tmp / "styles" / "sub")  # the path below --images, subfolders included
    shutil.copy(tmp / "content" / "img0.png", tmp / "styles" / "sub" / latin1)
    (tmp / "toyclf.py").write_text(
        "import torch.nn as nn\ndef make():\n    return nn.Sequential(nn.Flatten(), nn.LazyLinear(2))\n"
    )
    monkeypatch.chdir(tmp)
    argv = ["tta", *base, "--refs", str(tmp / "content"), "--images", str(tmp / "styles"), "--k", "1",
            "--classifier", "toyclf:make", "--out", str(tmp / "p.csv")]  # fmt: skip
    assert cli_main(argv) == 0
    lines = (tmp / "p.csv").read_bytes().splitlines()
    assert lines[0].startswith(b"path,pred,") and [line.split(b",")[0] for line in lines[1:]] == [
        b"img0.png",
        b"img1.png",
        b"img2.png",
        os.fsencode(os.path.join("sub", latin1)),
    ]


def test_a_failed_archive_read_logs_nothing_as_a_successful_one_logs_all():
    """torch.export.load (torch 2.14) logs a failed read with its traceback before raising: tta's one-line
    error replaces it, while what a successful read logs reaches the logger's handlers as before."""
    import logging

    from fastvit_style.apps.tta import _logs_only_on_success

    seen = []

    class Keep(logging.Handler):
        def emit(self, record):
            seen.append(record.getMessage())

    logger, child = logging.getLogger("fastvit_test.export"), logging.getLogger("fastvit_test.export.part")
    logger.addHandler(keep := Keep())
    try:
        with pytest.raises(OSError), _logs_only_on_success("fastvit_test.export"):
            logger.warning("failed read")
            child.warning("failed part")
            raise OSError("not an archive")
        assert seen == []
        with _logs_only_on_success("fastvit_test.export"):
            logger.warning("old format")
            child.warning("old part")
            assert seen == []  # held until the block succeeds
        assert seen == ["old format", "old part"]
        assert logger.handlers == [keep] and logger.propagate  # restored
    finally:
        logger.removeHandler(keep)


@needs_pil
@pytest.mark.filterwarnings("ignore:`torch.jit:DeprecationWarning")
def test_fixed_batch_export_error_suggests_a_call_that_exports_this_classifier():
    """The hint for an archive traced at one batch size runs as written on any single-input classifier,
    an nn.Sequential too (its forward's argument is `input`: a dict keyed by 'x' would not export)."""
    from fastvit_style.apps.tta import _check_exported_input

    model, x = toy_classifier(2), images(2, SIZE)
    with pytest.raises(SystemExit) as exit_:
        _check_exported_input(torch.export.export(model, (x,)), "fixed.pt2", 2, 6, 3, SIZE)
    call = re.search(r"e\.g\. (torch\.export\.export\(.*\))$", str(exit_.value.code)).group(1)
    exported = eval(call, {"torch": torch, "model": model, "x": x})
    _check_exported_input(exported, "dynamic.pt2", 2, 6, 3, SIZE)


def test_cli_user_errors_are_one_line(folders, capsys, monkeypatch):
    """A user's mistake gives one `error:` line and exit status 1 (2 for argparse's usage errors), and
    the commands' own checks run before any work; a bug keeps its traceback."""
    tmp, base = folders

    def fails_with(argv, message, expected_status=1):
        try:
            status = cli_main(argv)
        except SystemExit as e:  # the commands' checks and argparse: what the interpreter would print
            status = e.code if isinstance(e.code, int) else 1
            text = ("" if isinstance(e.code, int) else str(e.code)) + capsys.readouterr().err
        else:
            text = capsys.readouterr().err
        assert status == expected_status and message in text, (status, text)
        assert text.startswith(("error: ", "usage: ")) and "Traceback" not in text, text

    (tmp / "corrupt.safetensors").write_bytes(b"not a weight file")
    (tmp / "file").write_text("mine")
    torch.save(toy_classifier(2).state_dict(), tmp / "state_dict.pth")
    stylize_args = ["stylize", *base, "--content", str(tmp / "content"), "--styles", str(tmp / "styles")]
    fails_with([*stylize_args[:-2], "--styles", str(tmp / "nope"), "--out", str(tmp / "o")],
               f"error: style folder {str(tmp / 'nope')!r} does not exist")  # fmt: skip
    fails_with([*stylize_args[:-4], "--content", str(tmp / "file"), "--styles", str(tmp / "styles"), "--out",
                str(tmp / "o")], f"error: content folder {str(tmp / 'file')!r} is a file, not a folder")  # fmt: skip
    scandir = os.scandir

    def refusing_styles(path):  # a folder it may not list (chmod would not stop root, who runs CI)
        if os.path.basename(path) == "styles":
            raise PermissionError(13, "Permission denied", path)
        return scandir(path)

    with monkeypatch.context() as m:
        m.setattr(os, "scandir", refusing_styles)
        fails_with([*stylize_args, "--out", str(tmp / "o")],
                   f"error: style folder {str(tmp / 'styles')!r} cannot be listed (Permission denied)")  # fmt: skip
    fails_with([*stylize_args, "--out", str(tmp / "file")], "exists and is not a folder")
    fails_with([*stylize_args, "--out", str(tmp / "o"), "--batch-size", "0"], "must be at least 1", 2)
    fails_with([*stylize_args, "--out", str(tmp / "o"), "--seed", str(2**64)], "--seed: must lie in", 2)
    fails_with([*stylize_args, "--out", str(tmp / "o"), "--dataset", "camelyon17wilds", "--std", ".2", ".2", ".2"],
               "error: --dataset and --std both give normalization constants: give one")  # fmt: skip
    corrupt = [a if a != base[1] else str(tmp / "corrupt.safetensors") for a in stylize_args]
    fails_with([*corrupt, "--out", str(tmp / "o")], "corrupt.safetensors")
    wrong = [a if a != "tiny" else "small" for a in stylize_args]  # weights that do not fit: WeightsError
    fails_with([*wrong, "--out", str(tmp / "o")], "cannot load weights")
    if not torch.cuda.is_available():
        on_cuda = [a if a != "cpu" else "cuda" for a in stylize_args]
        fails_with([*on_cuda, "--out", str(tmp / "o")], "device 'cuda'")
    on_meta = [a if a != "cpu" else "meta" for a in stylize_args]
    fails_with([*on_meta, "--out", str(tmp / "o")], "device 'meta' holds no data")
    # An empty value (an unset shell variable) is refused, not taken as none: --weights "" ran on random weights.
    empty_weights = [a if a != base[1] else "" for a in stylize_args]
    fails_with(
        [*empty_weights, "--out", str(tmp / "o")], "argument --weights: is empty: name a weight file", 2
    )
    empty_backbone = [a if a != "tiny" else "" for a in stylize_args]
    fails_with([*empty_backbone, "--out", str(tmp / "o")], "error: --backbone is empty")
    kwargs_at = stylize_args.index("--model-kwargs") + 1
    for kwargs, message in [("[1]", "must be a JSON object"), ('{"colour": 1}', "unexpected keyword argument"),
                            ('{"encoder_depth": "x"}', "depth must be an integer"),
                            ('{"in_channel": 1}', "the commands read images as RGB"),
                            ('{"input_size": "32"}', "multiple of patch_size 16, got '32'")]:  # fmt: skip
        bad_kwargs = [*stylize_args[:kwargs_at], kwargs, *stylize_args[kwargs_at + 1 :]]
        fails_with([*bad_kwargs, "--out", str(tmp / "o")], message)
    tta_args = ["tta", *base, "--refs", str(tmp / "styles"), "--images", str(tmp / "content"), "--k", "2"]
    fails_with([*tta_args, "--classifier", "x:y", "--out", str(tmp)], "is a folder")
    fails_with(
        [*tta_args, "--classifier", str(tmp / "state_dict.pth"), "--out", str(tmp / "p.csv")],
        "module:callable",
    )
    fails_with(
        [*tta_args, "--classifier", "no_such_module:make", "--out", str(tmp / "p.csv")], "cannot import"
    )
    fails_with(  # a path where a module name goes: import_module took it for a relative import
        [*tta_args, "--classifier", "./clfmod:make", "--out", str(tmp / "p.csv")],
        "'./clfmod' is not a module name (module:callable takes one as Python imports it, e.g. clf:make",
    )
    monkeypatch.chdir(tmp)
    (tmp / "clfmod.py").write_text("LIMIT = 3\n")
    fails_with(
        [*tta_args, "--classifier", "clfmod:make", "--out", str(tmp / "p.csv")], "has no attribute 'make'"
    )
    fails_with(
        [*tta_args, "--classifier", "clfmod:LIMIT", "--out", str(tmp / "p.csv")],
        "names int 3, not a callable returning the classifier",
    )
    (tmp / "clfmod2.py").write_text("def make(classes):\n    raise AssertionError('not called')\n")
    fails_with(  # was a TypeError traceback from the call
        [*tta_args, "--classifier", "clfmod2:make", "--out", str(tmp / "p.csv")],
        "error: --classifier 'clfmod2:make' needs arguments (classes), but tta calls it with none: "
        "name a callable that takes none",
    )
    fails_with(
        [*tta_args, "--classifier", "json:loads", "--out", str(tmp / "p.csv")],
        "'json:loads' needs arguments (s), but tta calls it with none",
    )
    (tmp / "clfmod3.py").write_text("def make():\n    raise FileNotFoundError('weights.pth is missing')\n")
    fails_with(
        [*tta_args, "--classifier", "clfmod3:make", "--out", str(tmp / "p.csv")],
        "error: --classifier 'clfmod3:make' failed when called: FileNotFoundError: weights.pth is missing",
    )
    (tmp / "bad.pt2").write_bytes(b"not an archive")
    (tmp / "BAD.PT2").write_bytes(b"not an archive")  # any case, as the image suffixes
    for name in ("bad.pt2", "BAD.PT2"):
        fails_with(
            [*tta_args, "--classifier", str(tmp / name), "--out", str(tmp / "p.csv")],
            "not a readable torch.export archive",
        )
    # A zip that is no export: torch.export.load logs the cause with a traceback, then raises a vaguer
    # error; the one line gives both, and nothing else reaches stderr (fails_with: no traceback).
    torch.save({"weights": torch.zeros(2)}, tmp / "saved.pt2")
    with pytest.raises(SystemExit) as exit_:
        cli_main([*tta_args, "--classifier", str(tmp / "saved.pt2"), "--out", str(tmp / "p.csv")])
    said = str(exit_.value.code)
    assert said.startswith("error: --classifier") and "(RuntimeError: PytorchStreamReader failed locating file " \
        "archive_format" in said and "; then RuntimeError: We ran into an error" in said, said  # fmt: skip
    assert capsys.readouterr().err == ""
    # Traced for one batch size, it would fail on the first other one, a guard's AssertionError.
    torch.export.save(torch.export.export(toy_classifier(2), (images(2, SIZE),)), str(tmp / "fixed.pt2"))
    fails_with(
        [*tta_args, "--classifier", str(tmp / "fixed.pt2"), "--out", str(tmp / "p.csv")],
        "was exported for batches of exactly 2 images",
    )
    # Exported for other images, or for fewer or more at a time than tta passes (2 images x 3 views).
    for dim, example, message in [
        (torch.export.Dim("batch", max=4), 2, "at most 4 images; tta passes up to 6 (--batch-size x views)"),
        (torch.export.Dim("batch", min=8), 8, "at least 8 images; tta's last batch has 6"),
    ]:
        exported = torch.export.export(
            toy_classifier(2), (images(example, SIZE),), dynamic_shapes={"input": {0: dim}}
        )
        torch.export.save(exported, str(tmp / "bounded.pt2"))
        fails_with(
            [*tta_args, "--classifier", str(tmp / "bounded.pt2"), "--out", str(tmp / "p.csv")],
            f"was exported for batches of {message}",
        )
    wide = torch.export.export(
        toy_classifier(2), (images(2, 2 * SIZE),), dynamic_shapes={"input": {0: torch.export.Dim("batch")}}
    )
    torch.export.save(wide, str(tmp / "wide.pt2"))
    fails_with(
        [*tta_args, "--classifier", str(tmp / "wide.pt2"), "--out", str(tmp / "p.csv")],
        "was exported for images of shape (3, 64, 64); tta passes (N, 3, 32, 32) images",
    )
    # A classifier that fails on tta's images, or returns something other than logits, is named with
    # what it was given (and a tensor by its shape, never its numbers).
    (tmp / "badclf.py").write_text(
        "import torch.nn as nn\nLIMIT = 3\n"
        "def wide():\n    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 64 * 64, 2))\n"
        "class Pair(nn.Module):\n    def forward(self, x):\n        return x.mean((2, 3)), x\n"
        "def three():\n    return LIMIT\n"
    )
    for spec, message in [
        ("badclf:wide", ("'badclf:wide' failed on 6 images of shape (3, 32, 32), torch.float32, "
         "normalized as the stylizer's inputs: RuntimeError: mat1 and mat2 shapes cannot be multiplied")),
        ("badclf:Pair", ("got a tuple of 2 (a torch.float32 tensor of shape (6, 3), a torch.float32 tensor of "
         "shape (6, 3, 32, 32))")),
    ]:  # fmt: skip
        # Found at the first batch (2 images x 3 views), after the progress bar: one error line.
        assert cli_main([*tta_args, "--classifier", spec, "--out", str(tmp / "p.csv")]) == 1
        text = capsys.readouterr().err
        assert "\nerror: --classifier" in text and message in text and "Traceback" not in text, text
    fails_with(
        [*tta_args, "--classifier", "badclf:three", "--out", str(tmp / "p.csv")],
        "returned int 3, not an nn.Module",
    )
    tta_clf = [*tta_args, "--classifier", "clfmod:LIMIT"]
    fails_with([*tta_clf, "--images", str(tmp / "nope"), "--out", str(tmp / "p.csv")],
               f"error: input folder {str(tmp / 'nope')!r} does not exist")  # fmt: skip
    fails_with([*tta_clf, "--out", str(tmp / "file")], "is not a predictions CSV of this command")
    # A user's tables; the last one's line is beyond the csv module's field size limit.
    for own in ("path,pred\nimg0.png,1\n", "path,pred,p0,label\n", "path,pred,p1\n", "x" * 200_000 + "\n"):
        (tmp / "own.csv").write_text(own)
        fails_with([*tta_clf, "--out", str(tmp / "own.csv")], "is not a predictions CSV of this command")
        assert (tmp / "own.csv").read_text() == own
    fails_with(
        [*tta_clf, "--out", str(tmp / "file" / "p.csv")],
        "the folder " + repr(str(tmp / "file")) + " exists and is not a folder",
    )
    fails_with([*tta_clf, "--out", str(tmp / "new") + os.sep], "is a folder")
    fails_with([*tta_clf, "--out", str(tmp / "v"), "--save-stylized", str(tmp / "v")], "name the same path")
    on_mps = [a if a != "cpu" else "mps" for a in stylize_args]
    fails_with([*on_mps, "--out", str(tmp / "o")], "only cpu and cuda devices are supported")
    shutil.copytree(tmp / "content", tmp / "damaged")
    png = (tmp / "damaged" / "img1.png").read_bytes()
    (tmp / "damaged" / "img1.png").write_bytes(png[: len(png) // 2])
    damaged = [a if a != str(tmp / "content") else str(tmp / "damaged") for a in stylize_args]
    # Found mid-run (images are read batch by batch), after the progress bar: the one error line names it.
    assert cli_main([*damaged, "--out", str(tmp / "o_damaged"), "--batch-size", "1"]) == 1
    text = capsys.readouterr().err
    assert (
        f"\nerror: cannot decode image {str(tmp / 'damaged' / 'img1.png')!r}" in text
        and "Traceback" not in text
    )
    assert not (tmp / "o").exists() and (tmp / "file").read_text() == "mine"
    monkeypatch.setenv("FASTVIT_STYLE_TRACEBACK", "1")  # a user error with its traceback, when asked
    with pytest.raises(ValueError, match="device 'meta' holds no data"):
        cli_main([*on_meta, "--out", str(tmp / "o")])
    monkeypatch.delenv("FASTVIT_STYLE_TRACEBACK")
    # A crash is not a user error: its traceback stays.
    monkeypatch.setattr("fastvit_style.apps.stylize.stylize", lambda *a, **kw: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        cli_main([*stylize_args, "--out", str(tmp / "o2")])


def test_cli_without_pil(folders, monkeypatch, capsys):
    tmp, base = folders
    monkeypatch.setitem(sys.modules, "PIL", None)  # makes `import PIL` fail
    with pytest.raises(
        SystemExit, match=r"needs Pillow: pip install pillow \(from a checkout: pip install '\.\[images\]'\)"
    ):
        cli_main(
            [
                "stylize",
                *base,
                "--content",
                str(tmp / "content"),
                "--styles",
                str(tmp / "styles"),
                "--out",
                str(tmp / "out"),
            ]
        )


def test_demo_runs(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("tta_demo", os.path.join(ROOT, "examples", "tta_demo.py"))
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    out = tmp_path / "grid.png"
    demo.main(["--small", "--out", str(out)])
    pixels = decode_png(out.read_bytes())
    assert pixels.shape == (3 * (64 + 4), 4 * (64 + 4), 3)
    for out, message in (
        (tmp_path, "is a folder: name the PNG file"),
        (tmp_path / "no" / "g.png", "its folder does"),
    ):
        with pytest.raises(SystemExit):  # argparse's error, before any work
            demo.main(["--small", "--out", str(out)])
        assert message in capsys.readouterr().err


@needs_pil
def test_cli_outputs_never_overwrite_each_other_nor_become_inputs(folders, capsys, monkeypatch):
    """Two (content, style) pairs that would share an output name are refused before any work; a run that
    writes inside an input folder does not read its outputs back as inputs the next time."""
    tmp, base = folders
    gen = torch.Generator().manual_seed(1)
    for path in ("c/a.png", "c/a__b.png", "s/c.png", "s/b__c.png"):
        save_png(torch.rand(3, 8, 8, generator=gen), tmp / path)
    argv = [
        "stylize",
        *base,
        "--content",
        str(tmp / "c"),
        "--styles",
        str(tmp / "s"),
        "--out",
        str(tmp / "o"),
    ]
    with pytest.raises(SystemExit, match=r"a.png'.* with style .*b__c.png' and content .*a__b.png'.* "
                       r"with style .*c.png' would both be written to a__b__c.png"):  # fmt: skip
        cli_main(argv)
    assert not (tmp / "o").exists()
    for path in ("c2/a.png", "c2/a_.png", "s2/b.png", "s2/_b.png"):  # the clash that crosses the separator
        save_png(torch.rand(3, 8, 8, generator=gen), tmp / path)
    with pytest.raises(SystemExit, match="would both be written to a___b.png"):
        cli_main(
            [*argv[:-6], "--content", str(tmp / "c2"), "--styles", str(tmp / "s2"), "--out", str(tmp / "o")]
        )
    for path in ("c3/Img.png", "c3/img.png"):  # one output name where the output folder ignores case
        save_png(torch.rand(3, 8, 8, generator=gen), tmp / path)
    case_argv = [
        *argv[:-6],
        "--content",
        str(tmp / "c3"),
        "--styles",
        str(tmp / "s2"),
        "--out",
        str(tmp / "o"),
    ]
    tta_argv = ["tta", *base, "--images", str(tmp / "c3"), "--refs", str(tmp / "s2"), "--classifier", "x:y",
                "--out", str(tmp / "p.csv"), "--save-stylized", str(tmp / "o")]  # fmt: skip
    monkeypatch.setattr(
        "fastvit_style.apps.common.folds_case", lambda folder: os.path.basename(folder) == "o"
    )
    for args in (case_argv, tta_argv):
        with pytest.raises(SystemExit, match="same output name .* takes them for one name: it ignores case"):
            cli_main(args)
    assert not (tmp / "o").exists()

    expected = [f"img{c}__img{s}.png" for c in range(2) for s in range(3)]
    capsys.readouterr()
    for _ in range(2):
        assert run_stylize(tmp, base, "content/stylized") == 0
    assert pngs(tmp / "content" / "stylized") == expected
    assert "left out" not in capsys.readouterr().err  # the earlier run's outputs: skipped without a note
    with pytest.raises(SystemExit, match="--out .* is the content folder"):
        run_stylize(tmp, base, "content")
    with pytest.raises(SystemExit, match="--save-stylized .* is the input folder"):
        cli_main(["tta", *base, "--images", str(tmp / "content"), "--refs", str(tmp / "styles"), "--classifier",
                  "x:y", "--out", str(tmp / "p.csv"), "--save-stylized", str(tmp / "content")])  # fmt: skip
    shutil.rmtree(tmp / "content" / "stylized")
    # A user's image already in an output folder inside an input folder is left out too, with a note.
    save_png(torch.rand(3, 8, 8, generator=gen), tmp / "styles" / "more" / "mine.png")
    capsys.readouterr()
    assert cli_main([*argv[:-6], "--content", str(tmp / "content"), "--styles", str(tmp / "styles"),
                     "--out", str(tmp / "styles" / "more")]) == 0  # fmt: skip
    note = f"note: left out 1 style images in {str(tmp / 'styles' / 'more')!r}, the --out folder"
    assert note in capsys.readouterr().err and len(pngs(tmp / "styles" / "more")) == 2 * 3 + 1
    shutil.rmtree(tmp / "styles" / "more")
    os.symlink(tmp / "linked_out", tmp / "content" / "more")  # the output folder, reached through a link
    for _ in range(2):
        assert run_stylize(tmp, base, "linked_out") == 0
    assert pngs(tmp / "linked_out") == expected
    os.remove(tmp / "content" / "more")
    assert run_stylize(tmp, base, ".") == 0  # above the inputs: its outputs lie in no input folder
    assert sorted(p for p in os.listdir(tmp) if p.endswith(".png")) == expected


def test_output_names_join_subfolders_and_fit_the_file_system(tmp_path):
    from fastvit_style.apps.common import NAME_MAX, output_names, pair_names

    root = str(tmp_path)
    nested = [os.path.join(root, "a", "b.png"), os.path.join(root, "ab.png")]
    assert output_names(nested, root) == ["a_b", "ab"]  # folders joined by '_'
    style = [os.path.join(root, "s.png")]
    longest = "c" * (NAME_MAX - len("__s.png"))  # <longest>__s.png takes exactly NAME_MAX bytes
    out = ("--out", os.path.join(root, "out"))
    assert pair_names([os.path.join(root, longest + ".png")], root, style, root, out) == ([longest], ["s"])
    with pytest.raises(SystemExit, match=f"longer than the {NAME_MAX} bytes"):
        pair_names([os.path.join(root, longest + "c.png")], root, style, root, out)


def test_output_names_that_differ_in_case_clash_where_the_file_system_ignores_case(tmp_path, monkeypatch):
    from fastvit_style import atomic
    from fastvit_style.apps.common import output_names, pair_names

    (tmp_path / "Probe").touch()  # what this file system does (macOS and Windows ignore case by default)
    ignores_case = os.path.exists(tmp_path / "probe")
    (tmp_path / "Probe").unlink()
    assert atomic.folds_case(tmp_path / "new" / "out") == ignores_case
    assert os.listdir(tmp_path) == []  # and the probe is gone

    def exists_ignoring_case(path):
        folder, name = os.path.split(path)
        return any(entry.lower() == name.lower() for entry in os.listdir(folder))

    monkeypatch.setattr(atomic.os.path, "exists", exists_ignoring_case)
    assert atomic.folds_case(tmp_path)
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []

    root = str(tmp_path)
    paths = [os.path.join(root, "Img.png"), os.path.join(root, "img.png")]
    assert output_names(paths, root) == ["Img", "img"]
    with pytest.raises(SystemExit, match=r"Img.png' and .*img.png' give the same output name 'img' \(the output "
                       "folder's file system takes them for one name: it ignores case\\)"):  # fmt: skip
        output_names(paths, root, fold_case=True)
    accents = [os.path.join(root, "\u00c9.png"), os.path.join(root, "e\u0301.png")]  # É; e + combining acute
    assert output_names(accents, root) == ["\u00c9", "e\u0301"]
    with pytest.raises(SystemExit, match="same output name"):  # one name on APFS
        output_names(accents, root, fold_case=True)
    sharp = [os.path.join(root, "stra\u00dfe.png"), os.path.join(root, "STRASSE.png")]  # two files there
    assert output_names(sharp, root, fold_case=True) == ["stra\u00dfe", "STRASSE"]
    contents, styles = (
        [os.path.join(root, n) for n in ("a.png", "A__b.png")],
        [os.path.join(root, n) for n in ("c.png", "b__C.png")],
    )
    out = ("--out", os.path.join(root, "out"))
    monkeypatch.setattr("fastvit_style.apps.common.folds_case", lambda folder: False)
    assert pair_names(contents, root, styles, root, out) == (["a", "A__b"], ["c", "b__C"])
    monkeypatch.setattr("fastvit_style.apps.common.folds_case", lambda folder: True)
    with pytest.raises(SystemExit, match=r"would both be written to A__b__c.png \(the output folder"):
        pair_names(contents, root, styles, root, out)


def test_cli_outputs_are_checked_before_any_work(folders, capsys, monkeypatch):
    """An output that cannot be written is refused before the model loads (a run then loses no work):
    an empty name, a broken link, a folder below a file, an unwritable place, a pipe, a name too long
    for the file system (an output's, or one the run would create); NaN logits stop tta rather than predict a class."""
    tmp, base = folders
    stylize = ["stylize", *base, "--content", str(tmp / "content"), "--styles", str(tmp / "styles")]
    tta = ["tta", *base, "--images", str(tmp / "content"), "--refs", str(tmp / "styles"), "--k", "1"]
    monkeypatch.chdir(tmp)
    (tmp / "nanclf.py").write_text(
        "import torch\nfrom torch import nn\n"
        "class NaNs(nn.Module):\n    def forward(self, x):\n        return torch.full((x.shape[0], 2), float('nan'))\n"
    )
    monkeypatch.setattr(
        "fastvit_style.model.create_model", lambda *a, **kw: pytest.fail("a check came after the load")
    )
    os.symlink(tmp / "nowhere", tmp / "broken")
    (tmp / "file").write_text("mine")
    os.mkfifo(tmp / "pipe.csv")
    for argv, message in [
        ([*stylize, "--out", ""], "--out is empty: name a folder"),
        ([*stylize, "--out", str(tmp / "broken")], "is a broken symbolic link"),
        ([*stylize, "--out", str(tmp / "broken") + os.sep], "is a broken symbolic link"),
        ([*stylize, "--out", str(tmp / "broken" / "sub")], f"{str(tmp / 'broken')!r} is a broken symbolic link"),
        ([*tta, "--classifier", "nanclf:NaNs", "--out", "p.csv", "--save-stylized", ""], "--save-stylized is empty"),
        ([*stylize, "--out", str(tmp / "file" / "o")], "is a file, not a folder"),
        ([*tta, "--classifier", "nanclf:NaNs", "--out", ""], "--out is empty: name the CSV file"),
        ([*tta, "--classifier", "nanclf:NaNs", "--out", str(tmp / "pipe.csv")], "is not a regular file"),
        ([*tta, "--classifier", "nanclf:NaNs", "--out", "p.csv", "--save-stylized", str(tmp / "broken")],
         "is a broken symbolic link"),
        ([*stylize, "--out", str(tmp / ("d" * 256) / "o")], "is 256 bytes, longer than the 255"),
        ([*tta, "--classifier", "nanclf:NaNs", "--out", "p" * 252 + ".csv"], "is 256 bytes, longer than the 255"),
        ([*tta, "--classifier", "nanclf:NaNs", "--out", str(tmp / ("d" * 256) / "p.csv")], "is 256 bytes"),
        ([*tta, "--classifier", "nanclf:NaNs", "--out", "p.csv", "--save-stylized", "é" * 128], "is 256 bytes"),
    ]:  # fmt: skip
        with pytest.raises(SystemExit, match=message):
            cli_main(argv)
    if os.path.isdir("/proc/self"):  # a place nobody can create files in, not even root
        with pytest.raises(SystemExit, match="--out '/proc/self/o' cannot be written to"):
            cli_main([*stylize, "--out", "/proc/self/o"])
        with pytest.raises(SystemExit, match="the folder '/proc/self' cannot be written to"):
            cli_main([*tta, "--classifier", "nanclf:NaNs", "--out", "/proc/self/p.csv"])
    long_name = "c" * 250
    shutil.copy(tmp / "content" / "img0.png", tmp / "content" / f"{long_name}.png")
    with pytest.raises(
        SystemExit, match=f"the output name '{long_name}__img0.png' would be longer than the 255"
    ):
        cli_main([*stylize, "--out", str(tmp / "o")])
    os.remove(tmp / "content" / f"{long_name}.png")
    assert not (tmp / "o").exists() and (tmp / "file").read_text() == "mine"
    monkeypatch.undo()
    monkeypatch.chdir(tmp)
    assert cli_main([*tta, "--classifier", "nanclf:NaNs", "--out", "p.csv"]) == 1
    assert (
        "error: --classifier 'nanclf:NaNs' gave NaN or infinite logits for 2 images"
        in capsys.readouterr().err
    )
    assert not (tmp / "p.csv").exists()


def test_cli_inputs_leave_out_earlier_outputs_hidden_folders_and_pipes(folders, capsys):
    """An earlier run's output folder below an input folder (marked by a hidden file) is left out with a
    note, and so are hidden folders (.ipynb_checkpoints) and pipes (reading one would block)."""
    tmp, base = folders
    assert run_stylize(tmp, base, "content/earlier") == 0
    assert (tmp / "content" / "earlier" / ".fastvit-style-outputs").is_file()
    save_png(torch.rand(3, 8, 8), tmp / "content" / ".ipynb_checkpoints" / "img0-checkpoint.png")
    os.mkfifo(tmp / "content" / "pipe.png")
    capsys.readouterr()
    assert run_stylize(tmp, base, "later") == 0
    assert pngs(tmp / "later") == [f"img{c}__img{s}.png" for c in range(2) for s in range(3)]
    assert (
        "note: left out 6 images under " + repr(str(tmp / "content" / "earlier")) in capsys.readouterr().err
    )
    # Named as the input folder itself, the earlier outputs are read.
    argv = ["stylize", *base, "--content", str(tmp / "content" / "earlier"), "--styles", str(tmp / "styles")]
    assert cli_main([*argv, "--out", str(tmp / "restyled"), "--k", "1"]) == 0
    assert len(pngs(tmp / "restyled")) == 6


def test_tta_classifier_draws_only_from_its_generator(setup):
    """Building it checks k without a draw; a call with a generator leaves the global RNG alone; a
    NumPy integer k is an int."""
    _, model, _, bank = setup
    classifier = toy_classifier(2)  # seeds the global RNG
    state = torch.get_rng_state()
    tta = TTAClassifier(classifier, model, bank, k=np.int64(2), generator=torch.Generator().manual_seed(0))
    tta(images(1, SIZE))
    assert torch.equal(torch.get_rng_state(), state) and tta.num_views == 3


def test_bank_pickles(setup):
    """torch.save of a bank or of a TTAClassifier holding one (whole-module checkpoints, DataLoader
    workers): the copy checks its model again, and gives the same numbers."""
    import io

    _, model, _, bank = setup
    buffer = io.BytesIO()
    torch.save(TTAClassifier(toy_classifier(2), model, bank, k=2), buffer)
    buffer.seek(0)
    copy_ = torch.load(buffer, weights_only=False)
    assert torch.equal(copy_.bank.k, bank.k) and copy_.bank.fingerprint == bank.fingerprint
    x = images(2, SIZE)
    with torch.no_grad():
        torch.testing.assert_close(
            stylize(copy_.stylizer, x, copy_.bank), stylize(model, x, bank), rtol=0, atol=0
        )


def _views_in_worker(batch):
    tta, x = batch[0]
    return tta.make_views(x)[1]


def test_a_generator_reaches_spawned_workers(setup):
    """spawn/forkserver workers get the classifier through the multiprocessing pickler, which cannot send
    a torch.Generator (pytorch#146828: the worker died with "unable to resize file"): the copy draws as
    the parent's."""
    from torch.utils.data import DataLoader

    _, model, _, bank = setup
    tta = TTAClassifier(toy_classifier(2), model, bank, k=3, generator=torch.Generator().manual_seed(5))
    x = images(2, SIZE)
    loader = DataLoader(
        [(tta, x)], batch_size=1, num_workers=1, collate_fn=_views_in_worker, multiprocessing_context="spawn"
    )
    (refs,) = list(loader)
    assert torch.equal(refs, tta.make_views(x)[1])


def test_a_pickled_tta_classifier_keeps_its_generators_state(setup):
    """A copy's generator is its own, at the state the original had; a classifier without one stays so."""
    import pickle

    _, model, _, bank = setup
    tta = TTAClassifier(toy_classifier(2), model, bank, k=2, generator=torch.Generator().manual_seed(6))
    torch.rand(5, generator=tta.generator)  # a state no seed gives
    copy_ = pickle.loads(pickle.dumps(tta))
    assert copy_.generator is not tta.generator
    assert torch.equal(copy_.generator.get_state(), tta.generator.get_state())
    assert torch.equal(
        select_refs(R, 3, k=2, generator=copy_.generator), select_refs(R, 3, k=2, generator=tta.generator)
    )
    assert pickle.loads(pickle.dumps(TTAClassifier(toy_classifier(2), model, bank, k=2))).generator is None


def test_a_generator_pickled_on_an_absent_gpu_is_refused_by_name(setup):
    """A CUDA generator's state is restored on its GPU only: another device's generator would draw
    other numbers (and select_refs would place the draws there)."""
    _, model, _, bank = setup
    state = TTAClassifier(toy_classifier(2), model, bank, k=2).__getstate__()
    state["generator"] = ("cuda:64", bytes(16))
    with pytest.raises(ValueError, match=r"cannot restore a torch.Generator's state: device 'cuda:64'"):
        TTAClassifier.__new__(TTAClassifier).__setstate__(state)


@pytest.mark.gpu
def test_a_cuda_generator_is_pickled_on_its_device(setup):
    import pickle

    _, model, _, bank = setup
    generator = torch.Generator("cuda").manual_seed(7)
    torch.rand(5, generator=generator, device="cuda")
    copy_ = pickle.loads(
        pickle.dumps(TTAClassifier(toy_classifier(2), model, bank, k=2, generator=generator))
    )
    assert copy_.generator.device == generator.device
    assert torch.equal(copy_.generator.get_state(), generator.get_state())


def test_cli_normalization_follows_the_weights(tmp_path, monkeypatch):
    """Without --dataset or --mean/--std, official weights named by dataset id or hub repo id bring their
    dataset's constants, and a training export those it records; weights that have none are refused
    rather than normalized as another dataset; any other weights get the default, with a note."""
    from fastvit_style.apps.common import mean_std
    from fastvit_style.configs import NORMALIZATION

    def constants(with_note=False, **kw):
        mean, std, note = mean_std(argparse.Namespace(**{"dataset": None, "mean": None, "std": None, **kw}))
        assert (note is not None) == with_note, note
        return mean, std

    assert constants(weights="epistr") == NORMALIZATION["epistr"]
    assert constants(weights="sdoerrich97/stylizing_vit_tiny_epistr") == NORMALIZATION["epistr"]
    assert constants(weights="fitzpatrick17k") == NORMALIZATION["fitzpatrick17k"]
    assert constants(weights="epistr", dataset="camelyon17wilds") == NORMALIZATION["camelyon17wilds"]
    assert constants(weights="cholec80", mean=[0.5] * 3, std=[0.2] * 3) == ((0.5,) * 3, (0.2,) * 3)
    for weights in ("ddi", "sdoerrich97/stylizing_vit_base_ddi_12_34_56"):
        with pytest.raises(
            SystemExit, match="no normalization constants are known for the ddi_12_34_56 weights"
        ):
            constants(weights=weights)
    for other in ("someone/stylizing_vit_base_epistr", "sdoerrich97/stylizing_vit_huge_epistr"):
        assert constants(weights=other, with_note=True) == NORMALIZATION["camelyon17wilds"]
    monkeypatch.chdir(tmp_path)  # a file of that name is a weight file: the documented default
    (tmp_path / "epistr").write_bytes(b"")
    assert constants(weights="epistr", with_note=True) == NORMALIZATION["camelyon17wilds"]
    recorded = ((0.25, 0.5, 0.75), (0.125, 0.25, 0.5))  # what a training export carries
    save_state_dict({"w": torch.zeros(1)}, tmp_path / "trained.safetensors", normalization=recorded)
    assert constants(weights="trained.safetensors") == recorded
    assert constants(weights="trained.safetensors", dataset="epistr") == NORMALIZATION["epistr"]
    with pytest.raises(ValueError, match="only .safetensors files keep it"):
        save_state_dict({"w": torch.zeros(1)}, tmp_path / "trained.pth", normalization=recorded)
