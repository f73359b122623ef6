"""Quantization of a causal LM measured by perplexity, on a tiny Llama trained until its next tokens are confident:
every variant is saved, reloads to the same logits and is what it claims (bf16 weights, int8 dynamic Linears); each
predicts as the fp32 model does (greedy agreement and KL computed here, independently of the job); the job's reported
perplexity and agreement with a teacher are the ones computed here; a classifier is refused by name."""
import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from distill.core.config import CorpusConfig
from distill.core.errors import ConfigError
from distill.core.models import load_tokenizer
from distill.lm.data import evaluation_texts
from quant.config import LMQuantConfig
from quant.quantize_lm import check_causal_lm, quantize_lm, text_perplexity
from quant.schemes.variants import load_variant
from tests.conftest import make_tokenizer, save_tiny_teacher, tiny_causal_lm
from tests.helpers.lm_models import cycle_lines, train_causal_lm
from tests.helpers.lm_runs import WORDS

VARIANTS = ["fp32", "bf16", "dynamic_int8"]
WEIGHT_DTYPE = {"fp32": torch.float32, "bf16": torch.bfloat16, "dynamic_int8": torch.qint8}
MAX_KL = {"fp32": 1e-9, "bf16": 3e-4, "dynamic_int8": 5e-3}
"""Mean KL(fp32 || variant) per next token, in nats: about 10x what bf16 (2e-5) and dynamic int8 (6e-4) measure."""


def save_trained_lm(folder, tokenizer, lines, steps):
    model = tiny_causal_lm(len(tokenizer), tied=True)
    train_causal_lm(model, [tokenizer(line)["input_ids"] for line in lines], steps).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def quantized(tmp_path_factory):
    """The quantization job on the trained model, with a teacher trained for a few steps only (it agrees with the
    model at some positions, so the reported agreement is a measurement, not 1.0)."""
    root = tmp_path_factory.mktemp("lm-quant")
    tokenizer, lines = make_tokenizer(WORDS), cycle_lines(WORDS, 40, seed=2)
    (root / "corpus.txt").write_text("\n".join(lines) + "\n")
    cfg = LMQuantConfig(model=str(save_trained_lm(root / "lm", tokenizer, lines, 60)),
                        teacher=str(save_trained_lm(root / "teacher", tokenizer, lines, 8)),
                        output_dir=str(root / "quant"), variants=VARIANTS,
                        data=CorpusConfig(source=str(root / "corpus.txt"), max_length=16), validation_examples=5,
                        test_examples=6, eval_examples=4)
    quantize_lm(cfg)
    texts = evaluation_texts(cfg, load_tokenizer(cfg.model))["test"]
    return cfg, json.loads((root / "quant" / "metrics.json").read_text()), texts


@torch.no_grad()
def log_probs(model, texts) -> torch.Tensor:
    """Next-token log-probabilities at every position of every text, in float64."""
    return torch.cat([torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1) for ids in texts])


def fp32_log_probs(folder, texts) -> torch.Tensor:
    return log_probs(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), texts)


def variant(cfg, name):
    return load_variant(f"{cfg.output_dir}/{name}").eval()


def weight_dtype(linear) -> torch.dtype:
    weight = linear.weight
    return (weight() if callable(weight) else weight).dtype  # a dynamic int8 Linear's weight is a method


def test_variants_reload_and_are_what_they_claim(quantized):
    cfg, metrics, texts = quantized
    rows = metrics["variants"]
    assert list(rows) == VARIANTS and metrics["texts"] == {"validation": 4, "test": 4} and len(texts) == 4
    assert all(row["reload_equal"] for row in rows.values())
    assert rows["bf16"]["weight_mb"] == pytest.approx(rows["fp32"]["weight_mb"] / 2, rel=0.01)
    for name in VARIANTS:
        assert weight_dtype(variant(cfg, name).model.layers[0].mlp.down_proj) == WEIGHT_DTYPE[name]
    assert "| dynamic_int8 |" in Path(cfg.output_dir, "report.md").read_text()


@pytest.mark.parametrize("name", VARIANTS)
def test_each_variant_predicts_as_the_fp32_model_does(quantized, name):
    cfg, _, texts = quantized
    reference, got = fp32_log_probs(cfg.model, texts), log_probs(variant(cfg, name), texts)
    assert reference.max(-1).values.exp().mean() > 0.8  # confident: a corrupted model cannot stay close by chance
    assert (got.argmax(-1) == reference.argmax(-1)).float().mean() >= 0.97
    assert (reference.exp() * (reference - got)).sum(-1).mean() <= MAX_KL[name]


@pytest.mark.parametrize("name", VARIANTS)
def test_reported_perplexity_and_agreement_are_the_variants_own(quantized, name):
    cfg, metrics, texts = quantized
    row = metrics["variants"][name]
    got, teacher = log_probs(variant(cfg, name), texts), fp32_log_probs(cfg.teacher, texts)
    targets = torch.cat([torch.tensor(ids[1:] + [0]) for ids in texts])
    real = torch.cat([torch.arange(len(ids)) < len(ids) - 1 for ids in texts])  # a text's last token predicts nothing
    nll = -got[torch.arange(len(targets)), targets][real].mean().item()
    agreement = (got.argmax(-1) == teacher.argmax(-1)).float().mean().item()
    assert row["test_perplexity"] == pytest.approx(math.exp(nll), rel=1e-6) and math.exp(nll) < 2.0
    assert row["next_token_agreement"] == pytest.approx(agreement) and 0.2 < agreement < 0.95


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
