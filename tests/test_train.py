"""The trainer on CPU with a tiny model (32 px, 2 layers): a smoke run through the CLI, two-process DDP
against one accumulating process, kill-and-resume, interrupted checkpoint writes, the formulas."""

import dataclasses
import datetime
import hashlib
import json
import math
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
import torch.distributed as dist
from helpers import leftover_name
from safetensors.torch import load_file

import fastvit_style.train as train_module
from fastvit_style import StylizingViT, cli
from fastvit_style.checkpoint import (
    FORMAT,
    has_random_vgg,
    load_checkpoint,
    rng_state,
    save_checkpoint,
    set_rng_state,
)
from fastvit_style.configs import LOSS_WEIGHTS
from fastvit_style.data import micro_batches
from fastvit_style.imageio import denormalize
from fastvit_style.train import Trainer, cosine_lr, psnr, train
from fastvit_style.train_config import CHECKPOINT_KEYS, RUN_FILES, TrainConfig, out_problem, resumed_config
from fastvit_style.weights import (
    WeightsError,
    load_state_dict,
    load_vgg_weights,
    read_normalization,
    save_state_dict,
)

Image = pytest.importorskip("PIL.Image")

TINY = {
    "backbone": "tiny",
    "model_kwargs": {"encoder_depth": 2},
    "input_size": 32,
    "workers": 0,
    "random_vgg": True,
}
TINY_ARGS = [
    "--backbone",
    "tiny",
    "--model-kwargs",
    '{"encoder_depth": 2}',
    "--input-size",
    "32",
    "--workers",
    "0",
    "--random-vgg",
]
pytestmark = pytest.mark.usefixtures("one_thread")


def write_images(folder, n: int, size: int = 32):
    """n smooth RGB PNGs (easy to reconstruct: the loss falls within a few steps); odd ones non-square."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        h = size + 8 * (i % 2)
        yy, xx = np.mgrid[0:h, 0:size] / size
        img = np.stack([0.5 + 0.3 * np.sin(6 * xx + i), 0.5 + 0.3 * np.cos(5 * yy), 0.5 + 0.2 * xx * yy], -1)
        Image.fromarray((img * 255).astype(np.uint8)).save(folder / f"{i}.png")
    return folder


def test_one_epoch_through_the_cli_lowers_the_loss_and_exports_official_weights(
    tmp_path, monkeypatch, capsys
):
    data = write_images(tmp_path / "data", 8)
    # Start from a train=False export whose key biases are non-zero, to see that AdamW decays them.
    init = StylizingViT("tiny", input_size=32, encoder_depth=2)
    with torch.no_grad():
        for blk in init.encoder.blocks:
            blk.attn.k_proj.bias.normal_()
    save_state_dict(init, tmp_path / "init.safetensors")
    # A VGG19 file in timm's key names (random values: what the trainer checks is where they go).
    vgg = StylizingViT("tiny", train=True, input_size=32, encoder_depth=2).vgg_encoder.state_dict()
    save_state_dict({k.replace("features_", "features."): v for k, v in vgg.items()}, tmp_path / "vgg19.pth")
    losses = []
    real_train = train_module.train
    monkeypatch.setattr(
        train_module,
        "train",
        lambda cfg, **kw: real_train(cfg, on_step=lambda i: losses.append(i["loss"]), **kw),
    )
    val = write_images(tmp_path / "val", 2)
    argv = ["train", "--data", str(data), "--val-data", str(val), "--out", str(tmp_path / "out"), *TINY_ARGS[:-1],
            "--epochs", "1", "--batch-size", "2", "--accumulate", "1", "--init-weights", str(tmp_path / "init.safetensors")]  # fmt: skip
    # The train=False export carries no VGG19: without --vgg-weights (or --random-vgg) that is an error,
    # before any work.
    assert cli.main(argv) == 1
    assert "no VGG19 weights" in capsys.readouterr().err and not (tmp_path / "out").exists()
    # A misspelt backbone would train a base model (the official rule for other names), also with
    # encoder_* keywords when it is an official name in another case.
    for backbone, kwargs in (("Tiny", "{}"), ("mine", "{}"), ("Tiny", '{"encoder_depth": 2}')):
        assert cli.main([*argv, "--backbone", backbone, "--model-kwargs", kwargs]) == 1
        err = capsys.readouterr().err
        assert f"error: backbone {backbone!r} is no official name" in err and not (tmp_path / "out").exists()
    # --model-kwargs that is no JSON object: named as such (argparse's usage error, exit status 2).
    for kwargs, message in (
        ("{", "is not valid JSON (Expecting property name"),
        ("[1]", "must be a JSON object"),
    ):
        with pytest.raises(SystemExit) as exit_info:
            cli.main([*argv, "--model-kwargs", kwargs])
        assert exit_info.value.code == 2 and f"--model-kwargs: the value {message}" in capsys.readouterr().err
    # A missing weight file, or one that does not fit: the error names its option.
    save_state_dict({"features.0.weight": torch.zeros(1)}, tmp_path / "notvgg.pth")
    for path, message in (("nope.pth", "weight file"), ("notvgg.pth", "")):
        assert cli.main([*argv, "--vgg-weights", str(tmp_path / path)]) == 1
        err = capsys.readouterr().err
        assert f"error: --vgg-weights: {message}" in err and not (tmp_path / "out").exists(), err
    assert cli.main([*argv, "--vgg-weights", str(tmp_path / "vgg19.pth")]) == 0
    assert len(losses) == 4 and all(map(math.isfinite, losses)) and losses[-1] < losses[0], losses

    out = tmp_path / "out"
    assert {"last.pt", "last.safetensors", "best.safetensors", "metrics.jsonl", "config.json"} <= set(
        os.listdir(out)
    )
    sd = load_file(out / "best.safetensors")
    for key, value in vgg.items():  # the VGG19 the run used, as in the official files
        assert torch.equal(sd[f"vgg_encoder.{key}"], value)
    trained = load_state_dict(
        StylizingViT("tiny", train=True, input_size=32, encoder_depth=2), sd, strict=True
    )
    # k_proj.bias has no gradient, yet weight decay shrank it every step, as in the official AdamW.
    for blk, blk0 in zip(trained.encoder.blocks, init.encoder.blocks):
        expected = blk0.attn.k_proj.bias.detach().clone()
        for _ in range(4):
            expected.mul_(1 - 1e-3 * 0.01)
        torch.testing.assert_close(blk.attn.k_proj.bias, expected, rtol=1e-6, atol=0)
    ckpt = load_checkpoint(out / "last.pt")  # weights_only=True
    assert (ckpt["epoch"], ckpt["batch"], ckpt["step"]) == (1, 0, 4)
    assert ckpt["config"]["mean"] == (0.7440, 0.5895, 0.7214) and ckpt["best_val"] is not None
    # The exports carry the run's normalization, which the commands use by default.
    for name in ("best.safetensors", "last.safetensors"):
        assert read_normalization(out / name) == (ckpt["config"]["mean"], ckpt["config"]["std"])
    metrics = (out / "metrics.jsonl").read_text().splitlines()
    assert len(metrics) == 1 and '"val_psnr"' in metrics[0]


@pytest.mark.parametrize("accumulate", [1, 2])
def test_two_ranks_with_torchrun_equal_one_process_accumulating_their_micro_batches(tmp_path, accumulate):
    """Also with a corrupt file that rank 1 reads: skipped_images counts every rank's findings. With
    --accumulate 2 the ranks' first micro-batch of a step runs under DDP's no_sync."""
    images = 8 * accumulate  # two steps of 2 ranks x accumulate micro-batches of 2
    data = write_images(tmp_path / "data", images)
    corrupt = micro_batches(images, 2, 0, TrainConfig.seed, rank=1, world_size=2)[0][0]
    (data / sorted(f"{i}.png" for i in range(images))[corrupt]).write_bytes(b"not an image")  # sorted paths
    common = ["--data", str(data), *TINY_ARGS, "--epochs", "1", "--batch-size", "2", "--max-steps", "2"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "fastvit_style.train", *common, "--accumulate", str(accumulate), "--out", str(tmp_path / "ddp")]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        single = train(TrainConfig(data=str(data), out=str(tmp_path / "one"), epochs=1, batch_size=2,
                                   accumulate=2 * accumulate, max_steps=2, **TINY))  # fmt: skip
    for out in ("ddp", "one"):
        assert '"skipped_images": 1' in (tmp_path / out / "metrics.jsonl").read_text(), out
        flags = load_checkpoint(tmp_path / out / "last.pt")["train_unreadable"]
        assert flags.nonzero().flatten().tolist() == [corrupt], out
    ddp = load_file(tmp_path / "ddp" / "last.safetensors")
    # With one micro-batch a rank, the gradients are summed in the single process's order: equal weights.
    # With two, four are summed in another order; AdamW's first steps divide by |g| + eps, so gradient
    # entries near eps (1e-8) move by a few percent of lr = 1e-3 (5e-5 seen). A micro-batch dropped or
    # mis-weighted under no_sync flips signs: 2 lr.
    atol = 1e-6 if accumulate == 1 else 2e-4
    torch.manual_seed(TrainConfig.seed)  # the trainer's seed: the initial weights
    start = StylizingViT("tiny", train=True, input_size=32, encoder_depth=2).state_dict()
    moved = 0
    trained = {k: v for k, v in single.state_dict().items() if not k.startswith("vgg_encoder.")}
    assert set(ddp) == set(trained)  # a random VGG19 is not exported
    for key, value in trained.items():
        torch.testing.assert_close(ddp[key], value, rtol=0, atol=atol, msg=key)
        moved += not torch.equal(value, start[key])
    assert moved > 10  # the comparison is not between two untrained models


def test_two_ranks_with_an_unreadable_val_data_save_the_epoch_then_fail_with_one_message(tmp_path):
    """Every rank raises after validation, so rank 0's checkpoint write must finish before any rank exits
    (torchrun stops the others when one fails): the checkpoint loads and resumes in one process."""
    data, bad = write_images(tmp_path / "data", 2), tmp_path / "bad"
    bad.mkdir()
    for i in range(2):  # one per rank: both ranks warn, and the shared flags mark the whole folder
        (bad / f"{i}.png").write_bytes(b"not an image")
    out, launch = tmp_path / "out", tmp_path / "slow_disk_train.py"
    # A slow disk: without the wait, rank 1 leaves while rank 0 writes and torchrun stops rank 0 there.
    launch.write_text(
        "import sys, time\nimport fastvit_style.train as t\nwrite = t.save_checkpoint\n"
        "t.save_checkpoint = lambda state, path: (time.sleep(2), write(state, path))\nsys.exit(t.main())\n"
    )
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "--monitor-interval", "0.1", str(launch), "--data", str(data), "--val-data", str(bad), *TINY_ARGS,
           "--epochs", "2", "--batch-size", "1", "--accumulate", "1", "--out", str(out)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, check=False, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode != 0
    # One error line per rank and no traceback through this package (torchrun prints its own).
    assert done.stderr.count("error: every image under --val-data") == 2, done.stderr[-3000:]
    assert not re.search(r'File "[^"]*fastvit_style', done.stderr), done.stderr[-3000:]
    assert f"Epoch 1's training is saved in {str(out / 'last.pt')!r}" in done.stderr
    state = load_checkpoint(out / "last.pt")
    assert (state["epoch"], state["batch"], state["step"], state["world_size"]) == (0, 1, 1, 2)
    assert not (out / "metrics.jsonl").exists()
    with pytest.warns(UserWarning, match="the global batch changes"):
        resumed = Trainer(TrainConfig(data=str(data), val_data=str(data), out=str(out), resume=str(out / "last.pt"),
                                      epochs=2, batch_size=1, accumulate=1, **TINY), 0, 1, torch.device("cpu"))  # fmt: skip
    assert (resumed.epoch, resumed.batch, resumed.step) == (0, 2, 1)  # the epoch's end, in one process


def test_kill_and_resume_reproduces_the_uninterrupted_run_bitwise(tmp_path):
    data = write_images(tmp_path / "data", 2)
    # 2 steps per epoch, 2 epochs (different lr), interrupted mid-epoch after step 1.
    config = dict(
        data=str(data), epochs=2, batch_size=1, accumulate=1, max_steps=3, checkpoint_every=1, **TINY
    )
    full_losses, part_losses = [], []
    full = train(
        TrainConfig(out=str(tmp_path / "full"), **config), on_step=lambda i: full_losses.append(i["loss"])
    )

    class Killed(Exception):
        pass

    def kill_after_step_1(info):
        part_losses.append(info["loss"])
        if info["step"] == 1:
            raise Killed

    with pytest.raises(Killed):
        train(TrainConfig(out=str(tmp_path / "part"), **config), on_step=kill_after_step_1)
    assert load_checkpoint(tmp_path / "part" / "last.pt")["step"] == 1
    resumed = train(TrainConfig(out=str(tmp_path / "part"), resume=str(tmp_path / "part" / "last.pt"), **config),
                    on_step=lambda i: part_losses.append(i["loss"]))  # fmt: skip
    assert part_losses == full_losses and len(full_losses) == 3
    for (key, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key


def test_resuming_mid_epoch_with_another_number_of_processes_is_refused(tmp_path):
    data = write_images(tmp_path / "data", 4)  # 2 micro-batches per process of 2: batch 1 is mid-epoch
    config = TrainConfig(
        data=str(data), out=str(tmp_path / "out"), batch_size=1, accumulate=1, max_steps=1, **TINY
    )
    train(config)
    state = load_checkpoint(tmp_path / "out" / "last.pt")
    assert (state["batch"], state["world_size"]) == (1, 1)
    save_checkpoint({**state, "world_size": 2}, tmp_path / "two.pt")
    with pytest.raises(ValueError, match="mid-epoch by 2 process"):
        Trainer(dataclasses.replace(config, out=str(tmp_path / "new"), resume=str(tmp_path / "two.pt")), 0, 1,
                torch.device("cpu"))  # fmt: skip


def test_an_interrupted_checkpoint_write_leaves_the_previous_one_loadable(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    model = torch.nn.Linear(3, 2)
    save_checkpoint({"model": model.state_dict(), "step": 1}, path)

    def dies_midway(obj, f, *args, **kwargs):
        f.write(b"PK\x03\x04 half a zip file")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_midway)
    with torch.no_grad():
        model.weight.add_(1)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint({"model": model.state_dict(), "step": 2}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["step"] == 1 and not torch.equal(state["model"]["weight"], model.weight)
    assert os.listdir(tmp_path) == ["last.pt"]  # no temporary file left behind


def test_an_all_corrupt_micro_batch_adds_a_zero_gradient(tmp_path):
    trainer = Trainer(TrainConfig(data=str(write_images(tmp_path / "data", 2)), out=str(tmp_path / "out"), **TINY), 0, 1,
                      torch.device("cpu"))  # fmt: skip
    assert trainer._micro_step(torch.empty(0), 0.5) is None
    assert all(p.grad is not None and not p.grad.any() for p in trainer.params)
    assert trainer._micro_step(trainer.train_set[0][None].repeat(2, 1, 1, 1), 0.5).shape == (5,)
    assert any(p.grad.any() for p in trainer.params)


@pytest.mark.parametrize("other_images", [2, 0])
def test_under_ddp_only_a_rank_without_images_reads_the_step_count(tmp_path, monkeypatch, other_images):
    """Reading the step's image count summed over the ranks would make the host wait for the GPU's queue
    every step: the weights divide by it on the device, and only a rank whose step had no readable image
    reads it, to learn whether any rank had one (then it steps, else every rank skips the step). Rank 0
    of 2, alone in a gloo group: the other rank's images are added to each sum."""
    data = write_images(tmp_path / "data", 8)
    for i in micro_batches(8, 2, 0, TrainConfig.seed, rank=0, world_size=2)[1]:  # rank 0's second step
        (data / f"{i}.png").write_bytes(b"not an image")
    dist.init_process_group("gloo", store=dist.FileStore(str(tmp_path / "store"), 1), rank=0, world_size=1)
    try:
        reduce, sums, reads = dist.all_reduce, [], []

        def with_the_other_rank(tensor, *args, **kwargs):
            done = reduce(tensor, *args, **kwargs)
            if tensor.dtype == torch.int64:  # the step's count (the corrupt files' flags are uint8)
                tensor += other_images
            return done

        monkeypatch.setattr(dist, "all_reduce", with_the_other_rank)
        sum_over_ranks, to_bool = Trainer._sum_over_ranks, torch.Tensor.__bool__
        monkeypatch.setattr(
            Trainer, "_sum_over_ranks", lambda self, n: sums.append(sum_over_ranks(self, n)) or sums[-1]
        )
        monkeypatch.setattr(torch.Tensor, "__bool__", lambda t: reads.append(t) or to_bool(t))
        config = TrainConfig(data=str(data), out=str(tmp_path / "out"), batch_size=2, accumulate=1, **TINY)
        trainer = Trainer(dataclasses.replace(config, max_steps=2), 0, 2, torch.device("cpu"))
        with pytest.warns(UserWarning, match="skipping unreadable image"):
            trainer.fit()
    finally:
        dist.destroy_process_group()
    assert [s.dtype for s in sums] == [torch.float64] * 2  # on the device, divided as the int would be
    assert [float(s) for s in sums] == [2 + other_images, other_images]
    assert [r is sums[1] for r in reads if any(r is s for s in sums)] == [True]  # the second step's only
    steps = trainer.optimizer.state[trainer.params[0]]["step"]
    assert steps == (2 if other_images else 1) and trainer.step == 2


