"""fastvit_style.weights: official key layout, safe reading, cleanup, clear errors, atomic writing."""

import io
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import types
import warnings
import zipfile
from pathlib import Path

import numpy as np
import pytest
import safetensors.torch
import torch

from fastvit_style import StylizingViT, checkpoint, create_model
from fastvit_style import weights as W
from fastvit_style.checkpoint import save_checkpoint
from fastvit_style.layers import VGG19Features

DATA = Path(__file__).parent / "data"
TINY_REPO = "sdoerrich97/stylizing_vit_tiny_camelyon17wilds"


def make(backbone="tiny", train=False, depth=2, seed=0, **kw):
    """Small real model (depth 2 keeps it fast) with seeded, non-default weights."""
    torch.manual_seed(seed)
    model = StylizingViT(backbone, train=train, encoder_depth=depth, backend="reference", **kw)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.startswith("vgg_encoder."):  # VGG init is already random everywhere (and large)
                p.add_(torch.randn_like(p) * 0.01)  # LN/bias params are constants at init: make them differ
    return model


def assert_same_state(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


# ------------------------------------------------------------------------------- frozen official layout


def _frozen():
    spec = json.loads((DATA / "official_keys_tiny.json").read_text())
    return [(k, tuple(s)) for k, s in spec["keys"]], [(k, tuple(s)) for k, s in spec["vgg_keys"]], spec


def _layout(model):
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]


def test_frozen_official_keys_tiny_eval():
    keys, _, _ = _frozen()
    model = StylizingViT("tiny")
    assert len(keys) == 203
    assert _layout(model) == keys
    assert all(v.dtype == torch.float32 for v in model.state_dict().values())


def test_frozen_official_keys_tiny_train_has_vgg_after_encoder_norm():
    keys, vgg, spec = _frozen()
    cut = [k for k, _ in keys].index(spec["vgg_after"]) + 1
    assert len(vgg) == 32
    assert _layout(StylizingViT("tiny", train=True)) == keys[:cut] + vgg + keys[cut:]


# ------------------------------------------------------------------------------------------ round trips


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_round_trip_state_and_outputs(tmp_path, suffix):
    src, dst = make(seed=0), make(seed=1)
    path = W.save_state_dict(src, tmp_path / f"w{suffix}")
    W.load_state_dict(dst, path)
    assert_same_state(src, dst)
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(src(x), dst(x))


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".ckpt"])
def test_round_trip_other_torch_suffixes(tmp_path, suffix):
    src = make(seed=0)
    assert_same_state(W.load_state_dict(make(seed=1), W.save_state_dict(src, tmp_path / f"w{suffix}")), src)


def test_saved_file_is_official_format(tmp_path):
    model = make(train=True)
    model.vgg_encoder.load_state_dict(model.vgg_encoder.state_dict())  # as ImageNet weights would be
    W.save_state_dict(model, tmp_path / "m.safetensors")
    sd = safetensors.torch.load_file(tmp_path / "m.safetensors")
    assert sorted(sd) == sorted(model.state_dict())  # safetensors stores keys sorted; load order is by name
    plain = torch.load(W.save_state_dict(model, tmp_path / "m.pth"), weights_only=True)
    assert list(plain) == list(model.state_dict())  # what the official torch.load + strict=True expects


def test_a_random_vgg19_is_not_saved(tmp_path):
    """A train=True model's VGG19 that no weights were loaded into is left out of its file, which then
    cannot pass for the ImageNet network when loaded into a train=True model."""
    model = make(train=True)
    for name in ("m.safetensors", "m.pth"):
        with pytest.warns(UserWarning, match="without the VGG19 of this train=True model, which no weights"):
            path = W.save_state_dict(torch.nn.DataParallel(model), tmp_path / name)  # through wrappers too
        assert sorted(W.read_state_dict(path)) == sorted(k for k in model.state_dict() if "vgg" not in k)
        with pytest.raises(RuntimeError, match="the weights have no VGG19 loss network"):
            W.load_state_dict(make(train=True), path)
        W.load_state_dict(make(), path)


def test_save_names_a_path_it_cannot_write(tmp_path):
    (tmp_path / "file.pth").write_text("mine")
    (tmp_path / "dir.safetensors").mkdir()
    for path, message in (
        (tmp_path / "file.pth" / "w.safetensors", "its folder does not exist \\(or is a file\\)"),
        (tmp_path / "new" / "w.pth", "its folder does not exist"),
        (tmp_path / "dir.safetensors", "it is a folder; give a file name"),
    ):
        with pytest.raises(ValueError, match=f"cannot save {re.escape(repr(str(path)))}: {message}"):
            W.save_state_dict(make(), path)
    assert (tmp_path / "file.pth").read_text() == "mine" and sorted(os.listdir(tmp_path)) == [
        "dir.safetensors",
        "file.pth",
    ]


def test_save_handles_shared_and_strided_tensors(tmp_path):
    base = torch.randn(4, 6)
    sd = {"a": base, "b": base[:2], "c": base.t(), "module._orig_mod.d": base[0]}
    W.save_state_dict(sd, tmp_path / "s.safetensors")
    back = W.read_state_dict(tmp_path / "s.safetensors")
    assert set(back) == {"a", "b", "c", "d"}
    assert torch.equal(back["c"], base.t()) and torch.equal(back["d"], base[0])


def test_load_casts_to_model_dtype():
    model, sd = make(), {k: v.double() for k, v in make(seed=3).state_dict().items()}
    W.load_state_dict(model, sd)
    assert model.encoder.pos_embed.dtype == torch.float32
    assert torch.equal(model.encoder.pos_embed, sd["encoder.pos_embed"].float())


def test_create_model_loads_local_file(tmp_path):
    path = W.save_state_dict(make(seed=4), tmp_path / "w.safetensors")
    assert_same_state(create_model("tiny", weights=path, encoder_depth=2), make(seed=4))


