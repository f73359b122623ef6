"""scripts/bench_generation.py on a tiny model and its GGUF: every model is measured in its own process, and the
bandwidth figures follow from the measured copy bandwidth and the bytes of the weights."""
import json

import bench_generation as bench
import pytest

from distill.core.config import CorpusConfig
from quant.config import GgufConfig
from quant.export.gguf import export_gguf
from tests.conftest import save_smollm2_tokenizer_lm, write_review_corpus

pytest.importorskip("llama_cpp", reason="scripts/setup.sh builds llama.cpp's bindings")


def test_speed_rows_and_the_bandwidth_limit(tmp_path):
    model = save_smollm2_tokenizer_lm(tmp_path / "lm")
    corpus = write_review_corpus(tmp_path / "corpus.txt", 30)
    export_gguf(GgufConfig(model=str(model), output_dir=str(tmp_path / "gguf"), types=["f16"],
                           data=CorpusConfig(source=str(corpus), max_length=16), validation_examples=4,
                           test_examples=4, eval_examples=2, prompts=["the film"], max_new_tokens=2))
    gguf = tmp_path / "gguf" / "model-f16.gguf"
    out = tmp_path / "bench.json"
    bench.main(["--model", f"tiny={model}", "--model", f"tiny_f16={gguf}", "--prompt-tokens", "16",
                "--new-tokens", "4", "--rounds", "1", "--json", str(out)])
    result = json.loads(out.read_text())
    rows = {row["model"]: row for row in result["rows"]}
    assert rows["tiny"]["weight_mb"] == pytest.approx(sum(f.stat().st_size for f in model.glob("*.safetensors")) / 1e6)
    assert rows["tiny_f16"]["weight_mb"] < gguf.stat().st_size / 1e6  # tensors only, not the vocabulary metadata
    for row in rows.values():
        assert row["decode_tokens_per_s"] > 0 and row["prefill_tokens_per_s"] > 0
        limit = result["bandwidth_bytes_per_s"]["read"] / (row["weight_mb"] * 1e6)
        assert row["bandwidth_limit_tokens_per_s"] == pytest.approx(limit)
        assert row["of_bandwidth_limit"] == pytest.approx(row["decode_tokens_per_s"] / limit)
        assert 0 < row["peak_rss_mb"] < 4000
