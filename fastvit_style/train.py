"""Training a Stylizing ViT on a folder of images: `train(TrainConfig)`, the `fastvit-style train` command
(fastvit_style.apps.train) and `python -m fastvit_style.train` (what torchrun starts).

The official recipe (shared doc 3.3, 3.4), with its gradient-accumulation defect fixed:
* objective 70 identity + 1 consistency + 7 anatomical + 10 style, with the style of sample i taken
  from sample i+1 of the same micro-batch (x_style = roll(x, -1) within each micro-batch and rank);
* AdamW lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0.01 on *every* optimized parameter
  (biases, LayerNorms, pos_embed and cls_token too: the official code passes a plain list); the
  frozen VGG19 loss network is not optimized;
* cosine over epochs to 0 without warmup, lr constant within epoch e: 0.5*lr*(1 + cos(pi*e/E));
* gradient-norm clipping at 1.0 before every optimizer step; fp32 unless --bf16 (autocast).
* Accumulation. The official loop calls zero_grad at the start of every micro-step, and accelerate
  lets it act on the 2nd micro-step of each pair, so every update uses only every second micro-batch
  (its gradient halved). Here the update uses the mean gradient over the step's images: micro-batch i,
  with b_i readable images and mean loss l_i, adds grad(l_i) * b_i / N, N the readable images of the
  step's micro-batches on every rank. With equal micro-batches that is their mean; a short last
  micro-batch of an epoch, or one that lost corrupt images, counts by its images.

Data: `data.micro_batches` fixes each epoch's micro-batches from (seed, epoch). Under
`torchrun --nproc_per_node N` (DistributedDataParallel; nccl on CUDA, gloo on CPU) rank r takes
micro-batches r, r+N, ..., so N ranks with A-fold accumulation compute what one process with N*A-fold
accumulation does (DDP averages over ranks, accumulation over micro-steps: both are means). A
micro-batch whose images were all corrupt runs the mean-colour image with weight 0: it adds nothing, but
every rank still joins the gradient all-reduce. The accumulation weights need the step's image count
before its first micro-step: under DDP the ranks sum theirs on the device and the weights divide by that
sum there, so the host never waits for it, except on a rank that had no readable image in the step,
which must learn whether any rank had one. A step without one readable image on any rank counts as a
step but changes nothing: no clipping, no optimizer step (AdamW's moments, weight decay and step count
stay as they were). A dataset whose every file is unreadable stops the run at the end of its first
epoch, with an error; an unreadable --val-data after the epoch's training is checkpointed (not yet
validated: `--resume` validates it first). The files found corrupt (by any rank) are kept in the
checkpoints, so a resumed run skips them too and `skipped_images` in metrics.jsonl counts them.

Every optimized parameter gets a gradient, `attn.k_proj.bias` an exact zero one (`block.project_kv`):
AdamW decays it as officially, and DDP needs no search for unused parameters.

Outputs in --out: `last.pt` (the full training state, every --checkpoint-every steps, at each epoch
end, and, in one process, at the end of the step during which a SIGTERM came (`stopping`); `--resume
last.pt` continues with the very next step: on CPU it reproduces an uninterrupted run bit for bit; on
CUDA up to non-deterministic kernels), `last.safetensors` and `best.safetensors` (official-format
weights, VGG keys included as in the official files, the run's normalization constants in their
metadata, which the commands read; best = lowest validation loss), `metrics.jsonl` (one line per
epoch), and config.json, written at the start, except where --overwrite replaces a run: then with the
run's first file, when the replaced run's files go (a run that stops before it saved anything leaves
that run whole). A run whose weights turn NaN or inf (diverged) stops with an error at its next
checkpoint or epoch end, before any of these files would hold them. A run whose VGG19 is
random (--random-vgg) exports no VGG keys: they would pass for the ImageNet VGG19 (`--init-weights` of
such a file asks for VGG weights, as a train=False export does). The training state holds model, AdamW
state, position (epoch, micro-batch, step), best val loss, RNG states, the corrupt files found and the
config; the lr and the data order are functions of the epoch (and seed), so they need no state of their
own. No GradScaler: the only reduced precision offered is bf16, which needs none.
Validation (each epoch, if --val-data): total loss and PSNR (shared doc 6) on denormalized images,
each the mean over micro-batches; under DDP the val micro-batches are sharded like the training ones,
without the padding repeats (each counts once, whatever the number of processes).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
import warnings

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

from .atomic import atomic_path, remove_temporaries, write_json
from .backends import resolve_backend
from .checkpoint import has_random_vgg, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from .data import ImageFolderDataset, collate_images, micro_batches
from .devices import dist_env, resolve_device, to_device_async
from .imageio import denormalize, normalization
from .model import StylizingViT
from .stopping import StopRequest, Terminated, ignore_sigterm
from .train_config import (
    CHECKPOINT_KEYS,
    RUN_FILES,
    TrainConfig,
    out_problem,
    resumed_config,
    resumes_in_place,
)
from .weights import (
    WeightsError,
    clean_state_dict,
    is_vgg_key,
    load_state_dict,
    load_vgg_weights,
    read_state_dict,
    save_state_dict,
    without_vgg,
)

LOSS_NAMES = ("identity", "consistency", "anatomical", "style")
# The checkpoint's record of the validation images: their number, `names_digest` and folder.
VALIDATED_ON = ("val_images", "val_names_digest", "val_folder")
# Reading a step's losses on the host waits for its GPU work, and the queue runs dry while the next step
# launches: without on_step, rank 0's progress bar reads them at the first step, then at most this often,
# and where the epoch or the run ends; the other ranks never.
BAR_SECONDS = 1.0


@contextlib.contextmanager
def _iterating(loader: DataLoader):
    """iter(loader), whose workers end when the block does, however: the traceback of an exception left
    uncaught keeps the iterator alive until interpreter exit, where multiprocessing would SIGTERM the
    workers and wait for them, and a worker whose SIGTERM a thread drops (`ignore_sigterm`: spawned
    ones) would keep it waiting forever."""
    batches = iter(loader)
    try:
        yield batches
    finally:
        if (shutdown := getattr(batches, "_shutdown_workers", None)) is not None:  # none without workers
            shutdown()


@contextlib.contextmanager
def _naming(flag: str, note: str = ""):
    """A missing, unreadable or unfitting file's or folder's error, prefixed with the option that named
    it (and followed by `note`); the same exception class."""
    try:
        yield
    except (OSError, ValueError, WeightsError) as e:
        raise type(e)(f"{flag}: {e}{note}") from e


def cosine_lr(base_lr: float, epoch: int, epochs: int) -> float:
    """timm's epoch-stepped cosine without warmup, min_lr 0 (shared doc 3.4)."""
    return 0.5 * base_lr * (1 + math.cos(math.pi * epoch / epochs))