# ---------------------------------------------------------------------------------------- safe reading


class Evil:
    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch's note on raw pickle.dump files
@pytest.mark.parametrize("how", ["torch.save", "pickle.dump"])
@pytest.mark.parametrize("suffix", [".pth", ".ckpt", ".weights"])
def test_evil_pickle_refused(tmp_path, how, suffix):
    marker = tmp_path / "pwned_x"
    Evil.marker = str(marker)
    path = tmp_path / f"evil{suffix}"
    payload = {"encoder.cls_token": torch.zeros(1), "x": Evil()}
    if how == "torch.save":
        torch.save(payload, path)
    else:
        with open(path, "wb") as f:
            pickle.dump(payload, f)
    with pytest.raises(ValueError, match="refused for safety") as err:
        W.read_state_dict(path)
    assert str(path) in str(err.value)
    if how == "torch.save":
        assert "other than tensors" in str(err.value)
        assert "weights_only=False" in str(err.value)  # says how to convert a trusted file
    else:  # torch.load cannot read a pickle.dump file at all, weights_only=False or not
        assert "plain Python pickle (pickle.dump)" in str(err.value) and "pickle.load(" in str(err.value)
    # Without torch's advice: add_safe_globals would let the code run.
    assert "add_safe_globals" not in str(err.value)
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [2, 4])
def test_a_pickle_dump_state_dict_is_refused_with_a_conversion_that_works(tmp_path, protocol):
    """Was 'truncated or corrupt ... Invalid magic number' (protocol 2) or 'contains Python objects other than
    tensors ... torch.load(path, weights_only=False)' (4), a conversion that fails on such a file too."""
    path = tmp_path / "w.pth"
    with open(path, "wb") as f:
        pickle.dump(make(seed=1).state_dict(), f, protocol=protocol)
    with pytest.raises(
        ValueError, match=r"w.pth' was refused for safety: it is a plain Python pickle"
    ) as err:
        W.read_state_dict(path)
    assert "truncated" not in str(err.value) and "weights_only=False" not in str(err.value)
    with open(path, "rb") as f:  # the conversion the message gives
        W.save_state_dict(pickle.load(f), tmp_path / "model.safetensors")
    assert_same_state(W.load_state_dict(make(), tmp_path / "model.safetensors"), make(seed=1))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("zipped", [True, False])
def test_a_torch_file_of_pickle_protocol_4_is_named_as_such(tmp_path, zipped):
    """torch's weights_only unpickler stops at protocol 4's first opcode (FRAME): the file is not known to
    hold Python objects, its protocol is what stops it."""
    path = tmp_path / "w.pth"
    torch.save(make().state_dict(), path, pickle_protocol=4, _use_new_zipfile_serialization=zipped)
    with pytest.raises(ValueError, match=r"refused for safety: it was written with pickle protocol 4") as err:
        W.read_state_dict(path)
    assert "other than tensors" not in str(err.value)


def test_a_protocol_0_pickle_naming_a_global_is_refused(tmp_path):
    """No torch file starts like this text pickle, but it names a global: refused as such, never run."""
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    path.write_bytes(f"cos\nsystem\n(S'touch {marker}'\ntR.".encode())
    with pytest.raises(ValueError, match="refused for safety"):
        W.read_state_dict(path)
    assert not marker.exists()


@pytest.mark.parametrize(
    "name, content",
    [
        pytest.param("photo.pth", b"\x89PNG\r\n\x1a\n" + bytes(range(200)), id="png-named-pth"),
        pytest.param("w.pt", bytes((i * 97 + 13) % 256 for i in range(1000)), id="random-bytes"),
        pytest.param("notes.ckpt", b"hello world\n", id="text"),
        pytest.param("w.weights", b"\x89PNG\r\n\x1a\n" + bytes(200), id="png-unknown-suffix"),
    ],
)
def test_a_file_that_is_no_weight_file_says_so(tmp_path, name, content):
    """Not 'refused for safety' (it holds no Python objects): not a torch or safetensors file at all."""
    (tmp_path / name).write_bytes(content)
    with pytest.raises(ValueError, match="not a weight file") as err:
        W.read_state_dict(tmp_path / name)
    assert "refused for safety" not in str(err.value) and str(tmp_path / name) in str(err.value)


@pytest.mark.parametrize("written, named", [(".safetensors", ".pth"), (".pth", ".safetensors")])
def test_the_bytes_decide_the_format_not_the_name(tmp_path, written, named):
    src = make(seed=3)
    W.save_state_dict(src, tmp_path / f"w{written}")
    os.replace(tmp_path / f"w{written}", tmp_path / f"w{named}")
    assert_same_state(W.load_state_dict(make(), tmp_path / f"w{named}"), src)


def test_plain_checkpoint_with_metadata_is_accepted(tmp_path):
    sd = make(seed=5).state_dict()
    torch.save({"state_dict": sd, "epoch": 7, "best_val_loss": 0.5}, tmp_path / "ckpt.ckpt")
    assert_same_state(W.load_state_dict(make(seed=6), tmp_path / "ckpt.ckpt"), make(seed=5))