def test_cosine_schedule_and_psnr_formula():
    assert [cosine_lr(1e-3, e, 4) for e in range(4)] == pytest.approx(
        [1e-3, 0.5e-3 * (1 + 2**-0.5), 0.5e-3, 0.5e-3 * (1 - 2**-0.5)]
    )
    x = torch.zeros(2, 3, 4, 4)
    y = x.clone()
    y[0] += 0.5  # mse 0.25, image 1 exact; max_val over the whole batch = 0.5
    expected = (10 * math.log10(0.25 / (0.25 + 1e-10)) + 10 * math.log10(0.25 / 1e-10)) / 2
    assert psnr(x, y).item() == pytest.approx(expected)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        # Each numeric option by its flag (a field without one by its name), with the range it takes.
        ({"max_steps": 0}, re.escape("--max-steps must be an integer >= 1 (left out: no limit), got 0")),
        ({"max_steps": 2.5}, "--max-steps must be an integer >= 1"),
        ({"epochs": 0}, "--epochs must be an integer >= 1, got 0"),
        ({"epochs": 1.5}, "--epochs must be an integer >= 1, got 1.5"),
        ({"epochs": True}, "--epochs must be an integer >= 1, got True"),  # a bool is no count
        ({"workers": False}, "--workers must be an integer >= 0, got False"),
        ({"batch_size": 0}, "--batch-size must be an integer >= 1"),
        ({"accumulate": -2}, "--accumulate must be an integer >= 1, got -2"),
        ({"input_size": 0}, "--input-size must be an integer >= 1"),
        ({"input_size": 30}, "--input-size must be a positive multiple of the patch size 16, got 30"),
        (
            {"input_size": 16},
            "--input-size must be at least 32: the VGG19 of the losses halves the image five",
        ),
        ({"input_size": 24, "model_kwargs": {"encoder_patch_size": 8}}, "--input-size must be at least 32"),
        ({"input_size": 32, "model_kwargs": {"encoder_patch_size": 14}}, "of the patch size 14, got 32"),
        ({"checkpoint_every": -1}, "--checkpoint-every must be an integer >= 0, got -1"),
        ({"workers": -1}, "--workers must be an integer >= 0, got -1"),
        ({"lr": -1.0}, re.escape("--lr must be a finite number >= 0, got -1.0")),
        ({"lr": float("nan")}, "--lr must be a finite number >= 0, got nan"),
        ({"weight_decay": -0.1}, "--weight-decay must be a finite number >= 0"),
        ({"eps": -1e-8}, "eps must be a finite number >= 0"),
        ({"clip_norm": 0.0}, r"clip_norm must be a number > 0 \(inf: no clipping\), got 0.0"),
        ({"clip_norm": float("nan")}, "clip_norm must be a number > 0"),
        ({"clip_norm": True}, "clip_norm must be a number > 0"),  # a bool is no number
        ({"betas": (0.9, 1.0)}, re.escape("betas must be 2 finite numbers in [0, 1), got (0.9, 1.0)")),
        ({"betas": (0.9,)}, "betas must be 2 finite numbers"),
        ({"loss_weights": (70, 1, -7, 10)}, "loss_weights must be 4 finite numbers >= 0"),
        ({"mean": (0.5, 0.5, float("inf")), "std": (1, 1, 1)}, "--mean must be 3 finite numbers"),
        ({"mean": (0.5, 0.5, 0.5), "std": (1, 0, 1)}, "--std must be 3 finite numbers > 0"),
        ({"std": (1, 1, 1)}, "give --mean and --std together"),
        (
            {"mean": (123.7, 116.3, 103.5), "std": (58.4, 57.1, 57.4)},
            r"--mean/--std: mean and std are for images in \[0, 1\].*divide them by 255",
        ),
        ({"model_kwargs": {"input_size": 32}}, "--input-size"),
        ({"model_kwargs": [1]}, "model_kwargs must be a dict"),
        ({"model_kwargs": {"colour": 1}}, "unexpected keyword argument 'colour'"),
        ({"model_kwargs": {"encoder_depth": 0}}, "depth must be an integer >= 1"),
        # What the trainer cannot use although the model builds: RGB data, x_recon compared with x.
        (
            {"model_kwargs": {"in_channel": 1}},
            r"model_kwargs cannot be trained: in_channel=1: .* 3 channels \(RGB\)",
        ),
        (
            {"model_kwargs": {"post_process_conv_kernel_size": 4}},
            "kernel_size=4 with .*padding=2 makes the reconstruction 225 px wide, not input_size 224: .*"
            + re.escape("kernel_size = 2 * padding + 1"),
        ),
        ({"model_kwargs": {"post_process_conv_padding": 5}}, "reconstruction 230 px wide"),
        # Officially only their truth counts: a JSON "false" would silently mean True.
        ({"model_kwargs": {"encoder_qkv_bias": "false"}}, "qkv_bias must be True or False, got 'false'"),
        ({"model_kwargs": {"bottleneck_bias": 2}}, "bottleneck_bias must be True or False, got 2"),
        ({"model_kwargs": {"post_process_conv_bias": "no"}}, "post_process_conv_bias must be True or False"),
        # Epoch e seeds torch with seed + e, which must stay within [-2**63, 2**64).
        (
            {"seed": 2**64 - 1, "epochs": 2},
            re.escape("--seed must be an integer from -2**63 to 2**64 - epochs (18446744073709551614)"),
        ),
        ({"seed": 2**64}, "--seed must be an integer"),
        ({"seed": -(2**63) - 1}, "--seed must be an integer"),
        ({"seed": 1.0}, "--seed must be an integer"),
        ({"seed": True}, "--seed must be an integer"),
    ],
)
def test_bad_train_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(data="data", out="out", **kwargs)


def test_the_edges_torch_accepts_are_accepted():
    TrainConfig(
        data="d", out="o", lr=0.0, clip_norm=float("inf"), weight_decay=0.0, workers=0, checkpoint_every=0
    )
    # beta1 = 0 (no momentum) and a loss term switched off (an ablation).
    TrainConfig(data="d", out="o", betas=(0.0, 0.999), loss_weights=(70.0, 0.0, 7.0, 0.0))


