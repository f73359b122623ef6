"""A causal-LM corpus as every LM job splits it: tokenized once, its last `test_examples` texts the test slice, the
`validation_examples` before them the validation slice, the rest the training part; and the collator that pads
texts and marks every real token as a target."""
from __future__ import annotations

import torch
from datasets import Dataset, DatasetDict
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from distill.core.errors import ConfigError
from distill.core.fingerprint import token_ids_sha256
from distill.core.sources import corpus_token_ids
from distill.losses.causal.fused import IGNORE_INDEX


class LMCollator:
    """Pads token ids and adds `labels`: the input ids, -100 at padding (plain text: every real token is a target)."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.pad(features)
        batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
        return batch


def held_out_splits(examples: list[list[int]], cfg, with_cache_index: bool
                    ) -> tuple[DatasetDict, dict[str, list[int]]]:
    """train / validation / test slices of the corpus, in its order, and their [start, end) indices into it (with
    the corpus fingerprint). With `with_cache_index`, each example carries its corpus index for the cache."""
    test_start = len(examples) - cfg.test_examples
    validation_start = test_start - cfg.validation_examples
    if validation_start < 1:
        raise ConfigError(f"the corpus has {len(examples)} texts: too few to hold out {cfg.validation_examples} for "
                          f"validation and {cfg.test_examples} for test and train on the rest; raise data.limit")
    columns = {"input_ids": examples, **({"cache_index": list(range(len(examples)))} if with_cache_index else {})}
    corpus = Dataset.from_dict(columns)
    bounds = {"train": [0, validation_start], "validation": [validation_start, test_start],
              "test": [test_start, len(examples)]}
    splits = DatasetDict({name: corpus.select(range(*span)) for name, span in bounds.items()})
    return splits, {**bounds, "corpus_sha256": token_ids_sha256(examples)}


def evaluation_texts(cfg, tokenizer: PreTrainedTokenizerBase) -> dict[str, list[list[int]]]:
    """The token ids of the validation and test texts of `cfg.data`, split as `held_out_splits` splits it, the first
    `cfg.eval_examples` of each (None: all)."""
    splits, _ = held_out_splits(corpus_token_ids(cfg.data, tokenizer), cfg, with_cache_index=False)
    limit = cfg.eval_examples
    return {name: splits[name]["input_ids"][:limit] if limit else splits[name]["input_ids"]
            for name in ("validation", "test")}
