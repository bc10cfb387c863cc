"""`fastvit-style tta`: classify a folder of images through stylized views (test-time augmentation).

The classifier maps normalized (N, 3, S, S) images (the stylizer's normalization) to logits: a
TorchScript file (torch.jit.load), a torch.export archive (.pt2), or `module:callable` returning an
nn.Module (the current folder is importable). N is --batch-size times the views per image, fewer in
the last batch: an archive must be exported with a dynamic batch dimension. Writes a CSV with one
row per image: path (below --images), predicted class, and the averaged probability of each class
(vote fractions with --reduce vote). The rows are written batch by batch to `<out>.partial`, which
replaces --out (atomically) once every image is classified: a run that stops keeps its rows there.
Every form of classifier is code that runs here (torch.export.load unpickles): trust it as a program.
"""

import contextlib
import csv
import importlib
import inspect
import io
import logging
import os
import shutil
import sys

import sympy
import torch
from torch import nn

from ..atomic import atomic_path, check_replaceable, plain_write_errors
from ..cli import importable_cwd
from ..imageio import denormalize, load_batch
from ..style_bank import StyleBank, describe_value
from ..tta import REDUCTIONS, TTAClassifier
from .common import (
    add_model_arguments,
    check_file_folder,
    check_output_folder,
    device,
    find_images,
    load_stylizer,
    make_output_folder,
    mean_std,
    pair_names,
    progress,
    save_output_png,
    stylizer_config,
)


def add_arguments(parser) -> None:
    add_model_arguments(parser)
    parser.add_argument(
        "--refs", required=True, help="folder of style reference images (e.g. training images)"
    )
    parser.add_argument("--images", required=True, help="folder of images to classify (searched recursively)")
    parser.add_argument(
        "--classifier",
        required=True,
        help="TorchScript file, .pt2 export, or module:callable returning an nn.Module (each runs as code: "
        "give only files you trust)",
    )
    parser.add_argument(
        "--out",
        required=True,
        help="CSV file of predictions, written when every image is classified; until then the rows are "
        "written batch by batch to OUT.partial, which a run that stops keeps (a new run replaces it)",
    )
    parser.add_argument(
        "--k",
        type=int,
        default=None,
        help="random references per image; 0: all (default: 8, or all when fewer)",
    )
    parser.add_argument(
        "--reduce",
        choices=REDUCTIONS,
        default="mean_prob",
        help="how views are combined (default: mean_prob)",
    )
    parser.add_argument("--no-original", action="store_true", help="classify stylized views only")
    parser.add_argument("--save-stylized", metavar="DIR", help="also write the stylized views as PNG")


class _Held(logging.Handler):
    """Keeps the records it is given, for `_logs_only_on_success`."""

    def __init__(self):
        super().__init__()
        self.records = []

    def emit(self, record):
        self.records.append(record)


@contextlib.contextmanager
def _logs_only_on_success(name: str):
    """The records of logger `name` (and of its children) are held back while the block runs and
    passed on to its handlers only if it succeeds; yields the handler holding them, whose records tell a
    failure's cause: torch.export.load logs a failed read with its traceback and then raises a
    different, vaguer error ("check the warnings above")."""
    logger, held = logging.getLogger(name), _Held()
    handlers, propagate = logger.handlers, logger.propagate
    logger.handlers, logger.propagate = [held], False
    try:
        yield held
    finally:
        logger.handlers, logger.propagate = handlers, propagate
    for record in held.records:
        logger.handle(record)


