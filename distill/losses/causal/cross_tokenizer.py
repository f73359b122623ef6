"""Token-level losses between a student and a teacher with different tokenizers, one value per row of float32
(rows, vocabulary) logits whose vocabularies differ: KL over shared-vocabulary buckets at aligned positions (the
buckets and positions come from `distill.lm.align`), and ULD's distance between sorted distributions. Pure
functions of tensors."""
from __future__ import annotations

import math
from typing import Optional, Protocol

import torch
import torch.nn.functional as F


class Buckets(Protocol):
    """Each side's shared token ids and the bucket of each, `size` buckets: `distill.lm.align.SharedVocab`."""
    student_ids: torch.Tensor
    student_bucket: torch.Tensor
    teacher_ids: torch.Tensor
    teacher_bucket: torch.Tensor
    size: int


def aligned_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, vocab: Buckets,
               temperature: float) -> torch.Tensor:
    """KL(teacher || student) per row over the shared buckets of `vocab` plus one bucket for the rest, on logits
    softened at `temperature`. Row i of both is an aligned pair: both models predict the token that begins at the
    same character. Only the mass of tokens whose surfaces both vocabularies share is compared bucket by bucket."""
    log_p = bucket_log_probs(F.log_softmax(teacher_logits / temperature, -1), vocab.teacher_ids,
                             vocab.teacher_bucket, vocab.size)
    log_q = bucket_log_probs(F.log_softmax(student_logits / temperature, -1), vocab.student_ids,
                             vocab.student_bucket, vocab.size)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def uld_distance(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float,
                 top: Optional[int] = None) -> torch.Tensor:
    """ULD (Boizard et al. 2024) per row: the sum of absolute differences between the two distributions at
    `temperature`, each sorted in decreasing order, the shorter padded with zeros. It assumes nothing about which
    token is which and compares only the shape of the distributions. `top` keeps each side's `top` largest
    probabilities only (less memory; the tail's differences are then left out, so the value is a lower bound)."""
    student = _sorted_probs(student_logits / temperature, top)
    teacher = _sorted_probs(teacher_logits / temperature, top)
    width = max(student.shape[-1], teacher.shape[-1])
    student, teacher = (F.pad(x, (0, width - x.shape[-1])) for x in (student, teacher))
    return (student - teacher).abs().sum(-1)


def _sorted_probs(logits: torch.Tensor, top: Optional[int]) -> torch.Tensor:
    probs = logits.softmax(-1)
    return probs.topk(probs.shape[-1] if top is None else min(top, probs.shape[-1]), -1).values


def bucket_probs(probs: torch.Tensor, ids: torch.Tensor, bucket: torch.Tensor, size: int) -> torch.Tensor:
    """(rows, vocabulary) probabilities -> (rows, size + 1): the mass of each shared bucket, and last the rest (the
    columns not in `ids`, summed directly rather than as 1 - shared so that it keeps its precision)."""
    columns = _column_buckets(ids, bucket, size, probs)
    return probs.new_zeros(probs.shape[0], size + 1).index_add(1, columns, probs)


def bucket_log_probs(log_probs: torch.Tensor, ids: torch.Tensor, bucket: torch.Tensor, size: int) -> torch.Tensor:
    """The log of `bucket_probs`, from log-probabilities by a logsumexp per bucket: a bucket keeps its precision
    however small its mass; an empty rest is -inf."""
    columns = _column_buckets(ids, bucket, size, log_probs)
    # shifting by each bucket's largest entry keeps exp from underflowing; the shift cancels, so no gradient needed
    peak = log_probs.new_full((log_probs.shape[0], size + 1), -math.inf).scatter_reduce(
        1, columns.expand_as(log_probs), log_probs.detach(), "amax")
    peak = peak.nan_to_num(neginf=0.0)
    sums = log_probs.new_zeros(peak.shape).index_add(1, columns, (log_probs - peak[:, columns]).exp())
    return sums.log() + peak


def _column_buckets(ids: torch.Tensor, bucket: torch.Tensor, size: int, like: torch.Tensor) -> torch.Tensor:
    """Each column's bucket, `size` (the rest) for the columns not in `ids`."""
    columns = torch.full((like.shape[-1],), size, dtype=torch.long, device=like.device)
    columns[ids.to(like.device)] = bucket.to(like.device)
    return columns