def _truncate(path, keep):
    data = path.read_bytes()
    path.write_bytes(data[:keep] if keep >= 0 else data[: len(data) // 2])


@pytest.mark.parametrize(
    "name, keep",
    [
        pytest.param("w.safetensors", -1, id="safetensors-half"),
        pytest.param("w.safetensors", 5, id="safetensors-inside-header-length"),
        pytest.param("w.safetensors", 0, id="safetensors-empty"),
        pytest.param("w.pth", -1, id="pth-half"),
        pytest.param("w.pt", 0, id="pt-empty"),
        pytest.param("w.xyz", -1, id="unknown-suffix-half"),
    ],
)
def test_truncated_file_message(tmp_path, name, keep):
    path = tmp_path / name
    W.save_state_dict(make(), path.with_suffix(".pth") if name.endswith(".xyz") else path)
    if name.endswith(".xyz"):
        path.with_suffix(".pth").rename(path)
    _truncate(path, keep)
    with pytest.raises(ValueError, match="truncated or corrupt") as err:
        W.read_state_dict(path)
    assert str(path) in str(err.value)


def test_missing_path_message(tmp_path):
    path = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="does not exist") as err:
        W.load_state_dict(make(), path)
    assert str(path) in str(err.value)


def test_unknown_extension_reads_either_format(tmp_path):
    W.save_state_dict(make(seed=2), tmp_path / "a.safetensors")
    W.save_state_dict(make(seed=2), tmp_path / "b.pth")
    for src in ("a.safetensors", "b.pth"):
        os.replace(tmp_path / src, tmp_path / "weights.model")
        assert_same_state(W.load_state_dict(make(), tmp_path / "weights.model"), make(seed=2))


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes here (Windows)")
def test_a_pipe_is_not_called_missing(tmp_path):
    os.mkfifo(tmp_path / "w.pth")
    with pytest.raises(ValueError, match="w.pth' is not a regular file"):
        W.load_state_dict(make(), tmp_path / "w.pth")


def test_a_compressed_file_with_an_unknown_suffix_says_how_it_starts(tmp_path):
    """Was 'truncated or corrupt, or not a weight file: ... nor torch.load (Weights only load failed. In
    PyTorch 2.6, we changed the default value of the `weights_only` argument...)'."""
    (tmp_path / "w.pth.gz").write_bytes(b"\x1f\x8b\x08\x00" + bytes(100))
    with pytest.raises(
        ValueError, match=r"w.pth.gz' is not a weight file: it starts with b'\\x1f\\x8b"
    ) as err:
        W.read_state_dict(tmp_path / "w.pth.gz")
    assert "weights_only" not in str(err.value)


def _tiny_linear():
    torch.manual_seed(0)
    return torch.nn.Linear(2, 3)


def _save_other_archive(kind, path):
    """A zip that is no torch.save state dict, as users pass them, of `_tiny_linear()`."""
    lin = _tiny_linear()
    if kind == "torch.jit.script":
        torch.jit.save(torch.jit.script(lin), path)
    elif kind == "torch.jit.trace":
        torch.jit.save(torch.jit.trace(lin, torch.zeros(1, 2)), path)
    elif kind == "torch.export":
        torch.export.save(torch.export.export(lin, (torch.zeros(1, 2),)), path)
    else:
        np.savez(path, **{k: v.detach().numpy() for k, v in lin.state_dict().items()})


_CALLED = {  # what the error calls each kind, and the first step of the conversion it gives
    "torch.jit.script": ("a TorchScript archive (torch.jit.save)", "torch.jit.load(path).state_dict()"),
    "torch.jit.trace": ("a TorchScript archive (torch.jit.save)", "torch.jit.load(path).state_dict()"),
    "torch.export": ("a torch.export archive (torch.export.save)", "torch.export.load(path).state_dict"),
    "numpy.savez": ("a numpy .npz archive (numpy.savez)", "torch.from_numpy(v) for k, v in numpy.load(path)"),
}


@pytest.mark.filterwarnings("ignore:`torch.jit.:DeprecationWarning")
@pytest.mark.parametrize(
    "kind, name",
    [
        ("torch.jit.script", "m.pt"),
        ("torch.jit.trace", "m.pth"),
        ("torch.export", "m.pt2"),
        ("torch.export", "m.pt"),
        ("numpy.savez", "m.npz"),
    ],
)
def test_a_zip_that_is_no_torch_save_file_says_what_it_is_and_how_to_convert_it(tmp_path, kind, name):
    """Was '... is truncated or corrupt: torch.load could not read it (RuntimeError: Cannot use
    ``weights_only=True`` with TorchScript archives ...' / '... failed locating file data.pkl ...' /
    '... file in archive is not in a subdirectory: weight.npy)': the file is whole, just not a state dict.
    Named before torch.load, which warned first that it was 'dispatching to torch.jit.load' (it did not)."""
    path = tmp_path / name
    _save_other_archive(kind, path)
    called, convert = _CALLED[kind]
    for read in (W.read_state_dict, lambda p: W.load_state_dict(make(), p)):
        with (
            pytest.raises(
                ValueError, match=re.escape(f"{str(path)!r} is not a weight file: it is {called}")
            ) as err,
            warnings.catch_warnings(record=True) as warned,
        ):
            warnings.simplefilter("always")
            read(path)
        assert not warned, [str(w.message) for w in warned]
        assert convert in str(err.value) and "save_state_dict" in str(err.value)
        assert "truncated" not in str(err.value) and "weights_only" not in str(err.value)
    if kind.startswith("torch.jit"):  # the conversion the message gives
        sd = torch.jit.load(path).state_dict()
    elif kind == "torch.export":
        sd = torch.export.load(path).state_dict
    else:
        sd = {k: torch.from_numpy(v) for k, v in np.load(path).items()}
    W.save_state_dict(sd, tmp_path / "model.safetensors")
    lin = torch.nn.Linear(2, 3)
    lin.load_state_dict(W.read_state_dict(tmp_path / "model.safetensors"))
    assert_same_state(lin, _tiny_linear())


def test_a_torch_save_file_of_a_newer_format_says_to_upgrade_torch(tmp_path):
    """Was '... is truncated or corrupt: torch.load could not read it (RuntimeError: [enforce fail at
    inline_container.cc:230] . Attempted to read a PyTorch file with version 99, ...'."""
    torch.save(_tiny_linear().state_dict(), tmp_path / "new.pt")
    with zipfile.ZipFile(tmp_path / "new.pt") as src, zipfile.ZipFile(tmp_path / "w.pt", "w") as dst:
        for info in src.infolist():  # its version record as a future torch.save would write it
            dst.writestr(info, b"99\n" if info.filename.endswith("/version") else src.read(info))
    with pytest.raises(
        ValueError,
        match=r"w.pt' was written by a newer PyTorch: its format version 99 is newer than \d+, .*upgrade torch",
    ) as err:
        W.read_state_dict(tmp_path / "w.pt")
    assert "truncated" not in str(err.value) and "enforce fail" not in str(err.value)


@pytest.mark.parametrize("key", [0, ("encoder",)])
def test_keys_that_are_not_names_are_refused_by_name(tmp_path, key):
    """Not AttributeError: 'int' object has no attribute 'startswith', from inside the cleanup."""
    torch.save({key: torch.zeros(1), **make().state_dict()}, tmp_path / "w.pth")
    for load in (W.load_state_dict, W.load_vgg_weights):
        with pytest.raises(
            ValueError, match=rf"state dict key {re.escape(repr(key))} is a .*not a parameter name"
        ):
            load(make(train=True), tmp_path / "w.pth")


def test_two_names_that_strip_to_one_are_refused(tmp_path):
    """A file with both 'module.X' and 'X' (a DDP save merged into a plain one, say) kept whichever came
    last, with no word."""
    sd = make().state_dict()
    name = "encoder.pos_embed"
    torch.save({**sd, f"module._orig_mod.{name}": torch.randn_like(sd[name])}, tmp_path / "w.pth")
    with pytest.raises(
        ValueError, match=rf"keys 'module._orig_mod.{name}' and '{name}' are both '{name}' once"
    ):
        W.load_state_dict(make(), tmp_path / "w.pth")


def test_not_a_dict_refused(tmp_path):
    torch.save([torch.zeros(2)], tmp_path / "list.pth")
    with pytest.raises(ValueError, match="not a dict of tensors"):
        W.read_state_dict(tmp_path / "list.pth")


# ---------------------------------------------------------------------------------- cleanup and errors


def _prefixed(sd, prefix):
    return {prefix + k: v for k, v in sd.items()}


@pytest.mark.parametrize(
    "wrap",
    [
        pytest.param(lambda sd: {"state_dict": _prefixed(sd, "module.")}, id="state_dict-module"),
        pytest.param(lambda sd: {"model": _prefixed(sd, "_orig_mod.module.")}, id="model-orig_mod-module"),
        pytest.param(lambda sd: {"model": {"state_dict": _prefixed(sd, "module._orig_mod.")}}, id="nested"),
        pytest.param(lambda sd: _prefixed(sd, "module.module."), id="repeated-module"),
    ],
)
def test_wrappers_and_prefixes_stripped(wrap):
    src = make(seed=7)
    assert_same_state(W.load_state_dict(make(), wrap(src.state_dict())), src)


def test_missing_and_unexpected_keys_message():
    sd = dict(make().state_dict())
    for k in ("bottleneck.fc1.bias", "post_process_conv.weight"):
        del sd[k]
    sd["encoder.extra"] = torch.zeros(1)
    with pytest.raises(RuntimeError) as err:
        W.load_state_dict(make(), sd)
    msg = str(err.value)
    assert "2 missing keys: bottleneck.fc1.bias, post_process_conv.weight" in msg
    assert "1 unexpected keys: encoder.extra" in msg
    with pytest.warns(UserWarning, match=r"strict=False\) left 2 of the model's tensors as they were "
                      r"\(bottleneck.fc1.bias, post_process_conv.weight\) and ignored 1 tensors of the "
                      r"weights \(encoder.extra\)"):  # fmt: skip
        W.load_state_dict(make(), sd, strict=False)  # non-strict skips both, as torch does, but says so


def test_unexpected_keys_alone_are_refused_before_any_tensor_is_copied():
    """strict: every key the model has plus one more is a WeightsError naming it, and the model keeps its
    weights (torch's own strict load copies what fits first, then raises a plain RuntimeError)."""
    model, before = make(seed=1), make(seed=1)
    sd = {**make(seed=2).state_dict(), "encoder.extra": torch.zeros(1)}
    with pytest.raises(W.WeightsError, match=r"cannot load weights: 1 unexpected keys: encoder\.extra"):
        W.load_state_dict(model, sd)
    assert_same_state(model, before)


def test_many_missing_keys_listed_first_five():
    sd = {k: v for k, v in make().state_dict().items() if not k.startswith("encoder.blocks.1.")}
    first_five = r"16 missing keys: (encoder\.blocks\.1\.\S+, ){4}encoder\S+, \.\.\."
    with pytest.raises(RuntimeError, match=first_five):
        W.load_state_dict(make(), sd)


def test_wrong_backbone_message(tmp_path):
    path = W.save_state_dict(make("tiny"), tmp_path / "tiny.safetensors")
    with pytest.raises(RuntimeError, match="shape mismatches") as err:
        W.load_state_dict(make("small"), path)
    assert "look like tiny (embed_dim 192" in str(err.value)
    assert "model is small (embed_dim 384" in str(err.value)


def test_wrong_input_size_message():
    """Weights of another input size differ only in the token count: the hint names input_size, not the
    backbone."""
    with pytest.raises(RuntimeError, match="shape mismatches") as err:
        W.load_state_dict(make(input_size=32), make().state_dict())
    assert "look like tiny (embed_dim 192, depth 2, patch 16, input 224)" in str(err.value)
    assert "model is tiny (embed_dim 192, depth 2, patch 16, input 32) (input_size sets the token count: in " \
        "the commands' --model-kwargs, train's --input-size)" in str(err.value)  # fmt: skip


def test_wrong_depth_message():
    expected = (
        r"look like tiny \(embed_dim 192, depth 3.*model is tiny \(embed_dim 192, depth 2.*\(the backbone name "
        r"and encoder_\* keywords pick the model: the commands' --backbone and --model-kwargs\)"
    )
    with pytest.raises(RuntimeError, match=expected):
        W.load_state_dict(make(depth=2), make(depth=3).state_dict())


def test_odd_pos_embeds_are_described_without_a_crash():
    sd = dict(make().state_dict())
    for odd in (torch.zeros(5), torch.zeros(2, 5)):
        sd["encoder.pos_embed"] = odd
        assert "input" not in W.describe_backbone(sd)
    del sd["encoder.pos_embed"]  # the width from cls_token, no input size
    assert W.describe_backbone(sd) == "tiny (embed_dim 192, depth 2, patch 16)"


def test_a_0d_pos_embed_is_a_shape_mismatch_not_a_crash(tmp_path):
    """Anything may sit under the official names: the description of the weights copes (and is only built
    for an error)."""
    sd = dict(make().state_dict())
    sd["encoder.pos_embed"] = torch.tensor(1.0)
    path = W.save_state_dict(sd, tmp_path / "w.safetensors")
    with pytest.raises(
        RuntimeError, match="1 shape mismatches .*encoder.pos_embed.*not a \\(1, N, L\\) tensor"
    ):
        W.load_state_dict(make(), path)
    sd["encoder.patch_embed.proj.weight"] = torch.tensor(1.0)
    assert "not a (1, N, L) tensor" in W.describe_backbone(sd)
    del sd["encoder.pos_embed"]
    assert "embed_dim 192, depth 2)" in W.describe_backbone(sd)  # from encoder.cls_token; no patch size


def test_integer_tensor_refused():
    sd = dict(make().state_dict())
    sd["post_process_conv.weight"] = torch.zeros(3, 3, 5, 5, dtype=torch.int64)
    with pytest.raises(
        RuntimeError, match=r"non-floating-point tensors post_process_conv\.weight \(torch\.int"
    ):
        W.load_state_dict(make(), sd)


def test_non_tensor_entry_refused():
    with pytest.raises(ValueError, match="'epoch' is a int, not a tensor"):
        W.clean_state_dict({"epoch": 3, "a": torch.zeros(1)})


# ------------------------------------------------------------------------------------------------- VGG


def test_vgg_keys_dropped_for_eval_model(tmp_path):
    src = make(train=True, seed=8)
    src.vgg_encoder.load_state_dict(src.vgg_encoder.state_dict())  # as ImageNet weights would be: saved
    path = W.save_state_dict(src, tmp_path / "full.safetensors")
    assert any(k.startswith("vgg_encoder.") for k in W.read_state_dict(path))
    dst = W.load_state_dict(make(train=False), path)
    assert not any(k.startswith("vgg_encoder.") for k in dst.state_dict())
    assert torch.equal(dst.encoder.pos_embed, src.encoder.pos_embed)


def test_vgg_keys_required_for_train_model():
    with pytest.raises(RuntimeError, match="32 missing keys: vgg_encoder.features_0.weight.*no VGG19"):
        W.load_state_dict(make(train=True), make(train=False).state_dict())
    W.load_state_dict(make(train=True), make(train=False).state_dict(), strict=False)


def _vgg_file(tmp_path, fmt, vgg):
    """A VGG19 file as torchvision, timm (full model) or timm features_only would write it."""
    sd = {}
    for name, t in vgg.state_dict().items():  # features_N.weight
        n, kind = name[len("features_") :].split(".")
        sd[f"features_{n}.{kind}" if fmt == "features_only" else f"features.{n}.{kind}"] = t.clone()
    if fmt == "torchvision":
        sd.update({"classifier.0.weight": torch.zeros(8, 8), "classifier.6.bias": torch.zeros(8)})
    if fmt == "timm":
        sd.update({"pre_logits.fc1.weight": torch.zeros(8, 8, 7, 7), "head.fc.bias": torch.zeros(8)})
    return W.save_state_dict(sd, tmp_path / f"vgg19_{fmt}.pth")


@pytest.mark.parametrize("fmt", ["torchvision", "timm", "features_only"])
def test_load_vgg_weights_formats(tmp_path, fmt):
    src = VGG19Features()
    path = _vgg_file(tmp_path, fmt, src)
    assert_same_state(W.load_vgg_weights(make(train=True), path).vgg_encoder, src)  # a model
    assert_same_state(W.load_vgg_weights(VGG19Features(), path), src)  # the VGG module itself


def test_load_vgg_weights_errors(tmp_path):
    sd = {k.replace("features_", "features."): v for k, v in VGG19Features().state_dict().items()}
    del sd["features.34.weight"]
    with pytest.raises(RuntimeError, match="1 convs missing: features_34.weight"):
        W.load_vgg_weights(VGG19Features(), sd)
    sd["features.34.weight"] = torch.zeros(512, 512, 3, 3)
    sd["features.1.weight"] = torch.ones(64)  # a BatchNorm weight: a vgg19_bn file
    with pytest.raises(RuntimeError, match="1 unexpected feature tensors: features_1.weight"):
        W.load_vgg_weights(VGG19Features(), sd)
    with pytest.raises(ValueError, match="no vgg_encoder"):
        W.load_vgg_weights(make(train=False), _vgg_file(tmp_path, "timm", VGG19Features()))


# ------------------------------------------------------------------------------------------ hub / offline


@pytest.fixture
def no_hub(monkeypatch):
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # `import huggingface_hub` -> ImportError


@pytest.mark.parametrize(
    "source, repo",
    [
        ("camelyon17wilds", TINY_REPO),
        ("ddi", "sdoerrich97/stylizing_vit_tiny_ddi_12_34_56"),
        ("someone/my_stylizing_vit", "someone/my_stylizing_vit"),
    ],
)
def test_hub_without_huggingface_hub(no_hub, source, repo):
    with pytest.raises(RuntimeError, match="huggingface_hub is not installed") as err:
        W.load_pretrained_weights(make(), "tiny", source)
    assert f"'{repo}'" in str(err.value) and f"https://huggingface.co/{repo}" in str(err.value)
    assert "model.safetensors" in str(err.value)


def test_create_model_pretrained_without_hub(no_hub):
    with pytest.raises(RuntimeError, match=TINY_REPO):
        create_model("tiny", pretrained=True, encoder_depth=2)


def _fake_hub(monkeypatch, download):
    monkeypatch.setitem(sys.modules, "huggingface_hub", types.SimpleNamespace(hf_hub_download=download))


def test_hub_download_failure_is_immediate_and_clear(monkeypatch):
    def offline(repo_id, filename, **kw):
        raise OSError("We couldn't connect to 'https://huggingface.co'")

    _fake_hub(monkeypatch, offline)
    with pytest.raises(RuntimeError, match=f"'{TINY_REPO}': download failed.*pass its local path"):
        W.load_pretrained_weights(make(), "vit_tiny", "camelyon17wilds")


def test_hub_download_success_loads_file(monkeypatch, tmp_path):
    path = W.save_state_dict(make(seed=10), tmp_path / "model.safetensors")
    calls = []

    def download(repo_id, filename, **kw):
        calls.append((repo_id, filename))
        return path

    _fake_hub(monkeypatch, download)
    assert_same_state(W.load_pretrained_weights(make(), "tiny", "camelyon17wilds"), make(seed=10))
    assert calls == [(TINY_REPO, "model.safetensors")]


def test_missing_local_file_is_not_a_repo(no_hub, tmp_path):
    with pytest.raises(FileNotFoundError, match="not an existing weight file"):
        W.load_pretrained_weights(make(), "tiny", str(tmp_path / "gone.safetensors"))
    # What the official code raises for weights it cannot find or fetch: `except ValueError` still works.
    with pytest.raises(ValueError, match="not an existing weight file"):
        W.load_pretrained_weights(make(), "tiny", str(tmp_path / "gone.safetensors"))
    with pytest.raises(ValueError, match="huggingface_hub is not installed"):
        W.load_pretrained_weights(make(), "tiny", "camelyon17wilds")


def test_create_model_chooses_weights_as_officially(no_hub):
    """weights is not None wins, even "" (nothing loaded); then a string pretrained; pretrained=True
    means camelyon17wilds (here: no hub, so an error says it tried)."""
    from fastvit_style import create_model

    kwargs = {"input_size": 32, "encoder_depth": 1}
    create_model("tiny", weights="", pretrained=True, **kwargs)
    create_model("tiny", pretrained=1, **kwargs)  # officially `pretrained is True` only
    with pytest.raises(ValueError, match="camelyon17wilds"):
        create_model("tiny", pretrained=True, **kwargs)


@pytest.mark.parametrize("weights", [False, 0, b"", []])
def test_create_model_loads_nothing_for_a_falsy_weights_as_officially(no_hub, weights):
    """Officially `if dataset_to_load:` skips the loader for any falsy weights, whatever its type."""
    from fastvit_style import create_model

    create_model("tiny", weights=weights, pretrained=True, input_size=32, encoder_depth=1)


@pytest.mark.parametrize("weights", [123, b"camelyon17wilds", ["model.safetensors"]])
def test_create_model_refuses_weights_that_are_no_str_or_path_by_name(weights):
    """They failed inside the loader with os.fspath's or re's TypeError, naming no argument, after the model
    was built."""
    from fastvit_style import create_model

    with pytest.raises(
        TypeError, match=f"^weights must be a str or os.PathLike .*, got {type(weights).__name__}$"
    ):
        create_model("tiny", weights=weights, input_size=32, encoder_depth=1)
    with pytest.raises(
        TypeError, match=f"^dataset must be a str or os.PathLike .*, got {type(weights).__name__}$"
    ):
        W.load_pretrained_weights(make(), "tiny", weights)


def test_a_folder_is_not_a_repo(no_hub, tmp_path, monkeypatch):
    """A relative folder name also matches the repo-id pattern: the folder wins."""
    (tmp_path / "imgs").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="'imgs' is a folder, not a weight file"):
        W.load_pretrained_weights(make(), "tiny", "imgs")
    os.mkfifo(tmp_path / "pipe")  # reading it would block until a writer comes
    with pytest.raises(ValueError, match="'pipe' is not a regular file \\(a pipe or a device\\)"):
        W.load_pretrained_weights(make(), "tiny", "pipe")
    (tmp_path / "camelyon17wilds").mkdir()  # a data folder named after its dataset: the id still wins
    with pytest.raises(W.WeightsError, match="huggingface_hub is not installed"):
        W.load_pretrained_weights(make(), "tiny", "camelyon17wilds")