def _said(e: BaseException) -> str:
    """An exception in one line: its type and its message's first line."""
    return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def load_classifier(spec: str, dev: torch.device, images: tuple[int, int, int, int]) -> nn.Module:
    """The classifier of --classifier on `dev`, in eval mode. images: (fewest and most images per call,
    channels, size) of what tta will pass, which a .pt2 export is checked against before any work."""
    if os.path.isfile(spec) and spec.lower().endswith(".pt2"):  # torch.export archive
        try:
            with _logs_only_on_success("torch.export") as held:
                exported = torch.export.load(spec)
        except Exception as e:  # zipfile, pickle or version errors: all mean the archive cannot be used
            causes = [r.exc_info[1] for r in held.records if r.exc_info and r.exc_info[1]] + [e]
            raise SystemExit(
                f"error: --classifier {spec!r} is not a readable torch.export archive "
                f"({'; then '.join(map(_said, causes))})"
            ) from None
        _check_exported_input(exported, spec, *images)
        return exported.module().to(dev)
    if os.path.isfile(spec):
        try:
            return torch.jit.load(spec, map_location=dev).eval()
        except RuntimeError as e:
            raise SystemExit(
                f"error: --classifier {spec!r} is neither a TorchScript file nor a .pt2 export; weights "
                "saved with torch.save or safetensors need the code of their model: pass module:callable "
                f"returning the loaded classifier (torch.jit.load said: {str(e).splitlines()[0]})"
            ) from None
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise SystemExit(f"error: --classifier {spec!r} is neither a file nor module:callable")
    if not all(part.isidentifier() for part in module_name.split(".")):  # './clf' raised a TypeError
        raise SystemExit(
            f"error: --classifier {spec!r}: {module_name!r} is not a module name (module:callable takes one "
            "as Python imports it, e.g. clf:make for clf.py in the current folder, not a path)"
        )
    importable_cwd()
    try:
        factory = importlib.import_module(module_name)
    except ImportError as e:
        raise SystemExit(f"error: --classifier {spec!r}: cannot import {module_name!r} ({e})") from None
    for part in attr.split("."):
        if not hasattr(factory, part):
            raise SystemExit(f"error: --classifier {spec!r}: {module_name!r} has no attribute {attr!r}")
        factory = getattr(factory, part)
    if not callable(factory):
        raise SystemExit(
            f"error: --classifier {spec!r} names {describe_value(factory)}, not a callable returning the classifier"
        )
    _check_takes_no_arguments(factory, spec)
    try:
        classifier = factory()
    except Exception as e:  # the user's code, as the classifier's failures in _classify
        raise ValueError(f"--classifier {spec!r} failed when called: {_said(e)}") from e
    if not isinstance(classifier, nn.Module):
        raise SystemExit(
            f"error: --classifier {spec!r} returned {describe_value(classifier)}, not an nn.Module"
        )
    return classifier.to(dev).eval()


