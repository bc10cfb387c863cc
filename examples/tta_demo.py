"""Offline demo: stylize content images by style references through a StyleBank, write a PNG grid,
and run a (toy, untrained) TTAClassifier over the same bank.

    python examples/tta_demo.py --out demo.png                                  # random weights
    python examples/tta_demo.py --backbone tiny --weights tiny.safetensors --out demo.png

Images: scikit-image's samples when it is installed, else procedural "histology-like" tiles (haematoxylin
blobs on eosin stroma, a different stain per tile). Grid: top row the styles, left column the contents,
cell (b, j) content b stylized by style j. With random weights the stylized cells are noise: pass an
official checkpoint to see real stylization. --small runs a 64 px, 2-layer tiny model in seconds.
"""

import argparse
import os

import numpy as np
import torch
from torch import nn

from fastvit_style import StyleBank, StylizingViT, TTAClassifier, create_model
from fastvit_style.apps.common import positive_int
from fastvit_style.imageio import denormalize, normalization, normalize, resize_pad, save_png
from fastvit_style.tta import stylize


def sample_images(n: int, size: int, seed: int) -> torch.Tensor:
    """(n, 3, size, size) in [0, 1]: scikit-image samples if importable, else synthetic tiles."""
    try:
        from skimage import data

        arrays = [data.immunohistochemistry(), data.astronaut(), data.coffee(), data.chelsea()]
        arrays = [arrays[(seed + i) % len(arrays)] for i in range(n)]
        return torch.stack(
            [resize_pad(torch.from_numpy(a).permute(2, 0, 1).float() / 255, size) for a in arrays]
        )
    except ImportError:
        return synthetic_tiles(n, size, seed)


def synthetic_tiles(n: int, size: int, seed: int) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    tiles = []
    for _ in range(n):
        stroma, nuclei = (
            rng.uniform([0.75, 0.45, 0.6], [0.95, 0.7, 0.85]),
            rng.uniform([0.2, 0.1, 0.4], [0.5, 0.3, 0.7]),
        )
        mask = np.zeros((size, size))
        for cy, cx, r in rng.uniform([0, 0, 0.02], [1, 1, 0.07], (rng.integers(15, 40), 3)):
            mask = np.maximum(
                mask, np.exp(-((((yy - cy) ** 2 + (xx - cx) ** 2) / r**2) ** 2))
            )  # soft-edged nucleus
        img = (
            stroma[:, None, None] * (1 - mask)
            + nuclei[:, None, None] * mask
            + rng.normal(0, 0.03, (3, size, size))
        )
        tiles.append(np.clip(img, 0, 1))
    return torch.tensor(np.stack(tiles), dtype=torch.float32)


def grid(contents: torch.Tensor, styles: torch.Tensor, stylized: torch.Tensor, gap: int = 4) -> torch.Tensor:
    """contents (B, 3, S, S), styles (K, 3, S, S), stylized (B, K, 3, S, S), all in [0, 1] -> one image."""
    B, K, _, S, _ = stylized.shape
    out = torch.ones(3, (B + 1) * (S + gap), (K + 1) * (S + gap))

    def put(img, row, col):
        out[:, row * (S + gap) : row * (S + gap) + S, col * (S + gap) : col * (S + gap) + S] = img

    for j in range(K):
        put(styles[j], 0, j + 1)
    for b in range(B):
        put(contents[b], b + 1, 0)
        for j in range(K):
            put(stylized[b, j], b + 1, j + 1)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--out", default="tta_demo.png", help="PNG file to write the grid to (replaced if it exists)"
    )
    p.add_argument("--backbone", default="tiny")
    p.add_argument("--weights", default=None, help="official checkpoint file (default: random weights)")
    p.add_argument("--dataset", default="camelyon17wilds", help="normalization constants")
    p.add_argument("--small", action="store_true", help="64 px, 2 layers: a quick run with random weights")
    p.add_argument("--contents", type=positive_int, default=2, help="how many content images (rows)")
    p.add_argument("--styles", type=positive_int, default=3, help="how many style references (columns)")
    args = p.parse_args(argv)

    if os.path.isdir(args.out):
        p.error(f"--out {args.out!r} is a folder: name the PNG file to write")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
        p.error(f"--out {args.out!r}: its folder does not exist")
    if args.small and args.weights:
        p.error("--small builds a reduced model that no checkpoint fits: drop --weights or --small")
    torch.manual_seed(0)
    if args.small:
        model = StylizingViT(args.backbone, input_size=64, encoder_depth=2)
    else:
        model = create_model(args.backbone, weights=args.weights)
    model.eval().requires_grad_(False)
    size = model.config.input_size
    mean, std = normalization(args.dataset)
    contents, styles = sample_images(args.contents, size, seed=0), sample_images(args.styles, size, seed=1)
    x, refs = normalize(contents, mean, std), normalize(styles, mean, std)

    bank = StyleBank.from_images(model, refs)
    with torch.no_grad():
        stylized = denormalize(stylize(model, x, bank), mean, std).clamp(0, 1)
    print(f"{bank}; wrote {save_png(grid(contents, styles, stylized), args.out)}")

    toy = nn.Sequential(
        nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(3 * 16, 2)
    )  # untrained: plumbing only
    tta = TTAClassifier(
        toy, model, bank, k=min(2, len(bank)), generator=torch.Generator().manual_seed(0)
    ).eval()
    with torch.no_grad():
        probs, per_view = tta(x, return_views=True)
    print(
        f"TTA over {per_view.shape[1]} views per image: class probabilities {[[round(v, 3) for v in row] for row in probs.tolist()]}"
    )


if __name__ == "__main__":
    main()
