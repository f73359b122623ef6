"""Quantization of a causal LM measured by perplexity: every variant of a tiny Llama is saved, reloads to the same
logits, and is measured on the held-out texts (perplexity by hand, next-token agreement with the teacher); a
classifier is refused by name."""
import json
import math

import pytest
import torch

from distill.core.config import CorpusConfig
from distill.core.errors import ConfigError
from quant.config import LMQuantConfig
from quant.lm import check_causal_lm, quantize_lm, text_perplexity
from tests.conftest import make_sentences, save_tiny_teacher, tiny_causal_lm
from tests.prune.test_lm_prune import save_tiny_lm


def quant_cfg(tmp_path, model_dir, **overrides) -> LMQuantConfig:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(text for text, _ in make_sentences(40, seed=2)) + "\n")
    values = dict(model=str(model_dir), output_dir=str(tmp_path / "quant"), variants=["fp32", "bf16", "dynamic_int8"],
                  data=CorpusConfig(source=str(corpus), max_length=16), validation_examples=5, test_examples=6,
                  eval_examples=4)
    values.update(overrides)
    return LMQuantConfig(**values)


def test_variants_reload_and_are_measured_by_perplexity_and_agreement(tmp_path):
    cfg = quant_cfg(tmp_path, save_tiny_lm(tmp_path / "lm"))
    quantize_lm(cfg)
    metrics = json.loads((tmp_path / "quant" / "metrics.json").read_text())
    rows = metrics["variants"]
    assert list(rows) == ["fp32", "bf16", "dynamic_int8"] and metrics["texts"] == {"validation": 4, "test": 4}
    assert all(row["reload_equal"] for row in rows.values())
    assert rows["fp32"]["next_token_agreement"] == 1.0  # the teacher is the model itself
    assert rows["bf16"]["weight_mb"] == pytest.approx(rows["fp32"]["weight_mb"] / 2, rel=0.01)
    for row in rows.values():
        assert row["test_perplexity"] == pytest.approx(rows["fp32"]["test_perplexity"], rel=0.05)
    assert "| dynamic_int8 |" in (tmp_path / "quant" / "report.md").read_text()


def test_text_perplexity_is_exp_of_the_mean_next_token_nll():
    model = tiny_causal_lm(12, tied=True)
    texts = [[3, 5, 7, 2], [4, 4, 9]]
    nll, count = 0.0, 0
    for ids in texts:
        log_probs = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
        nll -= sum(log_probs[t, ids[t + 1]].item() for t in range(len(ids) - 1))
        count += len(ids) - 1
    assert text_perplexity(model, texts) == pytest.approx(math.exp(nll / count), rel=1e-5)


def test_a_classifier_is_refused_by_name(tmp_path):
    with pytest.raises(ConfigError, match="is not a causal LM"):
        check_causal_lm(str(save_tiny_teacher(tmp_path / "classifier")))