def test_lists_from_argparse_or_json_are_tuples_and_resume_alike():
    """A resumed run compares its settings with the checkpoint's: a list must not differ from its tuple."""
    config = TrainConfig(data="d", out="o", betas=[0.9, 0.999], loss_weights=[70, 1, 7, 10], **TINY)
    assert config.betas == (0.9, 0.999) and config.loss_weights == (70, 1, 7, 10)
    saved = dataclasses.asdict(TrainConfig(data="d", out="o", **TINY))
    assert resumed_config(dataclasses.replace(config, resume="last.pt"), saved).loss_weights == LOSS_WEIGHTS


def test_a_resumed_run_takes_where_and_how_fast_it_runs_from_the_command_line():
    """Workers, device, checkpoint interval and places may change on resume (another machine): taken,
    never refused."""
    saved = dataclasses.asdict(TrainConfig(data="d", out="o", **TINY))
    runtime = {
        "data": "d2",
        "out": "o2",
        "workers": 2,
        "device": "cpu",
        "checkpoint_every": 7,
        "max_steps": 3,
    }
    asked = TrainConfig(resume="o/last.pt", **{**TINY, **runtime})
    for given in (None, set(runtime)):
        merged = resumed_config(asked, saved, given=given)
        assert {k: getattr(merged, k) for k in runtime} == runtime


def test_resume_in_place_is_the_same_file_by_any_name(tmp_path):
    """--resume names --out's own last.pt through a link (or a relative path): that run continues there;
    a folder is no checkpoint."""
    from fastvit_style.train_config import out_problem, resumes_in_place

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "last.pt").write_bytes(b"")
    (tmp_path / "alias").symlink_to(tmp_path / "run")
    config = TrainConfig(data="d", out=str(tmp_path / "run"), resume=str(tmp_path / "alias" / "last.pt"))
    assert resumes_in_place(config) and out_problem(config) is None
    config = dataclasses.replace(config, resume=str(tmp_path / "run"))
    assert not resumes_in_place(config)
    last = str(tmp_path / "run" / "last.pt")
    assert (
        out_problem(config)
        == f"--resume {str(tmp_path / 'run')!r} is a folder: pass its checkpoint, {last!r}"
    )
    config = dataclasses.replace(config, resume=str(tmp_path))
    assert out_problem(config) == f"--resume {str(tmp_path)!r} is a folder, not a last.pt checkpoint"
    config = dataclasses.replace(config, resume=str(tmp_path / "nope.pt"))
    assert out_problem(config) == f"--resume {str(tmp_path / 'nope.pt')!r} does not exist"


def test_the_extreme_seeds_run_and_bad_ones_stop_the_cli_before_any_file(tmp_path, capsys):
    data = write_images(tmp_path / "data", 1)
    # Accepted: the smallest seed, and a post-process conv other than the official one that keeps the size.
    TrainConfig(data="data", out="out", seed=-(2**63), model_kwargs={"post_process_conv_kernel_size": 3,
                "post_process_conv_padding": 1})  # fmt: skip
    # The largest seed a 2-epoch run takes: its last epoch seeds torch with 2**64 - 1.
    train(
        TrainConfig(data=str(data), out=str(tmp_path / "big"), seed=2**64 - 2, epochs=2, batch_size=1, **TINY)
    )
    assert load_checkpoint(tmp_path / "big" / "last.pt")["epoch"] == 2
    argv = ["train", "--data", str(data), "--out", str(tmp_path / "out"), *TINY_ARGS]
    nope, png = tmp_path / "nope", data / "0.png"
    for extra, match in [(["--seed", str(2**64)], "--seed must be an integer"),
                         (["--model-kwargs", '{"in_channel": 1}'], "cannot be trained: in_channel=1"),
                         (["--epochs", "0"], "error: --epochs must be an integer >= 1, got 0"),
                         (["--lr", "-1"], "error: --lr must be a finite number >= 0, got -1.0"),
                         (["--weight-decay", "nan"], "error: --weight-decay must be a finite number >= 0"),
                         (["--mean", "0", "0", "0", "--std", "1", "0", "1"], "error: --std must be 3"),
                         # A folder by its flag, and which is wrong: missing, or a file.
                         (["--data", str(nope)], f"error: --data: image folder {str(nope)!r} does not exist"),
                         (["--val-data", str(png)], f"error: --val-data: image folder {str(png)!r} is a file"),
                         # An empty value (an unset shell variable) was taken as none: a new run from scratch.
                         (["--resume", ""], "error: --resume is empty: name a last.pt, or leave the option out"),
                         (["--init-weights", ""], "error: --init-weights is empty"),
                         (["--vgg-weights", ""], "error: --vgg-weights is empty"),
                         (["--backbone", ""], "error: --backbone is empty")]:  # fmt: skip
        assert cli.main([*argv, *extra]) == 1
        assert match in capsys.readouterr().err and not (tmp_path / "out").exists()
    if os.path.isdir("/proc/self"):  # a place nobody can create files in, not even root
        assert cli.main([*argv[:4], "/proc/self/o", *argv[5:]]) == 1
        assert "error: --out '/proc/self/o' cannot be written to" in capsys.readouterr().err


def test_a_new_run_never_replaces_another_runs_files(tmp_path):
    """Without --resume or --overwrite an --out that holds a run is refused before any work; with
    --overwrite nothing of the old run is left to pass for the new one's."""
    data = write_images(tmp_path / "data", 2)
    out = tmp_path / "out"
    config = TrainConfig(data=str(data), val_data=str(data), out=str(out), epochs=1, batch_size=1, accumulate=1,
                         **TINY)  # fmt: skip
    train(config)
    before = {name: (out / name).read_bytes() for name in ("last.pt", "metrics.jsonl", "config.json")}
    with pytest.raises(ValueError, match=r"already holds a run \(last.pt, .*--resume .*last.pt.*--overwrite"):
        train(dataclasses.replace(config, seed=5))
    assert before == {name: (out / name).read_bytes() for name in before}
    (tmp_path / "file").write_text("mine")
    with pytest.raises(ValueError, match="exists and is not a folder"):
        train(dataclasses.replace(config, out=str(tmp_path / "file")))

    def dies_at_first_step(info):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):  # before its first save: the old run stays whole
        train(dataclasses.replace(config, seed=5, overwrite=True, max_steps=2), on_step=dies_at_first_step)
    assert before == {name: (out / name).read_bytes() for name in before}
    # What a run that died before its first checkpoint leaves is no run to protect.
    fresh = dataclasses.replace(config, out=str(tmp_path / "fresh"))
    with pytest.raises(KeyboardInterrupt):
        train(dataclasses.replace(fresh, seed=5, max_steps=2), on_step=dies_at_first_step)
    train(dataclasses.replace(fresh, seed=6))
    assert len((tmp_path / "fresh" / "metrics.jsonl").read_text().splitlines()) == 1
    assert load_checkpoint(tmp_path / "fresh" / "last.pt")["config"]["seed"] == 6


def test_overwrite_replaces_the_old_run_only_once_the_new_one_saves(tmp_path, capsys, monkeypatch):
    """--overwrite removes the old run's files when the new run writes its first file, not at its start: a
    run that dies before that (Ctrl-C or a second SIGTERM in its first micro-step, every image unreadable)
    leaves --out byte for byte as it was and names no --resume of the old last.pt; one that reaches its
    first checkpoint has replaced every file (no old best.safetensors or metrics line passes for its own)."""
    data, bad = write_images(tmp_path / "data", 2), tmp_path / "bad"
    bad.mkdir()
    for i in range(2):
        (bad / f"{i}.png").write_bytes(b"not an image")
    out = tmp_path / "out"
    base = ["train", "--out", str(out), *TINY_ARGS, "--batch-size", "1", "--accumulate", "1",
            "--checkpoint-every", "0", "--epochs", "2"]  # fmt: skip
    assert cli.main([*base, "--data", str(data), "--val-data", str(data), "--max-steps", "3"]) == 0
    (out / leftover_name("last.pt")).write_bytes(b"a killed write's")
    os.utime(out / "last.pt")  # written now: its time alone would pass it for the new run's

    def files():  # each file's bytes, by their digest (a short diff)
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in out.iterdir()}

    old = files()
    assert {"best.safetensors", "metrics.jsonl", "last.pt", "config.json"} <= set(old)
    capsys.readouterr()
    micro_step, sigterms = Trainer._micro_step, 0

    def ctrl_c(self, *args):
        raise KeyboardInterrupt

    def sigterm(self, *args):
        for _ in range(sigterms):
            os.kill(os.getpid(), signal.SIGTERM)
        return micro_step(self, *args)

    new = [*base, "--data", str(data), "--seed", "5", "--overwrite"]
    monkeypatch.setattr(Trainer, "_micro_step", ctrl_c)
    assert cli.main(new) == 130
    err = capsys.readouterr().err
    assert err.endswith("\ninterrupted\n") and "--resume" not in err, err
    assert files() == old
    monkeypatch.setattr(Trainer, "_micro_step", sigterm)
    sigterms = 2  # the second stops at once
    assert cli.main(new) == 143
    err = capsys.readouterr().err
    assert err.endswith("\nterminated\n") and "--resume" not in err, err
    assert files() == old
    sigterms = 0
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        assert cli.main([*base, "--data", str(bad), "--overwrite"]) == 1
    assert "every image under --data" in capsys.readouterr().err
    assert files() == old
    sigterms = 1  # the step finishes and is checkpointed: the new run's first file
    assert cli.main(new) == 143
    assert set(os.listdir(out)) == {"config.json", "last.pt", "last.safetensors"}
    assert json.loads((out / "config.json").read_text())["seed"] == 5
    assert load_checkpoint(out / "last.pt")["step"] == 1


def test_a_config_json_no_run_wrote_is_never_replaced(tmp_path):
    """A user's own config.json in --out is refused, --overwrite or not, before anything is written, also
    one with the generic keys of a training config; a run's (of any version: it has every field of the
    first TrainConfig) is a run's to replace."""
    data = write_images(tmp_path / "data", 1)
    out = tmp_path / "out"
    out.mkdir()
    config = TrainConfig(data=str(data), out=str(out), **TINY)
    generic = {"data": "images", "out": "results", "epochs": 90, "batch_size": 256, "seed": 0, "model": "r50"}
    for mine in (b'{"lr": 0.1, "notes": "my settings"}', b"\x89PNG not even JSON", b"[1, 2]",
                 b'{"data": "images", "out": "results"}', json.dumps(generic).encode()):  # fmt: skip
        (out / "config.json").write_bytes(mine)
        for overwrite in (False, True):
            with pytest.raises(ValueError, match="holds a config.json that no run wrote.*move that file, or "
                               "choose another --out"):  # fmt: skip
                Trainer(dataclasses.replace(config, overwrite=overwrite), 0, 1, torch.device("cpu"))
            assert (out / "config.json").read_bytes() == mine and os.listdir(out) == ["config.json"]
    first_fields = ("data", "out", "val_data", "backbone", "model_kwargs", "epochs", "batch_size", "accumulate",
                    "lr", "weight_decay", "betas", "eps", "clip_norm", "loss_weights", "dataset", "mean", "std",
                    "input_size", "bf16", "compile", "backend", "device", "vgg_weights", "init_weights", "resume",
                    "seed", "workers", "max_steps", "checkpoint_every")  # fmt: skip
    old = {**dict.fromkeys(first_fields), "out": str(out), "epochs": 3, "a_later_field": 0}
    (out / "config.json").write_text(json.dumps(old))
    Trainer(config, 0, 1, torch.device("cpu"))  # no run files with it (no --overwrite): replaced at the start
    assert json.loads((out / "config.json").read_text())["epochs"] == config.epochs


