"""GGUF export through llama.cpp's own converter and quantizer, checked in llama.cpp itself: a tiny random Llama with
the offline SmolLM2 tokenizer (a tokenizer llama.cpp's converter knows) exports to F16, Q8_0 and Q4_0; the F16 file
continues every prompt greedily exactly as transformers does, tokenizes as transformers does, and has the same
perplexity on the test texts; the quantized files run and stay close. Types llama.cpp does not know, models with
per-layer widths and unsupported families are refused before any work."""
import json

import pytest

from distill.core.config import CorpusConfig
from distill.core.errors import ConfigError
from quant.config import GgufConfig
from quant.gguf import check_gguf, export_gguf
from tests.conftest import save_smollm2_tokenizer_lm, write_review_corpus

pytest.importorskip("llama_cpp", reason="scripts/setup.sh builds llama.cpp's bindings")


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    """A 2-layer Llama whose logits are spread enough (initializer_range 0.2) that greedy choices are not near-ties,
    saved with SmolLM2's tokenizer, and a small corpus."""
    root = tmp_path_factory.mktemp("gguf")
    save_smollm2_tokenizer_lm(root / "lm", initializer_range=0.2)
    write_review_corpus(root / "corpus.txt", 40)
    return root


def gguf_cfg(root, **overrides) -> GgufConfig:
    values = dict(model=str(root / "lm"), output_dir=str(root / "out"), types=["f16", "q8_0", "q4_0"],
                  data=CorpusConfig(source=str(root / "corpus.txt"), max_length=32), validation_examples=5,
                  test_examples=10, eval_examples=6, prompts=["This movie was", "The acting"], max_new_tokens=12)
    values.update(overrides)
    return GgufConfig(**values)


def test_f16_matches_transformers_in_llama_cpp_and_quantized_files_run(tiny_lm):
    result = export_gguf(gguf_cfg(tiny_lm))
    rows = result.metrics["types"]
    f16, reference = rows["f16"], rows["transformers_fp32"]["test_perplexity"]
    assert f16["greedy_equal"] and f16["greedy_token_agreement"] == 1.0 and f16["tokenizer_equal"]
    assert f16["test_perplexity"] == pytest.approx(reference, rel=1e-2)
    for name in ("q8_0", "q4_0"):
        assert (tiny_lm / "out" / f"model-{name}.gguf").is_file()
        assert rows[name]["disk_mb"] < f16["disk_mb"]
        assert rows[name]["test_perplexity"] == pytest.approx(reference, rel=0.2)
    saved = json.loads((tiny_lm / "out" / "metrics.json").read_text())
    assert set(saved["types"]) == {"transformers_fp32", "f16", "q8_0", "q4_0"}


@pytest.mark.parametrize("types, message", [
    (["f16", "q4_k_x"], "types: llama.cpp knows no GGUF type 'q4_k_x'; did you mean 'q4_k_"),
    (["f16", "f16"], "types lists a type twice"),
    ([], "types lists nothing"),
])
def test_types_llama_cpp_does_not_know_are_refused(tiny_lm, types, message):
    with pytest.raises(ConfigError, match=message):
        check_gguf(gguf_cfg(tiny_lm, types=types))


def test_per_layer_widths_and_other_families_are_refused_before_any_work(tmp_path, tiny_lm):
    compressed = tmp_path / "compressed"
    compressed.mkdir()
    config = json.loads((tiny_lm / "lm" / "config.json").read_text())
    (compressed / "config.json").write_text(json.dumps({**config, "compression": {"linear_shapes": {}}}))
    with pytest.raises(ConfigError, match="per-layer shapes .* that llama.cpp cannot run"):
        check_gguf(gguf_cfg(tiny_lm, model=str(compressed)))
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ConfigError, match="GGUF export supports the families llama, .*; 'gpt2' is not one of them"):
        check_gguf(gguf_cfg(tiny_lm, model=str(gpt2)))