def _check_takes_no_arguments(factory, spec: str) -> None:
    """Calling a factory that needs arguments raised a TypeError traceback from inside this command."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # some builtins have no signature: the call will tell
        return
    needed = [
        p.name for p in params if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
    ]
    if needed:
        raise SystemExit(
            f"error: --classifier {spec!r} needs arguments ({', '.join(needed)}), but tta calls it with none: "
            "name a callable that takes none and returns the classifier"
        )


def _check_exported_input(exported, spec: str, fewest: int, most: int, channels: int, size: int) -> None:
    """Before any work: an archive traced for other shapes would fail on the first batch it cannot take
    (a guard's AssertionError). Every batch here is (N, channels, size, size) images, N = --batch-size
    x views, fewer in the last one."""
    names = exported.graph_signature.user_inputs
    inputs = [n for n in exported.graph.nodes if n.op == "placeholder" and n.name in names]
    shape = tuple(getattr(inputs[0].meta.get("val"), "shape", ())) if len(inputs) == 1 else ()
    wanted = f"(N, {channels}, {size}, {size}) images"
    if len(shape) != 4:
        got = f"{len(inputs)} inputs" if len(inputs) != 1 else f"an input of shape {shape}"
        raise SystemExit(f"error: --classifier {spec!r} takes {got}; tta passes one, {wanted}")
    if any(isinstance(d, int) and d != e for d, e in zip(shape[1:], (channels, size, size))):
        raise SystemExit(
            f"error: --classifier {spec!r} was exported for images of shape {tuple(shape[1:])}; tta passes "
            f"{wanted}, the stylizer's input size (--backbone, --model-kwargs input_size)"
        )
    if isinstance(shape[0], int):
        raise SystemExit(
            f"error: --classifier {spec!r} was exported for batches of exactly {shape[0]} images; tta "
            "classifies --batch-size x views images at a time, fewer in the last batch: export it with a "
            "dynamic batch dimension, e.g. torch.export.export(model, (x,), "
            "dynamic_shapes=({0: torch.export.Dim('batch')},))"
        )
    bounds = exported.range_constraints.get(shape[0].node.expr)
    if bounds is None:
        return
    if isinstance(bounds.upper, sympy.Integer) and int(bounds.upper) < most:
        raise SystemExit(
            f"error: --classifier {spec!r} was exported for batches of at most {int(bounds.upper)} images; "
            f"tta passes up to {most} (--batch-size x views): lower --batch-size or --k, or export it with "
            "a larger max of its batch Dim"
        )
    # A min of 2 is not enforced (export's 0/1 specialization), a larger one is.
    if isinstance(bounds.lower, sympy.Integer) and int(bounds.lower) > max(fewest, 2):
        raise SystemExit(
            f"error: --classifier {spec!r} was exported for batches of at least {int(bounds.lower)} images; "
            f"tta's last batch has {fewest} (the images left x views): export it with a smaller min of its "
            "batch Dim"
        )


_HEADER = ["path", "pred"]  # the CSV's first columns: how a file this command wrote is recognised


def check_csv_path(path: str) -> None:
    """Before any work: --out must name a file that can be written (its folder is created), and only a
    CSV of this command may be replaced (not an input image, the weights or anything else a mistyped
    path could hit)."""
    check_replaceable(
        path, "--out", "CSV file", _is_predictions_csv, "is not a predictions CSV of this command"
    )
    # Named as --out's own checks name it: it is the user's --out that makes the name.
    check_replaceable(
        partial_path(path),
        "--out",
        "partial CSV file",
        _is_partial_csv,
        "is not a partial CSV tta wrote (its rows so far, next to --out)",
    )
    check_file_folder(path, "--out")


def partial_path(out: str) -> str:
    """Where the rows of --out are written as the run goes: next to it, under a name no CSV glob takes
    for a result, and not an atomic_path temporary, which a later write of --out would remove unsaid as
    a killed write's leftover."""
    return out + ".partial"


def _is_partial_csv(path: str) -> bool:
    """A partial CSV of this command: its header (written with the first rows), or empty (a run killed
    between creating it and writing them)."""
    return os.path.getsize(path) == 0 or _is_predictions_csv(path)


def _header(num_classes: int) -> list[str]:
    return _HEADER + [f"p{c}" for c in range(num_classes)]


def _is_predictions_csv(path: str) -> bool:
    """Whether the header is this command's whole header, `path,pred,p0,...,pN-1`: a user's own table
    that starts `path,pred` (ground truth, say) is not replaced."""
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        try:
            header = next(csv.reader(f), [])
        except csv.Error:  # not CSV as this command writes it (a first line over the field size limit)
            return False
    return len(header) > 2 and header == _header(len(header) - 2)


def _rows_in(path: str) -> int:
    """The rows below the header of a partial CSV, 0 where it cannot be read."""
    try:
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            return max(sum(1 for _ in csv.reader(f)) - 1, 0)
    except (OSError, csv.Error):
        return 0


def _n_images(n: int) -> str:
    """`n` images in words: 1 image, 2 images."""
    return f"{n} image{'s' * (n != 1)}"


class _PartialCSV:
    """The predictions CSV, written as the run goes: rows batch by batch to `partial_path(out)` (flushed
    and fsynced: a run that stops, even by SIGKILL, keeps them), copied onto `out` atomically by
    `finish` once every image is classified. A Python exception leaves the partial file (unless it
    holds no rows) and a note saying where it is and how many images it holds."""

    def __init__(self, out: str):
        self.out, self.path, self.rows, self.size = out, partial_path(out), 0, 0
        self.finishing = False

    def __enter__(self):
        # An earlier run's (check_csv_path let only tta's through) is replaced: appending would mix runs.
        if os.path.lexists(self.path):
            if held := _rows_in(self.path):
                print(
                    f"note: replacing {self.path!r}, which held the predictions for {_n_images(held)} that "
                    "an earlier run kept when it stopped",
                    file=sys.stderr,
                )
            os.remove(self.path)
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        # Exclusive: a concurrent run's file is never written into. Unbuffered: `write` alone decides what
        # reaches the file, whole batches.
        self.file = open(self.path, "xb+", buffering=0)
        return self

    def write(self, paths: list[str], probs: torch.Tensor) -> None:
        """One batch: paths, B str as written in the CSV, probs (B, num_classes) float on the CPU."""
        text = io.StringIO()
        writer = csv.writer(text)
        if not self.rows:
            writer.writerow(_header(probs.shape[1]))
        for path, p in zip(paths, probs):
            writer.writerow([path, int(p.argmax())] + [f"{v:.6g}" for v in p.tolist()])
        # UTF-8 whatever the locale; a file name that is not (undecodable bytes) is written as its bytes.
        data = text.getvalue().encode("utf-8", "surrogateescape")
        try:
            with plain_write_errors(self.path):  # Python's write errors name no file
                view = memoryview(data)
                while view:  # a raw write may take only part of the bytes
                    view = view[self.file.write(view) :]
                os.fsync(self.file.fileno())
            # In the try: a stop (SIGTERM, Ctrl-C) landing before the count is taken also removes the batch,
            # so that the note never counts fewer rows than the file holds, nor removes a file with some.
            self.rows, self.size = self.rows + len(paths), self.size + len(data)
        except BaseException:  # whole batches only: the file ends at the last one counted
            with contextlib.suppress(OSError):
                os.ftruncate(self.file.fileno(), self.size)
            raise

    def finish(self) -> None:
        """Copy the complete file onto --out atomically (an earlier --out stays intact until then)."""
        self.file.seek(0)  # this run's file, also if another run has replaced the one at self.path since
        self.finishing = True
        with atomic_path(self.out, remove_leftovers=True) as tmp, open(tmp, "wb") as f:
            shutil.copyfileobj(self.file, f)
        self._remove()

    def _remove(self) -> None:
        """Remove self.path if it is still this run's file, then close it."""
        with contextlib.suppress(OSError):
            if os.path.samestat(os.fstat(self.file.fileno()), os.stat(self.path)):
                os.remove(self.path)
        self.file.close()

    def _out_holds_the_rows(self) -> bool:
        """Whether --out holds exactly this run's rows."""
        with contextlib.suppress(OSError):
            if os.path.getsize(self.out) == self.size:
                self.file.seek(0)
                with open(self.out, "rb") as f:
                    return f.read() == self.file.read()
        return False

    def __exit__(self, kind, error, tb):
        if self.file.closed:  # finished
            return
        # A stop after --out's rename (in atomic_path's directory fsync, or before _remove): --out is whole.
        if not self.rows or self.finishing and self._out_holds_the_rows():
            self._remove()
            return
        self.file.close()
        print(
            f"note: the predictions for {_n_images(self.rows)} classified before the run stopped are kept in "
            f"{self.path!r} (--out {self.out!r} is written only once every image is; a new run replaces "
            "the partial file)",
            file=sys.stderr,
            flush=True,
        )


def _classify(tta: TTAClassifier, views: torch.Tensor, spec: str) -> torch.Tensor:
    """tta.classify, with the classifier's own failures said as the user's error (the cli prints its
    line; FASTVIT_STYLE_TRACEBACK=1 shows the classifier's traceback too)."""
    try:
        return tta.classify(views)
    except Exception as e:
        n, image = views.shape[0] * views.shape[1], tuple(views.shape[2:])
        hint = ": lower --batch-size (or --k)" if isinstance(e, torch.OutOfMemoryError) else ""
        raise ValueError(
            f"--classifier {spec!r} failed on {n} images of shape {image}, {views.dtype}, normalized as the "
            f"stylizer's inputs: {_said(e)}{hint}"
        ) from e


def run(args) -> int:
    check_csv_path(args.out)
    saving = args.save_stylized is not None
    if saving:
        check_output_folder(args.save_stylized, "--save-stylized")
        if os.path.realpath(args.save_stylized) == os.path.realpath(args.out):
            raise SystemExit("error: --save-stylized and --out name the same path: one folder, one CSV file")
        if os.path.realpath(args.save_stylized) == os.path.realpath(partial_path(args.out)):
            raise SystemExit(
                f"error: --save-stylized names {partial_path(args.out)!r}, where tta writes the rows of --out "
                "as it goes: choose another folder"
            )
    images, refs = find_images(
        ("input", args.images),
        ("reference", args.refs),
        output=("--save-stylized", args.save_stylized) if saving else None,
    )
    if saving:
        names, ref_names = pair_names(
            images, args.images, refs, args.refs, ("--save-stylized", args.save_stylized)
        )
    if args.k is None:
        args.k = min(8, len(refs))
    if not 0 <= args.k <= len(refs):
        raise SystemExit(
            f"error: --k must lie in 0..{len(refs)} (the number of reference images), got {args.k}"
        )
    cfg, _ = stylizer_config(args)
    views = (args.k or len(refs)) + int(not args.no_original)
    # Before the stylizer: it fails faster.
    most, last = min(args.batch_size, len(images)), (len(images) - 1) % args.batch_size + 1
    classifier = load_classifier(
        args.classifier, device(args), (last * views, most * views, cfg.in_channel, cfg.input_size)
    )
    mean, std, note = mean_std(args)
    model = load_stylizer(args, note)
    size, dev = model.config.input_size, model.encoder.pos_embed.device
    generator = torch.Generator().manual_seed(args.seed)
    with torch.no_grad(), _PartialCSV(args.out) as out:
        bank = StyleBank.from_images(
            model, load_batch(refs, size, mean, std).to(dev), batch_size=args.batch_size
        )
        tta = TTAClassifier(
            classifier,
            model,
            bank,
            k=args.k or None,
            include_original=not args.no_original,
            reduce=args.reduce,
            generator=generator,
        )
        if saving:
            leftovers = make_output_folder(args.save_stylized)
        # No tta.eval(): both parts are in eval mode already, and an exported (.pt2) module refuses train().
        starts = range(0, len(images), args.batch_size)
        for start in progress(starts, len(starts), "tta"):
            paths = images[start : start + args.batch_size]
            views, used = tta.make_views(load_batch(paths, size, mean, std).to(dev))
            probs = tta.aggregate(_classify(tta, views, args.classifier)).cpu()
            if not probs.isfinite().all():
                bad = [p for p, row in zip(paths, probs) if not row.isfinite().all()]
                raise ValueError(
                    f"--classifier {args.classifier!r} gave NaN or infinite logits for {len(bad)} images "
                    f"(views of {bad[:3]}{', ...' if len(bad) > 3 else ''}): no class can be predicted"
                )
            out.write([os.path.relpath(path, args.images) for path in paths], probs)
            if saving:
                stylized = denormalize(views[:, int(tta.include_original) :], mean, std)
                for b, name in enumerate(names[start : start + len(paths)]):
                    for j, ref in enumerate(used[b].tolist()):
                        name_j = f"{name}__{ref_names[ref]}.png"
                        save_output_png(stylized[b, j], args.save_stylized, name_j, leftovers)
        out.finish()
    print(f"wrote predictions for {_n_images(out.rows)} to {args.out}")
    return 0