def test_ctrl_c_says_how_to_resume_without_a_traceback(tmp_path, capsys, monkeypatch):
    data, out = write_images(tmp_path / "data", 2), tmp_path / "out"
    argv = ["train", "--data", str(data), "--out", str(out), *TINY_ARGS]
    assert cli.main([*argv, "--max-steps", "1"]) == 0
    capsys.readouterr()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted)
    assert cli.main([*argv, "--resume", str(out / "last.pt")]) == 130
    err = capsys.readouterr().err
    assert err == f"--resume {str(out / 'last.pt')!r} continues from its last checkpoint\ninterrupted\n", err
    assert cli.main(["train", "--data", str(data), "--out", str(tmp_path / "new"), *TINY_ARGS]) == 130
    assert capsys.readouterr().err == "interrupted\n"  # no checkpoint yet: nothing to resume
    os.utime(out / "last.pt", (0, 0))  # an older run's, which --overwrite replaces
    assert cli.main([*argv, "--overwrite"]) == 130
    assert capsys.readouterr().err == "interrupted\n"

    def interrupted_after_a_checkpoint(cfg, **kwargs):
        os.utime(out / "last.pt")  # as this run's checkpoint would
        raise KeyboardInterrupt

    monkeypatch.setattr(train_module, "train", interrupted_after_a_checkpoint)
    assert cli.main([*argv, "--overwrite"]) == 130
    assert (
        capsys.readouterr().err
        == f"--resume {str(out / 'last.pt')!r} continues from its last checkpoint\ninterrupted\n"
    )
    monkeypatch.setenv("RANK", "1")  # under torchrun the lines are rank 0's
    assert cli.main([*argv, "--resume", str(out / "last.pt")]) == 130
    assert capsys.readouterr().err == ""
    monkeypatch.delenv("RANK")
    monkeypatch.setenv("FASTVIT_STYLE_TRACEBACK", "1")
    with pytest.raises(KeyboardInterrupt):
        cli.main([*argv, "--resume", str(out / "last.pt")])


def test_a_ctrl_c_mid_epoch_ends_the_progress_bar_before_its_lines(tmp_path, capsys, monkeypatch):
    """The bar is closed as the interrupt leaves the epoch: the resume line starts a line of its own, and
    no bar is drawn after `interrupted`."""
    data, out = write_images(tmp_path / "data", 4), tmp_path / "out"
    steps = 0
    micro_step = Trainer._micro_step

    def interrupted_at_step_3(self, *args):
        nonlocal steps
        steps += 1
        if steps == 3:
            raise KeyboardInterrupt
        return micro_step(self, *args)

    monkeypatch.setattr(Trainer, "_micro_step", interrupted_at_step_3)
    argv = ["train", "--data", str(data), "--out", str(out), *TINY_ARGS, "--batch-size", "1", "--accumulate", "1",
            "--checkpoint-every", "1"]  # fmt: skip
    assert cli.main(argv) == 130
    lines = capsys.readouterr().err.split("\n")  # the bar's redraws are \r-separated within its line
    resume = f"--resume {str(out / 'last.pt')!r} continues from its last checkpoint"
    assert lines[-3:] == [resume, "interrupted", ""]
    assert "epoch 1/50:  50%" in lines[-4]


def test_sigterm_stops_at_the_step_end_with_a_checkpoint(tmp_path, capsys, monkeypatch):
    """A scheduler's stop (SIGTERM) mid-epoch: the step under way finishes, a checkpoint is written at its
    end (the same state as a run stopped there by --max-steps), and the command ends as after Ctrl-C,
    saying how to resume, with `terminated` and status 143. Before, the run died where the signal found
    it and lost every step since its last checkpoint (here none: --checkpoint-every 0)."""
    data = write_images(tmp_path / "data", 4)
    base = ["train", "--data", str(data), *TINY_ARGS, "--batch-size", "1", "--accumulate", "2",
            "--checkpoint-every", "0", "--epochs", "3"]  # fmt: skip
    assert cli.main([*base, "--out", str(tmp_path / "two"), "--max-steps", "1"]) == 0
    calls = 0
    micro_step = Trainer._micro_step

    def sigterm_in_micro_step_1(self, *args):  # the first of step 1's two micro-steps
        nonlocal calls
        calls += 1
        if calls == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return micro_step(self, *args)

    monkeypatch.setattr(Trainer, "_micro_step", sigterm_in_micro_step_1)
    out = tmp_path / "out"
    capsys.readouterr()
    assert cli.main([*base, "--out", str(out)]) == 143
    assert calls == 2  # the step finished, the next one never started
    lines = capsys.readouterr().err.split("\n")
    assert lines[-3:] == [
        f"--resume {str(out / 'last.pt')!r} continues from its last checkpoint",
        "terminated",
        "",
    ]
    assert any("SIGTERM: stopping at the end of this step" in line for line in lines)
    stopped, wanted = load_checkpoint(out / "last.pt"), load_checkpoint(tmp_path / "two" / "last.pt")
    assert (stopped["step"], stopped["batch"], stopped["epoch"]) == (1, 2, 0)
    for key, value in wanted["model"].items():
        assert torch.equal(stopped["model"][key], value), key
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


def test_a_second_sigterm_stops_at_once_and_one_at_the_last_step_ends_the_epoch(
    tmp_path, capsys, monkeypatch
):
    """A second SIGTERM does not wait for the step's end (nothing saved: no checkpoint yet); one during an
    epoch's last step lets the epoch end as usual (metrics line, checkpoint) and stops before the next."""
    data = write_images(tmp_path / "data", 2)
    base = ["train", "--data", str(data), *TINY_ARGS, "--batch-size", "1", "--accumulate", "1",
            "--checkpoint-every", "0", "--epochs", "3"]  # fmt: skip
    calls, when = 0, {}
    micro_step = Trainer._micro_step

    def sigterms(self, *args):
        nonlocal calls
        calls += 1
        for _ in range(when.get(calls, 0)):
            os.kill(os.getpid(), signal.SIGTERM)
        return micro_step(self, *args)

    monkeypatch.setattr(Trainer, "_micro_step", sigterms)
    when = {1: 2}
    assert cli.main([*base, "--out", str(tmp_path / "twice")]) == 143
    assert calls == 1 and not (tmp_path / "twice" / "last.pt").exists()
    err = capsys.readouterr().err
    assert "(a second SIGTERM stops at once)\n" in err and err.endswith("\nterminated\n")  # no --resume line
    calls, when = 0, {2: 1}  # the epoch's 2nd and last step
    assert cli.main([*base, "--out", str(tmp_path / "last")]) == 143
    assert calls == 2 and load_checkpoint(tmp_path / "last" / "last.pt")["epoch"] == 1
    assert len((tmp_path / "last" / "metrics.jsonl").read_text().splitlines()) == 1


def test_a_sigterm_in_the_runs_last_step_lets_it_finish_with_status_0(tmp_path, capsys, monkeypatch):
    """The last step of the last epoch (or the one reaching --max-steps): nothing is left to stop, so the
    run ends as it would have, status 0, with no `terminated` and no --resume line naming a finished run."""
    data = write_images(tmp_path / "data", 2)
    base = ["train", "--data", str(data), *TINY_ARGS, "--batch-size", "1", "--accumulate", "1",
            "--checkpoint-every", "0"]  # fmt: skip
    micro_step = Trainer._micro_step

    def sigterm_at_step_2(self, *args):
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return micro_step(self, *args)

    monkeypatch.setattr(Trainer, "_micro_step", sigterm_at_step_2)
    for out, more in (("epochs", ["--epochs", "1"]), ("max", ["--epochs", "3", "--max-steps", "2"])):
        assert cli.main([*base, *more, "--out", str(tmp_path / out)]) == 0, out
        err = capsys.readouterr().err
        assert "SIGTERM: stopping" in err and "terminated" not in err and "continues from its last" not in err
        assert load_checkpoint(tmp_path / out / "last.pt")["step"] == 2
    assert "stopped at step 2 (--max-steps 2)" in err


GROUP_SIGTERM = """
import os, signal, subprocess, sys
from fastvit_style import cli
from fastvit_style.train import Trainer

# As a scheduler does: from outside, to every process of the job, the DataLoader workers included (a
# worker stops quietly at a SIGTERM from its parent only).
SCHEDULER = "import os, signal; signal.signal(signal.SIGTERM, signal.SIG_IGN); os.killpg(0, signal.SIGTERM)"
micro_step = Trainer._micro_step
def group_sigterm(self, *args):
    if self.step == 0:
        subprocess.run([sys.executable, "-c", SCHEDULER], check=True)
    return micro_step(self, *args)
Trainer._micro_step = group_sigterm
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_sigterm_to_the_whole_job_stops_it_once_with_dataloader_workers(tmp_path):
    """DataLoader workers ignore SIGTERM (the main process stops them). Torch's own handler in a worker
    ends it by the signal when the SIGTERM is not its parent's, and the main process then raises
    "DataLoader worker exited unexpectedly" mid-step, at whichever line it is, with no checkpoint."""
    data, out = write_images(tmp_path / "data", 4), tmp_path / "out"
    argv = ["train", "--data", str(data), "--out", str(out), *TINY_ARGS[:-3], "--random-vgg", "--workers", "2",
            "--batch-size", "1", "--accumulate", "1", "--checkpoint-every", "0"]  # fmt: skip
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", GROUP_SIGTERM, *argv], env=env, capture_output=True, text=True,
                          start_new_session=True, check=False, timeout=300)  # fmt: skip
    assert done.returncode == 143, done.stderr
    assert done.stderr.count("SIGTERM: stopping at the end of this step") == 1, done.stderr
    assert load_checkpoint(out / "last.pt")["step"] == 1


UNCAUGHT_CTRL_C = """
import sys, torch.multiprocessing
from fastvit_style.train import Trainer, train
from fastvit_style.train_config import TrainConfig

micro_step = Trainer._micro_step
def ctrl_c(self, *args):
    if self.step == 1:
        raise KeyboardInterrupt
    return micro_step(self, *args)
Trainer._micro_step = ctrl_c
torch.multiprocessing.set_start_method(sys.argv[2])
train(TrainConfig(**eval(sys.argv[1])))
"""


@pytest.mark.parametrize("start", ["fork", "spawn", "forkserver"])
def test_a_script_that_leaves_ctrl_c_uncaught_mid_epoch_exits_with_dataloader_workers(tmp_path, start):
    """The traceback of an uncaught Ctrl-C keeps the epoch's DataLoader iterator alive until interpreter
    exit, where multiprocessing stops the workers with a SIGTERM and waits for them: workers that ignored
    every SIGTERM kept the process waiting forever. The epoch ends its workers as it unwinds; spawned ones
    (macOS's and Python 3.14's default: forkserver) would drop that SIGTERM, in a thread torch started."""
    data = write_images(tmp_path / "data", 4)
    config = dict(TINY, workers=2, data=str(data), out=str(tmp_path / "out"), epochs=1, batch_size=1,
                  accumulate=1, checkpoint_every=0)  # fmt: skip
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([root, os.environ.get("PYTHONPATH", "")])}
    run = subprocess.Popen([sys.executable, "-c", UNCAUGHT_CTRL_C, repr(config), start], env=env, text=True,
                           stderr=subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        err = run.communicate(timeout=60)[1]
    except subprocess.TimeoutExpired:
        os.killpg(run.pid, signal.SIGKILL)
        run.communicate()
        pytest.fail("the process still waited for its DataLoader workers after 60 s")
    assert run.returncode == -signal.SIGINT and err.endswith("KeyboardInterrupt\n"), err[-3000:]


def test_run_file_names_without_a_runs_config_json_are_never_replaced(tmp_path):
    """Files named as a run's (metrics.jsonl, best.safetensors, ...) in an --out without a run's
    config.json, which every run writes first, are a user's: refused, --overwrite or not."""
    data = write_images(tmp_path / "data", 1)
    out = tmp_path / "out"
    out.mkdir()
    config = TrainConfig(data=str(data), out=str(out), **TINY)
    for name in RUN_FILES:
        (out / name).write_text("mine")
        for overwrite in (False, True):
            with pytest.raises(
                ValueError, match=f"holds {name} but no config.json: no run wrote them.*move them"
            ):
                Trainer(dataclasses.replace(config, overwrite=overwrite), 0, 1, torch.device("cpu"))
            assert os.listdir(out) == [name] and (out / name).read_text() == "mine"
        (out / name).unlink()


