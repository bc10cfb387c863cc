"""StyleAugment: the official per-batch scheme (shared doc 4.1) and the fixed-reference variant."""

import importlib.util
import os

import pytest
import torch
from helpers import images, randomize_

from fastvit_style import StylizingViT
from fastvit_style.augment import StyleAugment

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def stylizer(one_thread):
    torch.manual_seed(0)
    model = StylizingViT("tiny", input_size=32, encoder_depth=2)
    return randomize_(model).eval().requires_grad_(False)


# (0.95, 6): n = int(p * B), rounded down (6.65 -> 6)
@pytest.mark.parametrize("p, expected_n", [(0.33, 2), (0.1, 1), (1.0, 7), (0.95, 6)])
def test_replaces_n_rows_by_the_stylization_of_the_rolled_subset(stylizer, p, expected_n):
    x = images(7, 32)
    x_before = x.clone()
    out, idx = StyleAugment(stylizer, p=p, generator=torch.Generator().manual_seed(3))(x)
    assert out.shape == x.shape and out.dtype == x.dtype and out.data_ptr() != x.data_ptr()
    assert torch.equal(x, x_before)  # the input is not modified
    assert idx.shape == (expected_n,) and len(set(idx.tolist())) == expected_n
    assert torch.equal(idx, torch.randperm(7, generator=torch.Generator().manual_seed(3))[:expected_n])
    kept = torch.ones(7, dtype=torch.bool)
    kept[idx] = False
    assert torch.equal(out[kept], x[kept])
    x_sel = x[idx]
    torch.testing.assert_close(out[idx], stylizer(x_sel, x_sel.roll(-1, 0)), rtol=1e-5, atol=1e-5)


def test_any_callable_gets_the_rolled_subset_as_its_style(stylizer):
    """Only a StylizingViT is given None (its exact shortcut for the roll); another callable gets the
    roll itself, as officially."""
    x = images(5, 32)
    seen = []

    def other(content, style):
        seen.append(style)
        return stylizer(content, style)

    out, idx = StyleAugment(other, p=0.6, generator=torch.Generator().manual_seed(1))(x)
    assert torch.equal(seen[0], x[idx].roll(-1, 0))
    expected, _ = StyleAugment(stylizer, p=0.6, generator=torch.Generator().manual_seed(1))(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_a_wrapped_stylizer_keeps_its_roll_shortcut(stylizer, monkeypatch):
    """torch.compile (or DDP) around a StylizingViT: still given None, its exact shortcut."""
    from fastvit_style import schedule

    seen, encode = [], schedule.encode
    monkeypatch.setattr(
        schedule,
        "encode",
        lambda enc, x, x_style, *a, **k: seen.append(x_style) or encode(enc, x, x_style, *a, **k),
    )
    StyleAugment(torch.compile(stylizer, backend="eager"), p=0.5)(images(4, 32))
    assert seen == [None]


class _RecordingDataParallel(torch.nn.DataParallel):
    def forward(self, *inputs, **kwargs):
        self.seen = inputs
        return super().forward(*inputs, **kwargs)


def test_a_data_parallel_stylizer_gets_the_whole_subsets_roll(stylizer):
    """DataParallel splits its inputs over its GPUs and hands each replica a style of None, which would
    roll each slice alone (on 2 GPUs, image 1 of 4 styled by image 0, not 2): it gets the roll itself."""
    x = images(6, 32, seed=4)
    dp = _RecordingDataParallel(stylizer)
    out, idx = StyleAugment(dp, p=0.7, generator=torch.Generator().manual_seed(2))(x)
    x_sel = x[idx]
    assert torch.equal(dp.seen[1], x_sel.roll(-1, 0))
    torch.testing.assert_close(out[idx], stylizer(x_sel, x_sel.roll(-1, 0)), rtol=1e-5, atol=1e-5)
    with torch.no_grad():  # what 2 replicas would compute from (x_sel, None): not the official roll
        split = torch.cat([stylizer(part, None) for part in x_sel.chunk(2)])
    assert not torch.allclose(split, out[idx], rtol=1e-3, atol=1e-3)


def test_a_wrapped_stylizer_is_checked_as_a_bare_one(stylizer):
    """DataParallel/DDP hide the model's attributes: a train=True model inside is refused, the
    references and the batch are checked against its config, all before any draw."""
    train = StylizingViT("tiny", train=True, input_size=32, encoder_depth=1)
    with pytest.raises(ValueError, match="train=False"):
        StyleAugment(torch.nn.DataParallel(train))
    with pytest.raises(
        ValueError, match=r"references must have shape \(R, 3, 32, 32\).*got \(2, 3, 16, 16\)"
    ):
        StyleAugment(torch.nn.DataParallel(stylizer), references=torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, 32, 32\).*got \(4, 3, 48, 48\)"):
        StyleAugment(torch.nn.DataParallel(stylizer))(torch.randn(4, 3, 48, 48))


def test_references_mode_draws_styles_from_the_reference_set(stylizer):
    x, refs = images(4, 32, seed=1), images(3, 32, seed=2)
    gen = torch.Generator().manual_seed(5)
    out, idx = StyleAugment(stylizer, p=0.5, references=refs, generator=gen)(x)
    replay = torch.Generator().manual_seed(5)
    expected_idx = torch.randperm(4, generator=replay)[:2]
    pick = torch.randint(3, (2,), generator=replay)
    assert torch.equal(idx, expected_idx)
    torch.testing.assert_close(out[idx], stylizer(x[idx], refs[pick]), rtol=1e-5, atol=1e-5)


def test_references_are_cast_to_the_batch_dtype(stylizer):
    """float64 references (kept at full precision by the caller) with a float32 batch and stylizer."""
    x, refs = images(4, 32, seed=1), images(3, 32, seed=2, dtype=torch.float64)
    out, idx = StyleAugment(stylizer, p=0.5, references=refs, generator=torch.Generator().manual_seed(6))(x)
    replay = torch.Generator().manual_seed(6)
    assert torch.equal(idx, torch.randperm(4, generator=replay)[:2])
    pick = torch.randint(3, (2,), generator=replay)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out[idx], stylizer(x[idx], refs[pick].float()), rtol=1e-5, atol=1e-5)


