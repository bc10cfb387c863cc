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

import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx.experimental.symbolic_shapes import guard_or_true

from .block import block_forward, block_with_kv, project_kv, project_q
from .configs import check_flag, is_int
from .devices import generator_from_state, generator_state, to_device_async
from .style_bank import StyleBank, as_stylizer, check_count, describe_value

REDUCTIONS = ("mean_prob", "vote")


def _check_bank(bank) -> None:
    if not isinstance(bank, StyleBank):
        raise TypeError(
            f"bank must be a StyleBank (StyleBank.from_images(model, refs)), got {describe_value(bank)}"
        )


def _check_generator(generator) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {describe_value(generator)}")


def _check_k(k, num_refs: int) -> None:
    if not is_int(k) or not 1 <= k <= num_refs:
        raise ValueError(f"k must be an int in 1..{num_refs} (the bank size), got {k!r}")


def select_refs(num_refs: int, batch: int, refs=None, k: int | None = None, generator=None) -> torch.Tensor:
    """Bank indices per image, (batch, K) int64: `refs` checked, or `k` drawn per image uniformly without
    replacement with `generator` (a torch.Generator; its device is used), or all num_refs by default."""
    check_count("num_refs", num_refs)
    # A traced batch size (torch.compile's dynamic shapes) is a SymInt, an int at run time.
    if not isinstance(batch, torch.SymInt) and not (is_int(batch) and batch >= 0):
        raise ValueError(f"batch must be an int >= 0, got {batch!r}")
    if refs is not None and k is not None:
        raise ValueError("give refs or k, not both")
    if refs is not None:
        try:
            refs = torch.as_tensor(refs)
        except (TypeError, ValueError, RuntimeError) as e:  # a ragged list, strings
            raise ValueError(f"refs must be a (B, K) tensor or nested list of bank indices ({e})") from e
        if refs.dim() != 2 or refs.shape[0] != batch or refs.shape[1] < 1:
            raise ValueError(
                f"refs must have shape ({batch}, K) with K >= 1 (bank indices per image), got {tuple(refs.shape)}"
            )
        if refs.dtype.is_floating_point or refs.dtype.is_complex or refs.dtype == torch.bool:
            raise ValueError(f"refs must hold integer bank indices, got dtype {refs.dtype}")
        if refs.device.type == "meta":  # the range check reads the values
            raise ValueError("refs must hold bank indices with values, got a tensor on the meta device")
        # torch's min and max know no uint16-64 (numpy's unsigned index arrays) and dynamo's tolist no unsigned
        # dtype: int64 holds uint8-32 exactly; uint64 goes to float64 (exact below 2**53; eager only)
        unsigned = (torch.uint8, torch.uint16, torch.uint32)
        wide = (
            refs.long() if refs.dtype in unsigned else refs.double() if refs.dtype == torch.uint64 else refs
        )
        lo, hi = torch.stack([wide.min(), wide.max()]).tolist()  # on a GPU: one sync, on the user's refs
        if not (guard_or_true(lo >= 0) and guard_or_true(hi < num_refs)):
            raise ValueError(
                f"refs must lie in [0, {num_refs}) (the bank has {num_refs} references), got min {int(lo)} and max {int(hi)}"
            )
        # Traced whole (torch.compile(fullgraph=True)), lo and hi are known only when the graph runs, where
        # no branch can read them: runtime asserts instead (the Triton kernels would clamp such an index).
        # Their messages read no local variable: torch 2.11's dynamo cannot trace a closure there.
        torch._check(lo >= 0, lambda: "refs must lie in [0, len(bank))")
        torch._check(hi < num_refs, lambda: "refs must lie in [0, len(bank))")
        return refs.long()
    if k is None:
        return torch.arange(num_refs).repeat(batch, 1)
    _check_generator(generator)
    _check_k(k, num_refs)
    # generator=None is left out, not passed: torch.compile (2.13) cannot run torch.rand(..., generator=None)
    # at a dynamic batch size (a compiled TTAClassifier failed at its second batch size).
    device = generator.device if generator is not None else "cpu"
    given = {"generator": generator} if generator is not None else {}
    return torch.rand(batch, num_refs, device=device, **given).argsort(dim=1)[:, : int(k)]