def test_max_steps_at_an_epochs_last_step_still_ends_the_epoch(tmp_path):
    """Validation, metrics.jsonl and best.safetensors of an epoch that max_steps stops at its last step."""
    data = write_images(tmp_path / "data", 4)
    train(TrainConfig(data=str(data), val_data=str(data), out=str(tmp_path / "out"), epochs=3,
                      batch_size=2, accumulate=1, max_steps=2, **TINY))  # fmt: skip
    lines = (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 1 and "val_loss" in lines[0]
    assert (tmp_path / "out" / "best.safetensors").exists()
    state = load_checkpoint(tmp_path / "out" / "last.pt")
    assert (state["epoch"], state["batch"], state["step"]) == (1, 0, 2)


@pytest.mark.parametrize("left", ['{"epoch": 1, "step": 4, "lr": 0.0}\n', '{"epoch": 1, "st', "no json\n"])
def test_metrics_jsonl_holds_one_line_per_epoch_after_a_crash_at_an_epochs_end(tmp_path, left):
    """What a run killed at epoch 1's end left in metrics.jsonl before its checkpoint (the whole line,
    or part of it: a full disk) is replaced by the resumed run's line, not repeated or glued to it; a
    line that is no complete metrics line is dropped with a warning naming the file."""
    data = write_images(tmp_path / "data", 2)
    config = TrainConfig(data=str(data), out=str(tmp_path / "out"), epochs=2, batch_size=1, accumulate=1,
                         max_steps=3, **TINY)  # fmt: skip
    train(config)
    metrics = tmp_path / "out" / "metrics.jsonl"
    first = metrics.read_text()
    with open(metrics, "a") as f:
        f.write(left)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(dataclasses.replace(config, max_steps=None, resume=str(tmp_path / "out" / "last.pt")))
    said = [str(w.message) for w in caught if "metrics.jsonl" in str(w.message)]
    torn = f"{str(metrics)!r}: dropped 1 line(s) that held no complete metrics (a write cut short"
    assert len(said) == (not left.startswith('{"epoch": 1, "step"')) and all(m.startswith(torn) for m in said)
    text = metrics.read_text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert text.startswith(first) and [m["epoch"] for m in lines] == [0, 1] and lines[1]["step"] == 4


def test_resume_without_val_data_keeps_validating_on_the_runs_folder(tmp_path, capsys):
    """--resume needs no --val-data repeated: the run's folder carries over (metrics, config.json); one
    that moved since is an error naming --val-data, which gives its new place."""
    data, val = write_images(tmp_path / "data", 2), write_images(tmp_path / "val", 1)
    out = tmp_path / "out"
    argv = ["train", "--data", str(data), "--out", str(out), *TINY_ARGS, "--epochs", "3", "--batch-size", "2",
            "--accumulate", "1"]  # fmt: skip
    assert cli.main([*argv, "--val-data", str(val), "--max-steps", "1"]) == 0
    resume = [*argv, "--resume", str(out / "last.pt")]
    assert cli.main([*resume, "--max-steps", "2"]) == 0
    assert json.loads((out / "config.json").read_text())["val_data"] == str(val)
    val.rename(tmp_path / "moved")
    capsys.readouterr()
    assert cli.main(resume) == 1
    err = capsys.readouterr().err
    assert f"error: --val-data: image folder {str(val)!r} does not exist" in err, err
    assert "kept from --resume" in err and "give its new place with --val-data" in err
    assert cli.main([*resume, "--val-data", str(tmp_path / "moved")]) == 0
    assert load_checkpoint(out / "last.pt")["config"]["val_data"] == str(tmp_path / "moved")
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["epoch"] for m in lines] == [0, 1, 2] and all("val_loss" in m for m in lines)


def test_a_max_steps_stop_says_where_the_run_is_saved(tmp_path, capsys):
    """One line, mid-epoch or at an epoch's end, from the process that writes the checkpoint (rank 0);
    none once the run finished its epochs."""
    data = write_images(tmp_path / "data", 2)
    config = TrainConfig(data=str(data), out=str(tmp_path / "out"), epochs=2, batch_size=1, accumulate=1,
                         max_steps=1, **TINY)  # fmt: skip
    last = tmp_path / "out" / "last.pt"
    for max_steps in (1, 2):
        train(dataclasses.replace(config, max_steps=max_steps, resume=str(last) if max_steps > 1 else None))
        err, saved = capsys.readouterr().err, f"the run is saved in {str(last)!r}, which --resume continues"
        assert f"stopped at step {max_steps} (--max-steps {max_steps}): {saved}" in err, err
    assert load_checkpoint(last)["step"] == 2
    for max_steps in (1, 2):  # resumed at or past it
        train(dataclasses.replace(config, max_steps=max_steps, resume=str(last)))
        err = capsys.readouterr().err
        assert (
            f"the run is at step 2, --max-steps {max_steps}: nothing to train" in err and "stopped" not in err
        )
    assert load_checkpoint(last)["step"] == 2
    Trainer(dataclasses.replace(config, out=str(tmp_path / "rank1")), 1, 1, torch.device("cpu")).fit()
    assert "stopped at" not in capsys.readouterr().err
    train(dataclasses.replace(config, resume=str(last), max_steps=4))  # the run's last step
    assert "stopped at" not in capsys.readouterr().err


def test_resume_refuses_other_settings_and_a_finished_run_trains_nothing(tmp_path, capsys):
    """A setting given with --resume that differs from the run's would not take effect: refused before
    any file is written. Resuming a finished run says so and leaves it as it was."""
    data = write_images(tmp_path / "data", 2)
    config = TrainConfig(
        data=str(data), out=str(tmp_path / "a"), epochs=1, batch_size=1, accumulate=1, **TINY
    )
    train(config)
    last = tmp_path / "a" / "last.pt"

    def run_files():  # config.json records the resume
        return {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir() if p.name != "config.json"}

    files = run_files()
    with pytest.raises(
        ValueError, match=r"these differ: epochs=2 \(checkpoint: 1\)\. Leave them out .*--init-weights"
    ):
        train(dataclasses.replace(config, resume=str(last), epochs=2))
    capsys.readouterr()
    train(dataclasses.replace(config, resume=str(last)))
    assert "the run finished its 1 epochs: nothing to train" in capsys.readouterr().err
    assert files == run_files()
    # On the command line an option given at its default value counts too (50 epochs is the default).
    resume = ["train", "--data", str(data), "--out", str(tmp_path / "a"), "--resume", str(last), *TINY_ARGS]
    assert cli.main([*resume, "--epochs", "50"]) == 1
    assert "these differ: epochs=50 (checkpoint: 1)" in capsys.readouterr().err
    assert cli.main(resume) == 0 and "nothing to train" in capsys.readouterr().err
    assert files == run_files()


def test_resume_with_the_same_command_line_as_a_random_vgg_run_given_vgg_weights(tmp_path, capsys):
    """--random-vgg beside --vgg-weights is a no-op the run records as random_vgg=False: repeating the
    whole command line with --resume continues the run, not a refusal over random_vgg."""
    data = write_images(tmp_path / "data", 2)
    vgg = tmp_path / "vgg.pth"
    torch.save(StylizingViT("tiny", train=True).vgg_encoder.state_dict(), vgg)
    first = ["train", "--data", str(data), "--out", str(tmp_path / "a"), "--epochs", "2", "--batch-size", "1",
             "--max-steps", "1", "--vgg-weights", str(vgg), *TINY_ARGS]  # fmt: skip
    assert cli.main(first) == 0
    capsys.readouterr()
    assert cli.main([*first, "--max-steps", "2", "--resume", str(tmp_path / "a" / "last.pt")]) == 0
    assert "differ" not in capsys.readouterr().err
    assert load_checkpoint(tmp_path / "a" / "last.pt")["step"] == 2


def test_resume_never_writes_over_another_run_and_a_random_vgg_stays_random(tmp_path):
    """--resume into an --out holding another run is refused (--overwrite replaces it, with what a killed
    write left there); the run's random VGG19 comes from its checkpoint and is never exported."""
    data = write_images(tmp_path / "data", 2)
    config = TrainConfig(
        data=str(data), out=str(tmp_path / "a"), epochs=2, batch_size=1, accumulate=1, **TINY
    )
    train(dataclasses.replace(config, max_steps=1))
    train(dataclasses.replace(config, out=str(tmp_path / "b"), seed=5))
    b_files = {name: (tmp_path / "b" / name).read_bytes() for name in ("last.pt", "metrics.jsonl")}
    from_a = dataclasses.replace(config, out=str(tmp_path / "b"), resume=str(tmp_path / "a" / "last.pt"))
    with pytest.raises(
        ValueError, match=r"holds a run \(last.pt.*whose last.pt is not the --resume checkpoint .*a/last.pt"
    ):
        train(from_a)
    for overwrite in (False, True):  # another file of the run in --out: its last.pt is what continues
        with pytest.raises(
            ValueError, match=r"continues from its training checkpoint, pass --resume .*a/last.pt"
        ):
            train(
                dataclasses.replace(config, resume=str(tmp_path / "a" / "config.json"), overwrite=overwrite)
            )
    # A checkpoint kept beside the run (to roll back to) resumes with --overwrite, as from anywhere else.
    shutil.copy(tmp_path / "a" / "last.pt", tmp_path / "a" / "step1.pt")
    assert (
        out_problem(dataclasses.replace(config, resume=str(tmp_path / "a" / "step1.pt"), overwrite=True))
        is None
    )
    assert b_files == {name: (tmp_path / "b" / name).read_bytes() for name in b_files}
    with pytest.raises(ValueError, match="--resume .*lats.pt' does not exist"):
        train(dataclasses.replace(config, resume=str(tmp_path / "a" / "lats.pt")))

    stale = tmp_path / "b" / leftover_name("last.pt")  # what a kill during a checkpoint write leaves
    stale.write_bytes(b"half a checkpoint")
    (tmp_path / "b" / "notes.txt").write_text("mine")
    train(dataclasses.replace(from_a, overwrite=True, random_vgg=False))  # random_vgg: the checkpoint's
    assert not stale.exists() and (tmp_path / "b" / "notes.txt").read_text() == "mine"
    state = load_checkpoint(tmp_path / "b" / "last.pt")
    assert (
        state["step"] == 4 and state["config"]["seed"] == TrainConfig.seed and state["config"]["random_vgg"]
    )
    assert len((tmp_path / "b" / "metrics.jsonl").read_text().splitlines()) == 2  # a's 2 epochs, none of b's

    assert not any(k.startswith("vgg_encoder.") for k in load_file(tmp_path / "b" / "last.safetensors"))
    init = dataclasses.replace(config, out=str(tmp_path / "c"), random_vgg=False,
                               init_weights=str(tmp_path / "b" / "last.safetensors"))  # fmt: skip
    with pytest.raises(ValueError, match="no VGG19 weights"):
        train(init)
    # Its last.pt holds the random VGG19 under the official key names: still not the ImageNet one.
    init = dataclasses.replace(init, init_weights=str(tmp_path / "b" / "last.pt"))
    with pytest.raises(
        ValueError, match=r"no VGG19 weights \(--init-weights .*last.pt' is a --random-vgg run's"
    ):
        train(init)
    # Another seed: a VGG19 equal to b's would be loaded, not drawn alike.
    trainer = Trainer(dataclasses.replace(init, random_vgg=True, seed=7), 0, 1, torch.device("cpu"))
    assert trainer.cfg.random_vgg  # recorded as it is: its own exports carry no VGG keys either
    b = load_checkpoint(tmp_path / "b" / "last.pt")["model"]
    assert torch.equal(trainer.model.encoder.pos_embed, b["encoder.pos_embed"])
    assert not torch.equal(trainer.model.vgg_encoder.features_0.weight, b["vgg_encoder.features_0.weight"])
    # Loaded through the weights API, as a user would: all 32 VGG19 tensors are there, and still random.
    model = StylizingViT("tiny", train=True, input_size=32, encoder_depth=2)
    load_state_dict(model, tmp_path / "b" / "last.pt")
    assert torch.equal(model.vgg_encoder.features_0.weight, b["vgg_encoder.features_0.weight"])
    assert not model.vgg_encoder.loaded
    x = torch.rand(2, 3, 32, 32)
    with pytest.warns(UserWarning, match="VGG19 of this train=True model is randomly initialized"):
        model(x)
    load_state_dict(model, b)  # the same tensors, not said to be random
    assert model.vgg_encoder.loaded
    with pytest.raises(WeightsError, match="a --random-vgg training run's checkpoint: its VGG19 is random"):
        load_vgg_weights(model, tmp_path / "b" / "last.pt")
    with pytest.raises(WeightsError, match="--vgg-weights: the weights are a --random-vgg training run.s"):
        train(dataclasses.replace(init, init_weights=None, vgg_weights=str(tmp_path / "b" / "last.pt")))


