"""`fastvit-style stylize`: every content image stylized by every style image (or --k random ones).

Outputs OUT/<content>__<style>.png, denormalized and clamped to [0, 1]; a run whose pairs would
share a name (or names that differ only in case, where OUT's file system ignores case), or whose
output name a folder in OUT holds (or a file, in an OUT no run wrote to: the user's), is refused
before any work, and the images a run writes (the files directly in OUT, all of OUT when it lies
inside an input folder) are never read as inputs; OUT itself cannot be an input folder. A stopped
run is resumed with --skip-existing (`_SKIP_HELP`). The style references are encoded once into a
StyleBank (about 2 * depth * 197 * width * 4 bytes each: 3.5 MiB for tiny, 13.9 MiB for base), and
each content image's stream is shared by its references.
"""

import sys

import torch

from ..atomic import remove_temporaries_of
from ..imageio import denormalize, load_batch
from ..style_bank import StyleBank
from ..tta import select_refs, stylize
from .common import (
    add_model_arguments,
    check_output_folder,
    existing_outputs,
    find_images,
    load_stylizer,
    make_output_folder,
    mean_std,
    pair_names,
    progress,
    save_output_png,
)


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument("--content", required=True, help="folder of content images (searched recursively)")
    parser.add_argument(
        "--styles", required=True, help="folder of style reference images (searched recursively)"
    )
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument(
        "--k",
        type=int,
        default=None,
        help="random styles per content image; 0: all (default: all), as in tta",
    )
    parser.add_argument("--skip-existing", action="store_true", help=_SKIP_HELP)


_SKIP_HELP = (
    "resume a stopped run: pairs whose PNG an earlier run wrote to --out (a folder it marked) are not "
    "written again, and a batch whose outputs all exist is not read. Nothing checks that they came from "
    "the same --weights, style and content images and options: give that run's (--batch-size, --k and "
    "--seed included, for the same draws and bytes) or a new --out"
)


def _check_finite(out, paths: list[str], refs, styles: list[str]) -> None:
    """out (B, K, 3, S, S) of content `paths` by styles[refs] ((B, K)): ValueError where an image holds
    NaN or inf (as from weights that do), which the PNG's clamp and uint8 cast would write as black."""
    bad = ~out.isfinite().flatten(2).all(2)
    if bad.any():
        b, j = bad.nonzero()[0].tolist()
        raise ValueError(
            f"the stylizer gave NaN or infinite values for {int(bad.sum())} images of this batch (first: "
            f"content {paths[b]!r} with style {styles[refs[b, j]]!r}): check --weights"
        )


def run(args) -> int:
    check_output_folder(args.out, "--out")
    contents, styles = find_images(
        ("content", args.content), ("style", args.styles), output=("--out", args.out)
    )
    content_names, style_names = pair_names(contents, args.content, styles, args.styles, ("--out", args.out))
    exists = existing_outputs(args.out) if args.skip_existing else lambda name: False
    if args.k is not None and not 0 <= args.k <= len(styles):
        raise SystemExit(
            f"error: --k must lie in 0..{len(styles)} (the number of style images; 0: all), got {args.k}"
        )
    args.k = args.k or None  # 0: all, as in tta
    mean, std, note = mean_std(args)
    model = load_stylizer(args, note)
    size, dev = model.config.input_size, model.encoder.pos_embed.device
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad():
        bank = StyleBank.from_images(
            model, load_batch(styles, size, mean, std).to(dev), batch_size=args.batch_size
        )
        leftovers = make_output_folder(args.out)
        starts = range(0, len(contents), args.batch_size)
        written = skipped = 0
        try:
            for start in progress(starts, len(starts), "stylize"):
                paths = contents[start : start + args.batch_size]
                # Drawn for a skipped batch too: each batch's draws follow from those of the batches before.
                refs = select_refs(len(bank), len(paths), k=args.k, generator=generator)
                pairs = [
                    (b, j, f"{name}__{style_names[ref]}.png")
                    for b, name in enumerate(content_names[start : start + len(paths)])
                    for j, ref in enumerate(refs[b].tolist())
                ]
                todo = []
                for pair in pairs:
                    if exists(pair[2]):  # away with what a killed write of it left, as its write would
                        remove_temporaries_of(leftovers, pair[2])
                    else:
                        todo.append(pair)
                skipped += len(pairs) - len(todo)
                if not todo:
                    continue
                # The whole batch, as an uninterrupted run stylizes it: a smaller one's floats can differ
                # in the last bits, and so its PNGs' pixels.
                out = stylize(model, load_batch(paths, size, mean, std).to(dev), bank, refs=refs)
                _check_finite(out, paths, refs, styles)
                out = denormalize(out, mean, std)
                for b, j, name in todo:
                    save_output_png(out[b, j], args.out, name, leftovers)
                    written += 1
        except (Exception, KeyboardInterrupt):
            if 0 < written + skipped:  # said after the progress bar, which the loop's end closed
                total = len(contents) * (args.k or len(styles))
                print(
                    f"note: {written + skipped} of {total} images are in {args.out!r}: --skip-existing (with "
                    "the same options) writes only the others",
                    file=sys.stderr,
                )
            raise
    note = f" (skipped {skipped} that exist: --skip-existing)" if args.skip_existing else ""
    print(f"wrote {written} image{'s' * (written != 1)} to {args.out}{note}")
    return 0
