"""Train a small classifier with Stylizing ViT augmentation (shared doc 4.1), on CPU in about a minute.

    python examples/train_classifier_with_style_augment.py                     # random stylizer, 64 px
    python examples/train_classifier_with_style_augment.py --backbone tiny --weights tiny.safetensors

Data: two classes of synthetic textures made here with numpy (horizontal vs vertical stripes), each
image with its own random pair of colours: the colours are the "style", the orientation the content.
Each training batch goes through StyleAugment (p=0.33: a third of the images restyled by another
image of the subset) before the classifier. Without --weights the stylizer is a small randomly
initialized model, so the augmentation is noise: this shows the mechanics. With an official checkpoint
(224 px) the restyled images keep their stripes and take another image's colours.
"""

import argparse

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from fastvit_style import StylizingViT, create_model
from fastvit_style.apps.common import mean_std, positive_int
from fastvit_style.augment import StyleAugment
from fastvit_style.configs import NORMALIZATION
from fastvit_style.imageio import normalization, normalize


def textures(n: int, size: int, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """n images (n, 3, size, size) in [0, 1] and labels (n,): 0 horizontal, 1 vertical stripes."""
    labels = rng.integers(0, 2, n)
    coords = np.arange(size) / size
    images = []
    for label in labels:
        freq, phase = rng.uniform(3, 8), rng.uniform(0, 2 * np.pi)
        wave = 0.5 + 0.5 * np.sin(2 * np.pi * freq * coords + phase)
        mask = wave[:, None].repeat(size, 1) if label == 0 else wave[None, :].repeat(size, 0)
        dark, light = rng.uniform(0, 0.5, 3), rng.uniform(0.5, 1, 3)
        img = (
            dark[:, None, None] + (light - dark)[:, None, None] * mask + rng.normal(0, 0.03, (3, size, size))
        )
        images.append(np.clip(img, 0, 1))
    return torch.tensor(np.stack(images), dtype=torch.float32), torch.from_numpy(labels)


class TinyCNN(nn.Sequential):
    def __init__(self, classes: int = 2):
        super().__init__(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 32, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(32, classes),
        )  # fmt: skip


def main(argv=None) -> float:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--weights", default=None, help="official Stylizing ViT weights (then images are 224 px)")
    p.add_argument("--backbone", default="tiny")
    p.add_argument(
        "--dataset",
        default=None,
        choices=sorted(NORMALIZATION),
        help="the weights' data (default: the dataset the weights name or record, as the commands take)",
    )
    p.add_argument("--steps", type=positive_int, default=40)
    p.add_argument("--batch", type=positive_int, default=16)
    p.add_argument("--p", type=float, default=0.33, help="fraction of each batch restyled")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    # The space the stylizer works in: as the commands pick it (a training export records its constants,
    # an official dataset id names its dataset's); camelyon17wilds for the random stylizer.
    if args.weights:
        named = argparse.Namespace(weights=args.weights, dataset=args.dataset, mean=None, std=None)
        mean, std, note = mean_std(named)
        stylizer, size = create_model(args.backbone, weights=args.weights), 224
        if note:
            print(note)
    else:
        stylizer, size = StylizingViT(args.backbone, input_size=64, encoder_depth=2), 64
        mean, std = normalization(args.dataset)
    stylizer.eval().requires_grad_(False)
    augment = StyleAugment(stylizer, p=args.p, generator=torch.Generator().manual_seed(args.seed))

    classifier = TinyCNN()
    # As the official classifier training: AdamW lr 1e-3, weight decay 0.01 on weights only (not on 1-D).
    decay = [q for q in classifier.parameters() if q.dim() > 1]
    no_decay = [q for q in classifier.parameters() if q.dim() <= 1]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0}], lr=1e-3
    )
    x_test, y_test = textures(64, size, rng)
    x_test = normalize(x_test, mean, std)
    for step in range(1, args.steps + 1):
        x, y = textures(args.batch, size, rng)
        x, restyled = augment(normalize(x, mean, std))
        loss = F.cross_entropy(classifier(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % 10 == 0 or step == args.steps:
            with torch.no_grad():
                accuracy = (classifier(x_test).argmax(1) == y_test).float().mean().item()
            print(
                f"step {step:3d}: loss {loss.item():.3f}, {len(restyled)}/{args.batch} restyled, test accuracy {accuracy:.2f}"
            )
    return accuracy


if __name__ == "__main__":
    main()
