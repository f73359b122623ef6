"""The pruning tests' shared setting: tiny random Llama and encoder models over a 3-word vocabulary, a pruning run's
config with one round of distil-recovery, and a causal-LM pruning job's config over a tiny word-level Llama."""
from __future__ import annotations

import torch
from transformers import (
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from distill.core.config import CorpusConfig, LossConfig, StageConfig
from prune.config import (
    CalibrationConfig,
    DepthConfig,
    ImportanceConfig,
    LMPruneConfig,
    PruneConfig,
    UnitPruneConfig,
    WidthConfig,
)
from tests.conftest import data_cfg, make_sentences, make_tokenizer, tiny_bert_config, tiny_causal_lm, train_cfg
from tests.helpers.lm_runs import WORDS

TOKENIZER = make_tokenizer(["good", "bad", "film"])
RECOVERY = StageConfig(name="recover", epochs=1, learning_rate=1e-3,
                       losses=[LossConfig(name="kl", temperature=2.0), LossConfig(name="hidden_mse")])


def tiny_llama(**overrides):
    values = dict(vocab_size=len(TOKENIZER), hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                  num_key_value_heads=2, intermediate_size=48, max_position_embeddings=64)
    values.update(overrides)
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**values)).eval()


def tiny_encoder(kind="bert"):
    torch.manual_seed(0)
    if kind == "roberta":
        config = RobertaConfig(**tiny_bert_config(len(TOKENIZER)).to_dict() | {"model_type": "roberta",
                                                                                 "pad_token_id": 0})
        return RobertaForSequenceClassification(config).eval()
    return BertForSequenceClassification(tiny_bert_config(len(TOKENIZER))).eval()


def prune_cfg(csv, model, out, **overrides):
    values = dict(model=str(model), output_dir=str(out), data=data_cfg(csv), recovery=RECOVERY, train=train_cfg(),
                  importance=ImportanceConfig(criterion="taylor", batches=2),
                  heads=UnitPruneConfig(fraction=0.5), ffn=UnitPruneConfig(fraction=0.25, scope="layer"))
    values.update(overrides)
    return PruneConfig(**values)


def save_tiny_lm(folder):
    tokenizer = make_tokenizer(WORDS)
    tiny_causal_lm(len(tokenizer), tied=True).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def job_cfg(tmp_path, model_dir, **overrides) -> LMPruneConfig:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(text for text, _ in make_sentences(150, seed=1)) + "\n")
    values = dict(model=str(model_dir), output_dir=str(tmp_path / "run"), validation_examples=10, test_examples=10,
                  data=CorpusConfig(source=str(corpus), max_length=16), calibration=CalibrationConfig(examples=120),
                  width=WidthConfig(intermediate_size=32, key_value_heads=1), depth=DepthConfig(count=1))
    values.update(overrides)
    return LMPruneConfig(**values)
