"""SIGTERM: how a scheduler stops or preempts a job (SLURM at its time limit, `kill`). By default it ends
the process where it is, saying nothing, and a training run loses every step since its last checkpoint.
Within the commands it unwinds as Ctrl-C does (`sigterm_raises`); a training run first finishes its step
and saves it (`StopRequest`). A handler that someone else set (a program embedding these, a launcher)
is left alone, and so is every thread but the main one, which alone may set handlers."""

import contextlib
import signal
import sys
import threading


class Terminated(KeyboardInterrupt):
    """Raised where the program is at a SIGTERM: the unwinding of Ctrl-C (temporaries removed, `train`
    naming the checkpoint that resumes it, `tta` where its rows so far are), told apart by its type."""


def _raise_terminated(signum, frame):
    raise Terminated


@contextlib.contextmanager
def _sigterm_handled_by(handler):
    ours = threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGTERM) in (
        signal.SIG_DFL,
        _raise_terminated,
    )
    if not ours:
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def sigterm_raises():
    """Context: a SIGTERM within raises `Terminated` where the program is."""
    return _sigterm_handled_by(_raise_terminated)


class StopRequest:
    """`requested` turns True at a SIGTERM within `watch()`, which a loop reads at a point where it can
    stop whole; a second SIGTERM raises `Terminated` at once."""

    def __init__(self):
        self.requested = False

    def _handle(self, signum, frame):
        if self.requested:
            raise Terminated
        self.requested = True
        print("SIGTERM: stopping at the end of this step, with a checkpoint (a second SIGTERM stops at once)",
              file=sys.stderr, flush=True)  # fmt: skip

    def watch(self):
        return _sigterm_handled_by(self._handle)


def ignore_sigterm(worker_id: int) -> None:
    """DataLoader `worker_init_fn` for a loader of a `StopRequest` loop: a worker keeps serving the step
    under way at a SIGTERM to the whole job, and its parent ends it afterwards as usual. Torch's own
    handler ends a worker by the signal when the SIGTERM is not its parent's, and the parent then raises
    "DataLoader worker ... is killed by signal" mid-step, wherever it is, with nothing saved."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