def test_which_checkpoints_hold_a_random_vgg():
    """Before random_vgg was recorded, a run without --vgg-weights went on with a random VGG19 (after a
    warning), and one from --init-weights cannot be told apart: neither counts as real."""
    ckpt = {"format": FORMAT, "model": {}}
    assert has_random_vgg({**ckpt, "config": {"random_vgg": True}})
    assert not has_random_vgg({**ckpt, "config": {"random_vgg": False}})
    assert has_random_vgg({**ckpt, "config": {"vgg_weights": None, "init_weights": "official.safetensors"}})
    assert not has_random_vgg({**ckpt, "config": {"vgg_weights": "vgg19.pth", "random_vgg": True}})
    assert not has_random_vgg({"model": {}, "config": {"random_vgg": True}})  # not our checkpoint
    assert not has_random_vgg({"encoder.pos_embed": torch.zeros(1)})


def test_a_step_averages_over_its_images_not_its_micro_batches(tmp_path, monkeypatch):
    """The weight of each micro-batch's mean loss is its share of the step's readable images: a short last
    micro-batch counts less, an all-corrupt one counts nothing and takes nothing from the others."""

    def step_weights(data, batch_size, accumulate):
        trainer = Trainer(TrainConfig(data=str(data), out=str(tmp_path / "out"), epochs=1, batch_size=batch_size,
                                      accumulate=accumulate, max_steps=1, overwrite=True, **TINY), 0, 1,
                          torch.device("cpu"))  # fmt: skip
        seen, micro_step = [], trainer._micro_step

        def recording(x, scale):
            seen.append((x.shape[0], scale))
            return micro_step(x, scale)

        monkeypatch.setattr(trainer, "_micro_step", recording)
        trainer.fit()
        return seen

    assert step_weights(write_images(tmp_path / "three", 3), 2, 2) == [(2, 2 / 3), (1, 1 / 3)]
    data = write_images(tmp_path / "corrupt", 2)
    (data / "2.png").write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        seen = step_weights(data, 1, 3)
    assert sorted(seen) == [(0, 0.0), (1, 0.5), (1, 0.5)]


def test_a_step_without_a_readable_image_changes_nothing(tmp_path):
    """No clip, no AdamW step (no momentum, no weight decay, no step count) where no rank had an image;
    the step still counts."""
    data = write_images(tmp_path / "data", 3)
    for i in (1, 2):
        (data / f"{i}.png").write_bytes(b"not an image")
    trainer = Trainer(TrainConfig(data=str(data), out=str(tmp_path / "out"), epochs=1, batch_size=1, accumulate=1,
                                  **TINY), 0, 1, torch.device("cpu"))  # fmt: skip
    snapshots = [[p.detach().clone() for p in trainer.params]]
    empty = []

    def on_step(info):
        snapshots.append([p.detach().clone() for p in trainer.params])
        empty.append(math.isnan(info["loss"]))

    with pytest.warns(UserWarning, match="skipping unreadable image"):
        trainer.fit(on_step)
    assert trainer.step == 3 and sorted(empty) == [False, True, True]
    for before, after, skipped in zip(snapshots, snapshots[1:], empty):
        assert all(torch.equal(a, b) for a, b in zip(before, after)) == skipped
    assert {int(s["step"]) for s in trainer.optimizer.state.values()} == {1}


def test_skipped_images_survive_a_resume(tmp_path):
    """The corrupt files found before a checkpoint are in it: a resumed run skips and counts them (a
    checkpoint without them, of an earlier version, still resumes)."""
    data = write_images(tmp_path / "data", 4)
    first = micro_batches(4, 1, 0, TrainConfig.seed)[0][0]
    (data / f"{first}.png").write_bytes(b"not an image")  # read by step 1
    config = TrainConfig(data=str(data), out=str(tmp_path / "out"), epochs=1, batch_size=1, accumulate=1,
                         max_steps=1, **TINY)  # fmt: skip
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        train(config)
    state = load_checkpoint(tmp_path / "out" / "last.pt")
    assert state["train_unreadable"].nonzero().tolist() == [[first]] and state["val_unreadable"] is None
    train(dataclasses.replace(config, resume=str(tmp_path / "out" / "last.pt"), max_steps=None))
    assert '"skipped_images": 1' in (tmp_path / "out" / "metrics.jsonl").read_text()

    save_checkpoint({k: v for k, v in state.items() if not k.endswith("_unreadable")}, tmp_path / "old.pt")
    train(
        dataclasses.replace(config, out=str(tmp_path / "b"), resume=str(tmp_path / "old.pt"), max_steps=None)
    )
    assert '"skipped_images": 0' in (tmp_path / "b" / "metrics.jsonl").read_text()  # found before: unknown


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_loader_workers_report_the_unreadable_files_they_find(tmp_path):
    """A corrupt file found by a DataLoader worker process reaches the trainer (shared memory): counted
    in metrics.jsonl and flagged in the checkpoint, as with --workers 0."""
    data = write_images(tmp_path / "data", 4)
    first = micro_batches(4, 1, 0, TrainConfig.seed)[0][0]
    (data / f"{first}.png").write_bytes(b"not an image")
    train(TrainConfig(data=str(data), out=str(tmp_path / "out"), epochs=1, batch_size=1, accumulate=1,
                      **{**TINY, "workers": 2}))  # fmt: skip
    assert '"skipped_images": 1' in (tmp_path / "out" / "metrics.jsonl").read_text()
    assert load_checkpoint(tmp_path / "out" / "last.pt")["train_unreadable"].nonzero().tolist() == [[first]]


def test_a_dataset_of_unreadable_files_resumed_mid_epoch_stops_at_that_epochs_end(tmp_path):
    (tmp_path / "junk").mkdir()
    for i in range(3):
        (tmp_path / "junk" / f"{i}.png").write_bytes(b"not an image")
    config = TrainConfig(data=str(tmp_path / "junk"), out=str(tmp_path / "out"), epochs=3, batch_size=1,
                         accumulate=1, max_steps=1, **TINY)  # fmt: skip
    with pytest.warns(UserWarning):
        train(config)  # one file of three seen: no verdict yet
    resumed = dataclasses.replace(config, resume=str(tmp_path / "out" / "last.pt"), max_steps=None)
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="every image under --data"):
        train(resumed)
    assert load_checkpoint(tmp_path / "out" / "last.pt")["epoch"] == 0


def test_a_dataset_of_unreadable_files_stops_the_run(tmp_path):
    (tmp_path / "junk").mkdir()
    for name in ("a.png", "b.jpg"):
        (tmp_path / "junk" / name).write_bytes(b"not an image")
    config = TrainConfig(
        data=str(tmp_path / "junk"), out=str(tmp_path / "out"), epochs=3, batch_size=1, **TINY
    )
    with (
        pytest.warns(UserWarning),
        pytest.raises(ValueError, match=r"every image under --data .*junk.* \(2 files"),
    ):
        train(config)
    assert not (tmp_path / "out" / "last.pt").exists()


def test_an_unreadable_val_data_keeps_the_epochs_training_and_resume_validates_it(tmp_path):
    """The epoch's training is checkpointed before the error (which says where); --resume once the folder
    is readable validates that epoch first (even at --max-steps) and reproduces the uninterrupted run."""
    data, val = write_images(tmp_path / "data", 2), write_images(tmp_path / "val", 1)
    config = TrainConfig(data=str(data), out=str(tmp_path / "full"), val_data=str(val), epochs=2, batch_size=1,
                         accumulate=1, **TINY)  # fmt: skip
    full_losses, part_losses = [], []
    full = train(config, on_step=lambda i: full_losses.append(i["loss"]))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "0.png").write_bytes(b"not an image")
    part = dataclasses.replace(config, out=str(tmp_path / "part"), val_data=str(tmp_path / "bad"))
    last = tmp_path / "part" / "last.pt"
    with (
        pytest.warns(UserWarning, match="skipping unreadable image"),
        pytest.raises(ValueError, match=rf"every image under --val-data .*bad.*\. Epoch 1's training is saved "
                      rf"in {re.escape(repr(str(last)))}: --resume it"),
    ):  # fmt: skip
        train(part, on_step=lambda i: part_losses.append(i["loss"]))
    state = load_checkpoint(last)
    assert (state["epoch"], state["batch"], state["step"], state["val_unreadable"]) == (0, 2, 2, None)
    # The same position (the epoch's end) written by 2 processes resumes with 1: not a mid-epoch one.
    save_checkpoint({**state, "world_size": 2, "batch": 1}, tmp_path / "two.pt")
    with pytest.warns(UserWarning, match="the global batch changes"):
        moved = Trainer(dataclasses.replace(part, out=str(tmp_path / "new"), resume=str(tmp_path / "two.pt")), 0,
                        1, torch.device("cpu"))  # fmt: skip
    assert moved.batch == 2
    assert (
        not (tmp_path / "part" / "metrics.jsonl").exists()
        and (tmp_path / "part" / "last.safetensors").exists()
    )
    # Fixed in place: --val-data (left out) is the run's folder, whose flags the checkpoint left out.
    (tmp_path / "bad" / "0.png").write_bytes((val / "0.png").read_bytes())
    resume = dataclasses.replace(part, resume=str(last), val_data=None)
    train(dataclasses.replace(resume, max_steps=2), on_step=lambda i: part_losses.append(i["loss"]))
    assert load_checkpoint(last)["epoch"] == 1  # validated and ended, no step taken
    resumed = train(resume, on_step=lambda i: part_losses.append(i["loss"]))
    assert part_losses == full_losses and len(full_losses) == 4
    for (key, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), key
    metrics = [(tmp_path / out / "metrics.jsonl").read_text() for out in ("full", "part")]
    assert metrics[0] == metrics[1] and metrics[0].count("val_loss") == 2


def test_a_checkpoint_holds_the_training_gpus_rng_state_only(monkeypatch):
    """One CUDA state, the training device's, restored to the training device: a list of every visible
    GPU's could not be restored where fewer are visible (torch.cuda.set_rng_state_all raises there).
    Earlier checkpoints' lists give the state of the device's index where there is one, else the first.
    (CUDA calls stubbed: no GPU here.)"""
    restored = []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: torch.tensor([device.index]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: restored.append((s.item(), device)))
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: pytest.fail("every GPU's state read"))
    gpu1 = torch.device("cuda:1")
    state = rng_state(gpu1)
    assert [s.item() for s in state["cuda"]] == [1] and rng_state(torch.device("cpu"))["cuda"] == []
    set_rng_state(state, torch.device("cuda:0"))  # resumed on another GPU, or with fewer visible
    set_rng_state({**state, "cuda": [torch.tensor([7]), torch.tensor([8])]}, gpu1)  # earlier format
    set_rng_state({**state, "cuda": [torch.tensor([7]), torch.tensor([8])]}, torch.device("cuda:5"))
    set_rng_state({**state, "cuda": [torch.tensor([7]), torch.tensor([8])]}, torch.device("cuda:2"))
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)  # a device without index: the current one
    set_rng_state({**state, "cuda": [torch.tensor([7]), torch.tensor([8])]}, torch.device("cuda"))
    set_rng_state(state, torch.device("cpu"))
    assert restored == [(1, torch.device("cuda:0")), (8, gpu1), (7, torch.device("cuda:5")),
                        (7, torch.device("cuda:2")), (8, torch.device("cuda"))]  # fmt: skip


