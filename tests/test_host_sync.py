"""The GPU hot paths never make the host wait for the GPU: a sync empties the GPU's queue, which then
idles while the host launches the next kernels. CUDA only (mark gpu), under torch's sync debug mode,
which raises on an `.item()`, `.tolist()`, `nonzero` or a blocking copy between host and device.
Each path runs once before it is watched: first calls compile kernels and hash weights (a style
bank checks a model's weights once)."""

import contextlib

import pytest
import torch
from helpers import images, randomize_

from fastvit_style import StyleBank, StylizingViT, TTAClassifier
from fastvit_style.augment import StyleAugment
from fastvit_style.devices import to_device_async

pytestmark = pytest.mark.gpu
CFG = {"input_size": 32, "encoder_depth": 2}


@pytest.fixture(autouse=True)
def _hardware_kernels():
    from fastvit_style.kernels import INTERPRET

    if INTERPRET:
        pytest.skip("hardware kernels need TRITON_INTERPRET unset")


@contextlib.contextmanager
def no_host_sync():
    before = torch.cuda.get_sync_debug_mode()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(before)


def watched(fn):
    """fn() once, then again with any host sync raising; the second result."""
    fn()
    with no_host_sync():
        return fn()


def stylizer(**kw):
    return randomize_(StylizingViT("tiny", backend="triton", **CFG, **kw)).cuda().eval().requires_grad_(False)


def test_the_watch_catches_a_blocking_copy():
    """What the paths below no longer do: a copy from pageable host memory waits for the GPU."""
    with pytest.raises(RuntimeError, match="synchroniz"), no_host_sync():
        torch.arange(6).to("cuda")


def test_copies_a_host_tensor_without_a_sync():
    t = torch.arange(6)
    out = watched(lambda: to_device_async(t, "cuda"))
    t.zero_()  # the copy was taken from pinned memory: t may change at once
    assert out.device.type == "cuda" and torch.equal(out.cpu(), torch.arange(6))
    expanded = torch.arange(3).expand(2, 3)  # select_refs' default: stride 0, which pinning must densify
    assert torch.equal(watched(lambda: to_device_async(expanded, "cuda")).cpu(), expanded)
    pinned = torch.arange(6).pin_memory()  # pin_memory() would return it as it is
    torch.cuda._sleep(10**8)  # keeps the queue busy: a copy still reading `pinned` would see the change
    out = to_device_async(pinned, "cuda")
    pinned.zero_()
    assert torch.equal(out.cpu(), torch.arange(6))


@pytest.mark.parametrize("explicit_style", [False, True])
def test_eval_forward(explicit_style):
    model = stylizer()
    x = images(3, 32, seed=1).cuda()
    x_style = images(3, 32, seed=2).cuda() if explicit_style else None
    with torch.no_grad():
        watched(lambda: model(x, x_style))


def test_training_forward_and_backward():
    model = randomize_(StylizingViT("tiny", train=True, backend="triton", **CFG)).cuda()
    x = images(3, 32, seed=1).cuda()

    def step():
        loss, _ = model(x)
        loss.total((70, 1, 7, 10)).backward()

    watched(step)


@pytest.mark.parametrize("with_references", [False, True])
def test_style_augment(with_references):
    references = images(4, 32, seed=3).cuda() if with_references else None
    augment = StyleAugment(
        stylizer(), p=0.5, references=references, generator=torch.Generator().manual_seed(0)
    )
    x = images(6, 32, seed=1).cuda()
    watched(lambda: augment(x))


@pytest.mark.parametrize("k, draws_on", [(3, "cpu"), (3, "cuda"), (None, "cpu")])  # None: every reference
def test_tta_classifier(k, draws_on):
    model = stylizer()
    bank = StyleBank.from_images(model, images(5, 32, seed=3).cuda())
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 4)).cuda()
    generator = torch.Generator(draws_on).manual_seed(0)
    tta = TTAClassifier(classifier, model, bank, k=k, generator=generator).eval()
    x = images(2, 32, seed=1).cuda()
    with torch.no_grad():
        watched(lambda: tta(x))


def test_stylize_with_every_reference():
    model = stylizer()
    bank = StyleBank.from_images(model, images(3, 32, seed=3).cuda())
    x = images(2, 32, seed=1).cuda()
    with torch.no_grad():
        assert watched(lambda: model.stylize(x, bank)).shape == (2, 3, 3, 32, 32)