def test_runs_without_graph_and_in_the_callers_autocast(stylizer):
    # The stylizer is a constant to autograd; the rows it leaves keep x's graph (as the official
    # in-place x[idx] = ... keeps it), so a learnable transform before the augmentation still learns.
    x = images(4, 32).requires_grad_(True)
    out, idx = StyleAugment(stylizer, p=0.5)(x)
    (out * 3).sum().backward()
    expected = torch.full_like(x, 3.0)
    expected[idx] = 0
    assert torch.equal(x.grad, expected) and not any(p.grad is not None for p in stylizer.parameters())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, idx = StyleAugment(stylizer, p=0.5, generator=torch.Generator().manual_seed(0))(x.detach())
    assert out.dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = stylizer(x[idx].detach(), x[idx].detach().roll(-1, 0))
    assert expected.dtype == torch.bfloat16 and torch.equal(out[idx], expected.float())


def test_a_generator_that_is_not_a_cpu_generator_is_refused(stylizer):
    with pytest.raises(TypeError, match="generator must be a CPU torch.Generator"):
        StyleAugment(stylizer, generator=0)


@pytest.mark.parametrize("p", [0, -0.1, 1.5, True, "0.5", None])
def test_bad_p_is_refused(stylizer, p):
    with pytest.raises(ValueError, match=r"p .* must be a number in \(0, 1\]"):
        StyleAugment(stylizer, p=p)


@pytest.mark.parametrize("bad, shown", [(None, "NoneType None"), ("model", "str 'model'")])
def test_a_stylizer_that_cannot_be_called_is_refused_at_construction(bad, shown):
    """It was taken, and the first batch failed with Python's "'NoneType' object is not callable"."""
    with pytest.raises(TypeError, match=rf"stylizer must be a StylizingViT or a callable .*, got {shown}$"):
        StyleAugment(bad)


@pytest.mark.parametrize(
    "p, shown", [(torch.tensor(0.5), r"a torch.float32 tensor of shape \(\)"), ("0.5", "str '0.5'")]
)
def test_a_p_that_is_no_number_is_named_by_its_type(stylizer, p, shown):
    """A 0-d tensor or a string holding a value in (0, 1] was refused as if its value were out of range."""
    with pytest.raises(ValueError, match=rf"must be a number in \(0, 1\], got {shown}$"):
        StyleAugment(stylizer, p=p)


def test_bad_inputs_name_what_the_user_passed(stylizer):
    """The caller's batch and references are checked as given, not the subset drawn from them."""
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, 32, 32\).*got \(4, 3, 48, 48\)"):
        StyleAugment(stylizer)(torch.randn(4, 3, 48, 48))
    with pytest.raises(
        ValueError, match=r"references must have shape \(R, 3, 32, 32\).*got \(2, 3, 16, 16\)"
    ):
        StyleAugment(stylizer, references=torch.randn(2, 3, 16, 16))
    with pytest.raises(ValueError, match="train=False"):
        StyleAugment(StylizingViT("tiny", train=True, input_size=32, encoder_depth=1))
    with pytest.raises(TypeError, match="x must be a torch.Tensor, got list"):
        StyleAugment(stylizer)([torch.randn(3, 32, 32)])
    with pytest.raises(TypeError, match="references must be a torch.Tensor, got list"):
        StyleAugment(stylizer, references=[torch.randn(3, 32, 32)])
    with pytest.raises(
        ValueError, match=r"references must be a non-empty \(R, C, H, W\) batch, got \(0, 3, 32, 32\)"
    ):
        StyleAugment(stylizer, references=torch.randn(0, 3, 32, 32))
    with pytest.raises(ValueError, match="references must be floating-point images normalized.*torch.uint8"):
        StyleAugment(stylizer, references=torch.zeros(2, 3, 32, 32, dtype=torch.uint8))


