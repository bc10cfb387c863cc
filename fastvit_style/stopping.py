"""SIGTERM: how a scheduler stops or preempts a job (SLURM at its time limit, `kill`). By default it ends
the process where it is, saying nothing, and a training run loses every step since its last checkpoint.
Within the commands it unwinds as Ctrl-C does (`sigterm_raises`); a training run first finishes its step
and saves it (`StopRequest`). A handler that someone else set (a program embedding these, a launcher)
is left alone, and so is every thread but the main one, which alone may set handlers."""

import contextlib
import multiprocessing
import os
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


def _say(line: str) -> None:
    """One line on stderr from a signal handler. Not through sys.stderr's buffer where it has a file
    descriptor: the handler may run inside a write to it (the progress bar's), and a buffered stream
    refuses a reentrant call with a RuntimeError."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by an object with no descriptor (captured)
        print(line, file=sys.stderr, flush=True)
        return
    # No flush first: that is a call into the buffer too. Lines before are out already (stderr is line
    # buffered, the progress bar flushes its own).
    os.write(fd, (line + "\n").encode(errors="replace"))


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
        _say("SIGTERM: stopping at the end of this step, with a checkpoint (a second SIGTERM stops at once)")

    def watch(self):
        return _sigterm_handled_by(self._handle)


def ignore_sigterm(worker_id: int) -> None:
    """DataLoader `worker_init_fn`: a worker keeps serving at a SIGTERM to the whole job, and its parent,
    which finishes its step (`StopRequest`) or unwinds (`sigterm_raises`), ends it afterwards as usual.
    Torch's own handler ends a worker by the signal when the SIGTERM is not its parent's, and the parent
    then raises "DataLoader worker ... is killed by signal" wherever it is: mid-step, with nothing saved,
    or in the unwinding, a traceback instead of `terminated`.

    A SIGTERM from the parent still ends the worker quietly, as torch's handler does: at interpreter exit
    with an iterator still alive (an uncaught Ctrl-C's traceback keeps it), multiprocessing terminates
    the workers with one and then waits for them, forever if they ignored it. Not in a spawned worker
    (macOS, or forkserver: Python 3.14's default), where a thread `import torch` started may take and
    drop it: there the loop's own end stops the workers (`train._iterating`)."""
    # Ignored process-wide: a thread that does not block it (one started before this, as in spawned
    # workers) drops it rather than dying by torch's handler.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    parent = multiprocessing.parent_process()
    if not hasattr(signal, "sigwaitinfo") or parent is None:  # macOS, Windows: ignored, as best we can
        return
    # Blocked in this thread and every thread it starts: the waiter below takes it (a blocked signal is
    # queued, not dropped, though ignored).
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    threading.Thread(target=_exit_at_sigterm_from, args=(parent.pid,), daemon=True).start()


def _exit_at_sigterm_from(parent: int) -> None:
    while signal.sigwaitinfo({signal.SIGTERM}).si_pid != parent:
        pass
    os._exit(0)
