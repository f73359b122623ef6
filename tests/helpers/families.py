"""Tiny random causal LMs of every family that causal-LM pruning supports (`prune.lm.LM_FAMILIES`): 4 layers, hidden
48, 6 query heads of size 8 in 2 key/value groups of 3, FFN 96. Windowed attention (4 tokens) is shorter than the
batches, and the Gemmas mix windowed and full layers in an order that no prefix of it repeats, so a pruned model that
gives a layer the wrong attention kind computes something else."""
from __future__ import annotations

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Phi3Config,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen3Config,
)

VOCAB = 64
HEADS, KV_HEADS, HEAD_DIM, HIDDEN, FFN, LAYERS = 6, 2, 8, 48, 96, 4
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
              num_key_value_heads=KV_HEADS, intermediate_size=FFN, max_position_embeddings=64, pad_token_id=0,
              bos_token_id=1, eos_token_id=2)
SLIDING, FULL = "sliding_attention", "full_attention"
WINDOWED = dict(sliding_window=4)
MIXED = dict(sliding_window=4, layer_types=[SLIDING, FULL, SLIDING, SLIDING])
FAMILIES = {
    "llama": (LlamaConfig, dict(head_dim=HEAD_DIM)),
    "mistral": (MistralConfig, dict(head_dim=HEAD_DIM, **WINDOWED)),
    "qwen2": (Qwen2Config, dict(use_sliding_window=True, max_window_layers=2, **WINDOWED)),  # layers 2, 3 windowed
    "qwen3": (Qwen3Config, dict(head_dim=HEAD_DIM, use_sliding_window=True, max_window_layers=2, **WINDOWED)),
    "gemma2": (Gemma2Config, dict(head_dim=HEAD_DIM, **MIXED)),
    "gemma3_text": (Gemma3TextConfig, dict(head_dim=HEAD_DIM, **MIXED)),
    "phi3": (Phi3Config, dict()),  # fused qkv_proj and gate_up_proj, head_dim derived from the config
}


def family_config(family: str, **overrides) -> PretrainedConfig:
    cls, extra = FAMILIES[family]
    return cls(**{**COMMON, **extra, **overrides})


def tiny_family_model(family: str, seed: int = 0, **overrides) -> PreTrainedModel:
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(family_config(family, **overrides)).eval()


def lm_batch(seed: int = 0) -> dict:
    """4 texts of 12 tokens (the first padded after 9), labelled with their own ids."""
    ids = torch.randint(3, VOCAB, (4, 12), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, 9:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


def model_inputs(batch: dict) -> dict:
    return {k: v for k, v in batch.items() if k != "labels"}
