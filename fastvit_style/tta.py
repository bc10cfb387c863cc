"""Test-time augmentation (shared doc 4.2): a cached style bank, many-reference stylization, a TTA classifier.

Why many references are cheap. Per layer i the official schedule computes (shared doc 1.4)
    X^{i+1} = f_i(X^i, X^i)    S^{i+1} = f_i(S^i, S^i)    Y^i = f_i(A^i, S^i)    A^{i+1} = f_i(X^{i+1}, Y^i)
with A^0 = X^0 and output reconstruct(LN_f(Y^{D-1})). The style stream S never reads the content, and the
stylization reads only the K/V projection of S^i: a reference is encoded once into per-layer K/V (the
`StyleBank`). The content stream X never reads the style: it runs once per test image, shared by its K
references. Per (image, reference) pair only Y^i and A^{i+1} remain, 2 block calls per layer instead of 4,
batched over all pairs, each pair reading its reference's K/V through kv_index (no copy is made here; the
Triton kernels read the bank in place, the PyTorch op gathers K/V per query sequence).
"""

from __future__ import annotations

import json
import os
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from .atomic import atomic_path
from .backends import attention_for
from .block import block_forward, block_with_kv, project_kv, project_q
from .configs import ModelConfig
from .devices import to_device_async
from .weights import weight_fingerprint

_BANK_TAG = "fastvit_style.StyleBank"  # safetensors metadata "kind": tells a bank from a weight file
REDUCTIONS = ("mean_prob", "vote")


def _model_dtype(model) -> torch.dtype:
    return model.encoder.pos_embed.dtype


def _describe(obj) -> str:
    return f"a {obj.dtype} tensor" if isinstance(obj, torch.Tensor) else f"{type(obj).__name__} {obj!r:.60}"


def _check_bank(bank) -> None:
    if not isinstance(bank, StyleBank):
        raise TypeError(
            f"bank must be a StyleBank (StyleBank.from_images(model, refs)), got {_describe(bank)}"
        )


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {_describe(generator)}")