def test_a_file_that_is_no_checkpoint_is_refused_by_name(tmp_path):
    with pytest.raises(FileNotFoundError):  # not a ValueError: the file is not there to be judged
        load_checkpoint(tmp_path / "gone.pt")
    for content in (b"PK\x03\x04 garbage", b"\x89PNG not a checkpoint", b"x = 1\n"):
        (tmp_path / "x.pt").write_bytes(content)
        with pytest.raises(
            ValueError, match=r"x.pt' is not a fastvit_style training checkpoint.*torch.load fails"
        ) as refused:
            load_checkpoint(tmp_path / "x.pt")
        assert "weights_only" not in str(refused.value)  # torch's advice to unpickle the file's code


def test_a_checkpoint_with_other_contents_is_refused_by_name(tmp_path):
    """A last.pt in our format but without a key every version wrote, or with a config this version cannot
    use (a later version's field, a missing one, a bad value): a ValueError naming it, before any write."""
    data = write_images(tmp_path / "data", 1)
    config = TrainConfig(data=str(data), out=str(tmp_path / "out"), batch_size=1, max_steps=1, **TINY)
    train(config)
    state = load_checkpoint(tmp_path / "out" / "last.pt")
    saved = state["config"]
    for name, changed, match in [
        ("noopt.pt", {k: v for k, v in state.items() if k != "optimizer"}, "in the format .* but has no 'optimizer'"),
        ("later.pt", {**state, "config": {**saved, "colour": 1}}, "unexpected keyword argument 'colour'"),
        ("nodata.pt", {**state, "config": {k: v for k, v in saved.items() if k != "data"}}, "argument: 'data'"),
        ("badval.pt", {**state, "config": {**saved, "epochs": 0}}, "--epochs must be an integer >= 1"),
        ("notdict.pt", {**state, "config": [1]}, "cannot use"),
    ]:  # fmt: skip
        save_checkpoint(changed, tmp_path / name)
        resume = dataclasses.replace(config, out=str(tmp_path / "new"), resume=str(tmp_path / name))
        with pytest.raises(ValueError, match=f"{name}.*{match}"):
            Trainer(resume, 0, 1, torch.device("cpu"))
        assert not (tmp_path / "new").exists()


def test_resuming_on_a_dataset_of_another_size_warns(tmp_path):
    data = write_images(tmp_path / "data", 2)
    config = TrainConfig(data=str(data), out=str(tmp_path / "out"), epochs=2, batch_size=1, accumulate=1,
                         max_steps=1, **TINY)  # fmt: skip
    train(config)
    write_images(tmp_path / "data", 3)
    with pytest.warns(UserWarning, match="trained on 2 images, --data .* now holds 3"):
        train(dataclasses.replace(config, resume=str(tmp_path / "out" / "last.pt"), max_steps=2))


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_resuming_with_other_val_images_warns_and_drops_the_runs_flags(tmp_path):
    """--val-data naming the run's folder moved resumes silently; naming other images, as many, warns
    (their losses do not compare with the run's best) and the run's corrupt-file flags stay off them."""
    data, val = write_images(tmp_path / "data", 2), write_images(tmp_path / "val", 2)
    (val / "0.png").write_bytes(b"not an image")
    config = TrainConfig(data=str(data), val_data=str(val), out=str(tmp_path / "out"), epochs=3, batch_size=1,
                         accumulate=1, max_steps=2, **TINY)  # fmt: skip
    train(config)
    last = str(tmp_path / "out" / "last.pt")
    val.rename(tmp_path / "moved")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        train(dataclasses.replace(config, val_data=str(tmp_path / "moved"), resume=last, max_steps=4))
    other = write_images(tmp_path / "other", 2)
    (other / "0.png").rename(other / "a.png")
    said = (
        r"holds other images \(2 files\) than the run validated on \(2 under .*moved.*\): their losses do not"
    )
    with pytest.warns(UserWarning, match=rf"--val-data .*other.* {said} compare .* best validation"):
        train(dataclasses.replace(config, val_data=str(other), resume=last, max_steps=None))
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_images"] for m in lines] == [1, 1, 0]


def test_other_val_images_after_a_resume_that_stopped_validating_still_warn(tmp_path):
    """A run resumed with --val-data '' keeps what it validated on (and its best) in its checkpoints: a
    later --val-data is compared with those images, not taken for the run's own."""
    data, val, other = (
        write_images(tmp_path / name, n) for name, n in (("data", 2), ("val", 2), ("other", 3))
    )
    config = TrainConfig(data=str(data), val_data=str(val), out=str(tmp_path / "out"), epochs=3, batch_size=1,
                         accumulate=1, max_steps=2, **TINY)  # fmt: skip
    train(config)
    last = str(tmp_path / "out" / "last.pt")
    train(dataclasses.replace(config, val_data="", resume=last, max_steps=4))
    said = r"holds other images \(3 files\) than the run validated on \(2 under .*val'\)"
    with pytest.warns(UserWarning, match=rf"--val-data .*other.* {said}: their losses do not compare"):
        train(dataclasses.replace(config, val_data=str(other), resume=last, max_steps=None))


@pytest.mark.filterwarnings("ignore:skipping unreadable image")
def test_resuming_on_other_training_images_as_many_warns_and_drops_the_runs_flags(tmp_path):
    data = write_images(tmp_path / "data", 2)
    (data / "0.png").write_bytes(b"not an image")
    config = TrainConfig(data=str(data), out=str(tmp_path / "out"), epochs=2, batch_size=1, accumulate=1,
                         max_steps=2, **TINY)  # fmt: skip
    train(config)
    other = write_images(tmp_path / "other", 2)
    (other / "0.png").rename(other / "a.png")
    with pytest.warns(
        UserWarning, match=r"--data .*other.* holds other images than .* trained on \(as many, 2\)"
    ):
        train(
            dataclasses.replace(
                config, data=str(other), resume=str(tmp_path / "out" / "last.pt"), max_steps=None
            )
        )
    lines = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [m["skipped_images"] for m in lines] == [1, 0]


def test_every_step_clips_the_gradient_norm_before_the_optimizer_step(tmp_path, monkeypatch):
    """The update sees gradients of total norm clip_norm at most (shared doc 3.4: clip 1.0 before every
    step; a small clip_norm here, which the tiny model's gradients exceed)."""
    trainer = Trainer(TrainConfig(data=str(write_images(tmp_path / "data", 4)), out=str(tmp_path / "out"), epochs=1,
                                  batch_size=2, accumulate=1, clip_norm=1e-3, **TINY), 0, 1, torch.device("cpu"))  # fmt: skip
    norms, step = [], trainer.optimizer.step

    def recording(*args, **kwargs):
        norms.append(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in trainer.params])).item())
        return step(*args, **kwargs)

    monkeypatch.setattr(trainer.optimizer, "step", recording)
    trainer.fit()
    assert len(norms) == 2 and norms == pytest.approx([1e-3] * 2, rel=1e-4), norms


@pytest.mark.parametrize("first", [2.0, math.nan, math.inf])
def test_best_safetensors_holds_the_epoch_of_lowest_validation_loss(tmp_path, monkeypatch, first):
    """A NaN or infinite validation loss is never the best (as in the official loop, which starts from
    inf): taken as the first best, a NaN would stop every later epoch from counting as an improvement."""
    data = write_images(tmp_path / "data", 1)
    config = TrainConfig(data=str(data), val_data=str(data), out=str(tmp_path / "out"), epochs=3, batch_size=1,
                         accumulate=1, **TINY)  # fmt: skip
    losses, seen = iter([first, 1.0, 3.0]), []

    def scripted(self):  # the weights each epoch's validation saw, and the loss it reports
        seen.append({k: v.clone() for k, v in self.model.state_dict().items() if not k.startswith("vgg_")})
        return {"val_loss": next(losses), "val_psnr": 0.0}

    monkeypatch.setattr(Trainer, "validate", scripted)
    train(config)
    best = load_file(tmp_path / "out" / "best.safetensors")
    assert set(best) == set(seen[1]) and all(torch.equal(best[k], v) for k, v in seen[1].items())
    assert not torch.equal(seen[1]["encoder.pos_embed"], seen[2]["encoder.pos_embed"])  # the epochs differ
    assert load_checkpoint(tmp_path / "out" / "last.pt")["best_val"] == 1.0


def test_a_resumed_nan_best_is_no_best(tmp_path, monkeypatch):
    """A last.pt whose best validation loss is NaN (earlier versions took a NaN loss as the first best,
    and exported that epoch as best.safetensors): the resumed run's next validated epoch is the best, as
    no loss beats a NaN."""
    data = write_images(tmp_path / "data", 1)
    out = tmp_path / "out"
    config = TrainConfig(data=str(data), val_data=str(data), out=str(out), epochs=3, batch_size=1, accumulate=1,
                         max_steps=1, **TINY)  # fmt: skip
    losses = iter([2.0, 1.0, 3.0])
    monkeypatch.setattr(Trainer, "validate", lambda self: {"val_loss": next(losses), "val_psnr": 0.0})
    train(config)
    state = load_checkpoint(out / "last.pt")
    save_checkpoint({**state, "best_val": math.nan}, out / "last.pt")  # as such a version wrote it
    train(dataclasses.replace(config, resume=str(out / "last.pt"), max_steps=2))
    assert load_checkpoint(out / "last.pt")["best_val"] == 1.0
    best, last = (load_file(out / f"{name}.safetensors") for name in ("best", "last"))
    assert all(torch.equal(best[k], v) for k, v in last.items())


@pytest.mark.parametrize("where", ["another_out", "rollback"])
def test_a_resume_without_the_runs_best_safetensors_tracks_the_best_afresh(tmp_path, monkeypatch, where):
    """Resumed into another --out, or rolled back with --overwrite from a checkpoint kept beside the run,
    --out holds no best.safetensors of the best validation loss the checkpoint carries: the next
    validated epoch writes one, although it does not beat that loss."""
    data = write_images(tmp_path / "data", 1)
    config = TrainConfig(data=str(data), val_data=str(data), out=str(tmp_path / "a"), epochs=3, batch_size=1,
                         accumulate=1, max_steps=2, **TINY)  # fmt: skip
    losses = iter([2.0, 1.0, 3.0])
    monkeypatch.setattr(Trainer, "validate", lambda self: {"val_loss": next(losses), "val_psnr": 0.0})
    train(config)
    kept = tmp_path / "a" / "epoch2.pt"
    kept.write_bytes((tmp_path / "a" / "last.pt").read_bytes())
    out = tmp_path / ("b" if where == "another_out" else "a")
    with pytest.warns(UserWarning, match=r"holds no best.safetensors of the resumed run .* tracked afresh"):
        train(dataclasses.replace(config, out=str(out), resume=str(kept), max_steps=None,
                                  overwrite=where == "rollback"))  # fmt: skip
    best, last = (load_file(out / f"{name}.safetensors") for name in ("best", "last"))
    assert all(torch.equal(best[k], v) for k, v in last.items())  # epoch 2's, the only one validated here
    assert load_checkpoint(out / "last.pt")["best_val"] == 3.0


