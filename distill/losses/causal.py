"""Token-level losses for causal LMs: forward KL, reverse KL and generalized JSD to the teacher, KL to a teacher's
cached top-k, and next-token CE, each a mean over real target tokens. A stage mixes them through its loss list
(for example `forward_kl` with weight 0.5 and `next_token_ce` with weight 0.5).

Causal shift: the logits at position t predict token t + 1, so position t counts when `labels[t + 1] != -100`
(padding and prompt tokens carry -100; the last position never counts).

Memory: the losses walk through the real target positions `chunk_size` at a time, each chunk under activation
checkpointing, so that only one chunk's float32 logits (chunk_size x vocabulary, a few copies) exist at once,
forward and backward. Given the LM heads (`LossInputs.student_head` / `teacher_head`), the models' (batch, length,
vocabulary) logits never exist at all: memory beyond the models' own activations is O(chunk_size x vocabulary).
Without heads the losses read the models' logits, in whatever precision the models produced them."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.utils import ModelOutput

from ..config import ConfigError, LossConfig
from .base import DistillLoss, LossInputs, LossSetup, TeacherTopK, register

IGNORE_INDEX = -100

Divergence = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
"""(student logits, teacher logits, temperature) -> one value per row, on float32 (rows, vocabulary) logits."""


@dataclass
class LogitSource:
    """A model's next-token logits, produced for a few positions at a time: final hidden states (batch, length,
    hidden) put through `head`, or, without a head, the logits themselves (batch, length, vocabulary)."""
    states: torch.Tensor
    head: Optional[nn.Module] = None

    @classmethod
    def of(cls, output: ModelOutput, head: Optional[nn.Module]) -> LogitSource:
        return cls(output.hidden_states[-1], head) if head is not None else cls(output.logits)

    def rows(self, positions: torch.Tensor, vocab_size: Optional[int]) -> torch.Tensor:
        """float32 logits (len(positions), vocabulary) of the flat (batch * length) `positions`, cut to
        `vocab_size` token ids."""
        states = self.states.reshape(-1, self.states.shape[-1])[positions]
        logits = states if self.head is None else self.head(states)
        return logits[:, :vocab_size].float()


# ----- divergences per position -------------------------------------------------------------------------------
def kl_rows(log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """KL(p || q) of each row, from log-probabilities."""
    return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)


def forward_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) per row on logits softened at `temperature`: mass-covering."""
    t = temperature
    return kl_rows(F.log_softmax(teacher / t, -1), F.log_softmax(student / t, -1))


def reverse_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(student || teacher) per row on logits softened at `temperature`: mode-seeking."""
    t = temperature
    return kl_rows(F.log_softmax(student / t, -1), F.log_softmax(teacher / t, -1))


def generalized_jsd(student: torch.Tensor, teacher: torch.Tensor, temperature: float, beta: float) -> torch.Tensor:
    """The generalized JSD of GKD (Agarwal et al. 2024) per row, with p the teacher and q the student,
    divided by beta * (1 - beta):

        (beta KL(p || m) + (1 - beta) KL(q || m)) / (beta (1 - beta)),   m = beta p + (1 - beta) q.

    The undivided form vanishes at both ends; divided, it is continuous in beta and tends to forward KL(p || q)
    as beta -> 0 and to reverse KL(q || p) as beta -> 1, which is what beta = 0 and beta = 1 compute (exactly, not
    through the mixture). Inside (0, 1) it is TRL's `generalized_jsd_loss` divided by beta (1 - beta)."""
    if beta == 0:
        return forward_kl(student, teacher, temperature)
    if beta == 1:
        return reverse_kl(student, teacher, temperature)
    log_p, log_q = F.log_softmax(teacher / temperature, -1), F.log_softmax(student / temperature, -1)
    log_m = torch.logaddexp(log_p + math.log(beta), log_q + math.log(1 - beta))
    return (beta * kl_rows(log_p, log_m) + (1 - beta) * kl_rows(log_q, log_m)) / (beta * (1 - beta))


def topk_kl(student: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_indices: torch.Tensor,
            temperature: float, tail: bool) -> torch.Tensor:
    """KL(teacher || student) per row against the teacher's top-k log-probabilities (already at `temperature`) at
    token ids `teacher_indices` (distinct within a row). With `tail`, over k + 1 buckets: the k tokens, and the rest
    of the vocabulary (the teacher's 1 - its top-k mass, the student's own mass outside those tokens); when k covers
    the vocabulary there is no rest. Without `tail`, both renormalised over the k tokens."""
    vocabulary = student.shape[-1]
    if teacher_indices.numel() and teacher_indices.max() >= vocabulary:
        raise ValueError(f"the teacher's top-k holds token id {int(teacher_indices.max())}, beyond the {vocabulary} "
                         f"token ids compared; cache the teacher's logits cut to {vocabulary} ids")
    log_q = F.log_softmax(student / temperature, -1)
    log_q_top = log_q.gather(-1, teacher_indices)
    if not tail:
        return kl_rows(F.log_softmax(teacher_logprobs, -1), F.log_softmax(log_q_top, -1))
    kl = kl_rows(teacher_logprobs, log_q_top)
    if teacher_indices.shape[-1] == vocabulary:
        return kl
    p_rest = (1 - teacher_logprobs.exp().sum(-1)).clamp_min(0)  # a cache's rounding can push the sum past 1
    log_q_rest = log_q.scatter(-1, teacher_indices, float("-inf")).logsumexp(-1)
    return kl + torch.special.xlogy(p_rest, p_rest) - p_rest * log_q_rest