# ---------------------------------------------------------------------------------------- atomic writes


@pytest.mark.parametrize(
    "suffix, writer", [(".safetensors", "safetensors.torch.save"), (".pth", "torch.save")]
)
def test_interrupted_save_keeps_old_file(tmp_path, monkeypatch, suffix, writer):
    path = tmp_path / f"w{suffix}"
    W.save_state_dict(make(seed=11), path)
    before = path.read_bytes()

    def dies_midway(obj, *args, **kwargs):
        if writer == "torch.save":  # into the temporary's file object; save serializes to bytes first
            args[0].write(b"\0" * 1000)
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(writer, dies_midway)
    with pytest.raises(KeyboardInterrupt):
        W.save_state_dict(make(seed=12), path)
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == [path.name]  # no temp file left behind


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_a_write_killed_mid_file_leaves_only_what_the_next_write_removes(tmp_path, suffix):
    """Killed by the kernel mid-write (SIGXFSZ past a file-size limit, as a SIGKILL would), a save leaves
    its temporary, which the next save of that file removes: safetensors' save_file wrote one of its
    own (`.tmpXXXXXX`) that stayed."""
    path = tmp_path / f"w{suffix}"
    code = (
        "import resource, signal, sys, torch; from fastvit_style.weights import save_state_dict; "
        "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); signal.signal(signal.SIGXFSZ, signal.SIG_DFL); "
        "save_state_dict({'w': torch.zeros(100_000)}, sys.argv[1])"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(path)], check=False, capture_output=True, timeout=120
    )
    assert done.returncode == -signal.SIGXFSZ, done.stderr[-2000:]
    assert len(os.listdir(tmp_path)) == 1  # the killed write's temporary
    W.save_state_dict(make(seed=11), path)
    assert os.listdir(tmp_path) == [path.name]


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")
@pytest.mark.parametrize("writer", ["checkpoint", ".pth", ".safetensors"])
def test_a_full_disk_is_an_os_error_naming_the_file(tmp_path, monkeypatch, writer):
    """Not torch's RuntimeError ('unexpected pos ...'), which the commands show as a crash, nor an
    OSError naming no file; the earlier file stays."""
    path = tmp_path / ("last.pt" if writer == "checkpoint" else f"w{writer}")

    def save(model):
        if writer == "checkpoint":
            return save_checkpoint({"model": model.state_dict()}, path)
        return W.save_state_dict(model, path)

    save(make(seed=11))
    before = path.read_bytes()
    real_open = open

    def full_disk(file, mode="r", *args, **kwargs):  # unbuffered: torch meets the error, not close()
        return (
            real_open("/dev/full", mode, buffering=0)
            if "w" in mode
            else real_open(file, mode, *args, **kwargs)
        )

    monkeypatch.setattr(checkpoint if writer == "checkpoint" else W, "open", full_disk, raising=False)
    with pytest.raises(OSError, match=re.escape(f"[Errno 28] No space left on device: {str(path)!r}")):
        save(make(seed=12))
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize("writer", ["checkpoint", ".pth"])
def test_a_ctrl_c_inside_torch_save_stays_a_keyboard_interrupt(tmp_path, monkeypatch, writer):
    """torch's zip writer turns what the file object's write raises into a RuntimeError: a Ctrl-C there
    would end the commands with a traceback instead of `interrupted`."""
    path = tmp_path / ("last.pt" if writer == "checkpoint" else f"w{writer}")
    save = (lambda m: save_checkpoint({"model": m.state_dict()}, path)) if writer == "checkpoint" else (
        lambda m: W.save_state_dict(m, path)
    )  # fmt: skip
    save(make(seed=11))
    before = path.read_bytes()

    class CtrlC(io.FileIO):  # pressed while torch writes the records (not at its first write)
        writes = 0

        def write(self, b):
            CtrlC.writes += 1
            if CtrlC.writes > 3:
                raise KeyboardInterrupt
            return super().write(b)

    monkeypatch.setattr(checkpoint if writer == "checkpoint" else W, "open", CtrlC, raising=False)
    with pytest.raises(KeyboardInterrupt):
        save(make(seed=12))
    assert path.read_bytes() == before and os.listdir(tmp_path) == [path.name]


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_saved_files_get_the_usual_permissions(tmp_path, suffix):
    """A new file gets the umask's permissions (safetensors writes its file 0600), a replaced one keeps
    its own."""
    umask = os.umask(0o22)
    try:
        path = tmp_path / f"w{suffix}"
        W.save_state_dict(make(seed=11), path)
        assert path.stat().st_mode & 0o777 == 0o644
        path.chmod(0o600)
        W.save_state_dict(make(seed=12), path)
        assert path.stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(umask)


