"""The tiny checkpoints the tests build are the same in every process.

Ranking tests assert which document comes first, so a fixture that changed from run to run
would make them pass on one machine and fail on another.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

_BUILD = """
import sys
from m3_rag.testing import build_m3_checkpoint
build_m3_checkpoint(sys.argv[1])
"""


def test_the_tiny_m3_checkpoint_is_byte_identical_across_processes(tmp_path: Path) -> None:
    # the tokenizer trainer breaks ties with a per-process hash seed: two processes
    # used to give two vocabularies (other token ids, so another random model)
    for name in ("a", "b"):
        subprocess.run([sys.executable, "-c", _BUILD, str(tmp_path / name)], check=True)
    for f in ("tokenizer.json", "model.safetensors", "colbert_linear.pt", "sparse_linear.pt"):
        first = (tmp_path / "a" / f).read_bytes()
        assert (tmp_path / "b" / f).read_bytes() == first, f