def psnr(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Official compute_psnr (shared doc 6): x, y (B, C, H, W) -> 0-d mean over the batch of
    10*log10(max_val^2 / (mse + 1e-10)), mse per image over (C, H, W), max_val = max of both batches."""
    x, y = x.double(), y.double()
    mse = (x - y).pow(2).flatten(1).mean(1)
    max_val = torch.maximum(x.max(), y.max())
    return (10 * torch.log10(max_val**2 / (mse + 1e-10))).mean()


def write_metrics(path: str, metrics: dict) -> None:
    """Write metrics.jsonl at `path` whole (temp + rename) with `metrics` (a dict with an int "epoch") as
    its last line, after the complete lines of the epochs before it that the file held. Dropped: this
    epoch's and later epochs' lines, which a run killed before its epoch-end checkpoint left for its
    resumed run to write again; and, with a warning naming the file, lines that are no epoch's: a partial
    last line (a full disk, an append of an earlier version), to which the new line would be glued."""
    lines = []
    with contextlib.suppress(FileNotFoundError), open(path, errors="replace") as f:
        lines = [(line, _epoch_of(line)) for line in f]
    if torn := sum(epoch is None for _, epoch in lines):
        warnings.warn(
            f"{path!r}: dropped {torn} line(s) that held no complete metrics (a write cut short, as by a full "
            "disk or a kill, or an edit)"
        )
    kept = [line for line, epoch in lines if epoch is not None and epoch < metrics["epoch"]]
    with atomic_path(path) as tmp, open(tmp, "w") as f:
        f.writelines([*kept, json.dumps(metrics) + "\n"])


def _epoch_of(line: str) -> int | None:
    """The "epoch" of a complete metrics.jsonl line; None for a partial or unrecognised one."""
    try:
        epoch = json.loads(line)["epoch"] if line.endswith("\n") else None
    except (ValueError, TypeError, KeyError):  # not JSON, not an object, no epoch
        return None
    return epoch if isinstance(epoch, int) and not isinstance(epoch, bool) else None


def train(cfg: TrainConfig, on_step=None, given=None) -> StylizingViT:
    """Run training; returns the trained model (train=True, unwrapped, on its device).

    given: the names of the fields the user set (the command line's options), which a resumed run
    refuses to change; None: those that differ from their defaults.

    on_step(info) runs on every rank after each optimizer step (after that step's checkpoint, if any);
    info: step, epoch, lr, and this rank's mean losses of the step (total, identity, consistency,
    anatomical, style) as floats. For logging, or for tests that interrupt a run.

    A SIGTERM in one process (where no handler of the caller's is set) finishes the step, writes its
    checkpoint and raises `stopping.Terminated`, a KeyboardInterrupt (unless that step ended the run).
    """
    rank, world, local_rank = dist_env()
    device = resolve_device(cfg.device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    own_group = world > 1 and not dist.is_initialized()
    if own_group:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        return Trainer(cfg, rank, world, device, given).fit(on_step)
    finally:
        if own_group:
            dist.destroy_process_group()


class Trainer:
    def __init__(self, cfg: TrainConfig, rank: int, world: int, device: torch.device, given=None):
        # Rank 0 decides, before any rank writes, and every rank raises: a rank that checked after rank 0
        # wrote config.json would refuse alone and leave the others waiting in a collective.
        problem = [out_problem(cfg) if rank == 0 else None]
        if world > 1:
            dist.broadcast_object_list(problem, src=0)
        if problem[0]:
            raise ValueError(problem[0])
        saved = load_checkpoint(cfg.resume, required=CHECKPOINT_KEYS) if cfg.resume else None
        # Left out on resume, --val-data is the run's own folder, which may have moved since.
        val_note = "" if cfg.val_data or not saved else (
            f" (the folder the run validated on, kept from --resume {cfg.resume!r}: give its new place with "
            "--val-data, or --val-data '' to stop validating)"
        )  # fmt: skip
        if saved:
            cfg = resumed_config(cfg, saved["config"], given)
            if cfg.random_vgg and cfg.vgg_weights:  # a checkpoint from before random_vgg recorded the fact
                cfg = dataclasses.replace(cfg, random_vgg=False)
        mean, std = normalization(cfg.dataset, cfg.mean, cfg.std)
        cfg = dataclasses.replace(cfg, mean=mean, std=std)  # the constants used, recorded in checkpoints
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        torch.manual_seed(cfg.seed)  # same initialization on every rank
        np.random.seed(cfg.seed % 2**32)
        random.seed(cfg.seed)

        with _naming("--data"):
            self.train_set = ImageFolderDataset(cfg.data, cfg.input_size, cfg.mean, cfg.std)
        self.val_set = None
        if cfg.val_data:
            with _naming("--val-data", val_note):
                self.val_set = ImageFolderDataset(cfg.val_data, cfg.input_size, cfg.mean, cfg.std)
        model = StylizingViT(
            cfg.backbone, train=True, backend=cfg.backend, input_size=cfg.input_size, **cfg.model_kwargs
        )
        if not saved:
            self._init_weights(model)
            cfg = self.cfg
        self.model = model.to(device)
        # The official optimizer gets encoder, bottleneck and post_process_conv: all but the VGG.
        self.params = [p for n, p in model.named_parameters() if not is_vgg_key(n)]
        self.optimizer = torch.optim.AdamW(
            self.params, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay
        )

        self.epoch, self.batch, self.step, self.best_val = 0, 0, 0, None
        # What the run validated on, kept through a resume with --val-data '' (the run's best is a loss on
        # those images), so a later --val-data is compared with it (`_resume_data`).
        self.validated_on = {k: (saved or {}).get(k) for k in VALIDATED_ON}
        # Named when --max-steps stops the run: a resumed run that took no step has written no checkpoint.
        self.saved_to = cfg.resume
        self.sigterm = StopRequest()  # a scheduler's stop: finish the step, save it, then stop
        if saved:
            model.load_state_dict(saved["model"])
            self.optimizer.load_state_dict(saved["optimizer"])
            self.epoch, self.batch, self.step, self.best_val = (
                saved[k] for k in ("epoch", "batch", "step", "best_val")
            )
            set_rng_state(saved["rng"], device)
            self._resume_data(saved)
            if saved["world_size"] != world:
                # The position counts this rank's micro-batches, and the global batch is world * A * b. At
                # the epoch's end (trained, not validated: `_save_unvalidated`) it is this world's end.
                if self.batch and self.batch == self._batches_per_rank(saved["world_size"]):
                    self.batch = self._batches_per_rank(world)
                elif self.batch:
                    raise ValueError(
                        f"{cfg.resume!r} was written mid-epoch by {saved['world_size']} process(es): resume it "
                        f"with as many (this run has {world}), or from a checkpoint written at an epoch end"
                    )
                warnings.warn(
                    f"resuming a {saved['world_size']}-process run with {world}: the global batch changes"
                )

        resolve_backend(cfg.backend, device)  # a backend this device cannot run fails before --out is touched
        self.net = torch.compile(model) if cfg.compile else model
        self.forward = self.net
        if world > 1:
            self.forward = torch.nn.parallel.DistributedDataParallel(
                self.net, device_ids=[device.index] if device.type == "cuda" else None,
                find_unused_parameters=False,
            )  # fmt: skip
        # --out is claimed (`_claim_out`: config.json written) at the start, so that the run's settings are
        # there to read while it trains; but a run that --overwrite replaces is left whole until this run
        # first writes there (`_out_path`): a run that dies before it saved anything loses nothing.
        self.replaces, self.claimed = cfg.overwrite and not resumes_in_place(cfg), False
        if rank == 0:
            if not (self.replaces and os.path.lexists(os.path.join(cfg.out, "config.json"))):
                self._claim_out()
            best = os.path.join(cfg.out, "best.safetensors")
            if self.best_val is not None and (self.replaces or not os.path.exists(best)):
                # Resumed into another --out, or rolled back with --overwrite (the old best.safetensors goes
                # at the claim): a later epoch must write best.safetensors even if it does not beat the
                # weights no longer here.
                warnings.warn(
                    f"--out {cfg.out!r} holds no best.safetensors of the resumed run (its best validation loss "
                    f"was {self.best_val:.5g}): the best weights are tracked afresh from this run's epochs"
                )
                self.best_val = None

    # ------------------------------------------------------------------------------------------- setup

    def _resume_data(self, saved: dict) -> None:
        """Skip the files the resumed run found corrupt, unless --data or --val-data holds other images than
        the run's (not its folder moved): the flags would mark other files. Warn of those, whose data order
        (another number of images) or validation losses differ from the run's."""
        cfg, train_set, val_set = self.cfg, self.train_set, self.val_set
        other_train = saved.get("train_names_digest") not in (None, train_set.names_digest)
        other_val = val_set is not None and saved.get("val_names_digest") not in (None, val_set.names_digest)
        if saved.get("train_images", len(train_set)) != len(train_set):
            warnings.warn(
                f"{cfg.resume!r} was trained on {saved['train_images']} images, --data {cfg.data!r} now holds "
                f"{len(train_set)}: the data order of the resumed run differs from an uninterrupted one"
            )
        elif other_train:
            warnings.warn(
                f"--data {cfg.data!r} holds other images than {cfg.resume!r} was trained on (as many, "
                f"{len(train_set)}): the resumed run differs from an uninterrupted one"
            )
        if other_val:
            best = "" if self.best_val is None else (
                f", and best.safetensors is replaced only by an epoch that beats the run's best validation loss, "
                f"{self.best_val:.5g}, on these (move best.safetensors out of --out before resuming to track "
                "the best afresh)"
            )  # fmt: skip
            # A checkpoint from before val_folder was kept validated on its config's folder.
            folder = saved.get("val_folder", saved["config"].get("val_data"))
            warnings.warn(
                f"--val-data {cfg.val_data!r} holds other images ({len(val_set)} files) than the run validated "
                f"on ({saved.get('val_images')} under {folder!r}): their losses do not compare with the earlier "
                f"epochs'{best}"
            )
        for dataset, key, other in (
            (train_set, "train_unreadable", other_train),
            (val_set, "val_unreadable", other_val),
        ):
            flags = saved.get(key)
            # Also the flags of a folder that now holds another number of files would mark the wrong ones.
            if (
                dataset is not None
                and not other
                and isinstance(flags, torch.Tensor)
                and flags.shape == (len(dataset),)
            ):
                dataset.mark_unreadable(flags)

    def _validated_on(self) -> dict:
        """The checkpoint's VALIDATED_ON: this run's --val-data, else what the resumed run validated on."""
        if self.val_set is None:
            return self.validated_on
        return dict(zip(VALIDATED_ON, (len(self.val_set), self.val_set.names_digest, self.cfg.val_data)))

    def _init_weights(self, model: StylizingViT) -> None:
        cfg = self.cfg
        vgg_source, random_note = None, ""
        if cfg.init_weights:
            with _naming("--init-weights"):
                state = read_state_dict(cfg.init_weights)
                sd = clean_state_dict(state, model)
                if has_random_vgg(state):  # never pass a random VGG19 off as the ImageNet one
                    sd = without_vgg(sd)
                    random_note = (
                        f" (--init-weights {cfg.init_weights!r} is a --random-vgg run's: its VGG19 is random)"
                    )
                if any(map(is_vgg_key, sd)):
                    vgg_source = cfg.init_weights  # the official files carry the ImageNet VGG19
                else:  # a train=False export: keep the model's VGG, check every other key strictly
                    sd.update({k: v for k, v in model.state_dict().items() if is_vgg_key(k)})
                load_state_dict(model, sd, strict=True)
        if cfg.vgg_weights:
            with _naming("--vgg-weights"):
                load_vgg_weights(model, cfg.vgg_weights)
            vgg_source = cfg.vgg_weights
        if vgg_source is not None:
            self.cfg = dataclasses.replace(cfg, random_vgg=False)  # recorded as it is: real weights
        elif cfg.random_vgg:
            model.vgg_encoder.warn_if_random = False  # asked for: a smoke run
        else:
            raise ValueError(
                f"no VGG19 weights{random_note}: the perceptual losses would run through a randomly "
                "initialized VGG19 and training would optimize a meaningless objective. Pass --vgg-weights "
                "with timm's vgg19.tv_in1k or torchvision's vgg19 ImageNet file, --init-weights with an "
                "official checkpoint (it carries the VGG19), or --random-vgg for a smoke run"
            )

    # ------------------------------------------------------------------------------------------ training

    def fit(self, on_step=None) -> StylizingViT:
        cfg = self.cfg
        n_batches = self._batches_per_rank(self.world)
        if self.rank == 0:
            steps = math.ceil(n_batches / cfg.accumulate)
            print(f"training on {len(self.train_set)} images, {self.world} process(es), {steps} steps/epoch "
                  f"({n_batches} micro-batches per process, the progress bar's unit), {cfg.epochs} epochs, "
                  f"from step {self.step}", file=sys.stderr, flush=True)  # fmt: skip
        if self.epoch >= cfg.epochs and self.rank == 0:
            print(f"the run finished its {cfg.epochs} epochs: nothing to train (a longer run starts from its "
                  "weights with --init-weights)", file=sys.stderr, flush=True)  # fmt: skip
        if self.epoch < cfg.epochs and self.batch >= n_batches:  # saved when validation failed: end it now
            self._end_epoch()
        first_step = self.step
        # One process only: under DDP every rank would have to agree on the step to stop at (a host wait
        # per step); there a SIGTERM unwinds at once (the command's handler) and --resume takes the last
        # periodic checkpoint.
        with self.sigterm.watch() if self.world == 1 else contextlib.nullcontext():
            while self.epoch < cfg.epochs and not self._reached_max_steps() and not self.sigterm.requested:
                if self._train_epoch(on_step):
                    self._end_epoch()
        # Saved at the step's end (or the epoch's). A run that has just finished has nothing left to stop.
        if self.sigterm.requested and self.epoch < cfg.epochs and not self._reached_max_steps():
            raise Terminated
        if self.epoch < cfg.epochs and self._reached_max_steps() and self.rank == 0:
            if self.step == first_step:  # resumed at or past --max-steps
                print(f"the run is at step {self.step}, --max-steps {cfg.max_steps}: nothing to train",
                      file=sys.stderr, flush=True)  # fmt: skip
            else:
                print(f"stopped at step {self.step} (--max-steps {cfg.max_steps}): the run is saved in "
                      f"{self.saved_to!r}, which --resume continues", file=sys.stderr, flush=True)  # fmt: skip
        return self.model

    def _batches_per_rank(self, world: int) -> int:
        """Micro-batches each of `world` processes runs per epoch."""
        return len(micro_batches(len(self.train_set), self.cfg.batch_size, 0, self.cfg.seed, 0, world))

    def _loader(self, dataset, batches: list[list[int]], seed: int) -> DataLoader:
        return DataLoader(
            dataset, batch_sampler=batches, collate_fn=collate_images, num_workers=self.cfg.workers,
            pin_memory=self.device.type == "cuda",
            generator=torch.Generator().manual_seed(seed),  # worker seeds: never draw from the global RNG
            worker_init_fn=ignore_sigterm,  # a scheduler's SIGTERM is the main process's to act on
        )  # fmt: skip

    def _train_epoch(self, on_step) -> bool:
        """Train from (self.epoch, self.batch) to the epoch's end; False when max_steps stopped it first."""
        cfg, epoch = self.cfg, self.epoch
        lr = cosine_lr(cfg.lr, epoch, cfg.epochs)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batches = micro_batches(len(self.train_set), cfg.batch_size, epoch, cfg.seed, self.rank, self.world)
        n, A = len(batches), cfg.accumulate
        # Closed however the epoch ends: the line of a Ctrl-C or an error starts a line of its own, and no
        # bar is drawn again after it.
        with (
            tqdm(
                total=n,
                initial=self.batch,
                desc=f"epoch {epoch + 1}/{cfg.epochs}",
                unit="batch",
                disable=self.rank != 0,
                dynamic_ncols=True,
            ) as bar,
            _iterating(self._loader(self.train_set, batches[self.batch :], cfg.seed + epoch)) as loader,
        ):
            terms, images, t0, shown = [], 0, time.perf_counter(), -math.inf
            for group_start in range(self.batch, n, A):  # a run stops and resumes at step ends only
                group_end = min(group_start + A, n)
                # The step's micro-batches are all loaded first (A of them in host memory) for their image count.
                group = [next(loader) for _ in range(group_start, group_end)]
                rank_images = sum(x.shape[0] for x in group)
                step_images = self._sum_over_ranks(rank_images)
                for j, x in enumerate(group):
                    # Gradients are all-reduced once per step, on its last micro-batch.
                    last = j + 1 == len(group)
                    sync = self.forward.no_sync() if self.world > 1 and not last else contextlib.nullcontext()
                    # DDP averages over ranks: the world factor makes that a mean over the step's images
                    # (step_images >= x's images > 0 where they count; an empty x gets weight 0 anyway).
                    weight = x.shape[0] * self.world / step_images if x.shape[0] else 0.0
                    with sync:
                        term = self._micro_step(x.to(self.device, non_blocking=True), weight)
                    if term is not None:
                        terms.append(term * x.shape[0])
                        images += x.shape[0]
                    bar.update(1)
                # Every rank skips alike (module docstring); only a rank without images reads the sum.
                if rank_images or step_images:
                    torch.nn.utils.clip_grad_norm_(self.params, cfg.clip_norm)
                    self.optimizer.step()
                self.optimizer.zero_grad()
                self.step, self.batch = self.step + 1, group_end
                # A stop at the epoch's last step ends the epoch as usual (validation, metrics, checkpoint).
                stop = (self._reached_max_steps() or self.sigterm.requested) and group_end < n
                show = not bar.disable and (
                    stop or group_end == n or time.perf_counter() - shown >= BAR_SECONDS
                )
                if on_step is not None or show:
                    # This rank's losses, over its images, as the step weighs them.
                    mean = (torch.stack(terms).sum(0) / rank_images).tolist() if terms else [float("nan")] * 5
                    shown = time.perf_counter()  # after the read: the step's work is done
                    rate = images * self.world / (shown - t0)
                    losses = {k[:4]: f"{v:.3g}" for k, v in zip(LOSS_NAMES, mean[1:])}
                    bar.set_postfix(loss=f"{mean[0]:.4g}", **losses, img_s=f"{rate:.1f}")
                terms = []
                periodic = cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0
                if group_end < n and (stop or periodic):
                    self._require_finite()
                    self._share_unreadable(self.train_set)  # every rank's findings into the checkpoint
                    self._save_checkpoint()
                if on_step is not None:
                    on_step(
                        dict(step=self.step, epoch=epoch, lr=lr, **dict(zip(("loss", *LOSS_NAMES), mean)))
                    )
                if stop:
                    self._require_readable(self.train_set, "--data")
                    return False
            return True

    def _sum_over_ranks(self, count: int) -> int | torch.Tensor:
        """count (this rank's readable images of a step) summed over the ranks: the int itself in one
        process, else a float64 0-d tensor on the training device, queued behind the GPU's work (the
        host reads it only where `bool` asks: reading it would wait for every queued kernel)."""
        if self.world == 1:
            return count
        total = to_device_async(torch.tensor(count, dtype=torch.int64), self.device)
        dist.all_reduce(total)
        # float64: the weights divide by it as they would by the int (a 0-d tensor is cast to the loss's
        # dtype as a Python number is, so the two paths give the same bits)
        return total.double()

    def _micro_step(self, x: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor | None:
        """Forward and backward of one micro-batch x (b, 3, S, S), its mean loss scaled by `scale` (b times
        the world size over the step's images: module docstring; a 0-d tensor under DDP). Returns the
        unscaled (total, identity, consistency, anatomical, style) as a float32 (5,) tensor on the
        training device, or None when x is empty."""
        cfg = self.cfg
        empty = x.shape[0] == 0
        if empty:  # every image was corrupt: weight 0, but the backward (and DDP's all-reduce) still runs
            x, scale = torch.zeros(1, 3, cfg.input_size, cfg.input_size, device=self.device), 0.0
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            loss, _ = self.forward(x)
            total = loss.total(cfg.loss_weights)
        (total * scale).backward()
        return None if empty else torch.stack([total.detach(), *(t.detach() for t in loss)]).float()

    # ---------------------------------------------------------------------------- validation, checkpoints

    @torch.no_grad()
    def validate(self) -> dict:
        """{'val_loss', 'val_psnr'}: means over this run's validation micro-batches (all ranks)."""
        cfg = self.cfg
        batches = micro_batches(
            len(self.val_set), cfg.batch_size, 0, cfg.seed, self.rank, self.world, shuffle=False, pad=False
        )
        sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # loss, psnr, micro-batches
        with _iterating(self._loader(self.val_set, batches, cfg.seed)) as loader:
            for x in loader:
                if x.shape[0] == 0:
                    continue
                x = x.to(self.device, non_blocking=True)
                with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
                    loss, x_recon = self.net(x)
                images = [denormalize(t.float(), cfg.mean, cfg.std) for t in (x, x_recon)]
                sums += torch.stack(
                    [loss.total(cfg.loss_weights).double(), psnr(*images), sums.new_tensor(1.0)]
                )
        if self.world > 1:
            dist.all_reduce(sums)
        loss, value, count = sums.tolist()
        return {"val_loss": loss / count, "val_psnr": value / count} if count else {}

    def _end_epoch(self) -> None:
        cfg = self.cfg
        metrics = {"epoch": self.epoch, "step": self.step, "lr": cosine_lr(cfg.lr, self.epoch, cfg.epochs)}
        self._require_finite()  # before a NaN model is validated, exported as best or checkpointed
        self._require_readable(self.train_set, "--data")
        if self.val_set is not None:
            metrics.update(self.validate())
            try:
                self._require_readable(self.val_set, "--val-data")
            except ValueError as e:
                raise ValueError(f"{e}. {self._save_unvalidated()}") from None
        self.epoch, self.batch = self.epoch + 1, 0
        # As in the official loop, whose best starts at inf: a NaN or inf loss is never an improvement. A
        # NaN best (in the last.pt of a version that took it) is none: no loss would ever beat it.
        best = math.inf if self.best_val is None or math.isnan(self.best_val) else self.best_val
        improved = "val_loss" in metrics and metrics["val_loss"] < best
        if improved:
            self.best_val = metrics["val_loss"]
        metrics["skipped_images"] = self.train_set.skipped + (self.val_set.skipped if self.val_set else 0)
        if self.rank != 0:
            return
        if improved:
            self._export("best.safetensors")
        # The epoch's line goes out before the checkpoint that marks the epoch done: a crash in between
        # leaves the line, which the resumed run writes again in its place, rather than losing it.
        write_metrics(self._out_path("metrics.jsonl"), metrics)
        self._save_checkpoint()
        # metrics.jsonl counts epochs from 0 (epoch 0 is the first); the line says which one ended.
        shown = " ".join(f"{k}={v:.5g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                         if k != "epoch")  # fmt: skip
        tqdm.write(f"epoch {self.epoch}/{cfg.epochs} done: {shown}", file=sys.stderr)

    def _save_unvalidated(self) -> str:
        """Checkpoint the epoch's training where validation failed, at the epoch's end position: `--resume`
        validates that epoch first, then goes on as an uninterrupted run would. Says so, for the error."""
        if self.rank == 0:
            # Not the validation flags: every file is marked, and a folder fixed in place (as many files)
            # would stay unreadable for the resumed run.
            self._save_checkpoint(val_flags=False)
        if self.world > 1:  # every rank raises next: torchrun would stop rank 0 mid-write
            dist.barrier()
        last = os.path.join(self.cfg.out, "last.pt")
        return (
            f"Epoch {self.epoch + 1}'s training is saved in {last!r}: --resume it, with --val-data naming "
            "readable images (that folder fixed, or another), to validate that epoch and go on"
        )

    def _out_path(self, name: str) -> str:
        """The path of the file `name` this run writes in --out (rank 0), --out claimed first."""
        self._claim_out()
        return os.path.join(self.cfg.out, name)

    def _claim_out(self) -> None:
        """Once (rank 0): the files of the run this one replaces (--overwrite) and what killed writes left
        go, and this run's config.json is written, before any other file of its own."""
        if self.claimed:
            return
        cfg = self.cfg
        os.makedirs(cfg.out, exist_ok=True)
        if self.replaces:  # nothing of the old run may pass for this one's
            for old in RUN_FILES:
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(cfg.out, old))
        remove_temporaries(cfg.out, (*RUN_FILES, "config.json"))  # of a run killed mid-write
        write_json(os.path.join(cfg.out, "config.json"), dataclasses.asdict(cfg))
        self.claimed = True

    def _export(self, name: str) -> None:
        """Official-format weights to --out/name, with the run's normalization constants in their metadata
        (the commands read them); without the VGG19 when it is random (module docstring)."""
        sd = self.model.state_dict()
        if self.cfg.random_vgg:
            sd = without_vgg(sd)
        save_state_dict(sd, self._out_path(name), normalization=(self.cfg.mean, self.cfg.std))

    def _share_unreadable(self, dataset: ImageFolderDataset) -> torch.Tensor:
        """Give every rank's `dataset` the files any rank found corrupt (a collective: all ranks call it);
        returns those flags, (len,) bool, alike on every rank (a worker may mark more in the meantime)."""
        bad = dataset.unreadable.clone()
        if self.world > 1:
            bad = bad.to(self.device, torch.uint8)
            dist.all_reduce(bad, op=dist.ReduceOp.MAX)
            bad = bad.bool().cpu()
            dataset.mark_unreadable(bad)
        return bad

    def _require_readable(self, dataset: ImageFolderDataset, flag: str) -> None:
        """ValueError once every file of `dataset` was found corrupt, by any rank: nothing to learn from.
        Shares the findings first (`_share_unreadable`), so `dataset.skipped` counts every rank's."""
        if bool(self._share_unreadable(dataset).all()):  # the shared flags: every rank decides alike
            raise ValueError(
                f"every image under {flag} {dataset.root!r} is unreadable ({len(dataset)} files; see the "
                "warnings above)"
            )

    def _require_finite(self) -> None:
        """ValueError once a weight is NaN or inf (training diverged: AdamW never recovers from it), before
        a checkpoint or export would replace the last finite one. One host read per checkpoint; the
        ranks' weights are alike under DDP, so every rank raises."""
        if bool(torch.stack([torch.isfinite(p).all() for p in self.params]).all()):
            return
        lr = self.optimizer.param_groups[0]["lr"]
        raise ValueError(
            f"training diverged: the weights hold NaN or inf after step {self.step} (lr {lr:g}), so they are "
            "not saved: the checkpoints and weights already in --out keep their finite values. Start again "
            "with a lower --lr (a new run, or --init-weights with the weights of one of them)"
        )

    def _reached_max_steps(self) -> bool:
        return self.cfg.max_steps is not None and self.step >= self.cfg.max_steps

    def _save_checkpoint(self, val_flags: bool = True) -> None:
        """last.safetensors (the weights, official format), then last.pt (the training state); rank 0."""
        if self.rank != 0:
            return
        self._export("last.safetensors")
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "epoch": self.epoch,  # position: the next micro-batch is `batch` of `epoch`
            "batch": self.batch,
            "step": self.step,
            "best_val": self.best_val,
            "world_size": self.world,
            "train_images": len(self.train_set),
            # Every rank's findings (shared before each save); the files stay skipped when the run resumes.
            "train_unreadable": self.train_set.unreadable.clone(),
            "val_unreadable": self.val_set.unreadable.clone()
            if self.val_set is not None and val_flags
            else None,
            # What the run trained and validated on, told apart from its folders moved (`_resume_data`).
            "train_names_digest": self.train_set.names_digest,
            **self._validated_on(),
            "rng": rng_state(self.device),
            "config": dataclasses.asdict(self.cfg),
        }
        path = self._out_path("last.pt")
        save_checkpoint(state, path)
        self.saved_to = path


def main(argv=None) -> int:
    """`python -m fastvit_style.train ...` (what torchrun starts): `fastvit-style train ...`, whose user
    errors print one line."""
    from .cli import main as cli_main

    return cli_main(["train", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
