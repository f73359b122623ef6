"""Tiny causal LMs of every decoder family the framework supports, each with layers of both attention kinds (sliding
window and full) where the family has them, so that a student that takes the wrong layers' kinds shows it."""
from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from tests.conftest import make_tokenizer
from tests.helpers import families
from tests.helpers.families import FAMILIES, FULL, SLIDING
from tests.helpers.lm_runs import WORDS

TEACHER_LAYERS = 6
WIDTHS = dict(hidden_size=16, intermediate_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=4,
              max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3)
MIXED = [SLIDING, FULL, SLIDING, SLIDING, FULL, SLIDING]
"""The Gemmas' attention kinds, listed: neither their alternation nor Gemma3's five-to-one rule, nor any prefix of
them, gives the kinds of every subset of layers."""
QWEN_WINDOW_ABOVE = 3
"""Qwen's rule: layers 0-2 attend fully, the layers above through the 4-token window."""


def family_config(family: str, layers: int = TEACHER_LAYERS, vocab_size: int = len(WORDS) + 5) -> PretrainedConfig:
    """`families.family_config` at the students' widths, with more layers, both attention kinds among them."""
    kinds = {"layer_types": MIXED[:layers]} if "layer_types" in FAMILIES[family][1] else {}
    window = {"max_window_layers": QWEN_WINDOW_ABOVE} if "max_window_layers" in FAMILIES[family][1] else {}
    return families.family_config(family, vocab_size=vocab_size, num_hidden_layers=layers, **WIDTHS, **kinds,
                                  **window)


def save_family_lm(family: str, folder: Path, layers: int = TEACHER_LAYERS, seed: int = 0) -> Path:
    """A random model of `family` with the word-level tokenizer of tests.conftest."""
    torch.manual_seed(seed)
    AutoModelForCausalLM.from_config(family_config(family, layers)).save_pretrained(folder)
    make_tokenizer(WORDS).save_pretrained(folder)
    return folder


def layer_types(config: PretrainedConfig) -> list[str] | None:
    """Each layer's attention kind; None for families whose layers are all alike."""
    return getattr(config, "layer_types", None)