class StyleBank:
    """Per-layer keys/values of the style streams of R reference images, all a stylization needs from them.

    k, v: (D, R, T, H, d) each, in the model's dtype: k[i, j], v[i, j] = LN_ctx and K/V projections of
    layer i applied to S^i of reference j (k_proj bias left out, as in `block.project_kv`).
    config: the model's config dict; fingerprint: `weight_fingerprint` of the model that built it.

    A bank is checked against a model (config and weight fingerprint) the first time it is used with
    it; later in-place changes to that model's weights are not seen: rebuild the bank after training.
    The fingerprint covers the dtype: build the bank with the model in the dtype it will run in (for
    mixed precision keep the model in float32 and use torch.autocast; the bank may then be converted
    to the autocast dtype with `bank.to(dtype=torch.bfloat16)`, same results, half the memory).
    """

    def __init__(self, k: torch.Tensor, v: torch.Tensor, config: dict, fingerprint: str):
        for name, t in (("k", k), ("v", v)):
            if not isinstance(t, torch.Tensor) or not t.is_floating_point():
                raise TypeError(f"bank {name} must be a floating-point torch.Tensor, got {_describe(t)}")
        cfg = ModelConfig(**config)
        R = k.shape[1] if k.dim() == 5 else 0
        for name, t in (("k", k), ("v", v)):
            if R < 1 or tuple(t.shape) != (cfg.depth, R, cfg.num_tokens, cfg.num_heads, cfg.head_dim):
                raise ValueError(
                    f"bank {name} must have shape (D={cfg.depth}, R>=1, T={cfg.num_tokens}, H={cfg.num_heads}, "
                    f"d={cfg.head_dim}) for its config, got {tuple(t.shape)}"
                )
        if k.dtype != v.dtype or k.device != v.device:
            raise ValueError(
                f"bank k and v must share dtype and device, got {k.dtype}/{k.device} and {v.dtype}/{v.device}"
            )
        self.k, self.v, self.config, self.fingerprint = k, v, cfg.to_dict(), fingerprint
        self._checked = weakref.WeakSet()  # models already verified against this bank

    @classmethod
    @torch.no_grad()
    def from_images(cls, model, refs: torch.Tensor, batch_size: int = 32) -> StyleBank:
        """Run the style stream once per reference. refs: (R, C, H, W) normalized images, model's dtype/device.

        batch_size references are encoded at a time; under autocast the K/V are computed in the autocast
        dtype and stored in the model's dtype.
        """
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        model._check_inputs(refs, None, names=("refs", ""))
        enc, cfg = model.encoder, model.config
        attend = attention_for(model.backend, refs.device)
        shape = (cfg.depth, refs.shape[0], cfg.num_tokens, cfg.num_heads, cfg.head_dim)
        k_all = refs.new_empty(shape, dtype=_model_dtype(model))
        v_all = torch.empty_like(k_all)
        for start in range(0, refs.shape[0], batch_size):
            S = enc.embed(refs[start : start + batch_size])
            rows = slice(start, start + S.shape[0])
            own = torch.arange(S.shape[0], device=refs.device, dtype=torch.int32)
            for i, blk in enumerate(enc.blocks):
                k, v = project_kv(blk, S)
                k_all[i, rows], v_all[i, rows] = k, v
                if i < cfg.depth - 1:  # S^D is never read
                    S = block_with_kv(blk, S, k, v, own, attend)
        bank = cls(k_all, v_all, cfg.to_dict(), weight_fingerprint(model))
        bank._checked.add(model)  # made from this very model: no second hash of its weights
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
        self._checked = weakref.WeakSet()

    # ------------------------------------------------------------------------------------------- checks

    def check(self, model) -> None:
        """Raise ValueError unless `model` has this bank's config and weights. Hashes every weight."""
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
        self._checked.add(model)

    def verify(self, model) -> None:
        """Placement (every call) and weights (`check`, once per model object) before a stylization."""
        dtype, device = _model_dtype(model), model.encoder.pos_embed.device
        # Under autocast the attention casts K/V to the autocast dtype anyway: a bank already in that
        # dtype gives the same numbers and saves the cast (and half the memory) on every call.
        amp = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else dtype
        if self.device != device or self.dtype not in (dtype, amp):
            raise ValueError(
                f"the style bank is {self.dtype} on {self.device} but the model is {dtype} on {device}: "
                f"use bank.to({str(device)!r}, {dtype})"
                + (f" (or {amp}, the autocast dtype)" if amp != dtype else "")
            )
        if model not in self._checked:
            self.check(model)

    # --------------------------------------------------------------------------------------------- files

    def save(self, path) -> str:
        """Write k, v and (as JSON metadata) config and fingerprint to a .safetensors file, atomically."""
        import safetensors.torch

        path = os.fspath(path)
        if not os.path.isdir(os.path.dirname(os.path.abspath(path))):
            raise ValueError(f"cannot save the style bank to {path!r}: its folder does not exist")
        tensors = {"k": self.k.detach().to("cpu").contiguous(), "v": self.v.detach().to("cpu").contiguous()}
        meta = {
            "format": "pt",
            "kind": _BANK_TAG,
            "config": json.dumps(self.config),
            "fingerprint": self.fingerprint,
        }
        with atomic_path(path) as tmp:
            safetensors.torch.save_file(tensors, tmp, metadata=meta)
        return path

    @classmethod
    def load(cls, path, model=None) -> StyleBank:
        """Read a bank onto the CPU; with `model`, check it against the model and move it to its device."""
        from safetensors import SafetensorError, safe_open

        path = os.fspath(path)
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
        except (KeyError, ValueError) as e:
            raise ValueError(
                f"{path!r} is a StyleBank file with damaged metadata ({type(e).__name__}: {e})"
            ) from e
        if not isinstance(config, dict):
            raise ValueError(f"{path!r} is a StyleBank file with damaged metadata (config is not an object)")
        bank = cls(k, v, config, fingerprint)
        if model is not None:
            bank.check(model)
            bank = bank.to(model.encoder.pos_embed.device)
        return bank


