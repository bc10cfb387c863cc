"""What one timed step of each workload does, the official way and the fast way (shared doc 3.5, 4.1, 4.2).

A step returns a dict of the tensors the parity check compares (a value may be a list of tensors,
judged as one group; "grads" by its relative L2 norm, see parity.GRAD_TOLERANCE). `official=True`
builds the step as the official code would run it; the fast way uses the library's own entry points
(StyleAugment, StyleBank + model.stylize). `amp` is a zero-argument callable giving
the precision context (autocast or none); `compile_fn` is torch.compile or the identity.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass

import torch

from ..augment import StyleAugment
from ..style_bank import StyleBank


def _images(n: int, cfg, device, gen) -> torch.Tensor:
    # Drawn on the CPU so that every device (meta included) sees the same numbers for one seed.
    return torch.randn(n, cfg.in_channel, cfg.input_size, cfg.input_size, generator=gen).to(device)


@dataclass(frozen=True)  # hashable by value: FLOP counts are cached per workload and parameters
class Workload:
    name = ""
    train = False  # the model is built with train=True

    def inputs(self, cfg, batch: int, device, gen) -> dict:
        return {"x": _images(batch, cfg, device, gen)}

    def step(self, model, inputs: dict, official: bool, amp, compile_fn):
        raise NotImplementedError

    def images(self, batch: int) -> int:
        """Images the step processes, for images/s: the content images of the batch."""
        return batch

    def parity_key(self, out: dict):
        """Outputs with equal keys share one reference output; only augment's depends on its draw."""

    def compared(self, out: dict) -> dict:
        """The outputs of a step that are checked against the reference's (all of them here)."""
        return out

    def expected(self, ref_model, inputs: dict, out: dict, amp=contextlib.nullcontext) -> dict:
        """The official output for these inputs (ref_model: fp32 weights, reference backend, never
        stepped), computed eagerly under `amp`."""
        return self.step(copy.deepcopy(ref_model), inputs, True, amp, lambda f: f)()

    def flops_per_image(self, count, batch: int) -> float:
        """count(workload_name) -> FLOPs per image of that workload's official step."""
        return count(self.name)


@dataclass(frozen=True)
class Stylize(Workload):
    """Eval stylization with explicit style images."""

    name = "stylize"

    def inputs(self, cfg, batch, device, gen):
        return {"x": _images(batch, cfg, device, gen), "x_style": _images(batch, cfg, device, gen)}

    def step(self, model, inputs, official, amp, compile_fn):
        run, x, x_style = compile_fn(model), inputs["x"], inputs.get("x_style")

        def step():
            with amp(), torch.no_grad():
                return {"out": run(x, x_style)}

        return step


@dataclass(frozen=True)
class StylizeRoll(Stylize):
    """Eval stylization with x_style None: sample i styled by sample i+1, as in training."""

    name = "stylize-roll"

    def inputs(self, cfg, batch, device, gen):
        return {"x": _images(batch, cfg, device, gen)}


@dataclass(frozen=True)
class Augment(Workload):
    """StyleAugment on a classifier batch (shared doc 4.1): n = max(1, int(p B)) random images, each
    styled by the next selected one. The official scheme runs model(x_sel, roll(x_sel))."""

    name = "augment"
    p: float = 0.33

    def n(self, batch: int) -> int:
        return max(1, int(self.p * batch))

    def step(self, model, inputs, official, amp, compile_fn):
        run, x = compile_fn(model), inputs["x"]
        if not official:
            aug = StyleAugment(run, p=self.p)

            def step():
                with amp(), torch.no_grad():
                    x_aug, idx = aug(x)
                return {"out": x_aug, "idx": idx}

            return step

        def step():
            idx = torch.randperm(x.shape[0], device=x.device)[: self.n(x.shape[0])]
            return self._apply(run, x, idx, amp)

        return step

    @staticmethod
    def _apply(run, x, idx, amp):
        x_sel = x[idx]
        out = x.clone()
        with amp(), torch.no_grad():
            out[idx] = run(x_sel, x_sel.roll(-1, 0)).to(out.dtype)
        return {"out": out, "idx": idx}

    def parity_key(self, out):
        return tuple(torch.as_tensor(out["idx"]).tolist())

    def expected(self, ref_model, inputs, out, amp=contextlib.nullcontext):
        # The reference styles the same images the candidate picked (its draw is its own).
        idx = torch.as_tensor(out["idx"], device=inputs["x"].device)
        return self.compared(self._apply(ref_model, inputs["x"], idx, amp))

    def compared(self, out):
        return {"out": out["out"]}  # the draw is the candidate's own: it picks the reference, not a result

    def flops_per_image(self, count, batch):
        return count("stylize") * self.n(batch) / batch


@dataclass(frozen=True)
class TTA(Workload):
    """Test-time augmentation (shared doc 4.2): each test image stylized with K references. Official:
    one batched forward of the B*K (image, reference) pairs, K full forwards' work per image; fast: a
    StyleBank of the references and model.stylize."""

    name = "tta"
    k: int = 8

    def inputs(self, cfg, batch, device, gen):
        return {"x": _images(batch, cfg, device, gen), "refs": _images(self.k, cfg, device, gen)}

    def step(self, model, inputs, official, amp, compile_fn):
        x, refs = inputs["x"], inputs["refs"]
        B, K = x.shape[0], refs.shape[0]
        if official:
            run = compile_fn(model)

            def step():
                with amp(), torch.no_grad():
                    out = run(x.repeat_interleave(K, 0), refs.repeat(B, 1, 1, 1))
                return {"out": out.unflatten(0, (B, K))}

            return step

        with amp(), torch.no_grad():  # the bank is built once, before any test image: not timed
            bank = StyleBank.from_images(model, refs)
        run = compile_fn(lambda t: model.stylize(t, bank))

        def step():
            with amp(), torch.no_grad():
                return {"out": run(x)}

        return step


@dataclass(frozen=True)
class Train(Workload):
    """One training step as in pretraining (shared doc 3.4-3.6): x_style = roll(x), forward with the
    losses (VGG19 included), backward of the weighted objective, AdamW step."""

    name = "train"
    train = True

    def step(self, model, inputs, official, amp, compile_fn):
        run, x = compile_fn(model), inputs["x"]
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-4)

        def step():
            opt.zero_grad(set_to_none=True)
            with amp():
                loss, x_recon = run(x)
                total = loss.total()
            total.backward()  # outside autocast, as the AMP recipe asks
            grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
            out = {"loss": total.detach(), "x_recon": x_recon.detach(), "grads": grads}
            opt.step()
            return out

        return step


def make_workloads(tta_k: int = 8, augment_p: float = 0.33) -> dict[str, Workload]:
    return {w.name: w for w in (Stylize(), StylizeRoll(), Augment(augment_p), TTA(tta_k), Train())}
