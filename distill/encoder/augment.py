"""Data augmentation for task distillation, after TinyBERT (Jiao et al. 2020): copies of each training text in
which words are replaced by words that keep the sentence plausible; the teacher labels every copy (a copy's own
label is ignored, since a replacement may flip it).

TinyBERT draws replacements from BERT's masked-LM predictions and GloVe neighbours. A fine-tuned classifier
teacher has no masked-LM head, so the candidates here are the nearest neighbours of a word in the teacher's own
input embedding (cosine), among the whole-word tokens that the training texts use: the teacher knows them, and a
student whose vocabulary is later pruned to the training texts keeps them. Words that the tokenizer splits into
several pieces are never replaced. Copies are seeded: the same config writes the same copies."""
from __future__ import annotations

import random

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.core.errors import ConfigError
from distill.encoder.config import AugmentConfig

NEIGHBOUR_CHUNK = 2048


def check_augment(cfg: AugmentConfig) -> None:
    if cfg.copies < 0:
        raise ConfigError(f"augment.copies must be at least 0; got {cfg.copies}")
    if not 0 < cfg.rate <= 1:
        raise ConfigError(f"augment.rate must be in (0, 1]; got {cfg.rate}")
    if cfg.candidates < 1:
        raise ConfigError(f"augment.candidates must be at least 1; got {cfg.candidates}")


def whole_word_ids(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> dict[str, int]:
    """The words of `texts` (split on whitespace) that the tokenizer makes one alphabetic, non-special token."""
    words = list(dict.fromkeys(word for text in texts for word in text.split()))
    special = set(tokenizer.all_special_ids)
    found = {}
    for word, ids in zip(words, tokenizer(words, add_special_tokens=False)["input_ids"]):
        if len(ids) == 1 and ids[0] not in special and tokenizer.convert_ids_to_tokens(ids[0]).isalpha():
            found[word] = ids[0]
    return found


@torch.no_grad()
def neighbours(embedding: torch.Tensor, ids: list[int], k: int) -> torch.Tensor:
    """For each of `ids`, the positions (into `ids`) of its `k` nearest other ids by cosine of `embedding` rows."""
    vectors = torch.nn.functional.normalize(embedding[ids].float(), dim=-1)
    k = min(k, len(ids) - 1)
    found = []
    for start in range(0, len(ids), NEIGHBOUR_CHUNK):
        similarity = vectors[start:start + NEIGHBOUR_CHUNK] @ vectors.T
        rows = torch.arange(similarity.shape[0])
        similarity[rows, rows + start] = -float("inf")
        found.append(similarity.topk(k, dim=-1).indices)
    return torch.cat(found)


class Augmenter:
    """Replaces words of a text by embedding neighbours, as `AugmentConfig` says."""

    def __init__(self, cfg: AugmentConfig, teacher: PreTrainedModel, tokenizer: PreTrainedTokenizerBase,
                 texts: list[str]):
        self.cfg = cfg
        words = whole_word_ids(tokenizer, texts)
        if len(words) < 2:
            raise ConfigError("augment: the training texts have fewer than two whole-word tokens to swap")
        self.words = list(words)
        table = neighbours(teacher.get_input_embeddings().weight, list(words.values()), cfg.candidates)
        self.candidates = {word: [self.words[j] for j in row] for word, row in zip(self.words, table.tolist())}

    def copies(self, texts: list[str]) -> list[str]:
        """`cfg.copies` augmented copies of each text, copies of one text together, in the order of `texts`."""
        rng = random.Random(self.cfg.seed)
        return [self.augment(text, rng) for text in texts for _ in range(self.cfg.copies)]

    def augment(self, text: str, rng: random.Random) -> str:
        out = []
        for word in text.split():
            options = self.candidates.get(word)
            out.append(rng.choice(options) if options and rng.random() < self.cfg.rate else word)
        return " ".join(out)
