"""`fastvit-style <command>`: each command lives in its own module with add_arguments(parser) and run(args)."""

import argparse
import importlib
import os
import sys

# command -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS = {
    "bench": ("fastvit_style.benchmark.cli", "benchmark the fast paths against the official computation"),
    "train": ("fastvit_style.train", "train a Stylizing ViT on a folder of images"),
    "stylize": (
        "fastvit_style.apps.stylize",
        "stylize a folder of images against a folder of style references",
    ),
    "tta": ("fastvit_style.apps.tta", "test-time augmentation: classify images through stylized views"),
    "info": ("fastvit_style.info", "versions, device and which backends can run here"),
}


# What a user's input raises (a missing or unreadable file, a bad value, a weight file that does not
# fit, a classifier module that does not import): one line on stderr and exit status 2, not a
# traceback. FASTVIT_STYLE_TRACEBACK=1 shows the traceback.
USER_ERRORS = (ValueError, OSError, ImportError, RuntimeError)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fastvit-style", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if argv and argv[0] == name:  # only the chosen command's module is imported
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
    args = parser.parse_args(argv)
    try:
        return args._run(args) or 0
    except USER_ERRORS as exc:
        if os.environ.get("FASTVIT_STYLE_TRACEBACK"):
            raise
        print(f"fastvit-style {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
