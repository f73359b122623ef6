"""The pruning tests' shared setting: tiny random Llama and encoder models over a 3-word vocabulary, and a pruning
run's config with one round of distil-recovery."""
from __future__ import annotations

import torch
from transformers import (
    BertForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    RobertaConfig,
    RobertaForSequenceClassification,
)

from distill.core.config import LossConfig, StageConfig
from prune.config import ImportanceConfig, PruneConfig, UnitPruneConfig
from tests.conftest import data_cfg, make_tokenizer, tiny_bert_config, train_cfg

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
