"""fastvit_style.stopping on its own: what the SIGTERM handlers do where they land."""

import io
import signal
import sys

from fastvit_style.stopping import StopRequest


class _SignalledRaw(io.RawIOBase):
    """A file whose write runs `during_write` once, as a signal landing in a write of the buffered stream
    above it would: its handler then runs with that stream's lock held."""

    def __init__(self, fd: int, during_write):
        self.fd, self.during_write = fd, during_write

    def writable(self):
        return True

    def fileno(self):
        return self.fd

    def write(self, data):
        during, self.during_write = self.during_write, None
        if during is not None:
            during()
        return len(data)


def test_the_sigterm_note_lands_amid_a_write_to_stderr(tmp_path, monkeypatch):
    """A SIGTERM in the middle of a write to stderr (the progress bar's): the note goes to the descriptor,
    beside the buffer, which refuses a reentrant call ("reentrant call inside <_io.BufferedWriter>")."""
    request = StopRequest()
    with open(tmp_path / "stderr", "wb") as file:
        raw = _SignalledRaw(file.fileno(), lambda: request._handle(signal.SIGTERM, None))
        monkeypatch.setattr(sys, "stderr", io.TextIOWrapper(io.BufferedWriter(raw), line_buffering=True))
        print("step 3/10", file=sys.stderr)
    assert request.requested
    assert (tmp_path / "stderr").read_text().startswith("SIGTERM: stopping at the end of this step")