def test_save_rejects_unknown_suffix(tmp_path):
    with pytest.raises(ValueError, match=".safetensors or .pth"):
        W.save_state_dict(make(), tmp_path / "w.onnx")


# ------------------------------------------------------------------------------------------ fingerprint


def test_save_refuses_a_whole_checkpoint_by_its_entry(tmp_path):
    checkpoint_dict = {"model": {"w": torch.zeros(1)}, "step": 3}
    with pytest.raises(ValueError, match=r"its entry 'model' holds dict; pass the model or its state_dict"):
        W.save_state_dict(checkpoint_dict, tmp_path / "w.safetensors")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_save_refuses_a_model_on_the_meta_device(tmp_path, suffix):
    """Was NotImplementedError: Cannot copy out of meta tensor; no data!"""
    with pytest.raises(ValueError, match=r"'encoder\.cls_token' is on the meta device \(shapes only"):
        W.save_state_dict(make().to("meta"), tmp_path / f"w{suffix}")
    assert not os.listdir(tmp_path)


@pytest.mark.parametrize(
    "given, said",
    [
        (((0.5,) * 3, (0.0, 0.2, 0.2)), "mean and std need 3 finite values each"),
        (((0.5,) * 3, (float("nan"),) * 3), "mean and std need 3 finite values each"),
        (((0.5, 0.5), (0.2, 0.2)), "mean and std need 3 finite values each"),
        (((128.0,) * 3, (60.0,) * 3), r"mean and std are for images in \[0, 1\]"),
        (((0.5,) * 3,), r"\(mean, std\) must be two sequences of 3 numbers"),
        (("abc", "def"), r"\(mean, std\) must be two sequences of 3 numbers"),
    ],
)
def test_save_checks_the_normalization_it_records(tmp_path, given, said):
    """The commands would divide every image by a recorded std of 0 (or 255 times too much): checked as
    --mean/--std are, before anything is written."""
    with pytest.raises(ValueError, match=r"^cannot save '.*w.safetensors' with normalization: " + said):
        W.save_state_dict({"w": torch.zeros(1)}, tmp_path / "w.safetensors", normalization=given)
    assert not os.listdir(tmp_path)
    # Tensors and numpy numbers are recorded as plain floats (JSON could not write them).
    W.save_state_dict({"w": torch.zeros(1)}, tmp_path / "w.safetensors",
                      normalization=(torch.tensor([0.5, 0.25, 0.5]), [0.2] * 3))  # fmt: skip
    assert W.read_normalization(tmp_path / "w.safetensors") == ((0.5, 0.25, 0.5), (0.2,) * 3)