def test_a_backend_the_device_cannot_run_fails_before_out_is_touched(tmp_path, monkeypatch):
    """--backend triton on the CPU without the interpreter: refused before --overwrite removes anything."""
    from fastvit_style.kernels import _common

    data = write_images(tmp_path / "data", 1)
    config = TrainConfig(data=str(data), out=str(tmp_path / "a"), epochs=1, batch_size=1, **TINY)
    train(config)
    files = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    monkeypatch.setattr(_common, "INTERPRET", False)
    with pytest.raises(
        ValueError, match="backend='triton' cannot run here: CPU tensors .* outside interpreter"
    ):
        train(dataclasses.replace(config, backend="triton", overwrite=True))
    assert files == {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}


def test_a_run_whose_weights_diverge_stops_before_saving_them(tmp_path):
    """NaN weights (a diverged run: AdamW never recovers) are never checkpointed, exported or validated:
    the run stops with an error, and last.pt keeps the last finite weights."""
    data = write_images(tmp_path / "data", 4)
    out = tmp_path / "out"
    config = TrainConfig(data=str(data), val_data=str(data), out=str(out), epochs=1, batch_size=1, accumulate=1,
                         checkpoint_every=1, **TINY)  # fmt: skip
    trainer = Trainer(config, 0, 1, torch.device("cpu"))

    def diverge_after_step_1(info):
        if info["step"] == 1:
            with torch.no_grad():
                trainer.params[0].view(-1)[0] = math.nan

    with pytest.raises(ValueError, match="training diverged: the weights hold NaN or inf after step 2"):
        trainer.fit(diverge_after_step_1)
    state = load_checkpoint(out / "last.pt")
    assert state["step"] == 1 and all(v.isfinite().all() for v in state["model"].values())
    assert all(v.isfinite().all() for v in load_file(out / "last.safetensors").values())
    assert not (out / "best.safetensors").exists() and not (out / "metrics.jsonl").exists()
    # At an epoch's end: before validation, whose NaN loss would become the best one. Nothing saved, so
    # the run --overwrite would replace stays whole.
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    trainer = Trainer(
        dataclasses.replace(config, overwrite=True, checkpoint_every=0), 0, 1, torch.device("cpu")
    )
    with pytest.raises(ValueError, match="after step 4"):
        trainer.fit(diverge_after_step_1)
    assert files == {p.name: p.read_bytes() for p in out.iterdir()}


def test_every_checkpoint_exports_last_safetensors(tmp_path):
    """The periodic mid-epoch checkpoints, not only the epoch's end, write last.safetensors beside last.pt
    (the weights of a long first epoch that is killed)."""
    data = write_images(tmp_path / "data", 3)
    config = TrainConfig(data=str(data), out=str(tmp_path / "a"), epochs=1, batch_size=1, accumulate=1,
                         checkpoint_every=1, **TINY)  # fmt: skip
    exported = []

    def on_step(info):
        weights = load_file(tmp_path / "a" / "last.safetensors")
        exported.append(
            all(torch.equal(v, weights[k]) for k, v in trainer.model.state_dict().items() if k in weights)
        )

    trainer = Trainer(config, 0, 1, torch.device("cpu"))
    trainer.fit(on_step)
    assert exported[:2] == [True, True]  # the third step ends the epoch, which exports after it


def test_a_step_weighs_its_loss_terms_by_the_configs_loss_weights(tmp_path):
    """loss_weights, not the official defaults, weigh the terms of the loss a step reports and follows:
    its gradient is the configured weighted sum's."""
    weights = (2.0, 0.0, 0.5, 0.0)
    trainer = Trainer(TrainConfig(data=str(write_images(tmp_path / "data", 2)), out=str(tmp_path / "out"),
                                  loss_weights=weights, **TINY), 0, 1, torch.device("cpu"))  # fmt: skip
    x = torch.stack([trainer.train_set[i] for i in range(2)])
    reported = trainer._micro_step(x, 1.0)
    got = [p.grad.clone() for p in trainer.params]
    trainer.optimizer.zero_grad()
    loss, _ = trainer.model(x)
    sum(w * t for w, t in zip(weights, loss)).backward()
    total, *terms = reported.tolist()
    assert total == pytest.approx(sum(w * t for w, t in zip(weights, terms)), rel=1e-5)
    for g, p in zip(got, trainer.params):
        torch.testing.assert_close(g, p.grad, rtol=1e-4, atol=1e-7)


def test_validation_reports_the_mean_over_its_micro_batches(tmp_path):
    data, val = write_images(tmp_path / "data", 1), write_images(tmp_path / "val", 3)
    # Other weights than the official ones: the validation loss is the configured weighted sum.
    trainer = Trainer(TrainConfig(data=str(data), val_data=str(val), out=str(tmp_path / "out"), batch_size=2,
                                  loss_weights=(2.0, 0.0, 0.5, 0.0), **TINY), 0, 1, torch.device("cpu"))  # fmt: skip
    cfg, totals, psnrs = trainer.cfg, [], []
    with torch.no_grad():
        for batch in ([0, 1], [2]):  # 3 images in micro-batches of 2: each batch counts once
            x = torch.stack([trainer.val_set[i] for i in batch])
            loss, recon = trainer.model(x)
            totals.append(loss.total(cfg.loss_weights).item())
            psnrs.append(psnr(*(denormalize(t, cfg.mean, cfg.std) for t in (x, recon))).item())
    metrics = trainer.validate()
    assert metrics["val_loss"] == pytest.approx(sum(totals) / 2, rel=1e-5)
    assert metrics["val_psnr"] == pytest.approx(sum(psnrs) / 2, rel=1e-5)


class _RunsCode:
    marker = ""

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_a_checkpoint_is_never_unpickled_and_must_be_in_the_format(tmp_path):
    """load_checkpoint reads with weights_only=True: a pickled object is refused, never run; a torch file
    with every key but not in the format (a plain dict, another tool's) is no checkpoint either."""
    _RunsCode.marker = str(tmp_path / "ran")
    torch.save({"format": FORMAT, **{k: 0 for k in CHECKPOINT_KEYS}, "x": _RunsCode()}, tmp_path / "evil.pt")
    with pytest.raises(
        ValueError, match="evil.pt' is not a fastvit_style training checkpoint.*torch.load fails"
    ):
        load_checkpoint(tmp_path / "evil.pt", required=CHECKPOINT_KEYS)
    assert not (tmp_path / "ran").exists()
    torch.save({k: 0 for k in CHECKPOINT_KEYS}, tmp_path / "plain.pt")
    with pytest.raises(ValueError, match=r"plain.pt' is not a fastvit_style training checkpoint \(format"):
        load_checkpoint(tmp_path / "plain.pt", required=CHECKPOINT_KEYS)


def test_a_checkpoint_stores_paths_and_numpy_scalars_plainly(tmp_path):
    """A TrainConfig given pathlib.Paths or numpy numbers (through the Python API) once wrote a last.pt that
    load_checkpoint refused ('Unsupported global: numpy...scalar'): a run that could never be resumed."""
    state = {"config": {"data": tmp_path / "data", "lr": np.float64(1e-3), "epochs": np.int64(3),
                        "flags": [np.bool_(True), (np.float32(0.5), tmp_path)]}}  # fmt: skip
    save_checkpoint(state, tmp_path / "last.pt")
    config = load_checkpoint(tmp_path / "last.pt")["config"]
    assert config == {
        "data": str(tmp_path / "data"),
        "lr": 1e-3,
        "epochs": 3,
        "flags": [True, (0.5, str(tmp_path))],
    }
    assert type(config["lr"]) is float and type(config["epochs"]) is int


def test_a_checkpoint_that_could_not_be_read_back_is_not_written(tmp_path):
    """Any other object is refused when saving, not when resuming: the previous checkpoint stays."""
    save_checkpoint({"step": 1}, tmp_path / "last.pt")
    with pytest.raises(ValueError, match="cannot save the checkpoint .*last.pt.*datetime.date"):
        save_checkpoint({"step": 2, "config": {"when": datetime.date(2024, 1, 1)}}, tmp_path / "last.pt")
    assert load_checkpoint(tmp_path / "last.pt")["step"] == 1
    assert sorted(os.listdir(tmp_path)) == ["last.pt"]


def test_a_run_configured_with_paths_and_numpy_numbers_resumes(tmp_path):
    data = write_images(tmp_path / "data", 2)
    config = dict(data=data, out=tmp_path / "out", batch_size=2, accumulate=1, lr=np.float64(1e-3), **TINY)
    train(TrainConfig(epochs=1, **config))
    trainer = Trainer(
        TrainConfig(epochs=1, resume=tmp_path / "out" / "last.pt", **config), 0, 1, torch.device("cpu")
    )
    assert trainer.step == 1


def test_a_resumed_run_continues_the_random_states_of_its_checkpoint(tmp_path):
    """torch, numpy (its cached Gaussian too) and Python's random draw on from where the checkpoint was
    written, not from the run's seed: through save_checkpoint/load_checkpoint and the Trainer."""
    data = write_images(tmp_path / "data", 2)
    config = TrainConfig(data=str(data), out=str(tmp_path / "out"), epochs=1, batch_size=1, accumulate=1,
                         max_steps=1, **TINY)  # fmt: skip
    train(config)
    torch.manual_seed(11), np.random.seed(12), random.seed(13)
    np.random.standard_normal(), random.gauss(0, 1)  # leave a cached Gaussian in each
    state = {**load_checkpoint(tmp_path / "out" / "last.pt"), "rng": rng_state()}

    def draws():
        return (
            torch.rand(3).tolist(),
            np.random.standard_normal(3).tolist(),
            random.gauss(0, 1),
            random.random(),
        )

    expected = draws()
    save_checkpoint(state, tmp_path / "other.pt")
    torch.manual_seed(0), np.random.seed(0), random.seed(0)
    Trainer(dataclasses.replace(config, out=str(tmp_path / "new"), resume=str(tmp_path / "other.pt")), 0, 1,
            torch.device("cpu"))  # fmt: skip
    assert draws() == expected


@pytest.mark.parametrize(
    "field, value", [("lr", 0.5), ("seed", 5), ("weight_decay", 0.0), ("clip_norm", 2.0), ("batch_size", 4)]
)
def test_resume_refuses_a_change_to_the_runs_math(field, value):
    """The fields that decide what the run computes come from its checkpoint: asked for otherwise they
    would not take effect, so they are refused by name (command line: given; API: off their default)."""
    saved = dataclasses.asdict(TrainConfig(data="d", out="o", **TINY))
    asked = TrainConfig(data="d", out="o", resume="last.pt", **{**TINY, field: value})
    with pytest.raises(ValueError, match=rf"these differ: {field}={value!r} \(checkpoint: "):
        resumed_config(asked, saved)
    with pytest.raises(ValueError, match=rf"these differ: {field}="):
        resumed_config(asked, saved, given={field})
    assert getattr(resumed_config(asked, saved, given=set()), field) == saved[field]


@pytest.mark.parametrize("bar_seconds, on_step, reads", [(1e9, False, 2), (0.0, False, 4), (1e9, True, 4)])
def test_losses_reach_the_host_only_when_read(tmp_path, monkeypatch, bar_seconds, on_step, reads):
    """Each read of a step's losses waits for the GPU (README: host syncs): without on_step only the
    progress bar reads them: at the first step, then at most every BAR_SECONDS, and at the epoch's end;
    on_step gets every step's."""
    calls, tolist = [], torch.Tensor.tolist

    def counting(t):
        if t.shape == (5,):  # (total, identity, consistency, anatomical, style)
            calls.append(1)
        return tolist(t)

    monkeypatch.setattr(train_module, "BAR_SECONDS", bar_seconds)
    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    config = TrainConfig(data=str(write_images(tmp_path / "data", 4)), out=str(tmp_path / "out"), epochs=1,
                         batch_size=1, accumulate=1, **TINY)  # fmt: skip
    steps = []
    train(config, on_step=steps.append if on_step else None)
    assert len(calls) == reads
    assert [s["step"] for s in steps] == ([1, 2, 3, 4] if on_step else [])
    assert all(math.isfinite(s["loss"]) for s in steps)
