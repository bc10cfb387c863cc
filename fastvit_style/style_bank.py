"""StyleBank: the per-layer keys/values of R style references, encoded once and read by every stylization
with them (why that is all a stylization needs: fastvit_style.tta's docstring). Saved as safetensors."""

from __future__ import annotations

import json
import os
import weakref

import torch

from .atomic import atomic_path, file_path_problem, str_path
from .block import block_with_kv, project_kv
from .configs import ModelConfig, is_int
from .devices import autocast_dtype
from .weights import is_vgg_key, unwrap, weight_fingerprint, write_safetensors

_BANK_TAG = "fastvit_style.StyleBank"  # safetensors metadata "kind": tells a bank from a weight file


def _model_dtype(model) -> torch.dtype:
    return model.encoder.pos_embed.dtype


def _require_values(model) -> None:
    if model.encoder.pos_embed.is_meta:  # the fingerprint reads the weights' values
        raise ValueError(
            "a style bank needs weights with values: the model is on the meta device (shapes only)"
        )


def _version(refs: tuple):
    """What tells whether the parameters behind weak references `refs` were written since: the sum of
    their version counters, which every in-place write through autograd's view of a tensor raises
    (optimizer steps, load_state_dict's copy_); -1 once one of them is gone (replaced, as by
    load_state_dict(assign=True), and freed). Inference tensors have no counter: a few of each one's
    values then, on the CPU (a host sync, on that path only), which any load of other weights changes."""
    params = [ref() for ref in refs]
    if any(p is None for p in params):
        return -1
    if any(p.is_inference() for p in params):
        return torch.cat(
            [p.detach().reshape(-1)[:: max(1, p.numel() // 8)][:8].float() for p in params]
        ).cpu()
    return sum(p._version for p in params)


def _same_version(a, b) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):  # bit for bit: a NaN equals itself
        same_kind = isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
        return same_kind and torch.equal(a.view(torch.int32), b.view(torch.int32))
    return a == b


def _bank_path(path) -> str:
    """`path` (str or os.PathLike) as a str; TypeError otherwise (a bytes path failed deep inside the
    file checks or safetensors, an int with os.fspath's message, which names no argument)."""
    if (name := str_path(path)) is None:
        raise TypeError(
            f"path must be a str or os.PathLike naming the style bank file, got {describe_value(path)}"
        )
    return name


def check_count(name: str, value) -> None:
    """ValueError unless value is a positive integer (a bool is not one)."""
    if not is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def describe_value(obj) -> str:
    """How an error message shows a value a user passed: a tensor by its dtype and shape, a tuple or list
    by what it holds (the first 4), anything else by its type and the start of its repr (never a
    tensor's numbers)."""
    if isinstance(obj, torch.Tensor):
        return f"a {obj.dtype} tensor of shape {tuple(obj.shape)}"
    if isinstance(obj, (tuple, list)):
        held = ", ".join(describe_value(o) for o in obj[:4]) + (", ..." if len(obj) > 4 else "")
        return f"a {type(obj).__name__} of {len(obj)} ({held})"
    if isinstance(obj, dict):
        return f"a dict with keys {list(obj)[:8]!r:.80}"
    return f"{type(obj).__name__} {obj!r:.60}"


def find_stylizer(obj):
    """The StylizingViT inside obj's torch.compile, DDP or DataParallel wrappers, or None."""
    from .model import StylizingViT  # here: the model module imports tta, which imports this one

    inner = unwrap(obj) if isinstance(obj, torch.nn.Module) else obj
    return inner if isinstance(inner, StylizingViT) else None


def as_stylizer(model, name: str = "model"):
    """`find_stylizer(model)`; TypeError naming the argument where there is none (a swapped argument
    would fail deep inside)."""
    if (inner := find_stylizer(model)) is None:
        raise TypeError(f"{name} must be a fastvit_style StylizingViT, got {describe_value(model)}")
    return inner


class StyleBank:
    """Per-layer keys/values of the style streams of R reference images, all a stylization needs from them.

    k, v: (D, R, T, H, d) each, in the dtype they were computed in (the model's; under autocast, the
    autocast dtype, except for a float64 model): k[i, j], v[i, j] = LN_ctx and K/V projections of
    layer i applied to S^i of reference j (k_proj bias left out, as in `block.project_kv`).
    config: the model's config dict; fingerprint: `weight_fingerprint` of the model that built it.

    A bank is checked against a model (config and weight fingerprint) the first time it is used with
    it, and again when the model's dtype has changed since or its parameters were written in
    place (an optimizer step, load_state_dict; for inference tensors, which have no version counter, a
    few of their values are compared) or replaced and freed (load_state_dict(assign=True)): a bank of
    weights that have changed is refused, so rebuild it after training. Not seen: writes that leave
    the version counters alone (`.data`, hence torch.nn.utils.vector_to_parameters;
    module.half().float(), fused optimizer steps), replaced parameters still referenced elsewhere (by
    an optimizer), and in compiled calls any change since the bank's last eager check of the model (a
    trace cannot read the version counters: a change made before the first compiled call is missed
    too; `check(model)` before it). The
    bank's K/V are constants to autograd: gradients through a stylization reach the content image and
    the weights of its content and stylized streams, not the references' stream.
    The fingerprint covers the dtype: build the bank with the model in the dtype it will run in (for
    mixed precision keep the model in float32 and use torch.autocast: a bank built outside autocast
    serves it too, and may be converted to the autocast dtype with `bank.to(dtype=torch.bfloat16)`, same
    results, half the memory; one built under autocast holds that dtype's rounding, so is refused outside).
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, config: dict, fingerprint: str):
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"bank {name} must be a floating-point torch.Tensor, got {describe_value(t)}")
        cfg = ModelConfig(**config)
        cfg.validate()
        R = k.shape[1] if k.dim() == 5 else 0
        for name, t in (("k", k), ("v", v)):
            if R < 1 or tuple(t.shape) != (cfg.depth, R, cfg.num_tokens, cfg.num_heads, cfg.head_dim):
                raise ValueError(
                    f"bank {name} must have shape (D={cfg.depth}, R>=1, T={cfg.num_tokens}, H={cfg.num_heads}, "
                    f"d={cfg.head_dim}) for its config, got {tuple(t.shape)}"
                )
        if not isinstance(fingerprint, str) or not fingerprint:
            raise TypeError(
                f"bank fingerprint must be a non-empty str (weight_fingerprint of the model that built it), "
                f"got {describe_value(fingerprint)}"
            )
        if k.dtype != v.dtype or k.device != v.device:
            raise ValueError(
                f"bank k and v must share dtype and device, got {k.dtype}/{k.device} and {v.dtype}/{v.device}"
            )
        # Detached: the docstring's constants also where a caller made k and v from tensors that require grad.
        self.k, self.v, self.config, self.fingerprint = k.detach(), v.detach(), cfg.to_dict(), fingerprint
        # Models already verified against this bank: (dtype, weak references to its parameters, their
        # `_version` then). An in-place .double() or optimizer step after the check may change the
        # fingerprint: checked again.
        self._checked: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @classmethod
    @torch.no_grad()
    def from_images(cls, model, refs: torch.Tensor, batch_size: int = 32) -> StyleBank:
        """Run the style stream once per reference. refs: (R, C, H, W) normalized images, model's dtype/device.

        batch_size references are encoded at a time; under autocast the K/V are computed and stored in the
        autocast dtype (float64 models excepted): stored wider, a float32 stylization would take their
        rounding for float32's.
        """
        check_count("batch_size", batch_size)
        model = as_stylizer(model)
        _require_values(model)
        model._check_inputs(refs, None, names=("refs", ""))
        enc, cfg = model.encoder, model.config
        attend = model._fast_attention(refs.device)
        shape = (cfg.depth, refs.shape[0], cfg.num_tokens, cfg.num_heads, cfg.head_dim)
        k_all = v_all = None
        for start in range(0, refs.shape[0], batch_size):
            S = enc.embed(refs[start : start + batch_size])
            rows = slice(start, start + S.shape[0])
            own = torch.arange(S.shape[0], device=refs.device, dtype=torch.int32)
            for i, blk in enumerate(enc.blocks):
                k, v = project_kv(blk, S)
                if k_all is None:  # in the compute dtype (docstring)
                    k_all, v_all = k.new_empty(shape), v.new_empty(shape)
                k_all[i, rows], v_all[i, rows] = k, v
                if i < cfg.depth - 1:  # S^D is never read
                    S = block_with_kv(blk, S, k, v, own, attend)
        bank = cls(k_all, v_all, cfg.to_dict(), weight_fingerprint(model))
        bank._remember(model)  # made from this very model: no second hash of its weights
        return bank

    def __len__(self) -> int:
        return self.k.shape[1]

    def __repr__(self) -> str:
        return (
            f"StyleBank({len(self)} references, depth {self.k.shape[0]}, {self.k.dtype}, {self.k.device}, "
            f"{self.nbytes / 2**20:.1f} MiB, weights {self.fingerprint})"
        )

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    @property
    def device(self) -> torch.device:
        return self.k.device

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    def to(self, device=None, dtype=None) -> StyleBank:
        """A bank on `device` / in `dtype` (self when nothing changes); `bank.to(torch.bfloat16)` works
        too, as for a tensor."""
        if isinstance(device, torch.dtype):
            device, dtype = None, device
        k, v = self.k.to(device=device, dtype=dtype), self.v.to(device=device, dtype=dtype)
        if k is self.k and v is self.v:
            return self
        bank = StyleBank(k, v, self.config, self.fingerprint)
        bank._checked = self._checked  # same config and fingerprint: the verified models carry over
        return bank

    def __getstate__(self) -> dict:
        # The verified models are weak references, which pickle cannot store (torch.save of a bank or
        # of a TTAClassifier, DataLoader workers): a copy checks its models again.
        return {k: v for k, v in self.__dict__.items() if k != "_checked"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._checked = weakref.WeakKeyDictionary()

    # ------------------------------------------------------------------------------------------- checks

    def _remember(self, model) -> None:
        model = unwrap(model)
        # The parameters the fingerprint covers (K/V depend on the encoder's alone, but a bank is refused
        # for other weights alike however it meets the model), held weakly: replaced ones are not kept alive.
        refs = tuple(weakref.ref(p) for n, p in model.named_parameters() if not is_vgg_key(n))
        self._checked[model] = (_model_dtype(model), refs, _version(refs))

    def check(self, model) -> None:
        """Raise ValueError unless `model` (also inside its wrappers) has this bank's config and weights.
        Hashes every weight."""
        model = as_stylizer(model)
        _require_values(model)
        config = model.config.to_dict()
        if config != self.config:
            diff = ", ".join(
                f"{k} {self.config.get(k)} vs {v}" for k, v in config.items() if self.config.get(k) != v
            )
            raise ValueError(
                f"the style bank was built with other weights: another architecture (bank vs model: {diff})"
            )
        fingerprint = weight_fingerprint(model)
        if fingerprint != self.fingerprint:
            raise ValueError(
                f"the style bank was built with other weights (fingerprints differ: bank {self.fingerprint}, "
                f"model {fingerprint}; they cover the weights' dtype too, {_model_dtype(model)} in the model); "
                "rebuild it with StyleBank.from_images(model, refs)"
            )
        self._remember(model)

    def verify(self, model) -> None:
        """Weights (`check`, once per model object and dtype, and again after in-place writes to its
        parameters) and placement (every call) before a stylization."""
        model = as_stylizer(model)
        dtype, device = _model_dtype(model), model.encoder.pos_embed.device
        seen = self._checked.get(model)  # as_stylizer unwrapped it
        # Weights first: a bank of other weights (or of these in another dtype) is rebuilt, not moved.
        # Dynamo cannot trace the version check (is_inference): a compiled call leaves it to eager ones.
        if (
            seen is None
            or seen[0] != dtype
            or (not torch.compiler.is_compiling() and not _same_version(seen[2], _version(seen[1])))
        ):
            self.check(model)
        # Under autocast the attention casts K/V to the autocast dtype anyway: a bank already in that
        # dtype gives the same numbers and saves the cast (and half the memory) on every call. Autocast
        # leaves float64 alone: a float64 model's attention would get such a bank uncast.
        amp = (autocast_dtype(device.type) if dtype != torch.float64 else None) or dtype
        if self.device != device or self.dtype not in (dtype, amp):
            if self.dtype in (dtype, amp):  # only the device differs
                remedy = f"use bank.to({str(device)!r})"
            elif torch.finfo(self.dtype).eps > torch.finfo(dtype).eps:  # converting up keeps the rounding
                remedy = (
                    f"rebuild it with StyleBank.from_images(model, refs) (converted to {dtype}, a "
                    f"{self.dtype} bank keeps {self.dtype}'s rounding)"
                )
            else:
                remedy = f"use bank.to({str(device)!r}, {dtype})" + (
                    f" (or {amp}, the autocast dtype)" if amp != dtype else ""
                )
            raise ValueError(
                f"the style bank is {self.dtype} on {self.device} but the model is {dtype} on {device}: "
                + remedy
            )

    # --------------------------------------------------------------------------------------------- files

    def save(self, path) -> str:
        """Write k, v and (as JSON metadata) config, fingerprint and a fingerprint of k and v themselves
        (checked by `load`) to a .safetensors file, atomically."""
        path = _bank_path(path)
        if problem := file_path_problem(path):
            raise ValueError(f"cannot save the style bank to {path!r}: {problem}")
        if self.k.is_meta:
            raise ValueError("the style bank is on the meta device, which holds no values: nothing to save")
        tensors = {"k": self.k.detach().to("cpu").contiguous(), "v": self.v.detach().to("cpu").contiguous()}
        meta = {
            "format": "pt",
            "kind": _BANK_TAG,
            "config": json.dumps(self.config),
            "fingerprint": self.fingerprint,
            # The header is checked by reading it, the values by this: a changed byte would load silently.
            "kv_fingerprint": weight_fingerprint(tensors),
        }
        with atomic_path(path, remove_leftovers=True) as tmp:
            write_safetensors(tensors, tmp, meta)
        return path

    @classmethod
    def load(cls, path, model=None) -> StyleBank:
        """Read a bank onto the CPU; with `model`, check it against the model and move it to its device.
        Without, its first stylization checks it (hashing the weights), which torch.compile(fullgraph=True)
        cannot trace: pass `model` here, or call `bank.check(model)`, before a compiled use."""
        from safetensors import SafetensorError, safe_open

        path = _bank_path(path)
        if not os.path.isfile(path):
            what = "is a folder, not a StyleBank file" if os.path.isdir(path) else "does not exist"
            raise FileNotFoundError(f"style bank {path!r} {what}")
        try:
            with safe_open(path, framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                if meta.get("kind") != _BANK_TAG or set(f.keys()) != {"k", "v"}:
                    raise ValueError(
                        f"{path!r} is a safetensors file but not a StyleBank (saved by StyleBank.save)"
                    )
                k, v = f.get_tensor("k"), f.get_tensor("v")
        except SafetensorError as e:
            raise ValueError(f"{path!r} is truncated or corrupt, or not a safetensors file ({e})") from e
        try:
            config, fingerprint = json.loads(meta["config"]), meta["fingerprint"]
            if not isinstance(config, dict):
                raise ValueError("config is not an object")
            ModelConfig(**config).validate()
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(
                f"{path!r} is a StyleBank file with damaged metadata, or one written by another version "
                f"({type(e).__name__}: {e})"
            ) from e
        recorded = meta.get("kv_fingerprint")  # None in files written before it was recorded
        if recorded is not None and recorded != weight_fingerprint({"k": k, "v": v}):
            raise ValueError(
                f"{path!r} is a damaged or edited StyleBank file: its K/V values differ from those it was "
                "saved with (their fingerprint does not match the one recorded at save)"
            )
        bank = cls(k, v, config, fingerprint)
        if model is not None:
            model = as_stylizer(model)
            bank.check(model)
            bank = bank.to(model.encoder.pos_embed.device)
        return bank
