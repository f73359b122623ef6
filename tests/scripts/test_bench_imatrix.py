"""scripts/bench_imatrix.py on a tiny Llama: both exports run, and the table's ratios follow from their metrics."""
import json

import pytest

import bench_imatrix
from tests.conftest import save_smollm2_tokenizer_lm, write_review_corpus

pytest.importorskip("llama_cpp", reason="scripts/setup.sh builds llama.cpp's bindings")


def test_with_and_without_the_matrix_side_by_side(tmp_path, capsys):
    save_smollm2_tokenizer_lm(tmp_path / "lm", hidden_size=256, intermediate_size=512, initializer_range=0.2)
    write_review_corpus(tmp_path / "corpus.txt", 80)
    bench_imatrix.main([f"model={tmp_path / 'lm'}", f"output_dir={tmp_path / 'out'}", "types=[f16,q2_k]",
                        f"data.source={tmp_path / 'corpus.txt'}", "data.max_length=32", "validation_examples=5",
                        "test_examples=10", "eval_examples=4", "prompts=[The acting]", "max_new_tokens=4",
                        "--examples", "60", "--json", str(tmp_path / "bench.json")])
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].startswith("| type | disk MB | test ppl (imatrix / plain) | gap to F16 (imatrix / plain) |")
    assert len(lines) == 5 and lines[4].startswith("| q2_k | ")
    saved = json.loads((tmp_path / "bench.json").read_text())
    runs, (row,) = saved["runs"], saved["rows"]
    assert runs["imatrix"]["imatrix"]["texts"] == 60 and runs["plain"]["imatrix"] is None
    f16 = runs["plain"]["types"]["f16"]["test_perplexity"]
    gap = {run: runs[run]["types"]["q2_k"]["test_perplexity"] / f16 - 1 for run in ("imatrix", "plain")}
    assert row["gap_ratio"] == pytest.approx(gap["imatrix"] / gap["plain"])
    kld = {run: runs[run]["types"]["q2_k"]["kld_mean"] for run in ("imatrix", "plain")}
    assert row["kld_ratio"] == pytest.approx(kld["imatrix"] / kld["plain"])
    assert f"{row['kld_ratio']:.2f}x" in lines[4]