def stylize(model, x: torch.Tensor, bank: StyleBank, refs=None, k=None, generator=None, chunk_size: int = 64):
    """Each image of x (B, C, H, W) stylized by K bank references -> (B, K, C, H, W) in the compute dtype.

    refs: (B, K) bank indices per image; k: K drawn per image at random with `generator` (read only
    then; see `select_refs`); default: every bank entry. Equal to `model(x[b:b+1], ref_j)` for each
    pair. At most about chunk_size (image, reference) pairs are in flight at once (one image's K pairs
    when K exceeds it, split into chunk_size slices that each rerun its content stream). Honours the
    ambient grad mode and autocast; the bank's K/V are constants to autograd (no gradient reaches the
    weights through the references).
    """
    model = _check_stylize(model, x, bank, chunk_size)
    return _stylize(model, x, bank, select_refs(len(bank), x.shape[0], refs, k, generator), chunk_size)


def _check_stylize(model, x: torch.Tensor, bank: StyleBank, chunk_size):
    """The StylizingViT inside `model`'s wrappers, once x, bank and chunk_size fit it."""
    model = as_stylizer(model)
    _check_bank(bank)
    check_count("chunk_size", chunk_size)
    model._check_inputs(x, None)
    bank.verify(model)
    return model


def _stylize(model, x: torch.Tensor, bank: StyleBank, index: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """`stylize` after its checks, with index (B, K) bank indices known to be in range, on any device
    (checking drawn indices again would cost a sync where they were drawn on the GPU)."""
    index = to_device_async(index, x.device)
    B, K = index.shape
    attend = model._fast_attention(x.device)
    per, kc = max(1, chunk_size // K), min(K, chunk_size)
    # One chunk skips the loops: their ranges would fix B, and torch.compile would recompile per batch size.
    if B <= per and K <= kc:
        return _stylize_pairs(model, x, bank, index, attend)
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


def _changes_in_training(module: nn.Module) -> bool:
    """Whether a layer of `module` in training mode computes otherwise than in eval mode."""
    modal = (nn.modules.batchnorm._BatchNorm, nn.modules.dropout._DropoutNd)
    return any(m.training and isinstance(m, modal) for m in module.modules())


class TTAClassifier(nn.Module):
    """Classify each image through V views: K stylized copies (bank references) plus the original.

    classifier: nn.Module mapping (N, C, H, W) normalized images (the stylizer's space) to logits
    (N, num_classes); it sees all views of a batch at once, (B*V, C, H, W), in x's dtype. It may be
    torch.compile'd. stylizer: a StylizingViT matching `bank` (kept without its torch.compile, DDP or
    DataParallel wrappers: the stylization reads its layers, never calls it). k: references per image,
    drawn at random with `generator` on every call (None: the whole bank, in order; the default 8 needs
    a bank of 8).
    reduce: "mean_prob" averages the softmax over views; "vote" returns the normalized histogram of
    per-view argmax classes (a view's ties go to its lowest class index, and so does argmax of the
    histogram). The stylizer runs under no_grad (it is frozen); the classifier follows the ambient grad
    mode. Call .eval() for inference: a classifier left in training mode with batch norm or dropout
    is warned about once (its running statistics would change, and its outputs vary).
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
        if not isinstance(classifier, nn.Module):
            raise TypeError(
                f"classifier must be an nn.Module (wrap a function in one), got {describe_value(classifier)}"
            )
        stylizer = as_stylizer(stylizer, "stylizer")
        _check_bank(bank)
        _check_generator(generator)
        check_count("chunk_size", chunk_size)
        include_original = check_flag("include_original", include_original)
        if k is not None:
            _check_k(k, len(bank))
        self.classifier, self.stylizer, self.bank = classifier, stylizer, bank
        self.k, self.include_original, self.reduce = None if k is None else int(k), include_original, reduce
        self.generator, self.chunk_size = generator, int(chunk_size)

    def _apply(self, fn, recurse=True):
        # .to(device)/.cuda() carry the bank along with the stylizer (its dtype stays: see StyleBank).
        super()._apply(fn, recurse)
        self.bank = self.bank.to(self.stylizer.encoder.pos_embed.device)
        return self

    def __getstate__(self) -> dict:
        state = super().__getstate__()  # the generator as bytes: see generator_state
        if self.generator is not None:
            state["generator"] = generator_state(self.generator)
        return state

    def __setstate__(self, state: dict) -> None:
        if isinstance(state.get("generator"), tuple):
            state = {**state, "generator": generator_from_state(state["generator"])}
        super().__setstate__(state)

    @property
    def num_views(self) -> int:
        return (len(self.bank) if self.k is None else self.k) + int(self.include_original)

    def make_views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) -> views (B, V, C, H, W) in x's dtype (original first when included) and the
        bank indices used, (B, K) int64."""
        stylizer = _check_stylize(self.stylizer, x, self.bank, self.chunk_size)
        refs = select_refs(len(self.bank), x.shape[0], k=self.k, generator=self.generator)
        with torch.no_grad():
            stylized = _stylize(stylizer, x, self.bank, refs, self.chunk_size).to(x.dtype)
        views = torch.cat([x.unsqueeze(1), stylized], dim=1) if self.include_original else stylized
        return views, refs

    def classify(self, views: torch.Tensor) -> torch.Tensor:
        """views (B, V, C, H, W) -> per-view class probabilities (B, V, num_classes), float32."""
        if not isinstance(views, torch.Tensor) or views.dim() != 5:
            raise ValueError(
                f"views must be a (B, V, C, H, W) batch, as make_views returns, got {describe_value(views)}"
            )
        logits = self.classifier(views.flatten(0, 1))
        n = views.shape[0] * views.shape[1]
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else None
        if shape is None or len(shape) != 2 or shape[0] != n or shape[1] < 1:
            got = shape if shape is not None else describe_value(logits)
            raise ValueError(
                f"the classifier must return logits of shape ({n}, num_classes) for {n} images, got {got}"
            )
        if shape[1] == 1:  # its softmax is 1 for every image: every prediction would be class 0
            raise ValueError(
                f"the classifier returned one logit per image, shape {shape}: probabilities are a softmax over "
                "num_classes >= 2 logits; for a binary classifier's logit z return torch.cat([torch.zeros_like(z), "
                "z], 1) (softmax gives class 1 sigmoid(z))"
            )
        return logits.float().softmax(dim=-1).unflatten(0, views.shape[:2])

    def aggregate(self, view_probs: torch.Tensor) -> torch.Tensor:
        """(B, V, num_classes) -> (B, num_classes), each row summing to 1 (NaN where a view's
        probabilities are not all finite)."""
        if (
            not isinstance(view_probs, torch.Tensor)
            or not view_probs.is_floating_point()
            or view_probs.dim() != 3
            or 0 in view_probs.shape[1:]
        ):
            raise ValueError(
                "view_probs must be a floating-point (B, V, num_classes) tensor with V, num_classes >= 1, as "
                f"classify returns, got {describe_value(view_probs)}"
            )
        if self.reduce == "mean_prob":
            return view_probs.mean(dim=1)
        votes = F.one_hot(view_probs.argmax(dim=-1), view_probs.shape[-1]).sum(dim=1)
        # argmax counts a NaN as the largest: an image with a view that has no probabilities gets NaN,
        # as its mean would, rather than a vote for the first NaN's class.
        lost = ~view_probs.isfinite().all(dim=-1).all(dim=-1, keepdim=True)
        return (votes.float() / view_probs.shape[1]).masked_fill(lost, float("nan"))

    def forward(self, x: torch.Tensor, return_views: bool = False):
        """x (B, C, H, W) -> class probabilities (B, num_classes), and (B, V, num_classes) per view if asked."""
        # The classifier's own mode (set apart from this module's by classifier.train()); the flag is
        # set once warned.
        warned = getattr(self, "_warned_training", False)
        if self.classifier.training and not warned and _changes_in_training(self.classifier):
            self._warned_training = True
            warnings.warn(
                "the TTA classifier is in training mode, with batch norm or dropout layers: their running "
                "statistics change and its predictions vary; call .eval() on the TTAClassifier for inference",
                stacklevel=2,
            )
        return_views = check_flag("return_views", return_views)  # a string "no" would be true
        view_probs = self.classify(self.make_views(x)[0])
        probs = self.aggregate(view_probs)
        return (probs, view_probs) if return_views else probs
