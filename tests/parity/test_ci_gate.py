"""The parity oracle cannot silently vanish: in CI a broken FlagEmbedding import fails the run.

Reproduces the upstream break (transformers 5.24 removed a module FlagEmbedding 1.4.2 imports)
with a FlagEmbedding package whose import raises, put first on the path of a child pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _collect_parity(tmp_path: Path, ci: bool) -> subprocess.CompletedProcess[str]:
    broken = tmp_path / "broken" / "FlagEmbedding"
    broken.mkdir(parents=True, exist_ok=True)
    (broken / "__init__.py").write_text(
        "raise ImportError(\"cannot import name 'AttentionMaskConverter' from "
        "'transformers.modeling_attn_mask_utils'\")\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "CI"}
    env["PYTHONPATH"] = os.pathsep.join([str(broken.parent), env.get("PYTHONPATH", "")])
    if ci:
        env["CI"] = "true"
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "tests/parity/test_parity.py",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_broken_oracle_fails_in_ci(tmp_path: Path) -> None:
    run = _collect_parity(tmp_path, ci=True)
    assert run.returncode not in (0, 5), run.stdout[-2000:]
    assert "CI must run every check: FlagEmbedding cannot be imported" in run.stdout


def test_broken_oracle_skips_with_a_reason_outside_ci(tmp_path: Path) -> None:
    run = _collect_parity(tmp_path, ci=False)
    assert run.returncode in (0, 5), run.stdout[-2000:]
    assert "SKIPPED" in run.stdout and "FlagEmbedding cannot be imported" in run.stdout
    assert "constraints.txt" in run.stdout  # the reason says how to install the reference


def test_ci_script_calls_the_readme_test_command_with_the_lock() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    readme = (ROOT / "README.md").read_text()
    # the very line the README gives, on a line of its own in both
    assert "\npython -m pytest tests\n" in ci and "\npython -m pytest tests\n" in readme
    assert ci.count("-c constraints.txt") >= 2 and "-c constraints.txt" in readme