# ----- means over target tokens, chunk by chunk ---------------------------------------------------------------
def next_tokens(labels: torch.Tensor) -> torch.Tensor:
    """The token each position predicts: `labels` shifted left by one, -100 at the last position."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def target_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat (batch * length) indices of the positions whose next token is a real target."""
    return (next_tokens(labels) != IGNORE_INDEX).flatten().nonzero().squeeze(1)


def chunked_mean(per_position: Callable[[torch.Tensor], torch.Tensor], positions: torch.Tensor,
                 chunk_size: int) -> torch.Tensor:
    """Mean over `positions` of `per_position` (flat positions -> one value each), `chunk_size` positions at a
    time. Each chunk runs under activation checkpointing: backward recomputes its logits instead of keeping them."""
    total = torch.zeros((), device=positions.device)
    for chunk in positions.split(chunk_size):
        total = total + checkpoint(lambda rows: per_position(rows).sum(), chunk, use_reentrant=False,
                                   preserve_rng_state=False)  # nothing random in a chunk
    return total / max(len(positions), 1)


def distill_tokens(divergence: Divergence, student: LogitSource, teacher: LogitSource, labels: torch.Tensor,
                   temperature: float = 1.0, chunk_size: int = 256, vocab_size: Optional[int] = None) -> torch.Tensor:
    """`divergence` between the student's and the teacher's next-token distributions at `temperature`, times T^2,
    averaged over real target tokens; both logits cut to the first `vocab_size` token ids."""
    def per_position(rows: torch.Tensor) -> torch.Tensor:
        return divergence(student.rows(rows, vocab_size), teacher.rows(rows, vocab_size), temperature)

    return chunked_mean(per_position, target_positions(labels), chunk_size) * temperature ** 2


def distill_topk(student: LogitSource, teacher: TeacherTopK, labels: torch.Tensor, temperature: float = 1.0,
                 tail: bool = True, chunk_size: int = 256, vocab_size: Optional[int] = None) -> torch.Tensor:
    """`topk_kl` to the teacher's cached top-k at `temperature`, times T^2, averaged over real target tokens."""
    def per_position(rows: torch.Tensor) -> torch.Tensor:
        return topk_kl(student.rows(rows, vocab_size), *teacher.rows(rows), temperature, tail)

    return chunked_mean(per_position, target_positions(labels), chunk_size) * temperature ** 2


def next_token_ce(student: LogitSource, labels: torch.Tensor, chunk_size: int = 256,
                  vocab_size: Optional[int] = None) -> torch.Tensor:
    """Cross-entropy of each real next token, averaged over them (what transformers' causal LMs report as `loss`)."""
    targets = next_tokens(labels).flatten()

    def per_position(rows: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(student.rows(rows, vocab_size), targets[rows], reduction="none")

    return chunked_mean(per_position, target_positions(labels), chunk_size)


# ----- registered losses --------------------------------------------------------------------------------------
class _TokenLoss(DistillLoss):
    reads_lm_head = True

    def __init__(self, spec: LossConfig, setup: LossSetup):
        super().__init__(spec, setup)
        self.check_options(spec)
        self.vocab_size = setup.vocab_size

    @classmethod
    def check_options(cls, spec: LossConfig, where: str = "") -> None:
        if spec.chunk_size < 1:
            raise ConfigError(f"{where}loss '{spec.name}': chunk_size is a number of positions, at least 1; "
                              f"got {spec.chunk_size}")


@register("next_token_ce")
class NextTokenCE(_TokenLoss):
    needs_teacher = False

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        student = LogitSource.of(inputs.student, inputs.student_head)
        return next_token_ce(student, inputs.labels, self.spec.chunk_size, self.vocab_size)


class _TokenDivergence(_TokenLoss):
    divergence = staticmethod(forward_kl)

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        student = LogitSource.of(inputs.student, inputs.student_head)
        teacher = LogitSource.of(inputs.teacher, inputs.teacher_head)
        return distill_tokens(self.divergence, student, teacher, inputs.labels, self.temperature,
                              self.spec.chunk_size, self.vocab_size)


@register("forward_kl")
class ForwardKL(_TokenDivergence):
    divergence = staticmethod(forward_kl)


@register("reverse_kl")
class ReverseKL(_TokenDivergence):
    divergence = staticmethod(reverse_kl)


@register("jsd")
class GeneralizedJSD(_TokenDivergence):
    @classmethod
    def check_options(cls, spec: LossConfig, where: str = "") -> None:
        super().check_options(spec, where)
        if not 0 <= spec.beta <= 1:
            raise ConfigError(f"{where}loss '{spec.name}': beta is a mixing weight in 0..1 (0: forward KL, "
                              f"1: reverse KL); got {spec.beta}")

    def divergence(self, student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
        return generalized_jsd(student, teacher, temperature, self.spec.beta)


@register("topk_kl")
class TopKKL(_TokenLoss):
    """KL to the teacher's cached top-k (`LossInputs.teacher_topk`): no teacher model runs."""
    needs_teacher = False

    def forward(self, inputs: LossInputs) -> torch.Tensor:
        if inputs.teacher_topk is None:
            raise ValueError("loss 'topk_kl' reads the teacher's top-k (LossInputs.teacher_topk), from a teacher "
                             "cache; this batch has none")
        student = LogitSource.of(inputs.student, inputs.student_head)
        return distill_topk(student, inputs.teacher_topk, inputs.labels, self.temperature, self.spec.topk_tail,
                            self.spec.chunk_size, self.vocab_size)
