"""`fastvit-style <command>`: each command lives in its own module with add_arguments(parser) and run(args)."""

import argparse
import importlib
import os
import stat
import sys

from .stopping import Terminated, sigterm_raises

DESCRIPTION = (
    "Stylizing ViT, fast: train it, stylize folders of images, classify with test-time augmentation, "
    "benchmark against the official computation. `fastvit-style COMMAND --help` for each command."
)

# command -> (module, one-line help). Modules are imported only when their command runs.
COMMANDS = {
    "bench": ("fastvit_style.benchmark.cli", "benchmark the fast paths against the official computation"),
    "train": ("fastvit_style.apps.train", "train a Stylizing ViT on a folder of images"),
    "stylize": (
        "fastvit_style.apps.stylize",
        "stylize a folder of images against a folder of style references",
    ),
    "tta": ("fastvit_style.apps.tta", "test-time augmentation: classify images through stylized views"),
    "info": ("fastvit_style.info", "versions, device and which backends can run here"),
}


def _user_error(exc: BaseException) -> bool:
    """What a user's input raises: a missing or unreadable file (OSError), a bad value (ValueError),
    weights that do not fit (WeightsError). Anything else is a bug and keeps its traceback."""
    from .weights import WeightsError  # imports torch: only once a command has run

    return isinstance(exc, (ValueError, OSError, WeightsError))


def _tracebacks() -> bool:
    return os.environ.get("FASTVIT_STYLE_TRACEBACK", "0") not in ("", "0")


def importable_cwd() -> None:
    """Put the current folder on sys.path, as `python -m fastvit_style` does and a console script does
    not, so that the options that name module:callable (tta --classifier, bench --backends) find a
    module there from either entry point."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def _stdout_is_a_pipe() -> bool:
    try:
        return stat.S_ISFIFO(os.fstat(sys.stdout.fileno()).st_mode)
    except (AttributeError, OSError, ValueError):  # no file behind it (captured, embedded, closed)
        return False


def main(argv=None) -> int:
    """Run a command; its status: 0, 1 for a user's error (one `error:` line), 2 for a usage error,
    130 after Ctrl-C, 143 after SIGTERM, 141 when the reader of a piped stdout left (`| head`)."""
    try:
        with sigterm_raises():
            status = _run_command(argv)
        sys.stdout.flush()  # here, where a reader that left can still be told from a bug
        return status
    except KeyboardInterrupt as stop:  # Ctrl-C or SIGTERM: the user's, not a bug
        if _tracebacks():
            raise
        from .devices import dist_env

        if dist_env()[0] == 0:  # under torchrun every rank gets the Ctrl-C: one line
            print("terminated" if isinstance(stop, Terminated) else "interrupted", file=sys.stderr)
        return 143 if isinstance(stop, Terminated) else 130  # the shells' statuses for the two signals
    except BrokenPipeError:  # stdout's: the commands' handler reports other pipes
        # Python's exit flushes stdout again: onto /dev/null, or it reports the pipe after all.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141  # the shells' status for SIGPIPE, as a command killed by it gives


def _run_command(argv) -> int:
    from ._version import __version__

    parser = argparse.ArgumentParser(prog="fastvit-style", description=DESCRIPTION)
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    argv = sys.argv[1:] if argv is None else argv
    chosen = None
    for name, (module_name, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text)
        if argv and argv[0] == name:  # only the chosen command's module is imported
            module = importlib.import_module(module_name)
            module.add_arguments(p)
            p.set_defaults(_run=module.run)
            chosen = p
    args = parser.parse_args(argv)
    # Which options the command line gave, a default value included (train --resume refuses those that
    # differ from the run's): parsed again with every option's default suppressed (set_defaults would
    # not do: argparse runs string defaults through the option's type).
    for action in chosen._actions:
        action.default = argparse.SUPPRESS
    args._given = frozenset(vars(parser.parse_args(argv))) - {"command", "_run"}
    try:
        return args._run(args) or 0
    except Exception as exc:
        # One line, as the commands' own checks print (SystemExit("error: ...")), with the same status 1;
        # argparse's usage errors exit 2. FASTVIT_STYLE_TRACEBACK=1 shows the traceback.
        if (
            not _user_error(exc)
            or _tracebacks()
            or (isinstance(exc, BrokenPipeError) and _stdout_is_a_pipe())
        ):
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
