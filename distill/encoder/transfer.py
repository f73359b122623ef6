"""Unlabelled transfer sets: text the student learns the teacher's outputs on, beside or instead of the labelled
task data (DistilBERT, MiniLM and TinyBERT distil on far more text than the task has labels for).

A transfer example carries the label `IGNORED_LABEL`, so hard-label losses skip it while every loss that reads the
teacher uses it. Long documents (IMDB reviews) can be cut into sentences, so that a sentence-level task (Rotten
Tomatoes) sees transfer text of its own length."""
from __future__ import annotations

import dataclasses
import logging
import random
import re
from typing import Optional

import datasets
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from distill.core.config import DataConfig
from distill.core.data import load_splits, source_texts
from distill.core.errors import ConfigError
from distill.core.loss_interface import IGNORED_LABEL
from distill.core.run import Task
from distill.encoder.augment import Augmenter
from distill.encoder.config import AugmentConfig, TextSetConfig, TransferConfig

logger = logging.getLogger(__name__)

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
MARKUP = re.compile(r"<br\s*/?>|<[a-z]+\s*/?>", re.IGNORECASE)


def check_transfer(cfg: TransferConfig) -> None:
    if cfg.source is None:
        if not cfg.with_task_data:
            raise ConfigError("transfer.with_task_data=false needs transfer.source: there would be nothing to train on")
        return
    check_text_set(cfg, "transfer")


def check_text_set(cfg: TextSetConfig, where: str) -> None:
    if cfg.source is None:
        raise ConfigError(f"{where}.source is not set")
    if cfg.limit is not None and cfg.limit < 1:
        raise ConfigError(f"{where}.limit must be at least 1; got {cfg.limit}")
    if cfg.min_words < 1:
        raise ConfigError(f"{where}.min_words must be at least 1; got {cfg.min_words}")


def text_set(cfg: TextSetConfig, where: str) -> list[str]:
    """The set's examples: texts (or their sentences), shuffled with `shuffle_seed`, the first `limit`."""
    texts = source_texts(cfg, cfg.split, where)
    if cfg.sentences:
        texts = [s for text in texts for s in split_sentences(text) if len(s.split()) >= cfg.min_words]
    random.Random(cfg.shuffle_seed).shuffle(texts)
    texts = texts[:cfg.limit] if cfg.limit else texts
    if not texts:
        raise ConfigError(f"{where}.source {cfg.source} gave no examples")
    return texts


def split_sentences(text: str) -> list[str]:
    return [s.strip() for s in SENTENCE_END.split(MARKUP.sub(" ", text)) if s.strip()]


def unlabelled_split(texts: list[str], tokenizer: PreTrainedTokenizerBase, max_length: int,
                     features: Optional[datasets.Features] = None) -> datasets.Dataset:
    """`texts` tokenized like a task split, each labelled `IGNORED_LABEL` (with the task split's `features`)."""
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    columns = {name: encoded[name] for name in (features or encoded) if name != "labels"}
    columns["labels"] = [IGNORED_LABEL] * len(texts)
    if features is None:
        return datasets.Dataset.from_dict(columns)
    plain = features.copy()
    plain["labels"] = datasets.Value("int64")  # a ClassLabel cannot hold the ignored label
    return datasets.Dataset.from_dict(columns, features=plain)


def with_unlabelled(train: datasets.Dataset, extra: list[datasets.Dataset], keep_train: bool = True
                    ) -> datasets.Dataset:
    """The training split with the unlabelled `extra` sets appended (or those alone, without `keep_train`)."""
    plain = train.cast_column("labels", datasets.Value("int64"))
    parts = ([plain] if keep_train else []) + extra
    return datasets.concatenate_datasets(parts) if len(parts) > 1 else parts[0]


def unlabelled_texts(data: DataConfig, transfer: TransferConfig, augment: AugmentConfig, teacher: PreTrainedModel,
                     tokenizer: PreTrainedTokenizerBase) -> list[list[str]]:
    """The texts the teacher labels: the augmented copies of the training texts (drawn from `teacher`'s embedding,
    whose ids are those of its `tokenizer`), then the transfer set; each part empty when it is not configured."""
    copies, transferred = [], []
    if augment.copies:
        texts = load_splits(data)["train"]["text"]
        copies = Augmenter(augment, teacher, tokenizer, texts).copies(texts)
    if transfer.source is not None:
        transferred = text_set(transfer, "transfer")
    return [part for part in (copies, transferred) if part]


def add_unlabelled(task: Task, texts: list[list[str]], max_length: int, with_task_data: bool = True) -> Task:
    """`task` with the unlabelled `texts` (`unlabelled_texts`) tokenized by its tokenizer and added to its training
    split (which they replace without `with_task_data`); unchanged when there are none."""
    if not texts:
        return task
    train = task.splits["train"]
    extra = [unlabelled_split(part, task.tokenizer, max_length, train.features) for part in texts]
    logger.info("training on %d labelled and %d unlabelled examples", len(train) if with_task_data else 0,
                sum(len(split) for split in extra))
    splits = datasets.DatasetDict({**task.splits, "train": with_unlabelled(train, extra, with_task_data)})
    return dataclasses.replace(task, splits=splits)
