"""`fastvit-style info`: the versions a bug report needs and why each backend can or cannot run."""

import numpy as np
import torch

from fastvit_style.cli import main


def test_info_lists_versions_and_backends(capsys):
    assert main(["info"]) == 0
    rows = [line.partition(":") for line in capsys.readouterr().out.splitlines()]
    lines = {key.strip(): value.strip() for key, _, value in rows}  # a value may be empty
    assert lines["torch"] == torch.__version__ and lines["numpy"] == np.__version__
    assert {"python", "triton", "TRITON_INTERPRET", "device"} <= set(lines)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert lines["backend torch"] == f"available on {device}"
    assert lines["backend reference"] == f"available on {device}"
    assert "backend xformers" in lines and "backend triton" in lines