def test_a_recorded_normalization_is_checked_when_read(tmp_path):
    path = tmp_path / "w.safetensors"
    recorded = json.dumps({"mean": [0.5] * 3, "std": [0.0] * 3})
    safetensors.torch.save_file({"w": torch.zeros(1)}, path, metadata={W.NORMALIZATION_KEY: recorded})
    with pytest.raises(
        ValueError, match=r"^weight file '.*w.safetensors': its .* metadata: mean and std need 3"
    ):
        W.read_normalization(path)


def test_weight_fingerprint():
    a = make(seed=13)
    fp = W.weight_fingerprint(a)
    assert len(fp) == 16 and int(fp, 16) >= 0
    assert W.weight_fingerprint(make(seed=13)) == fp
    assert W.weight_fingerprint(_prefixed(a.state_dict(), "_orig_mod.")) == fp  # compiled model
    trained = W.load_state_dict(make(train=True), a.state_dict(), strict=False)  # ViT weights of `a`, own VGG
    assert W.weight_fingerprint(trained) == fp  # the VGG loss network is not part of the stylizer
    with torch.no_grad():
        a.post_process_conv.weight[0, 0, 0, 0] += 1e-6
    assert W.weight_fingerprint(a) != fp
    assert W.weight_fingerprint(make(seed=13).double()) != fp  # dtype is part of the identity


