"""Before token-level distillation: can the student's logits be compared with the teacher's id for id?

Identical vocabularies can. A vocabulary that is a padded or truncated copy of the other (the same token at each
shared id, extra ids only at the end), or model logits padded beyond their tokenizer, can on the shared leading ids:
both logits are cut to that many, with a warning. Anything else is a configuration error."""
from __future__ import annotations

import logging

from transformers import PreTrainedTokenizerBase

from distill.core.errors import ConfigError
from distill.core.models import vocabulary_difference

logger = logging.getLogger(__name__)


def common_vocab_size(student_tokenizer: PreTrainedTokenizerBase, teacher_tokenizer: PreTrainedTokenizerBase,
                      student_logits: int, teacher_logits: int) -> int:
    """How many leading token ids the student's and the teacher's logits share (`LossSetup.vocab_size`), given
    each model's logit width (its output embedding rows)."""
    student_vocab, teacher_vocab = student_tokenizer.get_vocab(), teacher_tokenizer.get_vocab()
    if student_vocab == teacher_vocab and student_logits == teacher_logits:
        return student_logits
    if not is_prefix(student_vocab, teacher_vocab) and not is_prefix(teacher_vocab, student_vocab):
        raise ConfigError(
            f"student and teacher vocabularies differ ({vocabulary_difference(student_tokenizer, teacher_tokenizer)})"
            ", not only in ids at the end: token-level distillation compares logits id by id. For a student with its "
            "own tokenizer set student_tokenizer and use the cross-tokenizer losses aligned_kl or uld"
        )
    shared = min(len(student_vocab), len(teacher_vocab), student_logits, teacher_logits)
    logger.warning(
        "student vocabulary (tokenizer %d, logits %d) and teacher vocabulary (tokenizer %d, logits %d) differ only at "
        "the end: distilling over their first %d token ids", len(student_vocab), student_logits, len(teacher_vocab),
        teacher_logits, shared)
    return shared


def is_prefix(short: dict[str, int], long: dict[str, int]) -> bool:
    """Whether `short` holds ids 0..len(short)-1 and `long` gives each of its tokens the same id."""
    return set(short.values()) == set(range(len(short))) and all(long.get(token) == i for token, i in short.items())
