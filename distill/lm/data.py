"""A causal-LM corpus as every LM job splits it: tokenized once, its last `test_examples` texts the test slice, the
`validation_examples` before them the validation slice, the rest the training part; and the collator that pads
examples and marks every real token as a target, a prompt's tokens excepted."""
from __future__ import annotations

import torch
from datasets import Dataset, DatasetDict
from transformers import DataCollatorWithPadding, PreTrainedTokenizerBase

from distill.core.chat import TokenizedCorpus
from distill.core.data import corpus_tokens
from distill.core.errors import ConfigError
from distill.core.fingerprint import token_ids_sha256
from distill.core.loss_interface import POSITION_IDS, TEACHER_INPUTS
from distill.losses.causal.cross_tokenizer import ALIGNED_KEYS
from distill.losses.causal.fused import IGNORE_INDEX

PROMPT_LENGTH = "prompt_length"
"""The column of a prompt/completion example's prompt length: its tokens are read, not learned."""


class LMCollator:
    """Pads token ids and adds `labels`: the input ids, -100 at padding and, for examples that carry a
    `prompt_length`, at the prompt's tokens (only the completion's tokens are targets). Examples that carry their own
    `labels` (packed blocks, sliding windows) keep them, padded with -100, and their `position_ids`, padded with 0."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase):
        self.pad = DataCollatorWithPadding(tokenizer, return_tensors="pt")

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        own = (PROMPT_LENGTH, POSITION_IDS, "labels")
        batch = self.pad([{k: v for k, v in feature.items() if k not in own} for feature in features])
        if "labels" in features[0]:
            batch["labels"] = padded([feature["labels"] for feature in features], IGNORE_INDEX)
        else:
            batch["labels"] = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, IGNORE_INDEX)
            for row, feature in enumerate(features):
                batch["labels"][row, :feature.get(PROMPT_LENGTH, 0)] = IGNORE_INDEX
        if POSITION_IDS in features[0]:
            batch[POSITION_IDS] = padded([feature[POSITION_IDS] for feature in features], 0)
        return batch


class CrossTokenizerCollator:
    """`LMCollator` over the student's ids, plus the teacher's own tokenization of each text (padded with its pad id)
    and the aligned position pairs (padded with -1), under batch keys that no model reads as input."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, teacher_pad_id: int):
        self.lm, self.teacher_pad_id = LMCollator(tokenizer), teacher_pad_id

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = self.lm([{"input_ids": feature["input_ids"]} for feature in features])
        teacher_ids = [feature[TEACHER_INPUTS[0]] for feature in features]
        batch[TEACHER_INPUTS[0]] = padded(teacher_ids, self.teacher_pad_id)
        batch[TEACHER_INPUTS[1]] = padded([[1] * len(ids) for ids in teacher_ids], 0)
        for key in ALIGNED_KEYS:
            batch[key] = padded([feature[key] for feature in features], -1)
        return batch


def padded(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(1, max(len(row) for row in rows))
    return torch.tensor([list(row) + [value] * (width - len(row)) for row in rows], dtype=torch.long)


def held_out_splits(corpus: TokenizedCorpus, cfg, with_cache_index: bool
                    ) -> tuple[DatasetDict, dict[str, list[int]]]:
    """train / validation / test slices of the corpus, in its order, and their [start, end) indices into it (with
    the corpus fingerprint). With `with_cache_index`, each example carries its corpus index for the cache; with
    prompts, each its `prompt_length`."""
    examples = corpus.ids
    test_start = len(examples) - cfg.test_examples
    validation_start = test_start - cfg.validation_examples
    if validation_start < 1:
        raise ConfigError(f"the corpus has {len(examples)} texts: too few to hold out {cfg.validation_examples} for "
                          f"validation and {cfg.test_examples} for test and train on the rest; raise data.limit")
    columns = {"input_ids": examples, **({"cache_index": list(range(len(examples)))} if with_cache_index else {}),
               **({PROMPT_LENGTH: corpus.prompt_lengths} if corpus.prompt_lengths is not None else {}),
               **corpus.columns}
    corpus_set = Dataset.from_dict(columns)
    bounds = {"train": [0, validation_start], "validation": [validation_start, test_start],
              "test": [test_start, len(examples)]}
    splits = DatasetDict({name: corpus_set.select(range(*span)) for name, span in bounds.items()})
    return splits, {**bounds, "corpus_sha256": token_ids_sha256(examples)}


def calibration_ids(cfg, tokenizer: PreTrainedTokenizerBase) -> list[list[int]]:
    """The token ids of the first `cfg.calibration.examples` training texts of `cfg.data` (split as
    `held_out_splits` splits it): the calibration text of pruning, of the importance matrix and of GPTQ."""
    splits, _ = held_out_splits(corpus_tokens(cfg.data, tokenizer), cfg, with_cache_index=False)
    return splits["train"]["input_ids"][:cfg.calibration.examples]


def evaluation_texts(cfg, tokenizer: PreTrainedTokenizerBase) -> dict[str, list[list[int]]]:
    """The token ids of the validation and test texts of `cfg.data`, split as `held_out_splits` splits it, the first
    `cfg.eval_examples` of each (None: all)."""
    splits, _ = held_out_splits(corpus_tokens(cfg.data, tokenizer), cfg, with_cache_index=False)
    limit = cfg.eval_examples
    return {name: splits[name]["input_ids"][:limit] if limit else splits[name]["input_ids"]
            for name in ("validation", "test")}


def text_prompts(texts: list[list[int]], tokens: int) -> list[list[int]]:
    """Each text's opening as a prompt: its first `tokens` token ids, fewer for a text too short to leave one of its
    tokens to continue."""
    return [ids[:max(min(tokens, len(ids) - 1), 1)] for ids in texts]
