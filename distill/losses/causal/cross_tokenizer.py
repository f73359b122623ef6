"""Token-level losses between a student and a teacher with different tokenizers, one value per row of float32
(rows, vocabulary) logits whose vocabularies differ: KL over shared-vocabulary buckets at aligned positions (the
buckets and positions come from `distill.lm.align`), and ULD's distance between sorted distributions, as pure
functions of tensors and as the registered losses `aligned_kl` and `uld`."""
from __future__ import annotations

import math
from typing import Optional, Protocol

import torch
import torch.nn.functional as F

from distill.core.config import LossConfig
from distill.core.errors import ConfigError
from distill.core.loss_interface import DistillLoss, LossInputs, LossSetup, register
from distill.losses.causal.fused import LogitSource, TeacherTopK


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
    return bucket_kl(log_p, student_logits, vocab, temperature)


def aligned_topk_kl(student_logits: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_indices: torch.Tensor,
                    vocab: Buckets, temperature: float) -> torch.Tensor:
    """`aligned_kl` against a teacher cache's rows at the aligned positions (log-probabilities already at
    `temperature`, their token ids): the slots' mass goes to their tokens' buckets, everything else (unshared slots
    and the mass outside the slots) to the rest."""
    log_p = topk_bucket_probs(teacher_logprobs.exp(), teacher_indices, vocab).clamp_min(
        torch.finfo(teacher_logprobs.dtype).tiny).log()
    return bucket_kl(log_p, student_logits, vocab, temperature)


def topk_bucket_probs(weights: torch.Tensor, indices: torch.Tensor, vocab: Buckets) -> torch.Tensor:
    """(rows, slots) slot weights and token ids -> (rows, size + 1) bucket masses, the last the rest: 1 - the mass
    of the shared slots (so that it holds the unshared slots and whatever the slots leave out)."""
    lookup = torch.full((int(max(indices.max(), vocab.teacher_ids.max())) + 1,), vocab.size, dtype=torch.long,
                        device=indices.device)
    lookup[vocab.teacher_ids.to(indices.device)] = vocab.teacher_bucket.to(indices.device)
    buckets = weights.new_zeros(weights.shape[0], vocab.size + 1).scatter_add_(1, lookup[indices], weights)
    buckets[:, -1] = (1 - buckets[:, :-1].sum(-1)).clamp_min(0)
    return buckets


def bucket_kl(log_p: torch.Tensor, student_logits: torch.Tensor, vocab: Buckets, temperature: float) -> torch.Tensor:
    """KL(p || q) per row, p the teacher's bucket log-masses, q the student's bucketed distribution at
    `temperature`."""
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


# ----- registered losses --------------------------------------------------------------------------------------
CROSS_TOKENIZER_LOSSES = ("aligned_kl", "aligned_topk_kl", "uld")
ALIGNED_KEYS = ("teacher_aligned_student", "teacher_aligned_teacher")
"""The batch keys of the aligned position pairs (batch, pairs): student position, teacher position; -1 pads."""


def aligned_pairs(inputs: LossInputs, student: LogitSource, teacher_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The flat (batch * length) student positions and teacher positions of the batch's aligned pairs."""
    if inputs.batch is None or ALIGNED_KEYS[0] not in inputs.batch:
        raise ValueError("cross-tokenizer losses read aligned positions from the batch (a cross-tokenizer collator "
                         "adds them); this batch has none")
    student_at, teacher_at = (inputs.batch[key] for key in ALIGNED_KEYS)
    valid = student_at >= 0
    rows = valid.nonzero()[:, 0]
    return rows * student.states.shape[1] + student_at[valid], rows * teacher_length + teacher_at[valid]


class _CrossTokenizerLoss(DistillLoss):
    """A loss between a student and a teacher that tokenize the text differently, at the positions where both
    predict the token beginning at the same character (`distill.lm.align`), averaged over them, times T^2. The
    student's logits are projected through its LM head at those positions only."""
    reads_lm_head = True
    options = ("temperature",)
    reads_shared_vocab = True

    def __init__(self, spec: LossConfig, setup: LossSetup):
        super().__init__(spec, setup)
        if self.reads_shared_vocab and setup.shared_vocab is None:
            raise ConfigError(f"loss '{spec.name}' compares the tokens two vocabularies share: it needs a student "
                              "with its own tokenizer (student_tokenizer)")
        self.vocab = setup.shared_vocab

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        student = LogitSource.of(inputs.student, inputs.student_head)
        values = self.values(student, inputs)
        return values.mean() * self.temperature ** 2 if len(values) else values.sum()

    def values(self, student: LogitSource, inputs: LossInputs) -> torch.Tensor:
        raise NotImplementedError

    def teacher_rows(self, student: LogitSource, inputs: LossInputs) -> tuple[torch.Tensor, torch.Tensor]:
        """float32 logits of the student (differentiable) and of the live teacher at the aligned pairs."""
        teacher = LogitSource.of(inputs.teacher, inputs.teacher_head)
        student_at, teacher_at = aligned_pairs(inputs, student, teacher.states.shape[1])
        with torch.no_grad():
            teacher_rows = teacher.rows(teacher_at, None)
        return student.rows(student_at, None), teacher_rows

    def shared_vocab(self, device: torch.device) -> Buckets:
        if self.vocab.student_ids.device != device:
            self.vocab = type(self.vocab)(**{name: value.to(device) if torch.is_tensor(value) else value
                                             for name, value in vars(self.vocab).items()})
        return self.vocab


@register("aligned_kl")
class AlignedKL(_CrossTokenizerLoss):
    """KL(teacher || student) over the shared-vocabulary buckets plus a rest bucket (`aligned_kl`), live teacher."""

    def values(self, student: LogitSource, inputs: LossInputs) -> torch.Tensor:
        student_rows, teacher_rows = self.teacher_rows(student, inputs)
        return aligned_kl(student_rows, teacher_rows, self.shared_vocab(student_rows.device), self.temperature)


@register("aligned_topk_kl")
class AlignedTopKKL(_CrossTokenizerLoss):
    """`aligned_kl` against a teacher cache of the teacher's tokenization (`aligned_topk_kl`): no teacher runs."""
    needs_teacher = False

    def values(self, student: LogitSource, inputs: LossInputs) -> torch.Tensor:
        topk = TeacherTopK.from_batch(inputs.batch or {})
        if topk is None:
            raise ValueError("loss 'aligned_topk_kl' reads the teacher's top-k from the batch (a teacher cache's "
                             "collator adds it); this batch has none")
        student_at, teacher_at = aligned_pairs(inputs, student, topk.indices.shape[1])
        logprobs, indices = topk.rows(teacher_at)
        student_rows = student.rows(student_at, None)
        return aligned_topk_kl(student_rows, logprobs, indices, self.shared_vocab(student_rows.device),
                               self.temperature)


@register("uld")
class ULD(_CrossTokenizerLoss):
    """ULD's distance between the sorted distributions (`uld_distance`), live teacher."""
    reads_shared_vocab = False

    def values(self, student: LogitSource, inputs: LossInputs) -> torch.Tensor:
        return uld_distance(*self.teacher_rows(student, inputs), self.temperature)
