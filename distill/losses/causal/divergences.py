"""Divergences between a student's and a teacher's next-token distributions, one value per row of float32 (rows,
vocabulary) logits: forward KL, reverse KL, the generalized JSD of GKD, total variation, and KL to a teacher's cached
top-k (with repeated or sampled slots). Pure functions of tensors; `fused` runs them chunk by chunk over target
positions."""
from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F

Divergence = Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
"""(student logits, teacher logits, temperature) -> one value per row, on float32 (rows, vocabulary) logits."""


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


def total_variation(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """TV(p, q) = sum |p - q| / 2 per row on logits softened at `temperature`. 1 - TV is the chance that speculative
    sampling accepts a proposal of the student as the teacher's draft (Leviathan et al. 2023), which makes it the
    loss that trains a draft for acceptance (DistillSpec, Zhou et al. 2024)."""
    t = temperature
    return (F.softmax(teacher / t, -1) - F.softmax(student / t, -1)).abs().sum(-1) / 2


def sparse_kl_rows(log_p: torch.Tensor, log_q: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """KL over each row's slots: sum of p (log p_token - log q), p_token the weight of the slot's token summed over
    the slots that repeat it (so that repeats count as one token of their total weight, and the value is a KL of
    distributions, never below 0 with the rest bucket); a slot of weight 0 (log p = -inf) counts nothing."""
    p = log_p.exp()
    return torch.where(p > 0, p * (token_weights(p, indices).log() - log_q), 0.0).sum(-1)


def token_weights(weights: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """Each slot's token's weight summed over the row's slots that hold the same token (by sorting, O(slots))."""
    sorted_ids, order = indices.sort(-1)
    group = F.pad((sorted_ids[..., 1:] != sorted_ids[..., :-1]).long().cumsum(-1), (1, 0))
    totals = torch.zeros_like(weights).scatter_add_(-1, group, weights.gather(-1, order))
    return torch.empty_like(weights).scatter_(-1, order, totals.gather(-1, group))


def check_topk_ids(indices: torch.Tensor, vocabulary: int) -> None:
    if indices.numel() and indices.max() >= vocabulary:
        raise ValueError(f"the teacher's top-k holds token id {int(indices.max())}, beyond the {vocabulary} token ids "
                         f"compared; cache the teacher's logits cut to {vocabulary} ids")


def topk_kl(student: torch.Tensor, teacher_logprobs: torch.Tensor, teacher_indices: torch.Tensor,
            temperature: float, tail: bool) -> torch.Tensor:
    """KL(teacher || student) per row against the teacher's cached log-probabilities (already at `temperature`) at
    token ids `teacher_indices`: its top k, distinct, and perhaps tokens sampled from the rest (a sampled cache, whose
    slots may repeat a token and hold the whole mass; `distill.lm.cache`). With `tail`, over the slots plus one bucket
    for the rest of the vocabulary (the teacher's mass left out of the slots, the student's own mass outside those
    tokens); when k covers the vocabulary there is no rest. Without `tail`, both renormalised over the k tokens.

    Through a sampled row the gradient with respect to the student's logits is (student probabilities - slot
    weights summed per token), whose expectation is the full forward-KL gradient; the value itself is the KL to the
    sampled estimate (repeats merged), not to the full distribution."""
    vocabulary = student.shape[-1]
    check_topk_ids(teacher_indices, vocabulary)
    log_q = F.log_softmax(student / temperature, -1)
    log_q_top = log_q.gather(-1, teacher_indices)
    if not tail:
        return kl_rows(F.log_softmax(teacher_logprobs, -1), F.log_softmax(log_q_top, -1))
    kl = sparse_kl_rows(teacher_logprobs, log_q_top, teacher_indices)
    if teacher_indices.shape[-1] >= vocabulary:  # a top k of the whole vocabulary; sampled slots leave no rest
        return kl
    p_rest = (1 - teacher_logprobs.exp().sum(-1)).clamp_min(0)  # a cache's rounding can push the sum past 1
    log_q_rest = log_q.scatter(-1, teacher_indices, float("-inf")).logsumexp(-1)
    return kl + torch.special.xlogy(p_rest, p_rest) - p_rest * log_q_rest
