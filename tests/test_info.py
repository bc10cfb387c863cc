"""`fastvit-style info`: the versions a bug report needs and why each backend can or cannot run."""

import importlib
import os
import platform
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import fastvit_style
from fastvit_style.cli import main


def test_info_lists_versions_and_backends(capsys):
    assert main(["info"]) == 0
    rows = [line.partition(":") for line in capsys.readouterr().out.splitlines()]
    lines = {key.strip(): value.strip() for key, _, value in rows}  # a value may be empty
    assert lines["torch"] == torch.__version__ and lines["numpy"] == np.__version__
    assert lines["fastvit_style"] == fastvit_style.__version__
    assert lines["python"] == platform.python_version()
    for module in ("triton", "xformers", "safetensors", "huggingface_hub"):  # each its own, or why not
        try:
            version = importlib.import_module(module).__version__
        except Exception as exc:
            version = f"unavailable ({type(exc).__name__})"
        assert lines[module] == version, module
    assert {"python", "triton", "TRITON_INTERPRET", "device"} <= set(lines)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert lines["backend torch"] == f"available on {device}"
    assert lines["backend reference"] == f"available on {device}"
    assert "backend xformers" in lines and "backend triton" in lines


@pytest.mark.parametrize("unbuffered", ["", "1"])
def test_a_reader_that_leaves_early_is_no_error(unbuffered):
    """`fastvit-style info | head -1`: stdout closed before the command writes is not reported (it said
    'error: [Errno 32] Broken pipe'), whether the output is buffered (found at the last flush) or not;
    the status is the shells' for SIGPIPE."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    child = subprocess.Popen(
        [sys.executable, "-m", "fastvit_style.cli", "info"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**env, "PYTHONUNBUFFERED": unbuffered} if unbuffered else env,
    )
    child.stdout.close()  # long before the command has imported torch and written anything
    err = child.stderr.read()
    assert child.wait(timeout=300) == 141 and err == b"", err


def test_a_broken_pipe_that_is_not_stdouts_is_an_error(capsys, monkeypatch):
    """stdout is no pipe here: the broken pipe is another one (a worker's), reported as before."""

    def broken(args):
        raise BrokenPipeError(32, "Broken pipe")

    monkeypatch.setattr("fastvit_style.info.run", broken)
    assert main(["info"]) == 1
    assert capsys.readouterr().err == "error: [Errno 32] Broken pipe\n"


def test_sigterm_unwinds_a_command_and_leaves_the_handler_as_it_was(capsys, monkeypatch):
    """SIGTERM during a command raises `Terminated` there (status 143, one line); after the command,
    and for a program that set its own handler, the handler is what it was."""
    seen = []

    def sigterm_self(args):
        seen.append(signal.getsignal(signal.SIGTERM))
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at the next bytecode
        time.sleep(60)

    monkeypatch.setattr("fastvit_style.info.run", sigterm_self)
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL
    assert main(["info"]) == 143
    assert capsys.readouterr().err == "terminated\n"
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL and seen[0] is not signal.SIG_DFL

    def own(signum, frame):
        raise RuntimeError("the embedding program's handler")

    monkeypatch.setattr(signal, "getsignal", lambda signum: own)  # its handler set: left alone
    monkeypatch.setattr(signal, "signal", lambda *args: pytest.fail("the handler was replaced"))
    monkeypatch.setattr("fastvit_style.info.run", lambda args: 0)
    assert main(["info"]) == 0


def test_python_m_fastvit_style_is_the_command():
    """`python -m fastvit_style` where the console script is not on PATH: the same command and statuses."""

    def command(*args):
        return subprocess.run(
            [sys.executable, "-m", "fastvit_style", *args], capture_output=True, text=True, check=False
        )

    ran = command("--version")
    assert ran.returncode == 0 and ran.stdout == f"fastvit-style {fastvit_style.__version__}\n", ran
    ran = command("no-such-command")
    assert ran.returncode == 2 and "no-such-command" in ran.stderr, ran