def select_refs(num_refs: int, batch: int, refs=None, k: int | None = None, generator=None) -> torch.Tensor:
    """Bank indices per image, (batch, K) int64: `refs` checked, or `k` drawn per image uniformly without
    replacement with `generator` (a torch.Generator; its device is used), or all num_refs by default."""
    if refs is not None and k is not None:
        raise ValueError("give refs or k, not both")
    if refs is not None:
        refs = torch.as_tensor(refs)
        if refs.dim() != 2 or refs.shape[0] != batch or refs.shape[1] < 1:
            raise ValueError(
                f"refs must have shape ({batch}, K) with K >= 1 (bank indices per image), got {tuple(refs.shape)}"
            )
        if refs.dtype.is_floating_point or refs.dtype.is_complex or refs.dtype == torch.bool:
            raise ValueError(f"refs must hold integer bank indices, got dtype {refs.dtype}")
        lo, hi = torch.stack([refs.min(), refs.max()]).tolist()  # on a GPU: one sync, on the user's refs
        if lo < 0 or hi >= num_refs:
            raise ValueError(
                f"refs must lie in [0, {num_refs}) (the bank has {num_refs} references), got min {lo} and max {hi}"
            )
        return refs.long()
    if k is None:
        return torch.arange(num_refs).expand(batch, num_refs)
    _check_generator(generator)
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= num_refs:
        raise ValueError(f"k must be an int in 1..{num_refs} (the bank size), got {k!r}")
    device = generator.device if generator is not None else "cpu"
    return torch.rand(batch, num_refs, generator=generator, device=device).argsort(dim=1)[:, :k]


def stylize(model, x: torch.Tensor, bank: StyleBank, refs=None, k=None, generator=None, chunk_size: int = 64):
    """Each image of x (B, C, H, W) stylized by K bank references -> (B, K, C, H, W) in the compute dtype.

    refs: (B, K) bank indices per image; k: K drawn per image at random (see `select_refs`); default:
    every bank entry. Equal to `model(x[b:b+1], ref_j)` for each pair. At most about chunk_size
    (image, reference) pairs are in flight at once (one image's K pairs when K exceeds it, split into
    chunk_size slices that each rerun its content stream). Honours the ambient grad mode and autocast.
    """
    _check_stylize(model, x, bank, chunk_size)
    return _stylize(model, x, bank, select_refs(len(bank), x.shape[0], refs, k, generator), chunk_size)


def _check_stylize(model, x: torch.Tensor, bank: StyleBank, chunk_size) -> None:
    _check_bank(bank)
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    model._check_inputs(x, None)
    bank.verify(model)