def test_a_random_vgg19_is_warned_about_once_until_weights_are_loaded(tmp_path):
    """The official constructor downloads ImageNet VGG19 weights; here a train=True model starts with a
    random one, which its first loss computation warns about, unless weights were loaded into it."""
    import warnings

    x = torch.randn(2, 3, 32, 32)
    fresh = make(train=True, depth=1, input_size=32)
    assert not fresh.vgg_encoder.training  # frozen, in eval mode from the start, as officially
    assert not fresh.train().vgg_encoder.training  # and after model.train()
    with pytest.warns(UserWarning, match="VGG19 of this train=True model is randomly initialized") as record:
        fresh(x)
    assert [w.filename for w in record] == [__file__]  # points at the user's call, not into torch
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fresh(x)  # once per model
        vgg_only = make(train=True, depth=1, input_size=32)
        W.load_vgg_weights(vgg_only, fresh.vgg_encoder.state_dict())
        vgg_only(x)
        whole = make(train=True, depth=1, input_size=32)
        W.save_state_dict(
            vgg_only, tmp_path / "official_like.safetensors"
        )  # VGG keys included, as officially
        W.load_state_dict(whole, W.read_state_dict(tmp_path / "official_like.safetensors"))
        whole.compute_loss(x, None, x, x, None)
    with pytest.warns(UserWarning, match="randomly initialized") as record:
        make(train=True, depth=1, input_size=32).compute_loss(x, None, x, x, None)
    assert [w.filename for w in record] == [__file__]
    partial = make(train=True, depth=1, input_size=32)
    first_conv = {k: v for k, v in fresh.state_dict().items() if k.startswith("vgg_encoder.features_0.")}
    partial.load_state_dict(first_conv, strict=False)  # one conv of sixteen: still random
    with pytest.warns(UserWarning, match="randomly initialized"):
        partial(x)