def test_references_on_the_meta_device_are_refused_at_construction(stylizer):
    """They were taken, and every batch failed with torch's "Cannot copy out of meta tensor; no data!"."""
    with pytest.raises(
        ValueError, match="references must be images with values, got a tensor on the meta device"
    ):
        StyleAugment(stylizer, references=torch.zeros(2, 3, 32, 32, device="meta"))


def _classifier_example():
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.path.join(root, "examples", "train_classifier_with_style_augment.py")
    spec = importlib.util.spec_from_file_location("classifier_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    return example


def test_the_classifier_example_runs(capsys):
    """examples/train_classifier_with_style_augment.py, two steps: its accuracy is a fraction, and each
    step restyled max(1, int(p * batch)) images."""
    example = _classifier_example()
    accuracy = example.main(["--steps", "2", "--batch", "6"])
    assert 0 <= accuracy <= 1
    out = capsys.readouterr().out
    assert "step   2: loss" in out and "1/6 restyled" in out  # int(0.33 * 6) = 1


def test_the_classifier_example_normalizes_as_the_weights_say(tmp_path, monkeypatch):
    """With --weights, the example's normalization is the commands' (apps.common.mean_std): the constants a
    training export records, the dataset an official id names, --dataset over both; not camelyon17wilds's
    whatever the weights."""
    from fastvit_style.configs import NORMALIZATION
    from fastvit_style.weights import save_state_dict

    example = _classifier_example()
    monkeypatch.setattr(example, "create_model", lambda *a, **k: StylizingViT("tiny", encoder_depth=1))
    used = []
    monkeypatch.setattr(example, "normalize", lambda x, mean, std: used.append((mean, std)) or x)
    recorded = ((0.5, 0.4, 0.3), (0.2, 0.2, 0.2))
    mine = save_state_dict(StylizingViT("tiny", input_size=32, encoder_depth=1), tmp_path / "mine.safetensors",
                           normalization=recorded)  # fmt: skip
    for argv, expected in (
        (["--weights", mine], recorded),
        (["--weights", "fitzpatrick17k"], NORMALIZATION["fitzpatrick17k"]),
        (["--weights", mine, "--dataset", "epistr"], NORMALIZATION["epistr"]),
    ):
        used.clear()
        example.main([*argv, "--steps", "1", "--batch", "2"])
        assert used[0] == tuple(expected), argv


def _style_is_the_stylization(content, style):
    """A stylizer a spawned worker can import by name (a lambda cannot be sent to one)."""
    return style


def _augment_in_worker(batch):
    augment, x = batch[0]
    return augment(x)[1]


def test_a_generator_reaches_spawned_workers():
    """spawn/forkserver workers (DataLoader's default on macOS and Windows, Python 3.14's on Linux) get a
    copy of the augmentation through the multiprocessing pickler, which cannot send a torch.Generator
    (pytorch#146828: the worker died with "unable to resize file"): the copy draws as the original."""
    from torch.utils.data import DataLoader

    augment = StyleAugment(_style_is_the_stylization, p=0.5, generator=torch.Generator().manual_seed(4))
    loader = DataLoader(
        [(augment, images(6, 8))], batch_size=1, num_workers=1, collate_fn=_augment_in_worker,
        multiprocessing_context="spawn",
    )  # fmt: skip
    (idx,) = list(loader)
    assert torch.equal(idx, torch.randperm(6, generator=torch.Generator().manual_seed(4))[:3])


def test_a_pickle_holding_the_generators_state_as_bare_bytes_still_loads():
    """Pickles written before the state carried its device hold the CPU state's bytes alone."""
    generator = torch.Generator().manual_seed(4)
    augment = StyleAugment(_style_is_the_stylization, p=0.5, generator=generator)
    old = StyleAugment.__new__(StyleAugment)
    old.__setstate__({**augment.__dict__, "generator": generator.get_state().numpy().tobytes()})
    assert torch.equal(
        old(images(6, 8))[1], torch.randperm(6, generator=torch.Generator().manual_seed(4))[:3]
    )


def test_a_stylizer_that_returns_no_image_per_content_image_is_refused(stylizer):
    """A batch of another size would broadcast into the selected rows (one image copied over all of them);
    a train=True model inside a user's wrapper returns its losses."""
    x = images(8, 32)
    with pytest.raises(
        ValueError, match=r"one image per content image, shape \(4, 3, 32, 32\), got \(1, 3, 32, 32\)"
    ):
        StyleAugment(lambda c, s: stylizer(c[:1], s[:1]), p=0.5)(x)
    with pytest.raises(TypeError, match=r"must return the stylized images.*got a tuple of 2"):
        StyleAugment(lambda c, s: (c, s), p=0.5)(x)