def _stylize(model, x: torch.Tensor, bank: StyleBank, index: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """`stylize` after its checks, with index (B, K) bank indices known to be in range, on any device
    (checking drawn indices again would cost a sync where they were drawn on the GPU)."""
    index = to_device_async(index, x.device)
    B, K = index.shape
    attend = attention_for(model.backend, x.device)
    per, kc = max(1, chunk_size // K), min(K, chunk_size)
    rows = []
    for b in range(0, B, per):
        pairs = [
            _stylize_pairs(model, x[b : b + per], bank, index[b : b + per, j : j + kc], attend)
            for j in range(0, K, kc)
        ]
        rows.append(torch.cat(pairs, dim=1))
    return torch.cat(rows)


def _stylize_pairs(model, x: torch.Tensor, bank: StyleBank, index: torch.Tensor, attend) -> torch.Tensor:
    """x (n, C, H, W), index (n, K) -> (n, K, C, H, W). Pair p = b*K + j reads bank entry index[b, j]."""
    enc = model.encoder
    n, K = index.shape
    kv_index = index.reshape(-1).to(torch.int32)
    own = torch.arange(n * K, device=x.device, dtype=torch.int32)
    X = enc.embed(x)  # content stream, once per image
    A = X.repeat_interleave(K, dim=0)  # A^0 = X^0 for each pair
    last = len(enc.blocks) - 1
    for i, blk in enumerate(enc.blocks):
        if i == last:  # only the patch rows of Y^{D-1} reach the head; CLS stays in the bank's K/V
            Y = block_with_kv(blk, A[:, 1:], bank.k[i], bank.v[i], kv_index, attend)
            break
        Y = block_with_kv(blk, A, bank.k[i], bank.v[i], kv_index, attend)
        X = block_forward(blk, X, X, own[:n], attend)
        # A' = f(X', Y): the query side (LN_in, q projection) is the image's, shared by its K pairs.
        q = project_q(blk, X).repeat_interleave(K, dim=0)
        k, v = project_kv(blk, Y)
        A = block_with_kv(blk, X.repeat_interleave(K, dim=0), k, v, own, attend, q=q)
    return model.reconstruct_patches(enc.norm(Y)).unflatten(0, (n, K))


class TTAClassifier(nn.Module):
    """Classify each image through V views: K stylized copies (bank references) plus the original.

    classifier: nn.Module mapping (N, C, H, W) normalized images (the stylizer's space) to logits
    (N, num_classes); it sees all views of a batch at once, (B*V, C, H, W), in x's dtype. It may be
    torch.compile'd. stylizer: a StylizingViT matching `bank`. k: references per image, drawn at random
    with `generator` on every call (None: the whole bank, in order). reduce: "mean_prob" averages the
    softmax over views; "vote" returns the normalized histogram of per-view argmax classes (a view's
    ties go to its lowest class index, and so does argmax of the histogram). The stylizer runs under
    no_grad (it is frozen); the classifier follows the ambient grad mode. Call .eval() for inference.
    """

    def __init__(
        self,
        classifier: nn.Module,
        stylizer: nn.Module,
        bank: StyleBank,
        k: int | None = 8,
        include_original: bool = True,
        reduce: str = "mean_prob",
        generator=None,
        chunk_size: int = 64,
    ):
        super().__init__()
        if reduce not in REDUCTIONS:
            raise ValueError(f"reduce must be one of {REDUCTIONS}, got {reduce!r}")
        _check_bank(bank)
        _check_generator(generator)
        if k is not None:
            select_refs(len(bank), 1, k=k)  # validates k against the bank size
        self.classifier, self.stylizer, self.bank = classifier, stylizer, bank
        self.k, self.include_original, self.reduce = k, include_original, reduce
        self.generator, self.chunk_size = generator, chunk_size

    def _apply(self, fn, recurse=True):
        # .to(device)/.cuda() carry the bank along with the stylizer (its dtype stays: see StyleBank).
        super()._apply(fn, recurse)
        self.bank = self.bank.to(self.stylizer.encoder.pos_embed.device)
        return self

    @property
    def num_views(self) -> int:
        return (len(self.bank) if self.k is None else self.k) + int(self.include_original)

    def make_views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) -> views (B, V, C, H, W) in x's dtype (original first when included) and the
        bank indices used, (B, K) int64."""
        _check_stylize(self.stylizer, x, self.bank, self.chunk_size)
        refs = select_refs(len(self.bank), x.shape[0], k=self.k, generator=self.generator)
        with torch.no_grad():
            stylized = _stylize(self.stylizer, x, self.bank, refs, self.chunk_size).to(x.dtype)
        views = torch.cat([x.unsqueeze(1), stylized], dim=1) if self.include_original else stylized
        return views, refs

    def classify(self, views: torch.Tensor) -> torch.Tensor:
        """views (B, V, C, H, W) -> per-view class probabilities (B, V, num_classes), float32."""
        logits = self.classifier(views.flatten(0, 1))
        n = views.shape[0] * views.shape[1]
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else None
        if shape is None or len(shape) != 2 or shape[0] != n or shape[1] < 1:
            got = shape if shape is not None else _describe(logits)
            raise ValueError(
                f"the classifier must return logits of shape ({n}, num_classes) for {n} images, got {got}"
            )
        return logits.float().softmax(dim=-1).unflatten(0, views.shape[:2])

    def aggregate(self, view_probs: torch.Tensor) -> torch.Tensor:
        """(B, V, num_classes) -> (B, num_classes), each row summing to 1."""
        if self.reduce == "mean_prob":
            return view_probs.mean(dim=1)
        votes = F.one_hot(view_probs.argmax(dim=-1), view_probs.shape[-1]).sum(dim=1)
        return votes.float() / view_probs.shape[1]

    def forward(self, x: torch.Tensor, return_views: bool = False):
        """x (B, C, H, W) -> class probabilities (B, num_classes), and (B, V, num_classes) per view if asked."""
        view_probs = self.classify(self.make_views(x)[0])
        probs = self.aggregate(view_probs)
        return (probs, view_probs) if return_views else probs