def test_no_random_vgg19_warning_on_the_meta_device():
    """FLOP counting (benchmark.flops) runs train=True models on the meta device: no values, no warning."""
    import warnings

    with torch.device("meta"):
        model = StylizingViT("tiny", train=True, encoder_depth=1, input_size=32, backend="reference")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loss, _ = model(torch.randn(2, 3, 32, 32, device="meta"))
    assert loss.style.is_meta


def test_no_random_vgg19_warning_for_a_pickle_from_before_the_flags():
    """A VGG19Features unpickled from a version without the loaded/warn_if_random flags is not known
    to be random: no warning."""
    import warnings

    vgg = VGG19Features()
    del vgg.loaded, vgg.warn_if_random  # what such a pickle restores
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        vgg.warn_once_if_random(stacklevel=1)


def test_a_replaced_loss_network_is_used_as_it_is():
    """Officially the VGG19 is timm's module: a model whose vgg_encoder was swapped for another (here a
    wrapper) computes its losses through it, without the random-weights check, which is ours."""

    class Wrapped(torch.nn.Module):
        def __init__(self, vgg):
            super().__init__()
            self.vgg = vgg

        def forward(self, x):
            return self.vgg(x)

    x = torch.randn(2, 3, 32, 32)
    model = make(train=True, depth=1, input_size=32)
    expected, _ = model(x)
    model.vgg_encoder = Wrapped(model.vgg_encoder)
    loss, _ = model(x)
    assert torch.equal(torch.stack(list(loss)), torch.stack(list(expected)))
    model.backend = "torch"  # the fast losses call it as officially too
    fast_loss, _ = model(x)
    torch.testing.assert_close(torch.stack(list(fast_loss)), torch.stack(list(expected)), rtol=1e-4, atol=0)


def test_weights_load_into_wrapped_models(tmp_path):
    """A compiled or DataParallel model takes the official key names (its own state dict prefixes them)."""
    source = make(seed=1)
    path = W.save_state_dict(source, tmp_path / "w.safetensors")
    for wrap in (lambda m: torch.compile(m, backend="eager"), torch.nn.DataParallel):
        target = make(seed=2)
        wrapped = wrap(target)
        assert W.load_state_dict(wrapped, path) is wrapped
        assert_same_state(target, source)
        trained = make(train=True, depth=1)
        vgg = VGG19Features().state_dict()
        W.load_vgg_weights(wrap(trained), vgg)
        assert torch.equal(trained.vgg_encoder.features_0.weight, vgg["features_0.weight"])
